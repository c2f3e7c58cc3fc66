#!/usr/bin/env python
"""Where the GPU time of a sampling forward or a training step goes, by kernel and by kind of kernel.

The throughput benchmarks say how fast; this says why: it runs the chosen path a few times under
``torch.profiler`` and prints the device time per kind of kernel (convolution, matrix product,
attention, Triton-generated fused element-wise/normalisation kernels, copies, other), the top
kernels, and how busy the device was over the wall time (a low share means launch gaps: the host,
not the GPU, sets the pace).

    python bench/kernels.py --what sampling --variant fast        # GPU: batch 512, one forward per step
    python bench/kernels.py --what training --variant fast        # GPU: batch 128, one optimiser step
    python bench/kernels.py --loop --iters 50 --variant fast-kgn-phase-det   # GPU: one S = 50 sampling loop
    python bench/kernels.py --tiny --device cpu --backend eager   # CPU smoke test
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict

import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule, sample, timesteps
from ddim.models import UNet

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sampling import CIFAR10, TINY, VARIANTS as SAMPLING_VARIANTS  # noqa: E402
from training import VARIANTS as TRAINING_VARIANTS  # noqa: E402

# Ordered: first match wins. Kernel names of cuDNN / cuBLAS / CUTLASS / flash / Inductor (an fp32 matmul
# shows up as ...gemm_f32f32...ffma: no tensor cores).
KINDS = [
    ("attention", r"flash|fmha|attention|softmax"),
    ("triton: group norm (+ fused element-wise)", r"^triton.*(group_norm|var_mean|rsqrt)|^_group_norm_kernel"),
    ("triton: other fused element-wise", r"^triton"),
    ("convolution", r"fprop|dgrad|wgrad|conv|implicit_gemm|nhwc|winograd"),
    ("matmul", r"gemm|nvjet|cublas|cutlass|matmul"),
    ("normalization (eager)", r"group_norm|groupnorm|layer_norm|batch_norm"),
    ("optimizer", r"adam|foreach|multi_tensor|lerp"),
    ("copy / layout", r"copy|transpose|cat|memcpy|memset|fill|permute"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["sampling", "training"], default="sampling")
    p.add_argument("--variant", default="fast", help=f"sampling: {list(SAMPLING_VARIANTS)}; training: {list(TRAINING_VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="sampling 512, training 128 (tiny: 4)")
    p.add_argument("--iters", type=int, default=5, help="profiled forwards / steps")
    p.add_argument("--loop", action="store_true",
                   help="sampling: profile one DDIM sampling loop of --iters steps (t changes every step, the "
                        "sampler's update in between), as bench/sampling.py times it, instead of --iters forwards "
                        "at one t; figures are per step")
    p.add_argument("--top", type=int, default=25, help="kernels listed")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    allowed = SAMPLING_VARIANTS if a.what == "sampling" else TRAINING_VARIANTS
    if a.variant not in allowed:
        p.error(f"unknown {a.what} variant {a.variant!r}; allowed: {list(allowed)}")
    a.batch = a.batch or (4 if a.tiny else (512 if a.what == "sampling" else 128))
    if a.batch < 2 or a.iters < 1:
        p.error("--batch must be >= 2 and --iters >= 1")
    if a.loop and a.what != "sampling":
        p.error("--loop profiles a sampling loop: give --what sampling")
    return a


def build_step(args, device):
    """(the profiled call, the forwards or steps it runs: one, or the loop's len(τ), S + 1 where S does not divide T)"""
    torch.manual_seed(0)
    cfg = TINY if args.tiny else CIFAR10
    model = UNet(**cfg).to(device)
    res = cfg["resolution"]
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    if args.what == "sampling":
        kw = SAMPLING_VARIANTS[args.variant]
        eps = model.eval() if kw is None else perf.prepare_for_inference(model, backend=args.backend, **kw)
        x = torch.randn(args.batch, 3, res, res, device=device)
        t = torch.full((args.batch,), 500, device=device, dtype=torch.long)
        ts = timesteps(len(ac), args.iters, "linear")

        def step():
            with torch.no_grad():
                return sample(eps, x, ac.to(device), ts) if args.loop else eps(x, t)
        return step, len(ts) if args.loop else 1
    else:
        from ddim.accel.inference import DiffusionTrainStep

        train = DiffusionTrainStep(model, ac.to(device), backend=args.backend, **TRAINING_VARIANTS[args.variant])
        x0 = torch.randn(args.batch, 3, res, res, device=device)

        def step():
            return train(x0)
        return step, 1


def main(argv=None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    step, per_call = build_step(args, device)
    for _ in range(3):  # compilation, cuDNN autotuning
        step()
    perf.synchronize(device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        calls_profiled = 1 if args.loop else args.iters
        for _ in range(calls_profiled):
            step()
        perf.synchronize(device)
        wall = time.perf_counter() - t0

    iters = calls_profiled * per_call  # the figures below are per forward / training step
    per_kernel: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
        else:  # CPU: aten ops' self time stands in for kernels
            if not ev.name.startswith("aten::"):
                continue
            us = ev.self_cpu_time_total
        per_kernel[ev.name] += us
        calls[ev.name] += 1
    busy = sum(per_kernel.values()) / 1e6
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in per_kernel.items():
        by_kind[kind_of(name)] += us / 1e6

    print(f"# profile: {args.what}{' loop' if args.loop else ''} / {args.variant}, batch {args.batch}, "
          f"{iters} {'steps of one sampling loop' if args.loop else 'iterations'}, "
          f"{perf.device_info(device).get('gpu') or 'CPU'}")
    print(f"wall {wall * 1e3 / iters:.2f} ms per iteration; device busy {busy * 1e3 / iters:.2f} ms "
          f"({busy / wall:.0%} of wall); {sum(calls.values()) / iters:.0f} kernels per iteration")
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    print(perf.format_table([dict(kind=k, ms=v * 1e3 / iters, share=v / busy) for k, v in kinds],
                            [("kind", "kind", ""), ("ms", "ms / iteration", ".2f"), ("share", "share", ".1%")]))
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]
    print(perf.format_table([dict(kernel=n[:110], kind=kind_of(n), calls=calls[n] // iters,
                                  ms=us / 1e3 / iters, share=us / 1e6 / busy) for n, us in top],
                            [("kernel", "kernel", ""), ("kind", "kind", ""), ("calls", "calls / it", "d"),
                             ("ms", "ms / it", ".3f"), ("share", "share", ".1%")]))
    record = dict(what=args.what, loop=args.loop, variant=args.variant, batch=args.batch, iters=iters,
                  wall_ms=wall * 1e3 / iters, busy_ms=busy * 1e3 / iters,
                  by_kind_ms={k: v * 1e3 / iters for k, v in kinds},
                  kernels=[dict(name=n, calls=calls[n] // iters, ms=us / 1e3 / iters)
                           for n, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])],
                  machine=perf.device_info(device))
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
