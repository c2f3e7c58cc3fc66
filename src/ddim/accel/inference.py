"""Fast paths for sampling and training on a GPU, and the measuring helpers the benchmarks share.

The ε-network is the whole cost of DDIM sampling (S forward passes; the update of eq. (12) is a few
element-wise ops), so the inference fast path is about the network alone: bf16 autocast (matrix
units at full rate, GroupNorm/softmax kept in fp32 by autocast), channels_last (the layout cuDNN's
bf16 convolutions want, no transposes) and ``torch.compile`` (fuses GroupNorm+SiLU, the residual adds
and the casts).  Training adds a fused Adam, a foreach EMA update and a step with no host syncs.

Everything here is plain PyTorch and runs on the CPU too (bf16 autocast exists there; compile can use
the cheap ``"eager"`` backend), so the benchmarks can be smoke-tested without a GPU.
"""
from __future__ import annotations

import atexit
import copy
import time
import warnings
import weakref
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ddim.models.ema import ema_decay_at
from ddim.models.unet import AttnBlock, ResnetBlock, UNet, Upsample

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


class CastEpsModel(nn.Module):
    """Runs ``model(x, t)`` under autocast (or on weights already cast) and hands back float32.

    The sampler's update stays in float32, so only the network sees the low precision; inputs are
    made channels_last here so the first convolution does not transpose.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, *, autocast: bool, channels_last: bool):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.autocast = autocast and dtype != torch.float32
        self.cast_input = (not autocast) and dtype != torch.float32
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cast_input:
            x = x.to(self.dtype)
        ctx = torch.autocast(device_type=x.device.type, dtype=self.dtype) if self.autocast else nullcontext()
        with ctx:
            out = self.model(x, t)
        return out.float().contiguous()


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


class ChannelStatGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are gathered per channel, then pooled per group.

    Same parameters, state-dict keys and result as ``nn.GroupNorm`` (to float rounding).  Why: on a
    channels_last tensor a group's channels are a few adjacent values of every pixel, so a compiled
    per-group reduction reads memory with a stride; per-channel mean/variance over the pixels is a
    coalesced column reduction.  Groups are then pooled exactly, without cancellation:
    var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2).  Statistics are in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        b, c = x.shape[:2]
        g = self.num_groups
        xf = x.float()
        mean_g, var_g = group_stats_by_channel(xf, g)
        mean_g, var_g = mean_g[..., None], var_g[..., None]
        scale = torch.rsqrt(var_g + self.eps).expand(b, g, c // g)
        if self.affine:
            scale = scale * self.weight.float().view(1, g, c // g)
        # (x - mean) first: x * scale - mean * scale would cancel when |mean| >> std
        y = (xf - mean_g.expand(b, g, c // g).reshape(b, c, 1, 1)) * scale.reshape(b, c, 1, 1)
        if self.affine:
            y = y + self.bias.float().view(1, c, 1, 1)
        return y.to(x.dtype)


GROUP_NORMS = ("torch", "channel-stats")


def default_group_norm(kind: str | None, compiled: bool) -> str:
    """``kind`` if given, else per-channel statistics for compiled networks (faster on a GPU:
    docs/results/bench) and torch's kernel for eager ones (faster there)."""
    return kind or ("channel-stats" if compiled else "torch")


def default_inference_group_norm(compiled: bool, fused: bool = False) -> str:
    """What ``prepare_for_inference`` picks when not told: compiled, the GroupNorm kernel of ``ddim.accel.groupnorm``
    (deterministic as is; H200, S = 50: 630 vs 532 images/s; docs/results/bench, tenth and eleventh rounds)
    where Triton is installed and the convolution prologues of ``fused`` do not take the norms; else
    ``default_group_norm``.  On a CPU the kernel's blocks run its formula in PyTorch."""
    if compiled and not fused:
        from ddim.accel import groupnorm
        if groupnorm.available():
            return "kernel"
    return default_group_norm(None, compiled)


def swap_group_norm(model: nn.Module, kind: str = "channel-stats") -> nn.Module:
    """Make every ``nn.GroupNorm`` of ``model`` (in place) compute its statistics the ``kind`` way.

    The modules keep their parameters (same objects, same state-dict keys); only the class changes.
    """
    if kind not in GROUP_NORMS:
        raise ValueError(f"group_norm {kind!r} is not supported; allowed: {list(GROUP_NORMS)}")
    cls = ChannelStatGroupNorm if kind == "channel-stats" else nn.GroupNorm
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.__class__ = cls
    return model


