"""evaluate.py end to end on CPU: a tiny random ε-model on 8x8 digits, tiny sample counts.

FID here swaps the Inception network for cheap per-channel pixel statistics (``tasks.reference_statistics``,
``tasks.fid_between``);
the real Inception FID is tested in test_fid.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import REPO, child_env, load_script

TINY_UNET = {"ch": 32, "out_ch": 1, "in_channels": 1, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
             "dropout": 0.0, "resolution": 8, "resamp_with_conv": True}
DIFFUSION = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads thrash (50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A DiffusionModule checkpoint (random weights) in train.py's format."""
    from ddim.training.module import DiffusionModule

    torch.manual_seed(0)
    m = DiffusionModule(model=TINY_UNET, diffusion=DIFFUSION, optim={"ema_decay": 0.999},
                        data={"name": "digits", "image_size": 8, "channels": 1, "category": None})
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "global_step": 0}, path)
    return path


def _evaluate_module():
    return load_script("evaluate.py", "ddim_evaluate_script")


def run_evaluate(monkeypatch, tmp_path: Path, *overrides: str, multirun: bool = False) -> None:
    """``python evaluate.py <overrides>`` in this process (so monkeypatched hooks apply)."""
    mod = _evaluate_module()
    argv = ["evaluate.py"] + (["-m"] if multirun else []) + [
        f"paths.log_dir={tmp_path}", "trainer.enable_progress_bar=false", "device=cpu", "trainer.accelerator=cpu",
        *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # let the original exception through
    mod.main()


def records(tmp_path: Path) -> list[dict]:
    from ddim.evaluation.records import iter_records

    return iter_records(tmp_path / "records")


def pixel_features(imgs) -> torch.Tensor:
    """Per-channel mean and std of uint8 RGB images: a stand-in for Inception's 2048 features."""
    x = torch.stack([imgs[i] for i in range(len(imgs))])
    assert x.dtype == torch.uint8 and x.shape[1] == 3
    x = x.float().flatten(2) / 255.0
    return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def pixel_reference_statistics(ref, *, ref_key, weights_path, cache_dir, device, batch_size):
    from ddim.evaluation.fid import feature_statistics

    mu, sigma = feature_statistics(pixel_features(ref))
    return {"mu": mu, "sigma": sigma, "cache_hit": False}


def pixel_fid(gen, ref_stats, *, weights_path, device, batch_size):
    """Fréchet distance of the pixel features against statistics computed before sampling."""
    from ddim.evaluation.fid import feature_statistics, frechet_distance

    m1, s1 = feature_statistics(pixel_features(gen))
    return {"fid": frechet_distance(m1, s1, ref_stats["mu"], ref_stats["sigma"]), "ref_cache_hit": False}


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
    from ddim.evaluation import tasks

    w = tmp_path / "inception.pth"
    torch.save({"stand-in": torch.zeros(1)}, w)  # a torch file, as evaluate.py checks fid.weights_path
    monkeypatch.setattr(tasks, "fid_between", pixel_fid)
    monkeypatch.setattr(tasks, "reference_statistics", pixel_reference_statistics)
    monkeypatch.setattr(tasks, "resolve_inception_weights", lambda weights_path, cache_dir: weights_path or w)
    return w


def test_fid_task_writes_record_and_rerun_skips(monkeypatch, tmp_path, tiny_ckpt, fake_inception, capsys):
    args = (f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=12", "sampler.steps=3", "sampler.eta=0",
            "sampler.batch_size=5")
    run_evaluate(monkeypatch, tmp_path, *args)
    (rec,) = records(tmp_path)
    from ddim.diffusion import timesteps

    assert rec["task"] == "fid" and rec["num_samples"] == 12
    assert rec["nfe"] == len(timesteps(1000, 3)) == 4  # range(0, 1000, 333): the official rule gives 4 steps
    assert np.isfinite(rec["metric"]["fid"]) and rec["metric"]["fid"] > 0  # random model vs digits
    assert rec["key"]["sampler"] == {"kind": "ddim", "eta": 0.0, "steps": 3, "trajectory": "linear"}
    assert rec["key"]["dataset"] == "digits-8" and rec["wall_time_s"] >= 0 and "host" in rec["device"]
    assert rec["config"]["sampler"]["steps"] == 3
    mtime = Path(rec["_path"]).stat().st_mtime_ns

    from ddim.evaluation import runner, sampling

    monkeypatch.setattr(sampling, "sample_batch", lambda *a, **k: pytest.fail("a finished run must not sample again"))
    monkeypatch.setattr(runner, "prepare_for_inference", lambda *a, **k: pytest.fail("a finished run must not prepare"))
    run_evaluate(monkeypatch, tmp_path, *args)
    assert "skipped: already done" in capsys.readouterr().out
    assert Path(rec["_path"]).stat().st_mtime_ns == mtime


def test_samples_identical_across_batchings(monkeypatch, tmp_path, tiny_ckpt):
    """Sample i depends on (seed, i) only: batch sizes 3 and 8 (as 1 vs 8 GPUs would split) give the same images."""
    outs = []
    for bs in (3, 8):
        out = tmp_path / f"bs{bs}"
        run_evaluate(monkeypatch, tmp_path / "logs", f"ckpt_path={tiny_ckpt}", "task=samples", "samples.num_samples=7",
                     "samples.save_npz=true", "sampler.steps=4", "sampler.eta=0.5", f"sampler.batch_size={bs}",
                     f"output_dir={out}", "skip_done=false")
        assert (out / "samples.png").is_file()
        outs.append(np.load(out / "samples.npz")["arr_0"])
    assert outs[0].shape == (7, 8, 8, 1) and outs[0].dtype == np.uint8
    np.testing.assert_array_equal(outs[0], outs[1])
    assert len({outs[0][i].tobytes() for i in range(7)}) == 7  # and different samples differ


def test_bf16_sampler_is_close_to_fp32_and_recorded_apart(monkeypatch, tmp_path, tiny_ckpt):
    """sampler.precision=bf16 (ddim.accel's bf16 preset) gives nearly the fp32 images, and its record has its own
    key, so a bf16 sweep never skips over (or is skipped by) an fp32 one; fp32 records carry no precision entry."""
    outs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=samples", "samples.num_samples=6",
                     "samples.save_npz=true", "sampler.steps=5", f"sampler.precision={precision}", f"output_dir={out}")
        outs[precision] = np.load(out / "samples.npz")["arr_0"].astype(np.int16)
    diff = np.abs(outs["bf16"] - outs["fp32"])
    assert diff.mean() < 2.0 and diff.max() > 0  # a few 8-bit levels apart, not the same computation
    recs = records(tmp_path)
    assert sorted(str(r["key"]["sampler"].get("precision")) for r in recs) == ["None", "bf16"]


