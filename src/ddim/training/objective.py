"""The DDPM training objective the DDIM paper samples from (eq. (5) with γ = 1), as the official code computes it.

One copy of each piece: the loss, the antithetic timestep draw and the per-rank seed of the random draws."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def antithetic_timesteps(n: int, T: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{0..T-1} for half the batch and T-1-t for the other half (the official trainer's variance reduction)."""
    t = torch.randint(0, T, (n // 2 + 1,), device=device, generator=generator)
    return torch.cat([t, T - t - 1])[:n]


def eps_loss(eps_model: nn.Module, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """||ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)||² summed over pixels, averaged over the batch (official DDPM/DDIM loss).

    The model's output is compared in fp32, so under bf16 autocast the loss and its gradient keep full precision."""
    e = torch.randn_like(x0) if noise is None else noise
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype).index_select(0, t).view(-1, *([1] * (x0.dim() - 1)))
    x_t = x0 * a.sqrt() + e * (1.0 - a).sqrt()
    return (e - eps_model(x_t, t).float()).square().flatten(1).sum(1).mean()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one DDP rank's t, ε and dropout draws from optimizer step ``step`` on.

    ``seed_everything`` gives every rank the same generator, so without this all ranks drew the same t and ε
    each step (for different images) and the same dropout masks.  Mixed by numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, np.uint64)[0] >> 1)
