"""diffusers' DDPM ``UNet2DModel`` folders <-> this project's U-Net, both ways.

The Hub's DDPM models (``google/ddpm-cifar10-32``, ``google/ddpm-ema-{church,bedroom,cat,celebahq}-256``, their
non-EMA twins) are the official DDPM network converted to diffusers' module names, so they load into
``ddim.models.UNet`` by renaming keys: every key must be used and every shape must match, or the load stops naming
the first keys that do not fit.  The scheduler's β schedule (``scheduler_config.json``) becomes the project's ᾱ.

The other way, ``save_diffusers_folder`` writes a U-Net and its ᾱ as a folder that
``diffusers.DDIMPipeline.from_pretrained`` loads: ``unet/`` (config + safetensors), ``scheduler/`` (a
``DDIMScheduler`` set to this project's conventions, so its η = 0 loop gives ``ddim.diffusion.sample``'s samples)
and ``model_index.json``, plus ``ddim.json`` (data set, EMA or not, source) that this project reads back.

Reading and writing need only ``safetensors`` (and torch); a Hub id needs ``huggingface_hub``; diffusers itself is
needed only to run the exported folder.  Optional dependencies are imported where they are used.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddim.diffusion.schedules import alphas_cumprod, alphas_cumprod_from_config, beta_schedule
from ddim.models.official import load_official_unet, state_dict_mismatch
from ddim.models.unet import UNet

__all__ = ["HUB_MODELS", "is_diffusers_source", "check_diffusers_source", "unet_kwargs_from_diffusers",
           "diffusers_unet_config", "diffusers_key", "unet_state_dict_from_diffusers", "unet_from_diffusers_state_dict",
           "diffusers_state_dict", "diffusion_from_scheduler_config", "alphas_cumprod_of", "ddim_scheduler_config",
           "load_diffusers_for_sampling", "save_diffusers_folder"]

_CIFAR10 = {"name": "cifar10", "image_size": 32, "channels": 3, "category": None}


def _lsun(category: str) -> dict:
    return {"name": "lsun", "image_size": 256, "channels": 3, "category": category}


#: The Hub's DDPM models: whether the weights are the EMA ones, and the data set (None: not one of this project's
#: data sets, so evaluate.py needs ``dataset=``).
HUB_MODELS: dict[str, dict] = {
    "google/ddpm-cifar10-32": {"ema": False, "data": _CIFAR10},
    **{f"google/ddpm{ema}-{name}-256": {"ema": bool(ema), "data": data}
       for ema in ("-ema", "")
       for name, data in (("church", _lsun("church_outdoor")), ("bedroom", _lsun("bedroom")), ("cat", _lsun("cat")),
                          ("celebahq", None))},
}
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EXPORT_INFO = "ddim.json"  # this project's own note in an exported folder
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LOCAL_FOLDER_HELP = ("download it where the Hub is reachable (hf download {id} --local-dir DIR) and "
                     "pass the folder instead: pretrained=DIR")

# UNet2DModel's defaults for the keys that shape the network (a config leaves out keys at their default) and the
# values the DDPM family has: anything else is a different network.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": True,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "time_embedding_dim": None, "num_train_timesteps": None,
    "in_channels": 3, "out_channels": 3, "layers_per_block": 2, "dropout": 0.0, "attention_head_dim": 8,
}
_DDPM_FAMILY: dict[str, Any] = {
    "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 0,
    "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-6, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "time_embedding_dim": None, "num_train_timesteps": None,
}
_BLOCKS = {False: ("DownBlock2D", "UpBlock2D"), True: ("AttnDownBlock2D", "AttnUpBlock2D")}
# diffusers' β schedules <-> the project's (the same formulas); others go as trained_betas
_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}


def _holds_unet(folder: Path) -> bool:
    return any((folder / sub / "config.json").is_file() for sub in ("unet", "."))


def is_diffusers_source(value: Any) -> bool:
    """Whether an evaluate.py ``pretrained=`` value names a diffusers model: a Hub id or a path (it has a "/"), or a
    folder holding a UNet2DModel; a bare name is a released model's (``pretrained=cifar10``)."""
    if not isinstance(value, (str, Path)) or not str(value):
        return False
    return "/" in str(value) or (Path(value).expanduser().is_dir() and _holds_unet(Path(value).expanduser()))


