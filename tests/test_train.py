"""Training end to end on tiny models: fast_dev_run on three data sources, exact resume, loading for sampling,
the `python train.py` entry point, and clear errors for bad checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, child_env
from ddim.evaluation.runner import dataset_config
from test_data import make_fake_celeba, make_image_folder

CONF = REPO / "conf"
sys.path.insert(0, str(REPO))
import train  # noqa: E402 - train.py is a script at the repository root; importing it registers its resolver
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
        "model.dropout=0.0", "diffusion.num_diffusion_timesteps=100", "trainer.accelerator=cpu", "trainer.benchmark=false",
        "callbacks.sample_grid.num_samples=4", "callbacks.sample_grid.steps=3", "dataset.num_workers=0",
        "trainer.enable_model_summary=false"]

# a one-level U-Net on 8x8 grey images, for DiffusionModule checks that build no trainer
SMALL_MODEL = {"ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 8,
               "in_channels": 1, "out_ch": 1}


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}", *TINY, *overrides])


def _run(cfg):
    return train.run(cfg)


def test_fast_dev_run_digits(tmp_path):
    res = _run(_cfg(tmp_path, "trainer.fast_dev_run=2", "dataset.batch_size=8", "dataset.image_size=8"))
    assert res["trainer"].global_step == 2
    assert (tmp_path / "samples" / "last.png").is_file()
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "last.png").size[0] >= 2 * 8


def test_fast_dev_run_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    res = _run(_cfg(tmp_path / "run", "dataset=image_folder", f"dataset.root={root}", "dataset.image_size=8",
                    "dataset.batch_size=4", "trainer.fast_dev_run=1"))
    assert res["trainer"].global_step == 1 and res["module"].hparams.data["channels"] == 3
    # the folder's absolute path is recorded: evaluate.py reads the same images without being told where
    assert res["module"].hparams.data["root"] == str(root.resolve())
    settings = SimpleNamespace(dataset=None, reads_data=True, task="reconstruction", data_dir="elsewhere")
    assert dataset_config(settings, {"data": res["module"].hparams.data})["root"] == str(root.resolve())


def test_fast_dev_run_fake_celeba(tmp_path):
    root = make_fake_celeba(tmp_path / "data")
    res = _run(_cfg(tmp_path / "run", "dataset=celeba", f"dataset.root={root}", "dataset.image_size=16",
                    "dataset.batch_size=2", "model.ch_mult=[1,2]", "trainer.fast_dev_run=1"))
    assert res["trainer"].global_step == 1


# digits test split: 180 images, batch 60 -> 3 steps per epoch; checkpoints every 3 steps.
RESUME = ["dataset.split=test", "dataset.batch_size=60", "dataset.image_size=8", "model.dropout=0.1",
          "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.sample_grid.every_n_steps=0",
          "optim.ema_decay=0.9", "optim.warmup_steps=2", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("every, files", [(3, ["step_0000003.ckpt", "step_0000004.ckpt"]),
                                          (1000, ["step_0000004.ckpt"])])  # no save before the end
def test_last_checkpoint_holds_the_step_training_ended_at(tmp_path, every, files):
    """max_steps=4 with a checkpoint every 3 (or 1000) steps: last.ckpt and a step file at step 4, not 3 (or none)."""
    every_n = f"callbacks.model_checkpoint.every_n_train_steps={every}"
    res = _run(_cfg(tmp_path, *RESUME, "trainer.max_steps=4", every_n))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", *files]
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 == res["trainer"].global_step
    w = next(k for k in last["state_dict"] if k.startswith("model."))
    torch.testing.assert_close(last["state_dict"][w], res["module"].state_dict()[w], rtol=0, atol=0)


def test_resume_matches_uninterrupted_run(tmp_path):
    full = _run(_cfg(tmp_path / "full", *RESUME, "trainer.max_steps=6"))
    ckpt3 = tmp_path / "full" / "checkpoints" / "step_0000003.ckpt"
    assert ckpt3.is_file() and (tmp_path / "full" / "checkpoints" / "last.ckpt").is_file()
    resumed = _run(_cfg(tmp_path / "resumed", *RESUME, "trainer.max_steps=6", f"ckpt_path={ckpt3}"))
    assert resumed["trainer"].global_step == 6
    a, b = full["module"].state_dict(), resumed["module"].state_dict()
    assert a.keys() == b.keys() and any(k.startswith("ema_model.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and the run really moved: weights differ from the step-3 snapshot
    from ddim.checkpoints import load_for_sampling

    m3, _, _ = load_for_sampling(ckpt3, use_ema=False)
    assert not torch.equal(m3.state_dict()[next(iter(m3.state_dict()))], a[f"model.{next(iter(m3.state_dict()))}"])
    opt_a = full["trainer"].optimizers[0].state_dict()["state"]
    opt_b = resumed["trainer"].optimizers[0].state_dict()["state"]
    torch.testing.assert_close(opt_a[0]["exp_avg"], opt_b[0]["exp_avg"], rtol=0, atol=0)


def test_load_for_sampling_and_bad_checkpoints(tmp_path):
    from ddim.checkpoints import load_for_sampling

    res = _run(_cfg(tmp_path / "r", "dataset.split=test", "dataset.batch_size=60", "dataset.image_size=8",
                    "trainer.max_steps=3", "optim.ema_decay=0.5", "trainer.enable_progress_bar=false"))
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert res["last_ckpt"] and os.path.samefile(res["last_ckpt"], last)
    # 3 steps of warm-up leave 1/10 * 2/11 * 3/12 = 0.45 % of the initial weights in the EMA: said when sampling
    # from it, not from the raw weights
    with pytest.warns(UserWarning, match=r"0\.5% of the initial .*decay 0\.5 over 3 steps, with warm-up.*"
                                         r"use_ema=false"):
        ema, ac, cfg = load_for_sampling(last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw, _, _ = load_for_sampling(last, use_ema=False)
    assert not ema.training and ac.dtype == torch.float64 and ac.shape == (100,)
    assert cfg["model"]["ch"] == 32 and cfg["data"]["image_size"] == 8 and cfg["global_step"] == 3
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(raw(x, t), res["module"].model.eval()(x, t))
        torch.testing.assert_close(ema(x, t), res["module"].ema_model(x, t))
        assert not torch.allclose(ema(x, t), raw(x, t))

    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(last.read_bytes()[: 1000])
    with pytest.raises(ValueError, match="corrupt"):
        load_for_sampling(bad)
    with pytest.raises(ValueError, match="corrupt"):
        _run(_cfg(tmp_path / "r2", "dataset.split=test", "dataset.batch_size=60", "dataset.image_size=8",
                  "trainer.max_steps=4", f"ckpt_path={bad}"))
    with pytest.raises(ValueError, match="different model architecture.*'ch'"):
        _run(_cfg(tmp_path / "r3", "dataset.split=test", "dataset.batch_size=60", "dataset.image_size=8",
                  "model.ch=64", "trainer.max_steps=4", f"ckpt_path={last}"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_for_sampling(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="use_ema must be true or false, got 'no'"):
        load_for_sampling(last, use_ema="no")
    # weights of another U-Net version (renamed keys): a short account, not torch's list of every key
    ck = torch.load(last, map_location="cpu", weights_only=True)
    ck["state_dict"] = {k.replace("ema_model.conv_in.", "ema_model.cin."): v for k, v in ck["state_dict"].items()}
    renamed = tmp_path / "renamed.ckpt"
    torch.save(ck, renamed)
    with pytest.raises(ValueError, match=r"renamed\.ckpt do not fit .*missing keys: conv_in\.weight, conv_in\.bias; "
                                         r"unexpected keys: cin\.weight, cin\.bias$"):
        load_for_sampling(renamed)


def test_batch_size_larger_than_data_fails(tmp_path):
    with pytest.raises(ValueError, match="batch_size=500 is larger than the digits data set"):
        _run(_cfg(tmp_path, "dataset.split=test", "dataset.batch_size=500", "trainer.max_steps=1"))


def test_train_py_entry_point_prints_run_dir_and_grid(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "DDIM_ROOT": str(tmp_path)}
    args = [sys.executable, str(REPO / "train.py"), *TINY, "dataset.image_size=8", "dataset.split=test",
            "dataset.batch_size=60", "trainer.max_steps=2", "trainer.log_every_n_steps=1", "hydra.run.dir=" + str(tmp_path / "run")]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("sample grid:") and lines[-1].endswith("last.png")
    assert any(line.startswith("run directory:") and str(tmp_path / "run") in line for line in lines[-3:])
    assert (tmp_path / "run" / "samples" / "last.png").is_file()
    assert (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").is_file()  # loss, grad norm, lr
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    both = out.stdout + out.stderr  # Lightning's messages once, in Hydra's format (not also as "INFO: ...")
    assert both.count("Seed set to 0") == 1 and "INFO: Seed set to 0" not in both


def test_sample_grid_clip_denoised_keeps_previews_in_range():
    """An ε-model that predicts ε = -3 x pushes x_0 predictions far outside [-1, 1]: the preview with
    clip_denoised differs from the unclipped one and equals sample(..., clip_denoised=True)."""
    from types import SimpleNamespace

    import torch

    from ddim.training.callbacks import SampleGrid
    from ddim.diffusion import alphas_cumprod, beta_schedule, sample, timesteps

    class Eps(torch.nn.Module):
        def forward(self, x, t):
            return -3.0 * x

    ac = alphas_cumprod(beta_schedule("linear", T=1000))
    module = SimpleNamespace(ema_model=Eps(), model=Eps(), alphas_cumprod=ac, num_timesteps=1000,
                             device=torch.device("cpu"),
                             hparams=SimpleNamespace(data={"channels": 1, "image_size": 4}))
    clipped = SampleGrid("unused", num_samples=4, steps=5, seed=0, clip_denoised=True).sample(module)
    raw = SampleGrid("unused", num_samples=4, steps=5, seed=0, clip_denoised=False).sample(module)
    x_T = torch.randn((4, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    expect = sample(Eps(), x_T, ac, timesteps(1000, 5), clip_denoised=True).clamp(-1, 1)
    assert torch.allclose(clipped, expect)
    assert not torch.allclose(clipped, raw)


def test_lit_update_ema_is_the_official_rule():
    """DiffusionModule.update_ema: ema <- d ema + (1 - d) param (the official EMAHelper), buffers copied."""
    import torch

    from ddim.training.module import DiffusionModule

    model = dict(ch=32, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
                 in_channels=1, resolution=8, resamp_with_conv=True)
    m = DiffusionModule(model=model, diffusion={"beta_schedule": "linear", "num_diffusion_timesteps": 100},
                        optim={"ema_decay": 0.9})
    before = [p.detach().clone() for p in m.ema_model.parameters()]
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn_like(p))
    m.update_ema()
    for e, old, p in zip(m.ema_model.parameters(), before, m.model.parameters()):
        torch.testing.assert_close(e, 0.9 * old + 0.1 * p.detach())


def test_lit_ema_warmup_and_the_warning_when_the_ema_still_holds_initial_weights(monkeypatch):
    """optim.ema_warmup=true: update n uses min(decay, (1+n)/(10+n)); at the end of a fit whose EMA (no warm-up)
    still holds more than 0.1 % of the initial weights, a warning says how much and what to set."""
    import torch

    from ddim.training.module import DiffusionModule

    model = dict(ch=32, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
                 in_channels=1, resolution=8, resamp_with_conv=True)
    diffusion = {"beta_schedule": "linear", "num_diffusion_timesteps": 100}
    m = DiffusionModule(model=model, diffusion=diffusion, optim={"ema_decay": 0.9999, "ema_warmup": True})
    before = [p.detach().clone() for p in m.ema_model.parameters()]
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn_like(p))
    m.update_ema(n=2)  # d = 3/12
    for e, old, p in zip(m.ema_model.parameters(), before, m.model.parameters()):
        torch.testing.assert_close(e, 0.25 * old + 0.75 * p.detach())

    for optim, steps, warns in (({"ema_decay": 0.9999}, 20_000, "13.5% of the initial"),
                                ({"ema_decay": 0.9999}, 100_000, None),
                                ({"ema_decay": 0.9999, "ema_warmup": True}, 20_000, None)):
        m = DiffusionModule(model=model, diffusion=diffusion, optim=optim)
        monkeypatch.setattr(DiffusionModule, "global_step", property(lambda self, s=steps: s))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.on_train_end()
        said = [str(w.message) for w in caught if "EMA weights" in str(w.message)]
        assert (said and warns in said[0] and "optim.ema_warmup=true" in said[0]) if warns else not said, said


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the eager backend: the compiled path's code without building C++ kernels on a CPU."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, **{**kw, "backend": "eager"}))


def test_fast_compiled_training_same_loss_and_checkpoint_keys(tmp_path, eager_compile):
    """fast.compile=true: the trained network is prepared by ddim.accel.prepare_for_training (channels_last,
    ChannelStatGroupNorm, PhaseUpsample) and compiled; the EMA copy stays the plain U-Net in the same memory layout;
    the loss, the checkpoint keys and the weights' names are the plain module's."""
    from ddim.accel.layers import ChannelStatGroupNorm, PhaseUpsample
    from ddim.models.unet import UNet

    plain_res = _run(_cfg(tmp_path / "plain", "trainer.fast_dev_run=2", "dataset.batch_size=8", "dataset.image_size=8"))
    fast_res = _run(_cfg(tmp_path / "fast", "trainer.fast_dev_run=2", "dataset.batch_size=8", "dataset.image_size=8",
                         "fast.compile=true"))
    plain, fast = plain_res["module"], fast_res["module"]
    assert fast_res["trainer"].global_step == 2 and fast.hparams.fast == {"compile": True, "mode": None,
                                                                         "step_graph": False}
    assert not any(isinstance(m, (ChannelStatGroupNorm, PhaseUpsample)) for m in plain.model.modules())
    assert any(isinstance(m, ChannelStatGroupNorm) for m in fast.model.modules())
    assert any(isinstance(m, PhaseUpsample) for m in fast.model.modules())
    assert type(fast.ema_model) is UNet
    assert not any(isinstance(m, (ChannelStatGroupNorm, PhaseUpsample)) for m in fast.ema_model.modules())
    assert [e.stride() for e in fast.ema_model.parameters()] == [p.stride() for p in fast.model.parameters()]
    assert "_compiled_model" in fast.__dict__ and fast.state_dict().keys() == plain.state_dict().keys()
    # clipping and the EMA used the tensors listed at train start: the live parameters of model and EMA
    lists = fast.__dict__["_step_tensor_lists"]
    assert [id(p) for p in lists["params"]] == [id(p) for p in fast.model.parameters()]
    assert [id(p) for p in lists["ema"]] == [id(p) for p in fast.ema_model.parameters()]
    # same weights, same batch, same t and noise: the same loss
    fast.load_state_dict(plain.state_dict())
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    losses = []
    for m in (plain, fast):
        m.train()
        m.log = lambda *a, **k: None  # outside a Trainer loop
        torch.manual_seed(3)
        losses.append(m.training_step(x0, 0).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("mode, marks", [(None, 0), ("reduce-overhead", 1), ("max-autotune", 1),
                                         ("max-autotune-no-cudagraphs", 0)])
def test_training_step_marks_cuda_graph_steps_for_every_mode_with_graphs(monkeypatch, eager_compile, mode, marks):
    """A compiled step whose mode records CUDA graphs (reduce-overhead, and max-autotune, which includes them) tells
    cudagraph trees that a new step begins, so the last step's graph outputs may be overwritten; others do not."""
    from ddim.training.module import DiffusionModule

    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(mode))
    m = DiffusionModule(model=dict(ch=32, out_ch=1, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
                                   in_channels=1, resolution=8, resamp_with_conv=True),
                        diffusion={"beta_schedule": "linear", "num_diffusion_timesteps": 100},
                        fast={"compile": True, "mode": mode})
    m.log = lambda *a, **k: None
    m.train()
    m.training_step(torch.rand(2, 1, 8, 8) * 2 - 1, 0)
    assert len(calls) == marks


