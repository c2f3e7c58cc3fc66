"""Hydra configs: presets compose and build their model; the data set drives model/optim; bad choices fail clearly."""
from __future__ import annotations

import pytest
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
    from ddim.lit import build_eps_model

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
    """trainer=ddp: static_graph, no bucket views (with CUDA graphs they gave wrong gradients on an H200);
    trainer=ddp_step_graph: DDP's processes without the wrapper, for fast.step_graph=true."""
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from ddim.lit import StepGraphDDPStrategy

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


def test_slurm_launcher_config_exists():
    from hydra_plugins.hydra_submitit_launcher import config  # noqa: F401 - the plugin is installed

    text = (CONF / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert "submitit_slurm" in text


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
