"""evaluate.py's defaults: no model given (the newest train.py ``last.ckpt``), the data set's FID sample count, and
FID against precomputed reference statistics (``fid.ref_stats``).

Tiny random ε-model on 8x8 digits; the Inception network is swapped for pixel statistics as in test_evaluate.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_evaluate import fake_inception, one_thread, pixel_features, records, run_evaluate, tiny_ckpt  # noqa: F401

FEATURES = 6  # pixel_features: per-channel mean and std of RGB images


def put_run(log_dir: Path, run: str, source: Path, mtime: float) -> Path:
    """A copy of ``source`` as train.py's ``<run>/checkpoints/last.ckpt`` under ``log_dir/train``, dated ``mtime``."""
    path = log_dir / "train" / run / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(source, path)
    os.utime(path, (mtime, mtime))
    return path


def test_no_model_evaluates_the_newest_last_ckpt(monkeypatch, tmp_path, tiny_ckpt, capsys):  # noqa: F811
    """Single runs and multiruns alike; the newest by modification time, not by folder name; other snapshots
    (step_*.ckpt) are not last.ckpt and are passed over even when newer."""
    put_run(tmp_path, "digits/2030-01-01_00-00-00-000000", tiny_ckpt, 1_000_000)  # the latest name, an old file
    newest = put_run(tmp_path, "multirun/2020-01-01_00-00-00-000000/1", tiny_ckpt, 3_000_000)
    put_run(tmp_path, "digits/2025-01-01_00-00-00-000000", tiny_ckpt, 2_000_000)
    snapshot = newest.parent / "step_0001000.ckpt"
    shutil.copyfile(tiny_ckpt, snapshot)
    os.utime(snapshot, (4_000_000, 4_000_000))
    run_evaluate(monkeypatch, tmp_path, "task=samples", "samples.num_samples=2", "sampler.steps=2")
    assert f"no model given: evaluating the newest train.py checkpoint {newest}" in capsys.readouterr().out
    (rec,) = records(tmp_path)
    assert rec["key"]["model"]["ckpt"] == str(newest.resolve()) and rec["config"]["ckpt_path"] == str(newest)


def test_no_model_and_no_train_run_names_the_folder_and_the_ways(monkeypatch, tmp_path):
    from ddim.evaluation import runner

    monkeypatch.setattr(runner, "load", lambda *a, **k: pytest.fail("loading started without a model"))
    (tmp_path / "train" / "digits" / "run" / "checkpoints").mkdir(parents=True)  # a run killed before its first save
    with pytest.raises(FileNotFoundError, match=rf"no model given and no train.py checkpoint \(checkpoints/last.ckpt\) "
                                                rf"under {tmp_path / 'train'}: run python train.py first, or pass "
                                                rf"ckpt_path=.*, pretrained=<bedroom\|cat\|church\|cifar10> "
                                                rf"\(released weights, downloaded once\) or pretrained=<a diffusers "
                                                rf"model: a Hub id owner/name .* or a local diffusers folder>, or "
                                                rf"official=<cifar10\|celeba"):
        run_evaluate(monkeypatch, tmp_path, "task=samples")
    assert not (tmp_path / "records").exists()


def test_fid_num_samples_defaults_to_the_data_sets_count():
    """Null: the paper's 50,000, the digits' CPU-sized count; a number given is kept."""
    from ddim.data import DATASETS, PAPER_FID_SAMPLES
    from ddim.evaluation.tasks import fid_num_samples

    assert PAPER_FID_SAMPLES == 50_000 and DATASETS["digits"].fid_samples < 5_000
    assert fid_num_samples({"num_samples": None}, {"name": "cifar10"}) == 50_000
    assert fid_num_samples({"num_samples": None}, {"name": "digits"}) == DATASETS["digits"].fid_samples
    assert fid_num_samples({"num_samples": 12}, {"name": "digits"}) == 12


def test_default_fid_count_and_the_same_count_given_share_a_record(monkeypatch, tmp_path, tiny_ckpt,  # noqa: F811
                                                                     fake_inception, capsys):  # noqa: F811
    from ddim.data import DATASETS

    # the real count samples too long for a test
    monkeypatch.setitem(DATASETS, "digits", dataclasses.replace(DATASETS["digits"], fid_samples=5))
    args = (f"ckpt_path={tiny_ckpt}", "task=fid", "sampler.steps=2", "fid.save_grid=false")
    run_evaluate(monkeypatch, tmp_path, *args)
    (rec,) = records(tmp_path)
    assert rec["num_samples"] == 5 and rec["key"]["params"]["num_samples"] == 5
    run_evaluate(monkeypatch, tmp_path, *args, "fid.num_samples=5")
    assert "skipped: already done" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fid.ref_stats

