#!/usr/bin/env python
"""FID of one trained model sampled in fp32, bf16 (``sampler.fast``) and fp8 (``ddim.accel.fp8``) from the same x_T.

The speed benchmarks state how far a fast path's samples move from fp32's (bench/sampling.py); this says what
that does to FID.  DDIM (eta = 0) on the quadratic trajectory (the paper's for CIFAR-10; ``--trajectory linear``
is bench/sampling.py's), FID of N samples against the training images, and per variant the uint8 pixel
differences against the fp32 samples.  ``--variants fp32,fp32-xT-bf16`` measures how far fp32 moves from x_T
rounded to bf16: the part of a bf16 path's differences that the sampler's sensitivity to its start explains.

    python bench/fid_precision.py --ckpt run/ckpt.pt --data cifar10_jpeg_q75.npz --weights inception.pth
    python bench/fid_precision.py --tiny --device cpu --no-fid     # seconds on a CPU (a random tiny model)
    python bench/fid_precision.py --ckpt run/ckpt.pt ... --steps 10 --fp8-min-widths 32,16,8   # where e4m3 costs
    python bench/fid_precision.py --ckpt run/ckpt.pt ... --fp8-max-widths 16     # the 32x32 blocks kept in bf16
    python bench/fid_precision.py --ckpt run/ckpt.pt ... --fp8-max-widths 16 --variants fp8-max16   # that one only

--ckpt is ``scripts/cifar10_gpu.py train``'s ckpt.pt or its ``export``, ema.pt (the U-Net's config and EMA weights).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from cifar10_gpu import generate, load_ema_unet, load_split  # noqa: E402

TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, in_channels=3,
            resolution=16, resamp_with_conv=True)


def load_model(ckpt: str | None) -> tuple[torch.nn.Module, dict]:
    """The EMA U-Net of scripts/cifar10_gpu.py's checkpoint and the checkpoint; without one, a random tiny U-Net
    (seed 0; CPU smoke tests)."""
    if ckpt:
        return load_ema_unet(ckpt)
    from ddim.models import UNet

    torch.manual_seed(0)
    return UNet(**TINY).eval(), dict(unet=TINY, steps=0)


def variants(compile: bool, fp8_min_widths: tuple[int, ...] = (), fp8_max_widths: tuple[int, ...] = ()
             ) -> dict[str, dict]:
    """name -> prepare_for_inference keywords (None: the fp32 model itself).  ``fp8-wN``: only the blocks on maps
    at least N wide run e4m3, ``fp8-maxN``: only those at most N wide (where in the network e4m3 costs quality)."""
    fp8 = dict(compile=compile, fp8=True, compile_mode="reduce-overhead" if compile else None)
    return {
        "fp32": None,
        # the fp32 model from x_T rounded to bf16: how far the sampler alone carries a change of bf16's size (the
        # rest of a bf16 path's pixel differences is its arithmetic); run only where --variants names it
        "fp32-xT-bf16": None,
        "bf16": dict(compile=compile),  # what sampler.fast runs
        "fp8": fp8,
        **{f"fp8-w{w}": dict(fp8, fp8_min_width=w) for w in fp8_min_widths},
        **{f"fp8-max{w}": dict(fp8, fp8_max_width=w) for w in fp8_max_widths},
    }


def image_stats(u8: torch.Tensor) -> dict[str, float]:
    """Contrast (mean over images of the pixel standard deviation) and detail (mean |difference| of horizontal and
    vertical neighbours), both in 8-bit levels: a path that softens the samples lowers both, which FID shows
    only with many samples."""
    x = u8.float()
    detail = ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()) / 2
    return dict(contrast=x.flatten(1).std(dim=1).mean().item(), detail=detail.item())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="scripts/cifar10_gpu.py's ckpt.pt or ema.pt (required unless --tiny)")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10_jpeg_q75.npz"))
    p.add_argument("--weights", default=None, help="Inception weights (ddim.evaluation.fid.resolve_inception_weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--reference", type=int, default=None, help="first N training images (default: all)")
    p.add_argument("--steps", default="10,50", help="comma list of trajectory lengths S")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--trajectory", default="quadratic", choices=["linear", "quadratic"],
                   help="tau: quadratic (the paper's for CIFAR-10) or linear (bench/sampling.py's)")
    p.add_argument("--tiny", action="store_true", help="a random tiny U-Net, 8 samples, S = 2 (CPU smoke test)")
    p.add_argument("--no-fid", action="store_true", help="pixel differences only")
    p.add_argument("--grids", default=None, help="folder for 8x8 sample grids of each variant and S")
    p.add_argument("--fp8-min-widths", default="",
                   help="comma list N: also fp8 with only the blocks on maps >= N wide in e4m3 (variant fp8-wN)")
    p.add_argument("--fp8-max-widths", default="",
                   help="comma list N: also fp8 with only the blocks on maps <= N wide in e4m3 (variant fp8-maxN)")
    p.add_argument("--variants", default=None,
                   help="comma list: run only these (default: all but fp32-xT-bf16); without fp32, no pixel "
                        "differences")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    widths = {}
    for name in ("fp8_min_widths", "fp8_max_widths"):
        value = getattr(args, name)
        if not all(w.strip().isdigit() and int(w) > 0 for w in value.split(",") if w.strip()):
            p.error(f"--{name.replace('_', '-')} must be a comma list of positive map widths, got {value!r}")
        widths[name] = tuple(int(w) for w in value.split(",") if w.strip())
    if not args.tiny and not args.ckpt:
        p.error("--ckpt is required (or --tiny)")
    device = torch.device(args.device)
    compile = device.type == "cuda"
    runs = variants(compile, widths["fp8_min_widths"], widths["fp8_max_widths"])
    if args.variants is not None:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        if not chosen or any(v not in runs for v in chosen):
            p.error(f"--variants {args.variants!r}: allowed {list(runs)} (fp8-wN / fp8-maxN with --fp8-min-widths / "
                    f"--fp8-max-widths N)")
        runs = {k: v for k, v in runs.items() if k in chosen}
    else:  # a reference for the pixel differences, not a path of its own: only where asked for
        runs.pop("fp32-xT-bf16")
    steps = [int(s) for s in args.steps.split(",")]
    if args.tiny:
        args.samples, args.batch, args.reference, steps = 8, 8, args.reference or 16, [2]
    torch.backends.cudnn.benchmark = True
    model, info = load_model(None if args.tiny else args.ckpt)
    model = model.to(device)
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    ref = None if args.no_fid else load_split(args.data, "train", args.reference)
    res = info["unet"]["resolution"]
    x_T = torch.randn(args.samples, 3, res, res, generator=torch.Generator().manual_seed(0)).to(device)
    command = " ".join(["python", "bench/fid_precision.py", *(argv or sys.argv[1:])])
    record = dict(benchmark="fid_precision", command=command,
                  ckpt=args.ckpt, train_steps=info["steps"], samples=args.samples,
                  reference=None if ref is None else int(ref.shape[0]), trajectory=args.trajectory, eta=0.0,
                  machine=perf.device_info(device), rows=[])
    fp32_images = {}
    for name, kw in runs.items():
        eps = model if kw is None else perf.prepare_for_inference(model, **kw)
        start = x_T.bfloat16().float() if name == "fp32-xT-bf16" else x_T
        for S in steps:
            generate(eps, start[:args.batch], ac, S, 0.0, args.batch, 0, args.trajectory)  # warm-up (compilation)
            perf.synchronize(device)
            t0 = time.perf_counter()
            u8 = generate(eps, start, ac, S, 0.0, args.batch, 0, args.trajectory)
            perf.synchronize(device)
            row = dict(variant=name, S=S, images_per_s=args.samples / (time.perf_counter() - t0), **image_stats(u8))
            if not args.no_fid:
                from ddim.evaluation.fid import fid_between

                row["fid"] = float(fid_between(u8, ref, ref_key=f"cifar10-train-{ref.shape[0]}",
                                               weights_path=args.weights, device=device, batch_size=args.batch)["fid"])
            if name == "fp32":
                fp32_images[S] = u8
            elif S in fp32_images:
                d = (u8.float() - fp32_images[S].float()).abs().flatten()
                row.update(u8_mean_abs_vs_fp32=d.mean().item(),
                           u8_p99_abs_vs_fp32=d.kthvalue(max(1, int(0.99 * d.numel()))).values.item(),
                           u8_max_abs_vs_fp32=d.max().item(), u8_changed_vs_fp32=(d > 0).float().mean().item())
            if args.grids:
                from torchvision.utils import save_image

                Path(args.grids).mkdir(parents=True, exist_ok=True)
                save_image(u8[:64].float() / 255, Path(args.grids) / f"{name}_S{S}.png", nrow=8)
            record["rows"].append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            perf.write_json(record, args.json)  # after every cell: a run cut short keeps what it finished
        del eps
    cols = [("variant", "variant", ""), ("S", "S", ""), ("fid", "FID", ".2f"), ("images_per_s", "images/s", ".0f"),
            ("u8_mean_abs_vs_fp32", "mean |d| (u8)", ".2f"), ("u8_p99_abs_vs_fp32", "p99 |d|", ".0f"),
            ("u8_changed_vs_fp32", "px changed", ".1%"), ("contrast", "contrast (std)", ".2f"),
            ("detail", "detail (|Δ| nbr)", ".2f")]
    print(f"# FID vs precision, {record['samples']} samples, {perf.device_info(device).get('gpu') or 'CPU'}")
    print(perf.format_table(record["rows"], cols))
    return record


if __name__ == "__main__":
    main()