def test_precision_and_deterministic_reach_the_fast_path_and_the_key(monkeypatch, tmp_path, tiny_ckpt):
    """bf16 / fp8 go to ddim.accel.prepare_for_inference as its preset, with sampler.deterministic; fp32 never
    calls it.  The key holds precision (not fp32) and deterministic (only false)."""
    from ddim.evaluation import runner

    seen = []
    monkeypatch.setattr(runner, "PREPARED", {})  # no copy of an earlier test's model
    monkeypatch.setattr(runner, "fp8_supported", lambda device: True)  # the fp8 preset itself: tests of ddim.accel
    monkeypatch.setattr(runner, "prepare_for_inference",
                        lambda model, preset, *, deterministic: seen.append((preset, deterministic)) or model)
    for i, over in enumerate((["sampler.precision=fp32", "sampler.deterministic=false"], ["sampler.precision=bf16"],
                              ["sampler.precision=bf16", "sampler.deterministic=false"], ["sampler.precision=fp8"])):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=samples", "samples.num_samples=2",
                     "sampler.steps=2", *over, f"output_dir={tmp_path / f'run{i}'}")
    assert seen == [("bf16", True), ("bf16", False), ("fp8", True)]
    keys = sorted((str(r["key"]["sampler"].get("precision")), str(r["key"]["sampler"].get("deterministic")))
                  for r in records(tmp_path))
    assert keys == [("None", "None"), ("bf16", "False"), ("bf16", "None"), ("fp8", "None")]


