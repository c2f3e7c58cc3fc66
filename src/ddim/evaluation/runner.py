"""What ``evaluate.py`` does with its Hydra config: validate, skip if done, load, run one task, record.

Everything that can be wrong with the input (task, η, S, trajectory, precision, keys nothing reads, counts, switches,
device, checkpoint path, Inception weights, FID reference statistics, the folders results go to) is checked by
``validate``
before the model is read; ``load`` checks the rest against the model (S against its T, its image shape against the
data set) before the first network evaluation, so a bad sweep entry fails in seconds, not hours.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ddim.accel import fp8_supported, prepare_for_inference
from ddim.checkpoints import load_for_sampling
from ddim.config import as_bool, check_known_keys, check_positive_int, check_writable_dir, log_lightning_once
from ddim.data import DATASET_KEYS, DATASETS
from ddim.diffusion import timesteps
from ddim.diffusion.solvers import SOLVERS, nfe
from ddim.evaluation import records
from ddim.evaluation.fid import check_weights_file, read_reference_statistics
from ddim.evaluation.settings import (ETA_ZERO_TASKS, PRECISIONS, SECTION_KEYS, TRAJECTORIES, Loaded,
                                      Settings, default_trajectory, parse_eta, reads_data)
from ddim.evaluation.tasks import TASKS, fid_grid, with_fid_defaults
from ddim.models import OFFICIAL_CONFIGS
from ddim.models.diffusers_format import check_diffusers_source, is_diffusers_source, load_diffusers_for_sampling
from ddim.models.pretrained import DIFFUSERS_SOURCES, DOWNLOADABLE_NAMES, check_pretrained_name, fetch

# the official configs' data set names -> this project's
OFFICIAL_DATASETS = {"CIFAR10": "cifar10", "CELEBA": "celeba", "LSUN": "lsun"}
REMOVED_SAMPLER_OPTIONS = ("fast", "fp8", "fp8_max_width")


def resolve_device(name: Any, setting: str = "device") -> str:
    """``auto`` / null: cuda when available, else cpu; a CUDA device on a machine without CUDA is refused."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{setting}={name} but CUDA is not available on this machine; allowed here: auto, cpu")
    return str(name)


def check_sampler(kind: Any, eta: float | str, steps: Any, trajectory: Any) -> None:
    """The sampler settings that do not depend on the model (S against T: ``check_steps_fit``)."""
    kinds = ("ddim", *SOLVERS)  # read when called: a solver registered in ddim.diffusion.SOLVERS is one too
    if kind not in kinds:
        raise ValueError(f"sampler.kind must be one of {', '.join(kinds)}, got {kind!r}")
    check_positive_int(steps, "sampler.steps (S)")
    if trajectory is not None and trajectory not in TRAJECTORIES:
        raise ValueError(f"sampler.trajectory must be one of {', '.join(TRAJECTORIES)} (or null: the data set's "
                         f"default), got {trajectory!r}")
    if kind != "ddim":
        if eta != 0.0:
            raise ValueError(f"sampler.kind={kind} is a deterministic ODE solver; it needs sampler.eta=0, got {eta!r}")
        nfe(kind, steps)  # raises a clear error when S is too small for the method


def check_precision(sampler: DictConfig, device: str) -> tuple[str, bool]:
    """(sampler.precision, sampler.deterministic); fp8 only where ``ddim.accel`` has FP8 kernels for ``device``."""
    old = [k for k in REMOVED_SAMPLER_OPTIONS if k in sampler]
    if old:
        raise ValueError(f"sampler.{old[0]} was replaced by sampler.precision ({' | '.join(PRECISIONS)}): "
                         f"sampler.fast=true is precision=bf16, sampler.fp8=true precision=fp8")
    precision = sampler.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"sampler.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    deterministic = as_bool(sampler.get("deterministic", True), "sampler.deterministic")
    if precision == "fp8" and not fp8_supported(device):
        raise ValueError(f"sampler.precision=fp8 needs a CUDA GPU with FP8 matrix units (compute capability 8.9+: "
                         f"Ada, Hopper or later); device {device} has none: use sampler.precision=bf16")
    return precision, deterministic


