"""Layers of the fast path in plain PyTorch, each computing what the U-Net module it replaces computes.

``ChannelStatGroupNorm`` and ``PhaseUpsample`` serve training and inference (same parameters, same state-dict
keys); ``MatmulConv2d``, ``cast_matmul_weights`` and ``Bf16EpsModel`` are for inference copies.
``replace_modules`` puts the replacements into a network from outside, so the U-Net itself needs no hooks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddim.models.unet import AttnBlock, Upsample

__all__ = ["replace_modules", "pool_mean_var", "group_stats_by_channel", "channel_stat_group_norm",
           "ChannelStatGroupNorm", "upsample_conv3x3_by_phases", "PhaseUpsample", "conv3x3_as_matmul",
           "is_thin_conv3x3", "MatmulConv2d", "to_channels_last", "cast_matmul_weights", "Bf16EpsModel"]


def replace_modules(model: nn.Module, predicate: Callable[[nn.Module], bool],
                    make: Callable[[nn.Module], nn.Module]) -> int:
    """Set ``make(m)`` on its parent in place of every submodule ``m`` of ``model`` with ``predicate(m)`` (in place;
    the replacement takes ``m``'s train/eval mode; the modules inside a replaced one are not visited, ``model``
    itself is never replaced).  Returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if predicate(child):
            replacement = make(child)
            replacement.training = child.training
            setattr(model, name, replacement)
            count += 1
        else:
            count += replace_modules(child, predicate, make)
    return count


