"""ddim.diffusion schedules and trajectories against independent numpy versions of the official definitions."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ddim.diffusion import BETA_SCHEDULES, alphas_cumprod, beta_schedule, timesteps


def official_betas(kind: str, T: int, beta_start: float, beta_end: float) -> np.ndarray:
    """numpy restatement of get_beta_schedule in ermongroup/ddim runners/diffusion.py."""
    if kind == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if kind == "const":
        return beta_end * np.ones(T, dtype=np.float64)
    if kind == "jsd":
        return 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    if kind == "sigmoid":
        return 1 / (np.exp(-np.linspace(-6, 6, T)) + 1) * (beta_end - beta_start) + beta_start
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["linear", "quad", "const", "jsd", "sigmoid"])
@pytest.mark.parametrize("T,beta_start,beta_end", [(1000, 1e-4, 0.02), (37, 1e-3, 0.05)])
def test_official_beta_schedules(kind, T, beta_start, beta_end):
    betas = beta_schedule(kind, T, beta_start, beta_end)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas.numpy(), official_betas(kind, T, beta_start, beta_end), rtol=1e-13, atol=0)


def test_linear_schedule_matches_fixture(parity):
    np.testing.assert_array_equal(beta_schedule("linear").numpy(), parity["betas"])


def test_cosine_schedule_properties():
    T, s = 1000, 0.008
    betas = beta_schedule("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert bool((betas > 0).all()) and float(betas.max()) == pytest.approx(0.999)  # clipped at the end
    assert bool((betas[1:] >= betas[:-1]).all())  # increasing
    ac = alphas_cumprod(betas).numpy()
    # ᾱ_t = f(t+1)/f(0) with f(u) = cos²((u/T + s)/(1+s) π/2), wherever β is not clipped
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 900):
        assert ac[t] == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert ac[-1] < 1e-4  # nearly pure noise at t = T


def test_alphas_cumprod():
    betas = beta_schedule("linear", 1000)
    ac = alphas_cumprod(betas)
    assert ac.dtype == torch.float64
    np.testing.assert_allclose(ac.numpy(), np.cumprod(1 - betas.numpy()), rtol=1e-12)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        alphas_cumprod(torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("bad", [dict(kind="cosin"), dict(kind="linear", T=0), dict(kind="linear", T=2.5)])
def test_beta_schedule_bad_input(bad):
    with pytest.raises(ValueError) as info:
        beta_schedule(**bad)
    msg = str(info.value)
    assert repr(bad.get("T", bad["kind"])) in msg
    if bad["kind"] == "cosin":
        assert all(k in msg for k in BETA_SCHEDULES)


def test_timesteps_match_fixture(parity):
    cases = {k.rsplit("/", 1)[0] for k in parity if k.endswith("/timesteps")}
    assert len(cases) >= 6
    for case in cases:
        traj, S = case.split("/")[1], int(case.split("/")[2][1:])
        np.testing.assert_array_equal(timesteps(1000, S, traj).numpy(), parity[case + "/timesteps"], err_msg=case)


def test_timesteps_rules():
    assert timesteps(1000, 10).tolist() == list(range(0, 1000, 100))
    assert torch.equal(timesteps(1000, 20, "uniform"), timesteps(1000, 20, "linear"))
    assert torch.equal(timesteps(1000, 20, "quad"), timesteps(1000, 20, "quadratic"))
    assert timesteps(1000, 10, "quadratic").tolist() == [int(v) for v in np.linspace(0, math.sqrt(800), 10) ** 2]
    assert timesteps(1000, 1).tolist() == [0] and timesteps(1000, 1000).tolist() == list(range(1000))
    for seq in (timesteps(1000, 50), timesteps(1000, 20, "quad")):
        assert seq.dtype == torch.long and bool((seq[1:] > seq[:-1]).all())


def test_timesteps_real_step_count_is_reported():
    # S not dividing T: the official range(0, T, T // S) has more than S entries
    with pytest.warns(UserWarning, match="334 distinct steps"):
        seq = timesteps(1000, 300, "linear")
    assert seq.tolist() == list(range(0, 1000, 3))
    # quadratic with large S repeats indices: they are removed and the real count returned
    raw = (np.linspace(0, math.sqrt(800), 1000) ** 2).astype(int)
    with pytest.warns(UserWarning, match=f"{len(np.unique(raw))} distinct steps"):
        seq = timesteps(1000, 1000, "quadratic")
    assert seq.tolist() == sorted(set(raw.tolist())) and len(seq) < 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timesteps(1000, 29, "quadratic")  # repeats start at S = 30 (T = 1000)
    with pytest.warns(UserWarning, match="S=30 has 29 distinct"):
        timesteps(1000, 30, "quadratic")


@pytest.mark.parametrize("args,match", [
    ((1000, 0, "linear"), r"S must be an int in \[1, T=1000\], got 0"),
    ((1000, 1001, "linear"), r"got 1001"),
    ((1000, 10, "cubic"), r"'cubic'.*linear.*quadratic"),
    ((0, 1, "linear"), r"positive int, got 0"),
])
def test_timesteps_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        timesteps(*args)