def check_task_settings(task: str, cfg: DictConfig) -> None:
    """The task's own config section (and fid's Inception weights), checked before anything is loaded."""
    if task == "fid":
        check_positive_int(cfg.fid.num_samples, "fid.num_samples", allow_none=True)  # null: the data set's default
        if cfg.fid.num_samples is not None and cfg.fid.num_samples < 2:
            raise ValueError(f"fid.num_samples must be >= 2 (FID needs a covariance), got {cfg.fid.num_samples}")
        check_positive_int(cfg.fid.batch_size, "fid.batch_size")
        if cfg.fid.get("weights_path"):
            check_weights_file(cfg.fid.weights_path)  # exists and starts like a torch.save file
        if cfg.fid.get("ref_stats"):
            read_reference_statistics(cfg.fid.ref_stats)  # file, arrays, shapes, finite: before any sampling
        as_bool(cfg.fid.get("save_grid", False), "fid.save_grid")
    elif task == "samples":
        check_positive_int(cfg.samples.num_samples, "samples.num_samples")
        check_positive_int(cfg.samples.get("nrow"), "samples.nrow", allow_none=True)
        as_bool(cfg.samples.get("save_npz", False), "samples.save_npz")
    elif task == "reconstruction":
        check_positive_int(cfg.reconstruction.num_images, "reconstruction.num_images", allow_none=True)
        if cfg.sampler.kind != "ddim":
            raise ValueError(f"task=reconstruction encodes and decodes with DDIM's η = 0 ODE (the paper's Table 2); "
                             f"sampler.kind={cfg.sampler.kind} is not used there: leave sampler.kind=ddim")
    elif task == "interpolation":
        check_positive_int(cfg.interpolation.num_pairs, "interpolation.num_pairs")
        check_positive_int(cfg.interpolation.num_alphas, "interpolation.num_alphas")
    elif task == "consistency":
        raw = cfg.consistency.steps
        if not isinstance(raw, ListConfig) or not raw:  # a bare 5 or "abc" would fail later as "not iterable"
            raise ValueError(f"consistency.steps must be a non-empty list of step counts S (one grid column each), "
                             f"e.g. consistency.steps=[10,20,50]; got {raw!r}")
        steps = list(raw)
        for S in steps:
            check_positive_int(S, f"consistency.steps entry (in {steps})")
        check_positive_int(cfg.consistency.num_samples, "consistency.num_samples")


def dataset_override(cfg: DictConfig, task: str) -> dict | None:
    """``dataset=`` as a plain dict (None when not given), refused when a value it needs is unset (``???``, e.g.
    ``dataset=image_folder`` without ``dataset.root``); a task that reads no images does without the folder."""
    if cfg.get("dataset") is None:
        return None
    check_known_keys(cfg.dataset, DATASET_KEYS, "dataset")
    unset = [k for k in cfg.dataset if OmegaConf.is_missing(cfg.dataset, k)]
    needed = [k for k in unset if k != "root" or reads_data(task, cfg.fid)]
    if needed:
        raise ValueError(f"dataset.{needed[0]} must be set: dataset={cfg.dataset.get('name')} has no default for it; "
                         f"pass dataset.{needed[0]}=<value>" + (" (the folder of images, any depth)"
                                                                if needed[0] == "root" else ""))
    return {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in unset}


def check_pretrained_source(cfg: DictConfig) -> None:
    """``pretrained=`` and no other model: a diffusers model (Hub id ``owner/name`` or a folder) in form, or a
    released name that can be downloaded; checked before any download."""
    others = [f"{k}={cfg.get(k)}" for k in ("ckpt_path", "official", "official_path") if cfg.get(k)]
    if others:
        raise ValueError(f"two models given: pretrained={cfg.pretrained} and {others[0]}; pass one")
    if is_diffusers_source(cfg.pretrained):
        check_diffusers_source(cfg.pretrained)
    else:
        check_pretrained_name(cfg.pretrained)