def test_a_sweeps_runs_share_one_inference_copy(monkeypatch, tmp_path, tiny_ckpt):
    """Runs of one process on the same model file and settings reuse the prepared (compiled) copy; another
    precision or determinism prepares anew."""
    from ddim.evaluation import runner

    seen = []
    monkeypatch.setattr(runner, "PREPARED", {})
    monkeypatch.setattr(runner, "prepare_for_inference",
                        lambda model, preset, *, deterministic: seen.append((preset, deterministic)) or model)
    for i, over in enumerate((["sampler.steps=2"], ["sampler.steps=3"], ["sampler.steps=2", "sampler.eta=1.0"],
                              ["sampler.steps=2", "sampler.deterministic=false"])):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=samples", "samples.num_samples=2",
                     "sampler.precision=bf16", *over, f"output_dir={tmp_path / f'run{i}'}")
    assert seen == [("bf16", True), ("bf16", False)]
    assert len(records(tmp_path)) == 4


@pytest.mark.parametrize("overrides, match", [
    (["sampler.precision=fp16"], r"sampler.precision must be one of fp32, bf16, fp8, got 'fp16'"),
    (["sampler.precision=true"], r"sampler.precision must be one of fp32, bf16, fp8, got True"),
    (["sampler.precision=bf16", "sampler.deterministic=sometimes"],
     r"sampler.deterministic must be true or false, got 'sometimes'"),
    (["+sampler.fast=true"], r"sampler.fast was replaced by sampler.precision \(fp32 \| bf16 \| fp8\)"),
    (["sampler.precision=fp8"], r"sampler.precision=fp8 needs a CUDA GPU with FP8 matrix units .* device cpu has "
                                r"none: use sampler.precision=bf16"),
])
def test_bad_precision_fails_before_loading(monkeypatch, tmp_path, tiny_ckpt, overrides, match):
    from ddim.evaluation import runner

    monkeypatch.setattr(runner, "fp8_supported", lambda device: False)
    monkeypatch.setattr(runner, "load_for_sampling", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    with pytest.raises(ValueError, match=match):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=samples", *overrides,
                     f"output_dir={tmp_path / 'bad'}")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "records").exists()


def test_official_model_is_checked_against_the_data_set(monkeypatch, tmp_path):
    """The channel / resolution check holds for official weights too (their config is the nested official one):
    a tiny stand-in under the name cifar10 (8x8, 1 channel) is refused against CIFAR-10 and dataset=cifar10, and
    samples against dataset=digits (1-channel 8x8)."""
    import copy

    from ddim.models import OFFICIAL_CONFIGS, UNet

    tiny = copy.deepcopy(OFFICIAL_CONFIGS["cifar10"])
    tiny["model"].update(ch=32, in_channels=1, out_ch=1, ch_mult=[1], num_res_blocks=1, attn_resolutions=[])
    tiny["data"]["image_size"] = 8
    monkeypatch.setitem(OFFICIAL_CONFIGS, "cifar10", tiny)
    torch.manual_seed(0)
    path = tmp_path / "official-tiny.ckpt"
    torch.save(UNet(**{**TINY_UNET, "dropout": 0.1}).state_dict(), path)
    model = ("official=cifar10", f"official_path={path}", "task=samples", "samples.num_samples=2", "sampler.steps=2")
    with pytest.raises(ValueError, match=r"dataset=cifar10 has 3-channel 8x8 images but the model takes 1-channel "
                                         r"8x8 ones"):
        run_evaluate(monkeypatch, tmp_path, *model)
    with pytest.raises(ValueError, match=r"dataset=cifar10 has 3-channel 32x32 images but the model takes 1-channel"):
        run_evaluate(monkeypatch, tmp_path, *model, "dataset=cifar10")
    assert not (tmp_path / "records").exists()
    run_evaluate(monkeypatch, tmp_path, *model, "dataset=digits", f"output_dir={tmp_path / 'digits'}")
    assert (tmp_path / "digits" / "samples.png").is_file()
    (rec,) = records(tmp_path)
    assert rec["key"]["dataset"] == "digits-8" and rec["key"]["model"]["official"] == "cifar10"


