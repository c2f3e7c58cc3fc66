#!/usr/bin/env python
"""What the EMA's initial weights cost a short run: one training trajectory, three averages of it.

Without a warm-up the EMA starts as the random initial weights and keeps ``decay ** steps`` of them (0.9998 **
17,772 = 2.9 %: a CIFAR-10 run sampled at FID 99; docs/results/bench, eighteenth round).  This trains one U-Net
(``ddim.accel.inference.DiffusionTrainStep``) and keeps, from the same steps:

- ``ema official``: the official rule, seeded with the initial weights (``ema_warmup=False``);
- ``ema debiased``: the same average with the initial weights' share taken out and the rest renormalised,
  ``(ema - decay**n * w_0) / (1 - decay**n)``: the same window without the initial weights, so
  ``official - debiased`` is what those weights alone cost;
- ``ema warm-up``: ``ddim.models.ema.ema_decay_at`` with warm-up (what ``scripts/cifar10_gpu.py train`` uses);

and reports each one's eps-prediction error (the training loss, per dimension) on held-out images at fixed t and
noise, next to the raw weights'.

    python bench/ema_warmup.py --device cpu --steps 600 --decay 0.995 --batch 16    # tiny U-Net, ~3 min on 2 cores
    python bench/ema_warmup.py --data cifar10_jpeg_q75.npz --full --fast --steps 17772 --decay 0.9998 --batch 128 \
        --save run/ema     # a GPU; then bench/fid_precision.py --ckpt run/ema/ema_official.pt (and the others)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod, beta_schedule
from ddim.models import UNet
from ddim.models.ema import ema_initial_share

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from cifar10_gpu import CIFAR10, TINY, generate, load_split, to_model  # noqa: E402

TIMESTEPS = (20, 100, 300, 600, 900)


def eps_mse(net: torch.nn.Module, x0: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor, batch: int = 256
            ) -> list[float]:
    """Mean squared error of ``net``'s eps prediction at each of TIMESTEPS, the same x_0 and noise for every net."""
    out = []
    with torch.no_grad():
        for t in TIMESTEPS:
            x = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
            pred = torch.cat([net(x[i:i + batch], torch.full((len(x[i:i + batch]),), t, device=x.device))
                              for i in range(0, len(x), batch)])
            out.append((pred.float() - eps).square().mean().item())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                         "cifar10_jpeg_q75.npz"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="the official CIFAR-10 U-Net (default: the tiny one)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--decay", type=float, default=0.995)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=512)
    p.add_argument("--fast", action="store_true", help="the fast training step (bf16, compile; a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write each average as DIR/<name>.pt (raw, ema_warmup, ema_official, ema_debiased) in the "
                        "format of scripts/cifar10_gpu.py export, for bench/fid_precision.py --ckpt")
    p.add_argument("--grid", default=None, metavar="PNG",
                   help="also sample 16 images from each weight set (the same x_T; DDIM eta = 0, S = 50, quadratic) "
                        "and write them as one grid, a row per set in the order of the table")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error(f"--steps {args.steps} and --batch {args.batch} must be at least 1")
    if not 0.0 <= args.decay < 1.0:
        p.error(f"--decay {args.decay}: allowed 0 <= decay < 1")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x_train = to_model(load_split(args.data, "train", args.train_images)).to(device)
    x_test = to_model(load_split(args.data, "test", args.test_images)).to(device)
    ac = alphas_cumprod(beta_schedule("linear"))
    config = CIFAR10 if args.full else TINY
    step = perf.DiffusionTrainStep(UNet(**config).to(device), ac, ema_decay=args.decay,
                                   ema_warmup=True, fast=args.fast,
                                   compile_mode="reduce-overhead" if args.fast and device.type == "cuda" else None)
    w0 = [p.detach().clone() for p in step.ema_params]
    official = [p.detach().clone() for p in step.ema_params]
    t0 = time.time()
    for i in range(args.steps):
        step(x_train[torch.randint(0, len(x_train), (args.batch,), device=device)])
        with torch.no_grad():  # the official rule, beside the step's own warm-up EMA
            torch._foreach_lerp_(official, step.params, 1.0 - args.decay)
    perf.synchronize(device)
    train_s = time.time() - t0
    left = ema_initial_share(args.decay, args.steps, warmup=False)
    debiased = [(e - left * w) / (1.0 - left) for e, w in zip(official, w0)]

    eps = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    ac_f = ac.float().to(device)

    def save(name: str, net: torch.nn.Module) -> None:
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
            # the EMA rule where the file holds an EMA with initial weights in it (load_ema_unet's warning reads it)
            rule = {"ema official": dict(ema_decay=args.decay, ema_warmup=False),
                    "ema warm-up": dict(ema_decay=args.decay, ema_warmup=True)}.get(name, {})
            torch.save(dict(ema=state, unet=config, steps=args.steps, weights=name, **rule),
                       Path(args.save) / f"{name.replace(' ', '_').replace('-', '')}.pt")

    x_T = torch.randn(16, 3, config["resolution"], config["resolution"],
                      generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
    grid: list[torch.Tensor] = []

    def measure(name: str, net: torch.nn.Module) -> None:
        rows[name] = eps_mse(net, x_test, eps, ac_f)
        save(name, net)
        if args.grid:
            grid.append(generate(net, x_T, ac.to(device), 50, 0.0, len(x_T), 0, "quadratic"))

    rows: dict[str, list[float]] = {}
    measure("raw", step.model.eval())
    measure("ema warm-up", step.ema)
    warm = [p.detach().clone() for p in step.ema_params]
    for name, weights in (("ema official", official), ("ema debiased", debiased)):
        torch._foreach_copy_(step.ema_params, weights)
        measure(name, step.ema)
    torch._foreach_copy_(step.ema_params, warm)
    if args.grid:
        from torchvision.utils import save_image

        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.cat(grid).float() / 255, args.grid, nrow=len(x_T), padding=1)

    print(f"{args.steps} steps (batch {args.batch}, {train_s:.0f} s on {device}), decay {args.decay}: the official "
          f"EMA holds {left:.2%} of the initial weights; eps MSE on {len(x_test)} test images")
    print("| weights | " + " | ".join(f"t = {t}" for t in TIMESTEPS) + " | mean |")
    print("| --- " * (len(TIMESTEPS) + 2) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in r) + f" | {sum(r) / len(r):.4f} |")
    result = dict(benchmark="ema_warmup", command=" ".join(["python", "bench/ema_warmup.py", *(argv or sys.argv[1:])]),
                  steps=args.steps, decay=args.decay, batch=args.batch, initial_weights_left=left,
                  train_seconds=train_s, timesteps=list(TIMESTEPS), eps_mse=rows, machine=perf.device_info(device))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