def check_diffusers_source(value: str | Path) -> None:
    """A diffusers model folder (``config.json`` at its root or under ``unet/``) or a Hub id ``owner/name``; no file
    is read and nothing is fetched."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not _holds_unet(path):
            raise ValueError(f"pretrained={value} is a folder without a diffusers UNet2DModel (no config.json at its "
                             f"root or under unet/)")
        return
    if not HUB_ID_PATTERN.match(str(value)):
        raise ValueError(f"pretrained={value} is neither an existing folder nor a Hugging Face Hub id (owner/name, "
                         f"e.g. google/ddpm-cifar10-32)")


# ----------------------------------------------------------------------------------------------- config and keys


def _not_ddpm(what: str) -> ValueError:
    return ValueError(f"not a UNet2DModel of the DDPM family (google/ddpm-cifar10-32, google/ddpm-ema-church-256, "
                      f"...): {what}")


def unet_kwargs_from_diffusers(config: Mapping) -> dict:
    """``UNet`` kwargs from a DDPM-family ``UNet2DModel`` ``config.json``; any setting outside the family (another
    time embedding, padding, norm, multi-head attention, ...) is refused with the key and both values."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _not_ddpm(f"_class_name is {config['_class_name']!r}")
    get = {**_DIFFUSERS_DEFAULTS, **config}.get
    channels = [int(c) for c in config.get("block_out_channels") or []]
    equivalent = {"attn_norm_num_groups": 32, "time_embedding_dim": 4 * channels[0] if channels else None}
    for key, want in _DDPM_FAMILY.items():
        if get(key) != want and (key not in equivalent or get(key) != equivalent[key]):
            raise _not_ddpm(f"config {key}={get(key)!r} (the DDPM family has {want!r})")
    down, up = list(config.get("down_block_types") or []), list(config.get("up_block_types") or [])
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        raise _not_ddpm(f"block_out_channels={channels}, down_block_types={down}, up_block_types={up} (one block "
                        f"type per level, down and up)")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise _not_ddpm(f"block_out_channels={channels} are not multiples of the first")
    attention = [d == _BLOCKS[True][0] for d in down]
    if any(d != _BLOCKS[a][0] for d, a in zip(down, attention)) or up != [_BLOCKS[a][1] for a in attention][::-1]:
        raise _not_ddpm(f"down_block_types={down}, up_block_types={up} (DownBlock2D/AttnDownBlock2D, mirrored by "
                        f"UpBlock2D/AttnUpBlock2D)")
    head_dim = get("attention_head_dim")
    attended = [c for c, a in zip(channels, attention) if a] + [channels[-1]]  # the middle block attends too
    if head_dim is not None and any(int(head_dim) != c for c in attended):
        raise _not_ddpm(f"attention_head_dim={head_dim} splits attention into several heads (the DDPM family has one "
                        f"head: attention_head_dim null)")
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise _not_ddpm(f"sample_size={size} is not square")
        size = size[0]
    if not isinstance(size, int):
        raise _not_ddpm(f"sample_size={size!r} (an int is needed: the attention resolutions follow from it)")
    return {"ch": ch, "out_ch": int(get("out_channels")), "ch_mult": tuple(c // ch for c in channels),
            "num_res_blocks": int(get("layers_per_block")),
            "attn_resolutions": tuple(size // 2**level for level, a in enumerate(attention) if a),
            "dropout": float(get("dropout")), "in_channels": int(get("in_channels")), "resolution": size,
            "resamp_with_conv": True}


def diffusers_unet_config(model: UNet) -> dict:
    """The ``UNet2DModel`` config.json of this project's U-Net (refused where diffusers has no equivalent)."""
    if model.ch_mult[0] != 1:
        raise ValueError(f"ch_mult={model.ch_mult} starts with {model.ch_mult[0]}: UNet2DModel's first level keeps the "
                         f"input convolution's width, so only ch_mult starting with 1 exports")
    if model.num_resolutions > 1 and model.down[0].downsample.conv is None:
        raise ValueError("resamp_with_conv=False (average-pool downsampling) has no UNet2DModel equivalent")
    attention = [model.resolution // 2**level in model.attn_resolutions for level in range(model.num_resolutions)]
    return {"_class_name": "UNet2DModel", "_diffusers_version": _diffusers_version(), **_DDPM_FAMILY,
            "sample_size": model.resolution, "in_channels": model.in_channels, "out_channels": model.out_ch,
            "block_out_channels": [model.ch * m for m in model.ch_mult], "layers_per_block": model.num_res_blocks,
            "down_block_types": [_BLOCKS[a][0] for a in attention],
            "up_block_types": [_BLOCKS[a][1] for a in attention][::-1],
            "dropout": float(model.down[0].block[0].dropout.p), "attention_head_dim": None}


def _diffusers_version() -> str:
    try:
        from diffusers import __version__
    except ImportError:
        return "0.30.0"
    return __version__


_RESNET = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# the names of the attention weights in files written before diffusers' Attention class (ddpm-cifar10-32's)
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def diffusers_key(key: str, num_levels: int) -> str:
    """The ``UNet2DModel`` name of one of this U-Net's state-dict keys (``num_levels`` = ``len(ch_mult)``)."""
    m = re.match(r"^(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$", key)
    if m:
        side, level, kind, index, layer, param = m.groups()
        block = f"{side}_blocks.{level if side == 'down' else num_levels - 1 - int(level)}"
        layer = (_RESNET if kind == "block" else _ATTENTION).get(layer, layer)
        return f"{block}.{'resnets' if kind == 'block' else 'attentions'}.{index}.{layer}.{param}"
    m = re.match(r"^(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$", key)
    if m:
        side, level, kind, param = m.groups()
        block = level if side == "down" else num_levels - 1 - int(level)
        return f"{side}_blocks.{block}.{kind}rs.0.conv.{param}"
    m = re.match(r"^mid\.(block_1|attn_1|block_2)\.(\w+)\.(weight|bias)$", key)
    if m:
        part, layer, param = m.groups()
        if part == "attn_1":
            return f"mid_block.attentions.0.{_ATTENTION.get(layer, layer)}.{param}"
        return f"mid_block.resnets.{int(part[-1]) - 1}.{_RESNET.get(layer, layer)}.{param}"
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "norm_out": "conv_norm_out"}
    head, _, param = key.rpartition(".")
    return f"{fixed.get(head, head)}.{param}"


def _is_attention_projection(key: str) -> bool:
    return bool(re.search(r"\.(to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.weight$", key))


def _fmt(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def unet_state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping
                                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(``UNet`` kwargs, its state dict) from a DDPM-family ``UNet2DModel``'s config and weights: every diffusers key
    is used once and every shape matches (attention projections go from linear ``(C, C)`` to 1x1-conv
    ``(C, C, 1, 1)``), else a ValueError names the first keys that do not fit.  Works on meta tensors too."""
    kwargs = unet_kwargs_from_diffusers(config)
    with torch.device("meta"):  # shapes only; the weights come from state_dict
        target = UNet(**kwargs).state_dict()
    converted, used, missing = {}, set(), []
    for key, want in target.items():
        name = wanted = diffusers_key(key, len(kwargs["ch_mult"]))
        if name not in state_dict:
            head, _, param = name.rpartition(".")
            for new, old in _LEGACY_ATTENTION.items():
                if head.endswith("." + new):
                    name = f"{head[: -len(new)]}{old}.{param}"
        if name not in state_dict:
            missing.append(wanted)
            continue
        tensor = state_dict[name]
        if _is_attention_projection(name) and tensor.ndim == 2 and want.ndim == 4:
            tensor = tensor[:, :, None, None]
        converted[key] = tensor
        used.add(name)
    unused = [k for k in state_dict if k not in used]
    if missing or unused:
        raise _not_ddpm(f"weights do not map onto the DDPM U-Net {kwargs}: "
                        + "; ".join(part for part in (f"missing: {_fmt(missing)}" if missing else "",
                                                      f"unused: {_fmt(unused)}" if unused else "") if part))
    mismatch = state_dict_mismatch(target, converted)
    if mismatch:
        raise _not_ddpm(f"weights do not fit the DDPM U-Net {kwargs}: {mismatch}")
    return kwargs, converted


def unet_from_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> UNet:
    """This project's ``UNet`` (eval mode, CPU) holding a DDPM-family ``UNet2DModel``'s weights."""
    kwargs, converted = unet_state_dict_from_diffusers(state_dict, config)
    return load_official_unet(converted, kwargs)


def diffusers_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """The U-Net's weights under ``UNet2DModel``'s names (attention projections as linear ``(C, C)`` weights)."""
    out = {}
    for key, tensor in model.state_dict().items():
        name = diffusers_key(key, model.num_resolutions)
        if _is_attention_projection(name):
            tensor = tensor.flatten(1)
        out[name] = tensor.detach().to("cpu").contiguous().clone()
    return out


# ----------------------------------------------------------------------------------------------------- scheduler


def diffusion_from_scheduler_config(config: Mapping) -> dict:
    """The project's ``diffusion`` entry (``beta_schedule``, ``beta_start``, ``beta_end``,
    ``num_diffusion_timesteps``; ``trained_betas`` for an explicit list) from a diffusers scheduler config."""
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"scheduler prediction_type={config['prediction_type']!r}: only ε-prediction models "
                         f"(prediction_type epsilon) are supported")
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("scheduler rescale_betas_zero_snr=true is not supported (the project's schedules keep ᾱ > 0)")
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = [float(b) for b in config["trained_betas"]]
        if len(betas) != T:
            raise ValueError(f"scheduler trained_betas has {len(betas)} entries but num_train_timesteps={T}")
        return {"trained_betas": betas, "num_diffusion_timesteps": T}
    kind = config.get("beta_schedule", "linear")
    if kind not in _SCHEDULES:
        raise ValueError(f"scheduler beta_schedule={kind!r} is not supported; allowed: {', '.join(_SCHEDULES)} or "
                         f"trained_betas")
    return {"beta_schedule": _SCHEDULES[kind], "beta_start": float(config.get("beta_start", 1e-4)),
            "beta_end": float(config.get("beta_end", 0.02)), "num_diffusion_timesteps": T}


def alphas_cumprod_of(diffusion: Mapping) -> torch.Tensor:
    """ᾱ (float64) of a ``diffusion`` entry, ``trained_betas`` included."""
    if diffusion.get("trained_betas") is not None:
        return alphas_cumprod(torch.tensor(diffusion["trained_betas"], dtype=torch.float64))
    return alphas_cumprod_from_config(dict(diffusion))


def ddim_scheduler_config(alphas_cumprod_: torch.Tensor, diffusion: Mapping | None = None) -> dict:
    """A ``DDIMScheduler`` config whose η = 0 loop is ``ddim.diffusion.sample`` on the linear trajectory: leading
    spacing with no offset (τ = 0, T/S, 2T/S, ...), the last step to ᾱ = 1, no clipping, ε-prediction.

    ``diffusion``: the project's schedule, written by name when diffusers has it (so it reads back exactly);
    without it, or for another schedule, the β that give ``alphas_cumprod_`` go in as ``trained_betas``."""
    ac = torch.as_tensor(alphas_cumprod_, dtype=torch.float64).cpu()
    named = {v: k for k, v in _SCHEDULES.items()}
    schedule: dict[str, Any] = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "trained_betas": None}
    if diffusion is not None and diffusion.get("beta_schedule", "linear") in named \
            and diffusion.get("trained_betas") is None and torch.equal(alphas_cumprod_of(diffusion), ac):
        schedule.update(beta_schedule=named[diffusion.get("beta_schedule", "linear")],
                        beta_start=float(diffusion.get("beta_start", 1e-4)),
                        beta_end=float(diffusion.get("beta_end", 0.02)))
    elif diffusion is not None and diffusion.get("beta_schedule") in ("const", "jsd"):
        T = int(diffusion.get("num_diffusion_timesteps", 1000))
        schedule["trained_betas"] = beta_schedule(diffusion["beta_schedule"], T,
                                                  float(diffusion.get("beta_start", 1e-4)),
                                                  float(diffusion.get("beta_end", 0.02))).tolist()
    else:
        schedule["trained_betas"] = (1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])).tolist()
    return {"_class_name": "DDIMScheduler", "_diffusers_version": _diffusers_version(),
            "num_train_timesteps": int(ac.numel()), **schedule, "clip_sample": False, "clip_sample_range": 1.0,
            "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
            "timestep_spacing": "leading", "rescale_betas_zero_snr": False}


# ------------------------------------------------------------------------------------------------------ loading


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _first_file(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _download(hub_id: str, patterns: list[str], cache_dir: str | Path | None, local_files_only: bool) -> Path:
    """``snapshot_download`` of the files matching ``patterns`` (the Hub cache; HF_HUB_OFFLINE=1 uses it alone)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError as e:
        raise ImportError(f"pretrained={hub_id} needs huggingface_hub (pip install -e '.[diffusers]'), or a "
                          f"local folder: pretrained=DIR") from e
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns, cache_dir=cache_dir,
                                      local_files_only=local_files_only))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        reason = " ".join(str(e).split())[:160]
        raise FileNotFoundError(f"cannot get {hub_id} from the Hugging Face Hub: it is not in the local Hub cache and "
                                f"the Hub cannot be reached (offline, HF_HUB_OFFLINE=1, or no such model; "
                                f"{type(e).__name__}: {reason}); " + LOCAL_FOLDER_HELP.format(id=hub_id)) from e