@pytest.mark.parametrize("fast, message", [
    ({"turbo": True}, r"fast.turbo is not a setting of fast \(nothing reads it\); allowed: compile, mode, step_graph"),
    ({"channels_last": True}, r"fast.channels_last is not a setting of fast"),
    ({"compile": True, "mode": "fastest"}, r"fast.mode must be null or one of default, reduce-overhead, .*'fastest'"),
    ({"mode": "reduce-overhead"}, r"fast.mode='reduce-overhead' is a torch.compile mode: it needs fast.compile=true"),
])
def test_fast_settings_reject_unknown_keys_and_values(fast, message):
    from ddim.training.module import DiffusionModule

    with pytest.raises(ValueError, match=message):
        DiffusionModule(model=SMALL_MODEL, diffusion={}, fast=fast)


def test_step_rate_logs_training_speed(tmp_path):
    """train/steps_per_s and train/images_per_s reach the logger once per window, with real positive values."""
    import csv

    res = _run(_cfg(tmp_path, "trainer.max_steps=4", "dataset.batch_size=8", "dataset.image_size=8",
                    "callbacks.step_rate.every_n_steps=2", "callbacks.sample_grid.every_n_steps=0",
                    "logger=csv", "trainer.log_every_n_steps=1"))
    rate = next(cb for cb in res["trainer"].callbacks if type(cb).__name__ == "StepRate")
    assert rate.last["train/images_per_s"] == pytest.approx(8 * rate.last["train/steps_per_s"])
    rows = [r for f in tmp_path.rglob("metrics.csv") for r in csv.DictReader(open(f)) if r.get("train/steps_per_s")]
    assert len(rows) == 2 and all(float(r["train/steps_per_s"]) > 0 for r in rows)
    assert [int(r["step"]) for r in rows] == [2, 4]  # after the 2nd and 4th optimizer steps


