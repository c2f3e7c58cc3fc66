"""ddim.accel: the layers in PyTorch against the U-Net's own, the training swaps, and the inference presets (eager, on
the GPU where there is one, else on the CPU with their Triton kernels under Triton's interpreter; the kernels
themselves: tests/test_accel_kernels.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import KERNEL_DEVICE

from ddim import accel
from ddim.accel import groupnorm, layers
from ddim.models import UNet
from ddim.models import unet as unet_module


def _unet(**kw) -> UNet:
    cfg = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
               in_channels=3, resolution=16, resamp_with_conv=True)
    cfg.update(kw)
    torch.manual_seed(0)
    model = UNet(**cfg)
    with torch.no_grad():  # trained-looking norms and biases, not the initial ones and zeros
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.2)
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1, 0.2)
    return model


def test_the_unet_holds_no_fast_path_hooks():
    model = _unet()
    block = model.down[0].block[0]
    assert not any(hasattr(block, name) for name in ("shift_cols", "conv1_shift"))
    assert not hasattr(model, "block_shifts") and not hasattr(model.mid.attn_1, "qkv_weight_bias")
    assert not hasattr(unet_module, "require_inference")


@pytest.mark.parametrize("affine", [True, False])
def test_channel_stat_group_norm_equals_group_norm(affine):
    """Statistics pooled from channels give GroupNorm's output and gradients, also for data with a large offset
    (the pooled variance has no E[x^2] - E[x]^2 cancellation); the module shares the original's Parameters."""
    torch.manual_seed(0)
    ref = nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    new = layers.ChannelStatGroupNorm.from_norm(ref)
    assert new.weight is ref.weight and new.bias is ref.bias and new.state_dict().keys() == ref.state_dict().keys()
    # reference in float64; float32 torch GroupNorm itself loses the digits at an offset 1e4 x the spread
    x = (torch.randn(3, 32, 7, 5) * 0.01 + 100.0).double().to(memory_format=torch.channels_last)
    x64, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y_ref, y_new = copy.deepcopy(ref).double()(x64), new(x32)
    assert torch.allclose(y_new.double(), y_ref, atol=2e-3, rtol=0), (y_new - y_ref).abs().max()
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_new.backward(g.float())
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-2 * x64.grad.abs().max().item())
    # ordinary data: the same output and gradients as float32 nn.GroupNorm
    xo = (torch.randn(3, 32, 7, 5) * 3 + 1).requires_grad_()
    xn = xo.detach().clone().requires_grad_()
    yo, yn = ref(xo), new(xn)
    assert torch.allclose(yn, yo, atol=1e-5)
    go = torch.randn_like(yo)
    yo.backward(go)
    yn.backward(go)
    assert torch.allclose(xn.grad, xo.grad, atol=1e-5)
    # bf16 input: float32 statistics, the output in the input's dtype
    xb = torch.randn(2, 32, 4, 4).bfloat16()
    assert new(xb).dtype == torch.bfloat16
    assert torch.allclose(new(xb).float(), ref(xb.float()), atol=3e-2)


