"""evaluate.py's reliability promises (docs/reliability.md): every bad input fails before the expensive work with a
message naming the value, writing nothing; no code runs from a checkpoint; outputs asked for are always produced.

``run(cfg)`` runs in this process on a config composed by Hydra (no subprocess, no Hydra run folder), with every
expensive entry point (sampling, Inception, the compiled fast path) replaced by a test failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from conftest import REPO
from ddim.evaluation.fid import inception_features as real_inception_features
from ddim.evaluation.fid import reference_statistics as real_reference_statistics
from test_evaluate import DIFFUSION, TINY_UNET, fake_inception, one_thread, tiny_ckpt  # noqa: F401  (fixtures)


def run_composed(tmp_path: Path, *overrides: str) -> dict:
    """evaluate.py's ``run`` on the composed config; logs, records, outputs and the FID cache under tmp_path/log."""
    from ddim.evaluation.runner import run

    log = tmp_path / "log"
    base = {"paths.log_dir": str(log), "device": "cpu", "trainer.accelerator": "cpu",
            "trainer.enable_progress_bar": "false", "fid.cache_dir": str(log / "cache")}
    base.update(o.split("=", 1) for o in overrides)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"{k}={v}" for k, v in base.items()], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(log / "run")
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        return run(cfg)
    finally:
        HydraConfig.instance().cfg = None


def forbid(*_args, **_kwargs):
    pytest.fail("expensive work started despite bad input")


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Sampling, Inception (weights, reference statistics, features) and the inference fast path fail the test."""
    from ddim.evaluation import fid, runner, sampling, tasks

    for module, name in [(tasks, "generate"), (tasks, "decode"), (sampling, "sample_batch"), (tasks, "sample_batch"),
                         (tasks, "encode"), (tasks, "fid_between"),
                         (tasks, "reference_statistics"), (tasks, "resolve_inception_weights"),
                         (fid, "inception_features"), (runner, "prepare_for_inference")]:
        monkeypatch.setattr(module, name, forbid)


@pytest.fixture
def inputs(tmp_path, tiny_ckpt) -> dict[str, str]:
    """Files a user might pass by mistake, keyed by the placeholder the table uses."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "notes.txt").write_text("hello\n")
    (d / "a_file").write_text("x")
    state = torch.load(tiny_ckpt, weights_only=True)
    torch.save(state["state_dict"], d / "bare_state_dict.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")
    return {"ckpt": str(tiny_ckpt), "dir": str(d), "text": str(d / "notes.txt"), "file": str(d / "a_file"),
            "state_dict": str(d / "bare_state_dict.pt"), "tensor": str(d / "tensor.pt")}