def test_step_rate_rejects_bad_window():
    from ddim.training.callbacks import StepRate

    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        StepRate(every_n_steps=0)


def test_experiment_settings_for_removed_callbacks_are_ignored(tmp_path, caplog):
    """experiment=cifar10 sets callbacks.model_checkpoint/sample_grid steps; with callbacks=none those entries have
    no _target_ and must be skipped (with a warning naming them), not handed to the Trainer as callbacks."""
    tiny = [o for o in TINY if not o.startswith("callbacks.")]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", "experiment=cifar10", "dataset=digits", "model=digits", "optim=digits",
            "callbacks=none", *tiny, "trainer.fast_dev_run=1", "dataset.batch_size=4", "dataset.image_size=8"])
    assert "_target_" not in cfg.callbacks.model_checkpoint  # the situation this guards
    with caplog.at_level("WARNING"):
        res = _run(cfg)
    assert res["trainer"].global_step == 1
    assert "model_checkpoint" in caplog.text and "sample_grid" in caplog.text
    assert not any(type(c).__name__ == "SampleGrid" for c in res["trainer"].callbacks)  # (Lightning adds its own
    # default ModelCheckpoint when none is configured)


@pytest.mark.parametrize("key", ["compile", "step_graph"])
def test_fast_switches_must_be_booleans(key):
    from ddim.training.module import DiffusionModule

    with pytest.raises(ValueError, match=rf"fast.{key} must be true or false, got 'maybe'"):
        DiffusionModule(model=SMALL_MODEL, diffusion={}, fast={key: "maybe"})


