"""Train a DDPM ε-model for DDIM sampling.  `python train.py` trains on the embedded digits on a CPU.

    python train.py                                  # digits, a few minutes on a CPU, writes a DDIM sample grid
    python train.py dataset=celeba                   # the paper's CelebA 64x64 setup (model/optim follow)
    python train.py experiment=cifar10 trainer=ddp logger=wandb
    python train.py ckpt_path=outputs/.../checkpoints/last.ckpt   # resume
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Build data, module, trainer from ``cfg`` and fit; returns where things were written."""
    import warnings

    import lightning as L
    from hydra.utils import instantiate

    # the EMA copy is in eval mode on purpose (it never trains): not worth a warning on every run
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    from ddim.data import DiffusionDataModule
    from ddim.config import log_lightning_once
    from ddim.training.module import DiffusionModule

    log_lightning_once()

    L.seed_everything(cfg.seed, workers=True)
    data_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    dm = DiffusionDataModule(**data_cfg, seed=cfg.seed)
    module = DiffusionModule(model=cfg.model, diffusion=cfg.diffusion, optim=cfg.optim,
                             data={k: data_cfg.get(k) for k in ("name", "image_size", "channels", "category")},
                             fast=cfg.get("fast"))

    cb_cfg = cfg.get("callbacks") or {}
    partial = [name for name, c in cb_cfg.items() if c is not None and "_target_" not in c]
    if partial:  # e.g. an experiment's settings for callbacks that callbacks=none removed
        log.warning(f"callbacks without _target_ ignored (settings for callbacks that are not in the chosen "
                    f"callbacks group): {', '.join(partial)}")
    callbacks = [instantiate(c) for c in cb_cfg.values() if c is not None and "_target_" in c]
    if not cfg.trainer.get("enable_progress_bar", True):
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        from ddim.checkpoints import read_checkpoint
        from ddim.models.build import check_architecture
        from ddim.models.ema import ema_warmup_of

        ckpt = read_checkpoint(ckpt_path, "cpu")
        check_architecture((ckpt.get("hyper_parameters") or {}).get("model"), module.hparams.model)  # clear message before fit
        step, max_steps = int(ckpt.get("global_step", 0)), cfg.trainer.get("max_steps")
        if max_steps is not None and max_steps != -1 and step >= max_steps:
            raise ValueError(f"ckpt_path={ckpt_path} is already at step {step}; trainer.max_steps={max_steps} leaves "
                             f"nothing to train (allowed: trainer.max_steps > {step})")
        # the EMA rule is not part of the architecture but changes the average from here on
        was, now = ema_warmup_of((ckpt.get("hyper_parameters") or {}).get("optim")), ema_warmup_of(cfg.optim)
        if was != now:
            log.warning(f"ckpt_path={ckpt_path} trained its EMA with optim.ema_warmup={str(was).lower()}; this run "
                        f"goes on from step {step} with optim.ema_warmup={str(now).lower()} (set "
                        f"optim.ema_warmup={str(was).lower()} to keep the checkpoint's rule)")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

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
