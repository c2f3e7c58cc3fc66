"""One small JSON record per finished evaluation run, at a path derived from the run's config.

Sweeps are resumable because the path is a pure function of what determines the result (model,
data set, sampler, task parameters, seed): a re-run finds the record and skips the work. Records are
written atomically (temp file + ``os.replace``), so a crash loses only the run in flight.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a team shares its sweep results
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def iter_records(records_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable record under ``records_dir`` (recursively), each with its ``_path``."""
    out = []
    for p in sorted(Path(records_dir).rglob("*.json")):
        rec = load_record(p)
        if rec is not None:
            rec["_path"] = str(p)
            out.append(rec)
    return out
