"""Crash-safe file writes, the one copy every writer uses (checkpoints, sweep records, FID statistics caches, the
converted Inception weights).

``write_atomically(dst, write)`` lets ``write`` fill a temporary file in ``dst``'s own folder (never ``$TMPDIR``:
a rename across file systems is a copy), flushes and fsyncs it, ``os.replace``s it over ``dst`` and fsyncs the
folder: a kill or power loss at any moment leaves either the old file or the new one, never a partial file.  A kill
can leave the temporary behind; ``remove_stray_temporaries`` clears them."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

# the temporaries' names: ".<target name>.tmp<pid>"
TEMPORARY_PATTERN = re.compile(r"^\..+\.tmp\d+$")


def _temporary_name(dst: Path) -> Path:
    """Where ``write_atomically`` stages ``dst``: beside it, hidden, named after this process."""
    return dst.with_name(f".{dst.name}.tmp{os.getpid()}")


def fsync_directory(path: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(dst: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace ``dst`` by what ``write`` writes into the binary file it is given, atomically (see the module's
    docstring); ``dst``'s folder is created if missing.  The file gets the permissions of a plain ``open`` (0o666
    less the umask), so a team shares what one member writes.  Returns ``dst`` as a Path."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(dst)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(dst.parent)
    return dst


def remove_stray_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries that killed ``write_atomically`` calls left in ``directory``; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stray = [p for p in directory.iterdir() if TEMPORARY_PATTERN.match(p.name) and p.is_file()]
    for p in stray:
        p.unlink(missing_ok=True)
    return stray
