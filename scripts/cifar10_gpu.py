#!/usr/bin/env python
"""Train the CIFAR-10 DDIM/DDPM model on one GPU, then evaluate a small Table 1 and Table 2.

Stages (each can run alone, so a run can span several commands of one machine):
  train  -- the official CIFAR-10 U-Net and recipe (Adam 2e-4, clip 1.0, batch 128, antithetic t, random
            horizontal flips) with the fast step of ``ddim.accel.inference`` (bf16, channels_last, compile, fused
            Adam, foreach EMA), for a fixed wall-clock budget. The data set lives on the GPU as uint8.
            ``--resume`` goes on from OUT/ckpt.pt (weights, Adam state, data order, RNG), so training
            longer than one command's time limit runs as several commands; OUT/ckpt.pt is also written every
            ``--save-minutes`` (5), so a command killed at its limit keeps its training.  The EMA warms up
            (``ddim.models.ema.ema_decay_at``; ``--no-ema-warmup`` for the official rule).
  eval   -- Table 1: FID of N samples (default 5,000) against the training set for eta in {0, 1, hat}
            and S in {10, 20, 50, 100} (quadratic timesteps as the paper for CIFAR-10, the same x_T for every cell), FID-vs-S plot and
            sample grids; Table 2: reconstruction error of test images encoded to x_T with eta = 0 and
            decoded back, per-dimension MSE in [0, 1] units; and a numerics check: eta = 0, S = 50
            sampled in fp32 eager from the same noise as the bf16 fast path (pixel differences, FID).

  report -- tables.md and the plots again from OUT/results.json (no model, no GPU).
  export -- OUT/ema.pt (or --to): the EMA weights, the U-Net config and the step count, what sampling and the
            benchmarks' --ckpt need, a quarter of ckpt.pt's size (no training weights, no Adam moments).

    python scripts/cifar10_gpu.py train --minutes 7 --out /tmp/run
    python scripts/cifar10_gpu.py eval --out /tmp/run --weights pt_inception.pth
    python scripts/cifar10_gpu.py eval --out /tmp/run --weights pt_inception.pth --resume   # after a cut
    python scripts/cifar10_gpu.py export --out /tmp/run          # /tmp/run/ema.pt for bench/*.py --ckpt

Every finished cell is written to OUT/results.json at once; ``--resume`` computes only the missing ones, so
an eval longer than one command's time limit runs as several commands.

The data is the JPEG (q75) CIFAR-10 copy in ../shared/data, so FIDs are comparable with each other, not
with published CIFAR-10 FIDs. See scripts/cifar10_gpu.sh for the command that made docs/results/cifar10.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddim.accel import inference as perf
from ddim.diffusion import alphas_cumprod as make_alphas_cumprod
from ddim.diffusion import SOLVERS, beta_schedule, encode, sample, solve, steps_for_nfe_on, timesteps
from ddim.evaluation.tasks import parse_eta
from ddim.models import UNet
from ddim.models.ema import ema_initial_share_note, ema_warmup_of

CIFAR10 = dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.1, in_channels=3, resolution=32, resamp_with_conv=True)
TINY = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
            dropout=0.1, in_channels=3, resolution=32, resamp_with_conv=True)


def load_split(pack: str, split: str, limit: int | None = None) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) images of one split, decoded from the JPEG pack with Pillow."""
    from PIL import Image

    d = np.load(pack)
    header = d["jpeg_header"].tobytes()
    scans, offsets = d[f"{split}_scans"], d[f"{split}_offsets"]
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    xs = [np.asarray(Image.open(io.BytesIO(header + scans[offsets[k]:offsets[k + 1]].tobytes())).convert("RGB"))
          for k in range(n)]
    return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()


