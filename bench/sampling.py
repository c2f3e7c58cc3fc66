#!/usr/bin/env python
"""DDIM sampling throughput of the CIFAR-10 U-Net: fast path vs the plain fp32 eager path.

Prints, per variant: images/s, achieved TFLOP/s (FLOPs counted with FlopCounterMode, times the S
network evaluations), share of the chip's bf16 peak (measured in the same run with an 8192^3 bf16
matrix product; the H100/H200 datasheet figure is ~990 dense, ~790 is what products reach), peak
GPU memory, and how far each variant's samples are from the first (fp32) variant's, from the same
noise x_T: max / mean / 99th-percentile absolute difference in [-1, 1] image units after the final
clamp, against a stated tolerance.

    python bench/sampling.py                       # GPU: batch 512, S = 50, eta = 0
    python bench/sampling.py --tiny --device cpu   # seconds on a CPU (CI smoke test)
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule, sample, timesteps
from ddim.models import UNet, unet_kwargs_from_config

CIFAR10 = unet_kwargs_from_config("cifar10")  # the official DDIM/DDPM CIFAR-10 U-Net
TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            dropout=0.0, in_channels=3, resolution=16, resamp_with_conv=True)

# name -> prepare_for_inference kwargs; None = the model itself, fp32, eager, NCHW, PyTorch's default
# precision flags (cuDNN convolutions may use TF32, as in the official code's runs); "fp32-strict" turns
# TF32 off everywhere: the numerics reference.
VARIANTS: dict[str, dict | None] = {
    "fp32": None,
    "fp32-strict": None,
    "bf16-eager": dict(dtype="bf16", channels_last=True, compile=False),
    "fast": dict(dtype="bf16", channels_last=True, compile=True, group_norm="torch"),
    "fast-max": dict(dtype="bf16", channels_last=True, compile=True, group_norm="torch",
                     compile_mode="max-autotune-no-cudagraphs"),
    "fp16": dict(dtype="fp16", channels_last=True, compile=True, group_norm="torch"),
    # weights cast to bf16 once (no per-call autocast casts; GroupNorm/softmax then run in bf16 too)
    "fast-pure": dict(dtype="bf16", autocast=False, channels_last=True, compile=True, group_norm="torch"),
    # CUDA graphs around each forward (removes launch gaps; matters at small batches)
    "fast-graphs": dict(dtype="bf16", channels_last=True, compile=True, group_norm="torch",
                        compile_mode="reduce-overhead"),
    # Inductor freezing: weights become constants (folded casts, conv weights pre-laid-out)
    "fast-frozen": dict(dtype="bf16", channels_last=True, compile=True, group_norm="torch",
                        options={"freezing": True}),
    "fast-frozen-graphs": dict(dtype="bf16", channels_last=True, compile=True, group_norm="torch",
                               options={"freezing": True, "triton.cudagraphs": True}),
    "pure-frozen-graphs": dict(dtype="bf16", autocast=False, channels_last=True, compile=True, group_norm="torch",
                               options={"freezing": True, "triton.cudagraphs": True}),
    # GroupNorm statistics per channel, pooled per group (ddim.accel.inference.ChannelStatGroupNorm; the default of
    # prepare_for_inference when compiling)
    "fast-gn": dict(dtype="bf16", channels_last=True, compile=True, group_norm="channel-stats"),
    "fast-gn-graphs": dict(dtype="bf16", channels_last=True, compile=True, group_norm="channel-stats",
                           compile_mode="reduce-overhead"),
    "pure-gn-graphs": dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                           group_norm="channel-stats", compile_mode="reduce-overhead"),
    # the same with Inductor's block sizes of the fused element-wise/reduction kernels tuned per kernel
    # (+1.5%, ~4 min more compilation on an H100)
    "pure-gn-tuned": dict(dtype="bf16", autocast=False, channels_last=True, compile=True, group_norm="channel-stats",
                          options={"triton.cudagraphs": True, "max_autotune_pointwise": True,
                                   "coordinate_descent_tuning": True}),
    # the upsampling convolutions on the low-resolution input (ddim.accel.inference.PhaseUpsample: 16/36 of their
    # FLOPs, no upsampled tensor); TFLOP/s columns count the official network's FLOPs
    "fast-gn-phase": dict(dtype="bf16", channels_last=True, compile=True, group_norm="channel-stats",
                          upsample="phases"),
    "pure-gn-graphs-phase": dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                                 group_norm="channel-stats", compile_mode="reduce-overhead", upsample="phases"),
    # GroupNorm+SiLU inside Triton 3x3 convolutions (ddim.accel.conv): no separate normalise pass, but the prologue's
    # 9-fold activation recompute costs more than it saves (342 vs 571 images/s on an H100): kept for kernel work
    "pure-gn-graphs-fused": dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                                 group_norm="channel-stats", compile_mode="reduce-overhead", fused=True),
    "pure-gn-graphs-fused-phase": dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                                       group_norm="channel-stats", compile_mode="reduce-overhead", fused=True,
                                       upsample="phases"),
    # and full max-autotune (Triton convolution templates against cuDNN, CUDA graphs): still compiling
    # after 2.5 min on an H100, never measured
    "pure-gn-max": dict(dtype="bf16", autocast=False, channels_last=True, compile=True, group_norm="channel-stats",
                        compile_mode="max-autotune"),
}
for _kw in VARIANTS.values():  # timed kernel choices, as measured before deterministic mode became the default
    if _kw is not None and _kw.get("compile"):
        _kw.setdefault("deterministic", False)
# what evaluate.py sampler.fast=true ran until the tenth round: fast-gn-phase with kernels chosen without timing, so
# every process (GPU) and every run gives the same images (ddim.accel.inference.prepare_for_inference's deterministic)
VARIANTS["fast-gn-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="channel-stats",
                                     upsample="phases", deterministic=True)
# GroupNorm(+SiLU) as one Triton kernel per sample, its second read of the activation from L2 (ddim.accel.groupnorm):
# a fixed kernel configuration, so deterministic as is; fast-kgn-phase-det is what sampler.fast ran until the
# twelfth round
VARIANTS["fast-kgn-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                      upsample="phases", deterministic=True)
VARIANTS["fast-kgn-phase"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                  upsample="phases", deterministic=False)
VARIANTS["fast-kgn-graphs-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                             compile_mode="reduce-overhead", upsample="phases", deterministic=True)
# Inductor freezing (now effective: prepare_for_inference compiles it under dynamo's prepare_freezing): the weights'
# bf16 casts and the phase kernels computed once at compilation instead of ~120 small kernels per forward
VARIANTS["fast-kgn-frozen-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                             upsample="phases", deterministic=True, options={"freezing": True})
VARIANTS["fast-kgn-frozen-graphs-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True,
                                                    group_norm="kernel", upsample="phases", deterministic=True,
                                                    compile_mode="reduce-overhead", options={"freezing": True})
# Inductor realises a sum used more than once (a block's output: next norm, next residual, skip) instead of
# recomputing it from its addends at each use (CPU IR, batch 8: 46.4 M elements loaded instead of 58.3 M); measured
# 10.6 % SLOWER on an H200 (562.1 vs 628.5 images/s: it breaks the bias-add fusions), kept for the record
VARIANTS["fast-kgn-realize-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                              upsample="phases", deterministic=True,
                                              options={"realize_reads_threshold": 1})
# the first and last convolutions (3 -> 128, 128 -> 3 channels) as matrix products (ddim.accel.inference.conv3x3_as_matmul)
VARIANTS["fast-kgn-thin-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                           upsample="phases", deterministic=True, thin_convs="matmul")
# the convolution and linear weights cast to bf16 once (autocast casts them at every call; same numbers);
# fast-kgn-castw-thin-phase-det is what sampler.fast ran from the twelfth to the twentieth round
VARIANTS["fast-kgn-castw-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True, group_norm="kernel",
                                            upsample="phases", deterministic=True, cast_weights=True)
VARIANTS["fast-kgn-castw-thin-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True,
                                                 group_norm="kernel", upsample="phases", deterministic=True,
                                                 cast_weights=True, thin_convs="matmul")
# the phases interleaved by stacks (a buffer of their own), as every "phase" variant was before the twelfth round;
# since then "phases" interleaves by one strided view that Inductor writes straight into the skip concatenation
VARIANTS["fast-kgn-castw-thin-stacked-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True,
                                                         group_norm="kernel", upsample="phases-stacked",
                                                         deterministic=True, cast_weights=True, thin_convs="matmul")
VARIANTS["fast-kgn-castw-thin-graphs-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True,
                                                        group_norm="kernel", upsample="phases", deterministic=True,
                                                        cast_weights=True, thin_convs="matmul",
                                                        compile_mode="reduce-overhead")
VARIANTS["pure-kgn-graphs-phase"] = dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                                         group_norm="kernel", compile_mode="reduce-overhead", upsample="phases",
                                         deterministic=False)
# weights in bf16 (no autocast), and the same with the ResnetBlocks' convolutions on maps >= 16 pixels wide by
# ddim.accel.conv's band kernel: GroupNorm+SiLU applied once per input element while the convolution loads (no separate
# normalise pass), the second norm's statistics from the first convolution's epilogue: 507 vs 655 images/s on an
# H200 (fourteenth round), kept for kernel work
VARIANTS["pure-kgn-thin-phase-det"] = dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                                           group_norm="kernel", upsample="phases", deterministic=True,
                                           thin_convs="matmul")
VARIANTS["pure-kgn-band-thin-phase-det"] = dict(dtype="bf16", autocast=False, channels_last=True, compile=True,
                                                group_norm="kernel", upsample="phases", deterministic=True,
                                                thin_convs="matmul", fused="band")
# the ResnetBlocks' 3x3 convolutions on e4m3 activations and weights (ddim.accel.fp8): the GroupNorm kernel writes e4m3, a
# Triton convolution multiplies e4m3 at twice the bf16 rate; bias, time embedding and shortcut in its epilogue
VARIANTS["fast-kgn-castw-thin-fp8-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True,
                                                     group_norm="kernel", upsample="phases", deterministic=True,
                                                     cast_weights=True, thin_convs="matmul", fp8=True)
VARIANTS["fast-kgn-castw-thin-fp8-graphs-phase-det"] = dict(dtype="bf16", channels_last=True, compile=True,
                                                            group_norm="kernel", upsample="phases", deterministic=True,
                                                            cast_weights=True, thin_convs="matmul", fp8=True,
                                                            compile_mode="reduce-overhead")
# the same, the blocks on 4x4 maps (fp8w8) or on 4x4 and 8x8 maps (fp8w16) in bf16 with cuDNN
for _w in (8, 16):
    VARIANTS[f"fast-kgn-castw-thin-fp8w{_w}-phase-det"] = dict(VARIANTS["fast-kgn-castw-thin-fp8-phase-det"],
                                                               fp8_min_width=_w)
    VARIANTS[f"fast-kgn-castw-thin-fp8w{_w}-graphs-phase-det"] = dict(
        VARIANTS["fast-kgn-castw-thin-fp8-graphs-phase-det"], fp8_min_width=_w)
# the blocks on 32x32 maps in bf16 (where FP8 costs FID, sixteenth round): fp8max16, FID-neutral (seventeenth)
VARIANTS["fast-kgn-castw-thin-fp8max16-graphs-phase-det"] = dict(VARIANTS["fast-kgn-castw-thin-fp8-graphs-phase-det"],
                                                                 fp8_max_width=16)
# every ResnetBlock's time-embedding projection as one matrix product, q/k/v concatenated once (merge, perf.
# merge_projections): 22 products, their memsets and add kernels fewer per forward of the CIFAR-10 U-Net;
# fast-kgn-castw-thin-mp-phase-det is what sampler.fast runs since the twenty-first round
VARIANTS["fast-kgn-castw-thin-mp-phase-det"] = dict(VARIANTS["fast-kgn-castw-thin-phase-det"], merge=True)
VARIANTS["fast-kgn-castw-thin-mp-graphs-phase-det"] = dict(VARIANTS["fast-kgn-castw-thin-graphs-phase-det"],
                                                           merge=True)
VARIANTS["fast-kgn-castw-thin-fp8max16-mp-graphs-phase-det"] = dict(
    VARIANTS["fast-kgn-castw-thin-fp8max16-graphs-phase-det"], merge=True)
for _kw in VARIANTS.values():  # as measured before the thin convolutions, the cast weights and the merged
    if _kw is not None:        # projections became the default
        _kw.setdefault("thin_convs", "cudnn")
        _kw.setdefault("cast_weights", False)
        _kw.setdefault("merge", False)

LEVEL = 2.0 / 255.0  # one 8-bit level in [-1, 1] units


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net at 16x16, batch 4, S = 3 (CPU smoke test)")
    p.add_argument("--batch", type=int, default=None, help="images per sampling call (512; tiny: 4)")
    p.add_argument("--steps", type=int, default=None, help="S, number of sampling steps (50; tiny: 3)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--variants", default="fp32,fast", help=f"comma list from {list(VARIANTS)}; the first is the reference")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per variant (median reported)")
    p.add_argument("--ckpt", default=None, help="Lightning checkpoint to sample (ddim.training.module.load_for_sampling) or "
                   "scripts/cifar10_gpu.py's ckpt.pt or ema.pt; default: random init")
    p.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' for cheap CPU tests)")
    p.add_argument("--tol-mean", type=float, default=1 * LEVEL, help="allowed mean |diff| vs reference (default one 8-bit level)")
    p.add_argument("--tol-p99", type=float, default=4 * LEVEL, help="allowed 99th-percentile |diff| (default four 8-bit levels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full record here")
    a = p.parse_args(argv)
    for name in a.variants.split(","):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; allowed: {list(VARIANTS)}")
    a.batch = a.batch or (4 if a.tiny else 512)
    a.steps = a.steps or (3 if a.tiny else 50)
    if a.batch < 1 or a.steps < 1 or a.repeats < 1:
        p.error("--batch, --steps and --repeats must be >= 1")
    return a


def build(args, device):
    if args.ckpt and args.ckpt.endswith(".pt"):  # scripts/cifar10_gpu.py's checkpoint: U-Net config + EMA weights
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from cifar10_gpu import load_ema_unet

        model, ck = load_ema_unet(args.ckpt)
        return (model.to(device), make_alphas_cumprod(beta_schedule("linear", T=1000)),
                {"ckpt": args.ckpt, "train_steps": ck["steps"]})
    if args.ckpt:
        from ddim.checkpoints import load_for_sampling

        model, ac, cfg = load_for_sampling(args.ckpt, use_ema=True, map_location="cpu")
        return model.to(device).eval(), ac, {"ckpt": args.ckpt}
    torch.manual_seed(args.seed)
    config = TINY if args.tiny else CIFAR10
    model = UNet(**config).to(device).eval()
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    return model, ac, {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the official main.py
    flags = perf.backend_flags()
    model, ac, model_info = build(args, device)
    res = model_info.get("unet", {}).get("resolution") or getattr(model, "resolution", 32)
    channels = getattr(model, "in_channels", 3)  # a --ckpt model may be grey-scale (digits)
    n_params = sum(p.numel() for p in model.parameters())
    ts = timesteps(len(ac), args.steps, "linear")
    nfe = len(ts)

    with torch.no_grad():
        x1 = torch.randn(1, channels, res, res, device=device)
        t1 = torch.zeros(1, dtype=torch.long, device=device)
        flops_fwd = perf.count_flops(lambda: model(x1, t1))
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x_T = torch.randn(args.batch, channels, res, res, generator=gen).to(device)
    peak = perf.matmul_tflops(device)

    rows, ref = [], None
    for name in args.variants.split(","):
        kw = VARIANTS[name]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        perf.reset_peak_memory(device)
        try:
            row = run_variant(name, kw, model, x_T, ac, ts, args, device, flops_fwd, nfe, peak, flags)
        except Exception as e:  # noqa: BLE001 - record the failure, measure the other variants
            print(f"variant {name} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:2000]}"))
            continue
        img = row.pop("_img")
        if ref is None:
            ref = img
        else:
            d = (img - ref).abs().flatten()
            q = torch.quantile(d[: 2**24].double(), 0.99).item()
            u8 = lambda z: ((z + 1) * 127.5).round()  # noqa: E731
            row.update(diff_max=d.max().item(), diff_mean=d.mean().item(), diff_p99=q,
                       u8_changed=(u8(img) != u8(ref)).float().mean().item(),
                       within_tol=bool(d.mean().item() <= args.tol_mean and q <= args.tol_p99))
        rows.append(row)
        print(f"  {name}: {row['images_per_s']:.1f} images/s, {row['tflops']:.1f} TFLOP/s, warm-up {row['warmup_s']:.1f}s, "
              f"graphs compiled {row['graphs_warmup']} + {row['graphs_timed']} in the timed runs", flush=True)
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"]
    ok = [r for r in rows if "error" not in r]
    base = ok[0]["images_per_s"] if ok else float("nan")
    for r in ok:
        r["speedup"] = r["images_per_s"] / base
    return _report(args, argv, rows, flops_fwd, nfe, n_params, peak, flags, model_info, device)


def dynamo_graphs() -> int:
    """Graphs torch.compile (Dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def run_variant(name, kw, model, x_T, ac, ts, args, device, flops_fwd, nfe, peak, flags) -> dict:
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"] and name != "fp32-strict"
    torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"] and name != "fp32-strict"
    # variants run the official upsampling order unless they name "phases" (the library's compiled default)
    eps = model if kw is None else perf.prepare_for_inference(model, backend=args.backend,
                                                             **{"upsample": "nearest", **kw})

    def run(S=None):
        seq = ts if S is None else timesteps(len(ac), S, "linear")
        with torch.no_grad():
            return sample(eps, x_T, ac, seq, eta=args.eta)

    graphs0 = dynamo_graphs()
    t0 = time.perf_counter()
    run(S=min(args.steps, 5))  # warm-up: compilation, cuDNN autotuning
    perf.synchronize(device)
    warmup_s = time.perf_counter() - t0
    graphs1 = dynamo_graphs()
    # peak memory of sampling itself: the warm-up's (compilation, cuDNN's algorithm search, whose workspaces only the
    # first variant of a run to meet a shape pays) is kept apart, else the run order decides the figure
    warmup_peak = perf.peak_memory_gib(device)
    perf.reset_peak_memory(device)
    out = {}

    def timed_run():
        out["x0"] = run()

    times = perf.timed(timed_run, device, args.repeats)
    # graphs torch.compile made in the warm-up (1 when all goes well) and in the timed runs (0): recompilations
    # mean a guard fails from step to step, and past Dynamo's limit the network quietly runs eagerly
    graphs = dict(graphs_warmup=graphs1 - graphs0, graphs_timed=dynamo_graphs() - graphs1)
    med = statistics.median(times)
    row = dict(variant=name, config=kw or {"dtype": "fp32", "channels_last": False, "compile": False,
                                           "flags": perf.backend_flags()},
               seconds=times, seconds_median=med, warmup_s=warmup_s,
               images_per_s=args.batch / med, tflops=flops_fwd * args.batch * nfe / med / 1e12,
               peak_mem_gib=perf.peak_memory_gib(device), peak_mem_warmup_gib=warmup_peak,
               nonfinite=int((~torch.isfinite(out["x0"])).sum()), **graphs)
    row["share_of_peak"] = row["tflops"] / peak if peak else None
    row["_img"] = out["x0"].float().clamp(-1, 1).cpu()
    return row


def _report(args, argv, rows, flops_fwd, nfe, n_params, peak, flags, model_info, device) -> dict:
    record = dict(benchmark="sampling", command=" ".join(["python", "bench/sampling.py", *(argv if argv is not None else sys.argv[1:])]),
                  batch=args.batch, steps=args.steps, nfe=nfe, eta=args.eta, params=n_params,
                  gflop_per_forward=flops_fwd / 1e9, matmul_peak_tflops=peak, flags=flags,
                  tolerance=dict(mean=args.tol_mean, p99=args.tol_p99, units="[-1,1] image units after clamp"),
                  model=model_info, machine=perf.device_info(device), rows=rows)
    print(f"# DDIM sampling, {perf.device_info(device).get('gpu') or 'CPU'}: batch {args.batch}, S = {args.steps} "
          f"({nfe} forwards), eta = {args.eta}; {n_params / 1e6:.2f}M params, {flops_fwd / 1e9:.2f} GFLOP/forward; "
          f"measured bf16 matmul peak {peak or float('nan'):.0f} TFLOP/s")
    print(perf.format_table(rows, [("variant", "variant", ""), ("images_per_s", "images/s", ".1f"),
                                   ("speedup", "x fp32", ".2f"), ("tflops", "TFLOP/s", ".1f"),
                                   ("share_of_peak", "of peak", ".1%"), ("peak_mem_gib", "peak GiB", ".2f"),
                                   ("peak_mem_warmup_gib", "warm-up peak GiB", ".2f"),
                                   ("warmup_s", "warm-up s", ".1f"), ("diff_mean", "mean |d|", ".2e"),
                                   ("diff_p99", "p99 |d|", ".2e"), ("diff_max", "max |d|", ".2e"),
                                   ("u8_changed", "u8 px changed", ".2%"), ("within_tol", "within tol", ""),
                                   ("graphs_timed", "recompiled", "")]))
    print(f"tolerance vs {rows[0]['variant']}: mean |d| <= {args.tol_mean:.4f}, p99 |d| <= {args.tol_p99:.4f} "
          f"([-1,1] units; one 8-bit level = {LEVEL:.4f})")
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
