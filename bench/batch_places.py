#!/usr/bin/env python
"""Does a sample's image depend on where in which batch it is computed?

Samples the same x_T (``ddim.evaluation.tasks.latents_and_noise``, as evaluate.py) grouped into batches four ways and
counts the images that differ from the one-GPU grouping (batches of consecutive indices):
- the index shards that Lightning's distributed sampler made on 2 ranks (rank r: r, r + 2, ...), then batched;
- the same batches in another order (a rerun: must be identical);
- another batch size;
- and ``ddim.evaluation.tasks.generate`` (Trainer.predict over whole batches, what evaluate.py runs).
Each for the fp32 eager network and the fast path (``sampler.fast``: bf16, compiled deterministic on CUDA).
Motivation and the H200 figures: docs/results/bench/README.md, sixth round.

    python bench/batch_places.py --json out.json              # GPU: CIFAR-10 U-Net, 1,024 samples, S = 20
    python bench/batch_places.py --tiny --device cpu          # seconds on a CPU (CI smoke test)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule, timesteps
from ddim.evaluation.tasks import generate, latents_and_noise, sample_batch, to_uint8
from ddim.models import UNet, unet_kwargs_from_config

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
            in_channels=3, resolution=16, resamp_with_conv=True)


def consecutive(n: int, bs: int) -> list[list[int]]:
    return [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]


def index_shards(n: int, bs: int, world: int = 2) -> list[list[int]]:
    """Lightning's default sharding of a batched index loader: rank r takes r, r + W, ..., then batches."""
    out = []
    for r in range(world):
        mine = list(range(r, n, world))
        out += [mine[s:s + bs] for s in range(0, len(mine), bs)]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net at 16x16, 24 samples, S = 2")
    p.add_argument("--samples", type=int, default=None, help="(1024; tiny: 24)")
    p.add_argument("--batch", type=int, default=None, help="the one-GPU batch size (512; tiny: 8)")
    p.add_argument("--other-batch", type=int, default=None, help="the other batch size (500; tiny: 6)")
    p.add_argument("--steps", type=int, default=None, help="S (20; tiny: 2)")
    p.add_argument("--backend", default=None, help="torch.compile backend of the fast path (inductor; CPU: eager)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    n = a.samples or (24 if a.tiny else 1024)
    b1, b2 = a.batch or (8 if a.tiny else 512), a.other_batch or (6 if a.tiny else 500)
    for name, v in (("--samples", n), ("--batch", b1), ("--other-batch", b2)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = TINY if a.tiny else unet_kwargs_from_config("cifar10")
    shape = (cfg["in_channels"], cfg["resolution"], cfg["resolution"])
    net = UNet(**cfg).to(dev).eval()
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000)).to(dev)
    seq = timesteps(1000, a.steps or (2 if a.tiny else 20), kind="quadratic")
    x_all, _ = latents_and_noise(range(n), shape, 0, 0)
    cuda = dev.type == "cuda"

    def run(model, groups) -> torch.Tensor:
        img = torch.empty(n, *shape, dtype=torch.uint8)
        for g in groups:
            with torch.no_grad():
                img[g] = to_uint8(sample_batch(model, ac, seq, x_all[g].to(dev))).cpu()
        return img

    res: dict = {"device": perf.device_info(dev), "samples": n, "batch": b1, "other_batch": b2,
                 "steps": len(seq), "comparisons": {}}

    def compare(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        d = (x.int() - y.int()).abs().flatten(1).amax(1)
        row = {"images_differ": int((d > 0).sum()), "max_u8": int(d.max()), "first": torch.nonzero(d).flatten()[:40].tolist()}
        res["comparisons"][name] = row
        print(f"{name}: {row['images_differ']} of {n} images differ, max {row['max_u8']}/255", flush=True)

    paths = {"fp32 eager": net,
             "fast": perf.prepare_for_inference(net, dtype="bf16", compile=True,
                                                   backend=a.backend or ("inductor" if cuda else "eager"))}
    for label, model in paths.items():
        t0 = time.time()
        one = run(model, consecutive(n, b1))
        compare(f"{label}: 2-rank index shards vs 1 GPU, batch {b1}", one, run(model, index_shards(n, b1)))
        compare(f"{label}: the same batches in reverse order (rerun)", one, run(model, consecutive(n, b1)[::-1]))
        other = run(model, consecutive(n, b2))
        compare(f"{label}: batch {b2} vs batch {b1}", other, one)
        with tempfile.TemporaryDirectory() as tmp:
            got = generate(model, ac.cpu(), seq, n, shape, batch_size=b1, shard_dir=tmp,
                           trainer_kwargs={"accelerator": "gpu" if cuda else "cpu", "devices": 1,
                                           "enable_progress_bar": False})
        compare(f"{label}: generate() (Trainer.predict over whole batches) vs batch {b1} by hand", got, one)
        print(f"{label}: {time.time() - t0:.0f}s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
