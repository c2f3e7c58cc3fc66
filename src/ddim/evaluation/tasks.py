"""The paper's evaluations of a trained ε-model: FID (Table 1), reconstruction (Table 2), interpolation
(Figure 6), consistency across S (Figure 5) and plain sample grids.

Determinism across device counts: sample ``i`` draws its x_T and all its per-step noise from its own
``torch.Generator`` seeded by a hash of ``(seed, i)``, and is always computed in batch ``i // batch_size``
(whole batches, not single indices, are spread over the ranks), so for a given ``batch_size`` the image for
index ``i`` does not depend on the number of GPUs or which rank produced it, bit for bit, even where the
kernels' sums depend on the batch (GPU kernels are chosen per shape; bf16).  FID sampling runs through
Lightning's ``Trainer.predict`` over the batches (DDP on several GPUs); every rank writes a shard and rank 0
merges them by index.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ddim.config import check_positive_int

EVAL_TASKS: tuple[str, ...] = ("fid", "reconstruction", "interpolation", "consistency", "samples")
TRAJECTORIES: tuple[str, ...] = ("linear", "quadratic")


# ----------------------------------------------------------------------------------------- checks
def default_trajectory(dataset_name: str | None) -> str:
    """The paper's choice (Appendix D.2): quadratic τ for CIFAR-10, linear for the other data sets."""
    return "quadratic" if dataset_name == "cifar10" else "linear"


def parse_eta(eta: Any) -> float | str:
    """η as a float >= 0, or the string ``"hat"`` for the DDPM σ̂ (the paper's Table 1 last row)."""
    if isinstance(eta, str):
        if eta.strip().lower() in ("hat", "sigma_hat", "σ̂"):
            return "hat"
        try:
            eta = float(eta)
        except ValueError:
            raise ValueError(f"sampler.eta must be a number >= 0 or 'hat', got {eta!r}") from None
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"sampler.eta must be a number >= 0 or 'hat', got {eta!r}")
    return float(eta)


def check_sampler(*, kind: str, eta: Any, steps: Any, trajectory: str, T: int) -> tuple[float | str, int]:
    """Validate the sampler settings against a model with T diffusion steps; returns (eta, steps)."""
    from ddim.diffusion.solvers import SOLVERS

    kinds = ("ddim",) + tuple(SOLVERS)
    if kind not in kinds:
        raise ValueError(f"sampler.kind must be one of {', '.join(kinds)}, got {kind!r}")
    eta = parse_eta(eta)
    check_positive_int(steps, "sampler.steps (S)")
    if steps > T:
        raise ValueError(f"sampler.steps={steps} exceeds the model's T={T} diffusion steps (allowed: 1..{T})")
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"sampler.trajectory must be one of {', '.join(TRAJECTORIES)}, got {trajectory!r}")
    if kind != "ddim":
        if eta != 0.0:
            raise ValueError(f"sampler.kind={kind} is a deterministic ODE solver; it needs sampler.eta=0, got {eta!r}")
        from ddim.diffusion.solvers import nfe

        nfe(kind, steps)  # raises a clear error when S is too small for the method
    return eta, steps


# ------------------------------------------------------------------------------------ randomness
def index_seed(seed: int, i: int) -> int:
    """A 63-bit seed for sample ``i`` of run ``seed`` (a hash, so nearby indices get unrelated streams)."""
    h = hashlib.blake2b(f"ddim-eval:{int(seed)}:{int(i)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def latents_and_noise(indices: Sequence[int], shape: Sequence[int], n_noise: int, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x_T (B, *shape) and, if n_noise > 0, per-step noise (n_noise, B, *shape), each row from its own stream."""
    xs, ns = [], []
    for i in indices:
        g = torch.Generator().manual_seed(index_seed(seed, int(i)))
        xs.append(torch.randn(tuple(shape), generator=g))
        if n_noise > 0:
            ns.append(torch.randn((n_noise, *shape), generator=g))
    x_T = torch.stack(xs)
    noise = torch.stack(ns, dim=1) if n_noise > 0 else None
    return x_T, noise


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], rounding as ``torchvision.utils.save_image`` does."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