BAD_INPUTS = [
    (("fid.num_samples=200.9",), "fid.num_samples must be a positive integer or null, got 200.9"),
    (("fid.num_samples=abc",), "fid.num_samples must be a positive integer or null, got 'abc'"),
    (("task=consistency", "consistency.steps=5"), "consistency.steps must be a non-empty list of step counts S "
                                                   "(one grid column each), e.g. consistency.steps=[10,20,50]; got 5"),
    (("task=consistency", "consistency.steps=[]"), "consistency.steps must be a non-empty list of step counts"),
    (("task=consistency", "consistency.steps=[5,5000]"), "consistency.steps entry=5000 exceeds the model's T=1000"),
    (("fid.weights_path={text}",), "fid.weights_path={text} is not a PyTorch weights file (it starts with "
                                    "b'hello\\n', not like torch.save's zip archive or pickle); expected: Inception"),
    (("fid.weights_path={dir}/missing.pth",), "Inception weights not found: fid.weights_path={dir}/missing.pth"),
    (("fid.ref_stats={text}",), "fid.ref_stats={text} is not an .npz file (it starts with b'hello\\n', not like a "
                                "zip archive); expected: an .npz file with mu (2048,) and sigma (2048, 2048)"),
    (("task=reconstruction", "reconstruction.split=val"),
     "reconstruction.split=val: not a split of dataset=digits (digits: split must be 'train', 'test' or 'all'"),
    (("dataset=image_folder",), "dataset.root must be set: dataset=image_folder has no default for it; pass "
                                "dataset.root=<value> (the folder of images, any depth)"),
    (("task=reconstruction", "dataset=image_folder"), "dataset.root must be set: dataset=image_folder"),
    (("task=reconstruction", "reconstruction.num_images=100000"),
     "reconstruction.num_images=100000 but reconstruction.split=test of digits-8 has 180 images; allowed: 1..180, "
     "or null (all)"),
    (("use_ema=no",), "use_ema must be true or false, got 'no'"),
    (("use_ema=maybe",), "use_ema must be true or false, got 'maybe'"),
    (("trust_checkpoint=maybe",), "trust_checkpoint must be true or false, got 'maybe'"),
    (("seed=abc",), "seed must be an integer, got 'abc'"),
    (("sampler.steps=abc",), "sampler.steps (S) must be a positive integer, got 'abc'"),
    (("sampler.eta=often",), "sampler.eta must be a number >= 0 or 'hat', got 'often'"),
    (("task=samples", "samples.nrow=2.5"), "samples.nrow must be a positive integer or null, got 2.5"),
    (("task=samples", "samples.save_npz=maybe"), "samples.save_npz must be true or false, got 'maybe'"),
    (("fid.save_grid=maybe",), "fid.save_grid must be true or false, got 'maybe'"),
    (("skip_done=maybe",), "skip_done must be true or false, got 'maybe'"),
    (("+sampler.clip_denoised=true",), "sampler.clip_denoised is not a setting of sampler (nothing reads it); allowed: "
                                       "kind, eta, steps, trajectory, batch_size, precision, deterministic"),
    (("+dataset.rooot=/data",), "dataset.rooot is not a setting of dataset (nothing reads it); allowed: name, root, "),
    (("+fid.num_sample=10",), "fid.num_sample is not a setting of fid (nothing reads it); allowed: num_samples, "),
    (("task=samples", "+samples.grid=true"), "samples.grid is not a setting of samples (nothing reads it); allowed: "
                                             "num_samples, nrow, save_npz"),
    (("ckpt_path={dir}",), "is a directory; give the checkpoint file itself"),
    (("ckpt_path={text}",), "notes.txt: not a valid torch checkpoint"),
    (("ckpt_path={state_dict}",), "is a bare state dict"),
    (("ckpt_path={tensor}",), "holds a single tensor of shape (3,)"),
    (("ckpt_path={dir}/missing.ckpt",), "checkpoint not found: ckpt_path="),
    (("records_dir={file}/records",), "records_dir={file}/records is not a writable folder: {file} is a file"),
    pytest.param(("records_dir=/proc/ddim-nope/records",), "records_dir=/proc/ddim-nope/records is not writable: ",
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")),
    (("output_dir={file}/out",), "output_dir={file}/out is not a writable folder: {file} is a file"),
    pytest.param(("device=cuda",), "device=cuda but CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[
    "+".join(p.values[0] if hasattr(p, "values") else p[0]) for p in BAD_INPUTS])
def test_bad_input_fails_early_and_writes_nothing(tmp_path, inputs, nothing_expensive, overrides, message):
    ckpt_bytes = Path(inputs["ckpt"]).read_bytes()
    overrides = [o.format(**inputs) for o in overrides]
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_composed(tmp_path, f"ckpt_path={inputs['ckpt']}", "task=fid", "fid.num_samples=4", "sampler.steps=3",
                     *overrides)
    assert message.format(**inputs) in str(err.value)
    assert not (tmp_path / "log").exists()  # no record, no samples, no cache, no run folder
    assert Path(inputs["ckpt"]).read_bytes() == ckpt_bytes


def test_unwritable_records_dir_is_named(tmp_path, inputs, nothing_expensive, monkeypatch):
    """Permissions (a root test user can write anywhere, so os.access stands in for a read-only folder)."""
    from ddim.evaluation import runner

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(runner.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(ValueError, match=rf"records_dir={locked}/records is not writable: no write permission in "):
        run_composed(tmp_path, f"ckpt_path={inputs['ckpt']}", "task=samples", f"records_dir={locked}/records")
    assert not (tmp_path / "log").exists() and not any(locked.iterdir())


def test_bad_ref_split_is_named_before_sampling(tmp_path, tiny_ckpt, fake_inception, nothing_expensive,
                                                monkeypatch):
    from ddim.evaluation import tasks

    monkeypatch.setattr(tasks, "resolve_inception_weights", lambda weights_path, cache_dir: fake_inception)
    with pytest.raises(ValueError, match=r"fid.ref_split=validation: not a split of dataset=digits \(digits: split "
                                         r"must be 'train', 'test' or 'all'"):
        run_composed(tmp_path, f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=4", "fid.ref_split=validation")
    assert not (tmp_path / "log").exists()


@pytest.fixture
def image_folder_ckpt(tmp_path) -> Path:
    """A tiny RGB model as train.py saves it after ``dataset=image_folder dataset.root=<folder>``: the folder not
    kept (train.py records name, image_size, channels and category)."""
    from ddim.training.module import DiffusionModule

    torch.manual_seed(0)
    m = DiffusionModule(model={**TINY_UNET, "in_channels": 3, "out_ch": 3}, diffusion=DIFFUSION,
                        optim={"ema_decay": 0.999},
                        data={"name": "image_folder", "image_size": 8, "channels": 3, "category": None})
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "global_step": 0},
               tmp_path / "folder.ckpt")
    return tmp_path / "folder.ckpt"


def test_image_folder_checkpoint_says_how_to_name_its_folder(tmp_path, image_folder_ckpt, nothing_expensive):
    with pytest.raises(ValueError, match=r"trained on dataset=image_folder, whose folder it does not record, and "
                                         r"task=reconstruction reads its images: pass \+dataset.root=<folder of "
                                         r"images>, or dataset=image_folder dataset.root=<folder> "
                                         r"dataset.image_size=8 dataset.channels=3 \(the checkpoint's values\)"):
        run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=reconstruction")
    assert not (tmp_path / "log").exists()


def test_image_folder_root_given_alone_or_not_needed(tmp_path, image_folder_ckpt):
    """+dataset.root=<folder> reads the checkpoint's data set from there; samples need no folder at all."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    rec = run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=reconstruction", "sampler.steps=2",
                       f"+dataset.root={folder}")
    assert rec["num_samples"] == 3 and rec["key"]["dataset"] == "image_folder-8"
    rec = run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=samples", "samples.num_samples=2",
                       "sampler.steps=2")
    assert rec["num_samples"] == 2 and Path(rec["outputs"]["grid"]).is_file()
    rec = run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=samples", "samples.num_samples=2",
                       "sampler.steps=2", "dataset=image_folder", "dataset.image_size=8")
    assert rec["key"]["dataset"] == "image_folder-8"


def test_two_image_folders_of_one_size_are_two_records(tmp_path, image_folder_ckpt):
    """+dataset.root=<other folder>, same size and image count: scored again (it was "skipped: already done" with
    the first folder's result); samples read no folder, so their record does not depend on one."""
    scores = []
    for name, level in (("a", 30), ("b", 200)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), level + 10 * i, np.uint8)).save(folder / f"{i}.png")
        rec = run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=reconstruction", "sampler.steps=2",
                           f"+dataset.root={folder}")
        assert not rec.get("skipped") and rec["key"]["data_folder"] == str(folder.resolve())
        scores.append(rec["metric"]["mse"])
    assert scores[0] != scores[1]
    again = run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=reconstruction", "sampler.steps=2",
                         f"+dataset.root={tmp_path}/b/../a")
    assert again["skipped"] and again["metric"]["mse"] == scores[0]
    samples = [run_composed(tmp_path, f"ckpt_path={image_folder_ckpt}", "task=samples", "samples.num_samples=2",
                            "sampler.steps=2", f"+dataset.root={tmp_path / n}") for n in "ab"]
    assert "data_folder" not in samples[0]["key"] and samples[1]["skipped"]


