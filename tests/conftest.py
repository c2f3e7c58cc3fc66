"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PARITY_FIXTURE = SHARED / "fixtures" / "official_ddim_parity.npz"

os.environ.setdefault("WANDB_MODE", "offline")
# Triton kernels (ddim.accel.conv) run on CPU tensors through Triton's interpreter.  Set before anything imports
# Triton: its own library functions (tl.cdiv ...) are compiled or interpreted as decided at import time.
os.environ.setdefault("TRITON_INTERPRET", "1")


def load_script(relpath: str, name: str | None = None):
    """A script of the repository (``evaluate.py``, ``bench/fid_precision.py``, ...) imported as a module, so tests
    call its functions; ``name`` defaults to the file's stem."""
    import importlib.util

    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_triton_kernels(name: str):
    """Import the Triton-kernel module ``name`` (ddim.accel.conv, ddim.accel.groupnorm) for tests that run its kernels on CPU
    tensors, or skip the calling test module where Triton or its interpreter is missing."""
    module = pytest.importorskip(name)
    if not module.available():
        pytest.skip(f"{name} needs Triton (shipped with torch's CUDA builds)", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these tests run Triton on CPU tensors: TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                    allow_module_level=True)
    return module


@pytest.fixture(scope="session")
def parity():
    """The official DDIM code's recorded outputs (../shared/fixtures/official_ddim_parity.npz)."""
    if not PARITY_FIXTURE.exists():
        pytest.skip(f"official parity fixture not found at {PARITY_FIXTURE} (it lives in ../shared beside the checkout)")
    with np.load(PARITY_FIXTURE) as data:
        return {k: data[k] for k in data.files}