def _cache_origin(folder: Path) -> tuple[str | None, str | None]:
    """(Hub id, commit) of a folder inside the Hub cache (``models--owner--name/snapshots/<commit>``)."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1), parts[-1]
    return None, None


def _layout(folder: Path) -> tuple[Path, Path | None]:
    """The UNet's folder (root or ``unet/``) and the scheduler config (``scheduler/`` or root), if any."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no UNet2DModel config.json (looked at its root and under unet/)")
    return unet_dir, _first_file(folder, ["scheduler/scheduler_config.json", "scheduler_config.json"])


def _read_weights(unet_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = _first_file(unet_dir, list(WEIGHT_FILES))
    if path is None:
        raise FileNotFoundError(f"{unet_dir} holds no UNet weights (looked for {', '.join(WEIGHT_FILES)})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path)), path
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types on a bad file
        raise ValueError(f"cannot read {path}: not a weights-only torch file: {e}") from e


def _data_and_ema(hub_id: str | None, info: dict, kwargs: dict) -> tuple[dict | None, bool | None]:
    """The data set and EMA-ness: an exported folder's own note, else the Hub table, else 32x32 RGB is CIFAR-10."""
    known = HUB_MODELS.get(hub_id or "", {})
    data = info.get("data", known.get("data"))
    if data is None and "data" not in info and (kwargs["resolution"], kwargs["in_channels"]) == (32, 3):
        data = dict(_CIFAR10)
    ema = info.get("ema", known.get("ema"))
    if ema is None and hub_id and "ddpm-ema-" in hub_id:
        ema = True
    return (dict(data) if data else None), ema


def load_diffusers_for_sampling(source: str | Path, map_location: Any = "cpu", *, cache_dir: str | Path | None = None,
                                local_files_only: bool = False, need_dataset: bool = False
                                ) -> tuple[UNet, torch.Tensor, dict]:
    """(ε-model in eval mode, ᾱ float64 (T,), cfg) from a diffusers DDPM folder or Hub id, as ``load_for_sampling``.

    cfg: ``model`` (UNet kwargs), ``diffusion``, ``data`` (name, image_size, channels, category; None when unknown),
    ``ema`` (True/False, None when unknown), ``source`` (Hub id, commit, folder and weights file).  need_dataset:
    refuse, before the weights are read, a model whose data set is unknown (evaluate.py without ``dataset=``)."""
    source = str(source)
    folder = Path(source).expanduser()
    from_hub = not folder.is_dir()
    hub_id, revision = (None, None) if from_hub else _cache_origin(folder)
    if from_hub:  # the configs first: a model outside the family is refused before its weights are fetched
        check_diffusers_source(source)
        hub_id = source
        folder = _download(hub_id, ["config.json", "unet/config.json", "scheduler_config.json",
                                    "scheduler/scheduler_config.json", "model_index.json"], cache_dir, local_files_only)
        revision = folder.name
    unet_dir, scheduler_path = _layout(folder)
    config = _read_json(unet_dir / "config.json")
    kwargs = unet_kwargs_from_diffusers(config)
    if scheduler_path is None:
        raise FileNotFoundError(f"{folder} holds no scheduler config (looked for scheduler/scheduler_config.json and "
                                f"scheduler_config.json): the β schedule is needed to sample")
    diffusion = diffusion_from_scheduler_config(_read_json(scheduler_path))
    info = _read_json(folder / EXPORT_INFO) if (folder / EXPORT_INFO).is_file() else {}
    data, ema = _data_and_ema(hub_id, info, kwargs)
    name = hub_id or source
    if need_dataset and data is None:
        raise ValueError(f"pretrained={name}: its data set is not one this project knows; pass dataset=<name> "
                         f"(e.g. dataset=image_folder dataset.root=DIR dataset.image_size={kwargs['resolution']})")
    if from_hub and _first_file(unet_dir, list(WEIGHT_FILES)) is None:
        sub = "unet/" if unet_dir != folder else ""
        for weights in WEIGHT_FILES:  # safetensors when the repo has it, else the pickle
            if _first_file(_download(hub_id, [sub + weights], cache_dir, local_files_only) / sub, [weights]):
                break
    state_dict, weights_path = _read_weights(unet_dir)
    model = unet_from_diffusers_state_dict(state_dict, config)
    if ema is False:
        warnings.warn(f"{name} holds the raw (non-EMA) training weights: its samples and FID differ from the papers' "
                      f"figures, which sample EMA weights", stacklevel=2)
    model = model.to(map_location or "cpu").eval().requires_grad_(False)
    st = weights_path.stat()
    src = {"hub_id": hub_id, "revision": revision, "folder": str(folder.resolve()), "weights": weights_path.name,
           "weights_size": st.st_size, "weights_mtime_ns": st.st_mtime_ns}
    cfg = {"format": "diffusers", "pretrained": name, "model": kwargs, "diffusion": diffusion, "data": data,
           "ema": ema, "use_ema": ema, "source": src, **{k: info[k] for k in ("global_step", "exported_from") if k in info}}
    return model, alphas_cumprod_of(diffusion), cfg


# ------------------------------------------------------------------------------------------------------ export


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_diffusers_folder(model: UNet, alphas_cumprod_: torch.Tensor, out_dir: str | Path, *,
                          diffusion: Mapping | None = None, info: Mapping | None = None,
                          overwrite: bool = False) -> Path:
    """Write ``model`` and its ᾱ as a diffusers ``DDIMPipeline`` folder (see the module docstring); ``info`` (data
    set, EMA, source) goes to ``ddim.json``.  Written under a temporary name beside ``out_dir`` and renamed at the
    end, so a failure leaves no half folder under the final name; an existing ``out_dir`` is replaced only with
    ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite (--overwrite)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder")
    config = diffusers_unet_config(model)
    scheduler = ddim_scheduler_config(alphas_cumprod_, diffusion)
    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_json(tmp / "unet" / "config.json", config)
        save_file(diffusers_state_dict(model), str(tmp / "unet" / WEIGHT_FILES[0]))
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        _write_json(tmp / "model_index.json", {"_class_name": "DDIMPipeline",
                                              "_diffusers_version": _diffusers_version(),
                                              "scheduler": ["diffusers", "DDIMScheduler"],
                                              "unet": ["diffusers", "UNet2DModel"]})
        _write_json(tmp / EXPORT_INFO, {**dict(info or {}), "diffusion": dict(diffusion) if diffusion else None})
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
