"""Train a DDPM ε-model for DDIM sampling.  `python train.py` trains on the embedded digits on a CPU.

    python train.py                                  # digits, a few minutes on a CPU, writes a DDIM sample grid
    python train.py dataset=celeba                   # the paper's CelebA 64x64 setup (model/optim follow)
    python train.py experiment=cifar10 trainer=ddp logger=wandb
    python train.py experiment=cifar10_quick trainer=gpu          # 15k fast steps on one GPU
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt   # resume
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from ddim.checkpoints import check_train_checkpoint, read_checkpoint
from ddim.config import as_bool, check_writable_dir, log_lightning_once
from ddim.data import DiffusionDataModule
from ddim.models.build import check_architecture
from ddim.models.ema import ema_warmup_of
from ddim.training.checkpoint_io import AtomicCheckpointIO
from ddim.training.module import DiffusionModule, fast_settings
from ddim.training.step_graph import check_strategy_pairing

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list:
    """The configured callbacks; entries without ``_target_`` (settings for a callback that the chosen
    ``callbacks`` group does not have) are skipped with a warning, and without a logger (``logger=none``) the
    learning-rate monitor, which only logs, is left out."""
    cb_cfg = cfg.get("callbacks") or {}
    partial = [name for name, c in cb_cfg.items() if c is not None and "_target_" not in c]
    if partial:  # e.g. an experiment's settings for callbacks that callbacks=none removed
        log.warning(f"callbacks without _target_ ignored (settings for callbacks that are not in the chosen "
                    f"callbacks group): {', '.join(partial)}")
    callbacks = [instantiate(c) for c in cb_cfg.values() if c is not None and "_target_" in c]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not has_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def check_training_length(trainer_cfg: DictConfig) -> None:
    """Refuse settings under which the Trainer would stop at once, having trained nothing, and exit as if done."""
    if trainer_cfg.get("fast_dev_run"):
        return
    steps, epochs = trainer_cfg.get("max_steps", -1), trainer_cfg.get("max_epochs", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
        raise ValueError(f"trainer.max_steps must be a positive integer (optimizer steps to train; -1: as many as "
                         f"trainer.max_epochs allows), got {steps!r}")
    if steps == -1 and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs == 0 or epochs < -1):
        raise ValueError(f"trainer.max_steps=-1 trains for trainer.max_epochs, which must then be a positive integer "
                         f"(or -1: no limit), got {epochs!r}")


def check_strategy(cfg: DictConfig) -> None:
    """The DDP pairings that train on wrong gradients, refused from the config before anything is built."""
    strategy = cfg.trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    kind = ("ddp_step_graph" if target.endswith("StepGraphDDPStrategy") else
            "ddp" if target.endswith("DDPStrategy") or target.startswith("ddp") else "other")
    bucket_view = bool(strategy.get("gradient_as_bucket_view", False)) if isinstance(strategy, DictConfig) else False
    fast = fast_settings(OmegaConf.to_container(cfg.fast, resolve=True) if cfg.get("fast") else {})
    check_strategy_pairing(kind, fast, bucket_view)


def check_data_fits_model(dm: DiffusionDataModule, model_cfg: dict) -> None:
    """Compare one training image with the U-Net's input (``model.in_channels``, ``model.resolution``) and output,
    so a mismatch is named here instead of surfacing as a convolution shape error in the first step."""
    dm.setup("fit")
    x = dm.dataset[0][0]
    size = model_cfg.get("resolution")
    wanted = (model_cfg.get("in_channels", 3), size, size)
    h = dm.hparams
    if tuple(x.shape) != wanted:
        raise ValueError(f"the {h.name} data gives images of shape {tuple(x.shape)} (channels, height, width) but the "
                         f"model takes {wanted} (model.in_channels, model.resolution): dataset.channels={h.channels}, "
                         f"dataset.image_size={h.image_size}; allowed: the data's own channels (image_folder, celeba, "
                         f"lsun, cifar10: 3; digits: 1 or 3) and a model that matches them")
    if model_cfg.get("out_ch", wanted[0]) != wanted[0]:
        raise ValueError(f"model.out_ch={model_cfg.get('out_ch')} must equal the image channels ({wanted[0]}): the "
                         f"model predicts the noise added to the image")


def check_output_folders(cfg: DictConfig) -> None:
    """The run's folder and every folder a callback writes to must be writable now, not at the first save."""
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and "_target_" in cb and cb.get("dirpath"):
            check_writable_dir(cb.dirpath, f"callbacks.{name}.dirpath")


