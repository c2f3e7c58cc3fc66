"""The ResnetBlocks' 3x3 convolutions in FP8 (e4m3) for inference (the "fp8" preset; Ada, Hopper and later).

Why: in the compiled bf16 U-Net at a large batch about half the time goes to convolutions that already run at the
matrix units' bf16 peak.  FP8 units multiply e4m3 at twice that rate, and an e4m3 activation is half the bytes to
write and read.

What changes in a ResnetBlock (``Fp8ResnetBlock``):

* ``ddim.accel.groupnorm``'s GroupNorm+SiLU kernel writes its output in e4m3 (saturated at +-448).  SiLU's outputs
  of a normalised activation lie in [-0.28, a few tens], inside e4m3's range, so they need no scale;
* the weights are quantised once per output channel (``quantize_weight``: the largest |w| of a channel maps to
  448) and ``ddim.accel.conv``'s convolution multiplies e4m3 by e4m3 into float32, then applies the channel scales,
  the bias (with the time embedding: per sample) and the shortcut in its epilogue.

e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4, against bf16's 2^-8), so samples move more than
with bf16.  On the widest maps that shows as softer samples (a worse FID at few steps), so blocks on maps wider
than ``max_width`` keep bf16 (the preset's 16: CIFAR-10's 32x32 blocks).  Everything outside the ResnetBlocks'
3x3 convolutions (attention, shortcuts, up/downsampling, the first and last convolutions) keeps its precision.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ddim.accel.conv import available, conv3x3_e4m3
from ddim.accel.groupnorm import KernelResnetBlock, check_inference, group_norm_silu
from ddim.accel.layers import replace_modules
from ddim.models.unet import ResnetBlock

__all__ = ["E4M3", "supported", "fixed_config", "quantize_weight", "dequantize_weight", "Fp8ResnetBlock",
           "use_fp8_resnet_blocks"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448


def supported(device: torch.device | str) -> bool:
    """Whether the e4m3 kernels run on ``device``: a CUDA GPU with FP8 matrix units (compute capability 8.9+: Ada,
    Hopper and later), or the CPU under Triton's interpreter (tests)."""
    device = torch.device(device)
    if not available():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def fixed_config(pixels: int) -> tuple[int, int, int, int, int]:
    """The convolution's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for maps of ``pixels`` pixels, without timing.

    A configuration fixes the order of the float32 sums; timed per process instead, two processes (two GPUs of one
    evaluation) could choose differently and give different images from the same x_T.  These are the choices the
    timing makes on an H200 for the CIFAR-10 U-Net's layers at a large batch."""
    return (64, 128, 128, 4, 4) if pixels <= 16 else (128, 128, 128, 4, 3)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, C, 3, 3) -> (w_kc, scale): ``w_kc`` (9 * C, O) in e4m3, row ``(kh * 3 + kw) * C + c``, stored
    K-contiguous ((O, 9 * C) in memory: the layout Hopper's e4m3 matrix instructions read); ``scale`` (O,) float32
    with ``weight ~= w_kc.T * scale`` per output channel."""
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"quantize_weight takes (O, C, 3, 3) weights, got shape {tuple(weight.shape)}")
    o, c = weight.shape[:2]
    w = weight.detach().float().permute(0, 2, 3, 1).reshape(o, 9 * c)  # (O, 9C), K = (kh, kw, c)
    amax = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scale = amax / E4M3_MAX
    w_q = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return w_q.t(), scale.contiguous()


def dequantize_weight(w_kc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 (O, C, 3, 3) weight that ``quantize_weight``'s output stands for."""
    k, o = w_kc.shape
    return (w_kc.float() * scale[None, :]).t().reshape(o, 3, 3, k // 9).permute(0, 3, 1, 2)


class Fp8ResnetBlock(KernelResnetBlock):
    """A ``KernelResnetBlock`` whose two 3x3 convolutions read e4m3 activations and weights on maps at most
    ``max_width`` pixels wide (wider maps: the bf16 block): each GroupNorm+SiLU written in e4m3 by the GroupNorm
    kernel, conv1's bias and the time embedding in its epilogue, the shortcut in conv2's.  Outputs in x's dtype.

    The weights are quantised now, from the original block's current ones: build it after loading and casting.
    They are non-persistent buffers, so the state-dict keys are the original's.  tuned: time the convolution's
    configurations per shape (first call) instead of ``fixed_config`` (processes may then differ)."""

    def __init__(self, block: ResnetBlock, *, max_width: int, tuned: bool = False):
        super().__init__(block)
        if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width <= 0:
            raise ValueError(f"max_width must be a map width in pixels, a positive int, got {max_width!r}")
        self.max_width, self.tuned = max_width, tuned
        for name in ("conv1", "conv2"):
            w_q, scale = quantize_weight(getattr(block, name).weight)
            self.register_buffer(f"{name}_q", w_q, persistent=False)
            self.register_buffer(f"{name}_s", scale, persistent=False)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        check_inference(self)
        if x.shape[-1] > self.max_width:
            return super().forward(x, temb_act)
        config = None if self.tuned else fixed_config(x.shape[-2] * x.shape[-1])
        h = conv3x3_e4m3(group_norm_silu(x, self.norm1, out_dtype=E4M3), self.conv1_q, self.conv1_s,
                         self.conv1_shift(temb_act), out_dtype=x.dtype, config=config)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return conv3x3_e4m3(group_norm_silu(h, self.norm2, out_dtype=E4M3), self.conv2_q, self.conv2_s,
                            self.conv2.bias.float().contiguous(), residual=skip, out_dtype=x.dtype, config=config)


def use_fp8_resnet_blocks(model: nn.Module, *, max_width: int, tuned: bool = False) -> nn.Module:
    """Replace every ``ResnetBlock`` of ``model`` by an ``Fp8ResnetBlock`` (in place; an inference copy, after
    loading and casting the weights)."""
    if not available():
        raise RuntimeError("FP8 ResnetBlocks need Triton (shipped with the CUDA builds of torch)")
    replace_modules(model, lambda m: isinstance(m, ResnetBlock),
                    lambda m: Fp8ResnetBlock(m, max_width=max_width, tuned=tuned))
    return model
