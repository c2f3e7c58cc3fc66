"""Shared pytest fixtures."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARITY_FIXTURE = REPO / "tests" / "fixtures" / "official_ddim_parity.npz"  # the official code's outputs (README there)

os.environ.setdefault("WANDB_MODE", "offline")
# Without a GPU, the Triton kernels (ddim.accel) run on CPU tensors through Triton's interpreter.  Set before anything
# imports Triton: its own library functions (tl.cdiv ...) are compiled or interpreted as decided at import time.  Not
# on a GPU machine: there the kernels run compiled on CUDA tensors (the interpreter fails on them).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def child_env(**extra: str) -> dict:
    """The environment for a test's child process: this repository's ``src`` first on ``PYTHONPATH``, the caller's
    entries kept after it (a machine may put its packages there), then ``extra``."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def load_script(relpath: str, name: str | None = None):
    """A script of the repository (``evaluate.py``, ``bench/sampling.py``, ...) imported as a module, so tests
    call its functions; ``name`` defaults to the file's stem."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Where the tests run ddim.accel's Triton kernels: compiled on the GPU where there is one, else interpreted on the CPU.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def import_triton_kernels(name: str):
    """Import the Triton-kernel module ``name`` (ddim.accel.conv, ddim.accel.groupnorm) for tests that run its kernels
    on ``KERNEL_DEVICE``, or skip the calling test module where Triton, or on the CPU its interpreter, is missing."""
    module = pytest.importorskip(name)
    if not module.available():
        pytest.skip(f"{name} needs Triton (shipped with torch's CUDA builds)", allow_module_level=True)
    if KERNEL_DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU these tests run Triton on CPU tensors under TRITON_INTERPRET=1, which "
                    "tests/conftest.py sets unless the caller set it otherwise", allow_module_level=True)
    return module


@pytest.fixture(scope="session")
def parity():
    """The official DDIM code's recorded outputs (tests/fixtures/official_ddim_parity.npz, see the README there)."""
    with np.load(PARITY_FIXTURE) as data:
        return {k: data[k] for k in data.files}
