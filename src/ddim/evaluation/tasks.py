"""The paper's evaluations of a trained ε-model, one function each: FID (Table 1), reconstruction (Table 2),
interpolation (Figure 6), consistency across S (Figure 5) and plain sample grids.

Each takes the run's checked ``Settings`` and the ``Loaded`` model and returns a ``TaskResult``; ``TASKS`` maps the
``task=`` names to them.  Anything that can fail cheaply (reference data set, Inception weights) is prepared before
the first sample.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset

from ddim.data import DATASET_KEYS, DATASETS, PAPER_FID_SAMPLES, SplitError, build_dataset
from ddim.diffusion import encode, slerp, timesteps
from ddim.diffusion.solvers import nfe, nfe_on
from ddim.evaluation.fid import (fid_between, read_reference_statistics, reference_statistics,
                                 resolve_inception_weights)
from ddim.evaluation.images import Uint8Images, save_grid, to_rgb
from ddim.evaluation.sampling import decode, generate, latents_and_noise, sample_batch
from ddim.evaluation.settings import Loaded, Settings, TaskResult
from ddim.files import write_atomically

# data set config keys that are not build_dataset arguments
FID_GRID_SIZE = 64  # fid.save_grid: a grid of the first this many samples


def evaluation_dataset(data: dict, split: str, setting: str) -> Dataset:
    """The data set as the model saw it, without training augmentation (no flips, no dequantization noise).
    ``setting`` names where ``split`` came from (``fid.ref_split``), so a bad split is refused under that name."""
    kw = {k: v for k, v in data.items() if k in DATASET_KEYS and k not in ("name", "split")}
    kw.update(random_flip=False, uniform_dequantization=False)
    try:
        return build_dataset(data["name"], split=split, **kw)
    except SplitError as e:
        raise SplitError(f"{setting}={split}: not a split of dataset={data['name']} ({e})") from None


def generate_for(s: Settings, m: Loaded, n: int, stats: dict) -> torch.Tensor | None:
    """``n`` samples with the run's sampler over every device of ``trainer`` (None on ranks other than 0)."""
    return generate(m.eps_model, m.alphas_cumprod, m.seq, n, m.shape, eta=s.eta, kind=s.kind, seed=s.seed,
                    batch_size=s.batch_size, shard_dir=Path(s.output_dir) / "shards", trainer_kwargs=s.trainer,
                    stats=stats)


def write_samples(images: torch.Tensor, out_dir: Path, *, nrow: int | None = None, save_npz: bool = False) -> dict:
    """A grid PNG of uint8 images and optionally all of them as ``samples.npz`` (``arr_0``, NHWC)."""
    out_dir = Path(out_dir)
    nrow = nrow or int(math.ceil(math.sqrt(images.shape[0])))
    res = {"grid": str(save_grid(images, out_dir / "samples.png", nrow=nrow)), "num_images": int(images.shape[0])}
    if save_npz:
        nhwc = images.permute(0, 2, 3, 1).numpy()
        write_atomically(out_dir / "samples.npz", lambda f: np.savez(f, arr_0=nhwc))
        res["npz"] = str(out_dir / "samples.npz")
    return res


def fid_num_samples(fid: dict, data: dict) -> int:
    """``fid.num_samples``, or where it is null the data set's ``DataSpec.fid_samples``: the paper's 50,000, fewer
    for the 8x8 digits (a check that finishes on a laptop's CPU); the paper's for a name not in DATASETS."""
    n = fid.get("num_samples")
    if n is not None:
        return int(n)
    spec = DATASETS.get(data["name"])
    return spec.fid_samples if spec is not None else PAPER_FID_SAMPLES


def with_fid_defaults(s: Settings, m: Loaded) -> Settings:
    """The settings with ``fid.num_samples`` resolved against the loaded model's data set (before the record key is
    made, so ``fid.num_samples=null`` and the number it stands for share one record)."""
    if s.task != "fid":
        return s
    return dataclasses.replace(s, fid={**s.fid, "num_samples": fid_num_samples(s.fid, m.data)})


def fid_reference(s: Settings, m: Loaded, weights: Path, device: str, batch_size: int) -> dict:
    """The reference statistics: the ``fid.ref_stats`` file when given, else the Inception statistics of the data
    set's ``fid.ref_split`` images (cached, else one Inception pass over them)."""
    if s.fid.get("ref_stats"):
        return read_reference_statistics(s.fid["ref_stats"])
    ref_split = s.fid.get("ref_split", "train")
    reference = Uint8Images(evaluation_dataset(m.data, ref_split, "fid.ref_split"))
    return reference_statistics(reference, ref_key=m.reference_name(ref_split), weights_path=weights,
                                cache_dir=s.fid.get("cache_dir"), device=device, batch_size=batch_size)


def fid_task(s: Settings, m: Loaded) -> TaskResult | None:
    """Tables 1 and 3: FID of ``fid.num_samples`` samples against the data set's ``fid.ref_split`` images or the
    ``fid.ref_stats`` file.

    The reference statistics come first, on rank 0: an unreadable reference image fails before hours of sampling,
    not after."""
    weights = resolve_inception_weights(weights_path=s.fid.get("weights_path"), cache_dir=s.fid.get("cache_dir"))
    fid_device = s.fid.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    fid_batch = int(s.fid["batch_size"])
    ref_stats = None
    if rank_zero_only.rank == 0:  # the other ranks only sample; rank 0 scores
        ref_stats = fid_reference(s, m, weights, fid_device, fid_batch)
    n = int(s.fid["num_samples"])
    sampling: dict = {}
    images = generate_for(s, m, n, sampling)
    if images is None:  # not rank 0: rank 0 merges, scores and records
        return None
    res = fid_between(to_rgb(images), ref_stats, weights_path=weights, device=fid_device, batch_size=fid_batch)
    outputs = {"sampling": sampling, "fid_details": {k: v for k, v in res.items() if isinstance(v, (int, float, str))}}
    if s.fid.get("save_grid"):
        outputs.update(write_samples(images[:FID_GRID_SIZE], Path(s.output_dir)))
    return TaskResult({"fid": float(res["fid"])}, n, nfe(s.kind, len(m.seq)), outputs)


