"""The U-Net from a config dict, and the check that a checkpoint's architecture is the one asked for."""
from __future__ import annotations

from collections.abc import Mapping

from ddim.models.unet import UNet


def build_unet(model_cfg: Mapping) -> UNet:
    """The DDPM U-Net from its kwargs (``ddim.models.UNet``); unknown keys fail loudly."""
    return UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_cfg.items()})


def check_architecture(saved: Mapping | None, model_cfg: Mapping) -> None:
    """Refuse weights of another architecture with a readable message (not a wall of missing keys)."""
    def norm(d: Mapping) -> dict:
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in d.items()}

    if saved is None or norm(saved) == norm(model_cfg):
        return
    a, b = norm(saved), norm(model_cfg)
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    raise ValueError(f"checkpoint was trained with a different model architecture; differing keys "
                     f"(checkpoint, this run): {diff}")
