#!/usr/bin/env python
"""Multi-GPU scaling: DDP training and sharded sampling of the CIFAR-10 U-Net on 1, 2, ... GPUs.

For every world size W (one process per GPU, NCCL; gloo on CPU):
- training: the official recipe (``ddim.accel.inference.DiffusionTrainStep``, batch ``--batch`` per GPU) with the
  network wrapped in DistributedDataParallel; images/s = W x batch x it/s, scaling = that / (W = 1).
- sampling: DDIM (eta = 0, S = ``--steps``) of ``--samples`` images; batch j of ``--sample-batch``
  indices runs on rank j % W, x_T of sample i comes from ``ddim.evaluation.tasks.latents_and_noise`` (seed, i),
  as in ``evaluate.py``. Rank 0 gathers the images; every W is compared with W = 1 (identical uint8?).

    python bench/ddp.py --world 1,2                      # GPU: bf16 + channels_last, eager
    python bench/ddp.py --world 1,2 --compile            # torch.compile as well (slower start)
    python bench/ddp.py --world 1,2 --compile --step-graph   # train.py's fast.step_graph step
    python bench/ddp.py --world 1,2 --tiny --device cpu  # seconds on a CPU (CI smoke test)
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import beta_schedule, timesteps
from ddim.evaluation.tasks import latents_and_noise, sample_batch, to_uint8
from ddim.models import UNet, unet_kwargs_from_config

CIFAR10 = unet_kwargs_from_config("cifar10")  # the official DDIM/DDPM CIFAR-10 U-Net
TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            dropout=0.1, in_channels=3, resolution=16, resamp_with_conv=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="1,2", help="comma list of world sizes (processes = GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net at 16x16 (CPU smoke test)")
    p.add_argument("--batch", type=int, default=None, help="training batch per GPU (128; tiny: 4)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (40; tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (8; tiny: 1)")
    p.add_argument("--samples", type=int, default=None, help="images sampled per W (4096; tiny: 8)")
    p.add_argument("--sample-batch", type=int, default=None, help="(512; tiny: 2)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps S (20; tiny: 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (training and sampling)")
    p.add_argument("--step-graph", action="store_true",
                   help="training as train.py's fast.step_graph: no DDP wrapper; loss, backward, one all-reduce and "
                        "clipping in one CUDA graph (ddim.accel.inference.GradientGraph), then Adam and the EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        a.worlds = [int(w) for w in a.world.split(",")]
    except ValueError:
        p.error(f"--world must be a comma list of integers, got {a.world!r}")
    if not a.worlds or min(a.worlds) < 1:
        p.error(f"--world sizes must be >= 1, got {a.world!r}")
    if a.device == "cuda" and max(a.worlds) > torch.cuda.device_count():
        p.error(f"--world {max(a.worlds)} needs {max(a.worlds)} GPUs; this machine has {torch.cuda.device_count()}")
    t = a.tiny
    a.batch = a.batch or (4 if t else 128)
    a.train_steps = a.train_steps or (2 if t else 40)
    a.warmup = a.warmup if a.warmup is not None else (1 if t else 8)
    a.samples = a.samples or (8 if t else 4096)
    a.sample_batch = a.sample_batch or (2 if t else 512)
    a.steps = a.steps or (2 if t else 20)
    return a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device: torch.device) -> None:
    perf.synchronize(device)
    dist.barrier()


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    # Import torch._dynamo before the process group exists: it imports torch.distributed.nn.functional, whose
    # defaults `group=group.WORLD` would otherwise capture the live group (the first lazy import is Adam's, in
    # DiffusionTrainStep). Then destroy_process_group cannot free it, and gloo's threads run on into exit(),
    # where a worker sometimes died with "terminate called without an active exception".
    from torch import _dynamo  # noqa: F401  (binds no local "torch")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    torch.backends.cudnn.benchmark = False  # the same algorithms in every process: identical images
    config = TINY if args.tiny else CIFAR10
    res = config["resolution"]
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = UNet(**config).to(device)
    fast = device.type == "cuda"

    # --- sampling (first, from the initial weights, the same for every W): batch j of indices on rank j % W
    eps = perf.prepare_for_inference(model, compile=args.compile) if fast else model.eval()
    seq = timesteps(1000, args.steps, "linear").to(device)
    ac_dev = ac.to(device)
    starts = list(range(0, args.samples, args.sample_batch))[rank::world]
    x_warm, _ = latents_and_noise(range(args.sample_batch), (3, res, res), 0, args.seed)
    sample_batch(eps, ac_dev, seq, x_warm.to(device))  # warm-up (compilation, cuDNN handles)
    _sync(device)
    perf.reset_peak_memory(device)
    t0 = time.perf_counter()
    idx, imgs = [], []
    with torch.no_grad():
        for s in starts:
            ii = list(range(s, min(s + args.sample_batch, args.samples)))
            x_T, _ = latents_and_noise(ii, (3, res, res), 0, args.seed)
            imgs.append(to_uint8(sample_batch(eps, ac_dev, seq, x_T.to(device))))
            idx.append(torch.tensor(ii))
    _sync(device)
    sample_s = time.perf_counter() - t0
    sample_mem = perf.peak_memory_gib(device)

    # --- training: DDP around the network; the step (loss, clip, Adam, EMA) as on one GPU
    step = perf.DiffusionTrainStep(model, ac, fast=fast, compile=args.compile, step_graph=args.step_graph)
    net = step.model
    if not args.step_graph:  # (DDP's bucket views are safe here: no CUDA graphs in this step)
        step.model = torch.nn.parallel.DistributedDataParallel(
            step.model, device_ids=[rank] if cuda else None, gradient_as_bucket_view=True)
        if args.compile:
            step.forward = torch.compile(step._loss, dynamic=False)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + rank)
    batches = [torch.randn(args.batch, 3, res, res, generator=gen).clamp(-1, 1).to(device) for _ in range(4)]
    perf.reset_peak_memory(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % 4])
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.train_steps):
        loss = step(batches[i % 4])
    _sync(device)
    train_s = time.perf_counter() - t0
    train_mem = perf.peak_memory_gib(device)
    # the ranks' weights must agree after DDP steps
    flat = torch.cat([p.detach().float().flatten()[:1000] for p in net.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    agree = torch.tensor([float(torch.equal(flat, ref))], device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # every rank's verdict: rank 0, which saves it, agrees with itself
    weights_agree = bool(agree.item() == 1.0)
    if step.gradient_graph is not None:
        step.gradient_graph.release()  # else destroy_process_group hangs (2 H200s: it did, after the results)
    del step, batches
    gc.collect()  # the DDP wrapper sits in reference cycles: free it, and its reducer's hold on the group, now

    mine = (torch.cat(idx), torch.cat(imgs).cpu()) if idx else (torch.empty(0, dtype=torch.long), None)
    gathered = [None] * world
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    if rank == 0:
        out = torch.zeros(args.samples, 3, res, res, dtype=torch.uint8)
        for i, im in gathered:
            if im is not None:
                out[i] = im
        torch.save(dict(world=world, images=out, train_s=train_s, warmup_s=warmup_s, sample_s=sample_s,
                        loss=float(loss.float()), weights_agree=weights_agree, train_mem=train_mem,
                        sample_mem=sample_mem), out_file)
    dist.destroy_process_group()
    # what of the process group still runs: gloo's or the TCP store's threads alive now run on into exit(), where
    # a worker sometimes aborted ("terminate called without an active exception"); the test wants none
    left = collective_threads()
    if left is not None:
        Path(f"{out_file}.rank{rank}.threads").write_text("\n".join(left))


def collective_threads() -> list[str] | None:
    """Names of this process's gloo and TCPStore threads (Linux: /proc/self/task/*/comm), None where unknown."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if "gloo" in name.lower() or "tcpstore" in name.lower():
            names.append(name)
    return sorted(names)


