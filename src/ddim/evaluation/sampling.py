"""Sampling for evaluation: per-index noise, one batch, and ``generate`` (many samples over all devices).

Determinism across device counts: sample ``i`` draws its x_T and all its per-step noise from its own
``torch.Generator`` seeded by a hash of ``(seed, i)``, and is always computed in batch ``i // batch_size``
(whole batches, not single indices, are spread over the ranks), so for a given ``batch_size`` the image for
index ``i`` does not depend on the number of GPUs or which rank produced it, bit for bit, even where the
kernels' sums depend on the batch (GPU kernels are chosen per shape; bf16).  Sampling runs through
Lightning's ``Trainer.predict`` over the batches (DDP on several GPUs); every rank writes a shard and rank 0
merges them by index.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddim.diffusion import sample
from ddim.diffusion.solvers import solve
from ddim.evaluation.images import to_uint8


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


def sample_batch(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, x_T: torch.Tensor, *,
                 eta: float | str = 0.0, noise: torch.Tensor | None = None, kind: str = "ddim") -> torch.Tensor:
    """x_0 in [-1, 1] from x_T with the DDIM family (``kind="ddim"``) or a higher-order ODE solver."""
    if kind != "ddim":
        return solve(kind, eps_model, x_T, alphas_cumprod, seq)
    return sample(eps_model, x_T, alphas_cumprod, seq, eta=eta, noise=noise if eta != 0.0 else None)


@torch.no_grad()
def decode(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, x_T: torch.Tensor, *,
           device: str, batch_size: int, kind: str = "ddim") -> torch.Tensor:
    """uint8 images from the given x_T with the deterministic sampler (η = 0), in batches on one device."""
    ac, seq = alphas_cumprod.to(device), seq.to(device)
    outs = [to_uint8(sample_batch(eps_model, ac, seq, xb.to(device), eta=0.0, kind=kind)).cpu()
            for xb in x_T.split(int(batch_size))]
    return torch.cat(outs)


class IndexBatches(Dataset):
    """Batch ``b`` holds samples ``b * batch_size`` .. ``(b + 1) * batch_size - 1``: the unit ``Trainer.predict``
    spreads over ranks (batch ``b`` on rank ``b % W``).

    Sharding single indices instead (Lightning's default for a batched loader: rank ``r`` takes ``r, r + W, ...``)
    puts a sample at another place in another batch on each GPU count, and GPU kernels do not compute every
    place alike, so the same x_T gave different images on one and two GPUs.

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


def only_item(items: list) -> Any:
    """Collate for loader batches of one ``IndexBatches`` item."""
    return items[0]


def sample_loader(n: int, batch_size: int, world_size: int = 1) -> DataLoader:
    """The loader ``generate`` predicts over: one item per batch of indices (``IndexBatches``); loader batches of
    one such item, so Lightning can track which went where."""
    return DataLoader(IndexBatches(n, batch_size, min_batches=world_size), batch_size=1, shuffle=False,
                      collate_fn=only_item)


class SamplingModule(L.LightningModule):
    """predict_step: indices -> (indices, uint8 images); the noise comes from the indices alone."""

    def __init__(self, eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, shape: Sequence[int], *,
                 eta: float | str, kind: str, seed: int):
        super().__init__()
        self.eps_model = eps_model
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)
        self.register_buffer("seq", seq.clone(), persistent=False)
        self.shape, self.eta, self.kind, self.seed = tuple(shape), eta, kind, int(seed)

    @torch.no_grad()
    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0):
        idx = batch.long().cpu()
        n_noise = 0 if (self.kind != "ddim" or self.eta == 0.0) else int(self.seq.numel())
        x_T, noise = latents_and_noise(idx.tolist(), self.shape, n_noise, self.seed)
        x_T = x_T.to(self.device)
        noise = noise.to(self.device) if noise is not None else None
        x0 = sample_batch(self.eps_model, self.alphas_cumprod, self.seq, x_T, eta=self.eta, noise=noise, kind=self.kind)
        return idx, to_uint8(x0).cpu()