def test_index_noise_is_per_sample():
    from ddim.evaluation.sampling import latents_and_noise

    a, na = latents_and_noise([0, 1, 2], (1, 4, 4), 5, seed=3)
    b, nb = latents_and_noise([2], (1, 4, 4), 5, seed=3)
    torch.testing.assert_close(a[2:], b)
    torch.testing.assert_close(na[:, 2:], nb)
    c, _ = latents_and_noise([2], (1, 4, 4), 0, seed=4)
    assert not torch.equal(b, c)


def test_reconstruction_mse(monkeypatch, tmp_path, tiny_ckpt):
    from ddim.checkpoints import load_for_sampling
    from ddim.data import build_dataset
    from ddim.evaluation.tasks import reconstruction_mse

    run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=reconstruction", "sampler.steps=5",
                 "reconstruction.num_images=6")
    (rec,) = records(tmp_path)
    assert rec["num_samples"] == 6 and rec["key"]["sampler"]["eta"] == 0.0
    assert rec["nfe"] == 10  # range(0, 1000, 200): 5 steps to encode + 5 to decode
    mse = rec["metric"]["mse"]
    assert 0 < mse < 1

    # the same number by hand: encode, decode, per-dimension MSE on [0, 1]
    from ddim.diffusion import encode, sample, timesteps

    eps, ac, _ = load_for_sampling(tiny_ckpt)
    ds = build_dataset("digits", root="data", image_size=8, channels=1, split="test", random_flip=False)
    x0 = torch.stack([ds[i][0] for i in range(6)])
    seq = timesteps(1000, 5, kind="linear")
    with torch.no_grad():
        x0_hat = sample(eps, encode(eps, x0, ac, seq), ac, seq, eta=0.0)
    ref = ((x0 + 1) / 2 - (x0_hat.clamp(-1, 1) + 1) / 2).double().square().mean().item()
    assert mse == pytest.approx(ref, rel=1e-5)
    assert reconstruction_mse(eps, ac, seq, ds, num_images=6, batch_size=4)["mse"] == pytest.approx(ref, rel=1e-5)


def test_interpolation_and_consistency_grids(monkeypatch, tmp_path, tiny_ckpt):
    from PIL import Image

    out = tmp_path / "interp"
    run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=interpolation", "sampler.steps=3",
                 "interpolation.num_pairs=2", "interpolation.num_alphas=5", f"output_dir={out}")
    w, h = Image.open(out / "interpolation.png").size
    assert (w, h) == (5 * 34 + 2, 2 * 34 + 2)  # 8x8 images shown at 32x32, 2-pixel padding: 5 alphas x 2 pairs

    out = tmp_path / "cons"
    run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=consistency", "consistency.steps=[2,5,10]",
                 "consistency.num_samples=3", f"output_dir={out}")
    w, h = Image.open(out / "consistency.png").size
    assert (w, h) == (3 * 34 + 2, 3 * 34 + 2)
    recs = {r["task"]: r for r in records(tmp_path)}
    assert sorted(recs) == ["consistency", "interpolation"]
    # one decode per S; linear trajectories of T = 1000: range(0, 1000, 500 | 200 | 100) -> 2 + 5 + 10
    assert recs["consistency"]["nfe"] == 17 and recs["interpolation"]["nfe"] == 4  # range(0, 1000, 333)
    assert recs["consistency"]["key"]["sampler"]["steps"] == [2, 5, 10]  # named by its own S values
    assert "_S2-5-10_" in Path(recs["consistency"]["_path"]).name