def newest_train_checkpoint(log_dir: str | os.PathLike) -> Path:
    """The most recently written ``last.ckpt`` of train.py's runs under ``log_dir`` (single runs
    ``train/<dataset>/<time>/checkpoints/`` and multiruns ``train/multirun/<time>/<n>/checkpoints/``), so that
    ``python train.py && python evaluate.py`` evaluates the model just trained; a FileNotFoundError when none."""
    runs = Path(log_dir) / "train"
    found = [p for p in runs.glob("**/checkpoints/last.ckpt") if p.is_file()] if runs.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no model given and no train.py checkpoint (checkpoints/last.ckpt) under {runs}: run python train.py "
            f"first, or pass ckpt_path=<checkpoint written by train.py>, pretrained=<{'|'.join(DOWNLOADABLE_NAMES)}> "
            f"(released weights, downloaded once) or pretrained=<{DIFFUSERS_SOURCES}>, or "
            f"official=<{'|'.join(OFFICIAL_CONFIGS)}> official_path=<file> (paths.log_dir sets the folder searched)")
    return max(found, key=lambda p: p.stat().st_mtime_ns)


def resolve_train_checkpoint(ckpt_path: Any, log_dir: str | os.PathLike) -> str:
    """``ckpt_path``, checked to exist; when not given, the newest train.py ``last.ckpt`` (said on stdout)."""
    if not ckpt_path:
        ckpt_path = newest_train_checkpoint(log_dir)
        print(f"no model given: evaluating the newest train.py checkpoint {ckpt_path}")
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint not found: ckpt_path={ckpt_path}")
    return str(ckpt_path)


def check_model_source(cfg: DictConfig) -> str | None:
    """Exactly one model: ``ckpt_path=`` (train.py; none given: the newest run's ``last.ckpt``), ``pretrained=`` (a
    released name, a Hub id or a diffusers folder) or ``official=`` + ``official_path=``, and its file exists (or,
    for ``pretrained=``, it is known). Returns the train.py checkpoint to load (None for the others)."""
    if cfg.get("pretrained") is not None:
        check_pretrained_source(cfg)
        return None
    if cfg.get("official"):
        if cfg.get("ckpt_path"):
            raise ValueError(f"two models given: ckpt_path={cfg.ckpt_path} and official={cfg.official}; pass one")
        if cfg.official not in OFFICIAL_CONFIGS:
            raise ValueError(f"official must be one of {sorted(OFFICIAL_CONFIGS)}, got {cfg.official!r}")
        path = cfg.get("official_path")
        if not path:
            raise ValueError(f"official={cfg.official} needs official_path=<the released .ckpt/.pth file>")
        if not Path(path).is_file():
            raise FileNotFoundError(f"official checkpoint not found: official_path={path}")
        return None
    return resolve_train_checkpoint(cfg.get("ckpt_path"), cfg.paths.log_dir)


def validate(cfg: DictConfig) -> Settings:
    """Every check that needs no file read and no model: the run's ``Settings``, or a ValueError naming the value."""
    task = cfg.get("task")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    sampler = cfg.sampler
    eta = parse_eta(sampler.eta)
    check_sampler(sampler.kind, eta, sampler.steps, sampler.get("trajectory"))
    check_positive_int(sampler.batch_size, "sampler.batch_size")
    device = resolve_device(cfg.get("device"))
    precision, deterministic = check_precision(sampler, device)
    if task not in SECTION_KEYS:  # a task added to TASKS alone (docs/extending.md)
        raise ValueError(f"task={task} lists no settings: add SECTION_KEYS[{task!r}] = (its section's keys) in "
                         f"ddim.evaluation.settings")
    for name in ("sampler", "fid", task):
        check_known_keys(cfg.get(name) or {}, SECTION_KEYS[name], name)
    check_task_settings(task, cfg)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    use_ema = as_bool(cfg.use_ema, "use_ema")
    trust = as_bool(cfg.get("trust_checkpoint", False), "trust_checkpoint")
    check_writable_dir(cfg.records_dir, "records_dir")
    check_writable_dir(cfg.output_dir, "output_dir")
    ckpt_path = check_model_source(cfg)
    if task in ETA_ZERO_TASKS and eta != 0.0:
        print(f"note: task={task} decodes with η = 0 (deterministic DDIM); sampler.eta={sampler.eta} is not used")
    fid = OmegaConf.to_container(cfg.fid, resolve=True)
    if task == "fid":
        fid["device"] = resolve_device(fid.get("device"), "fid.device")  # Inception's device
    section = cfg.get(task)
    return Settings(
        task=task, kind=sampler.kind, eta=eta, steps=int(sampler.steps), trajectory=sampler.get("trajectory"),
        batch_size=int(sampler.batch_size), precision=precision, deterministic=deterministic, seed=int(cfg.seed),
        device=device, use_ema=use_ema, ckpt_path=ckpt_path, official=cfg.get("official"),
        official_path=cfg.get("official_path"), pretrained=cfg.get("pretrained"), trust_checkpoint=trust,
        dataset=dataset_override(cfg, task),
        data_dir=str(cfg.paths.data_dir),
        params=OmegaConf.to_container(section, resolve=True) if section is not None else {},
        fid=fid, trainer=OmegaConf.to_container(cfg.trainer, resolve=True), records_dir=str(cfg.records_dir),
        skip_done=as_bool(cfg.get("skip_done", True), "skip_done"), output_dir=str(cfg.output_dir),
        loggers=OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {},
        config={**OmegaConf.to_container(cfg, resolve=True), "ckpt_path": ckpt_path})


