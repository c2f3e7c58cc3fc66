#!/usr/bin/env python
"""Where e4m3 loses precision in a trained U-Net: per ResnetBlock convolution, the error of its output from
quantising the activations alone, the weights alone, and both, as ``ddim.accel.fp8`` quantises them.

FP8 sampling softens the samples (FID +2.0 at S = 10 on a 47,000-step CIFAR-10 model, all of it from the blocks on
32x32 maps; docs/results/bench, sixteenth round).  This asks why, one layer at a time, in float32 on the inputs each
convolution sees in the fp32 network (x_t of real images at a few timesteps):

- ``act`` / ``w`` / ``both``: relative error ||y_q - y|| / ||y|| of conv(e4m3 activations, W), conv(a, e4m3 W with
  one scale per output channel) and both (what ``Fp8ResnetBlock`` computes, bias aside);
- ``both_pow2``: both, with the activations first multiplied by the power of two that brings their largest value
  under 448 (and the output divided back): the gain a static activation scale could give, where small activations
  fall into e4m3's subnormal range (|a| < 2^-6);
- ``gain``: ||y_both|| / ||y||, below 1 if quantisation shrinks the layer's output (a softening);
- ``subnormal``: the share of nonzero activations below 2^-6, where e4m3 keeps fewer than 3 mantissa bits.

    python bench/fp8_error.py --ckpt run/ckpt.pt --data cifar10_jpeg_q75.npz      # scripts/cifar10_gpu.py's ckpt
    python bench/fp8_error.py --tiny --device cpu                                  # a random tiny U-Net
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule
from ddim.accel.fp8 import E4M3, E4M3_MAX, dequantize_weight, quantize_weight
from ddim.models import UNet
from ddim.models.unet import ResnetBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fid_precision import load_model  # noqa: E402  (puts scripts/ on the path)
from cifar10_gpu import load_split, to_model  # noqa: E402

SUBNORMAL = 2.0 ** -6  # e4m3's smallest normal number


def to_e4m3(a: torch.Tensor) -> torch.Tensor:
    """a rounded to e4m3 and back, saturated at +-448 as the GroupNorm kernel writes it."""
    return a.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()


def conv_errors(a: torch.Tensor, conv: torch.nn.Conv2d) -> dict[str, float]:
    """Errors of one 3x3 convolution (no bias: the FP8 kernel adds it in float32) on its input a."""
    w = conv.weight.float()
    w_q = dequantize_weight(*quantize_weight(w))
    pad = conv.padding

    def rel(y_q: torch.Tensor, y: torch.Tensor) -> float:
        return ((y_q - y).norm() / y.norm()).item()

    y = F.conv2d(a, w, padding=pad)
    a_q = to_e4m3(a)
    amax = a.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    s = 2.0 ** torch.floor(torch.log2(E4M3_MAX / amax))  # a power of two: exact to apply and to undo
    y_both = F.conv2d(a_q, w_q, padding=pad)
    nonzero = a[a != 0].abs()
    return dict(act=rel(F.conv2d(a_q, w, padding=pad), y), w=rel(F.conv2d(a, w_q, padding=pad), y),
                both=rel(y_both, y), both_pow2=rel(F.conv2d(to_e4m3(a * s) / s, w_q, padding=pad), y),
                gain=(y_both.norm() / y.norm()).item(),
                subnormal=(nonzero < SUBNORMAL).float().mean().item() if nonzero.numel() else 0.0,
                a_rms=a.square().mean().sqrt().item(), a_max=amax.item())


@torch.no_grad()
def measure(model: UNet, x0: torch.Tensor, ts: list[int], alphas_cumprod: torch.Tensor) -> list[dict]:
    """One row per (timestep, ResnetBlock convolution): the errors of ``conv_errors`` on the input that convolution
    gets in the float32 network at x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    convs = {f"{name}.{c}": getattr(m, c) for name, m in model.named_modules() if isinstance(m, ResnetBlock)
             for c in ("conv1", "conv2")}
    seen: dict[str, torch.Tensor] = {}
    hooks = [conv.register_forward_pre_hook(lambda mod, args, key=key: seen.__setitem__(key, args[0].float()))
             for key, conv in convs.items()]
    rows = []
    try:
        gen = torch.Generator(device=x0.device).manual_seed(0)
        for t in ts:
            a = alphas_cumprod[t].to(x0.device)
            x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=gen, device=x0.device)
            seen.clear()
            model(x, torch.full((x0.shape[0],), t, device=x0.device))
            for key, conv in convs.items():
                rows.append(dict(t=t, conv=key, width=seen[key].shape[-1], **conv_errors(seen[key], conv)))
    finally:
        for h in hooks:
            h.remove()
    return rows


def by_width(rows: list[dict]) -> list[dict]:
    """Mean of each error over the convolutions and timesteps of one map width."""
    keys = ("act", "w", "both", "both_pow2", "gain", "subnormal")
    out = []
    for width in sorted({r["width"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["width"] == width]
        out.append(dict(width=width, convs=len({r["conv"] for r in sel}),
                        **{k: sum(r[k] for r in sel) / len(sel) for k in keys}))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="scripts/cifar10_gpu.py's ckpt.pt or ema.pt (required unless --tiny)")
    p.add_argument("--data", default=None, help="the CIFAR-10 pack (x0 = its first --images training images); "
                                                "without it x0 is noise")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--timesteps", default="10,100,300,600,900", help="comma list of timestep indices t in [0, T)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a random tiny U-Net at 16x16 (CPU smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not args.tiny and not args.ckpt:
        p.error("--ckpt is required (or --tiny)")
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    try:
        ts = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        ts = []
    if not ts or not all(0 <= t < len(ac) for t in ts):
        p.error(f"--timesteps must be a comma list of integers in [0, {len(ac)}), got {args.timesteps!r}")
    device = torch.device(args.device)
    model, info = load_model(None if args.tiny else args.ckpt)
    model = model.to(device)
    res = info["unet"]["resolution"]
    if args.data:
        x0 = to_model(load_split(args.data, "train", args.images)).to(device)
    else:
        x0 = torch.randn(args.images, 3, res, res, generator=torch.Generator().manual_seed(1)).clamp(-1, 1).to(device)
    rows = measure(model, x0, ts, ac)
    record = dict(benchmark="fp8_error", command=" ".join(["python", "bench/fp8_error.py", *(argv or sys.argv[1:])]),
                  ckpt=args.ckpt, train_steps=info["steps"], images=int(x0.shape[0]), timesteps=ts,
                  machine=perf.device_info(device), rows=rows, by_width=by_width(rows))
    cols = [("width", "map width", ""), ("convs", "convs", ""), ("act", "act", ".4f"), ("w", "weights", ".4f"),
            ("both", "both", ".4f"), ("both_pow2", "both, act x 2^k", ".4f"), ("gain", "gain", ".4f"),
            ("subnormal", "subnormal act", ".2%")]
    print(f"# e4m3 error per ResnetBlock convolution, mean over t in {ts} (relative to the float32 output)")
    print(perf.format_table(record["by_width"], cols))
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
