"""Lightning training of the DDPM ε-model (the network DDIM samples from).

DDIM needs no training of its own: the paper samples models trained with the DDPM objective
L_γ with γ = 1 (eq. (5); ``ddim.training.objective``).  This module reproduces the official recipe: squared error
summed over pixels, mean over the batch; antithetic timesteps (t and T-1-t in one batch); Adam; gradient-norm
clipping; an EMA of the weights that is what gets sampled and is saved in every checkpoint (format:
``ddim.checkpoints``).

Speed options (``fast``), none of which changes the parameters, the loss or the checkpoint keys:
``compile`` (``ddim.accel.prepare_for_training`` and ``torch.compile`` on the trained network), ``mode`` (the
``torch.compile`` mode) and ``step_graph`` (forward, backward, all-reduce and clipping as one CUDA graph,
``ddim.training.step_graph.GradientGraph``).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddim.accel import prepare_for_training
from ddim.config import as_bool, check_int_at_least, check_known_keys, check_positive_int, plain
from ddim.diffusion.schedules import BETA_SCHEDULES, SCHEDULE_KEYS, alphas_cumprod_from_config
from ddim.models.build import build_unet, check_architecture
from ddim.models.ema import DEFAULT_EMA_DECAY, ema_decay_at, ema_initial_share_note, ema_warmup_of, lerp_ema_
from ddim.training.objective import antithetic_timesteps, eps_loss, rank_seed
from ddim.training.step_graph import GradientGraph, check_strategy_pairing, mode_has_cuda_graphs

FAST_DEFAULTS = {"compile": False, "mode": None, "step_graph": False}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIM_NUMBERS = ("lr", "beta1", "eps", "weight_decay", "ema_decay", "grad_clip", "warmup_steps")
OPTIM_KEYS = (*OPTIM_NUMBERS, "amsgrad", "ema_warmup")  # every optim setting read (conf/optim/default.yaml)
# every diffusion setting read: the noise schedule's (a training setting added there joins them)
DIFFUSION_KEYS = SCHEDULE_KEYS
# (setting, test, what is allowed) for Adam and clipping; null keeps the default
OPTIM_RANGES = (("lr", lambda v: v > 0, "a number > 0"), ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
                ("eps", lambda v: v >= 0, "a number >= 0"), ("weight_decay", lambda v: v >= 0, "a number >= 0"),
                ("grad_clip", lambda v: v >= 0, "a number >= 0 (0 or null: no clipping)"))


def fast_settings(fast: dict) -> dict:
    """``fast`` checked and filled in with ``FAST_DEFAULTS``; every bad value is named with what is allowed."""
    check_known_keys(fast, tuple(FAST_DEFAULTS), "fast")
    out = {**FAST_DEFAULTS, **fast}
    out["compile"] = as_bool(out["compile"], "fast.compile")
    out["step_graph"] = as_bool(out["step_graph"], "fast.step_graph")
    if out["mode"] is not None and out["mode"] not in COMPILE_MODES:
        raise ValueError(f"fast.mode must be null or one of {', '.join(COMPILE_MODES)}, got {out['mode']!r}")
    if out["mode"] is not None and not out["compile"]:
        raise ValueError(f"fast.mode={out['mode']!r} is a torch.compile mode: it needs fast.compile=true")
    if out["step_graph"] and mode_has_cuda_graphs(out["mode"]):
        raise ValueError(f"fast.step_graph=true captures the whole step in one CUDA graph, which cannot hold the CUDA "
                         f"graphs of fast.mode={out['mode']!r}: use fast.mode=null (or max-autotune-no-cudagraphs)")
    return out


def check_optim(optim: dict) -> float:
    """Refuse bad optimiser settings by name, before anything is built (torch's own messages name no setting, and
    a negative warm-up or clip would train silently); returns the checked EMA decay."""
    check_known_keys(optim, OPTIM_KEYS, "optim")
    for key in OPTIM_NUMBERS:
        value = optim.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"optim.{key} must be a number, got {value!r}")
    for key, ok, allowed in OPTIM_RANGES:
        value = optim.get(key)
        if value is not None and not ok(value):
            raise ValueError(f"optim.{key} must be {allowed}, got {value!r}")
    warmup = optim.get("warmup_steps")
    if warmup is not None:
        check_int_at_least(warmup, "optim.warmup_steps", 0)
    as_bool(optim.get("amsgrad", False), "optim.amsgrad")
    ema_warmup_of(optim)  # true/false only
    decay = float(optim.get("ema_decay", DEFAULT_EMA_DECAY))
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"optim.ema_decay must be in [0, 1), got {decay}")
    return decay


def check_diffusion(diffusion: dict) -> None:
    """The noise schedule's settings, refused by name before the U-Net is built (the schedule's own error names no
    setting and came after it)."""
    check_known_keys(diffusion, DIFFUSION_KEYS, "diffusion")
    kind = diffusion.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"diffusion.beta_schedule={kind!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    for key in ("beta_start", "beta_end"):
        value = diffusion.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise ValueError(f"diffusion.{key} must be a number in (0, 1), got {value!r}")
    check_positive_int(diffusion.get("num_diffusion_timesteps", 1000), "diffusion.num_diffusion_timesteps")


def match_layout(copy_of: nn.Module, model: nn.Module) -> None:
    """Give ``copy_of``'s parameters the memory layout (strides) of ``model``'s, values kept: the EMA update's
    fused lerp needs pairs of equal strides, and ``prepare_for_training`` makes most weights channels_last."""
    with torch.no_grad():
        for mine, theirs in zip(copy_of.parameters(), model.parameters(), strict=True):
            if mine.stride() != theirs.stride():
                mine.data = torch.empty_like(theirs).copy_(mine)


class DiffusionModule(L.LightningModule):
    """Trains ``model`` (UNet kwargs) under ``diffusion`` (beta schedule) with ``optim`` (Adam + clip + EMA);
    ``data`` (what train.py's ``data_record`` keeps of the data set) is kept for sampling, ``fast`` holds the speed
    options."""

    def __init__(self, model: dict, diffusion: dict, optim: dict | None = None, data: dict | None = None,
                 fast: dict | None = None):
        super().__init__()
        model, diffusion, optim, data = plain(model), plain(diffusion), plain(optim or {}), plain(data or {})
        fast = fast_settings(plain(fast or {}))
        self.ema_decay = check_optim(optim)
        check_diffusion(diffusion)
        self.ema_warmup = ema_warmup_of(optim)  # train.py's conf/optim sets it (true)
        self.save_hyperparameters({"model": model, "diffusion": diffusion, "optim": optim, "data": data, "fast": fast})
        self.model = build_unet(model)
        # copied before any fast-path change: the EMA stays the plain U-Net, which samples the preview grids eagerly
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if fast["compile"]:
            prepare_for_training(self.model)  # in place: same parameters and state-dict keys
            match_layout(self.ema_model, self.model)
        self.register_buffer("alphas_cumprod", alphas_cumprod_from_config(diffusion), persistent=False)
        self.num_timesteps = int(self.alphas_cumprod.numel())
        # fast.step_graph: forward, backward, all-reduce and clipping are one CUDA graph, replayed inside
        # optimizer.step's closure (GradientGraph); Lightning then only steps Adam, the LR and the EMA
        self.automatic_optimization = not fast["step_graph"]

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)

    def _train_eps(self) -> nn.Module:
        """The network the training step calls: ``self.model`` or, with fast.compile, a compiled view of it
        (kept out of the module tree, so checkpoints and the EMA see only ``model.*``)."""
        fast = self.hparams.fast
        if not fast["compile"]:
            return self.model
        if self.__dict__.get("_compiled_model") is None:
            self.__dict__["_compiled_model"] = torch.compile(self.model, mode=fast["mode"], dynamic=False)
        return self.__dict__["_compiled_model"]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        fast = self.hparams.fast
        if fast["compile"]:
            x0 = x0.contiguous(memory_format=torch.channels_last)  # x_t and ε inherit the layout
        if fast["step_graph"]:
            return self._graphed_training_step(x0)
        if fast["compile"] and mode_has_cuda_graphs(fast["mode"]):
            torch.compiler.cudagraph_mark_step_begin()
        t = antithetic_timesteps(x0.shape[0], self.num_timesteps, device=x0.device)
        loss = eps_loss(self._train_eps(), x0, t, self.alphas_cumprod.float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x0.shape[0])
        return loss

    def _gradient_graph(self) -> GradientGraph:
        graph = self.__dict__.get("_gradient_graph_obj")
        if graph is None:
            eps, ac, T = self._train_eps(), self.alphas_cumprod.float(), self.num_timesteps

            def loss_fn(x0: torch.Tensor) -> torch.Tensor:  # the automatic path's loss, drawn inside the graph
                return eps_loss(eps, x0, antithetic_timesteps(x0.shape[0], T, device=x0.device), ac)

            clip = self.hparams.optim.get("grad_clip", 1.0)
            graph = GradientGraph(loss_fn, self._step_tensors()["params"], grad_clip=float(clip) if clip else None)
            self.__dict__["_gradient_graph_obj"] = graph
        return graph

    def release_step_graph(self) -> None:
        """Free fast.step_graph's CUDA graph (``GradientGraph.release``); the next step captures it again."""
        graph = self.__dict__.get("_gradient_graph_obj")
        if graph is not None:
            graph.release()

    def _graphed_training_step(self, x0: torch.Tensor) -> torch.Tensor:
        """The automatic path's step (loss, clip, Adam, LR warm-up, EMA) with the loss and gradients from one
        CUDA-graph replay, run as the optimizer's closure so Lightning counts the step as usual."""
        out: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            out["loss"], out["norm"] = self._gradient_graph()(x0)
            return out["loss"]

        n = self.global_step  # manual optimisation counts the step inside optimizer.step
        self.optimizers().step(closure=closure)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.update_ema(n)
        self.log("train/loss", out["loss"], prog_bar=True, on_step=True, batch_size=x0.shape[0])
        self.log("train/grad_norm", out["norm"], on_step=True)
        return out["loss"]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the global grad norm to optim.grad_clip (official 1.0) and log the pre-clip norm."""
        clip = self.hparams.optim.get("grad_clip", 1.0)
        norm = torch.nn.utils.clip_grad_norm_(self._step_tensors()["params"], float(clip) if clip else math.inf)
        self.log("train/grad_norm", norm, on_step=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA right after the step (not in on_train_batch_end, which runs after ModelCheckpoint saved)
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self, n: int | None = None) -> None:
        """θ_ema <- d θ_ema + (1-d) θ with d = ``ddim.models.ema.ema_decay_at`` (the warm-up when optim.ema_warmup);
        buffers copied.  The EMA stays a plain module, so checkpoint keys ("ema_model.*") are stable.

        n: optimizer steps taken before this one (default: global_step, which Lightning's automatic loop
        advances only after the optimizer_step hook returns)."""
        tensors = self._step_tensors()
        lerp_ema_(tensors["ema"], tensors["params"],
                  ema_decay_at(self.ema_decay, self.global_step if n is None else n, self.ema_warmup))
        for b_ema, b in zip(tensors["ema_buffers"], tensors["buffers"]):
            b_ema.copy_(b)

    def on_train_start(self) -> None:
        # listed once per fit, after the move to the device and any checkpoint restore (both keep the tensors)
        self.__dict__["_step_tensor_lists"] = self._collect_step_tensors()
        if self.trainer.world_size > 1:  # after any checkpoint restore, which brings rank 0's generator state
            torch.manual_seed(rank_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.trainer.global_rank,
                                        self.global_step))
        self._check_strategy()

    def _check_strategy(self) -> None:
        """Refuse the DDP pairings that train on wrong gradients, before the first step."""
        fast, wrapper = self.hparams.fast, self.trainer.strategy.model
        ddp = isinstance(wrapper, DistributedDataParallel)
        check_strategy_pairing("ddp" if ddp else "other", fast, ddp and wrapper.gradient_as_bucket_view)
        if fast["step_graph"]:
            # Lightning warns that manual optimisation checkpoints hold the state after the optimizer step; so do
            # the automatic path's (ModelCheckpoint runs after the step in both), so the warning says nothing here
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

    def _collect_step_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"params": list(self.model.parameters()), "ema": list(self.ema_model.parameters()),
                "buffers": list(self.model.buffers()), "ema_buffers": list(self.ema_model.buffers())}

    def _step_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors clipping and the EMA touch every step.  Walking the module tree for them every step is
        host time that the GPU waits for once the step is CUDA graphs."""
        lists = self.__dict__.get("_step_tensor_lists")
        return lists if lists is not None else self._collect_step_tensors()

    def configure_optimizers(self):
        o = self.hparams.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=float(o.get("lr", 2e-4)), betas=(float(o.get("beta1", 0.9)), 0.999),
                               eps=float(o.get("eps", 1e-8)), weight_decay=float(o.get("weight_decay", 0.0)),
                               amsgrad=as_bool(o.get("amsgrad", False), "optim.amsgrad"),
                               fused=torch.cuda.is_available() or None)
        warmup = int(o.get("warmup_steps", 0) or 0)
        if warmup <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_end(self) -> None:
        if getattr(self._trainer, "fast_dev_run", False):
            return
        warning = ema_initial_share_note(self.ema_decay, self.global_step, self.ema_warmup)
        if warning:
            # advise only what is not set already
            remedy = ("" if self.ema_warmup else "optim.ema_warmup=true or ") + "a smaller optim.ema_decay"
            rank_zero_warn(f"{warning}; sample from them only after longer training, or train with {remedy}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Also save the RNG states (Lightning does not), so a resumed run draws the same t, ε and dropout.
        Under DDP these are rank 0's; every rank then starts its own stream from ``rank_seed`` (on_train_start)."""
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another architecture with a readable message (not a wall of missing keys)."""
        check_architecture(checkpoint.get("hyper_parameters", {}).get("model"), self.hparams.model)
        rng = checkpoint.get("rng_states")
        if rng is not None:
            torch.set_rng_state(rng["torch"].cpu())
            if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
