"""Training callbacks: DDIM sample grids from fixed noise, so runs can be compared by eye as they train, the
training speed in steps and images per second, and checkpoints that include the step training ended at."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ddim.data import image_grid
from ddim.diffusion import sample, timesteps
from ddim.files import remove_stray_temporaries

log = logging.getLogger(__name__)


class FinalStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves the step training ended at (a step file and ``last.ckpt``), and that
    removes, when training starts, the temporary files that a kill during a save left in its folder.

    Lightning's saves every ``every_n_train_steps`` only, so a run whose ``max_steps`` is not a multiple of it
    ended with a ``last.ckpt`` up to n-1 steps behind the trained model."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None:
            stray = remove_stray_temporaries(self.dirpath)
            if stray:
                log.info(f"removed {len(stray)} temporary file(s) of interrupted checkpoint saves in {self.dirpath}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own skip rules: fast_dev_run, not fitting, or this step already saved
        if self._every_n_train_steps > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
        # after: Lightning's own end-of-training last.ckpt (in a run that saved none before) marks the step as saved
        super().on_train_end(trainer, pl_module)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` and at the end of training: DDIM (η=0, ``steps`` steps) samples of the EMA
    model from the same noise, saved as ``<dirpath>/step_XXXXXXX.png`` and ``<dirpath>/last.png`` and sent
    to the logger (W&B image / TensorBoard image).  The fixed noise makes grids of one run comparable.

    clip_denoised clamps each step's x_0 prediction to [-1, 1] (diffusers' ``clip_sample``): early in training
    a few latents otherwise decode to blank or saturated images.  It only affects these preview grids;
    evaluate.py samples without clipping, as the official code does for the paper's tables."""

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_samples: int = 64, steps: int = 50,
                 eta: float = 0.0, seed: int = 1234, nrow: int | None = None, use_ema: bool = True,
                 display_size: int | None = None, clip_denoised: bool = True):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.num_samples = int(num_samples)
        self.steps = int(steps)
        self.eta = eta
        self.seed = int(seed)
        self.nrow = nrow
        self.use_ema = use_ema
        self.display_size = display_size  # viewing only: image_grid's min_size (None: ddim.data.VIEW_MIN_SIZE)
        self.clip_denoised = bool(clip_denoised)
        self.last_path: Path | None = None

    def _noise(self, pl_module: L.LightningModule) -> torch.Tensor:
        d = pl_module.hparams.data
        shape = (self.num_samples, int(d.get("channels", 3)), int(d["image_size"]), int(d["image_size"]))
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=g).to(pl_module.device)

    @torch.no_grad()
    def sample(self, pl_module: L.LightningModule) -> torch.Tensor:
        """x_0 in [-1, 1] from the fixed noise."""
        model = pl_module.ema_model if self.use_ema else pl_module.model
        was_training = model.training
        model.eval()
        try:
            seq = timesteps(pl_module.num_timesteps, self.steps)
            x = sample(model, self._noise(pl_module), pl_module.alphas_cumprod, seq.to(pl_module.device), eta=self.eta,
                       clip_denoised=self.clip_denoised)
        finally:
            model.train(was_training)
        return x.float().clamp(-1, 1)

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        x = self.sample(pl_module)
        step = trainer.global_step
        nrow = self.nrow or int(math.ceil(math.sqrt(self.num_samples)))
        grid = image_grid((x + 1) / 2, nrow, self.display_size)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{step:07d}.png"
        torchvision.utils.save_image(grid, path)
        torchvision.utils.save_image(grid, self.dirpath / "last.png")
        self.last_path = self.dirpath / "last.png"
        for logger in trainer.loggers:
            _log_image(logger, grid, step)
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)


class StepRate(L.Callback):
    """Logs ``train/steps_per_s`` and ``train/images_per_s`` over each window of ``every_n_steps`` optimizer
    steps (wall time, so data loading and logging count).  One device sync per window, none per step: unlike
    Lightning's ``ThroughputMonitor`` (a sync every step) it does not slow a sync-free step down.  The first
    window after the start (or a resume) includes compilation; later ones are the steady state."""

    def __init__(self, every_n_steps: int = 100):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self._t0: float | None = None
        self._step0 = 0
        self._images = 0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(pl_module)
        self._t0, self._step0, self._images = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(x.shape[0]) * trainer.world_size
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps < self.every_n_steps:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        dt = now - self._t0
        self.last = {"train/steps_per_s": steps / dt, "train/images_per_s": self._images / dt}
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # straight to the loggers: once per window, at this step
                logger.log_metrics(self.last, step=trainer.global_step)
        self._t0, self._step0, self._images = now, trainer.global_step, 0


def _log_image(logger: Any, grid: torch.Tensor, step: int) -> None:
    if isinstance(logger, WandbLogger):
        logger.log_image(key="samples", images=[grid.cpu()], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image("samples", grid.cpu(), global_step=step)
