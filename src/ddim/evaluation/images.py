"""Images as the evaluation writes and scores them: uint8 conversion, RGB for Inception, grid PNGs."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

from ddim.data import image_grid
from ddim.files import write_atomically

RANGE_TOLERANCE = 1e-3


def to_uint8(x: torch.Tensor, *, check_range: bool = False) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], rounded half-up as ``torchvision.utils.save_image`` does; uint8
    input is returned as is.

    Samples may overshoot [-1, 1] a little (the sampler does not clip) and are clamped; ``check_range=True`` refuses
    values outside [-1, 1] instead (images given by a user, whose scale may be wrong)."""
    if x.dtype == torch.uint8:
        return x
    if not torch.is_floating_point(x):
        raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    if check_range and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
            raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.3f}, {hi:.3f}]")
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with 3 channels: Inception wants RGB, grey images are repeated."""
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class Uint8Images(Dataset):
    """A data set of [-1, 1] (image, label) pairs viewed as uint8 RGB (3, H, W) tensors (the FID reference)."""

    def __init__(self, base: Dataset, limit: int | None = None):
        self.base = base
        self.n = len(base) if limit is None else min(int(limit), len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.base[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return to_rgb(to_uint8(x)[None])[0]


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """uint8 (N, C, H, W) images as one PNG grid (``ddim.data.image_grid``: small images enlarged for viewing);
    written atomically, so a killed run never leaves a torn grid that a re-run would take as done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images.float() / 255.0, nrow)
    write_atomically(path, lambda f: torchvision.utils.save_image(grid, f, format="png"))
    return path
