#!/usr/bin/env python
"""DDIM sampling throughput: the presets of ``ddim.accel.prepare_for_inference`` against plain fp32 eager.

Every preset samples the same x_T (batch B, S steps, η = 0 by default) from the same network; the first row is the
fp32 eager baseline (the official code's path: fp32 weights, NCHW, PyTorch's default TF32 convolutions) and every
row states its images/s over the baseline's, its peak memory (the warm-up's, which holds compilation, apart) and
how far its images are from the baseline's in 8-bit levels.

    python bench/sampling.py                                   # GPU: B = 512, S = 50; fp32, bf16 (+ fp8 where supported)
    python bench/sampling.py --ckpt outputs/train/.../last.ckpt  # a train.py checkpoint instead of random weights
    python bench/sampling.py --tiny --device cpu               # a CPU smoke run (seconds)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import (add_ratios, command_line, default_device, device_info, format_table, peak_memory_gib,
                     reset_peak_memory, synchronize, timed, unet_config, write_json)
from ddim.accel import INFERENCE_PRESETS, fp8_supported, prepare_for_inference
from ddim.checkpoints import load_for_sampling
from ddim.diffusion import alphas_cumprod, beta_schedule, sample, timesteps
from ddim.models import UNet

PRESETS = ("fp32", *INFERENCE_PRESETS)
LEVEL = 2.0 / 255.0  # one 8-bit level in [-1, 1] image units


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net at 16x16, B = 4, S = 4 (CPU smoke run)")
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint (EMA weights) instead of a random CIFAR-10 U-Net")
    p.add_argument("--presets", default=None,
                   help=f"comma list from {list(PRESETS)}; fp32 always runs first as the baseline "
                        "(default: fp32,bf16 and fp8 on a GPU that supports it)")
    p.add_argument("--batch", type=int, default=None, help="images per batch B (512; tiny: 4)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps S, linear trajectory (50; tiny: 4)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per preset, median reported (3; tiny: 1)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="presets without torch.compile (default: compiled where the weights are on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the record here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.presets is None:
        a.presets = ["bf16", "fp8"] if device.type == "cuda" and fp8_supported(device) else ["bf16"]
    else:
        a.presets = [name for name in a.presets.split(",") if name]
        unknown = [name for name in a.presets if name not in PRESETS]
        if unknown:
            p.error(f"unknown preset(s) {unknown}; allowed: {list(PRESETS)}")
        # (a CPU under Triton's interpreter runs fp8, very slowly: only when asked for)
        if "fp8" in a.presets and not fp8_supported(device):
            p.error(f"preset fp8 needs a GPU with FP8 matrix units (Ada, Hopper or later); {a.device} has none")
    a.presets = ["fp32", *[name for name in a.presets if name != "fp32"]]
    a.batch = a.batch or (4 if a.tiny else 512)
    a.steps = a.steps or (4 if a.tiny else 50)
    a.repeats = a.repeats or (1 if a.tiny else 3)
    if a.batch < 1 or a.steps < 1 or a.repeats < 1 or a.eta < 0:
        p.error(f"--batch, --steps and --repeats must be >= 1 and --eta >= 0, got {a.batch}, {a.steps}, {a.repeats}, "
                f"{a.eta}")
    return a


def build(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """(fp32 ε-model in eval mode, ᾱ, description): the checkpoint's EMA network, or a seeded random U-Net."""
    if args.ckpt:
        model, ac, cfg = load_for_sampling(args.ckpt, map_location="cpu")
        shape = (cfg["model"]["in_channels"], cfg["model"]["resolution"], cfg["model"]["resolution"])
        return model.to(device).eval(), ac, dict(ckpt=args.ckpt, shape=shape)
    config = unet_config(args.tiny)
    torch.manual_seed(args.seed)
    model = UNet(**config).to(device).eval()
    shape = (config["in_channels"], config["resolution"], config["resolution"])
    return model, alphas_cumprod(beta_schedule("linear", 1000)), dict(unet=config, shape=shape)


def run_preset(name: str, model: torch.nn.Module, x_T: torch.Tensor, ac: torch.Tensor, seq: torch.Tensor,
               args: argparse.Namespace) -> dict:
    """One preset's row: warm-up (compilation) apart, then ``args.repeats`` timed runs of the whole sampling loop."""
    device = x_T.device
    eps = model if name == "fp32" else prepare_for_inference(model, name, compile=args.compile)
    reset_peak_memory(device)
    start = time.perf_counter()
    with torch.no_grad():
        sample(eps, x_T, ac, seq[: min(len(seq), 5)], eta=args.eta)  # compilation, cuDNN's algorithm search
    synchronize(device)
    warmup_s, warmup_peak = time.perf_counter() - start, peak_memory_gib(device)
    reset_peak_memory(device)
    out = {}

    def run() -> None:
        with torch.no_grad():
            out["x0"] = sample(eps, x_T, ac, seq, eta=args.eta, generator=torch.Generator(device).manual_seed(1))

    seconds = timed(run, device, args.repeats)
    median = statistics.median(seconds)
    return dict(preset=name, images_per_s=len(x_T) / median, seconds=seconds, seconds_median=median,
                warmup_s=warmup_s, peak_mem_gib=peak_memory_gib(device), warmup_peak_mem_gib=warmup_peak,
                nonfinite=int((~torch.isfinite(out["x0"])).sum()), images=out["x0"].float().clamp(-1, 1).cpu())


def compare_images(rows: list[dict]) -> None:
    """Each row's distance to the baseline's images from the same x_T, in 8-bit levels (mean, 99th percentile,
    max); the images leave the rows (they do not go into the record)."""
    ref = rows[0]["images"]
    for row in rows:
        diff = (row.pop("images") - ref).abs().flatten() / LEVEL
        row.update(mean_levels=diff.mean().item(), p99_levels=torch.quantile(diff[: 2**24].double(), 0.99).item(),
                   max_levels=diff.max().item())


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model, ac, model_info = build(args, device)
    seq = timesteps(len(ac), args.steps, "linear")
    x_T = torch.randn(args.batch, *model_info["shape"], generator=torch.Generator().manual_seed(args.seed)).to(device)
    rows = [run_preset(name, model, x_T, ac, seq, args) for name in args.presets]
    compare_images(rows)
    add_ratios(rows, "images_per_s")
    info = device_info(device)
    record = dict(benchmark="sampling", command=command_line("sampling.py", argv), batch=args.batch,
                  steps=args.steps, nfe=len(seq), eta=args.eta, model={k: str(v) for k, v in model_info.items()},
                  machine=info, rows=rows)
    print(f"# DDIM sampling on {info.get('gpu') or 'CPU'}: batch {args.batch}, S = {args.steps} ({len(seq)} network "
          f"evaluations), eta = {args.eta}; ratio = images/s over fp32 eager in this run")
    print(format_table(rows, [("preset", "preset", ""), ("images_per_s", "images/s", ".1f"), ("ratio", "x fp32", ".2f"),
                              ("peak_mem_gib", "peak GiB", ".2f"), ("warmup_peak_mem_gib", "warm-up peak GiB", ".2f"),
                              ("warmup_s", "warm-up s", ".1f"), ("mean_levels", "mean |d| (levels)", ".2f"),
                              ("p99_levels", "p99 |d|", ".1f"), ("max_levels", "max |d|", ".1f")]))
    write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
