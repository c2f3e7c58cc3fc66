#!/usr/bin/env python
"""Per-layer cost of the ResnetBlock convolutions: cuDNN (+ Inductor's GroupNorm passes) vs ddim.accel.conv.

For every distinct 3x3 convolution of the CIFAR-10 U-Net's ResnetBlocks at batch 512 (bf16, channels_last)
prints milliseconds and TFLOP/s of

* cudnn:        ``F.conv2d`` alone (the matrix work only);
* cudnn+gn:     ``conv2d(silu(group_norm(x)))`` compiled by Inductor (statistics pass, normalise pass, cuDNN):
                what the compiled network runs today for that layer;
* triton:       ``ddim.accel.conv.conv3x3_fused`` without prologue (the kernel's matrix efficiency);
* fused:        with the GroupNorm+SiLU prologue (tanh.approx sigmoid);
* fused-exact:  the same with exp-based sigmoid;
* fused+stats:  prologue + the next GroupNorm's statistics from the epilogue;
* cudnn+kgn:    ``ddim.accel.groupnorm``'s GroupNorm+SiLU kernel, then cuDNN (what the default sampler.fast runs);
* band:         the band kernel (each input normalised once into a scratch slot, then the nine taps);
* band+stats:   the band kernel with the epilogue of fused+stats;
* fp8:          ``ddim.accel.fp8``'s convolution alone: e4m3 activations and weights (per-channel scales), Triton;
* kgn+fp8:      the GroupNorm kernel writing e4m3, then that convolution (what ``fp8=True`` runs; conv2 takes
                the shortcut in its epilogue as well, which the cuDNN cases leave to a separate add).

TFLOP/s count the convolution's multiply-adds only.  The fused kernel pays off where ``fused+stats`` is below
``cudnn+gn``.  GPU only; ``--tiny --device cpu`` under ``TRITON_INTERPRET=1`` checks that it runs.

    python bench/fused_conv.py --json fused_conv.json
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ddim.accel import fp8, conv as fused, groupnorm, inference as perf
from ddim.models import UNet, unet_kwargs_from_config


def conv_shapes(model: UNet) -> list[tuple[int, int, int, str]]:
    """Distinct (C_in, C_out, H, role) of the ResnetBlocks' 3x3 convolutions, in network order."""
    res, last = model.resolution, len(model.down) - 1
    blocks = [(b, res >> level) for level, down in enumerate(model.down) for b in down.block]
    blocks += [(b, res >> last) for b in (model.mid.block_1, model.mid.block_2)]
    blocks += [(b, res >> level) for level in reversed(range(len(model.up))) for b in model.up[level].block]
    shapes = [s for b, h in blocks for s in ((b.in_channels, b.out_channels, h, "conv1"),
                                             (b.out_channels, b.out_channels, h, "conv2"))]
    return list(dict.fromkeys(shapes))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="512 (tiny: 2)")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net at 16x16 in fp32 (CPU, Triton interpreter)")
    p.add_argument("--rep", type=int, default=50, help="milliseconds of timing per measurement (GPU)")
    p.add_argument("--max-layers", type=int, default=None, help="only the first N distinct layers (smoke tests)")
    p.add_argument("--cases", default=None, help="comma-separated subset of the cases (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if not fused.available():
        p.error("ddim.accel.conv needs Triton")
    kw = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
              in_channels=3, resolution=16) if args.tiny else unet_kwargs_from_config("cifar10")
    model = UNet(**kw)
    batch = args.batch or (2 if args.tiny else 512)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.backends.cudnn.benchmark = True
    # one compiled reference per layer shape: above Dynamo's default limit of 8 recompilations it would
    # silently run eagerly (the first H100 record's cudnn+gn column is eager from its 9th row on)
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for cin, cout, h, role in conv_shapes(model)[:args.max_layers]:
        x = torch.randn(batch, cin, h, h, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3, device=device, dtype=dtype) * cin ** -0.5).contiguous(
            memory_format=torch.channels_last)
        b = torch.randn(cout, device=device)
        w_kc = fused.weight_for_kernel(w)
        norm = torch.nn.GroupNorm(32, cin, eps=1e-6).to(device)
        gn = perf.swap_group_norm(torch.nn.Sequential(norm), "channel-stats")
        scale, shift = fused.group_norm_scale_shift(fused.group_stats(x, 32), norm)
        skip = torch.randn(batch, cout, h, h, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        bd = b.to(dtype)
        x8 = x.to(fp8.E4M3)
        w8, s8 = fp8.quantize_weight(w)
        ref_fn = lambda x: F.conv2d(F.silu(gn(x)), w, bd, padding=1)  # noqa: E731
        kgn_fn = lambda x: F.conv2d(groupnorm.group_norm_silu(x, norm), w, bd, padding=1)  # noqa: E731
        compiled = torch.compile(ref_fn, dynamic=False) if device.type == "cuda" else ref_fn
        compiled_kgn = torch.compile(kgn_fn, dynamic=False) if device.type == "cuda" else kgn_fn
        flop = 2 * batch * h * h * cout * cin * 9
        row = dict(cin=cin, cout=cout, hw=h, role=role)
        cases = {
            "cudnn": lambda: F.conv2d(x, w, bd, padding=1),
            "cudnn+gn": lambda: compiled(x),
            "triton": lambda: fused.conv3x3_fused(x, w_kc, b),
            "fused": lambda: fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift),
            "fused-exact": lambda: fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift, fast_silu=False),
            "fused+stats": lambda: (fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift, stats_groups=32)
                                    if role == "conv1" else
                                    fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift, residual=skip)),
            "cudnn+kgn": lambda: compiled_kgn(x),
            "band": lambda: fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift, fast_silu=False, band=True),
            "band+stats": lambda: (fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift, stats_groups=32,
                                                       fast_silu=False, band=True)
                                   if role == "conv1" else
                                   fused.conv3x3_fused(x, w_kc, b, scale=scale, shift=shift, residual=skip,
                                                       fast_silu=False, band=True)),
            "fp8": lambda: fused.conv3x3_fused(x8, w8, b, w_scale=s8, out_dtype=dtype),
            "kgn+fp8": lambda: fused.conv3x3_fused(groupnorm.group_norm_silu(x, norm, out_dtype=fp8.E4M3), w8, b,
                                                   w_scale=s8, out_dtype=dtype),
        }
        unknown = set(args.cases.split(",")) - set(cases) if args.cases else set()
        if unknown:
            p.error(f"--cases {sorted(unknown)} unknown; allowed: {list(cases)}")
        timed = {k: v for k, v in cases.items() if not args.cases or k in args.cases.split(",")}
        with torch.no_grad():
            ref = compiled(x).float()
            for name in ("fused", "band", "kgn+fp8"):  # the errors always, whichever cases --cases times
                row[f"{name}_max_abs_err"] = (cases[name]()[0].float() - ref).abs().max().item()
            row["ref_max_abs"] = ref.abs().max().item()
            for name, fn in timed.items():
                try:
                    ms = perf.kernel_ms(fn, device, args.rep)
                except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                    print(f"{cin}->{cout}@{h} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = flop / ms / 1e9
        row["configs"] = {str(k[1:]): v for k, v in fused._TUNED.items() if k[1][1:] == (cin, h, h) and k[2] == cout}
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    total = {k: sum(r.get(f"{k}_ms", float("nan")) for r in rows)
             for k in ("cudnn", "cudnn+gn", "cudnn+kgn", "triton", "fused", "fused-exact", "fused+stats", "band",
                       "band+stats", "fp8", "kgn+fp8")}
    cols = [("cin", "C in", ""), ("cout", "C out", ""), ("hw", "H", ""), ("role", "role", "")]
    for k in total:
        cols.append((f"{k}_ms", f"{k} ms", ".3f"))
    cols += [("fused+stats_tflops", "fused+stats TFLOP/s", ".0f"), ("band+stats_tflops", "band+stats TFLOP/s", ".0f"),
             ("cudnn_tflops", "cudnn TFLOP/s", ".0f"),
             ("fused_max_abs_err", "max |err|", ".2e"), ("band_max_abs_err", "band max |err|", ".2e"),
             ("kgn+fp8_max_abs_err", "fp8 max |err|", ".2e"), ("ref_max_abs", "max |ref|", ".2g")]
    print(f"# ResnetBlock 3x3 convolutions, batch {batch}, {perf.device_info(device).get('gpu') or 'CPU'}")
    print(perf.format_table(rows, cols))
    print("sum over distinct layers (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    record = dict(benchmark="fused_conv", command=" ".join(["python", "bench/fused_conv.py", *(argv or sys.argv[1:])]),
                  batch=batch, machine=perf.device_info(device), rows=rows, total_ms=total)
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
