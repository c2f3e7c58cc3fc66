"""Lightning training of the DDPM ε-model (the network DDIM samples from).

DDIM needs no training of its own: the paper samples models trained with the DDPM objective
L_γ with γ = 1 (eq. (5)), i.e. ||ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)||².  This module reproduces the
official recipe: squared error summed over pixels, mean over the batch; antithetic timesteps
(t and T-1-t in one batch); Adam; gradient-norm clipping; an EMA of the weights that is what
gets sampled and is saved in every checkpoint (format: ``ddim.checkpoints``).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ddim.config import as_bool, plain
from ddim.diffusion.schedules import alphas_cumprod_from_config
from ddim.models.build import build_unet, check_architecture
from ddim.models.ema import DEFAULT_EMA_DECAY, ema_decay_at, ema_initial_share_note, ema_warmup_of
from ddim.accel.inference import (GradientGraph, default_group_norm, default_upsample, swap_group_norm, swap_upsample,
                       to_channels_last)


def antithetic_timesteps(n: int, T: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U{0..T-1} for half the batch and T-1-t for the other half (official variance reduction)."""
    t = torch.randint(0, T, (n // 2 + 1,), device=device, generator=generator)
    return torch.cat([t, T - t - 1])[:n]


def eps_loss(eps_model: nn.Module, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Official DDPM/DDIM loss: ||ε - ε_θ(x_t, t)||² summed over pixels, averaged over the batch."""
    e = torch.randn_like(x0) if noise is None else noise
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype).index_select(0, t).view(-1, *([1] * (x0.dim() - 1)))
    x_t = x0 * a.sqrt() + e * (1.0 - a).sqrt()
    return (e - eps_model(x_t, t)).square().flatten(1).sum(1).mean()


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one DDP rank's t, ε and dropout draws from optimizer step ``step`` on.

    ``seed_everything`` gives every rank the same generator, so without this all ranks drew the same t and ε
    each step (for different images) and the same dropout masks.  Mixed by numpy's SeedSequence."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, np.uint64)[0] >> 1)


FAST_DEFAULTS = {"compile": False, "backend": "inductor", "mode": None, "channels_last": None, "group_norm": None,
                 "upsample": None, "step_graph": False}


def _mode_has_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` wraps the compiled regions in CUDA graphs (cudagraph trees)."""
    return bool(mode) and ("reduce-overhead" in mode or mode == "max-autotune")


def _fast_settings(fast: dict) -> dict:
    """Fill in the speed settings: channels_last, per-channel GroupNorm statistics and phase upsampling follow
    ``compile`` (they pay off compiled, on a GPU: docs/results/bench); none changes parameters or checkpoints."""
    unknown = sorted(set(fast) - set(FAST_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown fast setting(s) {unknown}; allowed: {sorted(FAST_DEFAULTS)}")
    out = {**FAST_DEFAULTS, **fast}
    out["compile"] = as_bool(out["compile"], "fast.compile")
    out["channels_last"] = out["compile"] if out["channels_last"] is None else as_bool(out["channels_last"],
                                                                                        "fast.channels_last")
    out["group_norm"] = default_group_norm(out["group_norm"], out["compile"])  # checked by swap_group_norm
    out["upsample"] = default_upsample(out["upsample"], out["compile"])  # checked by swap_upsample
    out["step_graph"] = as_bool(out["step_graph"], "fast.step_graph")
    if out["step_graph"] and _mode_has_cuda_graphs(out["mode"]):
        raise ValueError(f"fast.step_graph=true captures the whole step in one CUDA graph, which cannot hold the CUDA "
                         f"graphs of fast.mode={out['mode']!r}: use fast.mode=null (or max-autotune-no-cudagraphs)")
    return out


class DiffusionModule(L.LightningModule):
    """Trains ``model`` (UNet kwargs) under ``diffusion`` (beta schedule) with ``optim`` (Adam + clip + EMA)."""

    def __init__(self, model: dict, diffusion: dict, optim: dict | None = None, data: dict | None = None,
                 fast: dict | None = None):
        super().__init__()
        model, diffusion, optim, data = plain(model), plain(diffusion), plain(optim or {}), plain(data or {})
        fast = _fast_settings(plain(fast or {}))
        self.save_hyperparameters({"model": model, "diffusion": diffusion, "optim": optim, "data": data, "fast": fast})
        self.model = build_unet(model)
        if fast["channels_last"]:
            self.model = to_channels_last(self.model)
        swap_group_norm(self.model, fast["group_norm"])  # same parameters and state-dict keys, only the class changes
        swap_upsample(self.model, fast["upsample"])  # "phases": ddim.accel.inference.PhaseUpsample, same result, fewer FLOPs
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        swap_group_norm(self.ema_model, "torch")  # the EMA only samples previews, eagerly: torch's kernel
        swap_upsample(self.ema_model, "nearest")
        self.register_buffer("alphas_cumprod", alphas_cumprod_from_config(diffusion), persistent=False)
        self.num_timesteps = int(self.alphas_cumprod.numel())
        for k in ("lr", "beta1", "eps", "weight_decay", "ema_decay", "grad_clip", "warmup_steps"):
            v = optim.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"optim.{k} must be a number, got {v!r}")
        self.ema_decay = float(optim.get("ema_decay", DEFAULT_EMA_DECAY))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        self.ema_warmup = ema_warmup_of(optim)  # train.py's conf/optim sets it (true)
        # fast.step_graph: forward, backward, all-reduce and clipping are one CUDA graph, replayed inside
        # optimizer.step's closure (ddim.accel.inference.GradientGraph); Lightning then only steps Adam, the LR and the EMA
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
            self.__dict__["_compiled_model"] = torch.compile(self.model, backend=fast["backend"], mode=fast["mode"],
                                                             dynamic=False)
        return self.__dict__["_compiled_model"]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        fast = self.hparams.fast
        if fast["channels_last"]:
            x0 = x0.contiguous(memory_format=torch.channels_last)  # x_t and ε inherit the layout
        if fast["step_graph"]:
            return self._graphed_training_step(x0)
        if fast["compile"] and _mode_has_cuda_graphs(fast["mode"]):  # max-autotune's CUDA graphs too
            torch.compiler.cudagraph_mark_step_begin()
        t = antithetic_timesteps(x0.shape[0], self.num_timesteps, device=x0.device)
        loss = eps_loss(self._train_eps(), x0, t, self.alphas_cumprod.float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=x0.shape[0])
        return loss

    def _gradient_graph(self) -> GradientGraph:
        g = self.__dict__.get("_gradient_graph_obj")
        if g is None:
            eps, ac, T = self._train_eps(), self.alphas_cumprod.float(), self.num_timesteps

            def loss_fn(x0: torch.Tensor) -> torch.Tensor:  # the automatic path's loss, drawn inside the graph
                return eps_loss(eps, x0, antithetic_timesteps(x0.shape[0], T, device=x0.device), ac)

            clip = self.hparams.optim.get("grad_clip", 1.0)
            g = GradientGraph(loss_fn, self._step_tensors()["params"], grad_clip=float(clip) if clip else None)
            self.__dict__["_gradient_graph_obj"] = g
        return g

    def release_step_graph(self) -> None:
        """Free fast.step_graph's CUDA graph (``GradientGraph.release``); the next step captures it again."""
        g = self.__dict__.get("_gradient_graph_obj")
        if g is not None:
            g.release()

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
        """θ_ema <- d θ_ema + (1-d) θ; with ema_warmup, d = min(decay, (1+n)/(10+n)) so short runs are usable.

        n: optimizer steps taken before this one (default: global_step, which Lightning's automatic loop
        advances only after the optimizer_step hook returns)."""
        d = ema_decay_at(self.ema_decay, self.global_step if n is None else n, self.ema_warmup)
        t = self._step_tensors()
        # torch's own EMA rule (one fused _foreach_lerp_), as ddim.models.EMA; built per step because the
        # warm-up changes d. Keeping ema_model a plain module keeps checkpoint keys ("ema_model.*") stable.
        get_ema_multi_avg_fn(d)(t["ema"], t["params"], None)
        for b_ema, b in zip(t["ema_buffers"], t["buffers"]):
            b_ema.copy_(b)

    def on_train_start(self) -> None:
        # listed once per fit, after the move to the device and any checkpoint restore (both keep the tensors)
        self.__dict__["_step_tensor_lists"] = self._collect_step_tensors()
        from torch.nn.parallel import DistributedDataParallel

        if self.trainer.world_size > 1:  # after any checkpoint restore, which brings rank 0's generator state
            torch.manual_seed(rank_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.trainer.global_rank,
                                        self.global_step))
        fast, wrapper = self.hparams.fast, self.trainer.strategy.model
        graphs = fast["compile"] and _mode_has_cuda_graphs(fast["mode"])
        if graphs and isinstance(wrapper, DistributedDataParallel) and wrapper.gradient_as_bucket_view:
            raise ValueError(f"DDP with gradient_as_bucket_view=true and fast.mode={fast['mode']!r} (CUDA graphs) trains "
                             "on wrong gradients (one H200, CIFAR-10: grad norm ~15,000 from the first step against "
                             "~1,200, loss behind; docs/results/bench): set trainer.strategy.gradient_as_bucket_view="
                             "false, or use trainer=ddp_step_graph fast.step_graph=true")
        if fast["step_graph"]:
            # Lightning warns that manual optimisation checkpoints hold the state after the optimizer step; so do
            # the automatic path's (ModelCheckpoint runs after the step in both), so the warning says nothing here
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

            if isinstance(wrapper, DistributedDataParallel):
                raise ValueError("fast.step_graph=true all-reduces the gradients inside its CUDA graph, and "
                                 "DistributedDataParallel would all-reduce them again: use trainer=ddp_step_graph "
                                 f"(ddim.training.module.StepGraphDDPStrategy), not {type(self.trainer.strategy).__name__}")

    def _collect_step_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"params": list(self.model.parameters()), "ema": list(self.ema_model.parameters()),
                "buffers": list(self.model.buffers()), "ema_buffers": list(self.ema_model.buffers())}

    def _step_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors clipping and the EMA touch every step.  Walking the 250-module tree for them three times
        a step is host time that the GPU waits for once the step is CUDA graphs (docs/results/bench)."""
        lists = self.__dict__.get("_step_tensor_lists")
        return lists if lists is not None else self._collect_step_tensors()

    def configure_optimizers(self):
        o = self.hparams.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=float(o.get("lr", 2e-4)), betas=(float(o.get("beta1", 0.9)), 0.999),
                               eps=float(o.get("eps", 1e-8)), weight_decay=float(o.get("weight_decay", 0.0)),
                               amsgrad=bool(o.get("amsgrad", False)), fused=torch.cuda.is_available() or None)
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
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{warning}; sample from them only after longer training, or train with "
                           f"optim.ema_warmup=true or a smaller optim.ema_decay")

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


class StepGraphDDPStrategy(DDPStrategy):
    """DDP's processes, process group and data sharding without the DistributedDataParallel wrapper, for
    ``fast.step_graph=true``: its CUDA-graphed step all-reduces the gradients itself, as one collective
    inside the graph (``ddim.accel.inference.GradientGraph``), instead of DDP's per-bucket hooks between graph pieces."""

    def configure_ddp(self) -> None:
        from lightning.pytorch.overrides.distributed import _sync_module_states

        if self.lightning_module.automatic_optimization:
            raise ValueError("StepGraphDDPStrategy (trainer=ddp_step_graph) does not all-reduce gradients itself: it "
                             "needs fast.step_graph=true, whose graphed step does; use trainer=ddp otherwise")
        _sync_module_states(self.model)  # every replica starts from rank 0's weights, as DDP's constructor does

    def teardown(self) -> None:
        # before Lightning's exit handler destroys the process group, which hangs while a graph holding its
        # all-reduce lives (GradientGraph.release); the trainer tears the strategy down after errors too
        release = getattr(self.lightning_module, "release_step_graph", None)
        if release is not None:
            release()
        super().teardown()


