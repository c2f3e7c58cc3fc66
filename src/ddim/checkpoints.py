"""Loading checkpoints for sampling: this project's (``train.py``'s Lightning ``.ckpt``) and the official
released weights.  No Lightning import: a sampling script needs torch and the U-Net only.

Checkpoint format (a Lightning ``.ckpt``): ``state_dict`` holds ``model.*`` (raw weights) and ``ema_model.*``
(EMA weights, same keys after the prefix); ``hyper_parameters`` holds plain dicts ``model`` (UNet kwargs),
``diffusion`` (beta schedule), ``optim``, ``data`` (name, image_size, channels) and ``fast`` (speed settings,
which change no parameter).
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddim.config import plain
from ddim.diffusion.schedules import alphas_cumprod_from_config
from ddim.models.build import build_unet
from ddim.models.ema import DEFAULT_EMA_DECAY, ema_initial_share_note, ema_warmup_of
from ddim.models.official import OFFICIAL_CONFIGS, load_official_unet, state_dict_mismatch


def read_checkpoint(path: str | Path, map_location: Any) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):  # e.g. a logger stored an object; trust local files
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e2:  # noqa: BLE001
                raise ValueError(f"cannot read checkpoint {path}: not a valid torch checkpoint (corrupt, truncated or "
                                 f"another kind of file?): {type(e2).__name__}: {e2}") from e2
        raise ValueError(f"cannot read checkpoint {path}: not a valid torch checkpoint (corrupt or truncated?): {e}") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path}: not a valid torch checkpoint (corrupt or truncated?): {e}") from e


def load_for_sampling(ckpt_path: str | Path, use_ema: bool = True, map_location: Any = "cpu", *,
                      format: str = "lightning", config: str | dict | None = None
                      ) -> tuple[nn.Module, torch.Tensor, dict]:
    """(ε-model in eval mode, ᾱ float64 (T,), cfg dict) from a checkpoint.

    format="lightning": a checkpoint written by ``train.py``; use_ema picks ``ema_model.*`` (default)
    or the raw ``model.*`` weights; cfg is its hyper_parameters (model, diffusion, optim, data).
    format="official": a checkpoint released with the official DDIM/DDPM code, loaded through
    ``ddim.models.load_official_unet``; ``config`` is a name in ``ddim.models.OFFICIAL_CONFIGS``
    (cifar10, celeba, church, bedroom) or an official config dict; the schedule is the official linear
    one (1e-4..0.02, T=1000) unless the config has a ``diffusion`` entry.  use_ema picks the EMA
    state when the file holds the official [model, optimizer, epoch, step, ema] list.
    """
    if format == "official":
        return load_official_for_sampling(ckpt_path, config, use_ema=use_ema, map_location=map_location)
    if format != "lightning":
        raise ValueError(f"format must be 'lightning' or 'official', got {format!r}")
    ckpt = read_checkpoint(ckpt_path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"{ckpt_path} is not a checkpoint written by train.py (no state_dict/hyper_parameters.model); "
                         f"for the official released weights use format='official'")
    cfg = plain(ckpt["hyper_parameters"])
    prefix = "ema_model." if use_ema else "model."
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{ckpt_path} holds no '{prefix}*' weights")
    model = build_unet(cfg["model"])
    mismatch = state_dict_mismatch(model.state_dict(), sd)
    if mismatch:
        raise ValueError(f"weights in {ckpt_path} do not fit the model config {cfg['model']} (written by another "
                         f"version of the U-Net?): {mismatch}")
    model.load_state_dict(sd)
    model = model.to(map_location if map_location is not None else "cpu").eval().requires_grad_(False)
    cfg["global_step"] = ckpt.get("global_step")
    cfg["use_ema"] = use_ema
    if use_ema and cfg["global_step"] is not None:
        optim = cfg.get("optim") or {}
        warning = ema_initial_share_note(float(optim.get("ema_decay", DEFAULT_EMA_DECAY)), int(cfg["global_step"]),
                                         ema_warmup_of(optim))
        if warning:
            warnings.warn(f"{ckpt_path}: {warning}, so its samples and FID are worse than the training reached; "
                          f"sample the raw weights (evaluate.py use_ema=false) or a later checkpoint", stacklevel=2)
    return model, alphas_cumprod_from_config(cfg["diffusion"]), cfg


def load_official_for_sampling(path: str | Path, config: str | dict | None, use_ema: bool = True,
                               map_location: Any = "cpu") -> tuple[nn.Module, torch.Tensor, dict]:
    """The official released checkpoints (see ``load_for_sampling(format="official")``)."""
    if isinstance(config, str):
        if config not in OFFICIAL_CONFIGS:
            raise ValueError(f"unknown official config {config!r}; allowed: {sorted(OFFICIAL_CONFIGS)}")
        name, config = config, OFFICIAL_CONFIGS[config]
    elif config is None:
        raise ValueError("format='official' needs config= (a name in OFFICIAL_CONFIGS or the official config dict)")
    else:
        name = None
    obj = read_checkpoint(path, map_location)
    if isinstance(obj, (list, tuple)):  # official training state: [model, optimizer, epoch, step, ema]
        obj = obj[4] if use_ema and len(obj) > 4 else obj[0]
    if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:
        raise ValueError(f"{path} is a checkpoint written by train.py, not released official weights: pass it as "
                         f"ckpt_path= (without official=)")
    try:
        model = load_official_unet(obj, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model = model.to(map_location or "cpu").eval().requires_grad_(False)
    config = plain(config)
    diffusion = config.get("diffusion", {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                         "num_diffusion_timesteps": 1000})
    cfg = {"official": name, "model": config, "diffusion": diffusion, "use_ema": use_ema}
    return model, alphas_cumprod_from_config(diffusion), cfg