def pool_mean_var(mean: torch.Tensor, var: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of the union of equal-sized parts, from each part's mean and (biased) variance along
    ``dim``, exactly: var = mean(var_i) + mean((mean_i - mean)^2), no E[x^2] - E[x]^2 cancellation."""
    pooled = mean.mean(dim, keepdim=True)
    return pooled.squeeze(dim), (var.mean(dim) + (mean - pooled).square().mean(dim))


def group_stats_by_channel(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (mean, variance), each (N, groups), of a 4-d ``x`` in float32, from per-channel statistics
    pooled exactly (``pool_mean_var``): a coalesced reduction on channels_last."""
    b, c = x.shape[:2]
    var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)
    return pool_mean_var(mean_c.view(b, groups, c // groups), var_c.view(b, groups, c // groups), dim=-1)


def channel_stat_group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` for a 4-d ``x`` with the statistics gathered per channel, then pooled per group; float32
    arithmetic, the result in x's dtype."""
    b, c = x.shape[:2]
    g = norm.num_groups
    xf = x.float()
    mean_g, var_g = group_stats_by_channel(xf, g)
    mean_g, var_g = mean_g[..., None], var_g[..., None]
    scale = torch.rsqrt(var_g + norm.eps).expand(b, g, c // g)
    if norm.affine:
        scale = scale * norm.weight.float().view(1, g, c // g)
    # (x - mean) first: x * scale - mean * scale would cancel when |mean| >> std
    y = (xf - mean_g.expand(b, g, c // g).reshape(b, c, 1, 1)) * scale.reshape(b, c, 1, 1)
    if norm.affine:
        y = y + norm.bias.float().view(1, c, 1, 1)
    return y.to(x.dtype)


class ChannelStatGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are gathered per channel, then pooled per group (``channel_stat_group_norm``).

    Same parameters, state-dict keys and result as ``nn.GroupNorm`` (to float rounding).  Why: on a channels_last
    tensor a group's channels are a few adjacent values of every pixel, so a compiled per-group reduction reads
    memory with a stride; per-channel mean and variance over the pixels is a coalesced column reduction.
    """

    @classmethod
    def from_norm(cls, norm: nn.GroupNorm) -> ChannelStatGroupNorm:
        """A module of this class that shares ``norm``'s Parameter objects."""
        new = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)
        new.affine = norm.affine
        new.weight, new.bias = norm.weight, norm.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        return channel_stat_group_norm(x, self)


def upsample_conv3x3_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` (padding 1) computed on the low-resolution ``x``.

    Output pixel (2p+i, 2q+j) sees source rows {p-1, p} (i = 0) or {p, p+1} (i = 1), and likewise for columns,
    with the 3x3 taps that fall on the same source pixel summed.  So the four output phases are 2x2 convolutions
    of ``x``; stacked along the output channels they are one 2x2 convolution (padding 1, phase (i, j) read at an
    offset of (i, j)), followed by an interleave.  16/36 of the multiply-adds (times (1 + 1/H)^2 for the border)
    and no 4x-sized upsampled tensor before the convolution.
    """
    b, _, h, w = x.shape
    o = weight.shape[0]
    k = weight.to(torch.promote_types(weight.dtype, torch.float32))  # tap sums in >= fp32 even for bf16 weights
    rows = [torch.stack([k[:, :, 0], k[:, :, 1] + k[:, :, 2]], dim=2),   # i = 0: source rows p-1, p
            torch.stack([k[:, :, 0] + k[:, :, 1], k[:, :, 2]], dim=2)]   # i = 1: source rows p, p+1
    kernel = torch.cat([torch.stack([r[..., 0], r[..., 1] + r[..., 2]], dim=-1) if j == 0 else
                        torch.stack([r[..., 0] + r[..., 1], r[..., 2]], dim=-1)
                        for r in rows for j in (0, 1)]).to(weight.dtype)  # (4O, I, 2, 2), phase-major
    y = F.conv2d(x, kernel, None if bias is None else bias.repeat(4), padding=1)
    if not torch.is_grad_enabled():
        # (B, O, H, i, W, j) as one strided view: phase (i, j) of channel o is channel (2i + j) O + o, its pixel
        # (p, q) read at (p + i, q + j), an address linear in (o, p, i, q, j).  Inductor can then write the
        # interleave straight into a following concatenation; stacks would be a buffer of their own.  Only without
        # autograd: this view's gradient is a scatter, the stacks' a plain gather
        sb, sc, sh, sw = y.stride()
        out = y.as_strided((b, o, h, 2, w, 2), (sb, sc, sh, 2 * o * sc + sh, sw, o * sc + sw))
    else:
        y = y.unflatten(1, (2, 2, o))                                                    # (B, i, j, O, H+1, W+1)
        out = torch.stack([torch.stack([y[:, i, j, :, i:i + h, j:j + w] for j in (0, 1)], dim=-1)
                           for i in (0, 1)], dim=3)                                      # (B, O, H, i, W, j)
    out = out.reshape(b, o, 2 * h, 2 * w)
    if x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class PhaseUpsample(nn.Module):
    """An ``Upsample`` with a convolution, run by ``upsample_conv3x3_by_phases``: it holds the original's ``conv``
    (same Parameters, same state-dict keys), same result to float rounding, fewer FLOPs and memory passes."""

    def __init__(self, upsample: Upsample):
        super().__init__()
        if upsample.conv is None:
            raise ValueError("PhaseUpsample takes an Upsample with a convolution (resamp_with_conv=True)")
        self.conv = upsample.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3_by_phases(x, self.conv.weight, self.conv.bias)


def conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A thin 3x3 convolution (stride 1, padding 1) as one matrix product on the pixels (NHWC).

    Why: cuDNN runs the U-Net's first (3 -> 128 channels) and last (128 -> 3) convolutions far below the memory
    bandwidth they need, its tiles made for wide layers.  As a matrix product each moves its wide side once:
    * few inputs (9 C <= O): the 3x3 patches of ``x`` (9 C values per pixel, tap-major) times the (O, 9 C) weight;
    * few outputs (9 O <= C): ``x`` times the taps' (9 O, C) weights gives each pixel's 9 partial outputs, and
      output pixel (h, w) sums the partial of tap (ky, kx) from pixel (h + ky - 1, w + kx - 1), in >= float32.
    The contraction widths are zero-padded to multiples of 8 (16-byte bf16 rows for cuBLAS).  The result has
    ``F.conv2d``'s dtype and channels_last strides.
    """
    b, c, h, w = x.shape
    o = weight.shape[0]
    if weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"conv3x3_as_matmul needs a (O, {c}, 3, 3) weight for {c} input channels, "
                         f"got {tuple(weight.shape)}")
    xh = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view for channels_last
    if 9 * c <= o:
        xp = F.pad(xh, (0, 0, 1, 1, 1, 1))
        # (B, H, W, C, ky, kx) as a view, then one copy (B, H, W, 9C): a cat of the 9 taps would be 9 kernels
        cols = xp.unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3).reshape(b, h, w, 9 * c)
        wm = weight.permute(0, 2, 3, 1).reshape(o, 9 * c)  # same (ky, kx, c) order
        pad = -9 * c % 8
        y = F.linear(F.pad(cols, (0, pad)), F.pad(wm, (0, pad)), bias)  # (B, H, W, O)
    elif 9 * o <= c:
        wm = weight.permute(2, 3, 0, 1).reshape(9 * o, c)  # rows (ky, kx, o)
        part = F.linear(xh, F.pad(wm, (0, 0, 0, -9 * o % 8)))
        acc_dtype = torch.promote_types(part.dtype, torch.float32)  # sums in >= fp32 even for bf16 partials
        pp = F.pad(part[..., :9 * o].to(acc_dtype), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, 9 O)
        acc = sum(pp[:, ky:ky + h, kx:kx + w, (3 * ky + kx) * o:(3 * ky + kx + 1) * o]
                  for ky in range(3) for kx in range(3))
        if bias is not None:
            acc = acc + bias.to(acc_dtype)
        y = acc.to(part.dtype)
    else:
        raise ValueError(f"conv3x3_as_matmul is for thin layers (9 x inputs <= outputs or 9 x outputs <= inputs), "
                         f"got {c} -> {o} channels")
    return y.permute(0, 3, 1, 2)