@pytest.mark.parametrize("override, error, match", [
    ("sampler.eta=-0.5", ValueError, r"sampler.eta must be a number >= 0 or 'hat', got -0.5"),
    ("sampler.eta=often", ValueError, r"sampler.eta must be a number >= 0 or 'hat'"),
    ("sampler.steps=1001", ValueError, r"sampler.steps=1001 exceeds the model's T=1000"),
    ("sampler.steps=0", ValueError, r"positive integer"),
    ("sampler.trajectory=cubic", ValueError, r"trajectory must be one of linear, quadratic"),
    ("sampler.kind=euler", ValueError, r"sampler.kind must be one of ddim"),
    ("task=nope", ValueError, r"unknown task 'nope'; allowed: fid, reconstruction"),
    ("ckpt_path=/nonexistent/model.ckpt", FileNotFoundError, r"checkpoint not found: ckpt_path=/nonexistent"),
    ("fid.weights_path=/nonexistent/pt_inception.pth", FileNotFoundError, r"Inception weights not found"),
    ("dataset=cifar10", ValueError, r"dataset=cifar10 has 3-channel 32x32 images but the model takes 1-channel 8x8"),
])
def test_bad_input_fails_before_sampling(monkeypatch, tmp_path, tiny_ckpt, override, error, match):
    from ddim.evaluation import sampling, tasks

    monkeypatch.setattr(sampling, "sample_batch", lambda *a, **k: pytest.fail("sampling started despite bad input"))
    monkeypatch.setattr(tasks, "resolve_inception_weights",
                        lambda *a, **k: pytest.fail("weights resolved despite bad input"))
    with pytest.raises(error, match=match):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=4", "sampler.steps=3",
                     override)
    assert not (tmp_path / "records").exists()


def test_two_models_given(monkeypatch, tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match=r"two models given: ckpt_path=.* and official=cifar10; pass one"):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "official=cifar10",
                     "official_path=/nonexistent/cifar10.ckpt", "task=samples")


def test_a_file_that_is_no_checkpoint(monkeypatch, tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("garbage\n")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*notes.ckpt: not a valid torch checkpoint"):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={bad}", "task=samples")


def test_train_checkpoint_given_as_official(monkeypatch, tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match=r"tiny.ckpt is a checkpoint written by train.py.*pass it as ckpt_path="):
        run_evaluate(monkeypatch, tmp_path, "official=cifar10", f"official_path={tiny_ckpt}", "task=samples")


def test_records_are_readable_by_the_team(monkeypatch, tmp_path):
    """Records follow the umask like every other output (mkstemp alone makes them owner-only)."""
    from ddim.evaluation.records import write_record

    old = os.umask(0o022)
    try:
        path = write_record(tmp_path / "r" / "x.json", {"metric": {}})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_official_checkpoint_missing(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="official checkpoint not found: official_path=/nonexistent"):
        run_evaluate(monkeypatch, tmp_path, "official=cifar10", "official_path=/nonexistent/cifar10.ckpt", "task=samples")


