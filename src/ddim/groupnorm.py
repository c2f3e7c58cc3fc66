"""GroupNorm (+ SiLU) as one Triton kernel per sample, for inference on channels_last activations.

Why: compiled, a GroupNorm is two Inductor kernels, one gathering the statistics over the whole batch and
one normalising it, so at batch 512 every activation (up to 134 MB) streams from HBM twice.  Here one
program owns one sample and a block of channels: it reads its slab once for the statistics (per-channel
mean and sum of squared deviations, merged across pixel chunks exactly as in Chan et al.'s parallel
variance, then pooled per group), then reads it again to normalise, while the slab (64-128 KB) is still
in L2.  The kernel configuration is fixed by the shapes, so every process computes the same sums in the
same order: deterministic without Inductor's deterministic mode, whose untimed reduction configurations
made the two-kernel GroupNorm up to 2x slower (docs/results/bench, ninth round).

``KernelResnetBlock`` calls it for both norms of a ResnetBlock (the second with the convolution's bias and
the time embedding folded into a per-(sample, channel) shift, so the convolution writes its output
once); ``KernelGroupNorm`` is the plain norm (the attention blocks').  What the kernel does not take (groups wider than
128 channels, CPU tensors outside Triton's interpreter, other layouts) falls back to
``ChannelStatGroupNorm``'s formula in PyTorch, which torch.compile fuses as before.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ddim.models.unet import AttnBlock, ResnetBlock, require_inference
from ddim.perf import ChannelStatGroupNorm

try:  # the CUDA builds of torch ship Triton; CPU-only installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None

__all__ = ["available", "group_norm_silu", "kernel_takes", "KernelGroupNorm", "KernelResnetBlock",
           "swap_kernel_group_norm"]

# A program's tile: 8,192 elements (lanes x pixels), 4 warps.  Measured per site on an H200 (batch 512, bf16,
# 16 configurations of 32/64 channels x 32-256 pixels x 4/8 warps; docs/results/bench, tenth round): 32 channels x
# 256 pixels was the fastest at 32x32 (1.3-1.5x the 64 x 64 tile), 64 x 128 at 16x16 (1.1-1.3x)
TILE = 8192
MAX_CHANNELS = 128  # a wider group does not fit a program's registers
NUM_WARPS = 4
# software-pipelined loads in the statistics pass (tl.range num_stages; 1: none).  The kernel is latency-bound at
# 32x32 (~2.2 TB/s on an H200), so loads in flight across chunks may help; not yet measured, so off
STATS_STAGES = 1


def available() -> bool:
    """Triton is importable (GPU runs need CUDA; the interpreter runs on the CPU)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _chunk(base, p0, p, c, on, HW, C):
        """Offsets and mask of pixels p0 .. p0 + PB of the program's channels (X and OUT share them)."""
        rows = p0 + p
        return base + rows[:, None] * C + c[None, :], (rows < HW)[:, None] & on[None, :]

    @triton.jit
    def _load_tile(X, off, mask, add, MASKED: tl.constexpr, HAS_ADD: tl.constexpr):
        """The tile at ``off`` in float32, + the shift.  Unmasked (MASKED false: every tile full, every lane a
        channel) the loads vectorise without a mask.  Only values leave this function: a pointer derived from X
        (as the offsets were, once) makes Inductor's analysis of the kernel count X as written, and it then copies
        every input activation before the launch."""
        if MASKED:
            v = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        else:
            v = tl.load(X + off).to(tl.float32)
        if HAS_ADD:
            v += add[None, :]
        if MASKED:
            v = tl.where(mask, v, 0.0)  # the shift landed on masked entries too
        return v

    @triton.jit
    def _group_norm_kernel(X, ADD, W, B, OUT, HW, C, eps, CBE: tl.constexpr, CB: tl.constexpr, CG: tl.constexpr,
                           NG: tl.constexpr, PB: tl.constexpr, EVEN: tl.constexpr, HAS_ADD: tl.constexpr,
                           SILU: tl.constexpr, STAGES: tl.constexpr):
        # program (channel block, sample): channels [pid * CBE, pid * CBE + CBE), whole groups of CG channels,
        # on CB >= CBE lanes (a power of two); X is (N, HW, C) in memory (channels_last); EVEN: PB divides HW
        n = tl.program_id(1)
        lane = tl.arange(0, CB)
        FULL: tl.constexpr = CBE == CB  # lanes past CBE only where CBE is not a power of two
        MASKED: tl.constexpr = not (EVEN and FULL)
        on = lane < CBE
        c = tl.program_id(0) * CBE + lane
        p = tl.arange(0, PB)
        base = n.to(tl.int64) * HW * C
        if HAS_ADD:
            add = tl.load(ADD + n * C + c, mask=on, other=0.0).to(tl.float32)
        else:
            add = tl.zeros([CB], tl.float32)  # not added (HAS_ADD), only passed along
        mean = tl.zeros([CB], tl.float32)
        m2 = tl.zeros([CB], tl.float32)
        for p0 in tl.range(0, HW, PB, num_stages=STAGES):
            off, mask = _chunk(base, p0, p, c, on, HW, C)
            v = _load_tile(X, off, mask, add, MASKED, HAS_ADD)
            nb = tl.minimum(HW - p0, PB) * 1.0
            chunk_mean = tl.sum(v, 0) / nb
            d = v - chunk_mean[None, :]
            if MASKED:
                d = tl.where(mask, d, 0.0)
            na = p0 * 1.0
            delta = chunk_mean - mean
            mean += delta * (nb / (na + nb))
            m2 += tl.sum(d * d, 0) + delta * delta * (na * nb / (na + nb))
        # per-channel statistics -> per group (a lane x group indicator, so any CG works):
        # var_g = mean_c(var_c) + mean_c((mean_c - mean_g)^2)
        member = (((lane[:, None] // CG) == tl.arange(0, NG)[None, :]) & on[:, None]).to(tl.float32)
        mean_g = tl.sum(member * mean[:, None], 0) / CG
        mean_c = tl.sum(member * mean_g[None, :], 1)  # each channel's group mean
        dev = mean - mean_c
        var_g = tl.sum(member * (m2 / HW + dev * dev)[:, None], 0) / CG
        # Inductor passes the Python float eps as fp64: uncast, the whole normalise pass (and the SiLU's exp) would
        # run in double precision, 2.5x slower (10.3 vs 4.2 ms per forward on an H200)
        rstd_g = 1.0 / tl.sqrt(var_g + tl.cast(eps, tl.float32))
        rstd_c = tl.sum(member * rstd_g[None, :], 1)
        scale = rstd_c * tl.load(W + c, mask=on, other=0.0).to(tl.float32)
        shift = tl.load(B + c, mask=on, other=0.0).to(tl.float32)
        for p0 in range(0, HW, PB):  # the slab again, now from L2
            off, mask = _chunk(base, p0, p, c, on, HW, C)
            v = _load_tile(X, off, mask, add, MASKED, HAS_ADD)
            y = (v - mean_c[None, :]) * scale[None, :] + shift[None, :]  # (x - mean) first: no cancellation
            if SILU:
                y = y * tl.sigmoid(y)
            if MASKED:
                tl.store(OUT + off, y.to(OUT.dtype.element_ty), mask=mask)
            else:
                tl.store(OUT + off, y.to(OUT.dtype.element_ty))


def _blocks(c: int, groups: int, hw: int) -> tuple[int, int, int, int] | None:
    """(channels per program, lanes, channels per group, pixels per chunk), or None where the kernel does not take
    the shape.

    A program takes k whole groups (k a power of two dividing ``groups``, as many as fit in 32 channels above 256
    pixels, 64 up to there), so a group never straddles two programs; the 12-per-group norms of the CIFAR-10 U-Net
    run 24 channels on 32 lanes at 32x32 and 48 on 64 at 16x16.  The chunk fills the tile.
    """
    if groups <= 0 or c % groups or hw <= 0:
        return None
    cg = c // groups
    if cg > MAX_CHANNELS:
        return None
    target = 32 if hw > 256 else 64
    k = 1
    while groups % (2 * k) == 0 and cg * 2 * k <= target:
        k *= 2
    cbe = cg * k
    cb = 1 << (cbe - 1).bit_length()  # lanes: the next power of two
    return cbe, cb, cg, min(max(TILE // cb, 16), 1 << (hw - 1).bit_length())


def kernel_takes(x: torch.Tensor, groups: int) -> bool:
    """Whether ``group_norm_silu`` runs the kernel on ``x`` (else it runs the PyTorch formula)."""
    # Triton's interpreter runs on real CPU tensors: not under torch.compile's tracing (fake tensors)
    on_device = x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                              and not torch.compiler.is_compiling())
    return (triton is not None and on_device and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16,
            torch.float16) and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > 0
            and _blocks(x.shape[1], groups, x.shape[2] * x.shape[3]) is not None)


def _launch(x, add, weight, bias, eps, groups, silu):
    n, c, h, w = x.shape
    hw = h * w
    cbe, cb, cg, pb = _blocks(c, groups, hw)
    # empty_strided, not empty_like(memory_format=...): Inductor lowers empty_like contiguous and then copies it
    # (a NaN fill of the whole activation per launch) into the channels_last layout the trace recorded
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    # wrap_triton (with triton_op): under torch.compile the launch is traced into the graph, and Inductor launches
    # the kernel from its own generated code, inside its CUDA graphs too
    # without a shift, ADD gets the weight (never read): passing x twice made Inductor copy x before the launch
    wrap_triton(_group_norm_kernel)[(c // cbe, n)](
        x, add if add is not None else weight, weight, bias, out, hw, c, eps, CBE=cbe, CB=cb, CG=cg,
        NG=triton.next_power_of_2(cbe // cg), PB=pb, EVEN=hw % pb == 0, HAS_ADD=add is not None, SILU=silu,
        STAGES=STATS_STAGES, num_warps=NUM_WARPS)
    return out


if triton is not None:
    from torch.library import triton_op, wrap_triton

    @triton_op("ddim::group_norm_silu", mutates_args=())
    def _group_norm_op(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float, groups: int, silu: bool) -> torch.Tensor:
        return _launch(x, add, weight, bias, eps, groups, silu)


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, *, add: torch.Tensor | None = None,
                    silu: bool = True) -> torch.Tensor:
    """``silu(norm(x + add[:, :, None, None]))`` (``silu=False``: without the SiLU), in x's dtype.

    add: (N, C) per-sample, per-channel shift added before normalising (a convolution's bias plus the time
    embedding).  Statistics and arithmetic in float32.  The kernel where ``kernel_takes`` says so, else the
    same formula in PyTorch.
    """
    if x.dim() != 4:
        raise ValueError(f"group_norm_silu takes (N, C, H, W) activations, got shape {tuple(x.shape)}")
    if not norm.affine:
        raise ValueError("group_norm_silu needs an affine GroupNorm (weight and bias), got affine=False")
    if add is not None and add.shape != x.shape[:2]:
        raise ValueError(f"add must be (N, C) = {tuple(x.shape[:2])}, got {tuple(add.shape)}")
    if kernel_takes(x, norm.num_groups):
        add = None if add is None else add.float().contiguous()
        return torch.ops.ddim.group_norm_silu(x, add, norm.weight, norm.bias, float(norm.eps), norm.num_groups, silu)
    v = x if add is None else x.float() + add.float()[:, :, None, None]
    y = ChannelStatGroupNorm.forward(norm, v).to(x.dtype)
    return F.silu(y) if silu else y


class KernelGroupNorm(ChannelStatGroupNorm):
    """GroupNorm through ``group_norm_silu`` (no SiLU).  Same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self, silu=False)


class KernelResnetBlock(ResnetBlock):
    """``ResnetBlock`` (inference) with both GroupNorm+SiLU from ``group_norm_silu``: conv1 runs without its bias,
    which joins the time embedding as the second norm's per-sample shift.  Same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        require_inference(self)
        h = self.conv1._conv_forward(group_norm_silu(x, self.norm1), self.conv1.weight, None)
        shift = self.conv1.bias.float() + self.temb_proj(temb_act).float()
        h = self.conv2(group_norm_silu(h, self.norm2, add=shift))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


def swap_kernel_group_norm(model: nn.Module, on: bool = True) -> nn.Module:
    """Make ``model``'s ResnetBlocks ``KernelResnetBlock``s and its attention blocks' norms ``KernelGroupNorm``s (in
    place; ``on=False`` swaps back to ``ResnetBlock`` and ``ChannelStatGroupNorm``).  Other GroupNorms (the output
    norm, followed by a SiLU that torch.compile fuses into it) are left as they are."""
    if on and not available():
        raise RuntimeError("the GroupNorm kernel needs Triton (shipped with the CUDA builds of torch)")
    for m in model.modules():
        if isinstance(m, ResnetBlock):
            m.__class__ = KernelResnetBlock if on else ResnetBlock
        elif isinstance(m, AttnBlock) and isinstance(m.norm, nn.GroupNorm):
            m.norm.__class__ = KernelGroupNorm if on else ChannelStatGroupNorm
    return model