def stats_file(path: Path, seed: int = 0, **arrays) -> Path:
    """An .npz of Gaussian statistics of FEATURES dimensions (mu, sigma; or the given arrays instead)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(FEATURES, FEATURES))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **(arrays or {"mu": rng.normal(size=FEATURES), "sigma": a @ a.T + np.eye(FEATURES)}))
    return path


@pytest.fixture
def small_features(monkeypatch):
    """Reference statistics of the pixel stand-in's size instead of Inception's 2048."""
    from ddim.evaluation import fid

    monkeypatch.setattr(fid, "FEATURE_DIM", FEATURES)


def test_ref_stats_file_is_the_reference(monkeypatch, tmp_path, tiny_ckpt, fake_inception,  # noqa: F811
                                         small_features):
    """FID against the file's mu and sigma, no pass over the training images; the key names the file and its hash."""
    from ddim.evaluation import tasks
    from ddim.evaluation.fid import feature_statistics, frechet_distance

    ref = stats_file(tmp_path / "stats" / "digits_train.npz")
    generated = []
    stand_in = tasks.fid_between
    monkeypatch.setattr(tasks, "fid_between", lambda gen, ref_stats, **k: generated.append(gen) or stand_in(
        gen, ref_stats, **k))
    monkeypatch.setattr(tasks, "reference_statistics", lambda *a, **k: pytest.fail("the training set was extracted"))
    run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=8", "sampler.steps=2",
                 f"fid.ref_stats={ref}")
    (rec,) = records(tmp_path)
    with np.load(ref) as d:
        expected = frechet_distance(*feature_statistics(pixel_features(generated[0])), d["mu"], d["sigma"])
    assert rec["metric"]["fid"] == pytest.approx(expected, rel=1e-9)
    sha1 = hashlib.sha1(ref.read_bytes()).hexdigest()[:16]
    assert rec["key"]["params"]["ref_stats"] == {"file": "digits_train.npz", "sha1": sha1}
    assert "ref_split" not in rec["key"]["params"]


def test_record_key_tells_references_apart():
    """Another file (or the same name with other contents) is another key; a moved copy is the same; no file: no
    entry, so records made before fid.ref_stats existed keep their keys."""
    import tempfile

    from ddim.evaluation.records import config_key, task_params

    with tempfile.TemporaryDirectory() as d:
        a, b = stats_file(Path(d) / "a" / "ref.npz", seed=0), stats_file(Path(d) / "b" / "ref.npz", seed=1)
        moved = Path(d) / "c" / "ref.npz"
        moved.parent.mkdir()
        shutil.copyfile(a, moved)
        fid = {"num_samples": 8, "ref_split": "train", "batch_size": 200}
        keys = [config_key(task_params({**fid, "ref_stats": str(p)})) for p in (a, b, moved)]
        assert keys[0] != keys[1] and keys[0] == keys[2]
    assert task_params({**fid, "ref_stats": None}) == {"num_samples": 8, "ref_split": "train"}


def test_ref_stats_variants(tmp_path, small_features):
    """pool_3 features (score_sde, DPM-Solver) give their statistics; a (1, D) mu is taken; extra arrays ignored."""
    from ddim.evaluation.fid import feature_statistics, read_reference_statistics
    import torch

    feats = np.random.default_rng(0).normal(size=(20, FEATURES)).astype(np.float32)
    got = read_reference_statistics(stats_file(tmp_path / "pool.npz", pool_3=feats, logits=np.zeros((20, 10))))
    mu, sigma = feature_statistics(torch.from_numpy(feats))
    np.testing.assert_allclose(got["mu"], mu)
    np.testing.assert_allclose(got["sigma"], sigma)
    wide = read_reference_statistics(stats_file(tmp_path / "wide.npz", mu=mu[None], sigma=sigma, mu_s=np.zeros(3)))
    assert wide["mu"].shape == (FEATURES,)


@pytest.mark.parametrize("arrays, error, match", [
    (None, FileNotFoundError, r"fid.ref_stats=.*missing.npz: no such file"),
    ({"mean": np.zeros(FEATURES), "cov": np.eye(FEATURES)}, ValueError,
     r"has the arrays \['mean', 'cov'\]; expected mu and sigma .* or pool_3 features"),
    ({"mu": np.zeros(FEATURES + 1), "sigma": np.eye(FEATURES)}, ValueError,
     rf"mu must have shape \({FEATURES},\) and sigma \({FEATURES}, {FEATURES}\) .* got \({FEATURES + 1},\)"),
    ({"mu": np.zeros(FEATURES), "sigma": np.full((FEATURES, FEATURES), np.nan)}, ValueError,
     r"mu and sigma must be finite"),
    ({"pool_3": np.zeros((4, FEATURES + 2))}, ValueError, r"pool_3 must hold finite \(N, 6\) Inception features"),
    ("npy", ValueError, r"holds a single array, not an .npz file"),
    ("text", ValueError, r"is not an .npz file \(it starts with b'mu sigma', not like a zip archive\); expected"),
    ("bad_zip", ValueError, r"cannot be read as a NumPy .npz file"),
])
def test_bad_ref_stats_files(tmp_path, small_features, arrays, error, match):
    from ddim.evaluation.fid import read_reference_statistics

    path = tmp_path / ("missing.npz" if arrays is None else "ref.npz")
    if arrays == "npy":
        path = tmp_path / "ref.npy"
        np.save(path, np.zeros(FEATURES))
    elif arrays == "text":
        path.write_text("mu sigma\n")
    elif arrays == "bad_zip":  # starts like a zip archive, but is none
        path.write_bytes(b"PK\x03\x04 truncated")
    elif arrays is not None:
        stats_file(path, **arrays)
    with pytest.raises(error, match=match):
        read_reference_statistics(path)


def test_bad_ref_stats_fail_before_loading(monkeypatch, tmp_path, tiny_ckpt, small_features):  # noqa: F811
    from ddim.evaluation import runner, sampling

    monkeypatch.setattr(runner, "load", lambda *a, **k: pytest.fail("the model was loaded despite a bad ref_stats"))
    monkeypatch.setattr(sampling, "sample_batch", lambda *a, **k: pytest.fail("sampling started"))
    bad = stats_file(tmp_path / "ref.npz", mu=np.zeros(FEATURES), sigma=np.eye(FEATURES + 1))
    with pytest.raises(ValueError, match=r"fid.ref_stats=.*ref.npz: mu must have shape"):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=fid", f"fid.ref_stats={bad}")
    assert not (tmp_path / "records").exists()