def upsample_conv3x3_by_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                               strided: bool | None = None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` (padding 1) computed on the low-resolution ``x``.

    Output pixel (2p+i, 2q+j) sees source rows {p-1, p} (i = 0) or {p, p+1} (i = 1), and likewise for
    columns, with the 3x3 taps that fall on the same source pixel summed.  So the four output phases are
    2x2 convolutions of ``x``; stacked along the output channels they are one 2x2 convolution (padding 1,
    phase (i, j) read at an offset of (i, j)), followed by an interleave.  16/36 of the multiply-adds
    (times (1 + 1/H)^2 for the border) and no 4x-sized upsampled tensor before the convolution.
    """
    b, _, h, w = x.shape
    o = weight.shape[0]
    k = weight.to(torch.promote_types(weight.dtype, torch.float32))  # tap sums in >= fp32 even for bf16 weights
    rows = [torch.stack([k[:, :, 0], k[:, :, 1] + k[:, :, 2]], dim=2),   # i = 0: source rows p-1, p
            torch.stack([k[:, :, 0] + k[:, :, 1], k[:, :, 2]], dim=2)]   # i = 1: source rows p, p+1
    kernel = torch.cat([torch.stack([r[..., 0], r[..., 1] + r[..., 2]], dim=-1) if j == 0 else
                        torch.stack([r[..., 0] + r[..., 1], r[..., 2]], dim=-1)
                        for r in rows for j in (0, 1)]).to(weight.dtype)  # (4O, I, 2, 2), phase-major
    y = torch.nn.functional.conv2d(x, kernel, None if bias is None else bias.repeat(4), padding=1)
    if strided is None:
        strided = not torch.is_grad_enabled()
    if strided:
        # (B, O, H, i, W, j) as one strided view: phase (i, j) of channel o is channel (2i + j) O + o, its pixel
        # (p, q) read at (p + i, q + j), an address linear in (o, p, i, q, j).  Inductor can then write the
        # interleave straight into a following concatenation; the stacks below are a buffer of their own.  By
        # default only without autograd (this view's gradient, a scatter, is not measured in training)
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


class PhaseUpsample(Upsample):
    """``Upsample`` with its convolution run by ``upsample_conv3x3_by_phases``: same parameters and
    state-dict keys, same result to float rounding, fewer FLOPs and memory passes."""

    strided: bool | None = None  # upsample_conv3x3_by_phases's interleave; None: strided without autograd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return super().forward(x)
        return upsample_conv3x3_by_phases(x, self.conv.weight, self.conv.bias, strided=self.strided)


# "phases-stacked": the phases interleaved by stacking, as before the twelfth round (for comparison)
UPSAMPLES = ("nearest", "phases", "phases-stacked")


def default_upsample(kind: str | None, compiled: bool) -> str:
    """``kind`` if given, else "phases" for compiled networks (faster on an H100: sampling +1 %, training
    +3 %, docs/results/bench) and the official order for eager ones."""
    return kind or ("phases" if compiled else "nearest")


def swap_upsample(model: nn.Module, kind: str = "phases") -> nn.Module:
    """Make every ``Upsample`` of ``model`` (in place) upsample-then-convolve the ``kind`` way:
    "nearest" (the official order), "phases" (``PhaseUpsample``) or "phases-stacked" (its interleave by stacks)."""
    if kind not in UPSAMPLES:
        raise ValueError(f"upsample {kind!r} is not supported; allowed: {list(UPSAMPLES)}")
    for m in model.modules():
        if isinstance(m, Upsample):
            m.__class__ = PhaseUpsample if kind.startswith("phases") else Upsample
            if kind == "phases-stacked":
                m.strided = False
            elif "strided" in vars(m):
                del m.strided
    return model


def conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A thin 3x3 convolution (stride 1, padding 1) as one matrix product on the pixels (NHWC).

    Why: cuDNN runs the U-Net's first (3 -> 128 channels) and last (128 -> 3) convolutions far below the memory
    bandwidth they need, its tiles made for wide layers.  As a matrix product each moves its wide side once:
    * few inputs (9 C <= O): the 3x3 patches of ``x`` (9 C values per pixel, tap-major) times the (O, 9 C) weight;
    * few outputs (9 O <= C): ``x`` times the taps' (9 O, C) weights gives each pixel's 9 partial outputs, and
      output pixel (h, w) sums the partial of tap (ky, kx) from pixel (h + ky - 1, w + kx - 1), in >= float32.
    The contraction widths are zero-padded to multiples of 8 (16-byte bf16 rows for cuBLAS).  The result has
    ``F.conv2d``'s dtype and channels_last strides.  Compiled, H200, batch 512 at 32x32: 128 -> 3 in 73 instead of
    176 us, 3 -> 128 a little faster than cuDNN (docs/results/bench, twelfth round).
    """
    b, c, h, w = x.shape
    o = weight.shape[0]
    if weight.shape[1:] != (c, 3, 3):
        raise ValueError(f"conv3x3_as_matmul needs a (O, {c}, 3, 3) weight for {c} input channels, "
                         f"got {tuple(weight.shape)}")
    xh = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view for channels_last
    if 9 * c <= o:
        xp = torch.nn.functional.pad(xh, (0, 0, 1, 1, 1, 1))
        # (B, H, W, C, ky, kx) as a view, then one copy (B, H, W, 9C): a cat of the 9 taps would be 9 kernels
        cols = xp.unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3).reshape(b, h, w, 9 * c)
        wm = weight.permute(0, 2, 3, 1).reshape(o, 9 * c)  # same (ky, kx, c) order
        pad = -9 * c % 8
        y = torch.nn.functional.linear(torch.nn.functional.pad(cols, (0, pad)),
                                       torch.nn.functional.pad(wm, (0, pad)), bias)  # (B, H, W, O)
    elif 9 * o <= c:
        wm = weight.permute(2, 3, 0, 1).reshape(9 * o, c)  # rows (ky, kx, o)
        part = torch.nn.functional.linear(xh, torch.nn.functional.pad(wm, (0, 0, 0, -9 * o % 8)))
        acc_dtype = torch.promote_types(part.dtype, torch.float32)  # sums in >= fp32 even for bf16 partials
        pp = torch.nn.functional.pad(part[..., :9 * o].to(acc_dtype), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, 9 O)
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


class MatmulConv2d(nn.Conv2d):
    """A thin ``nn.Conv2d`` run by ``conv3x3_as_matmul``: same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3_as_matmul(x, self.weight, self.bias)


THIN_CONVS = ("cudnn", "matmul")


def swap_thin_convs(model: nn.Module, kind: str = "matmul") -> nn.Module:
    """Make every thin 3x3 convolution of ``model`` (``is_thin_conv3x3``; in the U-Nets, the first and the last)
    run as ``kind``, in place: "cudnn" (``F.conv2d``) or "matmul" (``MatmulConv2d``)."""
    if kind not in THIN_CONVS:
        raise ValueError(f"thin_convs {kind!r} is not supported; allowed: {list(THIN_CONVS)}")
    for m in model.modules():
        if is_thin_conv3x3(m):
            m.__class__ = MatmulConv2d if kind == "matmul" else nn.Conv2d
    return model


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters of every convolution and linear layer of ``model`` to ``dtype``, in place.

    Under autocast these layers run in ``dtype`` and autocast casts their fp32 weights at every call (~120 small
    kernels per forward of the CIFAR-10 U-Net); cast once, the numbers are the same and the casts are gone.
    Norms keep their fp32 parameters (autocast runs them in fp32)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(dtype)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` in the channels_last layout, but for the attention blocks' 1x1 q/k/v/proj_out weights, which the
    forward uses as matrices: their gradients come back in the matrix layout, so channels_last strides on them
    ((C, 1, C, C) for [C, C, 1, 1]) broke the gradient layout contract, and DDP copied those gradients into its
    buckets every step ("Grad strides do not match bucket view strides", 2x H200)."""
    model = model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, AttnBlock):
            for conv in (m.q, m.k, m.v, m.proj_out):
                conv.weight.data = conv.weight.data.clone(memory_format=torch.contiguous_format)
    return model


class BlockShifts(nn.Module):
    """Every ResnetBlock's ``conv1_shift`` (conv1's bias + ``temb_proj(temb_act)``) as one matrix product:
    (N, temb_ch) -> (N, sum of the blocks' out_channels), float32, in the blocks' order of ``modules()``.

    Why: the time embedding is the same for all blocks, yet each projected it on its own: 22 small matrix products
    per forward of the CIFAR-10 U-Net, each with a cuBLAS memset and an add kernel beside it; merged, a forward runs
    263 instead of 296 kernels on an H200.  The arithmetic per element is the same (one product over temb_ch, the
    bias added, the result in the weights' dtype, then conv1's bias in float32).  The weights are copies made now
    (non-persistent buffers): merge after loading and casting."""

    def __init__(self, blocks: list[ResnetBlock]):
        super().__init__()
        self.register_buffer("weight", torch.cat([b.temb_proj.weight.detach() for b in blocks]), persistent=False)
        self.register_buffer("bias", torch.cat([b.temb_proj.bias.detach() for b in blocks]), persistent=False)
        self.register_buffer("conv1_bias", torch.cat([b.conv1.bias.detach().float() for b in blocks]),
                             persistent=False)

    def forward(self, temb_act: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(temb_act, self.weight, self.bias).float() + self.conv1_bias


def _plain_resnet_blocks(model: nn.Module) -> list[str]:
    """Names of ``model``'s ResnetBlocks that add the time-embedding projection themselves (not inference blocks)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, ResnetBlock) and type(m).forward is ResnetBlock.forward]


def can_merge_projections(model: nn.Module) -> bool:
    """Whether ``merge_projections`` takes ``model``: a U-Net whose ResnetBlocks all take conv1's shift."""
    return any(isinstance(m, UNet) for m in model.modules()) and not _plain_resnet_blocks(model)


def merge_projections(model: nn.Module) -> nn.Module:
    """Per forward, one matrix product for all ResnetBlocks' time-embedding projections (``BlockShifts``), and the
    attention blocks' q/k/v weights concatenated once instead of at every call (in place; inference copies only:
    the merged weights are copies, so later changes to the parameters do not reach them).

    The ResnetBlocks must be inference blocks that add conv1's shift themselves (``ddim.accel.groupnorm``'s
    ``KernelResnetBlock``, ``ddim.accel.fp8``, ``ddim.accel.conv``): a plain ``ResnetBlock`` adds the projection to a biased
    conv1 and is refused."""
    unets = [m for m in model.modules() if isinstance(m, UNet)]
    if not unets:
        raise ValueError(f"merge_projections takes a model with a UNet, got {type(model).__name__}")
    plain = _plain_resnet_blocks(model)
    if plain:
        raise ValueError(f"merge_projections needs inference ResnetBlocks that take conv1's shift "
                         f"(group_norm='kernel', fp8 or fused); {plain[0]!r} is a plain ResnetBlock")
    for unet in unets:
        blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock)]
        unet.block_shifts = BlockShifts(blocks)
        start = 0
        for m in blocks:
            m.shift_cols = (start, start + m.out_channels)
            start += m.out_channels
    for m in model.modules():
        if isinstance(m, AttnBlock):
            m._buffers.pop("w_qkv", None)  # merged before: concatenate the parameters afresh
            m._buffers.pop("b_qkv", None)
            w_qkv, b_qkv = m.qkv_weight_bias()
            m.register_buffer("w_qkv", w_qkv.detach().clone(), persistent=False)
            m.register_buffer("b_qkv", b_qkv.detach().clone(), persistent=False)
    return model


