"""GroupNorm + SiLU fused into the 3x3 convolutions of the ResnetBlocks (inference, Triton).

Why: at batch 512 on an H100 the compiled bf16 U-Net spends ~47 % of its time in cuDNN convolutions
(near the matrix units' peak) and ~36 % in GroupNorm passes that stream whole activations through
memory: one pass for the statistics, one that writes ``silu(norm(h))`` for the convolution to read
back (docs/results/bench).  cuDNN cannot take per-sample normalisation into a convolution, so this
module has one implicit-GEMM convolution kernel (NHWC, 3x3, padding 1) that

* prologue: applies ``silu(x * scale[n, c] + shift[n, c])`` to the input tile it loads (GroupNorm with
  its affine folded into a per-sample, per-channel scale and shift; the zero padding is applied after
  the activation, as the unfused network pads the activation);
* epilogue: adds the bias (per channel, or per sample and channel: the time embedding folds in), an
  optional residual, stores, and returns the GroupNorm statistics of what it stored (tile means and
  sums of squared deviations, pooled exactly as in Chan et al.'s parallel variance), so the next
  GroupNorm needs no pass of its own.

``FusedResnetBlock`` uses it for both convolutions of a block: of the block's four GroupNorm passes
only the statistics of its input remain.  Everything else (stride-2, 1x1, the upsampling and output
convolutions, attention) stays with cuDNN/Inductor.  The kernels are Triton; Triton's interpreter
(``TRITON_INTERPRET=1``) runs them on the CPU for the tests.

Measured on an H100 (docs/results/bench, fourth round): without the prologue the kernel is on par with cuDNN
at 32x32 and 16x16, but the prologue doubles its time (the activation is recomputed for each of the 9 taps;
SiLU's exponential is special-function-unit work), and the network runs at 342 instead of 571 images/s.
So it is opt-in (``prepare_for_inference(fused=True)``), a base for kernel work, not a default.

The band kernel (``band=True``; ``prepare_for_inference(fused="band")``) removes the recompute: persistent programs
normalise the input rows of a band once into a zero-bordered scratch slot (L2-resident), then run the nine taps
from it.  Measured on an H200 (fourteenth round): the prologue costs 0.05-0.07 ms over the plain Triton convolution
at 32x32 instead of +0.4, but the layers are still 11 % slower than cuDNN + ``ddim.accel.groupnorm``'s kernel (whose
passes cost only 0.8 of 5.1 ms there), and the network runs 507 instead of 655 images/s.  Opt-in as well.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import nn

from ddim.accel.groupnorm import FP8_DTYPES, KernelResnetBlock
from ddim.models.unet import ResnetBlock, require_inference
from ddim.accel.inference import group_stats_by_channel, pool_mean_var

try:  # the CUDA builds of torch ship Triton; CPU-only installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None

__all__ = ["available", "conv3x3_fused", "group_norm_scale_shift", "FusedResnetBlock", "swap_resnet_blocks"]


def available() -> bool:
    """Triton is importable (GPU runs need CUDA; the interpreter runs on the CPU)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _tanh_approx(x):
        # One MUFU op (sm_75+) instead of exp + reciprocal: the prologue recomputes the activation for each
        # of the 9 taps, so the special-function unit, not the matrix unit, would otherwise set the pace.
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _conv3x3_kernel(
        X, W, WS, BIAS, SCALE, SHIFT, RES, Y, PART,
        M, H, WD, CIN, COUT, sbn,
        swk, swn,
        sxn, sxh, sxw, sxc,
        syn, syh, syw, syc,
        srn, srh, srw, src,
        PROLOGUE: tl.constexpr, PER_SAMPLE_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
        STATS: tl.constexpr, GROUP_C: tl.constexpr, SAMPLE_TILES: tl.constexpr, FAST_SILU: tl.constexpr,
        W_SCALED: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Output tiles: rows are pixels (n, oh, ow) flattened, columns output channels.  Axis 0 runs over
        # the channel tiles so the tiles that share an input tile run together (it is read once from HBM).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        hw_size = H * WD
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = offs_m // hw_size
        hw = offs_m % hw_size
        oh = hw // WD
        ow = hw % WD
        m_ok = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < COUT
        offs_k = tl.arange(0, BLOCK_K)
        k_tiles = tl.cdiv(CIN, BLOCK_K)
        n0 = (pid_m * BLOCK_M) // hw_size  # the tile's sample when SAMPLE_TILES (tiles never straddle samples)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # One flat loop over (tap, channel block), K = 9 * CIN, so Triton pipelines the loads across taps.
        for it in range(0, 9 * k_tiles):
            tap = it // k_tiles
            ck = (it % k_tiles) * BLOCK_K + offs_k
            ih = oh + (tap // 3 - 1)
            iw = ow + (tap % 3 - 1)
            inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WD)
            a_ptrs = X + (n * sxn + ih * sxh + iw * sxw)[:, None] + (ck * sxc)[None, :]
            w_ptrs = W + (tap * CIN + ck)[:, None] * swk + offs_n[None, :] * swn
            if EVEN_K:
                a = tl.load(a_ptrs, mask=inside[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = ck < CIN
                a = tl.load(a_ptrs, mask=inside[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if PROLOGUE:
                if SAMPLE_TILES:
                    s = tl.load(SCALE + n0 * CIN + ck, mask=ck < CIN, other=0.0)[None, :]
                    b = tl.load(SHIFT + n0 * CIN + ck, mask=ck < CIN, other=0.0)[None, :]
                else:
                    nk = n[:, None] * CIN + ck[None, :]
                    sk_ok = m_ok[:, None] & (ck < CIN)[None, :]
                    s = tl.load(SCALE + nk, mask=sk_ok, other=0.0)
                    b = tl.load(SHIFT + nk, mask=sk_ok, other=0.0)
                v = a.to(tl.float32) * s + b
                if FAST_SILU:
                    v = v * (0.5 * _tanh_approx(0.5 * v) + 0.5)  # sigmoid(v) = (1 + tanh(v / 2)) / 2
                else:
                    v = v * tl.sigmoid(v)
                a = tl.where(inside[:, None], v, 0.0).to(X.dtype.element_ty)  # zero padding after the activation
            acc = tl.dot(a, w, acc)

        mask = m_ok[:, None] & n_ok[None, :]
        if W_SCALED:  # quantised weights (ddim.accel.fp8): w = w_q * scale per output channel
            acc *= tl.load(WS + offs_n, mask=n_ok, other=0.0)[None, :]
        if PER_SAMPLE_BIAS:
            acc += tl.load(BIAS + n[:, None] * sbn + offs_n[None, :], mask=mask, other=0.0)
        else:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0)[None, :]
        if RESIDUAL:
            r_ptrs = RES + (n * srn + oh * srh + ow * srw)[:, None] + (offs_n * src)[None, :]
            acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = acc.to(Y.dtype.element_ty)
        tl.store(Y + (n * syn + oh * syh + ow * syw)[:, None] + (offs_n * syc)[None, :], out, mask=mask)
        if STATS:
            # The host guarantees full tiles inside one sample and whole groups per tile.  Statistics of the
            # stored (rounded) values, as GroupNorm would see them: tile mean and sum of squared deviations.
            GROUPS_T: tl.constexpr = BLOCK_N // GROUP_C
            v3 = tl.reshape(out.to(tl.float32), (BLOCK_M, GROUPS_T, GROUP_C))
            mean = tl.sum(tl.sum(v3, axis=2), axis=0) / (BLOCK_M * GROUP_C)
            d = v3 - mean[None, :, None]
            m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
            g = pid_n * GROUPS_T + tl.arange(0, GROUPS_T)
            base = PART + (pid_m * (COUT // GROUP_C) + g) * 2
            tl.store(base, mean)
            tl.store(base + 1, m2)


if triton is not None:

    @triton.jit
    def _conv3x3_band_kernel(
        X, W, BIAS, SCALE, SHIFT, RES, Y, PART, SCR,
        H, WD, CIN, COUT, N_BANDS, sbn,
        sxn, sxh, sxw, sxc,
        syn, syh, syw, syc,
        srn, srh, srw, src,
        PROLOGUE: tl.constexpr, PER_SAMPLE_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
        STATS: tl.constexpr, GROUP_C: tl.constexpr, FAST_SILU: tl.constexpr,
        R: tl.constexpr, WDP: tl.constexpr, CP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Persistent: program p owns a scratch slot of (R + 2) x (WD + 2) x CIN activations and walks the bands
        # p, p + P, ...  A band is R whole rows of one sample (BLOCK_M = R x WD output pixels).  Per band:
        # (1) the R + 2 input rows it needs are read once, normalised + SiLU'd once, and stored in the slot
        # with a zero border (the padding); (2) the nine taps' matrix products read the slot (L1/L2-resident:
        # P slots are a few MB) at shifted addresses, without masks, for every output-channel tile.
        BLOCK_M: tl.constexpr = R * WDP
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        SW = WD + 2
        scr = SCR + pid * ((R + 2) * SW * CIN)
        offs_w = tl.arange(0, WDP)
        offs_c = tl.arange(0, CP)
        zeros_c = tl.zeros((CP,), dtype=SCR.dtype.element_ty)
        for lr in range(0, R + 2):  # the border columns, zero for good (never written again)
            for c0 in range(0, CIN, CP):
                tl.store(scr + (lr * SW) * CIN + c0 + offs_c, zeros_c)
                tl.store(scr + (lr * SW + WD + 1) * CIN + c0 + offs_c, zeros_c)
        offs_m = tl.arange(0, BLOCK_M)
        lr_m = offs_m // WDP
        lc_m = offs_m % WDP
        offs_k = tl.arange(0, BLOCK_K)
        k_tiles = CIN // BLOCK_K
        bands_per_sample = H // R
        for band in range(pid, N_BANDS, nprog):
            n = band // bands_per_sample
            r0 = (band % bands_per_sample) * R
            tl.debug_barrier()  # every warp is done reading the previous band's slot
            for lr in range(0, R + 2):
                ih = r0 - 1 + lr
                row_ok = (ih >= 0) & (ih < H)
                for c0 in range(0, CIN, CP):
                    c = c0 + offs_c
                    ok = row_ok & (offs_w < WD)[:, None]
                    a = tl.load(X + n * sxn + ih * sxh + offs_w[:, None] * sxw + c[None, :] * sxc, mask=ok, other=0.0)
                    if PROLOGUE:
                        v = a.to(tl.float32) * tl.load(SCALE + n * CIN + c)[None, :] \
                            + tl.load(SHIFT + n * CIN + c)[None, :]
                        if FAST_SILU:
                            v = v * (0.5 * _tanh_approx(0.5 * v) + 0.5)
                        else:
                            v = v * tl.sigmoid(v)
                        a = tl.where(ok, v, 0.0)  # the padding rows are zero after the activation
                    tl.store(scr + (lr * SW + 1 + offs_w)[:, None] * CIN + c[None, :], a.to(SCR.dtype.element_ty))
            tl.debug_barrier()  # the slot is complete
            oh = r0 + lr_m
            for n0 in range(0, COUT, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for it in range(0, 9 * k_tiles):
                    tap = it // k_tiles
                    ck = (it % k_tiles) * BLOCK_K + offs_k
                    pix = (lr_m + tap // 3) * SW + lc_m + tap % 3
                    a = tl.load(scr + pix[:, None] * CIN + ck[None, :])
                    w = tl.load(W + (tap * CIN + ck)[:, None] * COUT + offs_n[None, :])
                    acc = tl.dot(a, w, acc)
                if PER_SAMPLE_BIAS:
                    acc += tl.load(BIAS + n * sbn + offs_n)[None, :]
                else:
                    acc += tl.load(BIAS + offs_n)[None, :]
                if RESIDUAL:
                    r_ptrs = RES + n * srn + (oh * srh + lc_m * srw)[:, None] + (offs_n * src)[None, :]
                    acc += tl.load(r_ptrs).to(tl.float32)
                out = acc.to(Y.dtype.element_ty)
                tl.store(Y + n * syn + (oh * syh + lc_m * syw)[:, None] + (offs_n * syc)[None, :], out)
                if STATS:  # the band's mean and M2 of the stored values per channel; the host pools them into
                    # groups (a reshape into groups here, as the tile kernel does, measured the same on an H200)
                    v = out.to(tl.float32)
                    mean = tl.sum(v, axis=0) / BLOCK_M
                    d = v - mean[None, :]
                    base = PART + (band * COUT + offs_n) * 2
                    tl.store(base, mean)
                    tl.store(base + 1, tl.sum(d * d, axis=0))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): tried per shape on the first call (see _tune).
CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3),
)
# e4m3 inputs (ddim.accel.fp8): 128-byte K slices, as the bf16 configs' 64 channels are
FP8_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 128, 4, 3), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4),
    (128, 128, 64, 4, 4),
)
_TUNED: dict[tuple, tuple[int, int, int, int, int]] = {}


def _candidates(configs, *, hw: int, m: int, cin: int, cout: int, stats_c: int | None, min_k: int = 16) -> list[tuple]:
    """``configs`` with the blocks clamped to the problem (small maps, few channels), deduplicated; with
    fused statistics only those whose tiles hold whole groups of one sample.  min_k: the matrix instruction's K
    (32 for fp8)."""
    out = []
    for bm, bn, bk, warps, stages in configs:
        bm = max(16, min(bm, triton.next_power_of_2(m)))
        bn = max(16, min(bn, triton.next_power_of_2(cout)))
        bk = max(min_k, min(bk, triton.next_power_of_2(cin)))
        if stats_c is not None:
            bm = min(bm, hw & -hw)  # the largest power of two dividing H * W
            if bm < 16 or hw % bm or cout % bn or bn % stats_c:
                continue
        if (bm, bn, bk, warps, stages) not in out:
            out.append((bm, bn, bk, warps, stages))
    return out


def _launch(cfg, x, w_kc, bias, scale, shift, residual, y, part, stats_c, fast_silu, w_scale=None) -> None:
    bm, bn, bk, warps, stages = cfg
    nb, cin, h, wd = x.shape
    cout = y.shape[1]
    m = nb * h * wd
    res = residual if residual is not None else y
    dummy = bias
    grid = (triton.cdiv(cout, bn), triton.cdiv(m, bm))
    _conv3x3_kernel[grid](
        x, w_kc, w_scale if w_scale is not None else dummy, bias, scale if scale is not None else dummy,
        shift if shift is not None else dummy, res, y, part if part is not None else dummy,
        m, h, wd, cin, cout, bias.stride(0) if bias.dim() == 2 else 0,
        w_kc.stride(0), w_kc.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        y.stride(0), y.stride(2), y.stride(3), y.stride(1),
        res.stride(0), res.stride(2), res.stride(3), res.stride(1),
        PROLOGUE=scale is not None, PER_SAMPLE_BIAS=bias.dim() == 2, RESIDUAL=residual is not None,
        STATS=part is not None, GROUP_C=stats_c or 1, SAMPLE_TILES=(h * wd) % bm == 0,
        FAST_SILU=fast_silu and not _interpreting(), W_SCALED=w_scale is not None, EVEN_K=cin % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM) of the band kernel; BLOCK_M / W rows per band.
BAND_CONFIGS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (128, 128, 64, 4, 3, 2), (128, 128, 64, 8, 3, 1), (128, 256, 64, 8, 3, 1), (64, 128, 64, 4, 3, 2),
    (256, 128, 64, 8, 3, 1), (128, 64, 64, 4, 3, 2),
)


def band_takes(h: int, wd: int, cin: int, cout: int) -> bool:
    """Shapes the band kernel runs: a power-of-two width, channels in multiples of 16."""
    return wd >= 1 and wd & (wd - 1) == 0 and cin % 16 == 0 and cout % 16 == 0


def _band_candidates(configs, *, h: int, wd: int, cin: int, cout: int) -> list[tuple]:
    """``configs`` clamped to the problem: whole rows per band (BLOCK_M a multiple of W dividing the map),
    blocks that divide the channels."""
    out = []
    for bm, bn, bk, warps, stages, per_sm in configs:
        rows = max(1, min(bm // wd, h))
        while h % rows:  # whole bands per sample
            rows -= 1
        bm = rows * wd
        bn = min(bn, cout & -cout)
        bk = min(bk, cin & -cin)
        if bm < 16 or bm & (bm - 1) or bn < 16 or bk < 16:
            continue
        if (bm, bn, bk, warps, stages, per_sm) not in out:
            out.append((bm, bn, bk, warps, stages, per_sm))
    return out


def _launch_band(cfg, x, w_kc, bias, scale, shift, residual, y, part, stats_c, fast_silu) -> None:
    bm, bn, bk, warps, stages, per_sm = cfg
    nb, cin, h, wd = x.shape
    cout = y.shape[1]
    rows = bm // wd
    n_bands = nb * h // rows
    if x.device.type == "cuda":
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count * per_sm
    else:  # the interpreter: a few programs, so the persistent loop and the slot reuse are exercised
        programs = 3
    programs = min(programs, n_bands)
    scratch = torch.empty(programs * (rows + 2) * (wd + 2) * cin, device=x.device, dtype=x.dtype)
    res = residual if residual is not None else y
    dummy = bias
    _conv3x3_band_kernel[(programs,)](
        x, w_kc, bias, scale if scale is not None else dummy, shift if shift is not None else dummy, res, y,
        part if part is not None else dummy, scratch,
        h, wd, cin, cout, n_bands, bias.stride(0) if bias.dim() == 2 else 0,
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        y.stride(0), y.stride(2), y.stride(3), y.stride(1),
        res.stride(0), res.stride(2), res.stride(3), res.stride(1),
        PROLOGUE=scale is not None, PER_SAMPLE_BIAS=bias.dim() == 2, RESIDUAL=residual is not None,
        STATS=part is not None, GROUP_C=stats_c or 1, FAST_SILU=fast_silu and not _interpreting(),
        R=rows, WDP=wd, CP=min(cin & -cin, max(16, 4096 // wd)), BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )


def _tune(key: tuple, candidates: list[tuple], run) -> tuple:
    """The fastest config for ``key``, timed once per process (the first call; never while a CUDA graph
    is being captured, where the first valid config is used without timing)."""
    if key in _TUNED:
        return _TUNED[key]
    if len(candidates) == 1 or _interpreting() or not torch.cuda.is_available() \
            or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    from triton.testing import do_bench
    times = {}
    for cfg in candidates:
        try:
            times[cfg] = do_bench(lambda: run(cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config the compiler or the chip rejects (e.g. shared memory)
            continue
    if not times:
        raise RuntimeError(f"no Triton config ran for conv3x3 {key}")
    _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def conv3x3_fused(
    x: torch.Tensor,
    w_kc: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stats_groups: int | None = None,
    fast_silu: bool = True,
    config: tuple | None = None,
    band: bool = False,
    w_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv3x3(silu(x * scale + shift)) + bias (+ residual)`` with padding 1, output channels_last.

    x: (N, C, H, W), any strides (channels_last reads coalesced).  w_kc: the weight as (9 * C, O),
    row ``(kh * 3 + kw) * C + c`` (``weight_for_kernel``), x's dtype.  bias: (O,) or (N, O), float32, unit column
    stride (an (N, O) view of wider rows is read in place).
    scale/shift: (N, C) float32 or both None (no prologue).  residual: (N, O, H, W) or None.
    stats_groups: also return the output's GroupNorm statistics, (N, stats_groups, 2) [mean, var] in
    float32, else None.  fast_silu: sigmoid through one ``tanh.approx`` (GPU; error ~5e-4 of the
    activation, below bf16's rounding) instead of exp + division.  config: force one
    (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) instead of timing ``CONFIGS`` on the first call.
    band: the band kernel (each input row normalised once into a scratch slot, then the nine taps' products;
    ``config`` then has a sixth entry, programs per SM) where ``band_takes`` the shape, else the tile kernel.
    w_scale: (O,) float32 per-output-channel scale of quantised weights (``ddim.accel.fp8``: x and w_kc in e4m3, the
    products accumulate in float32 and are scaled in the epilogue); tile kernel only.  out_dtype: the output's
    dtype (default x's; bf16 for fp8 inputs).
    A ``torch.library`` custom op, so ``torch.compile`` and CUDA graphs take it as one opaque kernel.
    """
    if (scale is None) != (shift is None):
        raise ValueError("give both scale and shift (the GroupNorm prologue) or neither")
    y, stats = torch.ops.ddim.conv3x3_fused(x, w_kc, bias, scale, shift, residual, stats_groups or 0, fast_silu,
                                            list(config) if config else None, band, w_scale, out_dtype)
    return y, (stats if stats_groups else None)


def _out_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype or (torch.bfloat16 if x.dtype in FP8_DTYPES else x.dtype)


def _conv3x3_impl(x, w_kc, bias, scale, shift, residual, stats_groups, fast_silu, config, band=False, w_scale=None,
                  out_dtype=None):
    stats_groups = stats_groups or None
    nb, cin, h, wd = x.shape
    cout = w_kc.shape[1]
    if w_kc.shape[0] != 9 * cin:
        raise ValueError(f"w_kc must be (9 * C, O) = (9 * {cin}, O), got {tuple(w_kc.shape)}")
    fp8 = x.dtype in FP8_DTYPES
    if fp8 != (w_kc.dtype in FP8_DTYPES) or fp8 != (w_scale is not None):
        raise ValueError(f"e4m3 convolutions take x, w_kc in fp8 and a w_scale; got x {x.dtype}, w_kc {w_kc.dtype}, "
                         f"w_scale {'given' if w_scale is not None else 'None'}")
    if fp8 and (band or scale is not None):
        raise ValueError("fp8 inputs run the tile kernel without prologue: give band=False and no scale/shift")
    stats_c = None
    if stats_groups is not None:
        if cout % stats_groups:
            raise ValueError(f"stats_groups={stats_groups} must divide the {cout} output channels")
        stats_c = cout // stats_groups
        if stats_c & (stats_c - 1):
            raise ValueError(f"channels per group must be a power of two for the fused statistics, got {stats_c}")
    m = nb * h * wd
    if config and len(config) != (6 if band else 5):
        raise ValueError(f"config {tuple(config)} must have {6 if band else 5} entries for the "
                         f"{'band' if band else 'tile'} kernel")
    if band and not band_takes(h, wd, cin, cout):  # the tile kernel, with its own configurations
        band, config = False, None
    configs = (config,) if config else (BAND_CONFIGS if band else FP8_CONFIGS if fp8 else CONFIGS)
    cands = (_band_candidates(configs, h=h, wd=wd, cin=cin, cout=cout) if band else
             _candidates(configs, hw=h * wd, m=m, cin=cin, cout=cout, stats_c=stats_c, min_k=32 if fp8 else 16))
    if not cands and band:  # no band config fits (e.g. maps too small for a 16-pixel band): the tile kernel
        return _conv3x3_impl(x, w_kc, bias, scale, shift, residual, stats_groups or 0, fast_silu, None)
    if not cands:  # no tile holds whole groups of one sample (e.g. odd maps): statistics in a separate pass
        y, _ = _conv3x3_impl(x, w_kc, bias, scale, shift, residual, 0, fast_silu, config, w_scale=w_scale,
                             out_dtype=out_dtype)
        return y, group_stats(y, stats_groups)
    y = torch.empty((nb, cout, h, wd), device=x.device, dtype=_out_dtype(x, out_dtype),
                    memory_format=torch.channels_last)

    def part_for(cfg):  # per tile and group; the band kernel: per band and channel
        return None if stats_c is None else torch.empty((m // cfg[0], cout if band else stats_groups, 2),
                                                        device=x.device, dtype=torch.float32)

    key = (x.device.type, tuple(x.shape), cout, x.dtype, scale is not None, bias.dim(), residual is not None,
           stats_c, fast_silu, band, w_kc.stride(), y.dtype)
    launch = _launch_band if band else functools.partial(_launch, w_scale=w_scale)
    cfg = _tune(key, cands, lambda c: launch(c, x, w_kc, bias, scale, shift, residual, y, part_for(c),
                                             stats_c, fast_silu))
    part = part_for(cfg)
    launch(cfg, x, w_kc, bias, scale, shift, residual, y, part, stats_c, fast_silu)
    if part is None:
        return y, x.new_empty((nb, 0, 2), dtype=torch.float32)
    tiles = (h * wd) // cfg[0]
    if band:  # (bands, channels) -> (bands x channels of a group) per group: equal counts, pooled exactly
        part = part.view(nb, tiles, stats_groups, stats_c, 2).transpose(1, 2).reshape(nb, stats_groups, -1, 2)
        return y, _pool_stats(part.transpose(1, 2), cfg[0])
    return y, _pool_stats(part.view(nb, tiles, stats_groups, 2), cfg[0] * stats_c)


if triton is not None:
    @torch.library.custom_op("ddim::conv3x3_fused", mutates_args=())
    def _conv3x3_op(x: torch.Tensor, w_kc: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None,
                    shift: torch.Tensor | None, residual: torch.Tensor | None, stats_groups: int, fast_silu: bool,
                    config: list[int] | None, band: bool = False, w_scale: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return _conv3x3_impl(x, w_kc, bias, scale, shift, residual, stats_groups, fast_silu,
                             tuple(config) if config else None, band, w_scale, out_dtype)

    @_conv3x3_op.register_fake
    def _(x, w_kc, bias, scale, shift, residual, stats_groups, fast_silu, config, band=False, w_scale=None,
          out_dtype=None):
        nb, _, h, wd = x.shape
        y = torch.empty((nb, w_kc.shape[1], h, wd), device=x.device, dtype=_out_dtype(x, out_dtype),
                        memory_format=torch.channels_last)
        return y, x.new_empty((nb, stats_groups, 2), dtype=torch.float32)


def _pool_stats(part: torch.Tensor, count: int) -> torch.Tensor:
    """(N, T, G, 2) per-tile [mean, M2] over ``count`` values each -> (N, G, 2) [mean, var] (exact pooling)."""
    return torch.stack(pool_mean_var(part[..., 0], part[..., 1] / count, dim=1), dim=-1)


def weight_for_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (9 * C, O): the K-major layout the kernel streams."""
    o, c = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(9 * c, o).contiguous()


def group_norm_scale_shift(mean_var: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with its affine as a per-(sample, channel) ``x * scale + shift``, from (N, G, 2) [mean, var]."""
    nb, g = mean_var.shape[:2]
    c = norm.num_channels
    rstd = torch.rsqrt(mean_var[..., 1] + norm.eps)
    scale = rstd[:, :, None].expand(nb, g, c // g).reshape(nb, c)
    shift = (-mean_var[..., 0] * rstd)[:, :, None].expand(nb, g, c // g).reshape(nb, c)
    if norm.affine:
        w = norm.weight.float()
        scale, shift = scale * w, shift * w + norm.bias.float()
    return scale.contiguous(), shift.contiguous()


def group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, G, 2) [mean, var] of x's GroupNorm groups in float32 (``ddim.accel.inference.group_stats_by_channel``:
    per-channel statistics pooled exactly, coalesced on channels_last)."""
    return torch.stack(group_stats_by_channel(x, groups), dim=-1)


class FusedResnetBlock(ResnetBlock):
    """``ResnetBlock`` (inference only) with both convolutions from ``conv3x3_fused``: norm1+SiLU in conv1's
    prologue, the time embedding in its bias, norm2's statistics from its epilogue, norm2+SiLU in conv2's
    prologue and the shortcut in conv2's epilogue.  Same parameters and state-dict keys."""

    fast_silu: bool = True
    band: bool = False  # the band kernel (inputs normalised once per element) instead of the tile kernel
    min_width: int = 0  # narrower maps run cuDNN + the GroupNorm kernel (KernelResnetBlock): Triton's small tiles lose

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        require_inference(self)
        if x.shape[-1] < self.min_width:
            return KernelResnetBlock.forward(self, x, temb_act)
        scale1, shift1 = group_norm_scale_shift(group_stats(x, self.norm1.num_groups), self.norm1)
        h, stats2 = conv3x3_fused(x, self.conv1_kc, self.conv1_shift(temb_act), scale=scale1, shift=shift1,
                                  stats_groups=self.norm2.num_groups, fast_silu=self.fast_silu, band=self.band)
        scale2, shift2 = group_norm_scale_shift(stats2, self.norm2)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        out, _ = conv3x3_fused(h, self.conv2_kc, self.conv2.bias.float().contiguous(), scale=scale2, shift=shift2,
                               residual=skip, fast_silu=self.fast_silu, band=self.band)
        return out


def swap_resnet_blocks(model: nn.Module, fused: bool = True, *, band: bool = False, min_width: int = 0) -> nn.Module:
    """Make every ``ResnetBlock`` of ``model`` (in place) a ``FusedResnetBlock`` (or back).

    band: its convolutions by the band kernel (exact sigmoid: the prologue runs once per element);
    min_width: maps narrower than this run cuDNN and the GroupNorm kernel instead.

    The kernel-layout weights are non-persistent buffers made now (state dicts are unchanged): swap after
    loading weights and casting, on an inference copy (``prepare_for_inference`` makes one).
    """
    if fused and not available():
        raise RuntimeError("fused ResnetBlocks need Triton (shipped with the CUDA builds of torch)")
    for m in model.modules():
        if isinstance(m, ResnetBlock):
            if fused:
                m.__class__ = FusedResnetBlock
                m.band, m.min_width = band, min_width
                if band:
                    m.fast_silu = False
                m.register_buffer("conv1_kc", weight_for_kernel(m.conv1.weight.detach()), persistent=False)
                m.register_buffer("conv2_kc", weight_for_kernel(m.conv2.weight.detach()), persistent=False)
            else:
                m.__class__ = ResnetBlock
                for name in ("conv1_kc", "conv2_kc"):
                    m._buffers.pop(name, None)
    return model
