"""Loading checkpoints for sampling: this project's (``train.py``'s Lightning ``.ckpt``) and the official
released weights.  No Lightning import: a sampling script needs torch and the U-Net only.

Checkpoint format (a Lightning ``.ckpt``): ``state_dict`` holds ``model.*`` (raw weights) and ``ema_model.*``
(EMA weights, same keys after the prefix); ``hyper_parameters`` holds plain dicts ``model`` (UNet kwargs),
``diffusion`` (beta schedule), ``optim``, ``data`` (name, image_size, channels, category; an image folder's
absolute ``root``) and ``fast`` (speed settings, which change no parameter).

Every file is opened with ``torch.load(weights_only=True)``: tensors, plain containers and numbers only, so
opening a checkpoint cannot run code stored in it.  A file that needs full unpickling is refused unless the
caller trusts it (``trust=True``; the entry points' ``trust_checkpoint=true``).

``ema.pt`` exports of the former CIFAR-10 script convert once into the ``.ckpt`` format::

    python -m ddim.checkpoints convert-ema ema.pt ema.ckpt

A checkpoint exports as a diffusers ``DDIMPipeline`` folder (EMA weights; ``--raw`` for the raw ones)::

    python -m ddim.checkpoints export-diffusers last.ckpt ddim-digits-diffusers
"""
from __future__ import annotations

import argparse
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.torch_version import TorchVersion

from ddim.config import check_writable_dir, plain
from ddim.diffusion.schedules import alphas_cumprod_from_config
from ddim.files import write_atomically
from ddim.models.build import build_unet
from ddim.models.diffusers_format import save_diffusers_folder
from ddim.models.ema import DEFAULT_EMA_DECAY, ema_initial_share_note, ema_warmup_of
from ddim.models.official import OFFICIAL_CONFIGS, load_official_unet, state_dict_mismatch

# What weights_only=True may build besides tensors and plain containers: torch's version string, which
# ema.pt exports record (a str subclass, no code).  train.py's and the official checkpoints need nothing more.
SAFE_GLOBALS = [TorchVersion]
TRUST_OPTION = "trust_checkpoint=true"
LINEAR_SCHEDULE = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}
EMA_EXPORT_KEYS = ("ema", "unet", "steps")


def _unpickling_reason(error: pickle.UnpicklingError) -> str | None:
    """What the weights-only unpickler refused (e.g. "Unsupported global: GLOBAL builtins.open ..."), or None when
    the error is not a refusal (the file is simply not a checkpoint)."""
    text = str(error)
    if "Weights only load failed" not in text:
        return None
    reason = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
    reason = " ".join(reason.split("Check the documentation", 1)[0].split(". Please use", 1)[0].split())
    return reason or "an object type outside the allowed tensors and containers"


def _not_a_checkpoint(path: Path, detail: str) -> ValueError:
    return ValueError(f"cannot read checkpoint {path}: not a valid torch checkpoint (corrupt, truncated or another "
                      f"kind of file, e.g. text?): {detail}")