def load_ema_unet(path: str | Path) -> tuple[UNet, dict]:
    """The EMA weights of a ``train`` checkpoint in a U-Net of its config (CPU, eval mode), and the checkpoint."""
    ck = torch.load(path, map_location="cpu", weights_only=False)  # our own file; holds a TorchVersion
    model = UNet(**ck["unet"])
    model.load_state_dict(ck["ema"])
    if "ema_decay" in ck:  # runs from before ema_warmup was recorded trained without it
        note = ema_initial_share_note(ck["ema_decay"], ck["steps"], ema_warmup_of(ck))
        if note:
            log(f"warning: {path}: {note}; its samples are worse than the training reached")
    return model.eval(), ck


def to_model(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float() / 127.5 - 1.0


def to_u8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- train


def train(args) -> None:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    config = TINY if args.tiny else CIFAR10
    x_train = load_split(args.data, "train", args.limit).to(device)
    log(f"train images {tuple(x_train.shape)} on {device} ({time.time() - t_start:.1f}s)")
    n, b = x_train.shape[0], min(args.batch, x_train.shape[0])
    prev = resume_training(args, config, b, out / "ckpt.pt") if args.resume else None
    torch.manual_seed(args.seed)
    model = UNet(**config).to(device)
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    step = perf.DiffusionTrainStep(model, ac, lr=args.lr, grad_clip=1.0, ema_decay=args.ema,
                                   ema_warmup=args.ema_warmup, fast=args.fast,
                                   backend=args.backend, compile_mode=args.compile_mode or None)
    losses, it, spent = [], 0, 0.0
    perm, pos = torch.randperm(n, device=device), 0
    if prev is not None:  # go on exactly where the saved run stopped: weights, Adam moments, data order, RNG
        step.model.load_state_dict(prev["model"])
        step.ema.load_state_dict(prev["ema"])
        step.optimizer.load_state_dict(prev["optimizer"])
        losses, it, spent = prev["losses"], prev["steps"], prev["train_seconds"]
        step.ema_updates = it
        perm, pos = prev["perm"].to(device), prev["pos"]
        torch.set_rng_state(prev["rng"]["cpu"])
        if device.type == "cuda" and prev["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(prev["rng"]["cuda"], device)
        log(f"resumed at step {it} ({spent:.0f}s trained) from {out / 'ckpt.pt'}")
    budget, every = args.minutes * 60, args.save_minutes * 60
    start_it = logged_at = it
    t0 = saved_at = time.time()
    loss_acc = torch.zeros((), device=device)

    def save() -> float:
        """OUT/ckpt.pt with everything ``--resume`` needs; returns the seconds trained so far."""
        perf.synchronize(device)
        run_s = time.time() - t0
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        ckpt = dict(ema={k: v.detach().cpu() for k, v in step.ema.state_dict().items()},
                    model={k: v.detach().cpu() for k, v in step.model.state_dict().items()},
                    optimizer=step.optimizer.state_dict(), perm=perm.cpu(), pos=pos, rng=rng,
                    unet=config, steps=it, train_seconds=spent + run_s, ema_decay=args.ema,
                    ema_warmup=args.ema_warmup, lr=args.lr, batch=b,
                    limit=args.limit, losses=losses, machine=perf.device_info(device))
        torch.save(ckpt, out / "ckpt.pt.tmp")
        (out / "ckpt.pt.tmp").replace(out / "ckpt.pt")  # a cut while saving keeps the previous checkpoint
        json.dump(dict(steps=it, train_seconds=spent + run_s, it_per_s=(it - start_it) / run_s, losses=losses,
                       batch=b, ema=args.ema, ema_warmup=args.ema_warmup, resumed_from=start_it or None,
                       machine=perf.device_info(device),
                       command=" ".join(sys.argv)),
                  open(out / "train.json", "w"), indent=1)
        return run_s

    while not (args.max_steps and it >= args.max_steps):
        if pos + b > n:
            perm, pos = torch.randperm(n, device=device), 0
        idx = perm[pos:pos + b]
        pos += b
        x0 = to_model(x_train[idx])
        flip = torch.rand(b, 1, 1, 1, device=device) < 0.5
        x0 = torch.where(flip, x0.flip(3), x0)
        loss_acc += step(x0)
        it += 1
        now = time.time()  # host clock, no sync: checked every step, so the budget holds to a few steps
        if it % args.log_every == 0 or it == start_it + 1 or it == args.max_steps or now - t0 > budget:
            mean_loss = (loss_acc / (it - logged_at)).item()  # the steps since the last line; one sync per line
            loss_acc.zero_()
            logged_at = it
            el = time.time() - t0
            losses.append(dict(step=it, loss=mean_loss, seconds=spent + el))
            log(f"step {it} loss {mean_loss:.2f} ({(it - start_it) / el:.1f} it/s)")
        if now - t0 > budget:
            break
        if every and now - saved_at > every:  # a run cut from outside (a job's time limit) keeps this much
            save()
            saved_at = time.time()
            log(f"step {it}: saved {out / 'ckpt.pt'}")
    run_s = save()
    log(f"trained {it - start_it} steps in {run_s:.0f}s ({(it - start_it) / run_s:.1f} it/s), {it} in all; "
        f"saved {out / 'ckpt.pt'}")


def resume_training(args, config: dict, batch: int, path: Path) -> dict:
    """The checkpoint a ``train --resume`` goes on from, refused (unchanged on disk) when its settings differ."""
    if not path.is_file():
        raise SystemExit(f"train --resume: no checkpoint at {path}; run train without --resume first")
    prev = torch.load(path, map_location="cpu", weights_only=False)  # our own file; holds a TorchVersion
    if "optimizer" not in prev:
        raise SystemExit(f"train --resume: {path} has no optimizer state (written before training could resume); "
                         f"train anew without --resume")
    want = dict(unet=config, ema_decay=args.ema, ema_warmup=args.ema_warmup, lr=args.lr, batch=batch,
                limit=args.limit)
    had = dict(prev, ema_warmup=ema_warmup_of(prev))
    differ = [f"{k}: checkpoint {had.get(k)!r}, now {v!r}" for k, v in want.items() if had.get(k) != v]
    if differ:
        raise SystemExit(f"train --resume: {path} was trained with other settings ({'; '.join(differ)}); "
                         f"give the checkpoint's settings or train anew without --resume")
    if args.max_steps and prev["steps"] >= args.max_steps:
        raise SystemExit(f"train --resume: {path} already has {prev['steps']} steps, not below "
                         f"--max-steps {args.max_steps}")
    return prev


# ----------------------------------------------------------------------------- eval


def fid_of(images_u8: torch.Tensor, ref_u8: torch.Tensor, args) -> float | None:
    if args.no_fid:
        return None
    from ddim.evaluation.fid import fid_between

    res = fid_between(images_u8, ref_u8, ref_key=args.ref_key, weights_path=args.weights, cache_dir=args.cache,
                      device=args.device)
    return float(res["fid"] if isinstance(res, dict) else res)


def generate(eps, x_T: torch.Tensor, ac, S: int, eta, batch: int, seed: int, trajectory: str,
             kind: str = "ddim") -> torch.Tensor:
    ts = timesteps(len(ac), S, trajectory)
    outs = []
    gen = torch.Generator(device=x_T.device).manual_seed(seed)
    with torch.no_grad():
        for i in range(0, x_T.shape[0], batch):
            x = (sample(eps, x_T[i:i + batch], ac, ts, eta=eta, generator=gen) if kind == "ddim"
                 else solve(kind, eps, x_T[i:i + batch], ac, ts))
            outs.append(to_u8(x).cpu())
    return torch.cat(outs)


def evaluate(args) -> None:
    from torchvision.utils import save_image

    t_eval = time.time()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    model, ck = load_ema_unet(out / "ckpt.pt")
    model = model.to(device)
    ac = make_alphas_cumprod(beta_schedule("linear", T=1000))
    eps = perf.prepare_for_inference(model, dtype="bf16", backend=args.backend, compile=args.fast) if args.fast else model
    ref = load_split(args.data, "train", args.limit)
    res = ck["unet"]["resolution"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x_T = torch.randn(args.samples, 3, res, res, generator=gen).to(device)
    etas = args.etas
    steps = [int(s) for s in args.steps.split(",")]
    record = dict(command=" ".join(sys.argv), samples=args.samples, reference_images=int(ref.shape[0]), train_steps=ck["steps"],
                  train_seconds=ck["train_seconds"], seed=args.seed, trajectory=args.trajectory, fast=args.fast,
                  machine=perf.device_info(device), table1=[], table2=[])
    spent_before = resume(record, out / "results.json") if args.resume else 0.0

    def save() -> None:  # after every cell: a run cut short keeps what it finished (and --resume goes on)
        record["eval_seconds"] = spent_before + time.time() - t_eval
        json.dump(record, open(out / "results.json", "w"), indent=1)
        write_markdown(record, etas, steps, out / "tables.md")

    # Table 1
    grid_cells = {("0.0", max(steps)), ("1.0", max(steps)), ("0.0", min(steps))}
    for eta in etas:
        for S in steps:
            if any(c["eta"] == str(eta) and c["S"] == S for c in record["table1"]):
                continue  # done by the run this one resumes
            t0 = time.time()
            imgs = generate(eps, x_T, ac, S, eta, args.batch, args.seed + 1, args.trajectory)
            gen_s = time.time() - t0
            t0 = time.time()
            fid = fid_of(imgs, ref, args)
            cell = dict(eta=str(eta), S=S, fid=fid, sample_seconds=gen_s, fid_seconds=time.time() - t0)
            record["table1"].append(cell)
            log(f"eta={eta} S={S}: FID {fid} (sampling {gen_s:.1f}s)")
            if (str(eta), S) in grid_cells:
                save_image(imgs[:64].float() / 255, out / f"samples_eta{eta}_S{S}.png", nrow=8)
            save()

    # FID against network evaluations (beyond the paper): DDIM (eta = 0) and the ODE solvers, same x_T
    if args.nfe:
        record.setdefault("fid_vs_nfe", [])
        for kind in ("ddim",) + SOLVERS:
            for budget in [int(b) for b in args.nfe.split(",")]:
                if any(c["kind"] == kind and c["budget"] == budget for c in record["fid_vs_nfe"]):
                    continue
                try:
                    S, spent = steps_for_nfe_on(kind, budget, len(ac), args.trajectory)
                except ValueError as e:  # budget below the method's minimum: leave the cell empty
                    log(f"{kind} NFE {budget}: skipped ({e})")
                    continue
                t0 = time.time()
                imgs = generate(eps, x_T, ac, S, 0.0, args.batch, args.seed + 1, args.trajectory, kind=kind)
                gen_s = time.time() - t0
                fid = fid_of(imgs, ref, args)
                record["fid_vs_nfe"].append(dict(kind=kind, budget=budget, S=S, nfe=spent, fid=fid, sample_seconds=gen_s))
                log(f"{kind} NFE {spent} (S={S}): FID {fid} (sampling {gen_s:.1f}s)")
                save()

    # numerics: bf16 fast path vs fp32 eager from the same noise, eta = 0, S = 50
    if args.fast and args.fp32_check and "numerics" not in record:
        S = 50
        t0 = time.time()
        fp32 = generate(model, x_T, ac, S, 0.0, args.batch, args.seed + 1, args.trajectory)
        fp32_s = time.time() - t0
        fast = generate(eps, x_T, ac, S, 0.0, args.batch, args.seed + 1, args.trajectory)
        d = (fast.float() - fp32.float()).abs()
        record["numerics"] = dict(S=S, eta=0.0, fp32_sample_seconds=fp32_s, fid_fp32=fid_of(fp32, ref, args),
                                  fid_bf16=next((c["fid"] for c in record["table1"] if c["eta"] == "0.0" and c["S"] == S), None),
                                  u8_mean_abs_diff=d.mean().item(), u8_max_abs_diff=d.max().item(),
                                  u8_p99_abs_diff=torch.quantile(d.flatten()[: 2**24], 0.99).item(),
                                  u8_changed=(d > 0).float().mean().item())
        log(f"numerics: {record['numerics']}")
        save()

    # Table 2: x_0 -> x_T (eta = 0) -> x_0 on test images
    x_test = to_model(load_split(args.data, "test", args.recon)).to(device)
    for S in [int(s) for s in args.recon_steps.split(",")]:
        if any(c["S"] == S for c in record["table2"]):
            continue
        ts = timesteps(len(ac), S, args.trajectory)
        t0 = time.time()
        errs = []
        with torch.no_grad():
            for i in range(0, x_test.shape[0], args.batch):
                x0 = x_test[i:i + args.batch]
                xT = encode(eps, x0, ac, ts)
                rec = sample(eps, xT, ac, ts, eta=0.0)
                errs.append((((rec.clamp(-1, 1) + 1) / 2 - (x0 + 1) / 2) ** 2).mean(dim=(1, 2, 3)).cpu())
        mse = torch.cat(errs).mean().item()
        record["table2"].append(dict(S=S, mse=mse, images=x_test.shape[0], seconds=time.time() - t0))
        log(f"reconstruction S={S}: per-dim MSE {mse:.5f}")
        save()

    if not args.no_fid:
        write_plots(record, out)
    save()
    print((out / "tables.md").read_text())


def resume(record: dict, path: Path) -> float:
    """Take the finished cells of an earlier (possibly cut-short) eval of the same run into ``record``, so
    that only the missing ones are computed; returns the seconds that eval had spent."""
    if not path.is_file():
        return 0.0
    old = json.loads(path.read_text())
    differ = [f"{k}: {old.get(k)!r} there, {record[k]!r} here" for k in ("samples", "train_steps", "reference_images",
                                                                          "seed", "trajectory", "fast")
              if old.get(k) != record[k]]
    if differ:
        raise SystemExit(f"--resume: {path} comes from other settings ({'; '.join(differ)}); run without --resume "
                         f"into another --out, or move that file away (it is left as it is)")
    for key in ("table1", "table2", "fid_vs_nfe", "numerics"):
        if key in old:
            record[key] = old[key]
    record["commands"] = old.get("commands", [old["command"]]) + [record["command"]]
    done = len(record["table1"]) + len(record["table2"]) + len(record.get("fid_vs_nfe", []))
    log(f"resuming {path}: {done} cells done{', numerics done' if 'numerics' in record else ''}")
    return float(old.get("eval_seconds", 0.0))


NAMES = {"ddim": "DDIM (η = 0)", "plms": "PLMS", "dpmpp_2m": "DPM-Solver++(2M)", "heun": "Heun"}


def write_plots(record: dict, out: Path) -> None:
    """fid_vs_S.png from Table 1 and, if measured, fid_vs_nfe.png (x ticks at the NFE budgets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({c["S"] for c in record["table1"]})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for eta in dict.fromkeys(c["eta"] for c in record["table1"]):
        pts = [(c["S"], c["fid"]) for c in record["table1"] if c["eta"] == eta and c["fid"] is not None]
        label = {"hat": "σ̂", "0.0": "η = 0 (DDIM)", "1.0": "η = 1"}.get(eta, f"η = {eta}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("S (sampling steps)")
    ax.set_ylabel(f"FID ({record['samples']:,} samples vs train)")
    ax.set_title(f"CIFAR-10 (JPEG q75), {record['train_steps']} training steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_S.png", dpi=120)
    plt.close(fig)
    cells = [c for c in record.get("fid_vs_nfe", []) if c["fid"] is not None]
    if not cells:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in NAMES:
        pts = [(c["nfe"], c["fid"]) for c in cells if c["kind"] == kind]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=NAMES[kind])
    ax.set_xscale("log")
    ax.set_yscale("log")
    budgets = sorted({c["budget"] for c in cells})  # Heun spends odd NFEs just under a budget: tick budgets only
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fids = [c["fid"] for c in cells]
    ax.set_yticks([t for t in (10, 20, 30, 50, 100, 200, 300, 500) if min(fids) / 1.5 <= t <= max(fids) * 1.5])
    ax.set_xlabel("NFE (network evaluations per image; a point at its NFE spent)")
    ax.set_ylabel(f"FID ({record['samples']:,} samples vs train)")
    ax.set_title(f"CIFAR-10 (JPEG q75), {record['train_steps']} steps, {record.get('trajectory', 'quadratic')} τ")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_nfe.png", dpi=120)
    plt.close(fig)


def report(args) -> None:
    """Tables and plots again from OUT/results.json (no model, no GPU)."""
    out = Path(args.out)
    record = json.loads((out / "results.json").read_text())
    etas = list(dict.fromkeys(c["eta"] for c in record["table1"]))
    write_markdown(record, etas, sorted({c["S"] for c in record["table1"]}), out / "tables.md")
    if any(c["fid"] is not None for c in record["table1"]):
        write_plots(record, out)
    print((out / "tables.md").read_text())


def write_markdown(record: dict, etas, steps, path: Path) -> None:
    t1 = {(c["eta"], c["S"]): c["fid"] for c in record["table1"]}
    name = {"0.0": "η = 0 (DDIM)", "1.0": "η = 1", "hat": "σ̂"}
    lines = [f"Table 1: FID ({record['samples']} samples vs the {record['reference_images']:,} training images), model trained "
             f"{record['train_steps']} steps ({record['train_seconds'] / 60:.1f} min) on {record['machine'].get('gpu')}",
             "", "| | " + " | ".join(f"S = {s}" for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
    for eta in etas:
        row = [t1.get((str(eta), s)) for s in steps]
        lines.append(f"| {name.get(str(eta), str(eta))} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
    lines += ["", "Table 2: reconstruction error x_0 -> x_T -> x_0 (η = 0), per-dimension MSE in [0, 1] units, "
              f"{record['table2'][0]['images'] if record['table2'] else 0} test images", "",
              "| S | " + " | ".join(str(c["S"]) for c in record["table2"]) + " |",
              "| --- |" + " --- |" * len(record["table2"]),
              "| MSE | " + " | ".join(f"{c['mse']:.5f}" for c in record["table2"]) + " |"]
    if record.get("fid_vs_nfe"):
        cells = record["fid_vs_nfe"]
        budgets = sorted({c["budget"] for c in cells})
        lines += ["", f"FID against NFE (η = 0 ODE samplers, same x_T, {record['samples']} samples); a cell reads "
                  "FID, or FID @NFE where the trajectory spent less than the budget", "",
                  "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |", "| --- |" + " --- |" * len(budgets)]
        for kind in NAMES:
            row = {c["budget"]: c for c in cells if c["kind"] == kind}
            if row:
                lines.append(f"| {NAMES[kind]} | " + " | ".join(
                    "-" if b not in row or row[b]["fid"] is None else
                    f"{row[b]['fid']:.2f}" + ("" if row[b]["nfe"] == b else f" @{row[b]['nfe']}") for b in budgets) + " |")
    if "numerics" in record:
        n = record["numerics"]
        lines += ["", f"Numerics (η = 0, S = {n['S']}, same x_T): bf16 fast path vs fp32 eager: mean |Δ| "
                  f"{n['u8_mean_abs_diff']:.3f}, p99 {n['u8_p99_abs_diff']:.0f}, max {n['u8_max_abs_diff']:.0f} "
                  f"(8-bit levels); {n['u8_changed']:.1%} of values changed; FID fp32 "
                  f"{n['fid_fp32']} vs bf16 {n['fid_bf16']}"]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- export

EXPORTED = ("ema", "unet", "steps", "train_seconds", "ema_decay", "ema_warmup", "lr", "batch", "limit", "machine")


def export(args) -> Path:
    """Write the sampling part of OUT/ckpt.pt (``EXPORTED``) to ``args.to`` (default OUT/ema.pt); ``load_ema_unet``
    reads either file.  Written to a temporary file and renamed, so a cut keeps any earlier export."""
    src = Path(args.out) / "ckpt.pt"
    if not src.is_file():
        sys.exit(f"export: no checkpoint at {src}: run `train --out {args.out}` first")
    ck = torch.load(src, map_location="cpu", weights_only=False)
    if not {"ema", "unet", "steps"} <= ck.keys():
        sys.exit(f"export: {src} is not a `train` checkpoint (keys {sorted(ck)}; needs ema, unet, steps)")
    dst = Path(args.to) if args.to else Path(args.out) / "ema.pt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save({k: ck[k] for k in EXPORTED if k in ck}, tmp)
    tmp.replace(dst)
    log(f"exported {src} ({src.stat().st_size / 2**20:.1f} MiB, step {ck['steps']}) to {dst} "
        f"({dst.stat().st_size / 2**20:.1f} MiB)")
    return dst


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "eval", "all", "report", "export"])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpeg_q75.npz"))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net (CPU smoke test)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--minutes", type=float, default=7.0, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--save-minutes", type=float, default=5.0,
                   help="train: write OUT/ckpt.pt every this many minutes too, so a run cut from outside keeps "
                        "its training (0: only at the end)")
    p.add_argument("--batch", type=int, default=None, help="train batch (128) / eval batch (1000)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.9995,
                   help="EMA decay; official 0.9999 averages over ~10k steps, too long for a run of minutes")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA decay min(--ema, (1+n)/(10+n)) (ddim.models.ema.ema_decay_at), so the EMA of a short run "
                        "holds no random initial weights; --no-ema-warmup: the official rule")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--no-fast", dest="fast", action="store_false", help="fp32 eager instead of the fast path")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the training step ('' for default; reduce-overhead = CUDA graphs)")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--etas", default="0,1,hat")
    p.add_argument("--steps", default="10,20,50,100")
    p.add_argument("--trajectory", default="quadratic", choices=["linear", "quadratic"],
                   help="timestep sub-sequence tau; the paper used quadratic for CIFAR-10")
    p.add_argument("--recon-steps", default="10,20,50,100,200", help="S values of Table 2 (the paper: up to 1000)")
    p.add_argument("--recon", type=int, default=1000, help="test images for Table 2")
    p.add_argument("--nfe", default="", help="NFE budgets for FID vs NFE of DDIM and the ODE solvers, e.g. 5,10,20,50")
    p.add_argument("--fp32-check", action="store_true")
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--weights", default=None, help="Inception weights for ddim.evaluation.fid")
    p.add_argument("--cache", default=None, help="FID cache dir (reference statistics)")
    p.add_argument("--ref-key", default="cifar10_jpeg_q75_train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--to", default=None, help="export: the file to write (default OUT/ema.pt)")
    p.add_argument("--resume", action="store_true",
                   help="train: go on from OUT/ckpt.pt (same settings; --minutes more, --max-steps in all); "
                        "eval: keep the finished cells of OUT/results.json (same run and settings), compute the rest")
    a = p.parse_args(argv)
    if a.batch is None:
        a.batch = 1000 if a.stage == "eval" else 128
    if a.resume and a.stage == "all":
        p.error("--resume goes with one stage: `train --resume` trains --minutes more from OUT/ckpt.pt, "
                "`eval --resume` computes the cells missing from OUT/results.json; run them one after the other")
    # fail here, before hours of training or sampling, not at the first cell that uses a bad value
    for name in ("steps", "recon_steps", "nfe"):
        value = getattr(a, name)
        if value and not all(v.strip().isdigit() and int(v) > 0 for v in value.split(",")):
            p.error(f"--{name.replace('_', '-')} must be a comma list of positive integers, got {value!r}")
    try:
        a.etas = [parse_eta(e) for e in a.etas.split(",")]
    except ValueError as e:
        p.error(f"--etas {a.etas!r}: {e}")
    return a


def main(argv=None) -> None:
    args = parse(argv)
    if args.stage in ("train", "all"):
        train(args)
        if args.stage == "all":
            args.batch = 1000
    if args.stage in ("eval", "all"):
        evaluate(args)
    if args.stage == "report":
        report(args)
    if args.stage == "export":
        export(args)


if __name__ == "__main__":
    main()
