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
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from ddim.checkpoints import check_train_checkpoint, read_checkpoint
from ddim.config import as_bool, log_lightning_once
from ddim.data import DiffusionDataModule
from ddim.models.build import check_architecture
from ddim.models.ema import ema_warmup_of
from ddim.training.module import DiffusionModule

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks; entries without ``_target_`` (settings for a callback that the chosen
    ``callbacks`` group does not have) are skipped with a warning."""
    cb_cfg = cfg.get("callbacks") or {}
    partial = [name for name, c in cb_cfg.items() if c is not None and "_target_" not in c]
    if partial:  # e.g. an experiment's settings for callbacks that callbacks=none removed
        log.warning(f"callbacks without _target_ ignored (settings for callbacks that are not in the chosen "
                    f"callbacks group): {', '.join(partial)}")
    callbacks = [instantiate(c) for c in cb_cfg.values() if c is not None and "_target_" in c]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


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

    L.seed_everything(cfg.seed, workers=True)
    data_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dm = DiffusionDataModule(**data_cfg, seed=cfg.seed)
    module = DiffusionModule(model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim,
                             data={k: data_cfg.get(k) for k in ("name", "image_size", "channels", "category")},
                             fast=cfg.get("fast"))
    if cfg.get("ckpt_path") is not None:
        check_resume(cfg, module, trust)

    callbacks = build_callbacks(cfg)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
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
