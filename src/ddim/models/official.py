"""Loading the checkpoints released with the official DDPM/DDIM code.

File formats handled (all read with ``torch.load(weights_only=True)``):

* a bare state dict (the converted DDPM checkpoints the DDIM README links for CIFAR-10 and LSUN,
  e.g. ``model-790000.ckpt``; these already hold the EMA weights);
* the list ``[model_state, optimizer_state, epoch, step, ema_state]`` that the official ``train``
  writes to ``ckpt.pth`` (``ema_state`` only when ``model.ema`` is on): ``model_state`` comes from a
  ``DataParallel`` model, so its keys carry ``module.``; ``ema_state`` is the ``EMAHelper.shadow`` dict
  of parameter name -> shadow tensor (parameters only; the U-Net has no buffers).

``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ddim.config import plain
from ddim.models.unet import UNet, timestep_embedding_frequencies

__all__ = ["OFFICIAL_CONFIGS", "load_official_unet", "unet_kwargs_from_config", "official_state_dict", "official_config"]

_DATA_KEYS = ("logit_transform", "uniform_dequantization", "gaussian_dequantization", "random_flip", "rescaled")


def _official(dataset: str, image_size: int, ch_mult: list[int], dropout: float, var_type: str,
              ema_rate: float, lr: float, **data: Any) -> dict:
    return {
        "data": {"dataset": dataset, **data, "image_size": image_size, "channels": 3,
                 "logit_transform": False, "uniform_dequantization": False, "gaussian_dequantization": False,
                 "random_flip": True, "rescaled": True},
        "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": ch_mult,
                  "num_res_blocks": 2, "attn_resolutions": [16], "dropout": dropout, "var_type": var_type,
                  "ema_rate": ema_rate, "ema": True, "resamp_with_conv": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                      "num_diffusion_timesteps": 1000},
        "optim": {"weight_decay": 0.0, "optimizer": "Adam", "lr": lr, "beta1": 0.9, "amsgrad": False,
                  "eps": 1e-8, "grad_clip": 1.0},
    }


#: The official ``configs/{cifar10,celeba,church,bedroom}.yml`` of ``ermongroup/ddim`` (data, model,
#: diffusion and optim sections; the training/sampling bookkeeping keys are left out).  The official code has no
#: ``cat.yml``: it picks the released LSUN model by ``data.category``, so LSUN cat is the LSUN 256x256 config
#: (as church and bedroom) with ``category: cat``.
OFFICIAL_CONFIGS: dict[str, dict] = {
    "cifar10": _official("CIFAR10", 32, [1, 2, 2, 2], 0.1, "fixedlarge", 0.9999, 2e-4),
    "celeba": _official("CELEBA", 64, [1, 2, 2, 2, 4], 0.1, "fixedlarge", 0.9999, 2e-4),
    "church": _official("LSUN", 256, [1, 1, 2, 2, 4, 4], 0.0, "fixedsmall", 0.999, 2e-5, category="church_outdoor"),
    "bedroom": _official("LSUN", 256, [1, 1, 2, 2, 4, 4], 0.0, "fixedsmall", 0.999, 2e-5, category="bedroom"),
    "cat": _official("LSUN", 256, [1, 1, 2, 2, 4, 4], 0.0, "fixedsmall", 0.999, 2e-5, category="cat"),
}

_UNET_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels",
              "resamp_with_conv")
# Keys of the official ``model:`` section that do not shape the network.
_IGNORED_MODEL_KEYS = ("type", "var_type", "ema_rate", "ema")


def unet_kwargs_from_config(config: Mapping | str) -> dict:
    """``UNet`` kwargs from an official config.

    Accepts a name in ``OFFICIAL_CONFIGS``, the nested official yaml dict (``model:`` + ``data:
    image_size``), or a flat dict of the official model keys plus ``resolution`` or ``image_size``.
    """
    if isinstance(config, str):
        if config not in OFFICIAL_CONFIGS:
            raise ValueError(f"unknown official config {config!r}; allowed: {sorted(OFFICIAL_CONFIGS)}")
        config = OFFICIAL_CONFIGS[config]
    config = plain(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict (official yaml or flat model keys) or a name in "
                         f"{sorted(OFFICIAL_CONFIGS)}, got {type(config).__name__}")
    if "model" in config and isinstance(config["model"], Mapping):
        model = dict(config["model"])
        data = config.get("data") or {}
        if "resolution" not in model and "image_size" not in model:
            size = data.get("image_size", config.get("image_size", config.get("resolution")))
            if size is None:
                raise ValueError("official config has model: but no data: image_size (or top-level "
                                 "image_size/resolution), needed for the attention resolutions")
            model["resolution"] = size
    else:
        model = dict(config)
    if "image_size" in model:
        size = model.pop("image_size")
        if model.setdefault("resolution", size) != size:
            raise ValueError(f"config gives resolution={model['resolution']} and image_size={size}")
    if model.get("type", "simple") != "simple":
        raise ValueError(f"model.type={model['type']!r} is not supported (only the official 'simple' "
                         f"ε-model; 'bayesian' adds a learned logvar)")
    unknown = sorted(set(model) - set(_UNET_KEYS) - {"resolution"} - set(_IGNORED_MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(_UNET_KEYS + ('resolution',))} "
                         f"(ignored official keys: {list(_IGNORED_MODEL_KEYS)})")
    if "resolution" not in model:
        raise ValueError("config needs resolution (or image_size)")
    kwargs = {k: model[k] for k in _UNET_KEYS + ("resolution",) if k in model}
    for k in ("ch_mult", "attn_resolutions"):
        if k in kwargs:
            kwargs[k] = tuple(int(v) for v in kwargs[k])
    return kwargs


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def official_state_dict(obj: Any, *, use_ema: bool = False, source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """The U-Net weights (prefixes stripped) from a loaded official checkpoint object."""
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise ValueError(f"{source}: empty checkpoint list; expected [model_state, optimizer_state, "
                             f"epoch, step(, ema_state)]")
        if use_ema and len(obj) >= 5 and isinstance(obj[4], Mapping):
            obj = obj[4]
        else:
            if use_ema:
                warnings.warn(f"{source}: use_ema=True but the checkpoint list has no ema_state "
                              f"(length {len(obj)}); loading model_state", stacklevel=3)
            obj = obj[0]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict or the official [model_state, optimizer_state, "
                         f"epoch, step, ema_state] list, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: not a U-Net state dict (non-tensor entries {bad[:5]}); expected the "
                         f"official model weights")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        key = _strip(k)
        if key in out:
            raise ValueError(f"{source}: duplicate key {key!r} after stripping 'module.' prefixes")
        out[key] = v
    return out


def _read(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler raises many types (UnpicklingError, IndexError, EOFError...)
        raise ValueError(f"cannot read official checkpoint {path}: not a valid torch checkpoint "
                         f"(corrupt, truncated or not a weights file): {e}") from e


def _fmt(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """A short account of how ``given`` differs from ``expected`` in keys and shapes ('' if it fits):
    a few names of each kind and the counts, not torch's list of every key."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in given and given[k].shape != v.shape]
    parts = []
    if missing:
        parts.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_fmt(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {_fmt(shapes, 4)}")
    return "; ".join(parts)


def load_official_unet(state_dict_or_path: Mapping | list | tuple | str | Path, config: Mapping | str, *,
                       use_ema: bool = False, map_location: Any = "cpu") -> UNet:
    """A ``UNet`` holding official DDPM/DDIM weights (strict: every key and shape must match).

    state_dict_or_path: a file path, a state dict, or the official ``[model, optimizer, epoch, step, ema]``
    list; use_ema picks ``ema_state`` from that list when present (bare state dicts are used as given).
    config: see ``unet_kwargs_from_config``.  Returns the model in eval mode on ``map_location``'s device
    (CPU by default).
    """
    source = "<state dict>"
    obj = state_dict_or_path
    if isinstance(obj, (str, Path)):
        source = str(obj)
        obj = _read(Path(obj), map_location)
    sd = official_state_dict(obj, use_ema=use_ema, source=source)
    kwargs = unet_kwargs_from_config(config)
    with torch.device("meta"):
        model = UNet(**kwargs)
    mismatch = state_dict_mismatch(model.state_dict(), sd)
    if mismatch:
        raise ValueError(f"{source} does not match the U-Net config {kwargs} (wrong architecture or "
                         f"config?): {mismatch}")
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)
    # to_empty leaves non-persistent buffers uninitialised: recompute them.
    model.temb_freqs.copy_(timestep_embedding_frequencies(model.ch))
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
    if device is not None:
        model = model.to(device)
    return model.eval()


def official_config(name: str) -> dict:
    """A deep copy of ``OFFICIAL_CONFIGS[name]`` (safe to modify)."""
    if name not in OFFICIAL_CONFIGS:
        raise ValueError(f"unknown official config {name!r}; allowed: {sorted(OFFICIAL_CONFIGS)}")
    return copy.deepcopy(OFFICIAL_CONFIGS[name])