def shard_name(rank: int, world_size: int) -> str:
    return f"rank{rank:04d}-of-{world_size:04d}.pt"


class ShardWriter(BasePredictionWriter):
    """Each rank's (indices, images) and its batches' end times into ``shard_dir`` at the end of predict."""

    def __init__(self, shard_dir: Path, shape: Sequence[int]):
        super().__init__(write_interval="epoch")
        self.shard_dir, self.shape = Path(shard_dir), tuple(shape)
        self.t0, self.ends = 0.0, []

    def on_predict_epoch_start(self, trainer, pl_module):
        self.t0, self.ends = time.perf_counter(), []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # the images are on the host by now (predict_step's .cpu() waits for the device)
        self.ends.append((time.perf_counter() - self.t0, int(outputs[1].shape[0])))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        preds = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        idx = torch.cat([p[0] for p in preds]) if preds else torch.empty(0, dtype=torch.long)
        imgs = torch.cat([p[1] for p in preds]) if preds else torch.empty(0, *self.shape, dtype=torch.uint8)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"index": idx, "images": imgs, "batch_ends": self.ends},
                   self.shard_dir / shard_name(trainer.global_rank, trainer.world_size))


def merge_shards(shard_dir: Path, world_size: int, n: int, shape: Sequence[int]
                 ) -> tuple[torch.Tensor, list[list[tuple[float, int]]]]:
    """The ranks' shards of this run (exactly its world size: a stale shard of another run is never merged) as
    uint8 (n, *shape) by index, and each rank's batch end times; the shards are deleted, and their folder when empty
    (a run folder keeps no empty ``shards/``)."""
    out = torch.empty((n, *shape), dtype=torch.uint8)
    seen = torch.zeros(n, dtype=torch.bool)
    shards = [Path(shard_dir) / shard_name(r, world_size) for r in range(world_size)]
    ends = []
    for p in shards:
        d = torch.load(p, weights_only=True)
        out[d["index"]] = d["images"]
        seen[d["index"]] = True
        ends.append(d.get("batch_ends") or [])
    for p in shards:
        p.unlink()
    with contextlib.suppress(OSError):  # left in place only when it holds something else
        Path(shard_dir).rmdir()
    if not bool(seen.all()):
        raise RuntimeError(f"sampling shards in {shard_dir} miss {int((~seen).sum())} of {n} indices")
    return out, ends


def generate(eps_model: nn.Module, alphas_cumprod: torch.Tensor, seq: torch.Tensor, n: int, shape: Sequence[int], *,
             eta: float | str = 0.0, kind: str = "ddim", seed: int = 0, batch_size: int = 500,
             shard_dir: str | Path, trainer_kwargs: dict | None = None,
             stats: dict | None = None) -> torch.Tensor | None:
    """Samples 0..n-1 as uint8 (n, C, H, W) on rank 0 (None on other ranks), spread over all devices.

    ``stats`` (rank 0) receives ``world_size``, ``first_batch_s`` (the slowest rank's first batch: compilation and
    warm-up) and ``images_per_s``: the ranks' summed rate after their first batch, so the GPU-count scaling of
    sampling can be read off evaluate.py's own records (None when a rank ran a single batch)."""
    kw = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_model_summary": False, "enable_progress_bar": False}
    kw.update(trainer_kwargs or {})
    trainer = L.Trainer(callbacks=[ShardWriter(Path(shard_dir), shape)], **kw)
    loader = sample_loader(n, batch_size, world_size=trainer.world_size)
    module = SamplingModule(eps_model, alphas_cumprod, seq, shape, eta=eta, kind=kind, seed=seed)
    with warnings.catch_warnings():  # the loader only hands out index batches: workers would not help
        warnings.filterwarnings("ignore", message=r"The 'predict_dataloader' does not have many workers")
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    out, ends = merge_shards(Path(shard_dir), trainer.world_size, n, shape)
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