def test_solver_kind_dispatches_to_solvers(monkeypatch, tmp_path, tiny_ckpt):
    from ddim.diffusion import timesteps
    from ddim.diffusion.solvers import solve
    from ddim.checkpoints import load_for_sampling
    from ddim.evaluation.images import to_uint8
    from ddim.evaluation.sampling import latents_and_noise

    with pytest.raises(ValueError, match="deterministic ODE solver; it needs sampler.eta=0"):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=samples", "sampler.kind=heun",
                     "sampler.eta=0.5")
    out = tmp_path / "heun"
    run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "task=samples", "sampler.kind=heun",
                 "sampler.steps=3", "samples.num_samples=3", "samples.save_npz=true", f"output_dir={out}")
    got = np.load(out / "samples.npz")["arr_0"]
    eps, ac, _ = load_for_sampling(tiny_ckpt)
    x_T, _ = latents_and_noise(range(3), (1, 8, 8), 0, seed=0)
    with torch.no_grad():
        want = to_uint8(solve("heun", eps, x_T, ac, timesteps(1000, 3, kind="linear"))).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, want)
    (rec,) = records(tmp_path)
    assert rec["nfe"] == 2 * len(timesteps(1000, 3, kind="linear")) - 1  # Heun: 2 S - 1 on the real S


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 5), (1, 1)])
def test_sample_batches_are_the_same_whatever_the_number_of_ranks(n, batch_size):
    """generate's loader as Lightning shards it for predict on W ranks: every W computes the same batches, so a
    sample keeps its batch (shape, companions, position) on 1, 2 or 3 GPUs; GPU kernels are chosen per shape
    and bf16 sums depend on them, so anything else changed the images (1 vs 2 H200s)."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
    from lightning.pytorch.trainer.connectors.data_connector import _update_dataloader
    from lightning.pytorch.trainer.states import RunningStage

    from ddim.evaluation.sampling import sample_loader

    want = [tuple(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    for world in (1, 2, 3):
        loader = sample_loader(n, batch_size, world_size=world)
        got = []
        for rank in range(world):
            sampler = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=world, rank=rank, shuffle=False)
            mine = [tuple(b.tolist()) for b in _update_dataloader(loader, sampler, mode=RunningStage.PREDICTING)]
            assert mine, f"rank {rank} of {world} has no batch"  # (fewer batches than ranks: some repeat)
            got += mine
        assert set(got) == set(want), world
        assert len(got) == max(len(want), world)


# evaluate.py with the pixel stand-ins in every DDP process.  A monkeypatch stays in the test's process, and
# Lightning starts rank 1 as `python <sys.argv[0]> <args>`: so the stand-ins go in a script that stays sys.argv[0]
# and calls evaluate.main() (runpy.run_path would set sys.argv[0] to evaluate.py while it runs, and rank 1 would run
# the bare evaluate.py with the real Inception).  The log gets one line per reference computed and per rank's first
# sampled batch, in the order they happen.
DDP_FID_WRAPPER = """\
import os
import sys

sys.path.insert(0, os.environ["DDP_FID_TESTS"])
from conftest import load_script
from test_evaluate import pixel_fid, pixel_reference_statistics

from ddim.evaluation import sampling, tasks

RANK = os.environ.get("LOCAL_RANK", "0")  # set by Lightning for the processes it starts


def log(event):
    with open(os.environ["DDP_FID_LOG"], "a") as f:
        f.write(f"{event} {RANK}\\n")


def logged_reference_statistics(*args, **kwargs):
    log("reference")
    return pixel_reference_statistics(*args, **kwargs)


real_sample_batch, sampled = sampling.sample_batch, []


def logged_sample_batch(*args, **kwargs):
    if not sampled:
        log("sample")
        sampled.append(True)
    return real_sample_batch(*args, **kwargs)


