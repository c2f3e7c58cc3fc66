"""The checkpoints released with the official DDIM code, by name: downloaded on first use, MD5-checked, cached.

The list is the official code's own (``functions/ckpt_util.py`` of github.com/ermongroup/ddim): the DDPM models
converted to PyTorch, with EMA and without, for CIFAR-10 and LSUN bedroom, cat and church (bare state dicts that
``ddim.checkpoints.load_official_for_sampling`` reads with the matching ``OFFICIAL_CONFIGS`` entry).  The CelebA 64x64
model is released only as a Google-Drive folder, with no direct link: its name is known, and asking for it says how
to fetch it by hand.

Files live under ``$DDIM_CACHE_DIR/diffusion_models_converted/`` (default ``~/.cache/ddim``) in the official code's
own layout.  A cached file is MD5-checked once per process before use (about a second for the largest, a small
cost beside loading it): a file put there by hand under the wrong name (EMA and non-EMA files share their file
name) is refused instead of silently giving other numbers.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from ddim.downloads import (DownloadError, HashMismatchError, check_file_hash, default_cache_dir,
                            download_verified)

__all__ = ["Release", "RELEASES", "MANUAL_RELEASES", "PRETRAINED_NAMES", "DOWNLOADABLE_NAMES", "DIFFUSERS_SOURCES",
           "check_pretrained_name", "release", "cached_path", "fetch"]


@dataclass(frozen=True)
class Release:
    """One released file: where it is, where it goes under the cache, and its MD5."""

    url: str
    relpath: str   # under <cache>/diffusion_models_converted/ (the official code's layout)
    md5: str


CACHE_SUBDIR = "diffusion_models_converted"
# Per socket operation; a stalled connection fails after this long instead of hanging.
DOWNLOAD_TIMEOUT_S = 60.0

#: (name in ``OFFICIAL_CONFIGS``, EMA weights?) -> the released file.
RELEASES: dict[tuple[str, bool], Release] = {
    ("cifar10", True): Release("https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
                               "ema_diffusion_cifar10_model/model-790000.ckpt", "1fa350b952534ae442b1d5235cce5cd3"),
    ("cifar10", False): Release("https://heibox.uni-heidelberg.de/f/869980b53bf5416c8a28/?dl=1",
                                "diffusion_cifar10_model/model-790000.ckpt", "82ed3067fd1002f5cf4c339fb80c4669"),
    ("bedroom", True): Release("https://heibox.uni-heidelberg.de/f/b95206528f384185889b/?dl=1",
                               "ema_diffusion_lsun_bedroom_model/model-2388000.ckpt",
                               "1921fa46b66a3665e450e42f36c2720f"),
    ("bedroom", False): Release("https://heibox.uni-heidelberg.de/f/f179d4f21ebc4d43bbfe/?dl=1",
                                "diffusion_lsun_bedroom_model/model-2388000.ckpt", "f70280ac0e08b8e696f42cb8e948ff1c"),
    ("cat", True): Release("https://heibox.uni-heidelberg.de/f/0701aac3aa69457bbe34/?dl=1",
                           "ema_diffusion_lsun_cat_model/model-1761000.ckpt", "646f23f4821f2459b8bafc57fd824558"),
    ("cat", False): Release("https://heibox.uni-heidelberg.de/f/fac870bd988348eab88e/?dl=1",
                            "diffusion_lsun_cat_model/model-1761000.ckpt", "bbee0e7c3d7abfb6e2539eaf2fb9987b"),
    ("church", True): Release("https://heibox.uni-heidelberg.de/f/44ccb50ef3c6436db52e/?dl=1",
                              "ema_diffusion_lsun_church_model/model-4432000.ckpt",
                              "fdc68a23938c2397caba4a260bc2445f"),
    ("church", False): Release("https://heibox.uni-heidelberg.de/f/2711a6f712e34b06b9d8/?dl=1",
                               "diffusion_lsun_church_model/model-4432000.ckpt", "eb619b8a5ab95ef80f94ce8a5488dae3"),
}

#: Released without a direct download link: name -> the page to fetch it from by hand.
MANUAL_RELEASES: dict[str, str] = {
    "celeba": "https://drive.google.com/drive/folders/1si6Gn3U2ZrggnfYXOESWVFIwcNbyfh5o",
}

PRETRAINED_NAMES: tuple[str, ...] = tuple(sorted({name for name, _ in RELEASES} | set(MANUAL_RELEASES)))
#: The names ``pretrained=`` can fetch (not CelebA's): what messages offer.
DOWNLOADABLE_NAMES: tuple[str, ...] = tuple(sorted({name for name, _ in RELEASES}))
#: What else evaluate.py's ``pretrained=`` takes (``ddim.models.diffusers_format``).
DIFFUSERS_SOURCES = "a diffusers model: a Hub id owner/name (e.g. google/ddpm-cifar10-32) or a local diffusers folder"

NON_EMA_NOTE = ("use_ema=false: the non-EMA release. The paper's FIDs were measured with the EMA weights; the "
                "non-EMA ones score far worse (CIFAR-10: FID about 12 instead of about 3), so these numbers are not "
                "comparable with the paper's")


def _option(name: str, ema: bool) -> str:
    return f"pretrained={name}" + ("" if ema else " use_ema=false")


def check_pretrained_name(name: object) -> None:
    """Raise a ValueError unless ``name`` is a released checkpoint that can be downloaded: unknown names list the
    allowed ones; CelebA's says how to fetch it by hand.  Reads and downloads nothing."""
    if not isinstance(name, str) or "/" in name or name not in PRETRAINED_NAMES:
        hint = (" (Hub ids and paths are not released names; for a file use official=<name> official_path=<file>)"
                if isinstance(name, str) and "/" in name else "")
        raise ValueError(f"pretrained={name!r} is not a released name{hint}; allowed: {', '.join(DOWNLOADABLE_NAMES)} "
                         f"(downloaded by name; celeba only by hand: official=celeba official_path=<file>), or "
                         f"{DIFFUSERS_SOURCES}")
    if name in MANUAL_RELEASES:
        raise ValueError(
            f"pretrained={name}: this model is released only as a Google-Drive folder, with no direct download link, "
            f"so it cannot be fetched by name. By hand: (1) open {MANUAL_RELEASES[name]} (linked from the official "
            f"DDIM README) in a browser; (2) download the checkpoint it holds (ckpt.pth, the official training state "
            f"with its EMA weights); (3) run: python evaluate.py official={name} official_path=/path/to/ckpt.pth "
            f"(use_ema=true, the default, takes the EMA weights in it)")


