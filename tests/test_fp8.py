"""ddim.accel.fp8: e4m3 weights and activations in the ResnetBlocks' 3x3 convolutions, run on the CPU by Triton's
interpreter, against PyTorch on the same quantised values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import import_triton_kernels, load_script

fused = import_triton_kernels("ddim.accel.conv")
groupnorm = import_triton_kernels("ddim.accel.groupnorm")
fp8 = import_triton_kernels("ddim.accel.fp8")


def test_quantize_weight_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 0, 16)[:, None, None, None]  # channels of very different size
    w_kc, scale = fp8.quantize_weight(w)
    assert w_kc.dtype == fp8.E4M3 and w_kc.shape == (9 * 8, 16) and w_kc.stride() == (1, 9 * 8)  # K-contiguous
    # the layout of ddim.accel.conv.weight_for_kernel, the values within e4m3's rounding of each channel's scale
    ref = fused.weight_for_kernel(w)
    deq = w_kc.float() * scale
    assert (deq - ref).abs().le(torch.maximum(ref.abs() * 2 ** -4, scale * 2 ** -9)).all()
    assert torch.allclose(deq.abs().amax(0), ref.abs().amax(0), rtol=1e-6, atol=0)  # largest |w| of a channel: 448
    assert torch.allclose(fp8.dequantize_weight(w_kc, scale), w, rtol=2 ** -4, atol=1e-3 * 2 ** -9)
    with pytest.raises(ValueError, match=r"\(O, C, 3, 3\) weights, got shape \(16, 8, 1, 1\)"):
        fp8.quantize_weight(torch.randn(16, 8, 1, 1))


@pytest.mark.parametrize("n, c, o, h, per_sample_bias, residual, config", [
    (2, 32, 32, 8, True, True, (32, 32, 32, 4, 2)),   # tiles inside one sample, everything in the epilogue
    (3, 32, 16, 6, False, False, (16, 16, 32, 4, 2)),  # 6x6 maps: tiles straddle samples
    (2, 64, 48, 4, False, True, None),                 # the tuned list, clamped; O not a power of two
])
def test_fp8_convolution_matches_torch_on_the_quantised_values(n, c, o, h, per_sample_bias, residual, config):
    torch.manual_seed(0)
    x = (torch.randn(n, c, h, h) * 2).to(fp8.E4M3).contiguous(memory_format=torch.channels_last)
    w_kc, scale = fp8.quantize_weight(torch.randn(o, c, 3, 3) * c ** -0.5)
    bias = torch.randn(n, o) if per_sample_bias else torch.randn(o)
    skip = torch.randn(n, o, h, h) if residual else None
    y, stats = fused.conv3x3_fused(x, w_kc, bias, residual=skip, w_scale=scale, out_dtype=torch.float32,
                                   config=config)
    ref = F.conv2d(x.float(), fp8.dequantize_weight(w_kc, scale), None, padding=1)
    ref = ref + (bias[:, :, None, None] if per_sample_bias else bias[None, :, None, None])
    if residual:
        ref = ref + skip
    assert stats is None and y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5), (y - ref).abs().max()
    # bf16 by default for e4m3 inputs
    assert fused.conv3x3_fused(x, w_kc, bias, residual=skip, w_scale=scale, config=config)[0].dtype == torch.bfloat16


def test_group_norm_silu_writes_saturated_e4m3():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
        norm.bias[:4] = 1000.0  # four channels past e4m3's largest value: saturated, not inf/NaN
    assert groupnorm.kernel_takes(x, 8)
    y = groupnorm.group_norm_silu(x, norm, out_dtype=fp8.E4M3)
    assert y.dtype == fp8.E4M3 and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.silu(F.group_norm(x, 8, norm.weight, norm.bias, norm.eps)).clamp(-448, 448)
    assert y[:, :4].float().eq(448).all()
    # e4m3 rounding of the float32 result (the kernel's and torch's float32 differ in the last bits)
    assert (y.float() - ref).abs().le(ref.abs() * 2 ** -4 + 2 ** -9).all()
    # the PyTorch formula (where the kernel does not take the input) saturates the same way
    fallback = groupnorm.group_norm_silu(x.contiguous(), norm, out_dtype=fp8.E4M3)
    assert fallback.dtype == fp8.E4M3 and fallback[:, :4].float().eq(448).all()
    assert (fallback.float() - ref).abs().le(ref.abs() * 2 ** -4 + 2 ** -9).all()


def _quantised_reference(block, x, temb_act):
    """What an Fp8ResnetBlock computes, in PyTorch: GroupNorm+SiLU rounded to e4m3, the dequantised weights."""
    def conv(a, name):
        w = fp8.dequantize_weight(getattr(block, f"{name}_q"), getattr(block, f"{name}_s"))
        return F.conv2d(a, w, getattr(block, name).bias.float(), padding=1)

    def act(v, norm):
        return F.silu(norm(v)).clamp(-448, 448).to(fp8.E4M3).float()

    h = conv(act(x, block.norm1), "conv1") + block.temb_proj(temb_act)[:, :, None, None]
    skip = x if block.nin_shortcut is None else block.nin_shortcut(x)
    return skip + conv(act(h, block.norm2), "conv2")


def test_fp8_resnet_blocks_give_the_quantised_unets_output_with_the_same_keys():
    from ddim.accel import inference as perf
    from ddim.models import UNet
    from ddim.models.unet import ResnetBlock

    torch.manual_seed(0)
    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
                 in_channels=3, resolution=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(0.5, 0.3)
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
        ref = model(x, t)
        fast = perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fp8=True)
        blocks = [m for m in fast.modules() if isinstance(m, ResnetBlock)]
        assert len(blocks) == 8 and all(isinstance(m, fp8.Fp8ResnetBlock) for m in blocks)
        assert fast.model.state_dict().keys() == model.state_dict().keys()  # the quantised weights are not saved
        calls = []
        hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args, out))) for m in blocks]
        got = fast(x, t)
        for h in hooks:
            h.remove()
        # each block computes what the quantised block computes in PyTorch, on the inputs it had in the network.  An
        # e4m3 rounding may flip where the kernel's float32 GroupNorm differs from torch's in the last bit: one step
        # (6 %) of one activation, which moves the outputs of a 5x5 neighbourhood by ~1e-3 and perturbs later
        # roundings (through the network such flips spread, hence blocks, not outputs, are compared).  So: most
        # outputs equal to float32 rounding, none far off (a wrong bias, time embedding or shortcut moves all).
        assert len(calls) == 8
        for block, args, out in calls:
            d = (out - _quantised_reference(block, *args)).abs().flatten()
            scale = out.abs().max()
            assert d.median() < 1e-6 * scale and d.max() < 2e-3 * scale, (block.in_channels, d.median(), d.max())
        # and e4m3 moves the output against fp32 by more than bf16 would, but not by much
        rel = ((got - ref).abs().mean() / ref.abs().mean()).item()
        assert 1e-3 < rel < 5e-2, rel
        # merge=True: conv1's shift a view of the merged rows, read in place by the e4m3 convolution's epilogue
        merged = perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fp8=True, merge=True)
        d = (merged(x, t) - got).abs().flatten()
        assert d.median() < 1e-6 * got.abs().max() and d.max() < 2e-3 * got.abs().max(), (d.median(), d.max())
        with pytest.raises(ValueError, match=r"fp8=True and fused=True both replace"):
            perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fp8=True, fused=True)
    # min_width: the blocks on 8-wide maps keep bf16 (cuDNN, the GroupNorm kernel), the 16-wide ones run e4m3
    widths = []
    real = fused._conv3x3_impl
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(fused, "_conv3x3_impl", lambda x, *a, **k: (widths.append(x.shape[-1]), real(x, *a, **k))[1])
        narrow = perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fp8=True,
                                            fp8_min_width=16)
        narrow(x, t)
    assert sorted(set(widths)) == [16] and len(widths) == 2 * 3  # 3 of the 8 blocks on 16x16 maps, 2 convs each
    # max_width: the other way round, only the blocks on 8-wide maps in e4m3
    widths.clear()
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(fused, "_conv3x3_impl", lambda x, *a, **k: (widths.append(x.shape[-1]), real(x, *a, **k))[1])
        perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fp8=True,
                                   fp8_max_width=8)(x, t)
    assert sorted(set(widths)) == [8] and len(widths) == 2 * 5
    fp8.swap_fp8_resnet_blocks(fast.model, on=False)
    assert not any(isinstance(m, fp8.Fp8ResnetBlock) for m in fast.modules())
    assert not any(k.endswith(("_q", "_s")) for k, _ in fast.model.named_buffers())


def test_fp8_convolution_refuses_mixed_inputs():
    x = torch.randn(1, 32, 4, 4).to(fp8.E4M3)
    w_kc, scale = fp8.quantize_weight(torch.randn(16, 32, 3, 3))
    with pytest.raises(ValueError, match=r"x, w_kc in fp8 and a w_scale; got x torch.float32, w_kc "
                                         r"torch.float8_e4m3fn, w_scale given"):
        fused.conv3x3_fused(x.float(), w_kc, torch.zeros(16), w_scale=scale)
    with pytest.raises(ValueError, match="w_scale None"):
        fused.conv3x3_fused(x, w_kc, torch.zeros(16))
    with pytest.raises(ValueError, match="band=False and no scale/shift"):
        fused.conv3x3_fused(x, w_kc, torch.zeros(16), w_scale=scale, band=True)


@pytest.mark.parametrize("kw, match", [(dict(min_width=-1), r"min_width must be .* got -1"),
                                       (dict(max_width=8.0), r"max_width must be .* got 8.0"),
                                       (dict(min_width=16, max_width=8), r"max_width=8 is below min_width=16")])
def test_fp8_swap_refuses_bad_widths_and_leaves_the_model(kw, match):
    from ddim.models import UNet

    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 in_channels=3, resolution=16).eval()
    with pytest.raises(ValueError, match=match):
        fp8.swap_fp8_resnet_blocks(model, **kw)
    assert not any(isinstance(m, fp8.Fp8ResnetBlock) for m in model.modules())


def test_kernels_compile_to_e4m3_instructions_for_sm90():
    """Compiled ahead of time for sm_90 (no GPU needed): the convolution multiplies e4m3 by e4m3 on the matrix
    units (wgmma ...e4m3.e4m3, not an upcast to bf16), and the GroupNorm kernel writes e4m3 with the saturating
    conversion."""
    from test_groupnorm import _sm90_stdout

    out = _sm90_stdout(
        "from ddim.accel import conv as fused, groupnorm as gnk\n"
        "conv = ptx(fused._conv3x3_kernel, {'X': '*fp8e4nv', 'W': '*fp8e4nv', 'WS': '*fp32', 'BIAS': '*fp32',\n"
        "           'SCALE': '*fp32', 'SHIFT': '*fp32', 'RES': '*bf16', 'Y': '*bf16', 'PART': '*fp32'},\n"
        "           dict(PROLOGUE=False, PER_SAMPLE_BIAS=True, RESIDUAL=True, STATS=False, GROUP_C=1, SAMPLE_TILES=True,\n"
        "                FAST_SILU=False, W_SCALED=True, EVEN_K=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128), 4)\n"
        "print('MMA', sorted(set(re.findall(r'wgmma\\.mma_async[\\w.]*', conv))))\n"
        "cbe, cb, cg, pb = gnk._blocks(128, 32, 32 * 32)\n"
        "gn = ptx(gnk._group_norm_kernel, {'X': '*bf16', 'ADD': '*fp32', 'W': '*fp32', 'B': '*fp32', 'OUT': '*fp8e4nv',\n"
        "         'eps': 'fp32'}, dict(CBE=cbe, CB=cb, CG=cg, NG=cbe // cg, PB=pb, EVEN=True, HAS_ADD=False, SILU=True,\n"
        "         ONE_PASS=pb >= 1024, SAT=448.0, ROUND_E4M3=False), gnk._warps(cb, pb))\n"
        "print('CVT', sorted(set(re.findall(r'cvt\\.[\\w.]*e4m3[\\w.]*', gn))))\n")
    mma = out.split("MMA ")[1].splitlines()[0]
    assert "e4m3.e4m3" in mma and "bf16" not in mma, out
    assert "cvt.rn.satfinite.e4m3x2.f32" in out.split("CVT ")[1], out


def test_fid_precision_benchmark_runs_tiny_cpu(tmp_path):
    """bench/fid_precision.py: fp32, bf16 and fp8 samples of one model from the same x_T, the differences counted
    against fp32's (FID itself: tests/test_fid.py; Inception on a CPU is too slow for three variants here)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "f.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}

    def fid_precision(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "bench" / "fid_precision.py"), "--tiny", "--device", "cpu",
                               "--no-fid", *args], env=env, capture_output=True, text=True, timeout=600)

    proc = fid_precision("--grids", str(tmp_path), "--json", str(out), "--fp8-min-widths", "99",
                         "--fp8-max-widths", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["S"]) for r in rows] == [("fp32", 2), ("bf16", 2), ("fp8", 2), ("fp8-w99", 2),
                                                      ("fp8-max4", 2)]
    assert "u8_mean_abs_vs_fp32" not in rows[0]
    # e4m3 moves the samples, by more than the bf16 path does; with no map 99 wide (or 4 narrow), fp8-w99 (fp8-max4)
    # runs no block in e4m3
    assert 0 < rows[1]["u8_mean_abs_vs_fp32"] < rows[2]["u8_mean_abs_vs_fp32"]
    assert rows[3]["u8_mean_abs_vs_fp32"] < rows[2]["u8_mean_abs_vs_fp32"] / 2
    assert rows[4]["u8_mean_abs_vs_fp32"] == rows[3]["u8_mean_abs_vs_fp32"]
    assert all(0 < r["u8_changed_vs_fp32"] <= 1 for r in rows[1:])
    assert all(r["contrast"] > 0 and r["detail"] > 0 for r in rows)
    assert sorted(p.name for p in tmp_path.glob("*_S2.png")) == ["bf16_S2.png", "fp32_S2.png", "fp8-max4_S2.png",
                                                                  "fp8-w99_S2.png", "fp8_S2.png"]
    # one variant alone (a cell the full run did not reach): the same images, no fp32 to compare against
    only = fid_precision("--grids", str(tmp_path / "only"), "--json", str(out), "--fp8-max-widths", "4",
                         "--variants", "fp8-max4")
    assert only.returncode == 0, only.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "fp8-max4" and "u8_mean_abs_vs_fp32" not in row
    assert (tmp_path / "only" / "fp8-max4_S2.png").read_bytes() == (tmp_path / "fp8-max4_S2.png").read_bytes()
    bad = fid_precision("--variants", "fp8-max16")
    assert bad.returncode == 2 and "--variants 'fp8-max16': allowed ['fp32', 'fp32-xT-bf16', 'bf16', 'fp8']" in bad.stderr


