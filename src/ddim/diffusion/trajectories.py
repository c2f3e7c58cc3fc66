"""Sub-sequences τ of the T training timesteps that the samplers walk (paper sec. 4.2, appendix D.3)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

TRAJECTORIES: dict[str, str] = {"linear": "linear", "uniform": "linear", "quadratic": "quadratic", "quad": "quadratic"}


def timesteps(T: int, S: int, kind: str = "linear") -> torch.Tensor:
    """Increasing, 0-indexed timesteps τ as a long tensor, exactly the official DDIM code's sequence.

    - ``linear`` (alias ``uniform``): ``range(0, T, T // S)``. When S does not divide T this has
      ceil(T / (T // S)) > S entries (e.g. T=1000, S=300 -> 334), as in the official code.
    - ``quadratic`` (alias ``quad``): ``int(linspace(0, sqrt(0.8 T), S) ** 2)``. For large S the rule
      repeats indices (no-op steps in the official code); repeats are removed.

    The returned length is the real number of sampling steps (network evaluations); a ``UserWarning``
    says so whenever it differs from S.
    """
    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory kind {kind!r}; allowed: {', '.join(TRAJECTORIES)}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"number of diffusion steps T must be a positive int, got {T!r}")
    if isinstance(S, bool) or not isinstance(S, int) or not 1 <= S <= T:
        raise ValueError(f"number of sampling steps S must be an int in [1, T={T}], got {S!r}")
    if TRAJECTORIES[kind] == "linear":
        seq = torch.arange(0, T, T // S, dtype=torch.long)
    else:
        # numpy's linspace and int() truncation, bit for bit as the official code
        seq = torch.unique_consecutive(torch.from_numpy((np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(np.int64)))
    if len(seq) != S:
        warnings.warn(f"{kind} trajectory with T={T}, S={S} has {len(seq)} distinct steps", stacklevel=2)
    return seq
