"""Spherical interpolation of latents x_T (paper Figure 6)."""
from __future__ import annotations

import torch


def slerp(z1: torch.Tensor, z2: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """sin((1-α)θ)/sin θ · z1 + sin(αθ)/sin θ · z2, θ the angle between the flattened z1 and z2.

    Gaussian latents in high dimension concentrate on a sphere, so (unlike linear interpolation) every
    intermediate latent has a typical norm. ``alpha`` a scalar gives one result shaped like z1; a 1-D
    tensor of K alphas gives the K results concatenated along dim 0 (a batch of K for z's of batch 1),
    as the official code builds Figure 6. Falls back to linear interpolation when z1 ∥ z2 (θ ≈ 0).
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    a = torch.as_tensor(alpha, dtype=z1.dtype, device=z1.device)
    if a.ndim > 1:
        raise ValueError(f"alpha must be a scalar or a 1-D tensor of alphas, got shape {tuple(a.shape)}")
    # angle in float64 for accuracy near θ = 0 and π
    cos = torch.sum(z1.double() * z2.double()) / (z1.double().norm() * z2.double().norm())
    theta = torch.acos(cos.clamp(-1, 1)).to(z1.dtype)
    w = a.reshape(-1, *([1] * z1.ndim))  # (K, 1, ..., 1)
    if float(theta) < 1e-6:
        out = (1 - w) * z1 + w * z2
    else:
        out = (torch.sin((1 - w) * theta) * z1 + torch.sin(w * theta) * z2) / torch.sin(theta)
    return out[0] if a.ndim == 0 else out.flatten(0, 1)
