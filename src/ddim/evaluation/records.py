"""One small JSON record per finished evaluation run, at a path derived from the run's config.

Sweeps are resumable because the path is a pure function of what determines the result (model,
data set, sampler, task parameters, seed): a re-run finds the record and skips the work. Records are
written atomically (temp file + ``os.replace``), so a crash loses only the run in flight.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from ddim.evaluation.fid import reference_file_id
from ddim.evaluation.settings import ETA_ZERO_TASKS, Loaded, Settings, TaskResult
from ddim.files import write_atomically
from ddim.models.pretrained import release

# settings that change only speed or which files a run writes (``missing_outputs`` checks those): not in the key
NOT_IN_KEY = ("batch_size", "device", "cache_dir", "weights_path", "save_npz", "save_grid", "nrow")


def file_id(path: str) -> dict:
    """Path plus size and modification time: a checkpoint rewritten in place (last.ckpt during training, a copy
    over an old file) is a new model, and must not be answered with the old file's record."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def diffusers_model_id(model_cfg: dict) -> dict:
    """A diffusers model (``evaluate.py pretrained=``): a Hub model by id and commit, a folder by path and its weights
    file's size and modification time; and whether its weights are the EMA ones (None: not known)."""
    src = model_cfg["source"]
    if src.get("hub_id") and src.get("revision"):
        found = {"pretrained": src["hub_id"], "revision": src["revision"]}
    else:
        found = {"pretrained": src["folder"], "size": src["weights_size"], "mtime_ns": src["weights_mtime_ns"]}
    return {**found, "ema": model_cfg.get("ema")}


def model_id(s: Settings, m: Loaded | None = None) -> dict:
    """The model as the record key names it.  Released weights by name: the name, EMA or not and the released
    file's MD5 (the checked content, not where this machine caches it: records compare across machines); ``official``
    too, so tables label them like the same weights given by file."""
    if m is not None and m.model_cfg.get("format") == "diffusers":
        return diffusers_model_id(m.model_cfg)
    if s.pretrained is not None:
        return {"pretrained": s.pretrained, "official": s.pretrained, "use_ema": s.use_ema,
                "md5": release(s.pretrained, s.use_ema).md5}
    if s.official:
        return {"official": s.official, **file_id(s.official_path), "use_ema": s.use_ema}
    f = file_id(s.ckpt_path)
    return {"ckpt": f.pop("path"), **f, "use_ema": s.use_ema}


def record_key(s: Settings, m: Loaded) -> dict[str, Any]:
    """Everything that determines the result (and nothing else): model file, data set (an image folder's place when
    the task reads its images), sampler, task settings, seed.

    Sampler entries that older records lack are left out at their default: ``precision`` (fp32) and
    ``deterministic`` (true; it matters only with bf16 / fp8)."""
    section = s.fid if s.task == "fid" else s.params
    sampler: dict[str, Any] = {"kind": s.kind, "eta": 0.0 if s.task in ETA_ZERO_TASKS else s.eta,
                               "steps": [int(S) for S in s.params["steps"]] if s.task == "consistency" else s.steps,
                               "trajectory": m.trajectory}
    if s.precision != "fp32":
        sampler["precision"] = s.precision
        if not s.deterministic:
            sampler["deterministic"] = False
    key = {"task": s.task, "dataset": m.dataset_key, "model": model_id(s, m), "seed": s.seed,
           "params": task_params(section), "sampler": sampler}
    if s.reads_data and m.data_folder:  # scored against an image folder's images: which folder counts
        key["data_folder"] = m.data_folder
    return key


def task_params(section: dict[str, Any]) -> dict[str, Any]:
    """The task section's entries that change the result. ``fid.ref_stats`` enters as the file's name and content
    hash (``ref_split`` is then unused), and not at all when null, so records made before the option keep their
    keys."""
    params = {k: v for k, v in section.items() if k not in NOT_IN_KEY}
    if params.get("ref_stats"):
        params["ref_stats"] = reference_file_id(params["ref_stats"])
        params.pop("ref_split", None)
    else:
        params.pop("ref_stats", None)
    return params


