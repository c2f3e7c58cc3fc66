"""ddim.diffusion.sample / encode equal the official DDIM code (recorded fixture) and diffusers' DDIM schedulers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddim.diffusion import alphas_cumprod, beta_schedule, encode, sample, timesteps


def _cases(parity):
    return sorted({k.rsplit("/", 1)[0] for k in parity if k.endswith("/x_0") and "/" in k})


def test_official_sampler_parity(parity):
    """Every recorded case of the official code: same τ, x_0 within 1e-4 (float32, as recorded)."""
    ac = alphas_cumprod(torch.from_numpy(parity["betas"]))
    mu, s = torch.from_numpy(parity["oracle/mu"]), float(parity["oracle/s"])
    ac32 = ac.float()

    def eps(x, t):  # closed-form ε of N(mu, s² I) data (fixture README)
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = ac32[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    x_T = torch.from_numpy(parity["x_T"])
    cases = _cases(parity)
    seen = set()
    for case in cases:
        kind, traj, S_str, *rest = case.split("/")
        S = int(S_str[1:])
        eta = "hat" if kind == "ddpm_noisy" else float(rest[0][3:])
        seq = timesteps(1000, S, traj)
        np.testing.assert_array_equal(seq.numpy(), parity[case + "/timesteps"], err_msg=case)
        noise = torch.from_numpy(parity[case + "/noise"]) if case + "/noise" in parity else None
        assert (noise is None) == (eta == 0.0), case
        x_0 = sample(eps, x_T, ac, seq, eta=eta, noise=noise)
        assert x_0.dtype == torch.float32
        err = float((x_0 - torch.from_numpy(parity[case + "/x_0"])).abs().max())
        # the largest residual (ddpm_noisy/quad/S20, ~7e-5) is float32 cancellation inside the official code
        # (1 - ᾱ near t = 0); in float64 our result is 5e-7 from our float32 one
        assert err < 1e-4, (case, err)
        seen.add((kind, traj, eta))
    assert {("generalized", "uniform", 0.0), ("generalized", "uniform", 0.5), ("generalized", "uniform", 1.0),
            ("generalized", "quad", 0.0), ("ddpm_noisy", "uniform", "hat"), ("ddpm_noisy", "quad", "hat")} <= seen


def _toy_eps(x, t):
    """A nonlinear, t-dependent stand-in for a network."""
    return torch.tanh(x * (1 + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) / 500)) + 0.1 * x


def _diffusers_config(**kw):
    cfg = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
               set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    return {**cfg, **kw}


@pytest.mark.parametrize("S,eta,clip", [(10, 0.0, False), (50, 0.0, False), (20, 0.5, False), (20, 1.0, False),
                                        (10, 0.0, True), (20, 1.0, True)])
def test_diffusers_ddim_scheduler_parity(S, eta, clip):
    diffusers = pytest.importorskip("diffusers")
    ac = alphas_cumprod(beta_schedule("linear", 1000))
    sched = diffusers.DDIMScheduler(**_diffusers_config(clip_sample=clip, clip_sample_range=1.0))
    # same linear betas: diffusers' float32 ᾱ equals ours to float32 rounding
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ac.numpy(), rtol=2e-5)
    sched.alphas_cumprod = ac.clone()  # float64 table so the comparison is not limited by float32
    sched.set_timesteps(S)
    seq = timesteps(1000, S)
    assert sched.timesteps.tolist() == seq.flip(0).tolist()

    g = torch.Generator().manual_seed(0)
    x_T = 2 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)  # wide enough that clipping acts
    noise = torch.randn(S, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        e = _toy_eps(x, torch.full((3,), int(t)))
        x = sched.step(e, int(t), x, eta=eta, variance_noise=noise[i] if eta > 0 else None).prev_sample
    ours = sample(_toy_eps, x_T, ac, seq, eta=eta, noise=noise if eta > 0 else None, clip_denoised=clip)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("S", [10, 50])
def test_diffusers_ddim_inverse_scheduler_parity(S):
    diffusers = pytest.importorskip("diffusers")
    ac = alphas_cumprod(beta_schedule("linear", 1000))
    sched = diffusers.DDIMInverseScheduler(**_diffusers_config())
    sched.alphas_cumprod = ac.clone()
    sched.set_timesteps(S)
    seq = timesteps(1000, S)
    assert sched.timesteps.tolist() == seq.tolist()
    x_0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(-1, 1)
    x = x_0
    for t in sched.timesteps:
        x = sched.step(_toy_eps(x, torch.full((3,), int(t))), int(t), x).prev_sample
    torch.testing.assert_close(encode(_toy_eps, x_0, ac, seq), x, rtol=1e-10, atol=1e-10)
