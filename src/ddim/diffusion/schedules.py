"""Noise schedules β_1..β_T and ᾱ_t = ∏(1 - β_s), in float64.

``linear``, ``quad``, ``const``, ``jsd`` and ``sigmoid`` follow the official DDIM code
(``get_beta_schedule`` in ermongroup/ddim, itself from the DDPM code); ``cosine`` is Nichol & Dhariwal
(2021), eq. (17), with β clipped at 0.999 so the last steps stay invertible.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES: tuple[str, ...] = ("linear", "quad", "const", "jsd", "sigmoid", "cosine")
SCHEDULE_KEYS: tuple[str, ...] = ("beta_schedule", "beta_start", "beta_end", "num_diffusion_timesteps")


def beta_schedule(kind: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β_t for t = 0..T-1 (0-indexed, as the official code stores them) as a float64 tensor (T,).

    ``jsd`` (β_t = 1/(T - t)) and ``cosine`` ignore ``beta_start``/``beta_end``; ``const`` uses ``beta_end``.
    Note that ``jsd`` ends with β = 1, i.e. ᾱ = 0 at the last step, which no sampler can start from.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule kind {kind!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"number of diffusion steps T must be a positive int, got {T!r}")
    # numpy, as the official code, so the float64 values are bit-identical to its schedules
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif kind == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif kind == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif kind == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    elif kind == "sigmoid":
        betas = 1 / (np.exp(-np.linspace(-6, 6, T)) + 1) * (beta_end - beta_start) + beta_start
    else:
        # cosine: ᾱ(t) = f(t) / f(0), f(t) = cos²((t/T + s) / (1 + s) · π/2); β_t = 1 - ᾱ(t+1)/ᾱ(t) <= 0.999
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.from_numpy(betas)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s<=t} (1 - β_s), computed in float64 (the paper's α_t is this ᾱ_t)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(f"betas must lie in (0, 1], got range [{float(betas.min())}, {float(betas.max())}]")
    return torch.cumprod(1 - betas, dim=0)


def alphas_cumprod_from_config(diffusion_cfg: dict) -> torch.Tensor:
    """ᾱ_t (float64, shape (T,)) from a config of ``SCHEDULE_KEYS`` (missing ones at DDPM's linear defaults)."""
    betas = beta_schedule(diffusion_cfg.get("beta_schedule", "linear"),
                          int(diffusion_cfg.get("num_diffusion_timesteps", 1000)),
                          beta_start=float(diffusion_cfg.get("beta_start", 1e-4)),
                          beta_end=float(diffusion_cfg.get("beta_end", 0.02)))
    return alphas_cumprod(betas).to(torch.float64)
