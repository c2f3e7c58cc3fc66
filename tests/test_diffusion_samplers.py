"""sample / encode / slerp behaviour: options, dtypes, reproducibility, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from ddim.diffusion import alphas_cumprod, beta_schedule, encode, sample, slerp, timesteps

AC = alphas_cumprod(beta_schedule("linear", 1000))


def toy_eps(x, t):
    return torch.tanh(x * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 500))


def x_T(n=2, dtype=torch.float32, seed=0):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_model_sees_long_timesteps_in_sampling_order():
    seen = []

    def eps(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        seen.append(t.tolist())
        return toy_eps(x, t)

    seq = timesteps(1000, 5)
    sample(eps, x_T(), AC, seq)
    assert seen == [[t, t] for t in seq.flip(0).tolist()]
    seen.clear()
    encode(eps, x_T(), AC, seq)
    assert seen == [[t, t] for t in seq.tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_kept(dtype):
    x = x_T(dtype=dtype)
    for eta in (0.0, 0.5, "hat"):
        out = sample(toy_eps, x, AC.float(), timesteps(1000, 4), eta=eta, generator=torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert encode(toy_eps, x, AC, timesteps(1000, 4)).dtype == dtype


def test_generator_reproducible_and_noise_replay():
    seq = timesteps(1000, 5)
    a = sample(toy_eps, x_T(), AC, seq, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(toy_eps, x_T(), AC, seq, eta=1.0, generator=torch.Generator().manual_seed(3))
    c = sample(toy_eps, x_T(), AC, seq, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    noise = torch.randn(5, 2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    as_tensor = sample(toy_eps, x_T(), AC, seq, eta=1.0, noise=noise)
    as_list = sample(toy_eps, x_T(), AC, seq, eta=1.0, noise=list(noise))
    assert torch.equal(as_tensor, as_list)
    # the last step (to ᾱ = 1) has σ = 0: its noise is unused
    noise2 = noise.clone()
    noise2[-1] += 1
    assert torch.equal(sample(toy_eps, x_T(), AC, seq, eta=1.0, noise=noise2), as_tensor)
    noise2[0] += 1
    assert not torch.allclose(sample(toy_eps, x_T(), AC, seq, eta=1.0, noise=noise2), as_tensor)


def test_hat_no_noise_only_at_t0():
    noise = torch.randn(4, 2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    bumped = noise.clone()
    bumped[-1] += 1
    for seq, changes in ((torch.tensor([0, 10, 20, 30]), False), (torch.tensor([5, 10, 20, 30]), True)):
        a = sample(toy_eps, x_T(), AC, seq, eta="hat", noise=noise)
        b = sample(toy_eps, x_T(), AC, seq, eta="hat", noise=bumped)
        assert torch.equal(a, b) != changes


def test_eta_zero_is_deterministic_and_ignores_generator():
    seq = timesteps(1000, 5)
    a = sample(toy_eps, x_T(), AC, seq, generator=torch.Generator().manual_seed(1))
    b = sample(toy_eps, x_T(), AC, seq, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_return_trajectory_and_clip():
    seq = timesteps(1000, 5)
    x, traj = sample(toy_eps, x_T(), AC, seq, eta=0.0, return_trajectory=True)
    assert torch.equal(traj["timesteps"], seq.flip(0))
    assert len(traj["x_t"]) == 6 and len(traj["x0_pred"]) == 5
    assert torch.equal(traj["x_t"][0], x_T()) and torch.equal(traj["x_t"][-1], x)
    # the last step goes to ᾱ = 1: x_0 is the x_0 prediction at τ_1 (up to float rounding)
    torch.testing.assert_close(x, traj["x0_pred"][-1])
    torch.testing.assert_close(x, sample(toy_eps, x_T(), AC, seq), rtol=1e-5, atol=1e-5)  # folded fast path
    big = 3 * x_T()
    clipped = sample(toy_eps, big, AC, seq, clip_denoised=True)
    assert float(clipped.abs().max()) <= 1 + 1e-6
    assert float(sample(toy_eps, big, AC, seq).abs().max()) > 1


def test_slerp():
    z1, z2 = x_T(1, seed=1), x_T(1, seed=2)
    torch.testing.assert_close(slerp(z1, z2, 0.0), z1)
    torch.testing.assert_close(slerp(z1, z2, 1.0), z2)
    # on unit vectors: constant angular speed (the angle between z1 and slerp(α) is α θ) and unit norm
    flat = lambda v: v.flatten().double()  # noqa: E731
    z1, z2 = z1 / z1.norm(), z2 / z2.norm()
    theta = math.acos(float(flat(z1) @ flat(z2) / (flat(z1).norm() * flat(z2).norm())))
    mid = slerp(z1, z2, 0.3)
    ang = math.acos(float(flat(z1) @ flat(mid) / (flat(z1).norm() * flat(mid).norm())))
    assert ang == pytest.approx(0.3 * theta, rel=1e-4)
    assert float(mid.norm()) == pytest.approx(1.0, rel=1e-5)
    # a tensor of alphas gives the batch of results, as Figure 6 builds its rows
    alphas = torch.linspace(0, 1, 5)
    batch = slerp(z1, z2, alphas)
    assert batch.shape == (5, 3, 4, 4)
    torch.testing.assert_close(batch[2:3], slerp(z1, z2, 0.5))
    # equal vectors: no division by sin 0
    assert torch.isfinite(slerp(z1, z1, 0.5)).all()
    with pytest.raises(ValueError, match=r"same shape"):
        slerp(z1, x_T(2), 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eta=-0.1), r"eta must be a finite float >= 0 or 'hat', got -0.1"),
    (dict(eta="ddpm"), r"unknown eta 'ddpm'.*'hat'"),
    (dict(eta=5.0), r"eta=5.0 is too large"),
    (dict(noise=[torch.zeros(2, 3, 4, 4)] * 3, eta=1.0), r"expected 4, got 3"),
    (dict(noise=[torch.zeros(2, 3, 4, 5)] * 4, eta=1.0), r"noise\[0\] has shape \(2, 3, 4, 5\), expected.*\(2, 3, 4, 4\)"),
])
def test_sample_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(toy_eps, x_T(), AC, timesteps(1000, 4), **kwargs)


@pytest.mark.parametrize("fn", [sample, encode])
@pytest.mark.parametrize("ac,seq,match", [
    (AC, torch.tensor([0, 500, 1000]), r"\[0, 999\].*got \[0, 1000\]"),
    (AC, torch.tensor([-1, 500]), r"\[0, 999\].*got \[-1, 500\]"),
    (AC, torch.tensor([0, 500, 500]), r"strictly increasing"),
    (AC, torch.tensor([500, 0]), r"strictly increasing"),
    (AC, torch.tensor([0.0, 1.0]), r"integer"),
    (AC.flip(0), torch.tensor([0, 10]), r"strictly decreasing"),
    (torch.cat([AC[:-1], torch.zeros(1, dtype=torch.float64)]), torch.tensor([0, 10]), r"\(0, 1\]"),
    (alphas_cumprod(beta_schedule("jsd", 100))[:-1] * 0 + 1.5, torch.tensor([0]), r"\(0, 1\].*1.5"),
])
def test_bad_alphas_and_timesteps(fn, ac, seq, match):
    with pytest.raises(ValueError, match=match):
        fn(toy_eps, x_T(), ac, seq)


def test_no_reads_of_device_tensors():
    """The loops never read x back to the host (no per-step syncs): they run on the meta device, whose
    tensors have no data, so any .item() / bool() / .tolist() on them would raise."""
    x = torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(Exception):
        bool(x.sum() > 0)  # the meta device indeed refuses reads
    eps = lambda x, t: torch.tanh(x * t.view(-1, 1, 1, 1))  # noqa: E731
    seq = timesteps(1000, 10)
    for kw in (dict(eta=0.0), dict(eta=0.5), dict(eta="hat"), dict(eta=0.0, clip_denoised=True),
               dict(eta=1.0, noise=torch.empty(10, 2, 3, 4, 4, device="meta"))):
        assert sample(eps, x, AC, seq, **kw).device.type == "meta"
    _, traj = sample(eps, x, AC, seq, eta=1.0, return_trajectory=True)
    assert traj["x_t"][-1].device.type == "meta"
    assert encode(eps, x, AC, seq).device.type == "meta"


def test_encode_is_exact_inverse_when_eps_ignores_x():
    """encode mirrors sample step by step (same ᾱ pairs, same labels); only the point where ε is evaluated
    differs, so for an ε that depends on t alone, sample(encode(x_0)) == x_0 up to rounding, for any τ."""
    bias = torch.randn(1000, 1, 3, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = lambda x, t: bias[t].squeeze(1).expand_as(x)  # noqa: E731
    x_0 = x_T(dtype=torch.float64)
    for seq in (timesteps(1000, 4), timesteps(1000, 20, "quadratic"), torch.tensor([7, 300, 301, 999])):
        torch.testing.assert_close(sample(eps, encode(eps, x_0, AC, seq), AC, seq), x_0, rtol=1e-9, atol=1e-9)
    # while with the label shifted by one step it is not: the labels matter
    seq = timesteps(1000, 4)
    shifted = lambda x, t: eps(x, (t + 1).clamp(max=999))  # noqa: E731
    assert not torch.allclose(sample(eps, encode(shifted, x_0, AC, seq), AC, seq), x_0, atol=1e-3)