# -------------------------------------------------------------------------------------- sampling
def sample_batch(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, x_T: torch.Tensor, *,
                 eta: float | str = 0.0, noise: torch.Tensor | None = None, kind: str = "ddim") -> torch.Tensor:
    """x_0 in [-1, 1] from x_T with the DDIM family (``kind="ddim"``) or a higher-order solver."""
    if kind != "ddim":
        from ddim.diffusion.solvers import solve

        return solve(kind, eps_model, x_T, alphas_cumprod, seq)
    from ddim.diffusion import sample

    return sample(eps_model, x_T, alphas_cumprod, seq, eta=eta, noise=noise if eta != 0.0 else None)


def make_timesteps(T: int, steps: int, trajectory: str) -> torch.Tensor:
    from ddim.diffusion import timesteps

    return timesteps(T, steps, kind=trajectory)


class IndexBatches(Dataset):
    """Batch ``b`` holds samples ``b * batch_size`` .. ``(b + 1) * batch_size - 1``: the unit ``Trainer.predict``
    spreads over ranks (batch ``b`` on rank ``b % W``).

    Sharding single indices instead (Lightning's default for a batched loader: rank ``r`` takes ``r, r + W, ...``)
    puts a sample at another place in another batch on each GPU count, and GPU kernels do not compute every
    place alike: on an H200, the same 1,024 x_T batched as one GPU and as two ranks' index shards gave 67
    different images in fp32 (up to 2/255; the last 32 of each 512-batch) and 66 with sampler.fast (up to
    21/255); a real 2-GPU run, 66 (up to 50/255; docs/results/bench, sixth round).

    With fewer batches than ``min_batches`` (the world size) the list repeats from batch 0, so no rank is left
    without work (Lightning's predict sampler requires one item per rank); the repeats are the same batches, so
    they give the same images, and the merge by index keeps one."""

    def __init__(self, n: int, batch_size: int, min_batches: int = 1):
        self.n, self.batch_size = int(n), int(batch_size)
        self.num_batches = -(-self.n // self.batch_size)
        self.min_batches = int(min_batches)

    def __len__(self) -> int:
        return max(self.num_batches, self.min_batches)

    def __getitem__(self, b: int) -> torch.Tensor:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range: {len(self)} batches")
        b %= self.num_batches
        return torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n))


def _only_item(items: list) -> Any:
    return items[0]


def sample_loader(n: int, batch_size: int, world_size: int = 1) -> torch.utils.data.DataLoader:
    """The loader ``generate`` predicts over: one item per batch of indices (``IndexBatches``); loader batches of
    one such item, so Lightning can track which went where."""
    return torch.utils.data.DataLoader(IndexBatches(n, batch_size, min_batches=world_size), batch_size=1,
                                       shuffle=False, collate_fn=_only_item)


def _sampling_module(eps_model, alphas_cumprod, seq, shape, *, eta, kind, seed):
    import lightning as L

    class SamplingModule(L.LightningModule):
        """predict_step: indices -> (indices, uint8 images); the noise comes from the indices alone."""

        def __init__(self):
            super().__init__()
            self.eps_model = eps_model
            self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)
            self.register_buffer("seq", seq.clone(), persistent=False)

        @torch.no_grad()
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            idx = batch.long().cpu()
            n_noise = 0 if (kind != "ddim" or eta == 0.0) else int(self.seq.numel())
            x_T, noise = latents_and_noise(idx.tolist(), shape, n_noise, seed)
            x_T = x_T.to(self.device)
            noise = noise.to(self.device) if noise is not None else None
            x0 = sample_batch(self.eps_model, self.alphas_cumprod, self.seq, x_T, eta=eta, noise=noise, kind=kind)
            return idx, to_uint8(x0).cpu()

    return SamplingModule()