tasks.fid_between, tasks.reference_statistics = pixel_fid, logged_reference_statistics
tasks.resolve_inception_weights = lambda weights_path, cache_dir: weights_path
sampling.sample_batch = logged_sample_batch
load_script("evaluate.py", "ddim_evaluate_script").main()
"""


@pytest.mark.slow
def test_two_process_ddp_gives_the_same_images_and_fid(monkeypatch, tmp_path, tiny_ckpt, fake_inception):
    """task=fid over 2 CPU processes (DDP, gloo): shards merged by index equal the 1-process samples; rank 0 alone
    computes the reference statistics, before any rank samples, and scores the merged samples as one process does.
    5 samples in batches of 2: rank 0 samples two batches, rank 1 one."""
    common = [f"ckpt_path={tiny_ckpt}", "task=fid", "fid.num_samples=5", f"fid.weights_path={fake_inception}",
              "fid.save_grid=true", "sampler.steps=3", "sampler.eta=1.0", "sampler.batch_size=2"]
    run_evaluate(monkeypatch, tmp_path / "one", *common, f"output_dir={tmp_path / 'one'}")
    wrapper, log = tmp_path / "evaluate_with_pixel_fid.py", tmp_path / "events.log"
    wrapper.write_text(DDP_FID_WRAPPER)
    env = child_env(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", DDP_FID_LOG=str(log),
                    DDP_FID_TESTS=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, str(wrapper), *common, f"paths.log_dir={tmp_path / 'ddp'}",
                           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "device=cpu",
                           "trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'two'}"],
                          env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one reference, by rank 0, before either rank's first batch (both processes append: lines in time order)
    assert log.read_text().splitlines() in (["reference 0", "sample 0", "sample 1"],
                                            ["reference 0", "sample 1", "sample 0"])
    (one,), (two,) = records(tmp_path / "one"), records(tmp_path / "ddp")
    assert two["outputs"]["sampling"]["world_size"] == 2 and one["outputs"]["sampling"]["world_size"] == 1
    assert two["metric"]["fid"] == one["metric"]["fid"]  # the same images by index, scored by one process
    grids = [torchvision.io.decode_png(torchvision.io.read_file(str(tmp_path / d / "samples.png")))
             for d in ("one", "two")]
    assert torch.equal(*grids)  # all 5 samples, bit for bit
    assert not list((tmp_path / "two" / "shards").glob("*.pt"))  # merged shards are cleaned up
    # the sampling rate after each rank's first batch (compilation) needs 2 batches on every rank: 1 process has
    # them, rank 1 of 2 not
    assert one["outputs"]["sampling"]["images_per_s"] > 0 and two["outputs"]["sampling"]["images_per_s"] is None


def test_sampling_rate_sums_the_ranks_after_their_first_batch():
    from ddim.evaluation.sampling import sampling_rate

    # rank 0: batches end at 2, 3, 4 s (4, 4, 2 images); rank 1: at 2.5, 3.5 s (4, 4 images)
    got = sampling_rate([[(2.0, 4), (3.0, 4), (4.0, 2)], [(2.5, 4), (3.5, 4)]])
    assert got == {"world_size": 2, "first_batch_s": 2.5, "images_per_s": 6 / 2 + 4 / 1}
    # a rank with a single batch has no rate after its first: no sum that would undercount
    assert sampling_rate([[(2.0, 4), (3.0, 4)], [(2.5, 4)]])["images_per_s"] is None
    assert sampling_rate([[(1.0, 4)]]) == {"world_size": 1, "first_batch_s": 1.0, "images_per_s": None}


@pytest.mark.parametrize("overrides, match", [
    (("task=samples", "samples.num_samples=0"), r"samples.num_samples must be a positive integer, got 0"),
    (("task=samples", "sampler.batch_size=0"), r"sampler.batch_size must be a positive integer, got 0"),
    (("task=samples", "use_ema=maybe"), r"use_ema must be true or false, got 'maybe'"),
    (("task=samples", "seed=abc"), r"seed must be an integer, got 'abc'"),
    (("task=fid", "fid.num_samples=1"), r"fid.num_samples must be >= 2 \(FID needs a covariance\), got 1"),
    (("task=consistency", "consistency.steps=[5,5000]"),
     r"consistency.steps entry=5000 exceeds the model's T=1000 diffusion steps"),
    (("task=reconstruction", "reconstruction.num_images=-2"),
     r"reconstruction.num_images must be a positive integer or null, got -2"),
    (("task=reconstruction", "sampler.kind=plms"), r"task=reconstruction encodes .*sampler.kind=plms is not used"),
    (("task=interpolation", "interpolation.num_pairs=0"), r"interpolation.num_pairs must be a positive integer, got 0"),
    (("task=consistency", "consistency.steps=[]"), r"consistency.steps must be a non-empty list"),
    (("task=consistency", "consistency.steps=[5,0]"),
     r"consistency.steps entry \(in \[5, 0\]\) must be a positive integer, got 0"),
])
def test_bad_task_settings_fail_before_loading(monkeypatch, tmp_path, tiny_ckpt, overrides, match):
    from ddim.evaluation import runner

    if "consistency.steps=[5,5000]" not in overrides:  # S against T: checked right after loading, before sampling
        monkeypatch.setattr(runner, "load_for_sampling", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    monkeypatch.setattr(runner, "TASKS", {name: lambda *a: pytest.fail("task ran despite bad input") for name in runner.TASKS})
    with pytest.raises(ValueError, match=match):
        run_evaluate(monkeypatch, tmp_path, f"ckpt_path={tiny_ckpt}", "sampler.steps=3", *overrides)
    assert not (tmp_path / "records").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_named(monkeypatch, tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match=r"device=cuda but CUDA is not available.*allowed here: auto, cpu"):
        mod = _evaluate_module()
        argv = ["evaluate.py", f"paths.log_dir={tmp_path}", f"ckpt_path={tiny_ckpt}", "task=samples", "device=cuda"]
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
        mod.main()


def test_rewritten_checkpoint_is_not_answered_from_the_old_record(monkeypatch, tmp_path, tiny_ckpt, capsys):
    """The record key holds the checkpoint file's size and mtime: last.ckpt rewritten in place is a new model."""
    import os
    import shutil

    ckpt = tmp_path / "last.ckpt"
    shutil.copy(tiny_ckpt, ckpt)
    args = (f"ckpt_path={ckpt}", "task=samples", "samples.num_samples=2", "sampler.steps=2")
    run_evaluate(monkeypatch, tmp_path, *args)
    run_evaluate(monkeypatch, tmp_path, *args)
    assert "skipped: already done" in capsys.readouterr().out  # unchanged file: the record answers
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"] = {k: v + 0.1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, ckpt)
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, even on coarse-mtime file systems
    run_evaluate(monkeypatch, tmp_path, *args)
    assert "skipped" not in capsys.readouterr().out
    recs = records(tmp_path)
    assert len(recs) == 2 and len({r["key"]["model"]["mtime_ns"] for r in recs}) == 2