def add_scaling(rows: list[dict]) -> None:
    """Each row's training and sampling throughput over the one-process row's; without a measured W = 1 row, None
    (printed '-'): dividing by another row and multiplying by its W would assume that row scaled perfectly."""
    one = next((r for r in rows if r["world"] == 1), None)
    for r in rows:
        r["train_scaling"] = r["train_images_per_s"] / one["train_images_per_s"] if one else None
        r["sample_scaling"] = r["sample_images_per_s"] / one["sample_images_per_s"] if one else None


def main(argv=None) -> dict:
    args = parse(argv)
    rows, base_imgs = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out_file = str(Path(tmp) / f"w{world}.pt")
            mp.spawn(worker, args=(world, args, _free_port(), out_file), nprocs=world, join=True)
            r = torch.load(out_file, weights_only=False)
            files = [Path(f"{out_file}.rank{k}.threads") for k in range(world)]  # none where threads are unknown
            left = sorted(n for f in files for n in f.read_text().splitlines()) if all(map(Path.exists, files)) else None
            imgs = r.pop("images")
            if base_imgs is None:
                base_imgs = imgs
            diff = (imgs.int() - base_imgs.int()).abs()
            row = dict(world=world, train_it_per_s=args.train_steps / r["train_s"],
                       train_images_per_s=world * args.batch * args.train_steps / r["train_s"],
                       sample_images_per_s=args.samples / r["sample_s"], warmup_s=r["warmup_s"],
                       train_peak_gib=r["train_mem"], sample_peak_gib=r["sample_mem"], loss=r["loss"],
                       weights_agree=r["weights_agree"], same_images_as_first=bool(diff.max() == 0),
                       max_u8_diff_to_first=int(diff.max()),
                       threads_left_after_destroy=left)
            rows.append(row)
            print(f"W={world}: {row}", flush=True)
    add_scaling(rows)
    info = perf.device_info(torch.device(args.device))
    record = dict(benchmark="ddp", command=" ".join(["python", "bench/ddp.py", *(argv if argv is not None else sys.argv[1:])]),
                  batch_per_gpu=args.batch, train_steps=args.train_steps, samples=args.samples,
                  sample_batch=args.sample_batch, S=args.steps, compile=args.compile, step_graph=args.step_graph,
                  machine=info, rows=rows)
    print(f"# DDP scaling, {info.get('gpu') or 'CPU'}: training batch {args.batch}/GPU, sampling {args.samples} images, "
          f"S = {args.steps}, {'compiled' if args.compile else 'eager'}{', step graph' if args.step_graph else ''}; "
          f"scaling = throughput / one process")
    print(perf.format_table(rows, [("world", "GPUs", ""), ("train_it_per_s", "train it/s", ".2f"),
                                   ("train_images_per_s", "train img/s", ".0f"), ("train_scaling", "x", ".2f"),
                                   ("sample_images_per_s", "sample img/s", ".0f"), ("sample_scaling", "x", ".2f"),
                                   ("same_images_as_first", "same images", ""), ("weights_agree", "ranks agree", ""),
                                   ("train_peak_gib", "train GiB", ".2f")]))
    perf.write_json(record, args.json)
    return record


if __name__ == "__main__":
    main()