def generate(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, n: int, shape: Sequence[int], *,
             eta: float | str = 0.0, kind: str = "ddim", seed: int = 0, batch_size: int = 500,
             shard_dir: str | Path, trainer_kwargs: dict | None = None,
             stats: dict | None = None) -> torch.Tensor | None:
    """Samples 0..n-1 as uint8 (n, C, H, W) on rank 0 (None on other ranks), spread over all devices.

    ``stats`` (rank 0) receives ``world_size``, ``first_batch_s`` (the slowest rank's first batch: compilation and
    warm-up) and ``images_per_s``: the ranks' summed rate after their first batch, so the GPU-count scaling of
    sampling can be read off evaluate.py's own records (None when a rank ran a single batch)."""
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter

    shard_dir = Path(shard_dir)

    class ShardWriter(BasePredictionWriter):
        def __init__(self):
            super().__init__(write_interval="epoch")
            self.t0, self.ends = 0.0, []

        def on_predict_epoch_start(self, trainer, pl_module):
            self.t0, self.ends = time.perf_counter(), []

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            # the images are on the host by now (predict_step's .cpu() waits for the device)
            self.ends.append((time.perf_counter() - self.t0, int(outputs[1].shape[0])))

        def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
            preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
            idx = torch.cat([p[0] for p in preds]) if preds else torch.empty(0, dtype=torch.long)
            imgs = torch.cat([p[1] for p in preds]) if preds else torch.empty(0, *shape, dtype=torch.uint8)
            shard_dir.mkdir(parents=True, exist_ok=True)
            name = f"rank{trainer.global_rank:04d}-of-{trainer.world_size:04d}.pt"
            torch.save({"index": idx, "images": imgs, "batch_ends": self.ends}, shard_dir / name)

    kw = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_model_summary": False, "enable_progress_bar": False}
    kw.update(trainer_kwargs or {})
    trainer = L.Trainer(callbacks=[ShardWriter()], **kw)
    loader = sample_loader(n, batch_size, world_size=trainer.world_size)
    module = _sampling_module(eps_model, alphas_cumprod, seq, shape, eta=eta, kind=kind, seed=seed)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    out = torch.empty((n, *shape), dtype=torch.uint8)
    seen = torch.zeros(n, dtype=torch.bool)
    shards = [shard_dir / f"rank{r:04d}-of-{trainer.world_size:04d}.pt" for r in range(trainer.world_size)]
    ends = []
    for p in shards:  # exactly this run's world size: a stale shard of another run is never merged
        d = torch.load(p, weights_only=True)
        out[d["index"]] = d["images"]
        seen[d["index"]] = True
        ends.append(d.get("batch_ends") or [])
    for p in shards:
        p.unlink()
    if not bool(seen.all()):
        raise RuntimeError(f"sampling shards in {shard_dir} miss {int((~seen).sum())} of {n} indices")
    if stats is not None:
        stats.update(sampling_rate(ends))
    return out


def sampling_rate(batch_ends: Sequence[Sequence[tuple[float, int]]]) -> dict:
    """Throughput of ranks that each ran batches ending at (seconds, images): summed per-rank rates after
    each rank's first batch, whose time holds compilation and warm-up (reported apart, slowest rank)."""
    steady = [sum(k for _, k in e[1:]) / (e[-1][0] - e[0][0]) for e in batch_ends if len(e) >= 2 and e[-1][0] > e[0][0]]
    return {"world_size": len(batch_ends),
            "first_batch_s": round(max((e[0][0] for e in batch_ends if e), default=0.0), 3),
            "images_per_s": round(sum(steady), 2) if batch_ends and len(steady) == len(batch_ends) else None}


# ---------------------------------------------------------------------------------------- tasks
def _rgb(x: torch.Tensor) -> torch.Tensor:
    """Inception wants 3 channels: grey images are repeated."""
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class Uint8Images(Dataset):
    """A data set of [-1, 1] (image, label) pairs viewed as uint8 RGB (3, H, W) tensors (the FID reference)."""

    def __init__(self, base: Dataset, limit: int | None = None):
        self.base = base
        self.n = len(base) if limit is None else min(int(limit), len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.base[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        return _rgb(to_uint8(x)[None])[0]


def _fid_between(gen_images: torch.Tensor, ref: Any, **kw: Any) -> dict:
    """Indirection to ``ddim.evaluation.fid.fid_between`` (tests swap in a cheap feature extractor here)."""
    from ddim.evaluation.fid import fid_between

    return fid_between(gen_images, ref, **kw)


def _resolve_weights(weights_path: str | None, cache_dir: str | None) -> Any:
    """Indirection to ``ddim.evaluation.fid.resolve_inception_weights`` (called before any sampling)."""
    from ddim.evaluation.fid import resolve_inception_weights

    return resolve_inception_weights(weights_path=weights_path, cache_dir=cache_dir)


def fid_task(images: torch.Tensor, ref_dataset: Dataset, *, ref_key: str, weights_path: Any = None,
             cache_dir: str | None = None, device: str = "cpu", batch_size: int = 200) -> dict:
    """FID of generated uint8 images against the reference data set (statistics cached under ref_key)."""
    res = _fid_between(_rgb(images), Uint8Images(ref_dataset), ref_key=ref_key, weights_path=weights_path,
                       cache_dir=cache_dir, device=device, batch_size=batch_size)
    return dict(res)


@torch.no_grad()
def reconstruction_task(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, dataset: Dataset, *,
                        num_images: int | None = None, batch_size: int = 100, device: str = "cpu",
                        kind: str = "ddim") -> dict:
    """Table 2: encode x_0 -> x_T with S DDIM steps (η = 0 backwards), decode with the same S, and report
    the per-dimension MSE with both images on the [0, 1] scale (the decoded image is clipped to it)."""
    from ddim.diffusion import encode

    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=int(batch_size))
    ac, seq = alphas_cumprod.to(device), seq.to(device)
    sq_sum, count = 0.0, 0
    for batch in loader:
        x0 = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device).float()
        x_T = encode(eps_model, x0, ac, seq)
        x0_hat = sample_batch(eps_model, ac, seq, x_T, eta=0.0, kind=kind)
        a, b = (x0.clamp(-1, 1) + 1) / 2, (x0_hat.float().clamp(-1, 1) + 1) / 2
        sq_sum += float((a - b).double().square().sum())
        count += a.numel()
    return {"mse": sq_sum / count, "num_images": n}


