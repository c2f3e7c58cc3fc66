"""GroupNorm (+ SiLU) as one Triton kernel per sample, and the inference blocks that use it.

Why: compiled, a GroupNorm is two Inductor kernels, one gathering the statistics over the whole batch and one
normalising it, so at a large batch every activation streams from HBM twice.  Here one program owns one sample and
a block of channels.  Where the slab fits its registers (up to 16,384 elements: 16 channels at 32x32) it reads it
once, takes the statistics and normalises it; else it reads it in chunks for the statistics (per-channel mean and
sum of squared deviations, merged across chunks exactly as in Chan et al.'s parallel variance, then pooled per
group) and again to normalise, while the slab is still in L2.  The kernel configuration is fixed by the shapes, so
every process computes the same sums in the same order: deterministic without Inductor's deterministic mode, whose
untimed reduction configurations make the two-kernel GroupNorm much slower.

``KernelResnetBlock`` calls it for both norms of a ResnetBlock (the second with conv1's bias and the time embedding
folded into a per-(sample, channel) shift, so the convolution writes its output once); ``KernelGroupNorm`` is the
plain norm (the attention blocks').  What the kernel does not take (groups wider than 128 channels, CPU tensors
outside Triton's interpreter, other layouts) runs ``ddim.accel.layers.channel_stat_group_norm``'s formula in
PyTorch, which torch.compile fuses.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.library import triton_op, wrap_triton

from ddim.accel.layers import ChannelStatGroupNorm, channel_stat_group_norm, replace_modules
from ddim.models.unet import AttnBlock, ResnetBlock

try:  # the CUDA builds of torch ship Triton; CPU-only installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None

__all__ = ["available", "group_norm_silu", "kernel_takes", "check_inference", "KernelGroupNorm", "KernelResnetBlock",
           "use_group_norm_kernel"]

# A program's tile (lanes x pixels) and warps, chosen per site for the CIFAR-10 U-Net at a large batch in bf16.
# Where a program's channels fill its lanes (power-of-two groups) and its whole slab fits ONE_PASS_MAX elements, it
# reads the slab once: 16 channels x 1,024 pixels at 32x32 (8 warps), 32 x 256 at 16x16 (4 warps), 64 channels
# below.  Otherwise it walks chunks of TILE elements twice (statistics, then normalise from L2): 32 channels x 256
# pixels above 16x16, 64 x 128 up to it.  (Pipelined statistics loads were slower.)
TILE = 8192
ONE_PASS_MAX = 16384  # above 256 pixels; 8,192 up to there
MAX_CHANNELS = 128  # a wider group does not fit a program's registers
WARP_ELEMENTS = 2048  # tile elements per warp (4 warps for 8,192)


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
    def _round_e4m3(y):
        """float32 rounded to e4m3's grid (to nearest, ties to even), in float32.  For Triton's interpreter only,
        whose own float32 -> e4m3 conversion drops a mantissa carry into the exponent (1.94 -> 1.0); the GPU's
        conversion instruction rounds correctly."""
        e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        q = tl.exp2((tl.maximum(e, -6) - 3).to(tl.float32))  # e4m3's step at y (subnormal below 2^-6)
        v = y / q
        r = tl.floor(v + 0.5)
        r = tl.where((r - v == 0.5) & (r % 2 != 0), r - 1.0, r)
        return r * q

    @triton.jit
    def _normalise_store(OUT, off, mask, v, mean_c, scale, shift, MASKED: tl.constexpr, SILU: tl.constexpr,
                         SAT: tl.constexpr, ROUND_E4M3: tl.constexpr):
        y = (v - mean_c[None, :]) * scale[None, :] + shift[None, :]  # (x - mean) first: no cancellation
        if SILU:
            y = y * tl.sigmoid(y)
        if SAT > 0:  # an fp8 output: saturate at its largest finite value
            y = tl.minimum(tl.maximum(y, -SAT), SAT)
        if ROUND_E4M3:
            y = _round_e4m3(y)
        if MASKED:
            tl.store(OUT + off, y.to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(OUT + off, y.to(OUT.dtype.element_ty))

    @triton.jit
    def _group_norm_kernel(X, ADD, W, B, OUT, HW, C, add_stride, eps, CBE: tl.constexpr, CB: tl.constexpr,
                           CG: tl.constexpr, NG: tl.constexpr, PB: tl.constexpr, EVEN: tl.constexpr,
                           HAS_ADD: tl.constexpr, SILU: tl.constexpr, ONE_PASS: tl.constexpr, SAT: tl.constexpr,
                           ROUND_E4M3: tl.constexpr):
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
            add = tl.load(ADD + n * add_stride + c, mask=on, other=0.0).to(tl.float32)
        else:
            add = tl.zeros([CB], tl.float32)  # not added (HAS_ADD), only passed along
        if ONE_PASS:  # the whole slab is one chunk: read once, kept in registers for the normalise step
            off, mask = _chunk(base, 0, p, c, on, HW, C)
            v = _load_tile(X, off, mask, add, MASKED, HAS_ADD)
            mean = tl.sum(v, 0) / HW
            d = v - mean[None, :]
            if MASKED:
                d = tl.where(mask, d, 0.0)
            m2 = tl.sum(d * d, 0)
        else:
            mean = tl.zeros([CB], tl.float32)
            m2 = tl.zeros([CB], tl.float32)
            for p0 in range(0, HW, PB):
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
        # run in double precision, several times slower
        rstd_g = 1.0 / tl.sqrt(var_g + tl.cast(eps, tl.float32))
        rstd_c = tl.sum(member * rstd_g[None, :], 1)
        scale = rstd_c * tl.load(W + c, mask=on, other=0.0).to(tl.float32)
        shift = tl.load(B + c, mask=on, other=0.0).to(tl.float32)
        if ONE_PASS:
            _normalise_store(OUT, off, mask, v, mean_c, scale, shift, MASKED, SILU, SAT, ROUND_E4M3)
        else:
            for p0 in range(0, HW, PB):  # the slab again, now from L2
                off, mask = _chunk(base, p0, p, c, on, HW, C)
                v = _load_tile(X, off, mask, add, MASKED, HAS_ADD)
                _normalise_store(OUT, off, mask, v, mean_c, scale, shift, MASKED, SILU, SAT, ROUND_E4M3)


def _blocks(c: int, groups: int, hw: int) -> tuple[int, int, int, int] | None:
    """(channels per program, lanes, channels per group, pixels per chunk), or None where the kernel does not take
    the shape.  A chunk of at least ``hw`` pixels is the whole slab: the kernel then reads it once.

    A program takes k whole groups (k a power of two dividing ``groups``), so a group never straddles two programs.
    With power-of-two groups, as many as keep the slab within ONE_PASS_MAX (16 channels at 32x32, 32 at 16x16, 64
    below; one pass needs room for 16).  Else as many as fit in 32 channels above 256 pixels, 64 up to there, and
    the chunk fills TILE: the 12-per-group norms of the CIFAR-10 U-Net run 24 channels on 32 lanes at 32x32 and 48
    on 64 at 16x16, in two passes.
    """
    if groups <= 0 or c % groups or hw <= 0:
        return None
    cg = c // groups
    if cg > MAX_CHANNELS:
        return None
    hw2 = 1 << (hw - 1).bit_length()
    slab = ONE_PASS_MAX if hw > 256 else ONE_PASS_MAX // 2
    target = min(slab // hw2, 64)  # one pass: at least 16 channels (narrower rows were not measured)
    one_pass = cg & (cg - 1) == 0 and 16 <= target and cg <= target
    if not one_pass:
        target = 32 if hw > 256 else 64
    k = 1
    while groups % (2 * k) == 0 and cg * 2 * k <= target:
        k *= 2
    cbe = cg * k
    cb = 1 << (cbe - 1).bit_length()  # lanes: the next power of two
    return cbe, cb, cg, hw2 if one_pass else min(max(TILE // cb, 16), hw2)


def _warps(cb: int, pb: int) -> int:
    """Warps of a program with a tile of ``cb`` lanes x ``pb`` pixels."""
    return max(4, cb * pb // WARP_ELEMENTS)


def kernel_takes(x: torch.Tensor, groups: int) -> bool:
    """Whether ``group_norm_silu`` runs the kernel on ``x`` (else it runs the PyTorch formula)."""
    # Triton's interpreter runs on real CPU tensors: not under torch.compile's tracing (fake tensors)
    on_device = x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                              and not torch.compiler.is_compiling())
    return (triton is not None and on_device and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16,
            torch.float16) and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > 0
            and _blocks(x.shape[1], groups, x.shape[2] * x.shape[3]) is not None)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _saturation(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 ``dtype`` (outputs are clamped to it), else 0 (no clamp)."""
    return float(torch.finfo(dtype).max) if dtype in FP8_DTYPES else 0.0