def prepare_for_inference(
    model: nn.Module,
    *,
    dtype: str = "bf16",
    autocast: bool = True,
    channels_last: bool = True,
    compile: bool = True,
    compile_mode: str | None = None,
    backend: str = "inductor",
    options: dict | None = None,
    group_norm: str | None = None,
    upsample: str | None = None,
    fused: bool | str = False,
    deterministic: bool = True,
    thin_convs: str | None = None,
    cast_weights: bool | None = None,
    fp8: bool = False,
    fp8_min_width: int = 0,
    fp8_max_width: int = 0,
    merge: bool | None = None,
) -> nn.Module:
    """A fast eval-mode copy of an ε-model with the same ``(x, t) -> ε`` signature.

    dtype: "fp32", "bf16" or "fp16".  autocast=True keeps fp32 weights and lets autocast choose the
    per-op precision (GroupNorm, softmax stay fp32); autocast=False casts the weights themselves
    ("pure" low precision: fewer casts, a little more error).  The caller's model is left untouched
    (the copy is deep), so fp32 and fast paths can be compared on the same weights.  ``options`` go to
    ``torch.compile`` (Inductor settings; not together with ``compile_mode``).  ``{"freezing": True}`` folds what
    depends on the weights alone into constants (``FreezingCompiled``; for no-grad calls; no faster on an H200).
    group_norm: "torch", "channel-stats" (``ChannelStatGroupNorm``: compiled, ~10% faster sampling than torch's
    on an H100; eager, torch's kernel is faster) or "kernel" (``ddim.accel.groupnorm``: the ResnetBlock and attention
    GroupNorms as one Triton kernel per sample, ``ChannelStatGroupNorm`` elsewhere and where the kernel does not
    apply; deterministic as is; the compiled default where Triton is installed: 630 vs 532 images/s on an
    H200, see ``default_inference_group_norm``).
    upsample: "nearest" (official order) or "phases" (``PhaseUpsample``: the upsampling convolutions on the
    low-resolution input, 16/36 of their FLOPs; default when compiled: +1 % sampling on an H100).
    fused: ResnetBlocks as ``ddim.accel.conv.FusedResnetBlock`` (GroupNorm+SiLU in Triton convolutions' prologue);
    needs autocast=False.  Measured SLOWER on an H100 (342 vs 571 images/s): kept for kernel work only.
    ``fused="band"``: the band kernel (each input normalised once), on maps of 16 pixels and wider; also slower
    (H200: 507 vs 655 images/s, docs/results/bench, fourteenth round).
    deterministic: compile with Inductor's deterministic mode, which picks kernel configurations without
    timing them (and ``fp8``'s convolutions take ``ddim.accel.fp8.fixed_config``).  Timed choices differ between
    processes, and so do the bf16 sums they make: without it two processes (two GPUs of one evaluation, or two
    runs) gave different samples from the same x_T (random-init CIFAR-10 U-Net, S = 20: all 512 images differ, up
    to 73/255).  Costs 11-12 % of sampling speed
    (H200, batch 512: 526 vs 595 images/s at S = 50, 1,291 vs 1,462 at S = 20; docs/results/bench).
    thin_convs: "cudnn" or "matmul" (``swap_thin_convs``: the first and last convolutions as matrix products;
    default when compiled).  cast_weights: with autocast, the convolution and linear weights cast to ``dtype`` once
    instead of by autocast at every call (``cast_matmul_weights``; default when compiled).  Together +2.2 %
    sampling on an H200 (docs/results/bench, twelfth round).
    fp8: the ResnetBlocks' 3x3 convolutions on e4m3 activations and weights (``ddim.accel.fp8``; FP8 GPUs: Ada, Hopper
    or later); not together with ``fused``.  Opt-in, with CUDA graphs (``compile_mode="reduce-overhead"``).
    fp8_min_width / fp8_max_width: blocks on narrower / wider maps keep bf16 (0: no limit).  On an H200 with a
    48,000-step CIFAR-10 model (S = 50, batch 512; docs/results/bench, sixteenth and seventeenth rounds): every
    block in e4m3 is +5.8 % over bf16 but softens the samples (FID 18.02 vs 16.17 fp32 at S = 10, from the 32x32
    blocks); ``fp8_max_width=16`` (those blocks in bf16) is +4.7 % and FID-neutral (16.30 at S = 10, 10.89 vs
    10.98 at S = 50), the choice of ``evaluate.py sampler.fp8=true``.
    merge: ``merge_projections`` (all ResnetBlocks' time-embedding projections as one matrix product, q/k/v
    concatenated once); needs the inference ResnetBlocks (group_norm="kernel", fp8 or fused).  Default: on when
    compiled with those blocks: the same images bit for bit, 263 instead of 296 kernels per forward, +0.1-0.7 %
    sampling on an H200 (docs/results/bench, twenty-first round).
    """
    if options and compile_mode and not (compile and deterministic and backend == "inductor"):
        raise ValueError(f"give compile_mode ({compile_mode!r}) or options ({options}), not both: torch.compile "
                         f"takes one of them")
    if fused not in (False, True, "band"):
        raise ValueError(f"fused={fused!r} is not supported; allowed: False, True, 'band'")
    if fp8 and fused:
        raise ValueError(f"fp8=True and fused={fused!r} both replace the ResnetBlocks' convolutions: give one")
    torch_dtype = _dtype(dtype)
    norm_kind = group_norm or default_inference_group_norm(compile, fused)
    if norm_kind not in GROUP_NORMS + ("kernel",):
        raise ValueError(f"group_norm {norm_kind!r} is not supported; allowed: {list(GROUP_NORMS + ('kernel',))}")
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    swap_group_norm(fast, "channel-stats" if norm_kind == "kernel" else norm_kind)
    if norm_kind == "kernel":
        from ddim.accel.groupnorm import swap_kernel_group_norm
        swap_kernel_group_norm(fast)
    swap_upsample(fast, default_upsample(upsample, compile))
    swap_thin_convs(fast, thin_convs or ("matmul" if compile else "cudnn"))
    if not autocast and torch_dtype != torch.float32:
        fast = fast.to(torch_dtype)
    if channels_last:
        fast = to_channels_last(fast)
    if (compile if cast_weights is None else cast_weights) and autocast:
        cast_matmul_weights(fast, torch_dtype)
    if fused:
        if autocast and torch_dtype != torch.float32:
            raise ValueError(f"fused={fused!r} runs the convolutions in the weights' dtype: give autocast=False "
                             f"(weights cast to {dtype}), not autocast")
        from ddim.accel.conv import swap_resnet_blocks
        swap_resnet_blocks(fast, band=fused == "band", min_width=16 if fused == "band" else 0)
    if fp8:
        from ddim.accel.fp8 import swap_fp8_resnet_blocks
        swap_fp8_resnet_blocks(fast, min_width=fp8_min_width, max_width=fp8_max_width, tuned=not deterministic)
    if merge is None:
        merge = compile and can_merge_projections(fast)
    if merge:
        merge_projections(fast)
    wrapped: nn.Module = CastEpsModel(fast, torch_dtype, autocast=autocast, channels_last=channels_last)
    if compile:
        if deterministic and backend == "inductor":
            compile_mode, options = None, deterministic_options(compile_mode, options)
        wrapped = torch.compile(wrapped, mode=compile_mode, backend=backend, dynamic=False, options=options)
        if (options or {}).get("freezing"):
            wrapped = FreezingCompiled(wrapped)
    return wrapped