def _save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(images.float() / 255.0, nrow=nrow, padding=2, pad_value=1.0)
    torchvision.utils.save_image(grid, path)
    return path


@torch.no_grad()
def interpolation_task(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, shape: Sequence[int], *,
                       out_dir: Path, num_pairs: int = 4, num_alphas: int = 9, seed: int = 0, device: str = "cpu",
                       batch_size: int = 100, kind: str = "ddim") -> dict:
    """Figure 6: x_T = slerp(z_1, z_2, α) for α in [0, 1], decoded with DDIM (η = 0); one row per pair."""
    from ddim.diffusion import slerp

    rows = []
    for p in range(int(num_pairs)):
        z, _ = latents_and_noise([2 * p, 2 * p + 1], shape, 0, seed)
        rows += [slerp(z[0:1], z[1:2], float(a)) for a in torch.linspace(0, 1, int(num_alphas)).tolist()]
    x_T = torch.cat(rows)
    imgs = _decode(eps_model, alphas_cumprod, seq, x_T, device, batch_size, kind)
    path = _save_grid(imgs, Path(out_dir) / "interpolation.png", nrow=int(num_alphas))
    return {"grid": str(path), "num_images": int(x_T.shape[0])}


def _decode(eps_model, alphas_cumprod, seq, x_T, device, batch_size, kind="ddim") -> torch.Tensor:
    ac, seq = alphas_cumprod.to(device), seq.to(device)
    outs = [to_uint8(sample_batch(eps_model, ac, seq, xb.to(device), eta=0.0, kind=kind)).cpu()
            for xb in x_T.split(int(batch_size))]
    return torch.cat(outs)


@torch.no_grad()
def consistency_task(eps_model: nn.Module, alphas_cumprod: torch.Tensor, steps_list: Sequence[int], shape: Sequence[int],
                     *, trajectory: str, out_dir: Path, num_samples: int = 8, seed: int = 0, device: str = "cpu",
                     batch_size: int = 100, kind: str = "ddim") -> dict:
    """Figure 5: the same x_T decoded with DDIM (η = 0) for each S in steps_list; one column per S."""
    T = int(alphas_cumprod.numel())
    x_T, _ = latents_and_noise(range(int(num_samples)), shape, 0, seed)
    cols = [_decode(eps_model, alphas_cumprod, make_timesteps(T, int(S), trajectory), x_T, device, batch_size, kind)
            for S in steps_list]
    imgs = torch.stack(cols, dim=1).flatten(0, 1)  # row = one x_T, columns = S
    path = _save_grid(imgs, Path(out_dir) / "consistency.png", nrow=len(steps_list))
    return {"grid": str(path), "steps": [int(s) for s in steps_list], "num_images": int(imgs.shape[0])}


def samples_task(images: torch.Tensor, *, out_dir: Path, nrow: int | None = None, save_npz: bool = False) -> dict:
    """A grid PNG of generated uint8 images and optionally all of them as ``samples.npz`` (``arr_0``, NHWC)."""
    import numpy as np

    out_dir = Path(out_dir)
    nrow = nrow or int(math.ceil(math.sqrt(images.shape[0])))
    res = {"grid": str(_save_grid(images, out_dir / "samples.png", nrow=nrow)), "num_images": int(images.shape[0])}
    if save_npz:
        path = out_dir / "samples.npz"
        np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())
        res["npz"] = str(path)
    return res

