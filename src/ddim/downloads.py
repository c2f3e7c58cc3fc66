"""Downloads that land only with their known content: the released DDIM checkpoints, the FID Inception weights.

``download_verified`` fetches with ``torch.hub.download_url_to_file`` (its progress bar; no HTTP code of ours) into a
staging file beside the target, checks the staging file's hash, then ``os.replace``s it into place: a killed,
truncated or corrupt download never leaves a file at the target path.  A kill can leave staging files behind (ours and
torch's ``.partial``); the next download into the same folder removes those whose process is gone.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HASH_ALGORITHMS: tuple[str, ...] = ("md5", "sha1", "sha256")
# A staging file of another host that has not changed for this long belongs to a download that died.
STALE_AFTER_S = 24 * 3600
# ".<target>.<host>-<pid>.download", and torch.hub's ".<uuid hex>.partial" beside it
STAGING_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.download"
                             r"(\.[0-9a-f]+\.partial)?$")


class DownloadError(RuntimeError):
    """The URL could not be fetched (no network, HTTP error, connection closed before the end)."""


class HashMismatchError(ValueError):
    """A file's content is not the known one."""


def default_cache_dir() -> Path:
    """``$DDIM_CACHE_DIR`` or ``~/.cache/ddim``: downloaded and converted weights, reference statistics."""
    return Path(os.environ.get("DDIM_CACHE_DIR") or Path.home() / ".cache" / "ddim").expanduser()


_DIGESTS: dict[tuple[str, int, int, str], str] = {}


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """Hex digest of a file, memoized per (path, size, mtime): a large file is read once per process."""
    if algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"hash algorithm must be one of {', '.join(HASH_ALGORITHMS)}, got {algorithm!r}")
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, algorithm)
    if key not in _DIGESTS:
        h = hashlib.new(algorithm, usedforsecurity=False)
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def check_file_hash(path: str | os.PathLike, expected: str, algorithm: str, what: str) -> None:
    """Raise ``HashMismatchError`` unless the file's digest is ``expected``; ``what`` names the file in the message."""
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise HashMismatchError(f"{what} has {algorithm} {actual}, expected {expected.lower()}")


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()).strip("-") or "host"


def staging_path(dst: Path) -> Path:
    """This process's staging file for ``dst``: hidden, in ``dst``'s folder (an ``os.replace`` there is atomic)."""
    return dst.with_name(f".{dst.name}.{_host_tag()}-{os.getpid()}.download")


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: rely on the age rule there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[Path]:
    """Delete the staging files that killed downloads left in ``folder`` (this host's whose process is gone, any
    host's untouched for ``STALE_AFTER_S``); a download in flight in another process is left alone.  Returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, now, removed = _host_tag(), time.time(), []
    for p in folder.iterdir():
        match = STAGING_PATTERN.match(p.name)
        if match is None or not p.is_file():
            continue
        pid = int(match["pid"])
        dead = match["host"] == host and pid != os.getpid() and not _process_alive(pid)
        if dead or now - p.stat().st_mtime > STALE_AFTER_S:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def socket_timeout(seconds: float | None) -> Iterator[None]:
    """``torch.hub.download_url_to_file`` has no timeout argument; without one an air-gapped host can hang for
    minutes.  ``seconds`` bounds each socket operation (connect, each read), not the whole download."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def download_verified(url: str, dst: str | os.PathLike, expected: str, algorithm: str = "md5", *,
                      progress: bool = True, timeout: float | None = None) -> Path:
    """Download ``url`` to ``dst`` only if its ``algorithm`` digest is ``expected``.

    Raises ``DownloadError`` (naming the URL) when the transfer fails and ``HashMismatchError`` when the content
    differs; in both cases nothing is left at ``dst`` or in staging.  ``dst``'s folder is created."""
    if algorithm not in HASH_ALGORITHMS:
        raise ValueError(f"hash algorithm must be one of {', '.join(HASH_ALGORITHMS)}, got {algorithm!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dst.parent)
    staging = staging_path(dst)
    try:
        try:
            with socket_timeout(timeout):
                torch.hub.download_url_to_file(url, str(staging), progress=progress)
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, IncompleteRead, timeouts, OSError...
            raise DownloadError(f"downloading {url} failed: {type(e).__name__}: {e}") from e
        try:
            check_file_hash(staging, expected, algorithm, what=f"the file downloaded from {url}")
        except HashMismatchError as e:
            raise HashMismatchError(f"{e}: not kept (a corrupt transfer, or the file at the URL changed)") from None
        os.replace(staging, dst)
    finally:
        staging.unlink(missing_ok=True)
    return dst
