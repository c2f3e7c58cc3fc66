#!/usr/bin/env python
"""Multi-GPU scaling of the shipped paths: DDP training and sharded sampling on 1, 2, ... GPUs.

For every world size W (one process per GPU, NCCL; gloo on a CPU):
- training: train.py's LightningModule through a Lightning Trainer with the strategy of ``conf/trainer/ddp.yaml``
  (``trainer=ddp``, Lightning's DDP wrapper) or, with ``--step-graph``, of ``conf/trainer/ddp_step_graph.yaml``
  (the whole step one CUDA graph, gradients all-reduced inside it); batch ``--batch`` per GPU.
- sampling: DDIM (η = 0, S = ``--steps``) of ``--samples`` images as evaluate.py shards them: batch j of
  ``--sample-batch`` indices on rank j % W, x_T of sample i from its own seed; rank 0 gathers the images.
Each W's images/s is divided by the W = 1 row's (the baseline of the same run), the ranks' weights must agree after
training and every W's images must equal the W = 1 images.

    python bench/ddp.py --world 1,2                              # GPU: bf16-mixed training, bf16 preset sampling
    python bench/ddp.py --world 1,2 --compile --step-graph       # train.py's fastest multi-GPU setup
    python bench/ddp.py --world 1,2 --tiny --device cpu          # a CPU smoke run (gloo)
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness import (add_ratios, command_line, default_device, device_info, format_table, peak_memory_gib,
                     reset_peak_memory, synchronize, unet_config, write_json)
from training import fit_rate, make_module, training_data
from ddim.accel import prepare_for_inference
from ddim.diffusion import alphas_cumprod, beta_schedule, sample, timesteps
from ddim.evaluation.images import to_uint8
from ddim.evaluation.sampling import latents_and_noise
from ddim.models import UNet

TRAINER_CONF = Path(__file__).resolve().parents[1] / "conf" / "trainer"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="1,2", help="comma list of world sizes (processes = GPUs)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net at 16x16 (CPU smoke run)")
    p.add_argument("--batch", type=int, default=None, help="training batch per GPU (128; tiny: 4)")
    p.add_argument("--steps-train", dest="steps", type=int, default=None, help="timed training steps (100; tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (30; tiny: 1)")
    p.add_argument("--samples", type=int, default=None, help="images sampled per W (4096; tiny: 8)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (512; tiny: 2)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps S (20; tiny: 2)")
    p.add_argument("--compile", action="store_true", help="fast.compile for training, compiled bf16 preset sampling")
    p.add_argument("--step-graph", action="store_true", help="fast.step_graph with trainer=ddp_step_graph's strategy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the record here")
    a = p.parse_args(argv)
    try:
        a.worlds = [int(w) for w in a.world.split(",")]
    except ValueError:
        p.error(f"--world must be a comma list of integers, got {a.world!r}")
    if not a.worlds or min(a.worlds) < 1:
        p.error(f"--world sizes must be >= 1, got {a.world!r}")
    if a.device.startswith("cuda") and max(a.worlds) > torch.cuda.device_count():
        p.error(f"--world {max(a.worlds)} needs {max(a.worlds)} GPUs; this machine has {torch.cuda.device_count()}")
    t = a.tiny
    a.batch = a.batch or (4 if t else 128)
    a.steps = a.steps or (2 if t else 100)
    a.warmup = a.warmup if a.warmup is not None else (1 if t else 30)
    a.samples = a.samples or (8 if t else 4096)
    a.sample_batch = a.sample_batch or (2 if t else 512)
    a.sample_steps = a.sample_steps or (2 if t else 20)
    a.data, a.num_workers = "synthetic", 0
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_sampling(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> tuple:
    """(indices, uint8 images, seconds) of this rank's whole batches, as evaluate.py deals them out."""
    config = unet_config(args.tiny)
    torch.manual_seed(args.seed)
    model = UNet(**config).to(device).eval()
    eps = prepare_for_inference(model, "bf16", compile=args.compile) if device.type == "cuda" else model
    ac, seq = alphas_cumprod(beta_schedule("linear", 1000)).to(device), timesteps(1000, args.sample_steps).to(device)
    shape = (config["in_channels"], config["resolution"], config["resolution"])
    starts = list(range(0, args.samples, args.sample_batch))[rank::world]
    with torch.no_grad():
        sample(eps, latents_and_noise(range(args.sample_batch), shape, 0, args.seed)[0].to(device), ac, seq)  # warm-up
        synchronize(device)
        dist.barrier()
        start, indices, images = time.perf_counter(), [], []
        for first in starts:
            batch = list(range(first, min(first + args.sample_batch, args.samples)))
            x_T = latents_and_noise(batch, shape, 0, args.seed)[0].to(device)
            images.append(to_uint8(sample(eps, x_T, ac, seq)).cpu())
            indices.append(torch.tensor(batch))
        synchronize(device)
        dist.barrier()
    seconds = time.perf_counter() - start
    if not indices:
        return torch.empty(0, dtype=torch.long), None, seconds
    return torch.cat(indices), torch.cat(images), seconds


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out_file: str) -> None:
    """One process of world size ``world``: sampling, then training; rank 0 writes the results."""
    # LOCAL_RANK tells Lightning that the processes exist already; it then joins the process group made here
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      RANK=str(rank), WORLD_SIZE=str(world))
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    torch.backends.cudnn.benchmark = False  # the same algorithms in every process: the same images
    indices, images, sample_s = sharded_sampling(rank, world, args, device)
    sample_peak = peak_memory_gib(device)
    reset_peak_memory(device)

    strategy = instantiate(OmegaConf.load(TRAINER_CONF / ("ddp_step_graph.yaml" if args.step_graph else "ddp.yaml"))
                           .strategy)
    module = make_module(args, dict(compile=args.compile, step_graph=args.step_graph))
    precision = "bf16-mixed" if cuda else "32-true"
    train = fit_rate(module, training_data(args, unet_config(args.tiny)["resolution"]), args, precision=precision,
                     devices=world, strategy=strategy)
    flat = torch.cat([p.detach().float().flatten()[:1000] for p in module.model.parameters()]).to(device)
    ref = flat.clone()
    dist.broadcast(ref, 0)
    agree = torch.tensor([float(torch.equal(flat, ref))], device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    gathered = [None] * world
    dist.gather_object((indices, images), gathered if rank == 0 else None, dst=0)
    if rank == 0:
        res = unet_config(args.tiny)["resolution"]
        out = torch.zeros(args.samples, 3, res, res, dtype=torch.uint8)
        for idx, imgs in gathered:
            if imgs is not None:
                out[idx] = imgs
        torch.save(dict(images=out, sample_s=sample_s, sample_peak=sample_peak, weights_agree=bool(agree.item() == 1),
                        **train), out_file)
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, tmp: str) -> dict:
    """Rank 0's results for ``world`` processes; one process runs in this one (no process start to pay)."""
    out_file = str(Path(tmp) / f"w{world}.pt")
    if world == 1:
        saved = dict(os.environ)
        try:
            worker(0, 1, args, free_port(), out_file)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    else:
        mp.spawn(worker, args=(world, args, free_port(), out_file), nprocs=world, join=True)
    return torch.load(out_file, weights_only=False)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    rows, first_images = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            r = run_world(world, args, tmp)
            images = r.pop("images")
            first_images = images if first_images is None else first_images
            diff = (images.int() - first_images.int()).abs().max().item()
            rows.append(dict(world=world, train_it_per_s=r["it_per_s"], train_images_per_s=r["images_per_s"],
                             train_peak_gib=r["peak_mem_gib"], loss=r["loss"], weights_agree=r["weights_agree"],
                             sample_images_per_s=args.samples / r["sample_s"], sample_peak_gib=r["sample_peak"],
                             same_images_as_first=diff == 0, max_u8_diff_to_first=diff))
    one = next((i for i, row in enumerate(rows) if row["world"] == 1), None)  # only against a measured W = 1
    add_ratios(rows, "train_images_per_s", one, out="train_scaling")
    add_ratios(rows, "sample_images_per_s", one, out="sample_scaling")
    info = device_info(args.device)
    record = dict(benchmark="ddp", command=command_line("ddp.py", argv), batch_per_gpu=args.batch,
                  timed_steps=args.steps, samples=args.samples, sample_batch=args.sample_batch, S=args.sample_steps,
                  compile=args.compile, step_graph=args.step_graph, machine=info, rows=rows)
    print(f"# DDP scaling on {info.get('gpu') or 'CPU'}: training batch {args.batch} per GPU "
          f"({'trainer=ddp_step_graph' if args.step_graph else 'trainer=ddp'}), sampling {args.samples} images at "
          f"S = {args.sample_steps}; x = images/s over one process in this run")
    print(format_table(rows, [("world", "GPUs", ""), ("train_it_per_s", "train it/s", ".2f"),
                              ("train_images_per_s", "train images/s", ".0f"), ("train_scaling", "x", ".2f"),
                              ("sample_images_per_s", "sample images/s", ".0f"), ("sample_scaling", "x", ".2f"),
                              ("same_images_as_first", "same images", ""), ("weights_agree", "ranks agree", ""),
                              ("train_peak_gib", "train peak GiB", ".2f")]))
    write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