def read_checkpoint(path: str | Path, map_location: Any = "cpu", *, trust: bool = False) -> Any:
    """The object stored in ``path``, read with ``torch.load(weights_only=True)``.

    A file that needs full unpickling (objects other than tensors, containers and numbers: such a file can run
    code when opened) is refused with a ValueError that says what it holds, unless ``trust=True``: then it is
    read with ``weights_only=False``.  Only trust files you made yourself."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.ckpt"))[:5]
        raise ValueError(f"checkpoint path {path} is a directory; give the checkpoint file itself"
                         + (f" (it holds {', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save's zip or a pickle (protocol >= 2: byte 0x80), so what the weights-only unpickler refuses below is
    # the file's content, never text that happens to read as pickle opcodes
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise _not_a_checkpoint(path, f"it starts with {head!r}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if reason is None:
            raise _not_a_checkpoint(path, f"{type(e).__name__}: {e}") from None
        if not trust:
            raise ValueError(f"refused to open {path}: it holds more than tensors and plain containers ({reason}), "
                             f"and unpickling such a file can run code stored in it. If you made this file yourself "
                             f"and trust it, pass {TRUST_OPTION} (Python: trust=True; convert-ema: --trust)") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise _not_a_checkpoint(path, f"{type(e).__name__}: {e}") from e
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - full unpickling raises anything the file's objects raise
        raise _not_a_checkpoint(path, f"{type(e).__name__}: {e}") from e


def check_train_checkpoint(ckpt: Any, path: str | Path) -> dict:
    """``ckpt`` if it is a checkpoint in train.py's format, else a ValueError that says what the file is instead."""
    if isinstance(ckpt, torch.Tensor):
        raise ValueError(f"{path} holds a single tensor of shape {tuple(ckpt.shape)}, not a checkpoint written by "
                         f"train.py")
    if isinstance(ckpt, (list, tuple)):
        raise ValueError(f"{path} holds a list (the official training state [model, optimizer, epoch, step, ema]?), "
                         f"not a checkpoint written by train.py; official weights load with format='official' "
                         f"(evaluate.py official=<name> official_path=<file>)")
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint written by train.py")
    if all(k in ckpt for k in EMA_EXPORT_KEYS):
        raise ValueError(f"{path} is an ema.pt export of the former CIFAR-10 script; convert it once into train.py's "
                         f"format: python -m ddim.checkpoints convert-ema {path} <out>.ckpt")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path} is a bare state dict ({len(ckpt)} tensors, e.g. {next(iter(ckpt))!r}), not a "
                         f"checkpoint written by train.py; released official weights load with format='official' "
                         f"(evaluate.py official=<name> official_path=<file>)")
    hyper = ckpt.get("hyper_parameters")
    if "state_dict" not in ckpt or not isinstance(hyper, Mapping) or "model" not in hyper:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no state_dict/hyper_parameters.model; keys: "
                         f"{sorted(map(str, ckpt))[:8]}); for the official released weights use format='official'")
    return dict(ckpt)


def _ema_warning(ckpt_path: str | Path, cfg: dict) -> None:
    """Warn when the EMA weights about to be sampled still hold a visible share of the initial random weights."""
    optim = cfg.get("optim") or {}
    note = ema_initial_share_note(float(optim.get("ema_decay", DEFAULT_EMA_DECAY)), int(cfg["global_step"]),
                                  ema_warmup_of(optim))
    if note:
        warnings.warn(f"{ckpt_path}: {note}, so its samples and FID are worse than the training reached; "
                      f"sample the raw weights (evaluate.py use_ema=false) or a later checkpoint", stacklevel=3)


def load_for_sampling(ckpt_path: str | Path, use_ema: bool = True, map_location: Any = "cpu", *,
                      format: str = "lightning", config: str | dict | None = None, trust: bool = False
                      ) -> tuple[nn.Module, torch.Tensor, dict]:
    """(ε-model in eval mode, ᾱ float64 (T,), cfg dict) from a checkpoint.

    format="lightning": a checkpoint written by ``train.py``; use_ema picks ``ema_model.*`` (default)
    or the raw ``model.*`` weights; cfg is its hyper_parameters (model, diffusion, optim, data).
    format="official": a checkpoint released with the official DDIM/DDPM code, loaded through
    ``ddim.models.load_official_unet``; ``config`` is a name in ``ddim.models.OFFICIAL_CONFIGS``
    (cifar10, celeba, church, bedroom) or an official config dict; the schedule is the official linear
    one (1e-4..0.02, T=1000) unless the config has a ``diffusion`` entry.  use_ema picks the EMA
    state when the file holds the official [model, optimizer, epoch, step, ema] list.
    trust: see ``read_checkpoint`` (files that need full unpickling are refused without it).
    """
    if format == "official":
        return load_official_for_sampling(ckpt_path, config, use_ema=use_ema, map_location=map_location, trust=trust)
    if format != "lightning":
        raise ValueError(f"format must be 'lightning' or 'official', got {format!r}")
    if not isinstance(use_ema, bool):
        raise ValueError(f"use_ema must be true or false, got {use_ema!r}")
    ckpt = check_train_checkpoint(read_checkpoint(ckpt_path, map_location, trust=trust), ckpt_path)
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
        _ema_warning(ckpt_path, cfg)
    return model, alphas_cumprod_from_config(cfg["diffusion"]), cfg


