"""Closed-form check: for data N(mu, s² I) the optimal ε is exact, so the samplers' output law is known.

All samplers here are linear-Gaussian maps of (x_T, noise), so besides the data's mean and std we can compute,
independently of ddim.diffusion (numpy, eq. 12 / 16 and the σ̂ posterior), the exact std the *discretised*
sampler produces. The samplers are not exact: DDIM with S = 100 shrinks the std by a few percent (each step
multiplies by cos Δθ in the angle arccos sqrt(ᾱ) when s = 1), η = 1 by less. The tests assert the empirical std matches
that prediction within 5 standard errors, and the data's (mean, std) within 5 standard errors plus that
known discretisation bias (which the test prints in its assertion messages).
"""
from __future__ import annotations

import math

import pytest
import torch

from ddim.diffusion import alphas_cumprod, beta_schedule, encode, sample, timesteps

AC = alphas_cumprod(beta_schedule("linear", 1000))
S_DATA = 0.25  # small enough that σ̂'s clamp of x_0 to [-1, 1] is hit by < 0.2% of the final samples
MU = torch.linspace(-0.2, 0.2, 16, dtype=torch.float64).view(1, 1, 4, 4)


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = AC.to(x.device)[t].view(-1, 1, 1, 1).to(x.dtype)
    return (1 - a).sqrt() * (x - a.sqrt() * MU.to(x.dtype)) / (a * S_DATA**2 + 1 - a)


def predicted_std(S: int, eta) -> float:
    """Exact output std of the discretised sampler (mu = 0 w.l.o.g.), by the variance recursion."""
    ac, s = AC.numpy(), S_DATA
    seq = list(range(0, 1000, 1000 // S))[::-1]
    var = 1.0
    for k, t in enumerate(seq):
        a = ac[t]
        ap = ac[seq[k + 1]] if k + 1 < len(seq) else 1.0
        ce = math.sqrt(1 - a) / (a * s * s + 1 - a)  # ε = ce · x
        gain_x0 = (1 - math.sqrt(1 - a) * ce) / math.sqrt(a)  # x_0 prediction = gain_x0 · x
        if eta == "hat":
            b = 1 - a / ap
            A = math.sqrt(ap) * b / (1 - a) * gain_x0 + math.sqrt(1 - b) * (1 - ap) / (1 - a)
            var = A * A * var + (b if t != 0 else 0.0)
        else:
            sig2 = eta**2 * (1 - a / ap) * (1 - ap) / (1 - a)
            A = math.sqrt(ap) * gain_x0 + math.sqrt(1 - ap - sig2) * ce
            var = A * A * var + sig2
    return math.sqrt(var)


@pytest.mark.parametrize("eta,S", [(0.0, 100), (1.0, 1000), ("hat", 1000)])
def test_gaussian_samples_have_data_statistics(eta, S):
    N = 2000  # 32000 values: below torch's intra-op parallel grain, fast on a busy 2-core box
    g = torch.Generator().manual_seed(1234)
    x_T = torch.randn(N, 1, 4, 4, generator=g)
    x_0 = sample(gaussian_eps, x_T, AC, timesteps(1000, S), eta=eta, generator=g).double()
    z = ((x_0 - MU) / S_DATA).flatten()  # standard normal if the sampler were exact
    n = z.numel()
    se_mean, se_std = 1 / math.sqrt(n), 1 / math.sqrt(2 * n)
    pred = predicted_std(S, eta) / S_DATA
    bias = pred - 1
    assert abs(float(z.mean())) < 5 * se_mean, f"mean off by {float(z.mean()):.4f} sd (5 SE = {5 * se_mean:.4f})"
    std = float(z.std())
    assert abs(std - pred) < 5 * se_std * pred, f"std {std:.4f} vs exact discretised {pred:.4f} (5 SE {5 * se_std:.4f})"
    assert abs(std - 1) < 5 * se_std + abs(bias), f"std {std:.4f} vs data 1 (bias {bias:+.4f}, 5 SE {5 * se_std:.4f})"
    # the per-pixel means follow each pixel's mu (the mean image is reproduced, not just its average)
    per_pixel = (x_0.mean(0) - MU) / (S_DATA / math.sqrt(N))
    assert float(per_pixel.abs().max()) < 5


def test_discretisation_bias_shrinks_with_S():
    """The known DDIM bias the statistics test allows for vanishes as S grows (sanity of the prediction)."""
    biases = [abs(predicted_std(S, 0.0) / S_DATA - 1) for S in (10, 100, 1000)]
    assert biases[0] > biases[1] > biases[2] and biases[2] < 0.02


def test_encode_decode_error_falls_with_S():
    g = torch.Generator().manual_seed(7)
    x_0 = MU + S_DATA * torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    mses = []
    for S in (5, 10, 20, 50, 100):
        seq = timesteps(1000, S)
        x_T = encode(gaussian_eps, x_0, AC, seq)
        mses.append(float((sample(gaussian_eps, x_T, AC, seq) - x_0).square().mean()))
    assert all(b < a for a, b in zip(mses, mses[1:])), mses
    assert mses[-1] < 1e-3, mses
    # x_T is a proper latent: roughly unit variance (not the data scale)
    x_T = encode(gaussian_eps, x_0, AC, timesteps(1000, 100))
    assert 0.8 < float(x_T.std()) < 1.2
