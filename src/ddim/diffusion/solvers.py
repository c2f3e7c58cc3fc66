"""Higher-order ODE samplers for a trained ε-model (beyond the paper, see its eq. (14) and discussion).

DDIM with η = 0 is the Euler method of the probability-flow ODE written in the paper's eq. (14)
coordinates: with σ = sqrt((1 - ᾱ) / ᾱ) and x̄ = x / sqrt(ᾱ),

    dx̄ / dσ = ε_θ(x̄ · sqrt(ᾱ(σ)), t(σ)),

and one DDIM step from t to s is x̄_s = x̄_t + (σ_s - σ_t) ε_θ(x_t, t). Every solver here works in these
coordinates, on the same increasing trajectory τ_1 < ... < τ_S as the DDIM sampler, and, like it, the
last step goes from τ_1 to ᾱ = 1 (σ = 0, x̄ = x); that final step is always first order (its end point
has no ε-evaluation), i.e. it returns the x_0-prediction at τ_1 updated with the solver's ε-estimate.

Each solver is one function ``(eps, xbar, sig) -> x̄ at σ = 0`` over the coordinates :func:`solve` prepares,
listed with its minimum S and its NFE in the one registry ``SOLVERS`` (as k-diffusion's ``sample_*``); every
function here reads the registry when called, so a solver registered later works everywhere:

- ``plms``: pseudo linear multistep (Liu et al. 2022, PNDM), exactly diffusers' ``PNDMScheduler`` with
  ``skip_prk_steps=True``: the DDIM transfer driven by an Adams-Bashforth combination of past ε's; the
  first step is a pseudo improved-Euler (Heun) step, then AB2, AB3, then AB4. NFE = S + 1.
- ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form, as diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")``:
  first step first order (= DDIM), then 2M, last step (to σ = 0) first order. NFE = S.
- ``heun``: Heun's method (2nd order) on the ODE above: average the slope at both ends of each step;
  the last step, ending at σ = 0, is Euler only. NFE = 2S - 1.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ddim.diffusion.samplers import EpsModel, check_alphas_cumprod, check_timesteps
from ddim.diffusion.trajectories import timesteps

# ε_θ at x̄ on the i-th noise level of the run (i = 0 is τ_S); evaluates the network once.
EpsAt = Callable[[torch.Tensor, int], torch.Tensor]
# (eps, x̄ at σ_S, [σ_S, ..., σ_1, 0]) -> x̄ at σ = 0, which is x_0.
Integrator = Callable[[EpsAt, torch.Tensor, list[float]], torch.Tensor]


@dataclass(frozen=True)
class Solver:
    """A registry entry: the integrator, the fewest steps S for which it is more than DDIM, and its NFE for S
    steps (increasing in S; ``steps_for_nfe`` inverts it)."""

    integrate: Integrator
    min_steps: int
    nfe: Callable[[int], int]

    def __post_init__(self) -> None:
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ValueError(f"Solver.min_steps must be a positive int, got {self.min_steps!r}")


def heun(eps: EpsAt, xbar: torch.Tensor, sig: list[float]) -> torch.Tensor:
    """Heun's method: average the slope at both ends of each step; the last, to σ = 0, is Euler only."""
    S = len(sig) - 1
    for i in range(S):
        d = eps(xbar, i)
        x_euler = xbar + (sig[i + 1] - sig[i]) * d
        if i + 1 == S:  # σ = 0 has no model evaluation: Euler (= DDIM) step
            xbar = x_euler
        else:
            xbar = xbar + (sig[i + 1] - sig[i]) * 0.5 * (d + eps(x_euler, i + 1))
    return xbar


