#!/usr/bin/env python
"""Training-step throughput of the CIFAR-10 U-Net with the official recipe (batch 128, Adam 2e-4,
gradient clip 1.0, EMA 0.9999, antithetic t): fast path vs the plain fp32 eager path.

Per variant: iterations/s (median over timed windows), achieved TFLOP/s (forward + backward FLOPs from
FlopCounterMode; the optimizer, clip and EMA are not counted), share of the measured bf16 matmul peak,
peak GPU memory, and whether a step ran with no host synchronisation (checked with
``torch.cuda.set_sync_debug_mode("error")`` on one step after warm-up). Inputs are random images
already on the device: the data loader is not part of the step.

    python bench/training.py                        # GPU: batch 128
    python bench/training.py --tiny --device cpu    # seconds on a CPU (CI smoke test)
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule
from ddim.models import UNet, unet_kwargs_from_config

CIFAR10 = unet_kwargs_from_config("cifar10")  # the official DDIM/DDPM CIFAR-10 U-Net
TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            dropout=0.1, in_channels=3, resolution=16, resamp_with_conv=True)

# name -> DiffusionTrainStep kwargs
VARIANTS: dict[str, dict] = {
    "fp32": dict(fast=False),
    "fast": dict(fast=True, dtype="bf16", group_norm="torch"),
    "fast-cudagraphs": dict(fast=True, dtype="bf16", compile_mode="reduce-overhead", group_norm="torch"),
    "fast-cudagraphs-gn": dict(fast=True, dtype="bf16", compile_mode="reduce-overhead", group_norm="channel-stats"),
    "fast-gn": dict(fast=True, dtype="bf16", group_norm="channel-stats"),
    # + the upsampling convolutions on the low-resolution input (ddim.accel.inference.PhaseUpsample); TFLOP/s columns
    # count the official network's FLOPs
    "fast-cudagraphs-gn-phase": dict(fast=True, dtype="bf16", compile_mode="reduce-overhead",
                                     group_norm="channel-stats", upsample="phases"),
    # train.py's fast.step_graph: loss, backward and clipping as one CUDA graph (ddim.accel.inference.GradientGraph), then
    # fused Adam and the EMA
    "fast-step-graph-gn-phase": dict(fast=True, dtype="bf16", group_norm="channel-stats", upsample="phases",
                                     step_graph=True),
    "fast-max": dict(fast=True, dtype="bf16", compile_mode="max-autotune-no-cudagraphs", group_norm="torch"),
    "bf16-eager": dict(fast=True, dtype="bf16", compile=False),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net at 16x16, batch 4 (CPU smoke test)")
    p.add_argument("--batch", type=int, default=None, help="batch size (128; tiny: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (50; tiny: 3)")
    p.add_argument("--windows", type=int, default=3, help="timed windows per variant (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation, autotuning; 5; tiny: 1)")
    p.add_argument("--variants", default="fp32,fast", help=f"comma list from {list(VARIANTS)}; the first is the reference")
    p.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' for cheap CPU tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    for name in a.variants.split(","):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; allowed: {list(VARIANTS)}")
    a.batch = a.batch or (4 if a.tiny else 128)
    a.steps = a.steps or (3 if a.tiny else 50)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 5)
    if a.batch < 2 or a.steps < 1 or a.windows < 1:
        p.error("--batch must be >= 2, --steps and --windows >= 1")
    return a


def check_sync_free(step, x0, device) -> bool | None:
    """True if one step runs with no host synchronisation (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x0)
        ok = True
    except RuntimeError as e:
        print(f"  host sync in step: {str(e).splitlines()[0]}")
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return ok


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    flags = perf.backend_flags()
    config = TINY if args.tiny else CIFAR10
    torch.manual_seed(args.seed)
    base = UNet(**config).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    res = config["resolution"]

    counter_step = perf.DiffusionTrainStep(copy.deepcopy(base), ac, fast=False)
    x1 = torch.randn(1 * 2, 3, res, res, device=device)
    flops_step = perf.count_flops(lambda: counter_step._loss(x1, counter_step.sample_t(2, device),
                                                             torch.randn_like(x1)).backward()) / 2
    del counter_step
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    batches = [torch.randn(args.batch, 3, res, res, generator=gen).clamp(-1, 1).to(device) for _ in range(4)]
    peak = perf.matmul_tflops(device)

    rows = []
    for name in args.variants.split(","):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        perf.reset_peak_memory(device)
        torch.manual_seed(args.seed)
        # official upsampling order unless the variant names "phases" (the library's compiled default)
        step = perf.DiffusionTrainStep(copy.deepcopy(base), ac, backend=args.backend,
                                       **{"upsample": "nearest", **VARIANTS[name]})
        t0 = time.perf_counter()
        for i in range(args.warmup):
            loss = step(batches[i % 4])
        perf.synchronize(device)
        warmup_s = time.perf_counter() - t0
        sync_free = check_sync_free(step, batches[0], device)
        warmup_peak = perf.peak_memory_gib(device)  # compilation and cuDNN's algorithm search kept apart
        perf.reset_peak_memory(device)
        losses = []

        def window():
            for i in range(args.steps):
                losses.append(step(batches[i % 4]))

        times = perf.timed(window, device, args.windows)
        med = statistics.median(times)
        last = torch.stack(losses[-args.steps:]).float().mean().item()
        row = dict(variant=name, config=VARIANTS[name], seconds=times, warmup_s=warmup_s,
                   it_per_s=args.steps / med, tflops=flops_step * args.batch * args.steps / med / 1e12,
                   peak_mem_gib=perf.peak_memory_gib(device), peak_mem_warmup_gib=warmup_peak, sync_free=sync_free,
                   loss=last, loss_finite=bool(torch.isfinite(torch.tensor(last))))
        row["share_of_peak"] = row["tflops"] / peak if peak else None
        rows.append(row)
        del step, losses, loss
    for r in rows:
        r["speedup"] = r["it_per_s"] / rows[0]["it_per_s"]

    info = perf.device_info(device)
    record = dict(benchmark="training", command=" ".join(["python", "bench/training.py", *(argv if argv is not None else sys.argv[1:])]),
                  batch=args.batch, steps_per_window=args.steps, windows=args.windows, params=n_params,
                  gflop_per_step_per_image=flops_step / 1e9, matmul_peak_tflops=peak, flags=flags,
                  recipe=dict(optimizer="Adam", lr=2e-4, betas=(0.9, 0.999), eps=1e-8, grad_clip=1.0, ema=0.9999),
                  unet={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}, machine=info, rows=rows)
    print(f"# DDIM training step, {info.get('gpu') or 'CPU'}: batch {args.batch}; {n_params / 1e6:.2f}M params, "
          f"{flops_step / 1e9:.2f} GFLOP per image (fwd+bwd); measured bf16 matmul peak {peak or float('nan'):.0f} TFLOP/s")
    print(perf.format_table(rows, [("variant", "variant", ""), ("it_per_s", "it/s", ".2f"), ("speedup", "x fp32", ".2f"),
                                   ("tflops", "TFLOP/s", ".1f"), ("share_of_peak", "of peak", ".1%"),
                                   ("peak_mem_gib", "peak GiB", ".2f"),
                                   ("peak_mem_warmup_gib", "warm-up peak GiB", ".2f"), ("warmup_s", "warm-up s", ".1f"),
                                   ("sync_free", "no host sync", ""), ("loss", "loss", ".1f")]))
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