def _launch(x, add, weight, bias, eps, groups, silu, out_dtype=None):
    n, c, h, w = x.shape
    hw = h * w
    cbe, cb, cg, pb = _blocks(c, groups, hw)
    # empty_strided, not empty_like(memory_format=...): Inductor lowers empty_like contiguous and then copies it
    # (a NaN fill of the whole activation per launch) into the channels_last layout the trace recorded
    out = torch.empty_strided(x.shape, x.stride(), dtype=out_dtype or x.dtype, device=x.device)
    # wrap_triton (with triton_op): under torch.compile the launch is traced into the graph, and Inductor launches
    # the kernel from its own generated code, inside its CUDA graphs too
    # without a shift, ADD gets the weight (never read): passing x twice made Inductor copy x before the launch
    wrap_triton(_group_norm_kernel)[(c // cbe, n)](
        x, add if add is not None else weight, weight, bias, out, hw, c, add.stride(0) if add is not None else 0, eps,
        CBE=cbe, CB=cb, CG=cg,
        NG=triton.next_power_of_2(cbe // cg), PB=pb, EVEN=hw % pb == 0, HAS_ADD=add is not None, SILU=silu,
        ONE_PASS=pb >= hw, SAT=_saturation(out.dtype),
        ROUND_E4M3=out.dtype == torch.float8_e4m3fn and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=_warps(cb, pb))
    return out


if triton is not None:

    @triton_op("ddim::group_norm_silu", mutates_args=())
    def _group_norm_op(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float, groups: int, silu: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return _launch(x, add, weight, bias, eps, groups, silu, out_dtype)


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, *, add: torch.Tensor | None = None,
                    silu: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``silu(norm(x + add[:, :, None, None]))`` (``silu=False``: without the SiLU), in x's dtype.

    add: (N, C) per-sample, per-channel shift added before normalising (a convolution's bias plus the time
    embedding).  Statistics and arithmetic in float32.  out_dtype: the output's dtype instead of x's; an fp8 one
    (``ddim.accel.fp8``) is saturated at its largest finite value.  The kernel where ``kernel_takes`` says so, else
    the same formula in PyTorch.
    """
    if x.dim() != 4:
        raise ValueError(f"group_norm_silu takes (N, C, H, W) activations, got shape {tuple(x.shape)}")
    if not norm.affine:
        raise ValueError("group_norm_silu needs an affine GroupNorm (weight and bias), got affine=False")
    if add is not None and add.shape != x.shape[:2]:
        raise ValueError(f"add must be (N, C) = {tuple(x.shape[:2])}, got {tuple(add.shape)}")
    if kernel_takes(x, norm.num_groups):
        if add is not None and (add.dtype != torch.float32 or add.stride(1) != 1):
            add = add.float().contiguous()
        return torch.ops.ddim.group_norm_silu(x, add, norm.weight, norm.bias, float(norm.eps), norm.num_groups, silu,
                                              out_dtype)
    v = x if add is None else x.float() + add.float()[:, :, None, None]
    y = channel_stat_group_norm(v, norm)
    sat = _saturation(out_dtype or x.dtype)
    if not sat:
        y = y.to(out_dtype or x.dtype)
        return F.silu(y) if silu else y
    y = F.silu(y.float()) if silu else y.float()
    return y.clamp(-sat, sat).to(out_dtype)


def check_inference(block: nn.Module) -> None:
    """Raise unless ``block`` runs for inference (eval mode, no gradients): the kernel-backed blocks have no
    backward and no dropout."""
    if block.training or (torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters())):
        raise RuntimeError(f"{type(block).__name__} is for inference (eval mode, no gradients): its kernels have no "
                           "backward and no dropout")


class KernelGroupNorm(ChannelStatGroupNorm):
    """GroupNorm through ``group_norm_silu`` (no SiLU); build it with ``KernelGroupNorm.from_norm(norm)`` (the same
    Parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self, silu=False)


class KernelResnetBlock(nn.Module):
    """A ``ResnetBlock`` for inference with both GroupNorm+SiLU from ``group_norm_silu``: conv1 runs without its
    bias, which joins the time embedding as the second norm's per-sample shift (``conv1_shift``).

    It holds the original block's modules (same Parameters, same state-dict keys); the dropout, an identity in eval
    mode, is left out."""

    def __init__(self, block: ResnetBlock):
        super().__init__()
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.norm1, self.conv1, self.temb_proj = block.norm1, block.conv1, block.temb_proj
        self.norm2, self.conv2, self.nin_shortcut = block.norm2, block.conv2, block.nin_shortcut

    def conv1_shift(self, temb_act: torch.Tensor) -> torch.Tensor:
        """conv1's bias + the projected time embedding: the (N, out_channels) float32 shift added after a bias-free
        conv1."""
        return self.conv1.bias.float() + self.temb_proj(temb_act).float()

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        check_inference(self)
        h = F.conv2d(group_norm_silu(x, self.norm1), self.conv1.weight, None, padding=1)  # the U-Net's 3x3 conv1
        h = self.conv2(group_norm_silu(h, self.norm2, add=self.conv1_shift(temb_act)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


def use_group_norm_kernel(model: nn.Module) -> nn.Module:
    """Replace ``model``'s ResnetBlocks by ``KernelResnetBlock``s and its attention blocks' norms by
    ``KernelGroupNorm``s, in place (an inference copy: the replacements share the originals' Parameters).  Other
    GroupNorms (the output norm, followed by a SiLU that torch.compile fuses into it) stay as they are."""
    if not available():
        raise RuntimeError("the GroupNorm kernel needs Triton (shipped with the CUDA builds of torch)")
    replace_modules(model, lambda m: isinstance(m, ResnetBlock), KernelResnetBlock)
    for attn in [m for m in model.modules() if isinstance(m, AttnBlock)]:
        attn.norm = KernelGroupNorm.from_norm(attn.norm)
    return model
