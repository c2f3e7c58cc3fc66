"""ddim.accel.conv: the Triton 3x3 convolution with GroupNorm+SiLU prologue and statistics epilogue, run on the CPU
by Triton's interpreter (float32; its bf16 matrix product is broken), against plain PyTorch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, import_triton_kernels

fused = import_triton_kernels("ddim.accel.conv")


def _gn(c: int, groups: int) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    return norm


@pytest.mark.parametrize("n, c, o, h, prologue, per_sample_bias, residual, groups, config, band", [
    (2, 16, 32, 8, False, False, False, None, (32, 32, 16, 4, 2), False),  # plain convolution + bias
    (2, 16, 32, 8, True, True, True, 8, (32, 32, 16, 4, 2), False),       # everything, tiles inside one sample
    (3, 8, 16, 6, True, False, False, 4, (16, 16, 16, 4, 2), False),      # 6x6 maps: tiles straddle samples
    (2, 24, 16, 4, True, False, True, 4, None, False),                     # C not a multiple of the block; tuned list
    # the band kernel: GroupNorm+SiLU once per input element into a zero-bordered slot, the nine taps from there
    (2, 16, 32, 8, True, True, True, 8, (16, 16, 16, 4, 2, 1), True),     # 2-row bands, 8 on 3 programs: slots reused
    (3, 32, 16, 4, True, False, False, 4, None, True),                     # tuned list clamped to 4x4 (a band a sample)
    (2, 48, 32, 8, True, False, True, None, (64, 16, 16, 4, 2, 1), True),  # C = 3 x 16: channel chunks
])
def test_conv3x3_fused_matches_torch(n, c, o, h, prologue, per_sample_bias, residual, groups, config, band):
    torch.manual_seed(0)
    x = (torch.randn(n, c, h, h) * 2 + 0.5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(o, c, 3, 3) * c ** -0.5
    # a per-sample bias as a view of wider rows, as ResnetBlock.conv1_shift gives it with merged projections
    bias = torch.randn(n, o + 5)[:, 2:o + 2] if per_sample_bias else torch.randn(o)
    skip = torch.randn(n, o, h, h) if residual else None
    norm = _gn(c, 4)
    kw = {}
    act = x
    if prologue:
        kw["scale"], kw["shift"] = fused.group_norm_scale_shift(fused.group_stats(x, 4), norm)
        act = F.silu(norm(x))
    launched = []
    real = fused._launch_band

    def spy(cfg, *args):
        launched.append(cfg)
        return real(cfg, *args)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_launch_band", spy)
        ref = F.conv2d(act, w, padding=1) + (bias[:, :, None, None] if per_sample_bias else bias[None, :, None, None])
        if residual:
            ref = ref + skip
        y, stats = fused.conv3x3_fused(x, fused.weight_for_kernel(w), bias, residual=skip, stats_groups=groups,
                                       config=config, band=band, fast_silu=not band, **kw)
    assert bool(launched) == band, "the band kernel ran where it should not, or did not run"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
    if groups is None:
        assert stats is None
    else:  # the next GroupNorm's statistics, as torch computes them
        r = ref.reshape(n, groups, -1)
        assert torch.allclose(stats[..., 0], r.mean(-1), atol=1e-5)
        assert torch.allclose(stats[..., 1], r.var(-1, unbiased=False), atol=1e-4, rtol=1e-4)


def test_band_kernel_leaves_shapes_it_does_not_take_to_the_tile_kernel():
    x, w = torch.randn(1, 8, 6, 6), torch.randn(16, 8, 3, 3)  # width 6: not a power of two
    assert not fused.band_takes(6, 6, 8, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "_launch_band", lambda *a: pytest.fail("band kernel launched for a 6-wide map"))
        y, _ = fused.conv3x3_fused(x, fused.weight_for_kernel(w), torch.zeros(16), band=True)
    assert torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-4)


def test_fused_resnet_blocks_give_the_unets_output_with_the_same_keys():
    from ddim.accel import inference as perf
    from ddim.models import UNet
    from ddim.models.unet import ResnetBlock

    torch.manual_seed(0)
    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1,
                 in_channels=3, resolution=16).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial GroupNorm affines and biases, not the init's 1 and 0
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(0.5, 0.3)
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
        ref = model(x, t)
        fast = perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fused=True)
        blocks = [m for m in fast.modules() if isinstance(m, ResnetBlock)]
        assert blocks and all(isinstance(m, fused.FusedResnetBlock) for m in blocks)
        assert fast.model.state_dict().keys() == model.state_dict().keys()  # kernel layouts are not persistent
        assert torch.allclose(fast(x, t), ref, atol=1e-4), (fast(x, t) - ref).abs().max()
        # the band kernel on the 16-wide maps, cuDNN + the GroupNorm kernel on the 8-wide ones (min_width)
        band = perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fused="band")
        widths = []
        real = fused._launch_band
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused, "_launch_band", lambda cfg, x, *a: (widths.append(x.shape[-1]), real(cfg, x, *a)))
            assert torch.allclose(band(x, t), ref, atol=1e-4), (band(x, t) - ref).abs().max()
        assert widths and set(widths) == {16}
        for kind in (True, "band"):  # conv1's shift a view of the merged rows (merge=True), read in place
            merged = perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fused=kind,
                                                merge=True)
            assert torch.allclose(merged(x, t), ref, atol=1e-4), (kind, (merged(x, t) - ref).abs().max())
        with pytest.raises(ValueError, match=r"fused='tiles' is not supported; allowed: False, True, 'band'"):
            perf.prepare_for_inference(model, dtype="fp32", autocast=False, compile=False, fused="tiles")
    # back to the plain class, buffers gone
    fused.swap_resnet_blocks(fast.model, fused=False)
    assert not any(isinstance(m, fused.FusedResnetBlock) for m in fast.modules())
    assert not any("_kc" in k for k, _ in fast.model.named_buffers())


def test_fused_paths_reject_what_they_cannot_do():
    from ddim.accel import inference as perf
    from ddim.models import UNet

    model = UNet(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8)
    blocks = fused.swap_resnet_blocks(UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8))
    with pytest.raises(RuntimeError, match="for inference"):  # train mode: no backward, no dropout
        blocks(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="autocast=False"):
        perf.prepare_for_inference(model, dtype="bf16", compile=False, fused=True)
    x, w = torch.randn(1, 8, 4, 4), torch.randn(9 * 8, 16)
    with pytest.raises(ValueError, match="both scale and shift"):
        fused.conv3x3_fused(x, w, torch.zeros(16), scale=torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"stats_groups=3 must divide the 16"):
        fused.conv3x3_fused(x, w, torch.zeros(16), stats_groups=3)
    with pytest.raises(ValueError, match=r"\(9 \* C, O\) = \(9 \* 8, O\)"):
        fused.conv3x3_fused(x, w[:9], torch.zeros(16))
    with pytest.raises(ValueError, match=r"config \(16, 16, 16, 4, 2\) must have 6 entries for the band kernel"):
        fused.conv3x3_fused(x, w, torch.zeros(16), config=(16, 16, 16, 4, 2), band=True)


def test_fused_conv_benchmark_runs_one_layer(tmp_path):
    out = tmp_path / "f.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, str(REPO / "bench" / "fused_conv.py"), "--tiny", "--device", "cpu",
                    "--max-layers", "1", "--json", str(out)], check=True, env=env, cwd=REPO, timeout=300)
    import json

    rec = json.loads(out.read_text())
    row = rec["rows"][0]
    assert (row["cin"], row["cout"], row["hw"]) == (32, 32, 16)
    assert row["fused_max_abs_err"] < 1e-4 and row["fused+stats_ms"] > 0 and row["cudnn_ms"] > 0
    assert row["band_max_abs_err"] < 1e-4 and row["band+stats_ms"] > 0 and row["cudnn+kgn_ms"] > 0