@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (1, 3, 1, 1), (3, 8, 5, 3)])
def test_upsample_conv_by_phases_equals_nearest_then_conv(shape):
    """The four-phase 2x2 convolution on the low-resolution input is conv3x3(nearest 2x upsample): in float64 to
    rounding, with and without bias, odd sizes and 1x1 inputs (all border), gradients (the stacked interleave),
    without autograd (the strided one), and the input's layout kept."""
    torch.manual_seed(0)
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, c, 3, 3, dtype=torch.float64, requires_grad=True)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        for bias in (torch.randn(7, dtype=torch.float64), None):
            ref = F.conv2d(F.interpolate(xi, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
            got = layers.upsample_conv3x3_by_phases(xi, weight, bias)
            assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12, rtol=0)
            with torch.no_grad():
                assert torch.allclose(layers.upsample_conv3x3_by_phases(xi, weight, bias), ref, atol=1e-12, rtol=0)
        g = torch.randn_like(ref)
        grads_ref = torch.autograd.grad(ref, (x, weight), g)
        grads_got = torch.autograd.grad(layers.upsample_conv3x3_by_phases(xi, weight, None), (x, weight), g)
        assert all(torch.allclose(a, r, atol=1e-10) for a, r in zip(grads_got, grads_ref))
        cl = torch.channels_last
        assert got.is_contiguous(memory_format=cl) == xi.is_contiguous(memory_format=cl)


@pytest.mark.parametrize("cin, cout, shape", [(3, 128, (2, 9, 7)), (128, 3, (2, 9, 7)), (2, 19, (1, 1, 1)),
                                              (37, 4, (3, 5, 2))])
def test_thin_conv_as_matmul_equals_conv2d(cin, cout, shape):
    """Both forms of ``conv3x3_as_matmul`` (3x3 patches for few inputs, shifted per-tap partials for few outputs) are
    ``F.conv2d(padding=1)`` in float64 to rounding: borders, 1x1 images, with and without bias, gradients, and the
    channels_last layout of the result; layers that are not thin are refused."""
    torch.manual_seed(0)
    b, h, w = shape
    x = torch.randn(b, cin, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(cout, cin, 3, 3, dtype=torch.float64, requires_grad=True)
    for bias in (torch.randn(cout, dtype=torch.float64), None):
        ref = F.conv2d(x, weight, bias, padding=1)
        got = layers.conv3x3_as_matmul(x, weight, bias)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, weight), g)
    grads_got = torch.autograd.grad(layers.conv3x3_as_matmul(x, weight, None), (x, weight), g)
    assert all(torch.allclose(a, r, atol=1e-10) for a, r in zip(grads_got, grads_ref))
    cl = layers.conv3x3_as_matmul(x.detach().contiguous(memory_format=torch.channels_last), weight, None)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="16 -> 16 channels"):
        layers.conv3x3_as_matmul(torch.randn(1, 16, 4, 4), torch.randn(16, 16, 3, 3), None)
    with pytest.raises(ValueError, match="MatmulConv2d takes a thin 3x3 convolution"):
        layers.MatmulConv2d(nn.Conv2d(16, 16, 3, padding=1))


def test_channels_last_keeps_the_gradient_layout_contract():
    """Every gradient arrives with its parameter's strides (DDP otherwise copies it into the bucket each step): the
    attention projections, used as matrices, stay in the contiguous layout; the convolutions go channels_last."""
    model = layers.to_channels_last(_unet(resolution=8, attn_resolutions=(4,)))
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    model(x, torch.randint(0, 1000, (2,))).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []
    convs = [p for n, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] == 3]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)


def test_prepare_for_training_keeps_parameters_keys_outputs_and_gradients():
    model = _unet(resolution=8, attn_resolutions=(4,)).train()
    ref = copy.deepcopy(model)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert accel.prepare_for_training(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert list(model.state_dict()) == keys and model.training
    kinds = {type(m) for m in model.modules()}
    assert {layers.ChannelStatGroupNorm, layers.PhaseUpsample} <= kinds and nn.GroupNorm not in kinds
    assert unet_module.Upsample not in kinds and layers.MatmulConv2d not in kinds  # thin convs: inference only
    assert all(m.training for m in model.modules())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    y_ref = ref(x, t)
    y = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    accel.prepare_for_training(model)  # again: nothing left to replace
    assert all(a is b for a, b in zip(model.parameters(), params))


def _state(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()], model.training)


