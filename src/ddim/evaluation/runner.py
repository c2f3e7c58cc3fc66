"""What ``evaluate.py`` does with its Hydra config: validate, skip if done, load, run one task, record.

Everything that can be wrong with the input (task, η, S, trajectory, checkpoint, Inception weights, data
set) is checked before the first network evaluation, so a bad sweep entry fails in seconds, not hours.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddim.diffusion.solvers import nfe as solver_nfe, nfe_on
from ddim.checkpoints import load_for_sampling
from ddim.config import as_bool, check_positive_int
from ddim.evaluation import records as rec
from ddim.evaluation import tasks as T

# official checkpoint name -> (data set name, image size, LSUN category)
OFFICIAL_DATA = {"cifar10": ("cifar10", 32, None), "celeba": ("celeba", 64, None),
                 "church": ("lsun", 256, "church_outdoor"), "bedroom": ("lsun", 256, "bedroom")}


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def _dataset_cfg(cfg: DictConfig, model_cfg: dict) -> dict:
    """The data set to evaluate against: ``dataset=`` when given, else the one the checkpoint was trained on."""
    if cfg.get("dataset") is not None:
        return OmegaConf.to_container(cfg.dataset, resolve=True)
    data_dir = Path(cfg.paths.data_dir)
    if model_cfg.get("official"):
        name, size, category = OFFICIAL_DATA[model_cfg["official"]]
        d = {"name": name, "image_size": size, "channels": 3, "category": category}
    else:
        d = dict(model_cfg.get("data") or {})
        if not d.get("name"):
            raise ValueError("the checkpoint does not record its data set; pass dataset=<name> (e.g. dataset=cifar10)")
    sub = {"cifar10": "cifar10", "lsun": "lsun"}.get(d["name"])
    d.setdefault("root", str(data_dir / sub) if sub else str(data_dir))
    d.setdefault("channels", 3)
    return d


def _load_model(cfg: DictConfig, device: str):
    if cfg.get("official"):
        if cfg.get("ckpt_path"):
            raise ValueError(f"two models given: ckpt_path={cfg.ckpt_path} and official={cfg.official}; pass one")
        path = cfg.get("official_path")
        if not path:
            raise ValueError(f"official={cfg.official} needs official_path=<the released .ckpt/.pth file>")
        if cfg.official not in OFFICIAL_DATA:
            raise ValueError(f"official must be one of {sorted(OFFICIAL_DATA)}, got {cfg.official!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"official checkpoint not found: official_path={path}")
        return load_for_sampling(path, use_ema=cfg.use_ema, map_location=device, format="official", config=cfg.official)
    path = cfg.get("ckpt_path")
    if not path:
        raise ValueError("no model given: pass ckpt_path=<checkpoint written by train.py> "
                         "or official=<cifar10|celeba|church|bedroom> official_path=<file>")
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: ckpt_path={path}")
    return load_for_sampling(path, use_ema=cfg.use_ema, map_location=device)


def _file_id(path: str) -> dict:
    """Path plus size and modification time: a checkpoint rewritten in place (last.ckpt during training, a copy
    over an old file) is a new model, and must not be answered with the old file's record."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _model_id(cfg: DictConfig) -> dict:
    if cfg.get("official"):
        return {"official": cfg.official, **_file_id(cfg.official_path), "use_ema": bool(cfg.use_ema)}
    f = _file_id(cfg.ckpt_path)
    return {"ckpt": f.pop("path"), **f, "use_ema": bool(cfg.use_ema)}


