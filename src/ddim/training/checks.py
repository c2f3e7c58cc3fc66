"""What ``train.py`` refuses before it builds anything expensive: settings that would train nothing or on wrong
gradients, data that does not fit the model, folders it could not write at the first save, and a ``ckpt_path``
it cannot resume from.  Each message names the setting, its value and what is allowed."""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddim.checkpoints import check_train_checkpoint, read_checkpoint
from ddim.config import check_int_at_least, check_positive_int, check_writable_dir, plain
from ddim.data import grey_dataset_names
from ddim.diffusion.schedules import SCHEDULE_KEYS, alphas_cumprod_from_config
from ddim.models.build import check_architecture
from ddim.models.ema import ema_warmup_of
from ddim.training.module import fast_settings
from ddim.training.step_graph import check_strategy_pairing

log = logging.getLogger(__name__)

# counts the callbacks take, with the least each allows (0: off): refused by name, not by a bare int() error later
CALLBACK_COUNTS = {"sample_grid": {"every_n_steps": 0, "num_samples": 1, "steps": 1},
                   "step_rate": {"every_n_steps": 1}, "model_checkpoint": {"every_n_train_steps": 0}}
SEED_MAX = 2**32 - 1  # numpy's limit, which Lightning's seed_everything enforces


def check_settings(cfg: DictConfig) -> None:
    """Integers where the setting is a count or a seed, refused by name before anything is built (``int()`` would
    fail later with a bare "invalid literal").  The data module and the training module check their own settings
    (switches, the optimiser's ranges, the noise schedule) when they are made, before any data is read or the U-Net
    is built."""
    check_int_at_least(cfg.get("seed"), "seed", 0, SEED_MAX)
    check_positive_int(cfg.trainer.get("log_every_n_steps", 50), "trainer.log_every_n_steps")
    for name, counts in CALLBACK_COUNTS.items():
        cb = (cfg.get("callbacks") or {}).get(name)
        if cb is not None and "_target_" in cb:
            for key, least in counts.items():
                if key in cb:
                    check_int_at_least(cb[key], f"callbacks.{name}.{key}", least)


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


def check_data_fits_model(dm: Any, model_cfg: dict) -> None:
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
                         f"dataset.image_size={h.image_size}; allowed: a model that takes the data's images (channels: "
                         f"3, or 1 for {grey_dataset_names()})")
    if model_cfg.get("out_ch", wanted[0]) != wanted[0]:
        raise ValueError(f"model.out_ch={model_cfg.get('out_ch')} must equal the image channels ({wanted[0]}): the "
                         f"model predicts the noise added to the image")


def check_output_folders(cfg: DictConfig) -> None:
    """The run's folder and every folder a callback writes to must be writable now, not at the first save."""
    check_writable_dir(cfg.paths.output_dir, "paths.output_dir")
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb is not None and "_target_" in cb and cb.get("dirpath"):
            check_writable_dir(cb.dirpath, f"callbacks.{name}.dirpath")


def check_resume(cfg: DictConfig, model_cfg: dict, trust: bool) -> int:
    """Read ``cfg.ckpt_path`` (safely, unless ``trust``) and refuse, before any training, a file train.py cannot
    resume from: another format, another architecture, no training state, or nothing left to train.  Returns the
    step it resumes from."""
    ckpt_path = cfg.ckpt_path
    ckpt = check_train_checkpoint(read_checkpoint(ckpt_path, "cpu", trust=trust), ckpt_path)
    check_architecture(ckpt["hyper_parameters"].get("model"), model_cfg)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(f"ckpt_path={ckpt_path} holds weights for sampling but no training state (optimizer, loop "
                         f"position), e.g. one converted from ema.pt: it cannot be resumed; sample it with evaluate.py")
    step, max_steps = int(ckpt.get("global_step", 0)), cfg.trainer.get("max_steps")
    if max_steps is not None and max_steps != -1 and step >= max_steps:
        raise ValueError(f"ckpt_path={ckpt_path} is already at step {step}; trainer.max_steps={max_steps} leaves "
                         f"nothing to train (allowed: trainer.max_steps > {step})")
    warn_if_schedule_changes(ckpt_path, ckpt["hyper_parameters"].get("diffusion") or {}, plain(cfg.diffusion), step)
    # the EMA rule is not part of the architecture but changes the average from here on
    was, now = ema_warmup_of(ckpt["hyper_parameters"].get("optim")), ema_warmup_of(cfg.optim)
    if was != now:
        log.warning(f"ckpt_path={ckpt_path} trained its EMA with optim.ema_warmup={str(was).lower()}; this run "
                    f"goes on from step {step} with optim.ema_warmup={str(now).lower()} (set "
                    f"optim.ema_warmup={str(was).lower()} to keep the checkpoint's rule)")
    return step


def warn_if_schedule_changes(ckpt_path: Any, was: dict, now: dict, step: int) -> None:
    """A resumed run trains the rest under its own noise schedule and saves that one as the checkpoint's: say so
    when it is not the schedule the checkpoint's steps were trained under."""
    if torch.equal(alphas_cumprod_from_config(was), alphas_cumprod_from_config(now)):
        return
    differ = ", ".join(f"diffusion.{k}={was.get(k)} -> {now.get(k)}" for k in SCHEDULE_KEYS if was.get(k) != now.get(k))
    log.warning(f"ckpt_path={ckpt_path} trained its {step} steps under another noise schedule ({differ}); this run "
                f"trains on under the new one, and its checkpoints name only that (pass the checkpoint's diffusion "
                f"settings to keep its schedule)")


def check_loggers(cfg: DictConfig) -> None:
    """``logger=tensorboard`` needs a package the project does not install by default: say so before anything is
    built, with the command, instead of Lightning's error after the data and model are ready."""
    for name, lg in (cfg.get("logger") or {}).items():
        target = str(lg.get("_target_", "")) if lg is not None else ""
        if target.endswith("TensorBoardLogger") and not any(importlib.util.find_spec(p) for p in
                                                            ("tensorboard", "tensorboardX")):
            raise ValueError(f"logger.{name} ({target}) needs the tensorboard package: pip install -e "
                             f"'.[tensorboard]'; or choose logger=csv, logger=wandb or logger=none")


def slurm_per_node(devices: object) -> int:
    """``hydra/launcher=slurm`` asks SLURM for ``trainer.devices`` GPUs and tasks per node (one task per GPU, as
    Lightning expects); ``-1`` ("all GPUs of this machine") or a list is no count SLURM can be asked for."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"hydra/launcher=slurm requests trainer.devices GPUs per node, got trainer.devices="
                         f"{devices!r}; allowed: a positive integer, e.g. trainer.devices=8")
    return devices