def fid_grid(s: Settings, m: Loaded) -> dict | None:
    """The grid ``fid.save_grid`` asks for (the first samples, by index the same as the FID run's), without the
    FID run: for a finished record made with ``fid.save_grid=false``. None on ranks other than 0."""
    images = generate_for(s, m, min(FID_GRID_SIZE, int(s.fid["num_samples"])), {})
    return None if images is None else write_samples(images, Path(s.output_dir))


def samples_task(s: Settings, m: Loaded) -> TaskResult | None:
    """``samples.num_samples`` samples as a grid PNG (``samples.nrow`` per row) and optionally ``samples.npz``."""
    n = int(s.params["num_samples"])
    sampling: dict = {}
    images = generate_for(s, m, n, sampling)
    if images is None:
        return None
    outputs = write_samples(images, Path(s.output_dir), nrow=s.params.get("nrow"),
                            save_npz=bool(s.params.get("save_npz")))
    return TaskResult({}, n, nfe(s.kind, len(m.seq)), {"sampling": sampling, **outputs})


@torch.no_grad()
def reconstruction_mse(eps_model: torch.nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor,
                       dataset: Dataset, *, num_images: int | None = None, batch_size: int = 100,
                       device: str = "cpu") -> dict:
    """Encode x_0 -> x_T with S DDIM steps (η = 0 backwards), decode with the same S; the per-dimension MSE with
    both images on the [0, 1] scale (the decoded image is clipped to it)."""
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=int(batch_size))
    ac, seq = alphas_cumprod.to(device), seq.to(device)
    sq_sum, count = 0.0, 0
    for batch in loader:
        x0 = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device).float()
        x0_hat = sample_batch(eps_model, ac, seq, encode(eps_model, x0, ac, seq), eta=0.0)
        a, b = (x0.clamp(-1, 1) + 1) / 2, (x0_hat.float().clamp(-1, 1) + 1) / 2
        sq_sum += float((a - b).double().square().sum())
        count += a.numel()
    return {"mse": sq_sum / count, "num_images": n}


def reconstruction_task(s: Settings, m: Loaded) -> TaskResult:
    """Table 2: reconstruction error of ``reconstruction.num_images`` images of ``reconstruction.split``."""
    dataset = evaluation_dataset(m.data, s.params["split"], "reconstruction.split")
    n = s.params.get("num_images")
    if n is not None and n > len(dataset):  # refused, not silently fewer: the record would claim n images
        raise ValueError(f"reconstruction.num_images={n} but reconstruction.split={s.params['split']} of "
                         f"{m.dataset_key} has {len(dataset)} images; allowed: 1..{len(dataset)}, or null (all)")
    res = reconstruction_mse(m.eps_model, m.alphas_cumprod, m.seq, dataset, num_images=n,
                             batch_size=s.batch_size, device=s.device)
    return TaskResult({"mse": res["mse"]}, res["num_images"], 2 * len(m.seq), {})  # encode + decode


def interpolation_task(s: Settings, m: Loaded) -> TaskResult:
    """Figure 6: x_T = slerp(z_1, z_2, α) for α in [0, 1], decoded with η = 0; one row per pair."""
    num_alphas = int(s.params["num_alphas"])
    rows = []
    for p in range(int(s.params["num_pairs"])):
        z, _ = latents_and_noise([2 * p, 2 * p + 1], m.shape, 0, s.seed)
        rows += [slerp(z[0:1], z[1:2], float(a)) for a in torch.linspace(0, 1, num_alphas).tolist()]
    x_T = torch.cat(rows)
    images = decode(m.eps_model, m.alphas_cumprod, m.seq, x_T, device=s.device, batch_size=s.batch_size, kind=s.kind)
    grid = save_grid(images, Path(s.output_dir) / "interpolation.png", nrow=num_alphas)
    return TaskResult({}, int(x_T.shape[0]), nfe(s.kind, len(m.seq)), {"grid": str(grid)})


def consistency_task(s: Settings, m: Loaded) -> TaskResult:
    """Figure 5: the same x_T decoded with η = 0 for each S in ``consistency.steps``; one column per S."""
    steps_list = [int(S) for S in s.params["steps"]]
    x_T, _ = latents_and_noise(range(int(s.params["num_samples"])), m.shape, 0, s.seed)
    cols = [decode(m.eps_model, m.alphas_cumprod, timesteps(m.num_timesteps, S, kind=m.trajectory), x_T,
                   device=s.device, batch_size=s.batch_size, kind=s.kind) for S in steps_list]
    images = torch.stack(cols, dim=1).flatten(0, 1)  # row = one x_T, columns = S
    grid = save_grid(images, Path(s.output_dir) / "consistency.png", nrow=len(steps_list))
    spent = sum(nfe_on(s.kind, S, m.num_timesteps, m.trajectory) for S in steps_list)  # one decode per S
    return TaskResult({}, int(images.shape[0]), spent, {"grid": str(grid), "steps": steps_list})


TASKS: dict[str, Callable[[Settings, Loaded], TaskResult | None]] = {
    "fid": fid_task, "reconstruction": reconstruction_task, "interpolation": interpolation_task,
    "consistency": consistency_task, "samples": samples_task}