def _check_task_settings(cfg: DictConfig, task: str) -> None:
    """The task's own settings, checked before anything is loaded (so a bad sweep entry fails at once)."""
    as_bool(cfg.sampler.get("fast", False), "sampler.fast")
    as_bool(cfg.sampler.get("deterministic", True), "sampler.deterministic")
    if as_bool(cfg.sampler.get("fp8", False), "sampler.fp8") and not as_bool(cfg.sampler.get("fast", False),
                                                                              "sampler.fast"):
        raise ValueError("sampler.fp8=true is a variant of the fast path: give sampler.fast=true as well")
    width = cfg.sampler.get("fp8_max_width", 0)
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 0):
        raise ValueError(f"sampler.fp8_max_width must be a map width in pixels, an int >= 0 (0 or null: every block "
                         f"in e4m3), got {width!r}")
    check_positive_int(cfg.sampler.batch_size, "sampler.batch_size")
    if task == "samples":
        check_positive_int(cfg.samples.num_samples, "samples.num_samples")
    elif task == "reconstruction":
        check_positive_int(cfg.reconstruction.num_images, "reconstruction.num_images", allow_none=True)
        if cfg.sampler.kind != "ddim":
            raise ValueError(f"task=reconstruction encodes and decodes with DDIM's η = 0 ODE (the paper's Table 2); "
                             f"sampler.kind={cfg.sampler.kind} is not used there: leave sampler.kind=ddim")
    elif task == "interpolation":
        check_positive_int(cfg.interpolation.num_pairs, "interpolation.num_pairs")
        check_positive_int(cfg.interpolation.num_alphas, "interpolation.num_alphas")
    elif task == "consistency":
        steps = list(cfg.consistency.steps or [])
        if not steps:
            raise ValueError("consistency.steps must be a non-empty list of S values, got []")
        for S in steps:
            check_positive_int(S, f"consistency.steps entry (in {steps})")
        check_positive_int(cfg.consistency.num_samples, "consistency.num_samples")
    dev = cfg.get("device")
    if dev not in (None, "auto") and str(dev).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={dev} but CUDA is not available on this machine; allowed here: auto, cpu")


def _task_params(cfg: DictConfig, task: str) -> dict:
    section = cfg.get(task)
    p = OmegaConf.to_container(section, resolve=True) if section is not None else {}
    # settings that change only speed or where files go do not change the result
    for k in ("batch_size", "device", "cache_dir", "weights_path", "save_npz", "save_grid", "nrow"):
        p.pop(k, None)
    return p