def test_sweep_presets_are_found_from_any_working_directory(tmp_path):
    """`python /path/to/evaluate.py +sweeps=<preset>` from another folder: the search-path plugin (installed with
    the project as hydra_plugins.ddim_sweeps) finds sweeps/ beside conf/, and a trailing --cfg job still parses."""
    env = child_env()
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), f"paths.log_dir={tmp_path}",
                           "+sweeps=table1_cifar10_quick", "sampler.steps=7", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task: fid" in proc.stdout and "steps: 7" in proc.stdout and "precision: bf16" in proc.stdout
    assert "num_samples: 5000" in proc.stdout and "trajectory: quadratic" in proc.stdout


def test_sampling_does_not_advise_loader_workers(tmp_path, monkeypatch):
    """generate's loader only hands out index batches, so Lightning's advice to give it workers (printed on machines
    with more than two cores) would mislead; generate keeps it quiet and still samples."""
    import warnings

    from lightning.pytorch.trainer.connectors import data_connector

    from ddim.diffusion import alphas_cumprod, beta_schedule, timesteps
    from ddim.evaluation.sampling import generate

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda local_world_size: 15)
    zero_eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(zero_eps, alphas_cumprod(beta_schedule("linear")), timesteps(1000, 2), 3, (1, 4, 4),
                       batch_size=2, shard_dir=tmp_path, trainer_kwargs={"accelerator": "cpu"})
    assert out.shape == (3, 1, 4, 4) and out.dtype == torch.uint8
    assert not [w for w in caught if "many workers" in str(w.message)]