def test_resume_with_nothing_left_to_train_is_an_error(tmp_path):
    """A checkpoint at step 3 with trainer.max_steps=3 would 'finish' at once, silently: say so instead."""
    res = _run(_cfg(tmp_path / "a", *RESUME, "trainer.max_steps=3"))
    with pytest.raises(ValueError, match=r"is already at step 3; trainer.max_steps=3 leaves nothing to train "
                                         r"\(allowed: trainer.max_steps > 3\)"):
        _run(_cfg(tmp_path / "b", *RESUME, "trainer.max_steps=3", f"ckpt_path={res['last_ckpt']}"))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_resume_says_when_the_noise_schedule_changes(tmp_path, caplog):
    """Resumed under another schedule: the run goes on, saying which settings changed; the same schedule written
    differently (a default left out) says nothing."""
    res = _run(_cfg(tmp_path / "a", *RESUME, "trainer.max_steps=3"))
    with caplog.at_level("WARNING"):
        _run(_cfg(tmp_path / "b", *RESUME, "trainer.max_steps=4", "diffusion.beta_schedule=quad",
                  f"ckpt_path={res['last_ckpt']}"))
    assert "trained its 3 steps under another noise schedule (diffusion.beta_schedule=linear -> quad)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _run(_cfg(tmp_path / "c", *RESUME, "trainer.max_steps=4", "~diffusion.beta_start",
                  f"ckpt_path={res['last_ckpt']}"))
    assert "noise schedule" not in caplog.text


def test_resume_says_when_the_ema_rule_changes(tmp_path, caplog):
    """A checkpoint trained with the official EMA rule (as all did before the warm-up became the default), resumed
    under the default: the run goes on, and says which rule each side has and how to keep the checkpoint's."""
    res = _run(_cfg(tmp_path / "a", *RESUME, "trainer.max_steps=3", "optim.ema_warmup=false"))
    with caplog.at_level("WARNING"):
        _run(_cfg(tmp_path / "b", *RESUME, "trainer.max_steps=4", f"ckpt_path={res['last_ckpt']}"))
    assert ("trained its EMA with optim.ema_warmup=false; this run goes on from step 3 with optim.ema_warmup=true "
            "(set optim.ema_warmup=false to keep the checkpoint's rule)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _run(_cfg(tmp_path / "c", *RESUME, "trainer.max_steps=4", "optim.ema_warmup=false",
                  f"ckpt_path={res['last_ckpt']}"))
    assert "ema_warmup" not in caplog.text


def test_optim_numbers_are_checked_by_name():
    from ddim.training.module import DiffusionModule

    with pytest.raises(ValueError, match=r"optim.lr must be a number, got 'abc'"):
        DiffusionModule(model=SMALL_MODEL, diffusion={}, optim={"lr": "abc"})