def release(name: str, ema: bool = True) -> Release:
    """The released file for ``name`` (EMA or not), after ``check_pretrained_name``."""
    check_pretrained_name(name)
    return RELEASES[(name, bool(ema))]


def cached_path(name: str, *, ema: bool = True, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``fetch`` keeps (and looks for) the file: ``<cache_dir>/diffusion_models_converted/<official layout>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / CACHE_SUBDIR / release(name, ema).relpath


def fetch(name: str, *, ema: bool = True, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The released checkpoint ``name`` (EMA weights unless ``ema=False``): the cached file, downloaded on first use.

    Raises ValueError for names that are not released (or only by hand: CelebA), ``HashMismatchError`` when the
    download or a cached file is not the released one, ``DownloadError`` (naming the URL, the cache path to put the
    file at by hand and the ``official=`` way) when it cannot be downloaded."""
    rel = release(name, ema)
    path = cached_path(name, ema=ema, cache_dir=cache_dir)
    if not ema:
        warnings.warn(f"{_option(name, ema)}: {NON_EMA_NOTE}", stacklevel=2)
    if path.is_file():
        try:
            check_file_hash(path, rel.md5, "md5", what=f"the cached {path}")
        except HashMismatchError as e:
            raise HashMismatchError(
                f"{_option(name, ema)}: {e}: not the released file (corrupt, or another file put there by hand; the "
                f"EMA and non-EMA files share their file name). Delete it to download again, or put the file from "
                f"{rel.url} there") from None
        return path
    print(f"{_option(name, ema)}: downloading {rel.url} to {path}", file=sys.stderr)
    try:
        return download_verified(rel.url, path, rel.md5, "md5", progress=progress, timeout=DOWNLOAD_TIMEOUT_S)
    except DownloadError as e:
        raise DownloadError(
            f"{_option(name, ema)}: cannot download the released checkpoint ({e}). Without internet here: download "
            f"{rel.url} elsewhere (md5 {rel.md5}) and either put it at {path} (then {_option(name, ema)} uses it) "
            f"or pass the file itself: python evaluate.py official={name} official_path=<file>") from e
    except HashMismatchError as e:
        raise HashMismatchError(f"{_option(name, ema)}: {e}") from e
