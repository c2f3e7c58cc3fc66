"""ddim.accel's Triton kernels against PyTorch, compiled on a GPU where there is one, else run on the CPU by Triton's
interpreter: the GroupNorm(+SiLU) kernel and its inference blocks, the e4m3 convolution and the fp8 ResnetBlocks;
and, compiled ahead of time for sm_90 (no GPU needed), the instructions they must use there."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import KERNEL_DEVICE, child_env, import_triton_kernels

gnk = import_triton_kernels("ddim.accel.groupnorm")
conv = import_triton_kernels("ddim.accel.conv")
fp8 = import_triton_kernels("ddim.accel.fp8")

from ddim.accel import layers  # noqa: E402
from ddim.models import UNet  # noqa: E402
from ddim.models.unet import AttnBlock, ResnetBlock  # noqa: E402


@pytest.fixture(autouse=True)
def on_kernel_device():
    """Every tensor and module a test makes is on KERNEL_DEVICE; PyTorch's reference convolutions there in full
    float32 (cuDNN's default is TF32 on a GPU; matmuls are float32 by default)."""
    with torch.device(KERNEL_DEVICE), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def _gn(c: int, groups: int = 32) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    return norm


def _unet(**kw) -> UNet:
    cfg = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, in_channels=3,
               resolution=8, resamp_with_conv=True)
    cfg.update(kw)
    torch.manual_seed(0)
    model = UNet(**cfg).eval()
    with torch.no_grad():  # trained-looking norms and biases, not the initial ones and zeros
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    return model


@pytest.fixture
def launches(monkeypatch):
    """Counts GroupNorm kernel launches, so a test cannot pass on the PyTorch formula alone."""
    calls = []
    launch = gnk._launch

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return launch(*args)

    monkeypatch.setattr(gnk, "_launch", counting)
    return calls


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid on masked-off rows
@pytest.mark.parametrize("shape, groups, offset, with_add, silu", [
    ((2, 128, 8, 8), 32, 0.0, True, True),    # one 64-pixel chunk, 4 channels per group, two channel blocks
    ((1, 64, 9, 9), 32, 0.0, False, True),    # 81 pixels: one masked chunk of 128
    ((1, 64, 48, 48), 32, 0.0, True, True),   # 2,304 pixels: too many for one pass, 9 full chunks of 256 merged
    ((2, 32, 5, 7), 8, 1e4, True, False),     # mean 10^4 x the spread: the statistics must not cancel; no SiLU
    ((2, 384, 4, 4), 32, 0.0, True, True),    # 12 per group: 4 groups = 48 channels per program on 64 lanes
])
def test_kernel_matches_torch_group_norm(shape, groups, offset, with_add, silu, launches):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + offset).contiguous(memory_format=torch.channels_last)
    add = torch.randn(shape[:2]) if with_add else None
    norm = _gn(shape[1], groups)
    assert gnk.kernel_takes(x, groups)
    got = gnk.group_norm_silu(x, norm, add=add, silu=silu)
    with torch.no_grad():  # float64: torch's float32 CPU GroupNorm itself cancels at the 10^4 offset
        ref = copy.deepcopy(norm).double()(x.double() + (add.double()[:, :, None, None] if with_add else 0))
        ref = (F.silu(ref) if silu else ref).float()
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == x.dtype
    assert launches == [shape]
    # at the offset, x itself is only known to float32's 1e-3 there
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=3e-3 if offset else 1e-5)


def test_shapes_the_kernel_does_not_take_use_the_same_formula(launches):
    """A group wider than 128 channels, and NCHW activations: PyTorch's ops, the same result."""
    torch.manual_seed(0)
    norm = _gn(256, groups=1)
    x = torch.randn(2, 256, 4, 4).contiguous(memory_format=torch.channels_last)
    assert not gnk.kernel_takes(x, 1)
    assert not gnk.kernel_takes(torch.randn(2, 128, 4, 4), 32)  # NCHW
    add = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(gnk.group_norm_silu(x, norm, add=add), F.silu(norm(x + add[:, :, None, None])))
    assert launches == []