def test_reference_statistics_of_two_image_folders_are_cached_apart(tmp_path):
    from ddim.evaluation.settings import Loaded

    def loaded(root):
        return Loaded(None, None, {}, {"name": "image_folder", "image_size": 8, "root": root}, (3, 8, 8), "linear", None)

    assert loaded(tmp_path / "a").reference_name("train") != loaded(tmp_path / "b").reference_name("train")
    assert loaded(tmp_path / "a").reference_name("train") == loaded(tmp_path / "b" / ".." / "a").reference_name("train")
    assert loaded(tmp_path).reference_name("train").startswith("image_folder-8-train-")
    named = Loaded(None, None, {}, {"name": "cifar10", "image_size": 32, "root": tmp_path}, (3, 32, 32), "linear", None)
    assert named.reference_name("train") == "cifar10-32-train"


def test_a_task_added_as_extending_md_says_runs_and_is_recorded(tmp_path, tiny_ckpt, monkeypatch):
    """docs/extending.md's recipe for a task: a function in TASKS and its keys in SECTION_KEYS (the section comes
    from the command line here, as it would from conf/evaluate.yaml); a run is recorded and a re-run skipped, and
    its section refuses keys it does not list."""
    from ddim.evaluation import settings, tasks
    from ddim.evaluation.sampling import decode, latents_and_noise

    def stats_task(s, m):
        n = int(s.params["num_samples"])
        x_T, _ = latents_and_noise(range(n), m.shape, 0, s.seed)
        x = decode(m.eps_model, m.alphas_cumprod, m.seq, x_T, device=s.device, batch_size=s.batch_size, kind=s.kind)
        return settings.TaskResult({"mean": float(x.float().mean()), "std": float(x.float().std())}, n, len(m.seq), {})

    monkeypatch.setitem(tasks.TASKS, "stats", stats_task)
    args = (f"ckpt_path={tiny_ckpt}", "task=stats", "+stats.num_samples=3", "sampler.steps=2")
    with pytest.raises(ValueError, match=r"task=stats lists no settings: add SECTION_KEYS\['stats'\]"):
        run_composed(tmp_path, *args)
    monkeypatch.setitem(settings.SECTION_KEYS, "stats", ("num_samples",))
    rec = run_composed(tmp_path, *args)
    assert rec["num_samples"] == 3 and rec["key"]["params"] == {"num_samples": 3} and rec["metric"]["std"] > 0
    assert run_composed(tmp_path, *args)["skipped"]
    with pytest.raises(ValueError, match=r"stats.size is not a setting of stats \(nothing reads it\); allowed: "
                                         r"num_samples$"):
        run_composed(tmp_path, *args, "+stats.size=8")