def _device_info() -> dict:
    info = {"host": socket.gethostname(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.task``; returns the record (also written to the records folder unless not rank 0)."""
    from ddim.config import log_lightning_once

    log_lightning_once()
    task = cfg.get("task")
    if task not in T.EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(T.EVAL_TASKS)}")
    T_eta = T.parse_eta(cfg.sampler.eta)  # cheap checks before touching any file
    _check_task_settings(cfg, task)
    if task in ("reconstruction", "interpolation", "consistency") and T_eta != 0.0:
        print(f"note: task={task} decodes with η = 0 (deterministic DDIM); sampler.eta={cfg.sampler.eta} is not used")
    if task == "fid":
        if int(cfg.fid.num_samples) < 2:
            raise ValueError(f"fid.num_samples must be >= 2, got {cfg.fid.num_samples}")
        wp = cfg.fid.get("weights_path")
        if wp and not Path(wp).is_file():
            raise FileNotFoundError(f"Inception weights not found: fid.weights_path={wp}")
    device = _device(cfg.get("device"))
    eps_model, alphas_cumprod, model_cfg = _load_model(cfg, device)
    n_T = int(alphas_cumprod.numel())
    data = _dataset_cfg(cfg, model_cfg)
    m = model_cfg.get("model") or {}
    want = (m.get("in_channels"), m.get("resolution"))
    have = (int(data.get("channels", 3)), int(data["image_size"]))
    if None not in want and tuple(int(v) for v in want) != have:
        raise ValueError(f"dataset={data['name']} has {have[0]}-channel {have[1]}x{have[1]} images but the model takes "
                         f"{want[0]}-channel {want[1]}x{want[1]} ones; drop dataset= to use the checkpoint's own data set")
    trajectory = cfg.sampler.get("trajectory") or T.default_trajectory(data["name"])
    eta, steps = T.check_sampler(kind=cfg.sampler.kind, eta=T_eta, steps=cfg.sampler.steps, trajectory=trajectory, T=n_T)
    if task == "consistency":
        for S in cfg.consistency.steps:
            T.check_sampler(kind=cfg.sampler.kind, eta=0.0, steps=S, trajectory=trajectory, T=n_T)
    shape = (int(data.get("channels", 3)), int(data["image_size"]), int(data["image_size"]))

    key = {"task": task, "dataset": f"{data['name']}{'-' + data['category'] if data.get('category') else ''}"
                                   f"-{data['image_size']}",
           "model": _model_id(cfg), "seed": int(cfg.seed), "params": _task_params(cfg, task),
           "sampler": {"kind": cfg.sampler.kind, "eta": eta, "steps": steps, "trajectory": trajectory}}
    if task in ("reconstruction", "interpolation", "consistency"):
        key["sampler"]["eta"] = 0.0  # these decode with the deterministic DDIM (η = 0) whatever η says
    if task == "consistency":  # its S values are consistency.steps; sampler.steps is not used
        key["sampler"]["steps"] = [int(S) for S in cfg.consistency.steps]
    fast = cfg.sampler.get("fast", False)  # a bool: checked in _check_task_settings
    deterministic = cfg.sampler.get("deterministic", True)  # a bool: checked in _check_task_settings
    compiled = str(device).startswith("cuda")
    group_norm = None
    if fast:  # bf16 changes the images a little, so it is part of the key (absent = fp32, as older records)
        key["sampler"]["fast"] = True
        if not deterministic:  # timed kernel choices: other images again (absent = deterministic)
            key["sampler"]["deterministic"] = False
        from ddim.accel import inference as perf

        group_norm = perf.default_inference_group_norm(compiled)
        if group_norm == "kernel":  # its sums differ at the bf16 rounding level (absent = the earlier fast path)
            key["sampler"]["group_norm"] = "kernel"
    fp8 = fast and cfg.sampler.get("fp8", False)  # a bool: checked in _check_task_settings
    fp8_max_width = (cfg.sampler.get("fp8_max_width") or 0) if fp8 else 0  # checked there too
    if fp8:
        from ddim.accel import fp8 as fp8_mod

        if not fp8_mod.supported(device):
            raise ValueError(f"sampler.fp8=true needs a CUDA GPU with FP8 matrix units (compute capability 8.9+: "
                             f"Ada, Hopper or later); device {device} has none: drop sampler.fp8")
        key["sampler"]["fp8"] = True  # e4m3 moves the images (~4 levels on average): records of their own
        if fp8_max_width:  # the widest blocks in bf16: other images again (absent = every block in e4m3)
            key["sampler"]["fp8_max_width"] = fp8_max_width
    path = rec.record_path(cfg.records_dir, key)
    if cfg.get("skip_done", True):
        done = rec.load_record(path)
        if done is not None:
            print(f"skipped: already done ({path})")
            done["skipped"] = True
            return done

    if fast:
        # bf16 autocast + channels_last (+ torch.compile on CUDA): FID-neutral on the CIFAR-10 run of
        # docs/results/cifar10 (20.46 vs 20.36 fp32), ~4x the fp32 throughput on an H200 (docs/results/bench).
        # Compiled in Inductor's deterministic mode (prepare_for_inference's default): every process (GPU) and
        # every run picks the same kernels, so the same x_T gives the same images
        # GroupNorm+SiLU as one Triton kernel per sample on CUDA (ddim.accel.groupnorm: +7 % on an H200, deterministic)
        # the first and last convolutions as matrix products, the weights cast to bf16 once, the upsampling's
        # phase interleave written into the skip concatenation (+2-4 % together, H200), and the ResnetBlocks'
        # time-embedding projections as one product (the same images bit for bit, +0.1-0.7 %)
        # sampler.fp8: the ResnetBlocks' 3x3 convolutions in e4m3 (ddim.accel.fp8), with CUDA graphs (their custom ops'
        # host work otherwise competes with the device).  In every block: softer samples (FID +2.0 at S = 10 on a
        # 47,000-step CIFAR-10 model, from the 32x32 blocks); those blocks in bf16 (sampler.fp8_max_width=16):
        # FID-neutral, 667 vs 637 images/s on an H200 (docs/results/bench, sixteenth and seventeenth rounds)
        eps_model = perf.prepare_for_inference(eps_model, dtype="bf16", compile=compiled, group_norm=group_norm,
                                               deterministic=deterministic, fp8=bool(fp8),
                                               fp8_max_width=fp8_max_width,
                                               compile_mode="reduce-overhead" if fp8 and compiled else None)

    ref_ds = test_ds = None
    weights = None
    from ddim.data import build_dataset

    kw = {k: v for k, v in data.items() if k not in ("name", "split", "batch_size", "num_workers", "train_steps")}
    kw.update(random_flip=False, uniform_dequantization=False)
    if task == "fid":
        weights = T._resolve_weights(cfg.fid.get("weights_path"), cfg.fid.get("cache_dir"))
        ref_ds = build_dataset(data["name"], split=cfg.fid.get("ref_split", "train"), **kw)
    if task == "reconstruction":
        test_ds = build_dataset(data["name"], split=cfg.reconstruction.split, **kw)

    out_dir = Path(cfg.output_dir)
    seq = T.make_timesteps(n_T, steps, trajectory)
    bs = int(cfg.sampler.batch_size)
    t0 = time.time()
    metric: dict[str, Any]
    outputs: dict[str, Any] = {}
    if task in ("fid", "samples"):
        n = int(cfg.fid.num_samples) if task == "fid" else int(cfg.samples.num_samples)
        tk = OmegaConf.to_container(cfg.trainer, resolve=True)
        sampling: dict[str, Any] = {}
        images = T.generate(eps_model, alphas_cumprod, seq, n, shape, eta=eta, kind=cfg.sampler.kind, seed=int(cfg.seed),
                            batch_size=bs, shard_dir=out_dir / "shards", trainer_kwargs=tk, stats=sampling)
        if images is None:  # not rank 0: rank 0 merges, scores and records
            return {"rank0": False}
        outputs["sampling"] = sampling  # images/s after the first batch (compilation) on every device, summed
        if task == "fid":
            ref_key = f"{key['dataset']}-{cfg.fid.get('ref_split', 'train')}"
            res = T.fid_task(images, ref_ds, ref_key=ref_key, weights_path=weights, cache_dir=cfg.fid.get("cache_dir"),
                             device=_device(cfg.fid.get("device")), batch_size=int(cfg.fid.batch_size))
            metric = {"fid": float(res["fid"])}
            outputs["fid_details"] = {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
            if cfg.fid.get("save_grid"):
                outputs.update(T.samples_task(images[:64], out_dir=out_dir, save_npz=False))
        else:
            outputs.update(T.samples_task(images, out_dir=out_dir, nrow=cfg.samples.get("nrow"),
                                          save_npz=bool(cfg.samples.save_npz)))
            metric = {}
        num = n
    elif task == "reconstruction":
        res = T.reconstruction_task(eps_model, alphas_cumprod, seq, test_ds, num_images=cfg.reconstruction.num_images,
                                    batch_size=bs, device=device, kind="ddim")
        metric, num = {"mse": res["mse"]}, res["num_images"]
    elif task == "interpolation":
        res = T.interpolation_task(eps_model, alphas_cumprod, seq, shape, out_dir=out_dir, seed=int(cfg.seed),
                                   num_pairs=int(cfg.interpolation.num_pairs),
                                   num_alphas=int(cfg.interpolation.num_alphas), device=device, batch_size=bs,
                                   kind=cfg.sampler.kind)
        metric, num, outputs = {}, res["num_images"], {"grid": res["grid"]}
    else:  # consistency
        res = T.consistency_task(eps_model, alphas_cumprod, list(cfg.consistency.steps), shape, trajectory=trajectory,
                                 out_dir=out_dir, num_samples=int(cfg.consistency.num_samples), seed=int(cfg.seed),
                                 device=device, batch_size=bs, kind=cfg.sampler.kind)
        metric, num, outputs = {}, res["num_images"], {"grid": res["grid"]}
    wall = time.time() - t0

    # network evaluations per image: the decode (after the trajectory's repeat removal); reconstruction also
    # spends len(seq) on the encode, consistency one decode per S in its list
    if task == "reconstruction":
        nfe = 2 * len(seq)
    elif task == "consistency":
        nfe = sum(nfe_on(cfg.sampler.kind, S, n_T, trajectory) for S in cfg.consistency.steps)
    else:
        nfe = solver_nfe(cfg.sampler.kind, len(seq))

    record = {"task": task, "key": key, "metric": metric, "nfe": nfe, "num_samples": num, "wall_time_s": round(wall, 3),
              "device": _device_info(), "outputs": outputs, "output_dir": str(out_dir),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": OmegaConf.to_container(cfg, resolve=True)}
    rec.write_record(path, record)
    record["record_path"] = str(path)
    _log(cfg, record)
    sp = outputs.get("sampling") or {}
    rate = (f", {sp['images_per_s']:,.0f} images/s after the first batch on {sp['world_size']} device(s)"
            if sp.get("images_per_s") else "")
    print(f"{task}: {metric or outputs} ({num} samples, NFE {nfe}, {wall:.1f}s{rate}) -> {path}")
    return record


def _log(cfg: DictConfig, record: dict) -> None:
    """Send the metric and any grid image to the configured loggers (W&B, CSV, ...)."""
    loggers = cfg.get("logger") or {}
    if not loggers:
        return
    from hydra.utils import instantiate

    for lc in loggers.values():
        if lc is None:
            continue
        lg = instantiate(lc)
        lg.log_hyperparams({"task": record["task"], **record["key"]["sampler"], "seed": record["key"]["seed"]})
        if record["metric"]:
            lg.log_metrics({f"{record['task']}/{k}": v for k, v in record["metric"].items()})
        grid = record["outputs"].get("grid")
        if grid and hasattr(lg, "log_image"):
            lg.log_image(key=f"{record['task']}/grid", images=[grid])
        lg.finalize("success")
        exp = getattr(lg, "experiment", None)
        if exp is not None and hasattr(exp, "finish"):
            exp.finish()
