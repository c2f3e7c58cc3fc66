"""Exponential moving average of the weights (the official DDIM/DDPM ``EMAHelper`` semantics).

Choice: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` — maintained in torch
itself, fused ``_foreach_lerp_`` update, works with DDP/FSDP-unwrapped modules and gives a plain
``nn.Module`` whose ``.module`` is the averaged copy.  ema-pytorch adds a warmup schedule and step
bookkeeping we do not want by default, and Lightning's ``WeightAveraging`` callback swaps weights in
and out of the trained module, which complicates sampling from both during training.

Semantics (as the official code): the shadow starts as a copy of the model when ``EMA`` is created,
then every ``update(model)`` does ``shadow = decay * shadow + (1 - decay) * param``; buffers are copied.
(``AveragedModel`` would copy the weights on its first update; we seed it at construction, so the
first ``update`` already averages, exactly like the official ``EMAHelper.register`` + ``update``.)

Usage::

    ema = EMA(model, decay=0.9999)      # an nn.Module; register it as a submodule to checkpoint it
    ...optimizer.step(); ema.update(model)
    x0 = sample(ema.module, ...)        # or ema(x, t)
    ema.state_dict() / ema.load_state_dict(sd)   # keys: "n_averaged", "module.<model keys>"
    ema.load_shadow(official_ema_state)          # official EMAHelper.shadow dicts too

``update`` has no host syncs (no ``.item()`` or tensor-to-bool checks), so a training step stays
sync-free on GPU; keep ``EMA`` on the same device as the model.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ddim.config import as_bool
from ddim.models.official import official_state_dict

__all__ = ["EMA", "DEFAULT_EMA_DECAY", "ema_decay_at", "ema_initial_share", "ema_initial_share_note",
           "ema_warmup_of", "lerp_ema_"]

DEFAULT_EMA_DECAY = 0.9999


def ema_decay_at(decay: float, n: int, warmup: bool) -> float:
    """The decay of the EMA update after ``n`` earlier updates: ``decay``, or with ``warmup``
    ``min(decay, (1 + n) / (10 + n))`` (diffusers' ``EMAModel`` rule).

    Why warm up: a shadow seeded with the initial weights keeps ``decay ** steps`` of them, and early on it
    averages over weights that still change fast, so a short run's EMA samples worse than its raw weights
    (docs/performance.md has the measured FIDs).  With the warm-up the initial weights are gone after ~100 updates; from ~90,000 updates on at 0.9999 it is the official rule
    again, so long runs end with the same average.
    """
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


@torch.no_grad()
def lerp_ema_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: float) -> None:
    """The EMA update, in place: ``ema <- decay * ema + (1 - decay) * tensor`` for every pair (torch's own
    ``get_ema_multi_avg_fn``: one fused ``_foreach_lerp_`` when the pairs share dtype, device and strides).

    Every EMA in the project updates through this function (``EMA.update``, the training module)."""
    get_ema_multi_avg_fn(decay)(ema_tensors, tensors, None)


def ema_warmup_of(settings: Mapping | None) -> bool:
    """``settings["ema_warmup"]`` (train.py's ``optim``, an exported ``ema.pt``); absent (settings and checkpoints
    from before the option): the official rule, no warm-up.  Only true/false: ``bool("no")`` would be True."""
    return as_bool((settings or {}).get("ema_warmup", False), "optim.ema_warmup")


def ema_initial_share(decay: float, updates: int, warmup: bool) -> float:
    """The weight the initial (random) weights still have in an EMA after ``updates`` updates of
    ``ema_decay_at``: the product of the decays, ``decay ** updates`` without warm-up.

    With warm-up the first updates use (1+n)/(10+n) < decay, whose product telescopes to 9! k! / (k+9)!
    over the first k of them (computed with lgamma); the rest use ``decay``."""
    if updates <= 0:
        return 1.0
    if decay <= 0.0:
        return 0.0
    if not warmup:
        return decay ** updates
    # (1+n)/(10+n) < decay  <=>  n < (10 decay - 1) / (1 - decay)
    k = updates if decay >= 1.0 else min(updates, max(0, math.ceil((10 * decay - 1) / (1 - decay))))
    log_share = math.lgamma(k + 1) + math.lgamma(10) - math.lgamma(k + 10) + (updates - k) * math.log(decay)
    return math.exp(log_share)


def ema_initial_share_note(decay: float, updates: int, warmup: bool) -> str | None:
    """What to tell the user when an EMA still holds more than 0.1 % of the initial (random) weights (enough to spoil
    its samples), else None; callers add what to do in their own terms."""
    left = ema_initial_share(decay, updates, warmup)
    if left <= 1e-3:
        return None
    return (f"the EMA weights still hold {left:.1%} of the initial (random) weights (decay {decay} over {updates} "
            f"steps, {'with' if warmup else 'no'} warm-up)")


class EMA(AveragedModel):
    """EMA copy of ``model`` (frozen, eval mode); ``update(model)`` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float = DEFAULT_EMA_DECAY):
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.decay = decay
        self.module.eval().requires_grad_(False)
        # Seed: n_averaged 0 -> 1 copies the current weights, so later updates are pure EMA steps.
        self.update_parameters(model)

    def train(self, mode: bool = True) -> EMA:  # the averaged copy always samples in eval mode
        super().train(False)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * param; buffers copied from ``model``.

        Calls the library's ``get_ema_multi_avg_fn`` update directly (one fused ``_foreach_lerp_``)
        instead of ``update_parameters``, whose ``n_averaged == 0`` checks would sync the host with the
        GPU every step; the shadow is always seeded here, so those checks are moot.
        """
        ema = [p.detach() for p in self.module.parameters()]
        cur = [p.detach() for p in model.parameters()]
        if len(ema) != len(cur):
            raise ValueError(f"EMA.update: model has {len(cur)} parameters, the EMA copy {len(ema)}")
        groups: dict[tuple, tuple[list, list]] = {}
        for e, c in zip(ema, cur):
            if c.device != e.device:
                c = c.to(e.device, non_blocking=True)
            g = groups.setdefault((e.device, e.dtype), ([], []))
            g[0].append(e)
            g[1].append(c)
        for e_list, c_list in groups.values():
            lerp_ema_(e_list, c_list, self.decay)
        self.n_averaged.add_(1)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    @torch.no_grad()
    def load_shadow(self, shadow: Mapping[str, torch.Tensor]) -> None:
        """Load averaged weights given as a plain model state dict or an official ``EMAHelper.shadow``
        (parameter names, maybe ``module.``-prefixed; parameters only)."""
        sd = official_state_dict(dict(shadow), source="EMA shadow")
        own = dict(self.module.named_parameters())
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"EMA shadow lacks parameters {missing[:8]}")
        result = self.module.load_state_dict(sd, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"EMA shadow has unexpected keys {result.unexpected_keys[:8]}")

    def copy_module(self) -> nn.Module:
        """A standalone deep copy of the averaged model (eval mode, no grad), e.g. for export."""
        return copy.deepcopy(self.module).eval().requires_grad_(False)