class FreezingCompiled(nn.Module):
    """Calls a module compiled with Inductor's ``freezing`` under dynamo's ``prepare_freezing``.

    Without it, freezing finds no parameters to fold: dynamo hands the module's parameters to the graph as plain
    inputs, so every forward recomputes what depends on the weights alone (their casts to bf16, the phase
    upsampling's kernels: 264 Inductor nodes per forward of the CIFAR-10 U-Net).  Compilation happens at the first
    call, hence the setting around every call.  Freezing compiles for no-grad calls only (sampling's)."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        with torch._dynamo.config.patch(prepare_freezing=True):
            return self.compiled(*args, **kwargs)


def deterministic_options(mode: str | None = None, options: dict | None = None) -> dict:
    """``torch.compile`` options for ``mode`` (and ``options``) plus Inductor's deterministic mode.

    torch.compile takes a mode or options, not both, so the mode is spelled out as its options."""
    import torch._inductor as inductor

    out = dict(inductor.list_mode_options(mode)) if mode else {}
    out.update(options or {})
    if hasattr(inductor.config, "deterministic"):
        out["deterministic"] = True
    else:  # older torch: no such mode; the samples may then differ between processes
        warnings.warn(f"torch {torch.__version__} has no torch._inductor.config.deterministic: compiled samples "
                      "may differ between processes (GPUs); newer torch has it", stacklevel=3)
    return out


def set_fast_flags(cudnn_benchmark: bool = True, tf32: bool = True) -> dict:
    """Global cuDNN/TF32 switches; returns the values in force, for the benchmark's record."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return backend_flags()


