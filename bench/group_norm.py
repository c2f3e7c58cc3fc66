#!/usr/bin/env python
"""Per-site cost of the U-Net's GroupNorms: Inductor's two kernels vs ddim.accel.groupnorm's one kernel per sample.

The sites are the GroupNorms that ``prepare_for_inference(group_norm="kernel")`` sends to the kernel (both norms of
every ResnetBlock, the attention norms), found by running the CIFAR-10 U-Net once; each distinct
(channels, size, shift, SiLU) is timed at batch 512 in bf16, channels_last:

* inductor-det / inductor:  ``silu(ChannelStatGroupNorm(x + shift))`` compiled, Inductor's deterministic mode
                            (what ``sampler.fast`` compiled before the kernel) / configurations chosen by timing;
* kernel-compiled:          ``ddim.accel.groupnorm.group_norm_silu`` inside ``torch.compile`` (launched from Inductor's
                            generated code, as in the network); on a CPU (``kernel``) called directly.

GB/s counts one read and one write of the activation (the least any GroupNorm can do).  GPU only;
``--tiny --device cpu`` under ``TRITON_INTERPRET=1`` checks that it runs.

    python bench/group_norm.py --json group_norm.json
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ddim.accel import groupnorm as gnk
from ddim.accel import inference as perf
from ddim.models import UNet, unet_kwargs_from_config

TINY = dict(ch=64, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
            in_channels=3, resolution=8, resamp_with_conv=True)


def sites(model: UNet, device: torch.device) -> list[tuple[int, int, bool, bool, int]]:
    """Distinct (C, H, with shift, SiLU, groups) of the kernel's calls in one forward, in network order."""
    fast = perf.prepare_for_inference(model, dtype="fp32", group_norm="kernel", compile=False)
    seen = []
    launch = gnk._launch

    def record(x, add, weight, bias, eps, groups, silu, out_dtype=None):
        seen.append((x.shape[1], x.shape[2], add is not None, silu, groups))
        return launch(x, add, weight, bias, eps, groups, silu, out_dtype)

    gnk._launch = record
    try:
        res = model.resolution
        with torch.no_grad():
            fast(torch.randn(1, model.in_channels, res, res, device=device), torch.tensor([500], device=device))
    finally:
        gnk._launch = launch
    return list(dict.fromkeys(seen))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="512 (tiny: 2)")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net in fp32 (CPU, Triton interpreter)")
    p.add_argument("--rep", type=int, default=50, help="milliseconds of timing per measurement (GPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (2 if args.tiny else 512)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    compile_ = device.type == "cuda"
    torch.manual_seed(0)
    model = UNet(**(TINY if args.tiny else unet_kwargs_from_config("cifar10"))).to(device).eval()
    rows = []
    for c, h, with_shift, silu, groups in sites(model, device):
        x = torch.randn(batch, c, h, h, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        shift = torch.randn(batch, c, device=device) if with_shift else None
        norm = perf.ChannelStatGroupNorm(groups, c, eps=1e-6).to(device)

        def inductor_fn(x, shift):
            v = x if shift is None else x + shift[:, :, None, None].to(x.dtype)
            y = norm(v)
            return F.silu(y) if silu else y

        def kernel_fn(x, shift):
            return gnk.group_norm_silu(x, norm, add=shift, silu=silu)

        row = dict(channels=c, size=h, shift=with_shift, silu=silu, lanes=gnk._blocks(c, groups, h * h)[:2],
                   mb=x.numel() * x.element_size() / 1e6)
        variants = [("kernel", kernel_fn)]
        if compile_:  # the op called eagerly pays ~0.2 ms of Python per launch: on a GPU only its compiled form
            torch._dynamo.reset()
            variants = [("inductor-det", torch.compile(inductor_fn, dynamic=False, options={"deterministic": True})),
                        ("inductor", torch.compile(inductor_fn, dynamic=False)),
                        ("kernel-compiled", torch.compile(kernel_fn, dynamic=False))]
        with torch.no_grad():
            for name, fn in variants:
                ms = perf.kernel_ms(lambda: fn(x, shift), device, args.rep)
                row[f"{name}_ms"] = ms
                row[f"{name}_gbs"] = 2 * row["mb"] / ms
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    names = [n for n in ("inductor-det", "inductor", "kernel", "kernel-compiled") if f"{n}_ms" in rows[0]]
    print(f"# GroupNorm sites of the U-Net, batch {batch}, {dtype}, {perf.device_info(device).get('gpu') or 'CPU'}")
    print("| channels | size | shift | SiLU | MB | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("| --- " * (5 + len(names)) + "|")
    for r in rows:
        print(f"| {r['channels']} | {r['size']} | {r['shift']} | {r['silu']} | {r['mb']:.0f} | "
              + " | ".join(f"{r[f'{n}_ms']:.3f}" for n in names) + " |")
    totals = {n: sum(r[f"{n}_ms"] for r in rows) for n in names}
    print("sum over distinct sites (each once): " + ", ".join(f"{n} {v:.3f} ms" for n, v in totals.items()))
    record = dict(benchmark="group_norm", command=" ".join(["python", "bench/group_norm.py", *(argv or sys.argv[1:])]),
                  batch=batch, dtype=str(dtype), machine=perf.device_info(device), rows=rows, totals_ms=totals)
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
