"""The ResnetBlocks' 3x3 convolutions in FP8 (e4m3) for inference (opt-in, Hopper and later).

Why: at batch 512 the compiled bf16 CIFAR-10 U-Net spends half its time (7.5 of 15.1 ms per forward on an
H200) in cuDNN convolutions that already run at the matrix units' bf16 peak (docs/results/bench).  Hopper's
units multiply e4m3 at twice that rate, and an e4m3 activation is half the bytes to write and read.

What changes in a ResnetBlock (``Fp8ResnetBlock``):

* ``ddim.accel.groupnorm``'s GroupNorm+SiLU kernel writes its output in e4m3 (saturated at +-448).  SiLU's outputs
  of a normalised activation lie in [-0.28, a few tens], inside e4m3's range, so they need no scale;
* the weights are quantised once per output channel (``quantize_weight``: the largest |w| of a channel maps
  to 448) and ``ddim.accel.conv``'s tile convolution multiplies e4m3 by e4m3 into float32, then applies the
  channel scales, the bias (with the time embedding: per sample) and the shortcut in its epilogue, and
  writes bf16.

e4m3 keeps 3 mantissa bits (relative rounding error up to 2^-4, against bf16's 2^-8), so samples move more
than with bf16.  Measured on an H200 (docs/results/bench, fifteenth round; S = 50, batch 512, a trained CIFAR-10
model): 695.9 images/s with CUDA graphs against 660.6 for the bf16 path (+5 %; +2 % without graphs, where the custom
ops' host work competes).  In every block it is not FID-neutral: on 47,000- and 48,000-step CIFAR-10 models FID
rises by +1.96 and +1.85 at S = 10 (within noise at S = 50), the samples softer and flatter, all of it from the blocks
on 32x32 maps.  With those in bf16 (``max_width=16``, what ``evaluate.py sampler.fp8=true`` runs) FID is unchanged
(16.30 vs 16.17 fp32 at S = 10, 10.89 vs 10.98 at S = 50), pixels move as much as with bf16, and the speed is +4.7 %
over bf16 (666.6 vs 636.9 images/s; every block: 673.9; seventeenth round).  Opt-in.
Everything outside the ResnetBlocks' 3x3 convolutions (attention, shortcuts, up/downsampling, the first and
last convolutions) keeps its precision.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ddim.accel.conv import available, conv3x3_fused
from ddim.accel.groupnorm import KernelResnetBlock, group_norm_silu
from ddim.models.unet import ResnetBlock, require_inference

__all__ = ["E4M3", "supported", "fixed_config", "quantize_weight", "dequantize_weight", "Fp8ResnetBlock",
           "swap_fp8_resnet_blocks"]

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

    A configuration fixes the order of the float32 sums; ``ddim.accel.conv`` otherwise times its candidates in each
    process, and two processes (two GPUs of one evaluation) could then choose differently and give different
    images from the same x_T.  These are the choices the timing made on an H200 for every layer of the CIFAR-10
    U-Net at batch 512 (docs/results/bench, fifteenth round)."""
    return (64, 128, 128, 4, 4) if pixels <= 16 else (128, 128, 128, 4, 3)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, C, 3, 3) -> (w_kc, scale): ``w_kc`` (9 * C, O) in e4m3, row ``(kh * 3 + kw) * C + c`` as
    ``ddim.accel.conv.weight_for_kernel``, stored K-contiguous ((O, 9 * C) in memory: the layout Hopper's e4m3
    matrix instructions read); ``scale`` (O,) float32 with ``weight ~= w_kc.T * scale`` per output channel."""
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


class Fp8ResnetBlock(ResnetBlock):
    """``ResnetBlock`` (inference) whose two 3x3 convolutions read e4m3 activations and weights: each
    GroupNorm+SiLU written in e4m3 by the GroupNorm kernel, conv1's bias and the time embedding in its epilogue,
    the shortcut in conv2's.  Outputs in x's dtype.  Same parameters and state-dict keys (the quantised weights
    are non-persistent buffers)."""

    min_width: int = 0  # narrower maps run cuDNN in bf16 and the GroupNorm kernel (KernelResnetBlock)
    max_width: int = 0  # so do wider maps (0: none); the 32x32 blocks cost FP8's quality (16th, 17th rounds)
    tuned: bool = False  # time ddim.accel.conv's configurations per shape (first call) instead of fixed_config's

    def _config(self, x: torch.Tensor) -> tuple[int, ...] | None:
        return None if self.tuned else fixed_config(x.shape[-2] * x.shape[-1])

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        require_inference(self)
        if x.shape[-1] < self.min_width or 0 < self.max_width < x.shape[-1]:
            return KernelResnetBlock.forward(self, x, temb_act)
        h, _ = conv3x3_fused(group_norm_silu(x, self.norm1, out_dtype=E4M3), self.conv1_q, self.conv1_shift(temb_act),
                             w_scale=self.conv1_s, out_dtype=x.dtype, config=self._config(x))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        out, _ = conv3x3_fused(group_norm_silu(h, self.norm2, out_dtype=E4M3), self.conv2_q,
                               self.conv2.bias.float().contiguous(), residual=skip, w_scale=self.conv2_s,
                               out_dtype=x.dtype, config=self._config(x))
        return out


def swap_fp8_resnet_blocks(model: nn.Module, on: bool = True, *, min_width: int = 0, max_width: int = 0,
                           tuned: bool = False) -> nn.Module:
    """Make every ``ResnetBlock`` of ``model`` (in place) an ``Fp8ResnetBlock`` (``on=False``: back).

    min_width: blocks on maps narrower than this keep bf16 (cuDNN; slower in the network on an H200).  max_width:
    so do blocks on maps wider than this (0: no limit).  tuned: time the convolution's configurations per shape
    instead of ``fixed_config`` (processes may then differ).

    The quantised weights are made now from the current ones: swap after loading and casting, on an inference
    copy (``prepare_for_inference(fp8=True)`` makes one).
    """
    if on and not available():
        raise RuntimeError("FP8 ResnetBlocks need Triton (shipped with the CUDA builds of torch)")
    for name, width in (("min_width", min_width), ("max_width", max_width)):
        if isinstance(width, bool) or not isinstance(width, int) or width < 0:
            raise ValueError(f"{name} must be a map width in pixels, an int >= 0 (0: no limit), got {width!r}")
    if 0 < max_width < min_width:
        raise ValueError(f"max_width={max_width} is below min_width={min_width}: no block would run in e4m3")
    for m in model.modules():
        if isinstance(m, ResnetBlock):
            if on:
                m.__class__ = Fp8ResnetBlock
                m.min_width, m.max_width, m.tuned = min_width, max_width, tuned
                for name in ("conv1", "conv2"):
                    w_q, scale = quantize_weight(getattr(m, name).weight)
                    m.register_buffer(f"{name}_q", w_q, persistent=False)
                    m.register_buffer(f"{name}_s", scale, persistent=False)
            else:
                m.__class__ = ResnetBlock
                for name in ("conv1_q", "conv1_s", "conv2_q", "conv2_s"):
                    m._buffers.pop(name, None)
    return model