def backend_flags() -> dict:
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


# ----------------------------------------------------------------------------- training


class DiffusionTrainStep:
    """One optimisation step of the simplified DDPM loss (the paper's eq. (5) with γ_t = 1).

    Official CIFAR-10 recipe: Adam(lr 2e-4), gradient-norm clip 1.0, EMA 0.9999, antithetic
    timesteps (t and T-1-t in one batch) and the loss summed over pixels, averaged over the batch.
    Nothing in ``__call__`` reads a value back to the host, so the CPU can queue steps ahead of the
    GPU; the returned loss is a device tensor.

    fast=False is the plain fp32 eager path (foreach Adam, one EMA op per parameter, as the official
    code); fast=True uses ``dtype`` autocast, channels_last, a compiled network, fused Adam and a
    foreach EMA lerp.  A compiled step swaps the network's GroupNorms (in place, same parameters) for
    ``ChannelStatGroupNorm`` unless ``group_norm="torch"``: 33 -> 45 it/s on an H100 (docs/results/bench).
    ``ema_warmup`` ramps the EMA decay up (``ddim.models.ema.ema_decay_at``) so a short run's EMA holds no
    initial weights; ``ema_updates`` counts the updates (restore it when resuming).
    """

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: torch.Tensor,
        *,
        lr: float = 2e-4,
        grad_clip: float = 1.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        fast: bool = False,
        dtype: str = "bf16",
        compile_mode: str | None = None,
        backend: str = "inductor",
        compile: bool | None = None,
        group_norm: str | None = None,
        upsample: str | None = None,
        step_graph: bool = False,
    ):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        device = next(model.parameters()).device
        self.fast = fast
        self.dtype = _dtype(dtype) if fast else torch.float32
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.ema_updates = 0  # EMA updates so far (host count, no sync): the warm-up's n; set it when resuming
        self.model = model.train()
        if fast:
            self.model = to_channels_last(self.model)
        do_compile = fast if compile is None else compile
        swap_group_norm(self.model, default_group_norm(group_norm, do_compile))
        swap_upsample(self.model, default_upsample(upsample, do_compile))
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [p for p, q in zip(self.ema.parameters(), self.model.parameters()) if q.requires_grad]
        self.sqrt_ab = alphas_cumprod.sqrt().float().to(device)
        self.sqrt_1mab = (1.0 - alphas_cumprod).sqrt().float().to(device)
        self.T = alphas_cumprod.numel()
        use_fused = fast and device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                          fused=True if use_fused else None)
        self.cudagraphs = do_compile and compile_mode is not None and "reduce-overhead" in compile_mode
        if step_graph and self.cudagraphs:
            raise ValueError(f"step_graph=True captures the step in one CUDA graph, which cannot hold the CUDA graphs "
                             f"of compile_mode={compile_mode!r}: give compile_mode=None")
        self.forward = (torch.compile(self._loss, mode=compile_mode, backend=backend, dynamic=False)
                        if do_compile else self._loss)
        # step_graph: loss, backward, gradient all-reduce (when a process group of several is up) and clipping
        # as one CUDA graph (GradientGraph, what train.py's fast.step_graph runs); Adam and the EMA after it
        self.gradient_graph = GradientGraph(self._graph_loss, self.params, grad_clip=grad_clip) if step_graph else None

    def _loss(self, x0: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        a = self.sqrt_ab[t].view(-1, 1, 1, 1)
        s = self.sqrt_1mab[t].view(-1, 1, 1, 1)
        x = x0 * a + e * s
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=x.device.type, dtype=self.dtype):
                out = self.model(x, t)
        else:
            out = self.model(x, t)
        return (e - out.float()).square().sum(dim=(1, 2, 3)).mean()

    def sample_t(self, n: int, device: torch.device) -> torch.Tensor:
        """Antithetic timesteps, as the official trainer draws them."""
        t = torch.randint(0, self.T, (n // 2 + 1,), device=device)
        return torch.cat([t, self.T - t - 1])[:n]

    def _graph_loss(self, x0: torch.Tensor) -> torch.Tensor:
        return self.forward(x0, self.sample_t(x0.shape[0], x0.device), torch.randn_like(x0))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.gradient_graph is not None:
            loss, _ = self.gradient_graph(x0)
            self.optimizer.step()
            self._ema_update()
            return loss
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        t = self.sample_t(x0.shape[0], x0.device)
        e = torch.randn_like(x0)
        loss = self.forward(x0, t, e)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=self.fast or None)
        self.optimizer.step()
        self._ema_update()
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = ema_decay_at(self.ema_decay, self.ema_updates, self.ema_warmup)
        self.ema_updates += 1
        if self.fast:
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - d)
        else:  # one op per tensor, like the official EMAHelper
            for e, p in zip(self.ema_params, self.params):
                e.mul_(d).add_(p, alpha=1.0 - d)