def test_blocks_fill_a_tile_of_whole_groups():
    """(channels, lanes, channels per group, pixels per chunk) and warps per site: power-of-two groups take the
    whole slab in one pass (16 channels at 32x32 on 8 warps, 32 at 16x16, 64 below, on 4); other groups walk tiles
    of 32 channels x 256 pixels above 16x16, 64 x 128 up to it, twice.  Groups never split; groups wider than 128
    channels are not taken."""
    def rule(c, groups, hw):
        b = gnk._blocks(c, groups, hw)
        return b, gnk._warps(b[1], b[3]), "one pass" if b[3] >= hw else "two passes"
    assert rule(128, 32, 32 * 32) == ((16, 16, 4, 1024), 8, "one pass")
    assert rule(512, 32, 16 * 16) == ((32, 32, 16, 256), 4, "one pass")
    assert rule(256, 32, 8 * 8) == ((64, 64, 8, 64), 4, "one pass")
    assert rule(384, 32, 32 * 32) == ((24, 32, 12, 256), 4, "two passes")  # 12 per group
    assert rule(384, 32, 16 * 16) == ((48, 64, 12, 128), 4, "two passes")
    assert rule(128, 32, 64 * 64) == ((32, 32, 4, 256), 4, "two passes")  # a slab of 16 channels is 65,536
    assert gnk._blocks(256, 2, 8 * 8) == (128, 128, 128, 64)  # one 128-channel group per program
    assert gnk._blocks(512, 2, 8 * 8) is None and gnk._blocks(100, 32, 64) is None


def test_bad_arguments_are_named():
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"add must be \(N, C\) = \(2, 64\), got \(64,\)"):
        gnk.group_norm_silu(x, _gn(64), add=torch.randn(64))
    with pytest.raises(ValueError, match="affine=False"):
        gnk.group_norm_silu(x, nn.GroupNorm(32, 64, affine=False))
    with pytest.raises(ValueError, match=r"got shape \(2, 64, 16\)"):
        gnk.group_norm_silu(torch.randn(2, 64, 16), _gn(64))


def test_unet_with_kernel_blocks_matches_the_original_and_refuses_training(launches):
    """Every ResnetBlock and attention norm through the kernel (eval, fp32): the same ε as the original U-Net, the
    same Parameters and state-dict keys; in train mode, or with gradients on, the blocks raise."""
    model = _unet()
    fast = gnk.use_group_norm_kernel(layers.to_channels_last(copy.deepcopy(model)))
    blocks = [m for m in fast.modules() if isinstance(m, gnk.KernelResnetBlock)]
    assert len(blocks) == 8 and not any(isinstance(m, ResnetBlock) for m in fast.modules())
    assert all(isinstance(m.norm, gnk.KernelGroupNorm) for m in fast.modules() if isinstance(m, AttnBlock))
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert blocks[0].conv1.weight is fast.down[0].block[0].conv1.weight
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        ref, got = model(x, t), fast(x, t)
    assert len(launches) == 2 * 8 + 4  # 2 norms x 8 ResnetBlocks + 4 attention norms
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    msg = r"KernelResnetBlock is for inference \(eval mode, no gradients\): its kernels have no backward"
    with pytest.raises(RuntimeError, match=msg):
        fast(x, t)  # gradients on for trainable parameters
    with pytest.raises(RuntimeError, match=msg), torch.no_grad():
        fast.train()(x, t)


def test_group_norm_silu_writes_saturated_e4m3():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    norm = _gn(32, groups=8)
    with torch.no_grad():
        norm.bias[:4] = 1000.0  # four channels past e4m3's largest value: saturated, not inf/NaN
    assert gnk.kernel_takes(x, 8)
    y = gnk.group_norm_silu(x, norm, out_dtype=fp8.E4M3)
    assert y.dtype == fp8.E4M3 and y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = F.silu(F.group_norm(x, 8, norm.weight, norm.bias, norm.eps)).clamp(-448, 448)
    assert y[:, :4].float().eq(448).all()
    # e4m3 rounding of the float32 result (the kernel's and torch's float32 differ in the last bits)
    assert (y.float() - ref).abs().le(ref.abs() * 2 ** -4 + 2 ** -9).all()
    # the PyTorch formula (where the kernel does not take the input) saturates the same way
    fallback = gnk.group_norm_silu(x.contiguous(), norm, out_dtype=fp8.E4M3)
    assert fallback.dtype == fp8.E4M3 and fallback[:, :4].float().eq(448).all()
    assert (fallback.float() - ref).abs().le(ref.abs() * 2 ** -4 + 2 ** -9).all()


