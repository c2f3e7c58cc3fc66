"""Hydra configs: presets compose and build their model; the data set drives model/optim; bad choices fail clearly."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from conftest import REPO

CONF = REPO / "conf"


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=["paths.output_dir=/tmp/unused", *overrides])


OFFICIAL = {  # official DDIM configs/*.yml
    "cifar10": dict(image_size=32, ch_mult=[1, 2, 2, 2], dropout=0.1, batch_size=128, lr=2e-4),
    "celeba": dict(image_size=64, ch_mult=[1, 2, 2, 2, 4], dropout=0.1, batch_size=128, lr=2e-4),
    "church": dict(image_size=256, ch_mult=[1, 1, 2, 2, 4, 4], dropout=0.0, batch_size=64, lr=2e-5),
    "bedroom": dict(image_size=256, ch_mult=[1, 1, 2, 2, 4, 4], dropout=0.0, batch_size=64, lr=2e-5),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_experiment_preset_composes_and_builds_model(name):
    from ddim.models.build import build_unet as build_eps_model

    cfg = _compose(f"experiment={name}")
    want = OFFICIAL[name]
    assert cfg.dataset.image_size == want["image_size"] and cfg.model.resolution == want["image_size"]
    assert list(cfg.model.ch_mult) == want["ch_mult"] and cfg.model.dropout == want["dropout"]
    assert cfg.model.ch == 128 and cfg.model.num_res_blocks == 2 and list(cfg.model.attn_resolutions) == [16]
    assert cfg.dataset.batch_size == want["batch_size"] and cfg.optim.lr == pytest.approx(want["lr"])
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.eps == 1e-8
    from ddim.models import OFFICIAL_CONFIGS  # the official configs as the loader knows them

    official = OFFICIAL_CONFIGS[name]
    assert cfg.optim.ema_decay == official["model"]["ema_rate"]  # 0.9999 CIFAR-10/CelebA, 0.999 LSUN
    assert cfg.optim.lr == pytest.approx(official["optim"]["lr"])
    assert list(cfg.model.ch_mult) == official["model"]["ch_mult"]
    assert cfg.diffusion.beta_schedule == "linear" and cfg.diffusion.num_diffusion_timesteps == 1000
    model = build_eps_model(OmegaConf.to_container(cfg.model, resolve=True))
    n = sum(p.numel() for p in model.parameters())
    if name == "cifar10":
        assert n == 35_746_307  # the official CIFAR-10 model
    assert n > 30_000_000


PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_experiment_preset_composes_and_instantiates(name):
    """Every file in conf/experiment composes with train.yaml, its model and callbacks build, and its data,
    optimiser, schedule and fast settings pass train.py's checks (unknown keys included)."""
    from hydra.utils import instantiate

    from ddim.data import DiffusionDataModule
    from ddim.models.build import build_unet
    from ddim.training.module import check_diffusion, check_optim, fast_settings

    cfg = _compose(f"experiment={name}", "trainer.accelerator=cpu")
    with torch.device("meta"):  # the architecture, without allocating its weights
        build_unet(OmegaConf.to_container(cfg.model, resolve=True))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    assert any(type(c).__name__ == "FinalStepCheckpoint" for c in callbacks)
    assert cfg.trainer.max_steps > 0 and cfg.fast.keys() == {"compile", "mode", "step_graph"}
    # the settings the data and training modules read, checked as train.py makes them (no data read, no U-Net)
    DiffusionDataModule(**OmegaConf.to_container(cfg.dataset, resolve=True))
    check_optim(OmegaConf.to_container(cfg.optim, resolve=True))
    check_diffusion(OmegaConf.to_container(cfg.diffusion, resolve=True))
    fast_settings(OmegaConf.to_container(cfg.fast, resolve=True))