def trainer_plugins(trainer_cfg: DictConfig) -> list:
    """The configured plugins plus ``AtomicCheckpointIO`` (crash-safe checkpoint files), unless one of them already
    is a CheckpointIO."""
    plugins = list(instantiate(trainer_cfg.get("plugins") or []))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def check_resume(cfg: DictConfig, module: DiffusionModule, trust: bool) -> None:
    """Read ``cfg.ckpt_path`` (safely, unless ``trust``) and refuse, before any training, a file train.py cannot
    resume from: another format, another architecture, no training state, or nothing left to train."""
    ckpt_path = cfg.ckpt_path
    ckpt = check_train_checkpoint(read_checkpoint(ckpt_path, "cpu", trust=trust), ckpt_path)
    check_architecture(ckpt["hyper_parameters"].get("model"), module.hparams.model)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(f"ckpt_path={ckpt_path} holds weights for sampling but no training state (optimizer, loop "
                         f"position), e.g. one converted from ema.pt: it cannot be resumed; sample it with evaluate.py")
    step, max_steps = int(ckpt.get("global_step", 0)), cfg.trainer.get("max_steps")
    if max_steps is not None and max_steps != -1 and step >= max_steps:
        raise ValueError(f"ckpt_path={ckpt_path} is already at step {step}; trainer.max_steps={max_steps} leaves "
                         f"nothing to train (allowed: trainer.max_steps > {step})")
    # the EMA rule is not part of the architecture but changes the average from here on
    was, now = ema_warmup_of(ckpt["hyper_parameters"].get("optim")), ema_warmup_of(cfg.optim)
    if was != now:
        log.warning(f"ckpt_path={ckpt_path} trained its EMA with optim.ema_warmup={str(was).lower()}; this run "
                    f"goes on from step {step} with optim.ema_warmup={str(now).lower()} (set "
                    f"optim.ema_warmup={str(was).lower()} to keep the checkpoint's rule)")


def run(cfg: DictConfig) -> dict:
    """Build data, module, trainer from ``cfg`` and fit; returns where things were written."""
    # the EMA copy is in eval mode on purpose (it never trains): not worth a warning on every run
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    log_lightning_once()
    trust = as_bool(cfg.get("trust_checkpoint", False), "trust_checkpoint")

    check_training_length(cfg.trainer)
    check_strategy(cfg)

    L.seed_everything(cfg.seed, workers=True)
    data_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dm = DiffusionDataModule(**data_cfg, seed=cfg.seed)
    module = DiffusionModule(model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim,
                             data={k: data_cfg.get(k) for k in ("name", "image_size", "channels", "category")},
                             fast=cfg.get("fast"))
    if cfg.get("ckpt_path") is not None:
        check_resume(cfg, module, trust)
    check_data_fits_model(dm, module.hparams.model)
    check_output_folders(cfg)

    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    # the data module shards the data over ranks itself (a resumable sampler), so Lightning must not swap it
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=trainer_plugins(cfg.trainer), use_distributed_sampler=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=not trust)

    out = Path(cfg.paths.output_dir)
    grid = next((c.last_path for c in callbacks if hasattr(c, "last_path")), None)
    ckpt_cb = trainer.checkpoint_callback
    last = getattr(ckpt_cb, "last_model_path", None) if ckpt_cb is not None else None
    return {"run_dir": out, "grid": grid, "last_ckpt": last, "trainer": trainer, "module": module}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    res = run(cfg)
    if res["trainer"].is_global_zero:
        print(f"run directory: {res['run_dir'].resolve()}")
        if res["last_ckpt"]:
            print(f"checkpoint:    {Path(res['last_ckpt']).resolve()}")
        if res["grid"] is not None:
            print(f"sample grid:   {Path(res['grid']).resolve()}")


if __name__ == "__main__":
    main()