def plms(eps: EpsAt, xbar: torch.Tensor, sig: list[float]) -> torch.Tensor:
    """PNDM's pseudo linear multistep: a pseudo improved-Euler warm-up, then Adams-Bashforth 2, 3, 4 on ε."""
    S = len(sig) - 1
    ets: list[torch.Tensor] = []
    for i in range(S):
        e = eps(xbar, i)
        ets = (ets + [e])[-4:]
        if i == 0:
            # Pseudo improved Euler: DDIM predictor, then average its ε with the ε at the predicted point.
            x_pred = xbar + (sig[1] - sig[0]) * e
            e_hat = 0.5 * (e + eps(x_pred, 1)) if S > 1 else e
        elif len(ets) == 2:
            e_hat = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e_hat = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e_hat = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        xbar = xbar + (sig[i + 1] - sig[i]) * e_hat
    return xbar


def dpmpp_2m(eps: EpsAt, xbar: torch.Tensor, sig: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M): data prediction D = x̄ - σ ε; one step x̄_s = r x̄_t + (1 - r) D̂, r = σ_s / σ_t."""
    D_prev = None
    for i in range(len(sig) - 1):
        D = xbar - sig[i] * eps(xbar, i)
        r = sig[i + 1] / sig[i]
        if D_prev is None or sig[i + 1] == 0.0:
            D_hat = D  # first order (= DDIM step)
        else:
            h = math.log(sig[i] / sig[i + 1])  # λ_s - λ_t with λ = -log σ
            h_0 = math.log(sig[i - 1] / sig[i])
            D_hat = D + 0.5 * (h / h_0) * (D - D_prev)
        xbar = r * xbar + (1 - r) * D_hat
        D_prev = D
    return xbar


# The solvers by ``sampler.kind``, in the FID-against-NFE table's row order. min_steps: PLMS needs its warm-up
# step plus one multistep step, DPM-Solver++(2M) a first-order start, one 2M step and the first-order final step,
# Heun one corrected step before the Euler-only final step.
SOLVERS: dict[str, Solver] = {
    "plms": Solver(plms, min_steps=2, nfe=lambda S: S + 1),
    "dpmpp_2m": Solver(dpmpp_2m, min_steps=3, nfe=lambda S: S),
    "heun": Solver(heun, min_steps=2, nfe=lambda S: 2 * S - 1),
}


def _solver(kind: str, also: tuple[str, ...] = ()) -> Solver:
    """The registry entry for ``kind``, looked up when called so that a solver registered later is found."""
    if not isinstance(kind, str) or kind not in SOLVERS:
        raise ValueError(f"unknown sampler kind {kind!r}; allowed: {', '.join([*also, *SOLVERS])}")
    return SOLVERS[kind]


def _count(kind: str) -> tuple[int, Callable[[int], int]]:
    """(min_steps, NFE as a function of S) for a solver or ``"ddim"`` (``sample`` with η = 0: NFE = S)."""
    if kind == "ddim":
        return 1, lambda S: S
    solver = _solver(kind, also=("ddim",))
    return solver.min_steps, solver.nfe


def nfe(kind: str, S: int) -> int:
    """Network evaluations spent by ``kind`` on an S-step trajectory (``"ddim"`` also accepted: NFE = S)."""
    min_steps, count = _count(kind)
    if not isinstance(S, int) or S < 1:
        raise ValueError(f"number of steps S must be a positive int, got {S!r}")
    if S < min_steps:
        raise ValueError(f"{kind} needs at least S={min_steps} steps, got S={S}")
    return count(S)


def min_nfe(kind: str) -> int:
    """Smallest NFE budget ``kind`` can run with (1 for ``"ddim"``)."""
    min_steps, count = _count(kind)
    return count(min_steps)


def _check_budget(kind: str, nfe_budget: int) -> None:
    minimum = min_nfe(kind)  # also checks kind
    if not isinstance(nfe_budget, int) or nfe_budget < minimum:
        raise ValueError(f"NFE={nfe_budget!r} is too small for {kind}: it needs NFE >= {minimum}")


def nfe_on(kind: str, S: int, T: int, trajectory: str = "linear") -> int:
    """Network evaluations ``kind`` spends on ``timesteps(T, S, trajectory)``: its real length, which the
    official rules make differ from S (linear range(0, T, T // S) can be longer, quadratic drops repeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trajectory has N distinct steps": exactly what is counted here
        return nfe(kind, len(timesteps(T, int(S), trajectory)))


def steps_for_nfe(kind: str, nfe_budget: int) -> int:
    """Largest S whose NFE is at most ``nfe_budget``, found from the solver's NFE rule (heun, 2S - 1, spends one
    evaluation less than an even budget). Raises ValueError below the method's minimum."""
    _check_budget(kind, nfe_budget)
    min_steps, count = _count(kind)
    # NFE rises by at least one per added step, so no S beyond nfe_budget + min_steps - 1 fits.
    return max(S for S in range(min_steps, nfe_budget + min_steps) if count(S) <= nfe_budget)


def steps_for_nfe_on(kind: str, nfe_budget: int, T: int, trajectory: str = "linear") -> tuple[int, int]:
    """(S, real NFE) for the largest request S whose *real* trajectory spends at most ``nfe_budget``.

    ``timesteps(T, S, trajectory)`` need not have S entries (the official linear rule range(0, T, T // S)
    can give more, the quadratic rule repeats indices that are removed), so the S of ``steps_for_nfe`` can
    over- or undershoot the budget there; this searches the S to pass to ``timesteps`` instead.
    """
    _check_budget(kind, nfe_budget)
    for S in range(min(T, 2 * nfe_budget + 2), 0, -1):
        try:
            spent = nfe_on(kind, S, T, trajectory)
        except ValueError:  # this trajectory is shorter than the method's minimum
            continue
        if spent <= nfe_budget:
            return S, spent
    raise ValueError(f"no trajectory of T={T} ({trajectory}) fits NFE={nfe_budget} for {kind}")


def _check_inputs(kind: str, alphas_cumprod: torch.Tensor,
                  timesteps: torch.Tensor | Sequence[int]) -> tuple[Solver, torch.Tensor, torch.Tensor]:
    """(solver, ᾱ as float64 CPU, τ as a long CPU tensor), every check done before the first network call."""
    solver = _solver(kind)
    ac = check_alphas_cumprod(alphas_cumprod)
    seq = check_timesteps(timesteps, ac.numel())
    S = len(seq)
    if S < solver.min_steps:
        raise ValueError(
            f"{kind} needs at least S={solver.min_steps} steps (NFE >= {min_nfe(kind)}), got S={S} (NFE would be "
            f"too small for this method; use ddim for fewer evaluations)"
        )
    return solver, ac, seq


@torch.no_grad()
def solve(
    kind: str,
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """Integrate the DDIM ODE from x_T at ``timesteps[-1]`` down to x_0 (ᾱ = 1) with solver ``kind``.

    ``timesteps``: a tensor or a sequence of ints, 0-indexed and strictly increasing, as for ``sample``.
    ``eps_model(x, t)`` gets t as a long tensor (B,) of 0-indexed timesteps. Deterministic; spends
    ``nfe(kind, len(timesteps))`` network evaluations.
    """
    solver, a, seq = _check_inputs(kind, alphas_cumprod, timesteps)
    taus = [int(t) for t in seq.flip(0)]  # τ_S, ..., τ_1 (high noise first)
    # Noise levels along the run, with the final target ᾱ = 1 (σ = 0) appended.
    sqrt_a = [float(a[t].sqrt()) for t in taus] + [1.0]
    sig = [float(((1 - a[t]) / a[t]).sqrt()) for t in taus] + [0.0]
    B = x_T.shape[0]

    def eps(xbar: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((B,), taus[i], dtype=torch.long, device=x_T.device)
        return eps_model(xbar * sqrt_a[i], t).to(x_T.dtype)

    return solver.integrate(eps, x_T / sqrt_a[0], sig)