def test_cifar10_quick_is_the_cifar10_recipe_made_fast():
    """experiment=cifar10_quick: experiment=cifar10's network, data and optimiser, with bf16, the compiled network,
    the step graph, the EMA warm-up, 15,000 steps, a checkpoint every 1,000 (and last.ckpt), grids every 5,000."""
    quick, paper = _compose("experiment=cifar10_quick", "trainer=gpu"), _compose("experiment=cifar10")
    assert quick.model == paper.model and quick.dataset == paper.dataset and quick.diffusion == paper.diffusion
    assert {k: v for k, v in quick.optim.items() if k != "ema_decay"} == \
        {k: v for k, v in paper.optim.items() if k != "ema_decay"}
    assert quick.trainer.precision == "bf16-mixed" and quick.trainer.accelerator == "gpu"
    assert quick.fast == {"compile": True, "mode": None, "step_graph": True} and quick.optim.ema_warmup is True
    assert quick.trainer.max_steps == 30000 and _compose("experiment=cifar10_quick", "trainer.max_steps=60000"
                                                         ).trainer.max_steps == 60000
    assert quick.callbacks.model_checkpoint.every_n_train_steps == 5000 and quick.callbacks.model_checkpoint.save_last
    assert quick.callbacks.sample_grid.every_n_steps == 5000
    assert quick.trust_checkpoint is False and quick.ckpt_path is None


def _final_ema(decay: float, steps: int, warmup: bool, w_init: float, w: torch.Tensor) -> float:
    """The EMA after ``steps`` updates of ``ddim.models.ema.ema_decay_at`` over the weights ``w`` (one scalar per
    step), seeded with ``w_init``: sum of each weight times (1 - d_n) * the product of the later decays."""
    from ddim.models.ema import ema_decay_at

    d = torch.tensor([ema_decay_at(decay, n, warmup) for n in range(steps)], dtype=torch.float64)
    later = torch.cat([d.log().flip(0).cumsum(0).flip(0)[1:], d.new_zeros(1)]).exp()  # prod_{m > n} d_m
    return float(d.prod() * w_init + ((1 - d) * later * w[:steps]).sum())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_ema_warmup_default_leaves_the_paper_length_runs_unchanged(name):
    """Every preset warms the EMA up (optim.ema_warmup); over the dataset's train_steps (the paper's run length)
    the warmed-up and the official average of one weight trajectory agree to 1e-9, while after a short run
    (12,000 steps at 0.9997) they do not."""
    cfg = _compose(f"experiment={name}")
    assert cfg.optim.ema_warmup is True
    steps, decay = int(cfg.trainer.max_steps), float(cfg.optim.ema_decay)
    w = torch.randn(steps, generator=torch.Generator().manual_seed(0), dtype=torch.float64).cumsum(0) / steps ** 0.5
    final = [_final_ema(decay, steps, warmup, 10.0, w) for warmup in (True, False)]
    assert final[0] == pytest.approx(final[1], abs=1e-9)
    short = [_final_ema(0.9997, 12_000, warmup, 10.0, w) for warmup in (True, False)]
    assert abs(short[0] - short[1]) > 0.1


def test_dataset_choice_drives_model_and_optim():
    cfg = _compose("dataset=celeba")
    assert list(cfg.model.ch_mult) == [1, 2, 2, 2, 4] and cfg.model.resolution == 64
    assert cfg.trainer.max_steps == cfg.dataset.train_steps
    cfg = _compose("dataset=church", "model=cifar10", "optim.lr=1e-4")  # explicit overrides win
    assert list(cfg.model.ch_mult) == [1, 2, 2, 2] and cfg.model.resolution == 256 and cfg.optim.lr == 1e-4
    cfg = _compose()  # the default: digits
    assert cfg.dataset.name == "digits" and cfg.model.in_channels == cfg.dataset.channels
    assert "csv" in cfg.logger