_LIVE_GRADIENT_GRAPHS: weakref.WeakSet = weakref.WeakSet()


def release_gradient_graphs() -> None:
    """``release()`` every live ``GradientGraph``.  Registered with ``atexit`` anew whenever one is made, which is
    after ``init_process_group``, so it runs before the exit handlers that destroy the process group (Lightning
    registers one): an own DDP script that forgets ``release()`` still exits."""
    for g in list(_LIVE_GRADIENT_GRAPHS):
        g.release()


class GradientGraph:
    """``loss_fn(x)``'s forward, backward, gradient all-reduce (mean over the ranks) and norm clipping as one CUDA
    graph; on a CPU the same calls run eagerly.  Returns ``(loss, pre-clip gradient norm)``, device tensors.

    Why: train.py with per-region CUDA graphs spent 17-24 ms of host time per step on one GPU and ~32 ms per
    process under DDP, against ~20 ms of GPU work (Lightning's loop, DDP's hooks between the graph pieces
    Dynamo splits at gradient buckets; docs/results/bench): the GPU waited for Python.  One replay per step
    leaves the host only the optimizer step and the EMA.  The gradients live in one flat fp32 buffer (each
    ``p.grad`` a view with ``p``'s strides), so the all-reduce is one collective and the clipping one product.
    Everything random in ``loss_fn`` (t, ε, dropout) is drawn inside the graph, from fresh numbers each replay.

    One graph per input shape, captured after ``warmup`` eager calls (compilation, cuDNN autotuning; they
    compute gradients but change no parameter).  ``loss_fn`` must be capturable: no host syncs, no CUDA
    graphs of its own (compile it without ``mode="reduce-overhead"``).
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], *,
                 grad_clip: float | None = None, all_reduce: bool | None = None, cuda_graph: bool = True,
                 warmup: int = 2):
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientGraph needs at least one parameter that requires grad")
        self.grad_clip = grad_clip
        dist = torch.distributed
        self.all_reduce = (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                           if all_reduce is None else all_reduce)
        self.cuda_graph = cuda_graph
        self.warmup = warmup
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=self.params[0].device)
        self.bind_grads()
        self._graphs: dict[tuple, tuple] = {}
        atexit.unregister(release_gradient_graphs)  # registered anew, so last: atexit runs the last first
        atexit.register(release_gradient_graphs)
        _LIVE_GRADIENT_GRAPHS.add(self)

    def bind_grads(self) -> None:
        """Point every ``p.grad`` at its slice of the flat buffer, in ``p``'s own strides (channels_last stays)."""
        offset = 0
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"GradientGraph keeps fp32 gradients; got a {p.dtype} parameter of shape {tuple(p.shape)}")
            p.grad = self.flat[offset: offset + p.numel()].as_strided(p.shape, p.stride())
            offset += p.numel()
        self._grads = [p.grad for p in self.params]

    def _step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.flat.zero_()
        loss = self.loss_fn(x)
        loss.backward()  # accumulates into the zeroed views in place (grad mode is off inside backward)
        if self.all_reduce:
            torch.distributed.all_reduce(self.flat)
            self.flat.div_(torch.distributed.get_world_size())
        # per-tensor norms, then their norm, as clip_grad_norm_ (one fp32 sum over all 36M entries drifts ~1e-5)
        norm = torch.nn.utils.get_total_norm(self._grads, foreach=self.flat.device.type == "cuda" or None)
        if self.grad_clip is not None:  # torch.nn.utils.clip_grad_norm_'s rule
            self.flat.mul_(torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        return loss.detach(), norm

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(p.grad is not g for p, g in zip(self.params, self._grads)):  # e.g. optimizer.zero_grad() set None
            self.bind_grads()  # the graph writes the flat buffer, so new views of it are all it takes
        if x.device.type != "cuda" or not self.cuda_graph:
            return self._step(x)
        key = (tuple(x.shape), x.stride(), x.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_x, static_loss, static_norm = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_loss.clone(), static_norm.clone()

    def release(self) -> None:
        """Free the captured graphs (a later call captures again).  Call it before ``destroy_process_group``:
        NCCL's communicator teardown waits for graphs that captured its collectives (pytorch/pytorch#115388), so
        on two H200s train.py and bench/ddp.py finished their work and then hung at exit."""
        graphs, self._graphs = list(self._graphs.values()), {}
        for graph, *_ in graphs:
            graph.reset()

    def _capture(self, x: torch.Tensor) -> tuple:
        static_x = x.clone()
        device = x.device
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        # autocast's cast cache must not hold tensors of the graph's memory pool past the capture.  The warm-up
        # runs under the same autocast state: torch.compile guards on it, and a recompilation inside the capture
        # would time (autotune) its new kernels there, which synchronises and breaks the capture.
        def same_autocast():
            return torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), same_autocast():  # warm-up off the capturing stream, as torch.cuda.graph wants
            for _ in range(self.warmup):
                self._step(static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with same_autocast(), torch.cuda.graph(graph):
            static_loss, static_norm = self._step(static_x)
        return graph, static_x, static_loss, static_norm


# ----------------------------------------------------------------------------- measuring


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (multiply and add counted separately) of running ``fn`` once.

    Uses ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products and convolutions
    (and their backward passes) -- the operations the matrix units run; element-wise work is left out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def kernel_ms(fn: Callable[[], object], device: torch.device | str, rep: int = 50) -> float:
    """Milliseconds per call of a short GPU operation (Triton's do_bench: ``rep`` ms of repeats, caches flushed);
    on a CPU the best of two timed calls."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=rep)
    return 1e3 * min(timed(fn, device, 2))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls, the device drained before and after each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def matmul_tflops(device: torch.device | str, n: int = 8192, repeats: int = 20) -> float | None:
    """Measured bf16 matrix-product rate (TFLOP/s) of an n×n×n product on random data: the chip's
    practical peak, used as the denominator of "share of peak"."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def device_info(device: torch.device | str) -> dict:
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    multiprocessors=p.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def write_json(record: dict, path: str | None) -> None:
    """Write a benchmark record (no-op without a path), so figures can be compared across runs."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec); missing values print as '-'.  A '|' in a header
    (``mean |d|``) is escaped, so it stays inside its cell."""
    head = "| " + " | ".join(h.replace("|", "\\|") for _, h, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [head, rule]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