def test_step_graph_training_equals_the_automatic_path(tmp_path):
    """fast.step_graph=true (manual optimisation around GradientGraph; eager on a CPU) takes the same
    steps as Lightning's automatic path: same loss, clipping, Adam, LR warm-up, EMA, step count, checkpoint."""
    common = [*RESUME, "trainer.max_steps=4", "optim.grad_clip=0.05"]  # a small clip, so clipping acts
    auto = _run(_cfg(tmp_path / "auto", *common))
    graph = _run(_cfg(tmp_path / "graph", *common, "fast.step_graph=true"))
    assert graph["trainer"].global_step == auto["trainer"].global_step == 4
    assert not graph["module"].automatic_optimization and graph["module"].hparams.fast["step_graph"] is True
    a, b = auto["module"].state_dict(), graph["module"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    opt_a, opt_b = (r["trainer"].optimizers[0] for r in (auto, graph))
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]  # warm-up stepped once per step
    torch.testing.assert_close(opt_b.state_dict()["state"][0]["exp_avg"], opt_a.state_dict()["state"][0]["exp_avg"],
                               rtol=1e-4, atol=1e-8)
    ck_a, ck_b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                  for r in ("auto", "graph"))
    assert ck_b["global_step"] == ck_a["global_step"] == 4  # every 3 steps, and where training ended
    assert ck_b["hyper_parameters"]["fast"]["step_graph"] is True
    assert ck_b["state_dict"].keys() == ck_a["state_dict"].keys()
    # and it resumes from the automatic run's checkpoint (same optimizer state, same keys)
    res = _run(_cfg(tmp_path / "resumed", *common, "trainer.max_steps=6", "fast.step_graph=true",
                    f"ckpt_path={tmp_path / 'auto' / 'checkpoints' / 'last.ckpt'}"))
    assert res["trainer"].global_step == 6


def test_step_graph_bad_settings_are_named(tmp_path):
    from ddim.training.module import DiffusionModule

    with pytest.raises(ValueError, match="fast.step_graph=true captures.*fast.mode='reduce-overhead'"):
        DiffusionModule(model=SMALL_MODEL, diffusion={},
                        fast={"step_graph": True, "compile": True, "mode": "reduce-overhead"})


def test_step_graph_strategy_frees_the_graph_before_tearing_down(monkeypatch):
    """StepGraphDDPStrategy.teardown frees the module's step graph before DDP's teardown (and so before the process
    group is destroyed at exit, which hangs while a graph holding its all-reduce lives: two H200s)."""
    from lightning.pytorch.strategies import DDPStrategy

    from ddim.training.module import DiffusionModule
    from ddim.training.step_graph import StepGraphDDPStrategy

    module = DiffusionModule(model=SMALL_MODEL, diffusion={"num_diffusion_timesteps": 10}, fast={"step_graph": True})
    graph = module._gradient_graph()
    order = []
    monkeypatch.setattr(graph, "release", lambda: order.append("release"))
    monkeypatch.setattr(DDPStrategy, "teardown", lambda self: order.append("ddp teardown"))
    strategy = StepGraphDDPStrategy()
    strategy._lightning_module = module
    strategy.teardown()
    assert order == ["release", "ddp teardown"]
    strategy._lightning_module = None  # no module (e.g. torn down twice): nothing to free
    strategy.teardown()
    assert order == ["release", "ddp teardown", "ddp teardown"]