@pytest.mark.parametrize("group", ["logger=wandb", "logger=tensorboard", "logger=none", "trainer=ddp", "trainer=cpu"])
def test_other_groups_compose(group):
    cfg = _compose(group)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_ddp_trainers_compose_to_their_strategies():
    """trainer=ddp: static_graph, no bucket views (with CUDA graphs they give wrong gradients);
    trainer=ddp_step_graph: DDP's processes without the wrapper, for fast.step_graph=true."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from ddim.training.step_graph import StepGraphDDPStrategy

    strategy = instantiate(_compose("trainer=ddp").trainer.strategy)
    assert type(strategy) is DDPStrategy
    assert strategy._ddp_kwargs == {"static_graph": True, "gradient_as_bucket_view": False}
    cfg = _compose("trainer=ddp_step_graph", "fast.step_graph=true")
    assert isinstance(instantiate(cfg.trainer.strategy), StepGraphDDPStrategy) and cfg.fast.step_graph is True


@pytest.mark.parametrize("override", ["dataset=imagenet", "experiment=ffhq", "model=nope"])
def test_unknown_choice_fails_clearly(override):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as e:
        _compose(override)
    msg = str(e.value)
    assert override.split("=")[1] in msg and "Available options" in msg


@pytest.mark.parametrize("config, overrides, name", [
    ("evaluate", ["task=fid", "sampler.eta=hat", "sampler.steps=20"], "evaluate-fid-ddim-etahat-S20"),
    ("train", ["dataset=cifar10"], "train-cifar10"),
])
def test_wandb_run_names(config, overrides, name):
    """W&B names say what ran: evaluate.py runs by task and sampler (they were all 'evaluate-None'), training
    runs by data set."""
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name=config, overrides=["logger=wandb", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        assert OmegaConf.select(cfg, "logger.wandb.name") == name


def test_the_settings_each_section_accepts_are_those_the_configs_ship():
    """The lists that refuse unknown keys (+optim.loss=l1 ...) hold every key the shipped configs have, so a key
    added to a yaml file without the code that reads it, or the reverse, fails here."""
    from ddim.data import DATASET_KEYS, DATASETS
    from ddim.evaluation.settings import SECTION_KEYS
    from ddim.evaluation.tasks import TASKS
    from ddim.training.module import DIFFUSION_KEYS, FAST_DEFAULTS, OPTIM_KEYS

    for optim in sorted(p.stem for p in (CONF / "optim").glob("*.yaml")):
        assert set(_compose(f"optim={optim}").optim) == set(OPTIM_KEYS), optim
    for diffusion in sorted(p.stem for p in (CONF / "diffusion").glob("*.yaml")):
        assert set(_compose(f"diffusion={diffusion}").diffusion) == set(DIFFUSION_KEYS), diffusion
    assert set(_compose().fast) == set(FAST_DEFAULTS)
    for dataset in sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")):
        assert set(_compose(f"dataset={dataset}").dataset) == set(DATASET_KEYS), dataset
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="evaluate", overrides=["paths.log_dir=/tmp/unused"])
    for section, keys in SECTION_KEYS.items():
        assert set(cfg[section]) == set(keys), section
    assert set(TASKS) <= set(SECTION_KEYS), "a task's section needs its keys in SECTION_KEYS"
    for name, spec in DATASETS.items():  # the folder evaluate.py looks in is the one the data set file names
        for f in (CONF / "dataset").glob("*.yaml"):
            d = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
            if d["name"] == name and name != "image_folder":
                assert d["root"] == "${paths.data_dir}" + (f"/{spec.data_subdir}" if spec.data_subdir else ""), f.name


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_sweep_preset_sets_only_settings_evaluate_reads(sweep):
    """A preset's sampler, fid, task and dataset entries pass evaluate.py's unknown-key check (they would stop every
    job of the sweep before its first sample)."""
    from ddim.config import check_known_keys
    from ddim.data import DATASET_KEYS
    from ddim.evaluation.settings import SECTION_KEYS

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="evaluate", overrides=[f"+sweeps={sweep}", "paths.log_dir=/tmp/unused"])
    for name in ("sampler", "fid", cfg.task):
        check_known_keys(cfg[name], SECTION_KEYS[name], name)
    check_known_keys(cfg.get("dataset") or {}, DATASET_KEYS, "dataset")