def dataset_config(s: Settings, model_cfg: dict) -> dict:
    """The data set to evaluate against: ``dataset=`` when given, else the one the checkpoint was trained on, with
    any ``+dataset.<key>=`` given over it (``+dataset.root=<folder>``: its images are somewhere else here)."""
    given = dict(s.dataset or {})
    if given.get("name"):
        return given
    if model_cfg.get("official"):
        d = dict(model_cfg["model"]["data"])
        d = {"name": OFFICIAL_DATASETS[d["dataset"]], "image_size": d["image_size"], "channels": d["channels"],
             "category": d.get("category")}
    else:
        d = dict(model_cfg.get("data") or {})
    d.update(given)
    if not d.get("name"):
        raise ValueError("the checkpoint does not record its data set; pass dataset=<name> (e.g. dataset=cifar10)")
    spec = DATASETS.get(d["name"])
    if spec is not None and spec.by_place and not d.get("root") and s.reads_data:
        raise ValueError(
            f"the checkpoint was trained on dataset={d['name']}, whose folder it does not record, and task={s.task} "
            f"reads its images: pass +dataset.root=<folder of images>, or dataset={d['name']} dataset.root=<folder> "
            f"dataset.image_size={d.get('image_size')} dataset.channels={d.get('channels', 3)} (the checkpoint's "
            f"values)")
    sub = spec.data_subdir if spec is not None else ""  # conf/dataset/<name>.yaml's root under paths.data_dir
    d.setdefault("root", str(Path(s.data_dir) / sub) if sub else s.data_dir)
    d.setdefault("channels", 3)
    return d


def check_image_shape(eps_model: nn.Module, data: dict) -> tuple[int, int, int]:
    """(C, H, W) of the data set's images; refused unless the network takes that many channels at that size.
    Read off the built network, so it holds alike for train.py checkpoints and the official configs."""
    want = (int(eps_model.in_channels), int(eps_model.resolution))
    have = (int(data.get("channels", 3)), int(data["image_size"]))
    if want != have:
        raise ValueError(f"dataset={data['name']} has {have[0]}-channel {have[1]}x{have[1]} images but the model takes "
                         f"{want[0]}-channel {want[1]}x{want[1]} ones; drop dataset= to use the checkpoint's own data set")
    return have[0], have[1], have[1]


def check_steps_fit(s: Settings, T: int) -> None:
    """S (and every consistency S) within the model's T diffusion steps."""
    steps = [("sampler.steps", s.steps)]
    if s.task == "consistency":
        steps += [("consistency.steps entry", int(S)) for S in s.params["steps"]]
    for name, S in steps:
        if S > T:
            raise ValueError(f"{name}={S} exceeds the model's T={T} diffusion steps (allowed: 1..{T})")
        if s.kind != "ddim":
            nfe(s.kind, S)