def load_official_for_sampling(path: str | Path, config: str | dict | None, use_ema: bool = True,
                               map_location: Any = "cpu", *, trust: bool = False
                               ) -> tuple[nn.Module, torch.Tensor, dict]:
    """The official released checkpoints (see ``load_for_sampling(format="official")``)."""
    if isinstance(config, str):
        if config not in OFFICIAL_CONFIGS:
            raise ValueError(f"unknown official config {config!r}; allowed: {sorted(OFFICIAL_CONFIGS)}")
        name, config = config, OFFICIAL_CONFIGS[config]
    elif config is None:
        raise ValueError("format='official' needs config= (a name in OFFICIAL_CONFIGS or the official config dict)")
    else:
        name = None
    obj = read_checkpoint(path, map_location, trust=trust)
    if isinstance(obj, (list, tuple)):  # official training state: [model, optimizer, epoch, step, ema]
        obj = obj[4] if use_ema and len(obj) > 4 else obj[0]
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        raise ValueError(f"{path} is a checkpoint written by train.py, not released official weights: pass it as "
                         f"ckpt_path= (without official=)")
    if isinstance(obj, Mapping) and all(k in obj for k in EMA_EXPORT_KEYS):
        check_train_checkpoint(obj, path)  # the ema.pt message
    try:
        model = load_official_unet(obj, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model = model.to(map_location or "cpu").eval().requires_grad_(False)
    config = plain(config)
    diffusion = config.get("diffusion", dict(LINEAR_SCHEDULE))
    cfg = {"official": name, "model": config, "diffusion": diffusion, "use_ema": use_ema}
    return model, alphas_cumprod_from_config(diffusion), cfg


def save_atomically(obj: Any, dst: str | Path) -> Path:
    """``torch.save`` of ``obj`` to ``dst`` through ``ddim.files.write_atomically``: a kill or power loss at any
    moment leaves the previous file or the new one, never a partial file (``remove_stray_temporaries`` clears
    what a kill leaves)."""
    return write_atomically(dst, lambda f: torch.save(obj, f))


def convert_ema_export(src: str | Path, dst: str | Path, *, trust: bool = False) -> Path:
    """Write the ``ema.pt`` export of the former CIFAR-10 script (keys ema, unet, steps, ...) as a checkpoint in
    train.py's format at ``dst``, which ``load_for_sampling`` and evaluate.py read.

    The export holds only the EMA weights: they fill both ``ema_model.*`` and ``model.*``.  The schedule is the
    one that script trained with (linear, 1e-4..0.02, T = 1000); the data, its JPEG CIFAR-10 copy.  The result has
    no optimizer state: it samples, it does not resume training."""
    ck = read_checkpoint(src, "cpu", trust=trust)
    if not isinstance(ck, Mapping) or not all(k in ck for k in EMA_EXPORT_KEYS):
        have = sorted(map(str, ck))[:8] if isinstance(ck, Mapping) else type(ck).__name__
        raise ValueError(f"{src} is not an ema.pt export (needs keys {', '.join(EMA_EXPORT_KEYS)}; has {have})")
    unet = plain(dict(ck["unet"]))
    ema = {k: v.contiguous() for k, v in ck["ema"].items()}
    mismatch = state_dict_mismatch(build_unet(unet).state_dict(), ema)
    if mismatch:
        raise ValueError(f"{src}: the EMA weights do not fit its U-Net config {unet}: {mismatch}")
    optim = {"lr": float(ck.get("lr", 2e-4)), "ema_decay": float(ck.get("ema_decay", DEFAULT_EMA_DECAY)),
             "ema_warmup": ema_warmup_of(ck)}
    data = {"name": "cifar10", "image_size": int(unet["resolution"]), "channels": int(unet.get("in_channels", 3)),
            "category": None}
    state_dict = {**{f"ema_model.{k}": v for k, v in ema.items()}, **{f"model.{k}": v.clone() for k, v in ema.items()}}
    out = {"state_dict": state_dict, "global_step": int(ck["steps"]),
           "hyper_parameters": {"model": unet, "diffusion": dict(LINEAR_SCHEDULE), "optim": optim, "data": data},
           "converted_from": {"format": "ema.pt", "path": str(src), "batch": ck.get("batch"),
                              "train_seconds": ck.get("train_seconds")}}
    return save_atomically(out, dst)


def export_diffusers(src: str | Path, out_dir: str | Path, *, use_ema: bool = True, official: str | None = None,
                     trust: bool = False, overwrite: bool = False) -> Path:
    """Write a checkpoint (train.py's, or released official weights with ``official=<name>``) as a diffusers
    ``DDIMPipeline`` folder (``ddim.models.diffusers_format.save_diffusers_folder``): the EMA weights unless
    ``use_ema=False``, the β schedule it was trained with, and its data set in ``ddim.json`` so that
    ``evaluate.py pretrained=<out_dir>`` knows it.  ``out_dir`` is checked before the checkpoint is read."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; remove it or pass --overwrite")
    check_writable_dir(out_dir.parent, "out_dir")
    if official is not None:
        model, alphas, cfg = load_for_sampling(src, use_ema, format="official", config=official, trust=trust)
        d = cfg["model"]["data"]
        data = {"name": d["dataset"].lower(), "image_size": d["image_size"], "channels": d["channels"],
                "category": d.get("category")}
    else:
        model, alphas, cfg = load_for_sampling(src, use_ema, trust=trust)
        data = cfg.get("data")
    info = {"data": data, "ema": use_ema, "exported_from": str(Path(src).resolve()),
            "global_step": cfg.get("global_step"), "official": official}
    return save_diffusers_folder(model, alphas, out_dir, diffusion=cfg["diffusion"], info=info, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    """``python -m ddim.checkpoints convert-ema SRC DST`` and ``... export-diffusers SRC OUT_DIR [--raw]``."""
    parser = argparse.ArgumentParser(prog="python -m ddim.checkpoints", description="Checkpoint conversions.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert-ema", help="an ema.pt export -> a train.py-format .ckpt for evaluate.py")
    convert.add_argument("src", help="the ema.pt file")
    convert.add_argument("dst", help="the .ckpt file to write")
    export = commands.add_parser("export-diffusers", help="a checkpoint -> a diffusers DDIMPipeline folder")
    export.add_argument("src", help="a checkpoint written by train.py (or released official weights: --official)")
    export.add_argument("out_dir", help="the folder to write (unet/, scheduler/, model_index.json)")
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA ones")
    export.add_argument("--official", choices=sorted(OFFICIAL_CONFIGS),
                        help="SRC is released official weights with this config")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    for sub in (convert, export):
        sub.add_argument("--trust", action="store_true",
                         help="read SRC even if it needs full unpickling (can run code: only for files you made)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert-ema":
            dst = convert_ema_export(args.src, args.dst, trust=args.trust)
            print(f"wrote {dst} (evaluate.py ckpt_path={dst})")
            return
        out = export_diffusers(args.src, args.out_dir, use_ema=not args.raw, official=args.official,
                               trust=args.trust, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        parser.exit(2, f"{args.command}: {e}\n")
    print(f"wrote {out} (diffusers: DDIMPipeline.from_pretrained({str(out)!r}); evaluate.py pretrained={out})")


if __name__ == "__main__":
    main()