@pytest.mark.parametrize("preset", ["bf16", "fp8"])
def test_presets_give_the_models_eps_and_leave_it_alone(preset):
    """Eager (compile=False, on the GPU where there is one), each preset's copy computes the fp32 model's ε to bf16
    (e4m3) precision, keeps its state-dict keys, and the caller's model keeps its weights, modules and mode."""
    if preset == "fp8" and not accel.fp8_supported(KERNEL_DEVICE):
        pytest.skip(f"the fp8 preset needs a GPU with FP8 matrix units or, on the CPU, Triton's interpreter "
                    f"(tests/conftest.py sets TRITON_INTERPRET=1); here: {KERNEL_DEVICE}")
    model = _unet(resolution=8, attn_resolutions=(4,)).to(KERNEL_DEVICE).train()
    before = _state(model)
    fast = accel.prepare_for_inference(model, preset, compile=False)
    x, t = torch.randn(2, 3, 8, 8, device=KERNEL_DEVICE), torch.tensor([3, 900], device=KERNEL_DEVICE)
    with torch.no_grad():
        ref, got = model.eval()(x, t), fast(x, t)
    model.train()
    after = _state(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]
    assert got.dtype == torch.float32 and got.is_contiguous()
    rel = ((got - ref).abs().mean() / ref.abs().mean()).item()
    assert 0 < rel < (0.15 if preset == "fp8" else 0.02), rel  # e4m3: 3 mantissa bits, bf16: 7
    inner = fast.model
    assert inner.state_dict().keys() == model.state_dict().keys() and not inner.training
    assert not any(p.requires_grad for p in inner.parameters())
    assert [n for n, m in inner.named_modules() if isinstance(m, layers.MatmulConv2d)] == ["conv_in", "conv_out"]
    assert {type(m) for m in inner.modules()} >= {layers.PhaseUpsample, layers.ChannelStatGroupNorm}
    dtypes = {p.dtype for n, p in inner.named_parameters() if "norm" not in n}
    assert dtypes == {torch.bfloat16} and {p.dtype for n, p in inner.named_parameters() if "norm" in n} == {torch.float32}
    blocks = [m for m in inner.modules() if isinstance(m, groupnorm.KernelResnetBlock)]
    if preset == "fp8":
        from ddim.accel import fp8

        assert len(blocks) == 8 and all(isinstance(b, fp8.Fp8ResnetBlock) and b.max_width == 16 for b in blocks)
        assert not any(b.tuned for b in blocks)
        tuned = accel.prepare_for_inference(model, preset, compile=False, deterministic=False)
        assert all(b.tuned for b in tuned.modules() if isinstance(b, fp8.Fp8ResnetBlock))
    elif groupnorm.available():
        assert len(blocks) == 8 and all(type(b) is groupnorm.KernelResnetBlock for b in blocks)
        assert all(isinstance(m.norm, groupnorm.KernelGroupNorm) for m in inner.modules()
                   if isinstance(m, unet_module.AttnBlock))


def test_bad_preset_and_devices_without_fp8_are_refused(monkeypatch):
    model = _unet()
    with pytest.raises(ValueError, match=r"preset must be one of bf16, fp8, got 'fp16'"):
        accel.prepare_for_inference(model, "fp16")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"preset 'fp8' needs a CUDA GPU with FP8 .* the model is on cpu"):
        accel.prepare_for_inference(model, "fp8")
    assert accel.INFERENCE_PRESETS == ("bf16", "fp8")


def test_compiled_presets_use_the_deterministic_options_and_cuda_graphs_for_fp8(monkeypatch):
    """Deterministic: Inductor's deterministic mode, fp8's CUDA graphs spelled out as their options (torch.compile
    takes a mode or options); else the default tuned compile, fp8 in mode reduce-overhead.  Weights on the CPU:
    not compiled unless asked."""
    import torch._inductor as inductor

    if not groupnorm.available():
        pytest.skip("the fp8 preset needs Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    model = _unet(resolution=8, attn_resolutions=())
    assert isinstance(accel.prepare_for_inference(model), layers.Bf16EpsModel) and seen == []
    for preset in ("bf16", "fp8"):
        for deterministic in (True, False):
            accel.prepare_for_inference(model, preset, deterministic=deterministic, compile=True)
    graphs = {**inductor.list_mode_options("reduce-overhead"), "deterministic": True}
    assert graphs["triton.cudagraphs"] is True
    assert seen == [{"dynamic": False, "options": {"deterministic": True}}, {"dynamic": False, "mode": None},
                    {"dynamic": False, "options": graphs}, {"dynamic": False, "mode": "reduce-overhead"}]


def test_replace_modules_sets_replacements_on_their_parents_and_keeps_the_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2))).eval()
    inner = model[1][1]
    n = layers.replace_modules(model, lambda m: isinstance(m, nn.Linear), lambda m: nn.Sequential(m))
    assert n == 2 and isinstance(model[0], nn.Sequential) and model[1][1][0] is inner
    assert not model[1][1].training