def load(s: Settings) -> Loaded:
    """The ε-model (fp32, as saved), ᾱ and the data set, checked against each other and against the sampler."""
    if is_diffusers_source(s.pretrained):  # the Hub's DDPM models, or a diffusers folder
        eps_model, alphas_cumprod, model_cfg = load_diffusers_for_sampling(
            str(s.pretrained), map_location=s.device, need_dataset=s.dataset is None)
    elif s.pretrained is not None:
        eps_model, alphas_cumprod, model_cfg = load_for_sampling(
            fetch(s.pretrained, ema=s.use_ema), use_ema=s.use_ema, map_location=s.device, format="official",
            config=s.pretrained)
    elif s.official:
        eps_model, alphas_cumprod, model_cfg = load_for_sampling(
            s.official_path, use_ema=s.use_ema, map_location=s.device, format="official", config=s.official,
            trust=s.trust_checkpoint)
    else:
        eps_model, alphas_cumprod, model_cfg = load_for_sampling(s.ckpt_path, use_ema=s.use_ema, map_location=s.device,
                                                                  trust=s.trust_checkpoint)
    data = dataset_config(s, model_cfg)
    shape = check_image_shape(eps_model, data)
    T = int(alphas_cumprod.numel())
    check_steps_fit(s, T)
    trajectory = s.trajectory or default_trajectory(data["name"])
    return Loaded(eps_model=eps_model, alphas_cumprod=alphas_cumprod, model_cfg=model_cfg, data=data, shape=shape,
                  trajectory=trajectory, seq=timesteps(T, s.steps, kind=trajectory))


# One inference copy per process: a multirun sweep (Table 1's twelve cells in one process) compiles the model once,
# not once per cell.  Keyed by the model file and the settings that shape the copy; one model at a time is kept.
PREPARED: dict[str, nn.Module] = {}


def for_precision(eps_model: nn.Module, s: Settings, model_key: dict) -> nn.Module:
    """fp32: the model itself (the exact reference); bf16 / fp8: ``ddim.accel``'s inference copy with that preset,
    reused by later runs of this process on the same model file and settings."""
    if s.precision == "fp32":
        return eps_model
    cache_key = json.dumps([model_key, s.precision, s.deterministic, str(s.device)], sort_keys=True, default=str)
    if cache_key not in PREPARED:
        PREPARED.clear()
        PREPARED[cache_key] = prepare_for_inference(eps_model, s.precision, deterministic=s.deterministic)
    return PREPARED[cache_key]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.task``; returns the record (also written to the records folder), ``{"rank0": False}`` on other
    ranks, or the earlier record with ``skipped`` when this configuration was done before and has every output
    asked for now (else the missing ones are made, and the message says which)."""
    log_lightning_once()
    settings = validate(cfg)
    loaded = load(settings)
    settings = with_fid_defaults(settings, loaded)
    key = records.record_key(settings, loaded)
    path = records.record_path(settings.records_dir, key)
    done = records.load_record(path) if settings.skip_done else None
    missing = records.missing_outputs(settings, done) if done is not None else []
    if done is not None and not missing:
        print(f"skipped: already done ({path})")
        return {**done, "skipped": True}
    loaded.eps_model = for_precision(loaded.eps_model, settings, key["model"])
    if done is not None:
        print(f"{path} is done, but lacks what this run asks for: {'; '.join(missing)}. "
              + ("Writing the grid (no new FID run)" if settings.task == "fid" else "Running it again (same seed: "
                 "the same images)") + f" into {settings.output_dir}")
        if settings.task == "fid":
            return add_fid_grid(settings, loaded, done, path)
    t0 = time.time()
    result = TASKS[settings.task](settings, loaded)
    if result is None:  # not rank 0: rank 0 merges, scores and records
        return {"rank0": False}
    return records.record(settings, key, path, result, time.time() - t0)


def add_fid_grid(s: Settings, loaded: Loaded, done: dict[str, Any], path: Path) -> dict[str, Any]:
    """A finished FID record made without ``fid.save_grid``: its grid, added to the record; the FID stays."""
    grid = fid_grid(s, loaded)
    if grid is None:
        return {"rank0": False}
    done["outputs"] = {**(done.get("outputs") or {}), **grid}
    records.write_record(path, done)
    print(f"fid: grid {grid['grid']} added to {path}")
    return {**done, "record_path": str(path)}