@pytest.mark.parametrize("overrides, message", [
    (["trainer=ddp_step_graph"], "StepGraphDDPStrategy.*needs fast.step_graph=true"),
    (["trainer=ddp", "fast.step_graph=true"], "DistributedDataParallel would all-reduce them again: use "
                                              "trainer=ddp_step_graph"),
    (["trainer=ddp", "fast.compile=true", "fast.mode=reduce-overhead",
      "trainer.strategy.gradient_as_bucket_view=true"],
     "gradient_as_bucket_view=true and fast.mode='reduce-overhead' \\(CUDA graphs\\) trains on wrong gradients"),
])
def test_step_graph_and_ddp_strategy_must_match(tmp_path, monkeypatch, overrides, message):
    """Without the graph's all-reduce (or with DDP's on top of it), or with DDP's bucket views under CUDA graphs
    (measured: wrong gradients), the replicas would train wrongly: refused from the config, before anything is
    built; the strategies refuse the same pairings at run time (one check, ``check_strategy_pairing``)."""
    monkeypatch.setattr(train, "DiffusionDataModule", lambda *a, **k: pytest.fail("built the data before the check"))
    with pytest.raises(ValueError, match=message):
        _run(_cfg(tmp_path, *overrides, "trainer.accelerator=cpu", "trainer.devices=1"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("devices", [4, 8])
def test_slurm_launcher_asks_for_trainer_devices_per_node(devices):
    """One task per GPU, as many as trainer.devices (not a fixed 8: a 4-GPU run would get 8 tasks)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "trainer=ddp", f"trainer.devices={devices}",
                                 "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (devices, devices, 2)


@pytest.mark.parametrize("devices", [-1, "[0,1]"])
def test_slurm_launcher_refuses_devices_that_are_not_a_count(devices):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "trainer=ddp", f"trainer.devices={devices}"])
    with pytest.raises(Exception, match=r"trainer.devices=.*allowed: a positive integer"):
        cfg.hydra.launcher.gpus_per_node


def test_strategies_check_the_pairing_at_run_time():
    """What train.py refuses from the config, the strategy objects refuse too (for Python API users)."""
    from ddim.training.step_graph import StepGraphDDPStrategy

    strategy = StepGraphDDPStrategy.__new__(StepGraphDDPStrategy)
    strategy._lightning_module = type("M", (), {"automatic_optimization": True})()
    with pytest.raises(ValueError, match="needs fast.step_graph=true"):
        strategy.configure_ddp()


@pytest.mark.slow
def test_train_py_ddp_step_graph_on_two_cpu_processes(tmp_path):
    """trainer=ddp_step_graph fast.step_graph=true: 2 processes (gloo), gradients all-reduced by the step itself."""
    env = {**os.environ, "WANDB_MODE": "offline", "DDIM_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(REPO / "train.py"), *TINY, "trainer=ddp_step_graph", "fast.step_graph=true",
            "trainer.accelerator=cpu", "trainer.devices=2", "dataset.image_size=8", "dataset.split=test",
            "dataset.batch_size=16", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
            "hydra.run.dir=" + str(tmp_path / "run")]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3


def test_ddp_ranks_draw_their_own_timesteps_noise_and_dropout():
    """seed_everything seeds every rank alike; at train start each rank of several moves to its own stream."""
    from types import SimpleNamespace

    from ddim.training.module import DiffusionModule
    from ddim.training.objective import rank_seed

    m = DiffusionModule(model=SMALL_MODEL, diffusion={})

    def draws(rank, world, step=0):
        torch.manual_seed(0)  # what seed_everything left on every rank
        m._trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=step,
                                     strategy=SimpleNamespace(model=m))
        m.on_train_start()
        return torch.randint(0, 1000, (8,))

    torch.manual_seed(0)
    seeded = torch.randint(0, 1000, (8,))
    assert torch.equal(draws(0, 1), seeded)  # one process: the stream seed_everything set, untouched
    assert not torch.equal(draws(0, 2), draws(1, 2))  # two ranks: their own t (and ε, dropout)
    assert torch.equal(draws(1, 2), draws(1, 2)) and not torch.equal(draws(1, 2), draws(1, 2, step=3))  # per resume
    assert len({rank_seed(0, r, s) for r in range(8) for s in (0, 1000)}) == 16
    m._trainer = None


class MarkerPayload:
    """Unpickling this object creates ``path`` (what a malicious checkpoint's code could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_that_needs_full_unpickling_is_refused_and_runs_no_code(tmp_path):
    """A pickle payload renamed .ckpt (plain pickle, or inside a torch.save'd dict) is refused with a message that says
    why and names the opt-in, by load_for_sampling, the official loader and train.py's resume; its code never runs."""
    import pickle

    from ddim.checkpoints import load_for_sampling, read_checkpoint

    marker = tmp_path / "marker"
    plain_pickle, in_torch_file = tmp_path / "payload.ckpt", tmp_path / "payload2.ckpt"
    plain_pickle.write_bytes(pickle.dumps(MarkerPayload(marker)))
    torch.save({"state_dict": {}, "x": MarkerPayload(marker)}, in_torch_file)
    assert not marker.exists()
    for path, what in ((plain_pickle, "Unsupported operand"), (in_torch_file, "GLOBAL _?io.open")):
        refused = rf"refused to open .*{path.name}: it holds more than tensors .*\(.*{what}.*can run code.*trust_checkpoint=true"
        with pytest.raises(ValueError, match=refused):
            read_checkpoint(path)
        with pytest.raises(ValueError, match=refused):
            load_for_sampling(path)
        with pytest.raises(ValueError, match=refused):
            load_for_sampling(path, format="official", config="cifar10")
    with pytest.raises(ValueError, match="refused to open .*payload2.ckpt"):
        _run(_cfg(tmp_path / "run", "dataset.split=test", "dataset.batch_size=60", "dataset.image_size=8",
                  "trainer.max_steps=2", f"ckpt_path={in_torch_file}"))
    assert not marker.exists()
    control = tmp_path / "control"  # the payload does run when fully unpickled: the check above can fail
    pickle.loads(pickle.dumps(MarkerPayload(control))).close()
    assert control.exists()


def test_trusted_checkpoint_with_other_objects_loads(tmp_path):
    """trust=True (trust_checkpoint=true) opens a file of the user's own that holds more than tensors: a harmless
    Fraction here; without it the same file is refused."""
    from fractions import Fraction

    from ddim.checkpoints import read_checkpoint

    path = tmp_path / "own.ckpt"
    torch.save({"w": torch.ones(2), "note": Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="fractions.Fraction.*trust_checkpoint=true"):
        read_checkpoint(path)
    obj = read_checkpoint(path, trust=True)
    assert obj["note"] == Fraction(1, 3) and torch.equal(obj["w"], torch.ones(2))


@pytest.mark.parametrize("kind, message", [
    ("text", r"not a valid torch checkpoint \(corrupt, truncated or another kind of file"),
    ("empty", r"not a valid torch checkpoint"),
    ("tensor", r"holds a single tensor of shape \(3,\), not a checkpoint written by train.py"),
    ("state_dict", r"is a bare state dict \(2 tensors, e.g. 'conv.weight'\).*format='official'"),
    ("list", r"holds a list .*official=<name>"),
    ("directory", r"is a directory; give the checkpoint file itself \(it holds last.ckpt\)"),
    ("other_dict", r"not a checkpoint written by train.py \(no state_dict/hyper_parameters.model; keys: \['epoch'\]"),
])
def test_files_that_are_not_checkpoints_get_clear_messages(tmp_path, kind, message):
    """For sampling and for train.py's resume alike: what the file is, not a KeyError or AttributeError."""
    from ddim.checkpoints import load_for_sampling

    path = tmp_path / "x.ckpt"
    if kind == "text":
        path.write_text("hello, this is text\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "state_dict":
        torch.save({"conv.weight": torch.zeros(1), "conv.bias": torch.zeros(1)}, path)
    elif kind == "list":
        torch.save([{"a": torch.zeros(1)}, {}], path)
    elif kind == "directory":
        path.mkdir()
        (path / "last.ckpt").write_bytes(b"")
    else:
        torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match=message):
        load_for_sampling(path)
    with pytest.raises(ValueError, match=message):
        _run(_cfg(tmp_path / "run", "dataset.split=test", "dataset.batch_size=60", "dataset.image_size=8",
                  "trainer.max_steps=2", f"ckpt_path={path}"))
    assert not (tmp_path / "run" / "checkpoints").exists()


TINY_UNET = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.1,
                 in_channels=3, resolution=32, resamp_with_conv=True)


def write_ema_export(path, steps=1200):
    """An ema.pt as the former CIFAR-10 script's ``export`` wrote it: the EMA state dict, the U-Net config (tuples),
    the step count and the run's settings, with torch's version string in ``machine``."""
    from ddim.models.unet import UNet

    torch.manual_seed(0)
    model = UNet(**TINY_UNET)
    torch.save({"ema": model.state_dict(), "unet": dict(TINY_UNET), "steps": steps, "train_seconds": 12.5,
                "ema_decay": 0.9995, "ema_warmup": True, "lr": 2e-4, "batch": 128, "limit": None,
                "machine": {"torch": torch.__version__, "device": "cuda:0", "gpu": "test"}}, path)
    return model


def test_convert_ema_export_gives_a_checkpoint_evaluate_reads(tmp_path):
    """ema.pt: refused by load_for_sampling with the convert command named; converted (CLI), it samples the export's
    weights (EMA and raw alike) under the script's schedule, and train.py refuses to resume it."""
    from ddim.checkpoints import load_for_sampling

    ema_pt, out = tmp_path / "ema.pt", tmp_path / "conv" / "ema.ckpt"
    model = write_ema_export(ema_pt)
    with pytest.raises(ValueError, match=r"ema.pt export .*python -m ddim.checkpoints convert-ema .*ema\.pt <out>\.ckpt"):
        load_for_sampling(ema_pt)
    done = subprocess.run([sys.executable, "-m", "ddim.checkpoints", "convert-ema", str(ema_pt), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}" in done.stdout and not list(out.parent.glob(".*tmp*"))
    ema, ac, cfg = load_for_sampling(out)
    raw, _, _ = load_for_sampling(out, use_ema=False)
    assert cfg["global_step"] == 1200 and cfg["model"]["ch_mult"] == [1, 2] and cfg["data"]["image_size"] == 32
    assert cfg["optim"]["ema_decay"] == 0.9995 and cfg["optim"]["ema_warmup"] is True
    assert ac.shape == (1000,) and ac[0].item() == pytest.approx(1 - 1e-4)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        want = model.eval()(x, t)
        torch.testing.assert_close(ema(x, t), want, rtol=0, atol=0)
        torch.testing.assert_close(raw(x, t), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no training state .* cannot be resumed"):
        _run(_cfg(tmp_path / "run", "dataset=cifar10", "model=cifar10", "model.ch_mult=[1,2]",
                  "model.attn_resolutions=[16]", "model.dropout=0.1", f"ckpt_path={out}", "trainer.max_steps=1300"))


def test_convert_ema_rejects_other_files(tmp_path):
    from ddim.checkpoints import convert_ema_export, main

    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"is not an ema.pt export \(needs keys ema, unet, steps; has \['weights'\]\)"):
        convert_ema_export(other, tmp_path / "o.ckpt")
    with pytest.raises(SystemExit) as e:
        main(["convert-ema", str(other), str(tmp_path / "o.ckpt")])
    assert e.value.code == 2 and not (tmp_path / "o.ckpt").exists()


def make_cifar10_arrays(root, n=16, size=8):
    """cifar10_train.npz as the data module reads decoded CIFAR-10: x uint8 (N, H, W, 3), y labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(root / "cifar10_train.npz", x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             y=rng.integers(0, 10, n, dtype=np.uint8))
    return root


def test_cifar10_quick_trains_and_resumes_across_commands(tmp_path):
    """experiment=cifar10_quick (bf16-mixed, step graph, EMA warm-up; compiling is tested above and left out here for
    time) on decoded arrays, shrunk to a tiny U-Net: 2 steps, then a second command with ckpt_path=last.ckpt goes on
    to 4 from the saved weights, optimizer and EMA (exact resume itself: test_resume_matches_uninterrupted_run)."""
    data = make_cifar10_arrays(tmp_path / "data")
    quick = ["experiment=cifar10_quick", f"dataset.root={data}", "dataset.image_size=8", "dataset.batch_size=8",
             "model.ch_mult=[1,2]", "model.attn_resolutions=[]", "trainer.enable_progress_bar=false",
             "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=0"]
    preset = _cfg(tmp_path / "a", *quick)
    assert preset.fast.compile and preset.fast.step_graph and preset.trainer.precision == "bf16-mixed"
    assert preset.trainer.max_steps == 30000 and preset.optim.ema_warmup
    assert preset.callbacks.model_checkpoint.save_last and preset.callbacks.sample_grid.every_n_steps == 0
    quick += ["fast.compile=false", "trainer.precision=32-true"]  # bf16 on a CPU: slow
    _run(_cfg(tmp_path / "a", *quick, "trainer.max_steps=2"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["fast"]["step_graph"] is True
    resumed = _run(_cfg(tmp_path / "b", *quick, "trainer.max_steps=4", f"ckpt_path={last}"))
    assert resumed["trainer"].global_step == 4
    opt_state = resumed["trainer"].optimizers[0].state_dict()["state"][0]
    assert int(opt_state["step"]) == 4  # Adam went on from the saved moments, not from scratch
    ended = resumed["module"].state_dict()
    assert not torch.equal(ended["ema_model.conv_in.weight"], saved["state_dict"]["ema_model.conv_in.weight"])


# ----------------------------------------------------------------------------- GradientGraph (fast.step_graph)

def _graph_loss_and_params(seed=0):
    from ddim.models.unet import UNet

    torch.manual_seed(seed)
    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                 in_channels=3, resolution=16).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 10, 50, 99])
    return model, (lambda x0: (model(x0, t) - x0).square().sum(dim=(1, 2, 3)).mean()), x, t


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_graph_gives_the_plain_gradients_in_one_buffer(clip):
    """(eager on a CPU) the loss, the pre-clip norm and clip_grad_norm_'s clipped gradients, as views of one flat
    fp32 buffer in each parameter's strides; zeroed every call; views dropped by zero_grad are bound again."""
    import copy

    from ddim.training.step_graph import GradientGraph

    model, loss_fn, x, t = _graph_loss_and_params()
    ref_model = copy.deepcopy(model)
    ref_loss = (ref_model(x, t) - x).square().sum(dim=(1, 2, 3)).mean()
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip if clip else float("inf"))
    graph = GradientGraph(loss_fn, list(model.parameters()), grad_clip=clip)
    for _ in range(2):  # the buffer is zeroed each call: gradients do not accumulate across steps
        loss, norm = graph(x)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        assert p.grad.stride() == p.stride()
    assert model.conv_in.weight.grad.is_contiguous(memory_format=torch.channels_last)
    model.zero_grad(set_to_none=True)
    graph(x)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="grad_clip must be positive or None, got 0"):
        GradientGraph(loss_fn, list(model.parameters()), grad_clip=0)
    with pytest.raises(ValueError, match="fp32 gradients; got a torch.bfloat16 parameter"):
        GradientGraph(loss_fn, [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])


class _FakeGraph:
    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1


def test_gradient_graph_release_resets_every_captured_graph():
    """release() frees every captured graph once and forgets it; release_gradient_graphs() frees all live ones."""
    from ddim.training.step_graph import GradientGraph, release_gradient_graphs

    model, loss_fn, x, _ = _graph_loss_and_params()
    graph = GradientGraph(loss_fn, list(model.parameters()))
    fakes = [_FakeGraph(), _FakeGraph()]
    graph._graphs = {("a",): (fakes[0], None, None, None), ("b",): (fakes[1], None, None, None)}
    graph.release()
    graph.release()  # idempotent: nothing is reset twice
    assert [f.resets for f in fakes] == [1, 1] and graph._graphs == {}
    assert torch.isfinite(graph(x)[0])  # and it still steps (eagerly on a CPU)
    late = _FakeGraph()
    graph._graphs = {("c",): (late, None, None, None)}
    release_gradient_graphs()
    assert late.resets == 1 and graph._graphs == {}


def test_gradient_graphs_are_released_before_earlier_exit_handlers(tmp_path):
    """At exit the graphs are freed before handlers registered earlier run, such as the one Lightning registers
    at init_process_group to destroy the process group (which hangs while a graph holding its all-reduce lives)."""
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit\n"
        "import torch\n"
        "from ddim.training.step_graph import GradientGraph\n"
        "class Fake:\n"
        "    def reset(self):\n"
        "        print('graph reset', flush=True)\n"
        "atexit.register(lambda: print('process group destroyed', flush=True))  # as at init_process_group\n"
        "p = torch.nn.Parameter(torch.zeros(2))\n"
        "g = GradientGraph(lambda x: (p * x).sum(), [p])\n"
        "g._graphs = {('k',): (Fake(), None, None, None)}\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env=child_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["graph reset", "process group destroyed"]


def _gradient_graph_rank(rank, world, init, out):
    import torch.distributed as dist

    from ddim.training.step_graph import GradientGraph, broadcast_module_states

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, loss_fn, _, _ = _graph_loss_and_params(seed=rank)  # different weights per rank, until broadcast
    broadcast_module_states(model)
    torch.save(model.conv_in.weight.detach().clone(), f"{out}/w{rank}.pt")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))  # different data
    graph = GradientGraph(loss_fn, list(model.parameters()))
    assert graph.all_reduce
    graph(x)
    torch.save(graph.flat.clone(), f"{out}/flat{rank}.pt")
    graph.all_reduce = False
    graph(x)
    torch.save(graph.flat.clone(), f"{out}/local{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gradient_graph_all_reduces_the_mean_over_ranks(tmp_path):
    """Two gloo processes: StepGraphDDPStrategy's broadcast gives both rank 0's weights; the graph's gradient is the
    mean of the ranks' own gradients, the same on both."""
    import torch.multiprocessing as mp

    mp.spawn(_gradient_graph_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt") for r in range(2))
    f0, f1 = (torch.load(tmp_path / f"flat{r}.pt") for r in range(2))
    l0, l1 = (torch.load(tmp_path / f"local{r}.pt") for r in range(2))
    torch.testing.assert_close(w0, w1, rtol=0, atol=0)
    assert not torch.allclose(l0, l1)
    torch.testing.assert_close(f0, f1, rtol=0, atol=0)
    torch.testing.assert_close(f0, (l0 + l1) / 2, rtol=1e-5, atol=1e-7)
