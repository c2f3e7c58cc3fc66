"""The DDIM family of samplers (paper eq. 12 / 16) and DDIM inversion (sec. 4.3, 5.4).

All per-step coefficients are computed once, in float64 on the CPU from ᾱ, then cast to the dtype and
device of ``x`` in one copy; the loop itself is a network call plus one or two fused tensor ops per step,
with no host synchronisation (the official code copies every x_t to the CPU).

Conventions (those of the official code): timesteps τ_1 < ... < τ_S are 0-indexed into ``alphas_cumprod``
(ᾱ, the paper's α); sampling walks them from τ_S down, and the step from τ_1 goes to ᾱ = 1, returning
the x_0 prediction at τ_1 (plus noise only for σ̂ when τ_1 > 0).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

ETA_STRINGS: tuple[str, ...] = ("hat",)


def check_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ as a float64 CPU tensor, checked to be 1-D, in (0, 1] and strictly decreasing."""
    ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if ac.ndim != 1 or ac.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(ac.shape)}")
    if not bool(((ac > 0) & (ac <= 1)).all()):
        raise ValueError(f"alphas_cumprod must lie in (0, 1], got range [{float(ac.min())}, {float(ac.max())}]")
    if ac.numel() > 1 and not bool((ac[1:] < ac[:-1]).all()):
        bad = int(torch.nonzero(ac[1:] >= ac[:-1])[0])
        raise ValueError(f"alphas_cumprod must be strictly decreasing, but alphas_cumprod[{bad + 1}]="
                         f"{float(ac[bad + 1])} >= alphas_cumprod[{bad}]={float(ac[bad])}")
    return ac


def check_timesteps(timesteps: torch.Tensor | Sequence[int], T: int) -> torch.Tensor:
    """τ as a long CPU tensor, checked to be 1-D, non-empty, strictly increasing, within [0, T-1]."""
    seq = torch.as_tensor(timesteps).detach().to("cpu")
    if seq.ndim != 1 or seq.numel() == 0 or seq.dtype.is_floating_point or seq.dtype == torch.bool:
        raise ValueError(f"timesteps must be a non-empty 1-D integer tensor, got shape {tuple(seq.shape)} {seq.dtype}")
    seq = seq.long()
    lo, hi = int(seq.min()), int(seq.max())
    if lo < 0 or hi >= T:
        raise ValueError(f"timesteps must lie in [0, {T - 1}] (0-indexed, T={T}), got [{lo}, {hi}]")
    if seq.numel() > 1 and not bool((seq[1:] > seq[:-1]).all()):
        raise ValueError(f"timesteps must be strictly increasing, got {seq.tolist()}")
    return seq


def _check_eta(eta: float | str) -> float | str:
    if isinstance(eta, str):
        if eta not in ETA_STRINGS:
            raise ValueError(f"unknown eta {eta!r}; allowed: a float >= 0 or {', '.join(map(repr, ETA_STRINGS))}")
        return eta
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite float >= 0 or 'hat', got {eta!r}")
    return float(eta)