def config_key(key: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict (sorted keys, so dict order does not matter)."""
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _slug(s: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s)).strip("-") or "none"


def record_path(records_dir: str | Path, key: dict[str, Any]) -> Path:
    """``<records_dir>/<task>/<dataset>/<kind>_eta<eta>_S<steps>_<trajectory>_<hash>.json``: readable and unique."""
    s = key.get("sampler", {})
    name = (f"{_slug(s.get('kind', 'ddim'))}_eta{_slug(s.get('eta'))}_S{_slug(s.get('steps'))}_"
            f"{_slug(s.get('trajectory'))}_{config_key(key)}.json")
    return Path(records_dir) / _slug(key.get("task")) / _slug(key.get("dataset")) / name


def load_record(path: str | Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when absent or unreadable (a torn file counts as not done)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "metric" in rec else None


def missing_outputs(s: Settings, done: dict[str, Any]) -> list[str]:
    """The files this run asks for that the finished record ``done`` has not got (never made, or deleted since):
    options such as ``samples.save_npz`` change what a run writes, not its result, so they are not in the key."""
    outputs = done.get("outputs") or {}
    wanted: list[tuple[str, str]] = []
    if s.task in ("samples", "interpolation", "consistency"):
        wanted.append(("grid", "the grid PNG"))
    if s.task == "samples" and s.params.get("save_npz"):
        wanted.append(("npz", "samples.npz (samples.save_npz=true)"))
    if s.task == "fid" and s.fid.get("save_grid"):
        wanted.append(("grid", "the grid PNG of the first samples (fid.save_grid=true)"))
    missing = [what for name, what in wanted if not outputs.get(name) or not Path(outputs[name]).is_file()]
    if s.task == "samples" and outputs.get("grid") and Path(outputs["grid"]).is_file():
        old_nrow = ((done.get("config") or {}).get("samples") or {}).get("nrow")
        if old_nrow != s.params.get("nrow"):
            missing.append(f"a grid with samples.nrow={s.params.get('nrow')} (the recorded one has nrow={old_nrow})")
    return missing


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (``ddim.files.write_atomically``), readable by the team as
    every other output is (the umask's permissions)."""
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    return write_atomically(path, lambda f: f.write(text.encode()))


def iter_records(records_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable record under ``records_dir`` (recursively), each with its ``_path``."""
    out = []
    for p in sorted(Path(records_dir).rglob("*.json")):
        rec = load_record(p)
        if rec is not None:
            rec["_path"] = str(p)
            out.append(rec)
    return out


def device_info() -> dict:
    info = {"host": socket.gethostname(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def record(s: Settings, key: dict[str, Any], path: Path, result: TaskResult, wall_time_s: float) -> dict[str, Any]:
    """Write the finished run's record to ``path``, send it to the configured loggers, print a summary line."""
    rec = {"task": s.task, "key": key, "metric": result.metric, "nfe": result.nfe, "num_samples": result.num_images,
           "wall_time_s": round(wall_time_s, 3), "device": device_info(), "outputs": result.outputs,
           "output_dir": s.output_dir, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": s.config}
    write_record(path, rec)
    rec["record_path"] = str(path)
    log_to_loggers(s.loggers, rec)
    sp = result.outputs.get("sampling") or {}
    rate = (f", {sp['images_per_s']:,.0f} images/s after the first batch on {sp['world_size']} device(s)"
            if sp.get("images_per_s") else "")
    print(f"{s.task}: {result.metric or result.outputs} ({result.num_images} samples, NFE {result.nfe}, "
          f"{wall_time_s:.1f}s{rate}) -> {path}")
    return rec


def log_to_loggers(loggers: dict, rec: dict[str, Any]) -> None:
    """Send the metric and any grid image to the configured Lightning loggers (W&B, CSV, ...)."""
    for logger_cfg in (loggers or {}).values():
        if logger_cfg is None:
            continue
        lg = instantiate(logger_cfg)
        lg.log_hyperparams({"task": rec["task"], **rec["key"]["sampler"], "seed": rec["key"]["seed"]})
        if rec["metric"]:
            lg.log_metrics({f"{rec['task']}/{k}": v for k, v in rec["metric"].items()})
        grid = rec["outputs"].get("grid")
        if grid and hasattr(lg, "log_image"):
            lg.log_image(key=f"{rec['task']}/grid", images=[grid])
        lg.finalize("success")
        exp = getattr(lg, "experiment", None)
        if exp is not None and hasattr(exp, "finish"):
            exp.finish()
