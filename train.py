"""Train a DDPM ε-model for DDIM sampling.  `python train.py` trains on the embedded digits on a CPU.

    python train.py                                  # digits, a few minutes on a CPU, writes a DDIM sample grid
    python train.py dataset=celeba                   # the paper's CelebA 64x64 setup (model/optim follow)
    python train.py experiment=cifar10 trainer=ddp logger=wandb
    python train.py experiment=cifar10_quick trainer=gpu          # 30k fast steps on one GPU
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

from ddim.config import as_bool, log_lightning_once
from ddim.data import DiffusionDataModule, data_folder
from ddim.training.checkpoint_io import AtomicCheckpointIO
from ddim.training.checks import (check_data_fits_model, check_loggers, check_output_folders, check_resume,
                                  check_settings, check_strategy, check_training_length, slurm_per_node)
from ddim.training.module import DiffusionModule

log = logging.getLogger(__name__)


# hydra/launcher=slurm asks SLURM for ${slurm_per_node:${trainer.devices}} GPUs and tasks per node
OmegaConf.register_new_resolver("slurm_per_node", slurm_per_node, replace=True)


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


def trainer_plugins(trainer_cfg: DictConfig) -> list:
    """The configured plugins plus ``AtomicCheckpointIO`` (crash-safe checkpoint files), unless one of them already
    is a CheckpointIO."""
    plugins = list(instantiate(trainer_cfg.get("plugins") or []))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def log_interval(trainer_cfg: DictConfig, start_step: int = 0) -> int:
    """``trainer.log_every_n_steps``, or ``trainer.max_steps`` when the run (from ``start_step``, where it resumes) is
    shorter than the interval: Lightning logs at multiples of the interval, so a short run would log no loss at all
    (no metrics.csv); at multiples of max_steps it logs at its last step."""
    every, steps = trainer_cfg.get("log_every_n_steps", 50), trainer_cfg.get("max_steps", -1)
    if isinstance(steps, int) and 0 < steps - start_step < every:
        log.info(f"trainer.log_every_n_steps={every} is more than the {steps - start_step} steps this run trains: "
                 f"logging at its last step, so that the run logs its loss")
        return steps
    return every


def data_record(data_cfg: dict) -> dict:
    """What the checkpoint records of its data set, so evaluate.py finds it again: name, size, channels, LSUN
    category, and an image folder's absolute path (the other data sets have their place under paths.data_dir)."""
    record = {k: data_cfg.get(k) for k in ("name", "image_size", "channels", "category")}
    folder = data_folder(data_cfg)  # image_folder: the images are known by their folder only
    if folder is not None:
        record["root"] = folder
    return record


def run(cfg: DictConfig) -> dict:
    """Build data, module, trainer from ``cfg`` and fit; returns where things were written."""
    # the EMA copy is in eval mode on purpose (it never trains): not worth a warning on every run
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    log_lightning_once()
    trust = as_bool(cfg.get("trust_checkpoint", False), "trust_checkpoint")

    check_training_length(cfg.trainer)
    check_settings(cfg)
    check_strategy(cfg)
    check_loggers(cfg)

    L.seed_everything(cfg.seed, workers=True)
    data_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dm = DiffusionDataModule(**data_cfg, seed=cfg.seed)
    module = DiffusionModule(model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim,
                             data=data_record(data_cfg),
                             fast=cfg.get("fast"))
    start_step = check_resume(cfg, module.hparams.model, trust) if cfg.get("ckpt_path") is not None else 0
    check_data_fits_model(dm, module.hparams.model)
    check_output_folders(cfg)

    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    # the data module shards the data over ranks itself (a resumable sampler), so Lightning must not swap it
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=trainer_plugins(cfg.trainer), use_distributed_sampler=False,
                                     log_every_n_steps=log_interval(cfg.trainer, start_step))
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
