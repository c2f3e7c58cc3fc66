"""train.py's reliability promises: bad inputs fail before training with a message naming the value; checkpoint
files survive a SIGKILL at any moment (with $TMPDIR on another file system); a run stopped at any step and resumed
ends with the weights of the uninterrupted run, bit for bit on a CPU."""
from __future__ import annotations

import csv
import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import REPO, child_env
from test_data import make_image_folder
from test_train import SMALL_MODEL, TINY

sys.path.insert(0, str(REPO))
import train  # noqa: E402 - train.py is a script at the repository root
from train import run  # noqa: E402

from ddim.checkpoints import read_checkpoint, save_atomically  # noqa: E402
from ddim.data import DiffusionDataModule, EpochSeededSampler, build_dataset  # noqa: E402
from ddim.files import TEMPORARY_PATTERN, remove_stray_temporaries, write_atomically  # noqa: E402
from ddim.models.ema import ema_warmup_of  # noqa: E402
from ddim.training.checkpoint_io import AtomicCheckpointIO  # noqa: E402
from ddim.training.module import DiffusionModule  # noqa: E402

# digits test split: 180 images; batch 20 -> 9 steps per epoch
SMALL = ["dataset.split=test", "dataset.batch_size=20", "dataset.image_size=8", "trainer.enable_progress_bar=false",
         "callbacks.sample_grid.every_n_steps=0"]