def test_unreadable_reference_image_fails_before_sampling(tmp_path, tiny_ckpt, nothing_expensive, monkeypatch):
    """dataset=image_folder with a truncated JPEG: named (index and file) by the reference pass, before sampling."""
    from ddim.evaluation import fid, tasks

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "bad.jpg")
    (folder / "bad.jpg").write_bytes((folder / "bad.jpg").read_bytes()[:300])  # truncated
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setattr(tasks, "resolve_inception_weights", lambda weights_path, cache_dir: weights)
    monkeypatch.setattr(tasks, "reference_statistics", real_reference_statistics)  # real, but with a stand-in
    monkeypatch.setattr(fid, "inception_features", real_inception_features)        # network: the images are read
    monkeypatch.setattr(fid, "_load_extractor", lambda path, device, feats: lambda x: (torch.zeros(len(x), 2048),))
    with pytest.raises(ValueError, match=r"image 0 of 4 \(.*bad.jpg\) cannot be read: OSError"):
        run_composed(tmp_path, f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=4", "sampler.steps=3",
                     "dataset=image_folder", f"dataset.root={folder}", "dataset.image_size=8", "dataset.channels=1")
    assert not (tmp_path / "log" / "records").exists() and not (tmp_path / "log" / "cache").exists()


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("trust", ["false", "maybe"])
def test_payload_checkpoint_never_runs_its_code(tmp_path, nothing_expensive, trust):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Payload(marker), "hyper_parameters": {}}, evil)
    message = "refused to open" if trust == "false" else "trust_checkpoint must be true or false, got 'maybe'"
    with pytest.raises(ValueError, match=message) as err:
        run_composed(tmp_path, f"ckpt_path={evil}", "task=samples", f"trust_checkpoint={trust}")
    assert not marker.exists()
    if trust == "false":
        assert "trust_checkpoint=true" in str(err.value)  # names the opt-in
    assert not (tmp_path / "log").exists()


