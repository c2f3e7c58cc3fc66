"""What one ``evaluate.py`` run was asked to do (``Settings``, every value checked) and what it loaded (``Loaded``).

``ddim.evaluation.runner.validate`` builds the first from the Hydra config before any file is read,
``runner.load`` the second; the tasks and the record read these two, never the raw config.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ddim.accel import INFERENCE_PRESETS
from ddim.data import DATASETS, data_folder
from ddim.diffusion import TRAJECTORIES as TRAJECTORY_ALIASES
from ddim.diffusion.samplers import ETA_STRINGS

# the canonical names only (records and tables are keyed by them; ddim.diffusion also takes aliases)
TRAJECTORIES: tuple[str, ...] = tuple(sorted(set(TRAJECTORY_ALIASES.values())))
# fp32: the plain model (the exact reference); bf16 / fp8: ddim.accel.prepare_for_inference with that preset
PRECISIONS: tuple[str, ...] = ("fp32", *INFERENCE_PRESETS)
# every setting each section has (conf/sampler/ddim.yaml, conf/fid/default.yaml, conf/evaluate.yaml); a key added
# with +<section>.<key>= that nothing reads is refused, not ignored
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "sampler": ("kind", "eta", "steps", "trajectory", "batch_size", "precision", "deterministic"),
    "fid": ("num_samples", "ref_split", "ref_stats", "weights_path", "cache_dir", "device", "batch_size", "save_grid"),
    "reconstruction": ("split", "num_images"), "interpolation": ("num_pairs", "num_alphas"),
    "consistency": ("steps", "num_samples"), "samples": ("num_samples", "nrow", "save_npz")}
# tasks that decode with the deterministic DDIM (η = 0) whatever sampler.eta says
ETA_ZERO_TASKS: tuple[str, ...] = ("reconstruction", "interpolation", "consistency")


def reads_data(task: str, fid: dict) -> bool:
    """Whether the task reads the data set's images (FID's reference without ``fid.ref_stats``, reconstruction's
    inputs): only these need its folder; samples, interpolation and consistency need only its image shape."""
    return task == "reconstruction" or (task == "fid" and not fid.get("ref_stats"))


def default_trajectory(dataset_name: str | None) -> str:
    """The paper's choice (Appendix D.2), the data set's ``DataSpec.trajectory``: quadratic τ for CIFAR-10, linear
    for the other data sets and for a name not in DATASETS (or none)."""
    spec = DATASETS.get(dataset_name) if dataset_name is not None else None
    return spec.trajectory if spec is not None else "linear"


def parse_eta(eta: Any) -> float | str:
    """η as a float >= 0, or a σ rule named in ``ddim.diffusion.samplers.ETA_STRINGS``: ``"hat"`` (also
    ``sigma_hat``, ``σ̂``) for the DDPM σ̂ of the paper's Table 1 last row."""
    allowed = f"a number >= 0 or {' or '.join(map(repr, ETA_STRINGS))}"
    if isinstance(eta, str):
        name = eta.strip().lower()
        name = "hat" if name in ("sigma_hat", "σ̂") else name
        if name in ETA_STRINGS:
            return name
        try:
            eta = float(eta)
        except ValueError:
            raise ValueError(f"sampler.eta must be {allowed}, got {eta!r}") from None
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"sampler.eta must be {allowed}, got {eta!r}")
    return float(eta)


@dataclass(frozen=True)
class Settings:
    """The checked settings of one run; config sections (``dataset``, ``params``, ``fid``, ``trainer``,
    ``loggers``) as plain dicts."""

    task: str
    kind: str                    # ddim | plms | dpmpp_2m | heun
    eta: float | str             # float >= 0 or "hat"
    steps: int                   # S
    trajectory: str | None       # None: the data set's default (resolved by load)
    batch_size: int
    precision: str               # fp32 | bf16 | fp8
    deterministic: bool
    seed: int
    device: str                  # where single-device tasks run and the model is loaded
    use_ema: bool
    ckpt_path: str | None
    official: str | None
    official_path: str | None
    pretrained: str | None       # a released name (ddim.models.pretrained), downloaded by load
    trust_checkpoint: bool       # unpickle checkpoints that hold more than tensors (files the user made)
    dataset: dict | None         # dataset= (with a name), or keys over the checkpoint's own (+dataset.root=), or None
    data_dir: str
    params: dict                 # the task's own config section (reconstruction, samples, ...)
    fid: dict
    trainer: dict
    records_dir: str
    skip_done: bool
    output_dir: str
    loggers: dict
    config: dict                 # the whole resolved config, kept in the record

    @property
    def reads_data(self) -> bool:
        return reads_data(self.task, self.fid)


@dataclass
class Loaded:
    """The model and what follows from it: the data set, the image shape and the sampler's checked timesteps."""

    eps_model: nn.Module
    alphas_cumprod: torch.Tensor
    model_cfg: dict
    data: dict                   # name, image_size, channels, category, root, ...
    shape: tuple[int, int, int]  # (C, H, W)
    trajectory: str
    seq: torch.Tensor            # the decode's timesteps τ

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def dataset_key(self) -> str:
        """``cifar10-32``, ``lsun-church_outdoor-256``: the data set as records and reference statistics name it."""
        d = self.data
        return f"{d['name']}{'-' + d['category'] if d.get('category') else ''}-{d['image_size']}"

    @property
    def data_folder(self) -> str | None:
        """The folder of a data set known by its place (``DataSpec.by_place``: image_folder), absolute: two folders
        of one size must not take each other's records or reference statistics."""
        return data_folder(self.data)

    def reference_name(self, split: str) -> str:
        """The name reference statistics are cached under: the data set and split, and an image folder's place."""
        folder = self.data_folder
        return f"{self.dataset_key}-{split}" + (f"-{hashlib.sha1(folder.encode()).hexdigest()[:10]}" if folder else "")


@dataclass
class TaskResult:
    metric: dict[str, float]
    num_images: int
    nfe: int                     # network evaluations per image
    outputs: dict[str, Any]