def test_fid_precision_image_stats_measure_contrast_and_detail():
    bench = load_script("bench/fid_precision.py")
    flat = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    assert bench.image_stats(flat) == {"contrast": 0.0, "detail": 0.0}
    stripes = flat.clone()
    stripes[..., ::2] = 0  # vertical stripes 0 / 100: every horizontal neighbour differs by 100, no vertical one
    stats = bench.image_stats(stripes)
    assert stats["detail"] == pytest.approx(50.0)
    assert stats["contrast"] == pytest.approx(torch.tensor([0.0, 100.0]).repeat(96).std().item())
    # a blur lowers both
    blurred = torch.nn.functional.avg_pool2d(stripes.float(), 3, 1, 1, count_include_pad=False).round().to(torch.uint8)
    assert all(v < stats[k] for k, v in bench.image_stats(blurred).items())


def test_supported_devices(monkeypatch):
    """FP8 needs e4m3 matrix units (CUDA compute capability 8.9+) or, for tests, Triton's interpreter on the CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fp8.supported("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not fp8.supported("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, ok in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8.supported("cuda") is ok, capability


def test_deterministic_blocks_use_fixed_configurations(monkeypatch):
    """Timed configurations may differ between processes, and with them the float32 sums: deterministic inference
    (prepare_for_inference's default) gives every convolution fixed_config's configuration instead."""
    from ddim.accel import inference as perf
    from ddim.models import UNet

    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 in_channels=3, resolution=8).eval()
    seen = []
    real = fp8.conv3x3_fused
    monkeypatch.setattr(fp8, "conv3x3_fused", lambda x, *a, **k: (seen.append((x.shape[-1], k["config"])),
                                                                 real(x, *a, **k))[1])
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with torch.no_grad():
        for deterministic in (True, False):
            perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fp8=True,
                                       deterministic=deterministic)(x, t)
    fixed, tuned = seen[:len(seen) // 2], seen[len(seen) // 2:]
    assert {w for w, _ in fixed} == {8, 4}  # both rules: 64 pixels, and 16
    assert all(cfg == fp8.fixed_config(w * w) for w, cfg in fixed)
    assert fp8.fixed_config(16) != fp8.fixed_config(64)
    assert all(cfg is None for _, cfg in tuned)


def test_fp8_error_bench_separates_activation_and_weight_rounding():
    """bench/fp8_error.py's per-layer errors: zero where e4m3 holds the values exactly, the activation error where
    only the activations round, and a power-of-two scale rescuing activations that sit in the subnormal range."""
    bench = load_script("bench/fp8_error.py")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():  # every output channel's largest |w| is 1 (scale 1/448): +-1, +-0.5 are exact in e4m3
        conv.weight.copy_(torch.randint(0, 2, conv.weight.shape) - 0.5)
        conv.weight[:, 0, 0, 0] = 1.0
    exact = torch.tensor([0.25, -0.5, 1.0, 2.0])[torch.randint(0, 4, (2, 8, 6, 6))]
    e = bench.conv_errors(exact, conv)
    assert e["act"] == e["w"] == e["both"] == 0.0 and e["gain"] == 1.0 and e["subnormal"] == 0.0
    rough = torch.randn(2, 8, 6, 6)
    e = bench.conv_errors(rough, conv)
    assert e["w"] == 0.0 and 0.005 < e["act"] == e["both"] < 0.1  # rounding to 3 mantissa bits: a few per cent
    tiny = rough * 1e-3  # almost all below 2^-6: e4m3 keeps ~0-2 bits of them, unless scaled up first
    e = bench.conv_errors(tiny, conv)
    assert e["subnormal"] > 0.9 and e["act"] > 0.2 and e["both_pow2"] < e["act"] / 5
    assert bench.to_e4m3(torch.tensor([500.0, -1e4, 3.1])).tolist() == [448.0, -448.0, 3.0]  # saturated, as the kernel


def test_fp8_error_bench_runs_tiny_cpu(tmp_path):
    import json

    bench = load_script("bench/fp8_error.py")
    record = bench.main(["--tiny", "--device", "cpu", "--images", "4", "--timesteps", "10,900",
                         "--json", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["by_width"] == record["by_width"]
    assert len(record["rows"]) == 2 * 2 * 8  # 2 timesteps x 2 convolutions x 8 ResnetBlocks
    assert [(r["width"], r["convs"]) for r in record["by_width"]] == [(16, 6), (8, 10)]
    for r in record["by_width"]:  # random weights: both roundings matter, together more than either
        assert 0.005 < r["act"] < r["both"] < 0.1 and 0.005 < r["w"] < r["both"]
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--device", "cpu", "--timesteps", "5,1000"])
