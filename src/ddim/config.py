"""Config values as plain Python and the checks every entry point shares (one copy each).

Each check raises a ValueError that names the setting, the value given and what is allowed."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(d: Any) -> Any:
    """OmegaConf / tuples -> plain dicts and lists, so checkpoints load with ``weights_only=True``."""
    if isinstance(d, (DictConfig, ListConfig)):
        return OmegaConf.to_container(d, resolve=True)
    if isinstance(d, dict):
        return {str(k): plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [plain(v) for v in d]
    return d


def as_bool(value: Any, name: str) -> bool:
    """A config switch: true/false (Hydra's parse) only, so ``fast.compile=maybe`` is an error, not True."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false, got {value!r}")


def check_positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    """Raise a ValueError naming the setting unless ``value`` is an integer >= 1 (or None when allowed)."""
    if not (value is None and allow_none):
        check_int_at_least(value, name, 1, or_null=allow_none)


def check_int_at_least(value: Any, name: str, minimum: int, maximum: int | None = None,
                       or_null: bool = False) -> int:
    """``value`` if it is an integer in [minimum, maximum], else a ValueError naming the setting: for counts (where
    0 may mean off) and seeds, which ``int()`` would otherwise refuse with a bare "invalid literal"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None
                                                                                    and value > maximum):
        allowed = ("a positive integer" if (minimum, maximum) == (1, None) else
                   f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]")
        raise ValueError(f"{name} must be {allowed}{' or null' if or_null else ''}, got {value!r}")
    return value


def check_known_keys(section: Any, allowed: Sequence[str], name: str) -> None:
    """Refuse keys nothing reads: ``+optim.loss=l1`` would otherwise train the usual loss, and
    ``+sampler.clip=true`` be answered by a record made without it, without a word."""
    unknown = [k for k in section if k not in allowed]
    if unknown:
        raise ValueError(f"{name}.{unknown[0]} is not a setting of {name} (nothing reads it); allowed: "
                         f"{', '.join(allowed)}")


def log_lightning_once() -> None:
    """Lightning's package logger prints to a console handler of its own *and* propagates to the root logger;
    under Hydra, which configures the root (console and the run's log file), every INFO line came out twice.
    With a configured root, Lightning's own console handler is dropped and the root's format is kept."""
    if logging.getLogger().handlers:
        lg = logging.getLogger("lightning")
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)


def check_writable_dir(path: Any, setting: str) -> None:
    """``path`` is a folder this process can write into, or can create: checked before any expensive work, so a run
    never computes results it then cannot save.  Proven by creating the folder and a file in it (root passes
    ``os.access`` even on ``/proc``); what only the check created is removed again, so a refused run leaves nothing."""
    target = Path(str(path)).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{setting}={path} is not a writable folder: {existing} is a file; allowed: a folder this "
                         f"user can create and write in")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{setting}={path} is not writable: no write permission in {existing}; allowed: a folder "
                         f"this user can create and write in (or fix its permissions)")
    missing = [target, *target.parents][:len(target.relative_to(existing).parts)][::-1]
    created: list[Path] = []
    try:
        for d in missing:
            d.mkdir()
            created.append(d)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        raise ValueError(f"{setting}={path} is not writable: {type(e).__name__}: {e.strerror or e}; allowed: a "
                         f"folder this user can create and write in") from None
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):  # another process may have written there meanwhile: kept
                d.rmdir()
