#!/usr/bin/env python
"""Training throughput of train.py's LightningModule: the fast options against the plain fp32 module.

Both rows run ``ddim.training.module.DiffusionModule`` (official recipe: Adam 2e-4, grad clip 1.0, EMA, antithetic
t) through a Lightning Trainer for ``--warmup`` + ``--steps`` steps on the same data; only the timed steps count.
The first row is the paper's setup (fp32, eager), the second the fast path (bf16-mixed, ``fast.compile``,
``fast.step_graph``: the whole step one CUDA graph), with its it/s over the first row's.

    python bench/training.py                              # GPU: batch 128, synthetic images already in memory
    python bench/training.py --data cifar10 --data-root data   # real CIFAR-10 through ddim.data
    python bench/training.py --tiny --device cpu          # a CPU smoke run (seconds; bf16-mixed, eager)
"""
from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from harness import (StepTimer, add_ratios, command_line, default_device, device_info, format_table, peak_memory_gib,
                     reset_peak_memory, unet_config, write_json)
from ddim.data import build_dataset
from ddim.training.module import DiffusionModule

DIFFUSION = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=1000)
OPTIM = dict(lr=2e-4, beta1=0.9, eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True)
DATA_SETS = ("synthetic", "cifar10", "image_folder")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net at 16x16, batch 4 (CPU smoke run)")
    p.add_argument("--batch", type=int, default=None, help="batch size (128; tiny: 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (200; tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first: compilation, graph capture (30; tiny: 1)")
    p.add_argument("--data", default="synthetic", choices=DATA_SETS,
                   help="synthetic images in memory, or a data set of ddim.data read from --data-root")
    p.add_argument("--data-root", default="data")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (8 for real data on CUDA, else 0)")
    p.add_argument("--precision", default="bf16-mixed", help="the fast row's Lightning precision")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fast.compile of the fast row (default: on CUDA)")
    p.add_argument("--step-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="fast.step_graph of the fast row (default: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the record here")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.batch = a.batch or (4 if a.tiny else 128)
    a.steps = a.steps or (3 if a.tiny else 200)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 30)
    a.compile = cuda if a.compile is None else a.compile
    a.step_graph = cuda if a.step_graph is None else a.step_graph
    a.num_workers = a.num_workers if a.num_workers is not None else (8 if cuda and a.data != "synthetic" else 0)
    if a.batch < 2 or a.steps < 1 or a.warmup < 0:
        p.error(f"--batch must be >= 2 (antithetic t pairs), --steps >= 1, --warmup >= 0; got {a.batch}, {a.steps}, "
                f"{a.warmup}")
    return a


def training_data(args: argparse.Namespace, resolution: int) -> Dataset:
    """Random images in [-1, 1] (the data loader then costs nothing), or a data set as train.py reads it."""
    if args.data == "synthetic":
        gen = torch.Generator().manual_seed(args.seed)
        return TensorDataset(torch.randn(8 * args.batch, 3, resolution, resolution, generator=gen).clamp(-1, 1))
    return build_dataset(args.data, root=args.data_root, image_size=resolution, split="train", random_flip=True)


def fit_rate(module: DiffusionModule, data: Dataset, args: argparse.Namespace, *, precision: str, devices: int = 1,
             strategy: object = "auto") -> dict:
    """it/s of ``module``'s timed steps through a Lightning Trainer, its peak memory and last loss."""
    device = torch.device(args.device)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=devices, strategy=strategy,
                        precision=precision, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        benchmark=True, callbacks=[timer])
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.num_workers,
                        persistent_workers=args.num_workers > 0, pin_memory=device.type == "cuda")
    reset_peak_memory(device)
    trainer.fit(module, loader)
    loss = trainer.callback_metrics.get("train/loss")
    return dict(it_per_s=timer.it_per_s, images_per_s=timer.it_per_s * args.batch * devices,
                peak_mem_gib=peak_memory_gib(device), loss=None if loss is None else float(loss),
                steps=trainer.global_step)


def make_module(args: argparse.Namespace, fast: dict) -> DiffusionModule:
    """The LightningModule of train.py with the same seeded initial weights for every row."""
    torch.manual_seed(args.seed)
    return DiffusionModule(model=unet_config(args.tiny) | {"dropout": 0.1}, diffusion=DIFFUSION, optim=OPTIM,
                           data={"batch_size": args.batch}, fast=fast)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    L.seed_everything(args.seed, verbose=False)
    data = training_data(args, unet_config(args.tiny)["resolution"])
    runs = [("fp32", dict(compile=False, step_graph=False), "32-true"),
            ("fast", dict(compile=args.compile, step_graph=args.step_graph), args.precision)]
    rows = []
    for name, fast, precision in runs:
        row = fit_rate(make_module(args, fast), data, args, precision=precision)
        rows.append(dict(row=name, precision=precision, **fast, **row))
    add_ratios(rows, "it_per_s")
    info = device_info(args.device)
    record = dict(benchmark="training", command=command_line("training.py", argv), batch=args.batch,
                  timed_steps=args.steps, warmup_steps=args.warmup, data=args.data, optim=OPTIM, machine=info,
                  rows=rows)
    print(f"# DiffusionModule training on {info.get('gpu') or 'CPU'}: batch {args.batch}, {args.data} data, "
          f"{args.steps} timed steps after {args.warmup}; ratio = it/s over fp32 in this run")
    print(format_table(rows, [("row", "row", ""), ("precision", "precision", ""), ("compile", "compile", ""),
                              ("step_graph", "step graph", ""), ("it_per_s", "it/s", ".2f"),
                              ("ratio", "x fp32", ".2f"), ("images_per_s", "images/s", ".0f"),
                              ("peak_mem_gib", "peak GiB", ".2f"), ("loss", "loss", ".1f")]))
    write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
