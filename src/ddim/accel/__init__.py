"""The GPU fast path: inference copies of an ε-model (bf16 / fp8, compiled) and the training network's layers.

It replaces modules of a ``ddim.models.UNet`` from outside; nothing below this package imports it.

    fast = prepare_for_inference(model.cuda(), "bf16")   # or "fp8" on an FP8 GPU (Ada, Hopper and later)
    x_0 = sample(fast, x_T, alphas_cumprod, seq, eta=0.0)

The ε-network is the whole cost of DDIM sampling (S forward passes; the update is a few element-wise ops), so the
inference path is about the network alone: bf16 autocast (matrix units at full rate, norms and softmax kept in
float32), channels_last (the layout the bf16 convolutions want), kernels for what Inductor does poorly
(``ddim.accel.layers``, ``ddim.accel.groupnorm``, ``ddim.accel.fp8``) and ``torch.compile`` for the rest.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch._inductor as inductor
from torch import nn

from ddim.accel import groupnorm
from ddim.accel.fp8 import supported as fp8_supported
from ddim.accel.fp8 import use_fp8_resnet_blocks
from ddim.accel.layers import (Bf16EpsModel, ChannelStatGroupNorm, MatmulConv2d, PhaseUpsample, cast_matmul_weights,
                               is_thin_conv3x3, replace_modules, to_channels_last)
from ddim.models.unet import Upsample


@dataclass(frozen=True)
class InferencePreset:
    """What an ``INFERENCE_PRESETS`` name runs on top of the bf16 path.

    fp8_max_width: 0, or the ResnetBlocks on maps at most this many pixels wide run their 3x3 convolutions in e4m3
    (wider ones lose visible detail in e4m3).  cuda_graphs: compile with CUDA graphs (the fp8 custom ops' host work
    would otherwise hold the GPU back)."""

    fp8_max_width: int = 0
    cuda_graphs: bool = False


PRESETS: dict[str, InferencePreset] = {"bf16": InferencePreset(),
                                       "fp8": InferencePreset(fp8_max_width=16, cuda_graphs=True)}
INFERENCE_PRESETS = tuple(PRESETS)


def compile_settings(cuda_graphs: bool, deterministic: bool) -> dict:
    """``torch.compile`` keywords (beside ``dynamic=False``) for the inference copy.

    deterministic: Inductor's deterministic mode, which picks kernel configurations without timing them.  Timed
    choices differ between processes, and so do the bf16 sums they make: two GPUs of one evaluation (or two runs)
    would give different samples from the same x_T.  torch.compile takes a mode or options, not both, so the CUDA
    graphs' mode is then spelled out as its options."""
    mode = "reduce-overhead" if cuda_graphs else None
    if not deterministic:
        return {"mode": mode}
    options = dict(inductor.list_mode_options(mode)) if mode else {}
    if hasattr(inductor.config, "deterministic"):
        options["deterministic"] = True
    else:  # older torch: no such mode; the samples may then differ between processes
        warnings.warn(f"torch {torch.__version__} has no torch._inductor.config.deterministic: compiled samples "
                      "may differ between processes (GPUs); newer torch has it", stacklevel=3)
    return {"options": options}


def _is_plain_group_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm) and not isinstance(m, ChannelStatGroupNorm)


def _is_upsample_conv(m: nn.Module) -> bool:
    return isinstance(m, Upsample) and m.conv is not None


def prepare_for_inference(model: nn.Module, preset: str = "bf16", *, deterministic: bool = True,
                          compile: bool | None = None) -> nn.Module:
    """A fast eval-mode copy of ``model`` with the same ``(x, t) -> ε`` signature (the caller's model is untouched).

    preset: "bf16": bf16 autocast on channels_last, the convolution and linear weights cast to bf16 once, the
    first and last (thin) convolutions as matrix products, the upsampling convolutions on the low-resolution input,
    the ResnetBlocks' and attention blocks' GroupNorm(+SiLU) as one Triton kernel per sample (where Triton is
    installed; else, like the other norms, with per-channel statistics).  "fp8": that, with the ResnetBlocks' 3x3
    convolutions on maps up to 16 pixels wide in e4m3 (``fp8_supported`` devices), compiled with CUDA graphs.
    deterministic: kernels chosen without timing, so every process and GPU gives the same images.  compile:
    ``torch.compile`` the copy; default: where the model's weights are on CUDA.  Uncompiled, the copy runs the
    same modules eagerly (on a CPU the Triton kernels then need Triton's interpreter, ``TRITON_INTERPRET=1``).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(INFERENCE_PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    device = next(model.parameters()).device
    if spec.fp8_max_width and not fp8_supported(device):
        raise ValueError(f"preset {preset!r} needs a CUDA GPU with FP8 matrix units (compute capability 8.9+: Ada, "
                         f"Hopper or later) and Triton; the model is on {device}: use preset 'bf16'")
    if compile is None:
        compile = device.type == "cuda"
    fast = to_channels_last(copy.deepcopy(model).eval().requires_grad_(False))
    cast_matmul_weights(fast, torch.bfloat16)  # before the fp8 blocks, which quantise the bf16 weights
    replace_modules(fast, _is_plain_group_norm, ChannelStatGroupNorm.from_norm)
    if spec.fp8_max_width:
        use_fp8_resnet_blocks(fast, max_width=spec.fp8_max_width, tuned=not deterministic)
    if groupnorm.available():  # the (remaining) ResnetBlocks and the attention norms
        groupnorm.use_group_norm_kernel(fast)
    replace_modules(fast, _is_upsample_conv, PhaseUpsample)
    replace_modules(fast, is_thin_conv3x3, MatmulConv2d)
    wrapped: nn.Module = Bf16EpsModel(fast)
    if compile:
        wrapped = torch.compile(wrapped, dynamic=False, **compile_settings(spec.cuda_graphs, deterministic))
    return wrapped


def prepare_for_training(model: nn.Module) -> nn.Module:
    """``model`` in place for compiled training: channels_last, GroupNorms with per-channel statistics
    (``ChannelStatGroupNorm``) and the upsampling convolutions on the low-resolution input (``PhaseUpsample``).
    The same Parameter objects and state-dict keys, the same outputs and gradients to float rounding."""
    to_channels_last(model)
    replace_modules(model, _is_plain_group_norm, ChannelStatGroupNorm.from_norm)
    replace_modules(model, _is_upsample_conv, PhaseUpsample)
    return model


__all__ = ["INFERENCE_PRESETS", "InferencePreset", "fp8_supported", "prepare_for_inference", "prepare_for_training"]