def compose_train(run_dir: Path, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(config_name="train", overrides=[f"paths.output_dir={run_dir}", *TINY, *overrides])


def checkpoints_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*.ckpt")) if path.exists() else []


# ----------------------------------------------------------------------------------------------- bad inputs

def _bad_files(tmp: Path) -> dict[str, Path]:
    (tmp / "a_folder").mkdir()
    (tmp / "text.ckpt").write_text("not a checkpoint\n" * 10)
    torch.save({"conv_in.weight": torch.zeros(2, 2)}, tmp / "bare.ckpt")
    torch.save(torch.zeros(3, 4), tmp / "tensor.ckpt")
    (tmp / "a_file").write_text("")
    return {"FOLDER": tmp / "a_folder", "TEXT": tmp / "text.ckpt", "BARE": tmp / "bare.ckpt",
            "TENSOR": tmp / "tensor.ckpt", "FILE": tmp / "a_file", "IMAGES": make_image_folder(tmp / "imgs")}


BAD_INPUTS = [
    (["trainer.max_steps=0"], r"trainer.max_steps must be a positive integer .*got 0"),
    (["trainer.max_steps=-5"], r"trainer.max_steps must be a positive integer .*got -5"),
    (["trainer.max_steps=1.5"], r"trainer.max_steps must be a positive integer .*got 1.5"),
    (["trainer.max_steps=-1", "trainer.max_epochs=0"], r"trainer.max_epochs, which must then be a positive integer"),
    (["dataset=image_folder", "dataset.root=IMAGES", "dataset.channels=2", "dataset.batch_size=2"],
     r"dataset.channels=2 for dataset=image_folder; allowed: 3 \(RGB\), or 1 \(grey\) for digits and image_folder"),
    (["dataset=cifar10", "dataset.channels=1"], r"dataset.channels=1 for dataset=cifar10; allowed: 3 \(RGB\)"),
    (["model.in_channels=3"], r"digits data gives images of shape \(1, 8, 8\) .* model takes \(3, 8, 8\)"),
    (["model.resolution=16"], r"model takes \(1, 16, 16\) .*dataset.image_size=8"),
    (["model.out_ch=3"], r"model.out_ch=3 must equal the image channels \(1\)"),
    (["dataset.image_size=0"], r"dataset.image_size must be a positive integer, got 0"),
    (["dataset.image_size=abc"], r"dataset.image_size must be a positive integer, got 'abc'"),
    (["dataset.batch_size=0"], r"dataset.batch_size must be a positive integer, got 0"),
    (["dataset.num_workers=-1"], r"dataset.num_workers must be an integer >= 0, got -1"),
    (["callbacks.model_checkpoint.dirpath=FILE/ckpts"], r"callbacks.model_checkpoint.dirpath=.*a_file/ckpts is not "
                                                        r"a writable folder.*allowed: a folder"),
    (["ckpt_path=FOLDER"], r"a_folder is a directory; give the checkpoint file itself"),
    (["ckpt_path=TEXT"], r"text.ckpt: not a valid torch checkpoint"),
    (["ckpt_path=BARE"], r"bare.ckpt is a bare state dict \(1 tensors, e.g. 'conv_in.weight'\)"),
    (["ckpt_path=TENSOR"], r"tensor.ckpt holds a single tensor of shape \(3, 4\)"),
    (["ckpt_path=FOLDER/missing.ckpt"], r"checkpoint not found: .*missing.ckpt"),
    # switches: true/false only ("no" is a truthy string)
    (["optim.ema_warmup=no"], r"optim.ema_warmup must be true or false, got 'no'"),
    (["optim.amsgrad=no"], r"optim.amsgrad must be true or false, got 'no'"),
    (["dataset.random_flip=no"], r"dataset.random_flip must be true or false, got 'no'"),
    (["dataset.uniform_dequantization=1"], r"dataset.uniform_dequantization must be true or false, got 1"),
    # the optimiser's ranges, named
    (["optim.warmup_steps=-5"], r"optim.warmup_steps must be an integer >= 0, got -5"),
    (["optim.warmup_steps=1.5"], r"optim.warmup_steps must be an integer >= 0, got 1.5"),
    (["optim.lr=-1"], r"optim.lr must be a number > 0, got -1"),
    (["optim.lr=0"], r"optim.lr must be a number > 0, got 0"),
    (["optim.beta1=1.5"], r"optim.beta1 must be in \[0, 1\), got 1.5"),
    (["optim.eps=-1e-8"], r"optim.eps must be a number >= 0, got -1e-08"),
    (["optim.weight_decay=-0.1"], r"optim.weight_decay must be a number >= 0, got -0.1"),
    (["optim.grad_clip=-1"], r"optim.grad_clip must be a number >= 0 \(0 or null: no clipping\), got -1"),
    # integers where the setting is a count or a seed
    (["seed=abc"], r"seed must be an integer in \[0, 4294967295\], got 'abc'"),
    (["seed=-1"], r"seed must be an integer in \[0, 4294967295\], got -1"),
    (["diffusion.num_diffusion_timesteps=abc"],
     r"diffusion.num_diffusion_timesteps must be a positive integer, got 'abc'"),
    (["callbacks.sample_grid.every_n_steps=abc"],
     r"callbacks.sample_grid.every_n_steps must be an integer >= 0, got 'abc'"),
    (["callbacks.sample_grid.num_samples=0"], r"callbacks.sample_grid.num_samples must be a positive integer, got 0"),
    (["callbacks.step_rate.every_n_steps=x"], r"callbacks.step_rate.every_n_steps must be a positive integer, got 'x'"),
    (["trainer.log_every_n_steps=0"], r"trainer.log_every_n_steps must be a positive integer, got 0"),
    # keys nothing reads, and the noise schedule, named before the U-Net is built
    (["+optim.loss=l1"], r"optim.loss is not a setting of optim \(nothing reads it\); allowed: lr, beta1, eps, "),
    (["+diffusion.loss_type=l1"], r"diffusion.loss_type is not a setting of diffusion \(nothing reads it\); allowed: "
                                  r"beta_schedule, beta_start, beta_end, num_diffusion_timesteps"),
    (["+fast.fullgraph=true"], r"fast.fullgraph is not a setting of fast"),
    (["+dataset.npz_file=x.npz"], r"dataset.npz_file is not a setting of dataset \(nothing reads it\); allowed: name, "),
    (["diffusion.beta_schedule=qaud"], r"diffusion.beta_schedule='qaud'; allowed: linear, quad, const, jsd, sigmoid, "
                                       r"cosine"),
    (["diffusion.beta_end=2"], r"diffusion.beta_end must be a number in \(0, 1\), got 2"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_inputs_fail_before_training_and_write_nothing(tmp_path, overrides, message):
    files = _bad_files(tmp_path)
    for name, path in files.items():
        overrides = [o.replace(name, str(path)) for o in overrides]
    run_dir = tmp_path / "run"
    base = [*SMALL, "trainer.max_steps=3"]  # the default callbacks and logger
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(compose_train(run_dir, *base, "callbacks.model_checkpoint.every_n_train_steps=1", *overrides))
    assert checkpoints_under(tmp_path) == sorted(p for p in files.values() if p.suffix == ".ckpt")
    assert not (run_dir / "csv").exists()  # no trainer, no logger was made


def test_tensorboard_logger_without_the_package_is_named_before_building(tmp_path, monkeypatch):
    """Without tensorboard (not installed by default) logger=tensorboard stops at once with the install command."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else find_spec(name, *a))
    monkeypatch.setattr(train, "DiffusionDataModule", lambda *a, **k: pytest.fail("built the data before the check"))
    with pytest.raises(ValueError, match=r"logger.tensorboard .*needs the tensorboard package: pip install -e "
                                         r"'.\[tensorboard\]'"):
        run(compose_train(tmp_path / "run", *SMALL, "logger=tensorboard"))
    assert not (tmp_path / "run").exists()


def test_corrupt_image_in_the_training_data_is_named(tmp_path):
    """A truncated JPEG among an image folder's files (sorted last, so the model check's first image is fine and
    the data loader meets it in the first batch, which holds every image) stops training with its index and path."""
    images = make_image_folder(tmp_path / "imgs", n=5)
    Image.fromarray(np.zeros((24, 20, 3), dtype=np.uint8)).save(images / "class1" / "ok.jpg")
    data = (images / "class1" / "ok.jpg").read_bytes()
    (images / "class1" / "z_broken.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"image 6 of 7 \(.*class1/z_broken.jpg\) cannot be read: OSError: .*; "
                                         r"remove or replace the file"):
        run(compose_train(tmp_path / "run", *SMALL, "logger=none", "trainer.max_steps=3", "dataset=image_folder",
                          f"dataset.root={images}", "dataset.batch_size=7"))


def test_run_shorter_than_the_log_interval_logs_its_loss(tmp_path):
    """trainer.log_every_n_steps (conf: 25) above trainer.max_steps=3: the interval is lowered, so the default csv
    logger still writes metrics.csv with the loss at the last step."""
    run(compose_train(tmp_path, *SMALL, "trainer.max_steps=3", "trainer.log_every_n_steps=25"))
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in logged] == [2] and float(logged[0]["train/loss"]) > 0


def test_resumed_run_shorter_than_the_log_interval_logs_its_loss(tmp_path):
    """Resumed at step 20 to trainer.max_steps=25 with log_every_n_steps=15: Lightning logs at multiples of the
    interval, and none of steps 21-25 is one, so the interval becomes max_steps and the last step logs."""
    run(compose_train(tmp_path / "a", *SMALL, "trainer.max_steps=20", "trainer.log_every_n_steps=15"))
    run(compose_train(tmp_path / "b", *SMALL, "trainer.max_steps=25", "trainer.log_every_n_steps=15",
                      f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"))
    rows = list(csv.DictReader((tmp_path / "b" / "csv" / "version_0" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [24]


def test_paths_output_dir_unwritable_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"paths.output_dir=.*a_file/run is not a writable folder"):
        run(compose_train(tmp_path / "a_file" / "run", *SMALL, "logger=none", "trainer.max_steps=2"))


def test_logger_none_trains_with_the_default_callbacks(tmp_path):
    """logger=none with the learning-rate monitor in the callbacks (it needs a logger: it is left out)."""
    res = run(compose_train(tmp_path, *SMALL, "logger=none", "trainer.max_steps=2"))
    assert res["trainer"].global_step == 2 and res["trainer"].loggers == []
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_warning_advises_only_settings_not_already_made(warmup):
    """A run ending while its EMA still holds the random initial weights is told what to change: the warm-up only
    where it is off."""
    module = DiffusionModule(model=SMALL_MODEL, diffusion={}, optim={"ema_decay": 0.9999, "ema_warmup": warmup})
    with pytest.warns(UserWarning, match=r"still hold 100.0% of the initial .*a smaller optim.ema_decay") as caught:
        module.on_train_end()
    advice = str(caught[0].message)
    assert ("optim.ema_warmup=true" in advice) is not warmup and f"{'with' if warmup else 'no'} warm-up" in advice


@pytest.mark.parametrize("build", [lambda: ema_warmup_of({"ema_warmup": "no"}),
                                   lambda: build_dataset("digits", image_size=8, random_flip="no"),
                                   lambda: DiffusionDataModule(uniform_dequantization="false"),
                                   lambda: DiffusionModule(model=SMALL_MODEL, diffusion={},
                                                           optim={"ema_warmup": "no"})],
                         ids=["ema_warmup_of", "build_dataset", "DiffusionDataModule", "DiffusionModule"])
def test_library_readers_refuse_strings_as_switches(build):
    """Outside train.py too, a string switch is an error, not bool("no") == True."""
    with pytest.raises(ValueError, match=r"(optim.ema_warmup|dataset.random_flip|dataset.uniform_dequantization) "
                                         r"must be true or false"):
        build()


# ----------------------------------------------------------------------------------------------- exact resume

def _weights(res) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in res["module"].state_dict().items()}


@pytest.mark.parametrize("stop_at, num_workers, saved_by", [(4, 0, "step"), (13, 2, "stop")])
def test_stop_mid_epoch_and_resume_equals_the_uninterrupted_run(tmp_path, stop_at, num_workers, saved_by):
    """9 steps per epoch; resumed at step 4 (first epoch) from the step file the uninterrupted run wrote there (as
    after a kill), or at step 13 (second epoch, 2 workers fetching ahead, random flips and dequantisation noise
    drawn in them) from the last.ckpt of a run stopped by trainer.max_steps=13; on to step 16: model, EMA and Adam
    state equal the uninterrupted run's bit for bit."""
    assert stop_at % 9
    augment = str(num_workers > 0).lower()
    common = [*SMALL, "logger=none", "model.dropout=0.1", "optim.ema_decay=0.9", "optim.warmup_steps=3",
              f"dataset.num_workers={num_workers}", f"dataset.random_flip={augment}",
              f"dataset.uniform_dequantization={augment}", f"callbacks.model_checkpoint.every_n_train_steps={stop_at}"]
    full = run(compose_train(tmp_path / "full", *common, "trainer.max_steps=16"))
    if saved_by == "stop":
        run(compose_train(tmp_path / "part", *common, f"trainer.max_steps={stop_at}"))
        ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    else:
        ckpt = tmp_path / "full" / "checkpoints" / f"step_{stop_at:07d}.ckpt"
    saved = read_checkpoint(ckpt)
    assert saved["global_step"] == stop_at
    (position,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position["epoch"] == stop_at // 9 and position["consumed"] == 20 * (stop_at % 9)
    resumed = run(compose_train(tmp_path / "resumed", *common, "trainer.max_steps=16", f"ckpt_path={ckpt}"))
    assert resumed["trainer"].global_step == 16
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and any(k.startswith("ema_model.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resuming at step {stop_at}: {different[:5]}"
    opt_a, opt_b = (r["trainer"].optimizers[0].state_dict()["state"] for r in (full, resumed))
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_sampler_resumes_at_its_position_and_shards_over_ranks():
    whole = EpochSeededSampler(50, seed=3, batch_size=10)
    whole.seek(2)
    order = list(whole)
    whole.advance(20)
    resumed = EpochSeededSampler(50, seed=3, batch_size=10)
    resumed.load_state_dict(whole.state_dict())
    assert list(resumed) == order[20:]
    resumed.advance(30)  # the last whole batch taken: the next epoch starts at its beginning
    assert resumed.state_dict()["epoch"] == 3 and resumed.consumed == 0
    assert sorted(i for i, _ in resumed) == list(range(50))
    ranks = [EpochSeededSampler(51, seed=3, num_replicas=2, rank=r, batch_size=5) for r in (0, 1)]
    shares = [[i for i, _ in s] for s in ranks]
    assert len(shares[0]) == len(shares[1]) == 25 and not set(shares[0]) & set(shares[1])
    with pytest.warns(UserWarning, match=r"taken with \{'seed': 3, 'n': 50, 'num_replicas': 1, 'batch_size': 10\}, "
                                         r"this run has \{'seed': 3, 'n': 51, 'num_replicas': 2, 'batch_size': 5\}"):
        ranks[0].load_state_dict(whole.state_dict())
    assert ranks[0].consumed == 10 and ranks[0].epoch == 2  # 20 of 50 taken before: 10 of this rank's 25


# ----------------------------------------------------------------------------------------------- crash-safe saves

def test_checkpoint_io_writes_its_temporary_next_to_the_target(tmp_path, monkeypatch):
    """The temporary file is made in the target's folder (a rename there is atomic), never in $TMPDIR."""
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr(tempfile, "tempdir", None)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append((Path(src), Path(dst))),
                                                          real_replace(src, dst)))
    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, target)
    ((src, dst),) = renamed
    assert dst == target and src.parent == target.parent and TEMPORARY_PATTERN.match(src.name)
    assert read_checkpoint(target)["global_step"] == 7
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    save_atomically({"global_step": 8}, target)  # over an existing file
    assert read_checkpoint(target)["global_step"] == 8


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    """The writer callback raising half-way (a full disk, a bug) leaves the old file as it was and removes the
    temporary; records, FID caches and checkpoints all write through write_atomically."""
    target = tmp_path / "record.json"
    write_atomically(target, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"new, half written")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def _other_file_system_tmpdir(tmp_path: Path) -> Path:
    """/dev/shm (tmpfs: another file system than the run's) where there is one, else another directory tree."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="ddim-tmpdir-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="ddim-tmpdir-"))


def _start_training(run_dir: Path, tmpdir: Path, resume: bool) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "train.py"), *TINY, *SMALL, "logger=none",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "callbacks.model_checkpoint.save_top_k=1", "+callbacks.model_checkpoint.monitor=step",
            "+callbacks.model_checkpoint.mode=max", "trainer.max_steps=1000000", f"hydra.run.dir={run_dir}"]
    if resume:
        args.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    env = child_env(TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    with open(run_dir.parent / "stderr.txt", "wb") as err:  # a file: a full pipe would block the child
        return subprocess.Popen(args, env=env, cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=err)


def _kill_during_a_save(proc: subprocess.Popen, ckpts: Path, rng: random.Random, deadline: float) -> str:
    """SIGKILL ``proc`` once it saves with a ``last.ckpt`` in place (before the first one there is nothing to keep):
    at once while its checkpoint temporary exists (three times in four), else at a random moment up to 0.5 s later;
    returns which."""
    during, delay = rng.random() < 0.75, rng.uniform(0.0, 0.5)
    saving = False
    while not saving and time.monotonic() < deadline and proc.poll() is None:
        names = [e.name for e in os.scandir(ckpts)] if ckpts.is_dir() else []
        saving = "last.ckpt" in names and any(TEMPORARY_PATTERN.match(n) and n.endswith(f".tmp{proc.pid}")
                                              for n in names)
        time.sleep(0.0005)
    assert proc.poll() is None, (ckpts.parent.parent / "stderr.txt").read_text()[-3000:]
    assert saving, "the training process saved nothing in time (a slow machine?)"
    if not during:
        time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return "during a save" if during else "at a random moment"


def test_sigkill_during_saves_never_breaks_last_ckpt(tmp_path):
    """Training saves every step with $TMPDIR on another file system; it is SIGKILLed again and again (mostly while
    a checkpoint temporary exists) and restarted from last.ckpt: after every kill last.ckpt loads, and the next
    start removes the temporaries the kill left."""
    run_dir, tmpdir = tmp_path / "run", _other_file_system_tmpdir(tmp_path)
    ckpts, rng, kills, steps, strays = run_dir / "checkpoints", random.Random(0), [], [], []
    run_dir.mkdir()
    deadline = time.monotonic() + 35
    try:
        while time.monotonic() < deadline - 8 or len(kills) < 2:  # two kills however slow the machine
            proc = _start_training(run_dir, tmpdir, resume=(ckpts / "last.ckpt").is_file())
            stray_before = [n for n in os.listdir(ckpts) if TEMPORARY_PATTERN.match(n)] if ckpts.is_dir() else []
            kills.append(_kill_during_a_save(proc, ckpts, rng, time.monotonic() + 180))
            left = {n for n in os.listdir(ckpts) if TEMPORARY_PATTERN.match(n)}
            strays.append(len(left))
            assert not left & set(stray_before), f"temporaries of an earlier kill survived a start: {left}"
            steps.append(read_checkpoint(ckpts / "last.ckpt")["global_step"])  # loads after every kill
        # Nothing was staged in $TMPDIR. Open MPI's session files (ompi.*) are not ours: where mpi4py is installed,
        # Lightning's MPI detection initialises MPI, and a SIGKILLed process never removes them.
        assert [p.name for p in tmpdir.iterdir() if not p.name.startswith("ompi.")] == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"{len(kills)} kills ({kills.count('during a save')} during a save); last.ckpt loaded after each, at steps "
          f"{steps}; temporaries left by each kill: {strays}")
    assert len(kills) >= 2 and steps == sorted(steps) and steps[0] >= 1


WRITER = """
import sys, torch
from ddim.checkpoints import save_atomically
path, step, weights = sys.argv[1], int(sys.argv[2]), torch.arange(2_000_000.0)
while True:
    step += 1
    save_atomically({"global_step": step, "state_dict": {"w": weights + step}}, path)
"""


def test_sigkill_of_a_checkpoint_writer_loop_keeps_the_previous_file(tmp_path):
    """More kills than training restarts allow: a process that only saves 8 MB checkpoints with save_atomically
    (what AtomicCheckpointIO calls), $TMPDIR on another file system, killed at a random moment 0-0.3 s after it
    began its first save (most of its time is spent writing)."""
    tmpdir, target, rng, steps = _other_file_system_tmpdir(tmp_path), tmp_path / "last.ckpt", random.Random(1), []
    mid_write = 0
    env = child_env(TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")
    try:
        for _ in range(5):
            step = read_checkpoint(target)["global_step"] if target.is_file() else 0
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(step)], env=env)
            while proc.poll() is None and not (target.exists() and (tmp_path / f".last.ckpt.tmp{proc.pid}").exists()):
                time.sleep(0.0002)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            saved = read_checkpoint(target)
            assert torch.equal(saved["state_dict"]["w"], torch.arange(2_000_000.0) + saved["global_step"])  # whole
            steps.append(saved["global_step"])
            mid_write += len(remove_stray_temporaries(tmp_path))  # a kill while writing leaves its temporary
        assert list(tmpdir.iterdir()) == [] and steps == sorted(steps)
    finally:
        shutil.rmtree(tmpdir)
    print(f"writer loop: {len(steps)} kills ({mid_write} while writing); last.ckpt loaded after each, at steps {steps}")
    assert mid_write >= 1