def test_outputs_asked_for_later_are_produced(tmp_path, tiny_ckpt, capsys):
    """samples.save_npz / samples.nrow asked for after a run without them: the run is made again (same images),
    not answered with "skipped"; once everything asked for exists, it is skipped."""
    args = (f"ckpt_path={tiny_ckpt}", "task=samples", "samples.num_samples=4", "sampler.steps=2")
    first = run_composed(tmp_path, *args)
    assert "npz" not in first["outputs"]
    assert sorted(p.name for p in (tmp_path / "log" / "run").iterdir()) == ["samples.png"]  # no empty shards/
    second = run_composed(tmp_path, *args, "samples.save_npz=true")
    out = capsys.readouterr().out
    assert "skipped" not in out and "lacks what this run asks for: samples.npz (samples.save_npz=true)" in out
    assert second["record_path"] == first["record_path"] and Path(second["outputs"]["npz"]).is_file()
    with np.load(second["outputs"]["npz"]) as npz:
        assert npz["arr_0"].shape == (4, 8, 8, 1)
    assert run_composed(tmp_path, *args, "samples.save_npz=true").get("skipped")
    assert "skipped: already done" in capsys.readouterr().out
    third = run_composed(tmp_path, *args, "samples.save_npz=true", "samples.nrow=1")
    assert not third.get("skipped") and "a grid with samples.nrow=1 (the recorded one has nrow=None)" in \
        capsys.readouterr().out
    Path(third["outputs"]["grid"]).unlink()  # outputs deleted since: made again
    assert not run_composed(tmp_path, *args, "samples.save_npz=true", "samples.nrow=1").get("skipped")


def test_fid_grid_asked_for_later_is_made_without_a_new_fid_run(tmp_path, tiny_ckpt, fake_inception, monkeypatch,
                                                                capsys):
    from ddim.evaluation import tasks
    from ddim.evaluation.records import load_record

    args = (f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=6", "sampler.steps=2",
            f"fid.weights_path={fake_inception}")
    first = run_composed(tmp_path, *args, "fid.save_grid=false")
    assert "grid" not in first["outputs"]
    monkeypatch.setattr(tasks, "fid_between", forbid)
    monkeypatch.setattr(tasks, "reference_statistics", forbid)
    second = run_composed(tmp_path, *args, "fid.save_grid=true")
    assert "the grid PNG of the first samples (fid.save_grid=true)" in capsys.readouterr().out
    assert Path(second["outputs"]["grid"]).is_file() and second["metric"] == first["metric"]
    assert load_record(second["record_path"])["outputs"]["grid"] == second["outputs"]["grid"]
    assert run_composed(tmp_path, *args, "fid.save_grid=true").get("skipped")