def is_thin_conv3x3(m: nn.Module) -> bool:
    """A 3x3, stride-1, padding-1 ``nn.Conv2d`` that ``conv3x3_as_matmul`` computes: few inputs or few outputs."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and (9 * m.in_channels <= m.out_channels or 9 * m.out_channels <= m.in_channels))


class MatmulConv2d(nn.Module):
    """A thin ``nn.Conv2d`` (``is_thin_conv3x3``) run by ``conv3x3_as_matmul``: the original's Parameters, its
    state-dict keys (``weight``, ``bias``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_thin_conv3x3(conv):
            raise ValueError(f"MatmulConv2d takes a thin 3x3 convolution (stride 1, padding 1), got {conv}")
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3_as_matmul(x, self.weight, self.bias)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` in the channels_last layout (in place), but for the attention blocks' 1x1 q/k/v/proj_out weights,
    which the forward uses as matrices: their gradients come back in the matrix layout, so channels_last strides on
    them broke the gradient layout contract, and DDP then copied those gradients into its buckets every step."""
    model = model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, AttnBlock):
            for conv in (m.q, m.k, m.v, m.proj_out):
                conv.weight.data = conv.weight.data.clone(memory_format=torch.contiguous_format)
    return model


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast the parameters of every convolution and linear layer of ``model`` to ``dtype``, in place (layouts kept).

    Under autocast these layers run in ``dtype`` and autocast would cast their fp32 weights at every call (a small
    kernel each); cast once, the numbers are the same and the casts are gone.  Norms keep their fp32 parameters
    (autocast runs them in fp32)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(dtype)
    return model


class Bf16EpsModel(nn.Module):
    """Runs ``model(x, t)`` under bf16 autocast on a channels_last ``x`` and hands back a contiguous float32 ε.

    The sampler's update stays in float32, so only the network sees the low precision; the input is made
    channels_last here so the first convolution does not transpose."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self.model(x, t)
        return out.float().contiguous()