def _per_step(coefs: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cast float64 (S,) coefficient vectors to x's dtype/device, shaped to broadcast against x."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    stacked = torch.stack(list(coefs.values())).to(device=x.device, dtype=x.dtype)  # one host->device copy
    return {k: v.view(shape) for k, v in zip(coefs, stacked)}


def _check_noise(noise, S: int, x: torch.Tensor) -> None:
    if len(noise) != S:
        raise ValueError(f"noise must hold one tensor per step: expected {S}, got {len(noise)}")
    for i, z in enumerate(noise):
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(f"noise[{i}] has shape {tuple(z.shape)}, expected x_T's shape {tuple(x.shape)}")


@torch.no_grad()
def sample(eps_model: EpsModel, x_T: torch.Tensor, alphas_cumprod: torch.Tensor,
           timesteps: torch.Tensor | Sequence[int], *, eta: float | str = 0.0,
           noise: Sequence[torch.Tensor] | torch.Tensor | None = None, generator: torch.Generator | None = None,
           clip_denoised: bool = False, return_trajectory: bool = False):
    """Generate x_0 from x_T with the generalized process of eq. (12), σ from eq. (16).

    ``eta``: a float >= 0 scales σ_τ(η) = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1-ᾱ_t/ᾱ_prev) (0: DDIM,
    1: DDPM); ``"hat"`` is σ̂ of Table 1, the official ``ddpm_noisy`` sampler (x_0 prediction clamped
    to [-1, 1], posterior mean, variance 1 - ᾱ_t/ᾱ_prev, no noise at t = 0).
    ``noise``: S standard-normal tensors shaped like x_T, one per step in sampling order (the first for the
    step from τ_S), replaying a recorded run; otherwise noise is drawn with ``generator`` (which must live
    on x_T's device). ``clip_denoised`` clamps the generalized sampler's x_0 prediction to [-1, 1].
    With ``return_trajectory`` returns ``(x_0, {"timesteps", "x_t", "x0_pred"})``: τ in sampling order,
    [x_T, ..., x_0] (S + 1 tensors) and the S x_0 predictions, all left on the device.
    """
    eta = _check_eta(eta)
    ac = check_alphas_cumprod(alphas_cumprod)
    seq = check_timesteps(timesteps, ac.numel())
    S = seq.numel()
    if noise is not None:
        _check_noise(noise, S, x_T)
        if isinstance(noise, torch.Tensor):  # one copy up front instead of one per step
            noise = noise.to(device=x_T.device, dtype=x_T.dtype)

    # sampling order: τ_S, ..., τ_1 and the ᾱ each step goes to (1 after τ_1)
    a_t = ac[seq].flip(0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[seq[:-1]]]).flip(0)
    stochastic = eta == "hat" or eta > 0
    if eta == "hat":
        beta = 1 - a_t / a_prev
        coefs = {
            "inv_sqrt_a": (1 / a_t).sqrt(), "sqrt_recipm1": (1 / a_t - 1).sqrt(),
            "c_x0": a_prev.sqrt() * beta / (1 - a_t), "c_x": (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t),
            "c_z": beta.sqrt() * (seq.flip(0) != 0),
        }
    else:
        c1 = eta * ((1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t)).sqrt()
        c2_sq = 1 - a_prev - c1**2
        if bool((c2_sq < 0).any()):
            raise ValueError(f"eta={eta} is too large for these timesteps: sigma exceeds sqrt(1 - alpha_prev) "
                             f"(eta <= 1 is always allowed)")
        c2 = c2_sq.sqrt()
        coefs = {
            "inv_sqrt_a": 1 / a_t.sqrt(), "sqrt_1m_a": (1 - a_t).sqrt(), "sqrt_a_prev": a_prev.sqrt(),
            "c_eps": c2, "c_z": c1,
            # x_0 prediction folded in: x_prev = sqrt(a_prev/a_t) x + (c2 - sqrt(a_prev (1-a_t)/a_t)) eps
            "f_x": (a_prev / a_t).sqrt(), "f_eps": c2 - (a_prev * (1 - a_t) / a_t).sqrt(),
        }
    needs_z = (coefs["c_z"] != 0).tolist() if stochastic else [False] * S
    c = _per_step(coefs, x_T)
    t_all = seq.flip(0).to(x_T.device).unsqueeze(1).repeat(1, x_T.shape[0])  # (S, B) model inputs
    explicit_x0 = eta == "hat" or clip_denoised or return_trajectory

    x = x_T
    xs, x0s = [x_T], []
    for i in range(S):
        e = eps_model(x, t_all[i]).to(x.dtype)
        if eta == "hat":
            x0 = (c["inv_sqrt_a"][i] * x - c["sqrt_recipm1"][i] * e).clamp_(-1, 1)
            x = c["c_x0"][i] * x0 + c["c_x"][i] * x
        elif explicit_x0:
            x0 = (x - c["sqrt_1m_a"][i] * e) * c["inv_sqrt_a"][i]
            if clip_denoised:
                x0 = x0.clamp_(-1, 1)
            x = torch.addcmul(c["sqrt_a_prev"][i] * x0, c["c_eps"][i], e)
        else:
            x = torch.addcmul(c["f_x"][i] * x, c["f_eps"][i], e)
        if needs_z[i]:
            z = noise[i].to(device=x.device, dtype=x.dtype) if noise is not None else torch.randn(
                x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = torch.addcmul(x, c["c_z"][i], z)
        if return_trajectory:
            xs.append(x)
            x0s.append(x0)
    if return_trajectory:
        return x, {"timesteps": seq.flip(0), "x_t": xs, "x0_pred": x0s}
    return x


@torch.no_grad()
def encode(eps_model: EpsModel, x_0: torch.Tensor, alphas_cumprod: torch.Tensor,
           timesteps: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """x_T for x_0: the deterministic (η = 0) steps of :func:`sample` run backwards (sec. 4.3, 5.4).

    Step i mirrors sample's step from τ_i down to τ_{i-1} (ᾱ = 1 before τ_1): it goes from ᾱ_{τ_{i-1}}
    up to ᾱ_{τ_i} with the same coefficients and the same timestep label τ_i, but evaluates ε at the
    known x_{τ_{i-1}} instead of the unknown x_{τ_i}, the Euler step of the ODE (14) in reverse. The
    mismatch vanishes as S grows, so ``sample(encode(x_0))`` -> x_0. Equals diffusers' DDIMInverseScheduler
    with ``set_alpha_to_one=True``.
    """
    ac = check_alphas_cumprod(alphas_cumprod)
    seq = check_timesteps(timesteps, ac.numel())
    a_to = ac[seq]
    a_from = torch.cat([torch.ones(1, dtype=torch.float64), ac[seq[:-1]]])
    c = _per_step({"f_x": (a_to / a_from).sqrt(),
                   "f_eps": (1 - a_to).sqrt() - (a_to * (1 - a_from) / a_from).sqrt()}, x_0)
    t_all = seq.to(x_0.device).unsqueeze(1).repeat(1, x_0.shape[0])
    x = x_0
    for i in range(seq.numel()):
        e = eps_model(x, t_all[i]).to(x.dtype)
        x = torch.addcmul(c["f_x"][i] * x, c["f_eps"][i], e)
    return x