def test_quantize_weight_per_output_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 0, 16)[:, None, None, None]  # channels of very different size
    w_kc, scale = fp8.quantize_weight(w)
    assert w_kc.dtype == fp8.E4M3 and w_kc.shape == (9 * 8, 16) and w_kc.stride() == (1, 9 * 8)  # K-contiguous
    ref = w.permute(2, 3, 1, 0).reshape(9 * 8, 16)  # row (kh * 3 + kw) * C + c
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
def test_e4m3_convolution_matches_torch_on_the_quantised_values(n, c, o, h, per_sample_bias, residual, config):
    torch.manual_seed(0)
    x = (torch.randn(n, c, h, h) * 2).to(fp8.E4M3).contiguous(memory_format=torch.channels_last)
    w_kc, scale = fp8.quantize_weight(torch.randn(o, c, 3, 3) * c ** -0.5)
    bias = torch.randn(n, o) if per_sample_bias else torch.randn(o)
    skip = torch.randn(n, o, h, h) if residual else None
    y = conv.conv3x3_e4m3(x, w_kc, scale, bias, residual=skip, out_dtype=torch.float32, config=config)
    ref = F.conv2d(x.float(), fp8.dequantize_weight(w_kc, scale), None, padding=1)
    ref = ref + (bias[:, :, None, None] if per_sample_bias else bias[None, :, None, None])
    if residual:
        ref = ref + skip
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5), (y - ref).abs().max()
    assert conv.conv3x3_e4m3(x, w_kc, scale, bias, residual=skip, config=config).dtype == torch.bfloat16  # default


def test_e4m3_convolution_refuses_other_inputs():
    x = torch.randn(1, 32, 4, 4).to(fp8.E4M3)
    w_kc, scale = fp8.quantize_weight(torch.randn(16, 32, 3, 3))
    with pytest.raises(ValueError, match=r"x and w_kc in torch.float8_e4m3fn; got x torch.float32"):
        conv.conv3x3_e4m3(x.float(), w_kc, scale, torch.zeros(16))
    with pytest.raises(ValueError, match=r"w_scale \(O,\); got \(288, 16\) and \(8,\)"):
        conv.conv3x3_e4m3(x, w_kc, scale[:8], torch.zeros(16))


def _quantised_reference(block, x, temb_act):
    """What an Fp8ResnetBlock computes, in PyTorch: GroupNorm+SiLU rounded to e4m3, the dequantised weights."""
    def conv3(a, name):
        w = fp8.dequantize_weight(getattr(block, f"{name}_q"), getattr(block, f"{name}_s"))
        return F.conv2d(a, w, getattr(block, name).bias.float(), padding=1)

    def act(v, norm):
        return F.silu(norm(v)).clamp(-448, 448).to(fp8.E4M3).float()

    h = conv3(act(x, block.norm1), "conv1") + block.temb_proj(temb_act)[:, :, None, None]
    skip = x if block.nin_shortcut is None else block.nin_shortcut(x)
    return skip + conv3(act(h, block.norm2), "conv2")


def test_fp8_blocks_compute_the_quantised_block_on_maps_up_to_max_width(monkeypatch):
    """Each Fp8ResnetBlock (in a U-Net, on the inputs it has there) computes what the quantised block computes in
    PyTorch, with fixed_config's configurations; blocks on wider maps are the bf16 blocks (no e4m3 convolution)."""
    model = _unet(resolution=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(0.5, 0.3)
    fast = fp8.use_fp8_resnet_blocks(copy.deepcopy(model), max_width=4)
    blocks = [m for m in fast.modules() if isinstance(m, fp8.Fp8ResnetBlock)]
    assert len(blocks) == 8 and fast.state_dict().keys() == model.state_dict().keys()  # quantised: not saved
    convs = []
    real = fp8.conv3x3_e4m3
    monkeypatch.setattr(fp8, "conv3x3_e4m3", lambda x, *a, **k: convs.append((x.shape[-1], k["config"])) or
                        real(x, *a, **k))
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args, out))) for m in blocks]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        fast(x, t)
        # An e4m3 rounding may flip where the kernel's float32 GroupNorm differs from torch's in the last bit: one
        # step (6 %) of one activation moves a 3x3 neighbourhood by ~1e-3.  So: most outputs equal to float32
        # rounding, none far off (a wrong bias, time embedding or shortcut moves all).
        for block, args, out in calls:
            if args[0].shape[-1] > 4:
                continue
            d = (out - _quantised_reference(block, *args)).abs().flatten()
            scale = out.abs().max()
            assert d.median() < 1e-6 * scale and d.max() < 2e-3 * scale, (block.in_channels, d.median(), d.max())
    for h in hooks:
        h.remove()
    assert sum(args[0].shape[-1] == 4 for _, args, _ in calls) == 5  # 5 of the 8 blocks on 4x4 maps
    assert len(convs) == 2 * 5 and all(w == 4 and cfg == fp8.fixed_config(16) for w, cfg in convs)
    assert fp8.fixed_config(16) != fp8.fixed_config(64)
    with pytest.raises(ValueError, match=r"max_width must be a map width in pixels, a positive int, got 0"):
        fp8.use_fp8_resnet_blocks(copy.deepcopy(model), max_width=0)


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


