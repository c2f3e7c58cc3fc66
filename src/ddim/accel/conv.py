"""The 3x3 convolution on e4m3 activations and weights (Triton), for ``ddim.accel.fp8``'s ResnetBlocks.

One implicit-GEMM kernel (NHWC, 3x3, stride 1, padding 1): e4m3 times e4m3 into float32 on the matrix units, then
in its epilogue the per-output-channel weight scales, the bias (per channel, or per sample and channel: the time
embedding folds in) and an optional residual, stored in bf16 (or float32).  cuDNN takes neither e4m3 convolutions
nor a per-sample bias.  Triton's interpreter (``TRITON_INTERPRET=1``) runs it on the CPU for the tests.
"""
from __future__ import annotations

import os

import torch

try:  # the CUDA builds of torch ship Triton; CPU-only installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without Triton
    triton = None

__all__ = ["available", "FP8_CONFIGS", "conv3x3_e4m3"]

E4M3 = torch.float8_e4m3fn


def available() -> bool:
    """Triton is importable (GPU runs need CUDA; the interpreter runs on the CPU)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _conv3x3_kernel(
        X, W, WS, BIAS, RES, Y,
        M, H, WD, CIN, COUT, sbn,
        swk, swn,
        sxn, sxh, sxw, sxc,
        syn, syh, syw, syc,
        srn, srh, srw, src,
        PER_SAMPLE_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
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
            acc = tl.dot(a, w, acc)

        mask = m_ok[:, None] & n_ok[None, :]
        acc *= tl.load(WS + offs_n, mask=n_ok, other=0.0)[None, :]  # w = w_q * scale per output channel
        if PER_SAMPLE_BIAS:
            acc += tl.load(BIAS + n[:, None] * sbn + offs_n[None, :], mask=mask, other=0.0)
        else:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0)[None, :]
        if RESIDUAL:
            r_ptrs = RES + (n * srn + oh * srh + ow * srw)[:, None] + (offs_n * src)[None, :]
            acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        out = acc.to(Y.dtype.element_ty)
        tl.store(Y + (n * syn + oh * syh + ow * syw)[:, None] + (offs_n * syc)[None, :], out, mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried per shape on the first call when no config is given;
# 128-byte K slices of e4m3
FP8_CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 128, 128, 4, 3), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4),
    (128, 128, 64, 4, 4),
)
_TUNED: dict[tuple, tuple[int, int, int, int, int]] = {}


def _candidates(configs, *, m: int, cin: int, cout: int) -> list[tuple]:
    """``configs`` with the blocks clamped to the problem (small maps, few channels; K at least the e4m3 matrix
    instruction's 32), deduplicated."""
    out = []
    for bm, bn, bk, warps, stages in configs:
        bm = max(16, min(bm, triton.next_power_of_2(m)))
        bn = max(16, min(bn, triton.next_power_of_2(cout)))
        bk = max(32, min(bk, triton.next_power_of_2(cin)))
        if (bm, bn, bk, warps, stages) not in out:
            out.append((bm, bn, bk, warps, stages))
    return out


def _launch(cfg, x, w_kc, w_scale, bias, residual, y) -> None:
    bm, bn, bk, warps, stages = cfg
    nb, cin, h, wd = x.shape
    cout = y.shape[1]
    m = nb * h * wd
    res = residual if residual is not None else y
    grid = (triton.cdiv(cout, bn), triton.cdiv(m, bm))
    _conv3x3_kernel[grid](
        x, w_kc, w_scale, bias, res, y,
        m, h, wd, cin, cout, bias.stride(0) if bias.dim() == 2 else 0,
        w_kc.stride(0), w_kc.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(1),
        y.stride(0), y.stride(2), y.stride(3), y.stride(1),
        res.stride(0), res.stride(2), res.stride(3), res.stride(1),
        PER_SAMPLE_BIAS=bias.dim() == 2, RESIDUAL=residual is not None, EVEN_K=cin % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
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
        raise RuntimeError(f"no Triton config ran for conv3x3_e4m3 {key}")
    _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def conv3x3_e4m3(x: torch.Tensor, w_kc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, *,
                 residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """``conv3x3(x, w_kc * w_scale) + bias (+ residual)`` with padding 1, the output channels_last.

    x: (N, C, H, W) e4m3, any strides (channels_last reads coalesced).  w_kc: the e4m3 weight as (9 * C, O), row
    ``(kh * 3 + kw) * C + c`` (``ddim.accel.fp8.quantize_weight``); w_scale: (O,) float32 per-output-channel scale.
    bias: (O,) or (N, O) float32 with unit column stride.  residual: (N, O, H, W) or None.  out_dtype: default bf16.
    config: one (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) (clamped to the problem) instead of timing
    ``FP8_CONFIGS`` on the first call of each shape; a fixed config fixes the order of the float32 sums.
    A ``torch.library`` custom op, so ``torch.compile`` and CUDA graphs take it as one opaque kernel.
    """
    return torch.ops.ddim.conv3x3_e4m3(x, w_kc, w_scale, bias, residual, list(config) if config else None,
                                       out_dtype or torch.bfloat16)


def _conv3x3_impl(x, w_kc, w_scale, bias, residual, config, out_dtype):
    nb, cin, h, wd = x.shape
    cout = w_kc.shape[1]
    if x.dtype != E4M3 or w_kc.dtype != E4M3:
        raise ValueError(f"conv3x3_e4m3 takes x and w_kc in {E4M3}; got x {x.dtype}, w_kc {w_kc.dtype}")
    if w_kc.shape[0] != 9 * cin or w_scale.shape != (cout,):
        raise ValueError(f"w_kc must be (9 * C, O) = (9 * {cin}, O) and w_scale (O,); got {tuple(w_kc.shape)} and "
                         f"{tuple(w_scale.shape)}")
    if config is not None and len(config) != 5:
        raise ValueError(f"config must be (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), got {tuple(config)}")
    cands = _candidates((tuple(config),) if config else FP8_CONFIGS, m=nb * h * wd, cin=cin, cout=cout)
    y = torch.empty((nb, cout, h, wd), device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    key = (x.device.type, tuple(x.shape), cout, bias.dim(), residual is not None, w_kc.stride(), y.dtype)
    cfg = _tune(key, cands, lambda c: _launch(c, x, w_kc, w_scale, bias, residual, y))
    _launch(cfg, x, w_kc, w_scale, bias, residual, y)
    return y


if triton is not None:
    @torch.library.custom_op("ddim::conv3x3_e4m3", mutates_args=())
    def _conv3x3_op(x: torch.Tensor, w_kc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
                    residual: torch.Tensor | None, config: list[int] | None, out_dtype: torch.dtype) -> torch.Tensor:
        return _conv3x3_impl(x, w_kc, w_scale, bias, residual, config, out_dtype)

    @_conv3x3_op.register_fake
    def _(x, w_kc, w_scale, bias, residual, config, out_dtype):
        nb, _, h, wd = x.shape
        return torch.empty((nb, w_kc.shape[1], h, wd), device=x.device, dtype=out_dtype,
                           memory_format=torch.channels_last)
