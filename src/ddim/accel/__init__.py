"""The GPU fast path: inference copies of an ε-model (bf16 / fp8, compiled) and the training network's swaps.

It wraps or replaces modules of a ``ddim.models.UNet`` from outside; nothing below this package imports it.

    fast = prepare_for_inference(model.cuda(), "bf16")   # or "fp8" on an FP8 GPU (Ada, Hopper and later)
    x_0 = sample(fast, x_T, alphas_cumprod, seq, eta=0.0)
"""
from __future__ import annotations

import torch
from torch import nn

from ddim.accel import inference as _inference
from ddim.accel.fp8 import supported as fp8_supported

INFERENCE_PRESETS = ("bf16", "fp8")


def prepare_for_inference(model: nn.Module, preset: str = "bf16", *, deterministic: bool = True,
                          compile: bool | None = None) -> nn.Module:
    """A fast eval-mode copy of ``model`` with the same ``(x, t) -> ε`` signature (the caller's model is untouched).

    preset: "bf16" (bf16 autocast, channels_last, the GroupNorm kernel, compiled) or "fp8" (that, with the
    ResnetBlocks' 3x3 convolutions on maps up to 16 pixels wide in e4m3, and CUDA graphs).  deterministic: kernels
    chosen without timing, so every process and GPU gives the same images.  compile: default on where the
    model's weights are on CUDA."""
    if preset not in INFERENCE_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(INFERENCE_PRESETS)}, got {preset!r}")
    if compile is None:
        compile = next(model.parameters()).is_cuda
    fp8 = preset == "fp8"
    return _inference.prepare_for_inference(
        model, dtype="bf16", compile=compile, deterministic=deterministic,
        group_norm=_inference.default_inference_group_norm(compile), fp8=fp8, fp8_max_width=16 if fp8 else 0,
        compile_mode="reduce-overhead" if fp8 and compile else None)


def prepare_for_training(model: nn.Module) -> nn.Module:
    """``model`` in place for compiled training: channels_last, per-channel GroupNorm statistics and the upsampling
    convolutions on the low-resolution input; the same parameters and state-dict keys."""
    model = _inference.to_channels_last(model)
    _inference.swap_group_norm(model, "channel-stats")
    _inference.swap_upsample(model, "phases")
    return model


__all__ = ["INFERENCE_PRESETS", "fp8_supported", "prepare_for_inference", "prepare_for_training"]