# compiles a Triton kernel ahead of time for sm_90 (H100/H200) and returns its PTX (no GPU needed); pointers and the
# ``divisible`` integer arguments are declared multiples of 16, as Triton's launcher specialises them on a GPU
SM90_PTX = ("import inspect, re, triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from triton.compiler import ASTSource\n"
            "def ptx(fn, types, consts, warps, stages=3, divisible=()):\n"
            "    names = list(inspect.signature(fn.fn).parameters)\n"
            "    sig = {n: types.get(n, 'i32' if n not in consts else 'constexpr') for n in names}\n"
            "    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},\n"
            "                    attrs={(i,): [['tt.divisibility', 16]] for i, n in enumerate(names)\n"
            "                           if sig[n][0] == '*' or n in divisible})\n"
            "    return triton.compile(src, target=GPUTarget('cuda', 90, 32),\n"
            "                          options={'num_warps': warps, 'num_stages': stages}).asm['ptx']\n")


def test_kernels_compile_to_the_intended_sm90_instructions():
    """For sm_90: the convolution multiplies e4m3 by e4m3 on the matrix units (wgmma ...e4m3.e4m3, not an upcast to
    bf16); the GroupNorm kernel writes e4m3 with the saturating conversion, and keeps its arithmetic in float32 although
    Inductor hands it eps as fp64 (uncast, every normalised element and its SiLU would be computed in fp64) with its
    activation loads vectorised."""
    code = SM90_PTX + (
        "from ddim.accel import conv, groupnorm as gnk\n"
        "mm = ptx(conv._conv3x3_kernel, {'X': '*fp8e4nv', 'W': '*fp8e4nv', 'WS': '*fp32', 'BIAS': '*fp32',\n"
        "         'RES': '*bf16', 'Y': '*bf16'}, dict(PER_SAMPLE_BIAS=True, RESIDUAL=True, EVEN_K=True, BLOCK_M=128,\n"
        "         BLOCK_N=128, BLOCK_K=128), 4)\n"
        "print('MMA', sorted(set(re.findall(r'wgmma\\.mma_async[\\w.]*', mm))))\n"
        "cbe, cb, cg, pb = gnk._blocks(128, 32, 32 * 32)  # the first norms of the CIFAR-10 U-Net\n"
        "gn = ptx(gnk._group_norm_kernel, {'X': '*bf16', 'ADD': '*fp32', 'W': '*fp32', 'B': '*fp32', 'OUT': '*fp8e4nv',\n"
        "         'eps': 'fp64'}, dict(CBE=cbe, CB=cb, CG=cg, NG=cbe // cg, PB=pb, EVEN=True, HAS_ADD=True, SILU=True,\n"
        "         ONE_PASS=pb >= 1024, SAT=448.0, ROUND_E4M3=False), gnk._warps(cb, pb), divisible=('HW', 'C'))\n"
        "print('CVT', sorted(set(re.findall(r'cvt\\.[\\w.]*e4m3[\\w.]*', gn))))\n"
        "print('F64', sorted(set(re.findall(r'\\b(?:add|sub|mul|fma|div|sqrt|rcp|rsqrt|ex2|neg|max|min)\\.[\\w.]*f64', gn))))\n"
        "print('V4', len(re.findall(r'ld\\.global(?:\\.\\w+)*\\.v4', gn)))\n")
    env = child_env(TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing: cannot compile for sm_90 here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    mma = out.split("MMA ")[1].splitlines()[0]
    assert "e4m3.e4m3" in mma and "bf16" not in mma, out
    assert "cvt.rn.satfinite.e4m3x2.f32" in out.split("CVT ")[1].splitlines()[0], out
    assert "F64 []" in out, out  # no double-precision arithmetic
    assert int(out.split("V4 ")[1].split()[0]) >= 8, out  # full tiles: the activation loads are vectorised
