"""ddim.accel.groupnorm: GroupNorm(+SiLU) as one Triton kernel per sample, run on the CPU by Triton's interpreter
(float32) against torch's GroupNorm, and the U-Net with its blocks swapped against the original."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, import_triton_kernels

gnk = import_triton_kernels("ddim.accel.groupnorm")


def _gn(c: int, groups: int = 32) -> torch.nn.GroupNorm:
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    return norm


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter as on a GPU machine (Triton compiles instead of interpreting), no GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


# in a _fresh_python code string: ptx(kernel, argument types, constexprs, warps) compiles a Triton kernel ahead of
# time for sm_90 (H100/H200) and returns its PTX (no GPU needed); pointers and the ``divisible`` integer arguments
# are declared multiples of 16, as Triton's launcher specialises them on a GPU
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

def _sm90_stdout(code: str) -> str:
    """Run ``SM90_PTX + code`` in a fresh interpreter; its stdout (skips where Triton's ptxas is missing)."""
    proc = _fresh_python(SM90_PTX + code)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing: cannot compile for sm_90 here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# lets Triton lower a kernel (to TTIR and PTX) for an H100/H200 target on a machine without one
SM90_TARGET = ("import triton\n"
               "from triton.backends.compiler import GPUTarget\n"
               "class Target:\n"
               "    def get_current_target(self):\n"
               "        return GPUTarget('cuda', 90, 32)\n"
               "triton.runtime.driver.set_active(Target())\n")


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches, so a test cannot pass on the PyTorch fallback alone."""
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
    ((1, 64, 20, 20), 32, 0.0, True, True),   # 400 pixels: 32 lanes, the whole slab in one masked pass of 512
    ((1, 64, 48, 48), 32, 0.0, True, True),   # 2,304 pixels: too many for one pass, 9 full chunks of 256 merged
    ((1, 384, 17, 17), 32, 0.0, False, True),  # 289 pixels, 12 per group: 2 groups = 24 channels on 32 lanes
    ((3, 256, 4, 4), 32, 0.0, True, False),   # 8 channels per group, chunk larger than the map; no SiLU
    ((2, 32, 5, 7), 8, 1e4, True, True),      # mean 10^4 x the spread: the statistics must not cancel
    ((2, 384, 4, 4), 32, 0.0, True, True),    # 12 per group: 4 groups = 48 channels per program on 64 lanes
    ((1, 192, 3, 3), 32, 0.0, False, True),   # 6 per group: 8 groups = 48 channels on 64 lanes
])
def test_kernel_matches_torch_group_norm(shape, groups, offset, with_add, silu, launches):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 2 + offset).contiguous(memory_format=torch.channels_last)
    add = torch.randn(shape[:2]) if with_add else None
    norm = _gn(shape[1], groups)
    assert gnk.kernel_takes(x, groups)
    got = gnk.group_norm_silu(x, norm, add=add, silu=silu)
    with torch.no_grad():  # float64: torch's float32 CPU GroupNorm itself cancels at the 10^4 offset (error ~7,000)
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
    """(channels, lanes, channels per group, pixels per chunk) and warps, the fastest per site on an H200: power-of-two
    groups take the whole slab in one pass (16 channels at 32x32 on 8 warps, 32 at 16x16, 64 below, on 4); other
    groups walk tiles of 32 channels x 256 pixels above 16x16, 64 x 128 up to it, twice.  Groups never split; groups
    wider than 128 channels are not taken."""
    def rule(c, groups, hw):
        b = gnk._blocks(c, groups, hw)
        return b, gnk._warps(b[1], b[3]), "one pass" if b[3] >= hw else "two passes"
    assert rule(128, 32, 32 * 32) == ((16, 16, 4, 1024), 8, "one pass")
    assert rule(512, 32, 16 * 16) == ((32, 32, 16, 256), 4, "one pass")
    assert rule(256, 32, 8 * 8) == ((64, 64, 8, 64), 4, "one pass")
    assert rule(384, 32, 32 * 32) == ((24, 32, 12, 256), 4, "two passes")  # 12 per group
    assert rule(384, 32, 16 * 16) == ((48, 64, 12, 128), 4, "two passes")
    assert rule(128, 32, 64 * 64) == ((32, 32, 4, 256), 4, "two passes")  # a slab of 16 channels is 65,536
    assert rule(1024, 32, 32 * 32) == ((32, 32, 32, 256), 4, "two passes")
    assert gnk._blocks(256, 2, 8 * 8) == (128, 128, 128, 64)  # one 128-channel group per program
    assert gnk._blocks(512, 2, 8 * 8) is None and gnk._blocks(100, 32, 64) is None


def test_kernel_blocks_refuse_training():
    """The kernel has no backward and no dropout: a KernelResnetBlock in train mode, or with gradients on, raises
    with its name; in eval mode under no_grad it runs."""
    from ddim.models import UNet

    model = UNet(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, in_channels=3,
                 resolution=8, resamp_with_conv=True)
    gnk.swap_kernel_group_norm(model)
    x, t = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.tensor([5])
    msg = r"KernelResnetBlock is for inference \(eval mode, no gradients\): its kernels have no backward"
    with pytest.raises(RuntimeError, match=msg):
        model.train()(x, t)
    with pytest.raises(RuntimeError, match=msg):
        model.eval()(x, t)  # gradients on for trainable parameters
    with torch.no_grad():
        assert model.eval()(x, t).shape == (1, 3, 8, 8)


def test_bad_arguments_are_named():
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"add must be \(N, C\) = \(2, 64\), got \(64,\)"):
        gnk.group_norm_silu(x, _gn(64), add=torch.randn(64))
    with pytest.raises(ValueError, match="affine=False"):
        gnk.group_norm_silu(x, torch.nn.GroupNorm(32, 64, affine=False))
    with pytest.raises(ValueError, match=r"got shape \(2, 64, 16\)"):
        gnk.group_norm_silu(torch.randn(2, 64, 16), _gn(64))


def _unet():
    from ddim.models import UNet

    torch.manual_seed(0)
    model = UNet(ch=64, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
                 in_channels=3, resolution=8, resamp_with_conv=True).eval()
    with torch.no_grad():  # trained-looking norms and biases, not the initial ones and zeros
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    return model


def test_unet_with_kernel_blocks_matches_the_original(launches):
    """Every ResnetBlock and attention norm through the kernel (eval, fp32): the same ε as the original U-Net."""
    from ddim.accel import inference as perf
    from ddim.models.unet import ResnetBlock

    model = _unet()
    fast = gnk.swap_kernel_group_norm(perf.to_channels_last(perf.swap_group_norm(copy.deepcopy(model))))
    assert all(type(m) is gnk.KernelResnetBlock for m in fast.modules() if isinstance(m, ResnetBlock))
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        ref, got = model(x, t), fast(x, t)
    assert len(launches) == 2 * 8 + 4  # 2 norms x 8 ResnetBlocks (two of 192 channels) + 4 attention norms
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    gnk.swap_kernel_group_norm(fast, on=False)
    assert not any(isinstance(m, (gnk.KernelResnetBlock, gnk.KernelGroupNorm)) for m in fast.modules())
    fast.train()
    with pytest.raises(RuntimeError, match="inference"):
        gnk.swap_kernel_group_norm(fast)(x, t)


def _count_ops(fn, names):
    """How often each aten op of ``names`` ran during ``fn()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = dict.fromkeys(names, 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in counts:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


def test_merged_projections_give_the_same_eps_with_fewer_products(monkeypatch):
    """merge=True: one matrix product for every ResnetBlock's time embedding, q/k/v concatenated once, each block's
    shift handed to the GroupNorm kernel as a view of the merged rows (read in place, not copied): the same ε."""
    from ddim.accel import inference as perf
    from ddim.models.unet import AttnBlock, ResnetBlock

    model = _unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    plain = perf.prepare_for_inference(model, dtype="fp32", group_norm="kernel", compile=False)
    merged = perf.prepare_for_inference(model, dtype="fp32", group_norm="kernel", compile=False, merge=True)
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    n_attn = sum(isinstance(m, AttnBlock) for m in model.modules())
    widths = sum(b.out_channels for b in blocks)
    adds = []
    launch = gnk._launch
    with torch.no_grad():
        ref, want = model(x, t), plain(x, t)
        with monkeypatch.context() as mp:
            mp.setattr(gnk, "_launch", lambda x, add, *a: (adds.append(add), launch(x, add, *a))[1])
            got = merged(x, t)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ops = ("mm", "addmm", "cat")
        n_plain, n_merged = _count_ops(lambda: plain(x, t), ops), _count_ops(lambda: merged(x, t), ops)
    shifts = [a for a in adds if a is not None]
    assert len(shifts) == len(blocks) and all(a.stride() == (widths, 1) for a in shifts)
    assert n_merged["mm"] + n_merged["addmm"] == n_plain["mm"] + n_plain["addmm"] - (len(blocks) - 1)
    assert n_merged["cat"] == n_plain["cat"] - 2 * n_attn
    assert merged.model.state_dict().keys() == model.state_dict().keys()  # the merged weights are not saved
    with pytest.raises(ValueError, match=r"'down.0.block.0' is a plain ResnetBlock"):
        perf.merge_projections(copy.deepcopy(model))
    assert not perf.can_merge_projections(model) and perf.can_merge_projections(merged.model)
    with pytest.raises(ValueError, match=r"takes a model with a UNet, got Linear"):
        perf.merge_projections(torch.nn.Linear(2, 2))


def test_prepare_for_inference_group_norm_kernel(launches):
    """prepare_for_inference(group_norm="kernel") gives the original ε; a wrong group_norm names the allowed ones.
    (Compiled, the interpreter's kernels cannot be traced: the next test traces the op, a GPU test in
    test_bench.py runs it compiled.)"""
    from ddim.accel import inference as perf

    model = _unet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    fast = perf.prepare_for_inference(model, dtype="fp32", group_norm="kernel", compile=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), model(x, t), rtol=1e-4, atol=1e-4)
    assert launches
    with pytest.raises(ValueError, match=r"group_norm 'triton' is not supported; allowed: \['torch', "
                                         r"'channel-stats', 'kernel'\]"):
        perf.prepare_for_inference(model, group_norm="triton", compile=False)


def test_the_op_traces_into_a_graph_for_inductor():
    """Without the interpreter (a fresh process, as on a GPU), torch.compile's tracing records the kernel launch in
    the graph Inductor compiles (and launches from its own code) instead of running it.  (With kernel_takes
    forced: CPU tensors take the PyTorch formula.)"""
    code = (
        "import torch\n"
        "from torch._dynamo.backends.common import aot_autograd\n"
        "from ddim.accel import groupnorm as gnk\n"
        "gnk.kernel_takes = lambda x, groups: True\n"
        "norm = torch.nn.GroupNorm(32, 384)\n"
        "x = torch.randn(2, 384, 4, 4).contiguous(memory_format=torch.channels_last)\n"
        "seen = []\n"
        "def fw(gm, example_inputs):\n"
        "    seen.append(gm.code)\n"
        "    raise RuntimeError('traced; no GPU to run it')\n"
        "f = torch.compile(lambda x, a: gnk.group_norm_silu(x, norm, add=a), backend=aot_autograd(fw_compiler=fw))\n"
        "try:\n"
        "    with torch.no_grad():\n"
        "        f(x, torch.randn(2, 384))\n"
        "except Exception:\n"
        "    pass\n"
        "print(seen[0])\n")
    proc = _fresh_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton_kernel_wrapper_functional" in proc.stdout, proc.stdout
    assert "'CBE': 48, 'CB': 64, 'CG': 12" in proc.stdout, proc.stdout  # 4 groups of 12 per program, 64 lanes


def test_group_norm_benchmark_runs_on_the_tiny_unet(tmp_path):
    """bench/group_norm.py --tiny (CPU, interpreter): finds the kernel's sites and times each."""
    out = tmp_path / "gn.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "group_norm.py"), "--tiny", "--device", "cpu",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    # the tiny U-Net's distinct sites: with and without the shift, with and without SiLU, 6 channels per group
    assert {(r["shift"], r["silu"]) for r in rows} == {(True, True), (False, True), (False, False)}
    assert any(r["channels"] == 192 and r["lanes"] == [48, 64] for r in rows)
    assert all(r["kernel_ms"] > 0 for r in rows)


def test_kernel_arithmetic_stays_float32_when_eps_arrives_as_float64():
    """Inductor hands a Python float to a user kernel as fp64 (``'eps': 'fp64'`` in its generated launcher); unless
    the kernel casts it, every normalised element and its SiLU are then computed in fp64, which made the compiled
    network's GroupNorms 2.5x slower than the same kernel launched directly (10.3 vs 4.2 ms per forward on an H200).
    Compiled ahead of time for sm_90 (no GPU needed), the PTX must hold no fp64 arithmetic."""
    out = _sm90_stdout(
        "from ddim.accel import groupnorm as gnk\n"
        "cbe, cb, cg, pb = gnk._blocks(128, 32, 32 * 32)  # the first norms of the CIFAR-10 U-Net\n"
        "ptx = ptx(gnk._group_norm_kernel, {'X': '*bf16', 'ADD': '*fp32', 'W': '*fp32', 'B': '*fp32', 'OUT': '*bf16',\n"
        "          'eps': 'fp64'}, dict(CBE=cbe, CB=cb, CG=cg, NG=cbe // cg, PB=pb, EVEN=True, HAS_ADD=True, SILU=True,\n"
        "          ONE_PASS=pb >= 1024, SAT=0.0, ROUND_E4M3=False), gnk._warps(cb, pb), divisible=('HW', 'C'))\n"
        "print('F64', sorted(set(re.findall(r'\\b(?:add|sub|mul|fma|div|sqrt|rcp|rsqrt|ex2|neg|max|min)\\.[\\w.]*f64', ptx))))\n"
        "print('V4', len(re.findall(r'ld\\.global(?:\\.\\w+)*\\.v4', ptx)))\n")
    assert "F64 []" in out, out  # no double-precision arithmetic
    v4 = int(out.split("V4 ")[1].split()[0])
    assert v4 >= 8, out  # full tiles: the activation loads are vectorised (8 per thread)


def test_inductor_sees_the_kernel_write_only_its_output():
    """Inductor clones every input its analysis of the kernel's TTIR says is written before launching it (a copy
    of the whole activation per launch); a pointer to X that left a helper function once made X count as written.
    The analysis (lowered for an sm_90 target, no GPU needed) must find OUT alone written, for every kind of tile, in
    two passes over the slab and in one, and with an e4m3 output (``ddim.accel.fp8``).  (It needs every argument: a constexpr left to its default made it fail
    and assume every input written.)"""
    code = (
        SM90_TARGET + "import torch\n"
        "from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors\n"
        "from ddim.accel import groupnorm as gnk\n"
        "for hw, c, add, fp8 in ((1024, 128, False, 0), (1024, 128, True, 0), (81, 64, False, 0), (16, 384, True, 0),\n"
        "                        (1024, 128, True, 1)):\n"
        "    x = torch.randn(2, c, hw, 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)\n"
        "    w, b = torch.ones(c), torch.zeros(c)\n"
        "    cbe, cb, cg, pb = gnk._blocks(c, 32, hw)\n"
        "    out = torch.empty_like(x, dtype=torch.float8_e4m3fn if fp8 else x.dtype)\n"
        "    kw = dict(X=x, ADD=torch.zeros(2, c) if add else w, W=w, B=b, OUT=out, HW=hw, C=c, add_stride=c,\n"
        "              eps=1e-6, CBE=cbe, CB=cb, CG=cg, NG=triton.next_power_of_2(cbe // cg), PB=pb, EVEN=hw % pb == 0,\n"
        "              HAS_ADD=add, SILU=True, ONE_PASS=pb >= hw, SAT=gnk._saturation(out.dtype), ROUND_E4M3=False)\n"
        "    acc = identify_accessed_tensors(gnk._group_norm_kernel, kw, {})\n"
        "    print('WRITES', hw, c, add, sorted(d.name for d in acc.read_writes.writes))\n"
        "    print('READS', hw, c, add, sorted(d.name for d in acc.read_writes.reads))\n")
    proc = _fresh_python(code)
    if "cannot import name 'identify_accessed_tensors'" in proc.stderr:
        pytest.skip("this torch has no torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors")
    assert proc.returncode == 0, proc.stderr[-3000:]
    writes = [line for line in proc.stdout.splitlines() if line.startswith("WRITES")]
    assert len(writes) == 5 and all(line.endswith("['OUT']") for line in writes), proc.stdout
    assert "READS 1024 128 True ['ADD', 'B', 'W', 'X']" in proc.stdout, proc.stdout



@pytest.mark.parametrize("shift", [True, False])
def test_inductor_adds_no_copies_around_the_kernel(shift):
    """Compiled by Inductor, a launch is the kernel alone.  Two copies per launch were found in the H200 network's
    code: a NaN fill of the output (Inductor lowers empty_like(memory_format=channels_last) contiguous, then copies
    the uninitialised buffer into the traced layout) and, without a shift, a copy of the input (passed as the unused
    shift too, so two kernel arguments aliased).  Checked on Inductor's IR before fusion for a CPU run (an sm_90
    target for the kernel analysis; code generation then stops: no Triton CPU backend): the only buffers written
    are the input activation's producer and the add after the kernel."""
    code = (
        SM90_TARGET + "import sys, torch\n"
        "from ddim.accel import groupnorm as gnk\n"
        "gnk.kernel_takes = lambda x, groups: True\n"
        "norm = torch.nn.GroupNorm(32, 128)\n"
        "x = torch.randn(2, 128, 32, 32).contiguous(memory_format=torch.channels_last)\n"
        f"shift = {shift}\n"
        "def f(x, a):\n"
        "    h = x * 2  # an intermediate activation, used again after the norm (as a shortcut is)\n"
        "    return gnk.group_norm_silu(h, norm, add=a if shift else None) + h\n"
        "try:\n"
        "    with torch.no_grad():\n"
        "        torch.compile(f)(x, torch.randn(2, 128))\n"
        "except Exception as e:\n"
        "    print('STOPPED', type(e).__name__)\n")
    proc = _fresh_python(code, TORCH_LOGS="ir_pre_fusion",
                         TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")  # a cached graph logs no IR
    log = proc.stdout + proc.stderr
    if "BEFORE FUSION" not in log:
        pytest.skip(f"this torch logs no Inductor IR under TORCH_LOGS=ir_pre_fusion: {log[-500:]}")
    assert log.count("ExternKernelSchedulerNode(UserDefinedTritonKernel)") == 1, log[-4000:]
    assert "constant(nan" not in log, log[-4000:]  # no copy of an uninitialised buffer
    assert log.count("ops.store(") == 2, log[-4000:]  # h, and the add after the kernel: nothing copied


def test_inductor_writes_tool_counts_the_networks_ir(tmp_path):
    """bench/inductor_writes.py (CPU): the tiny U-Net compiled with the kernel launches it for every ResnetBlock norm
    and attention norm, fills nothing with NaN, and leaves Inductor fewer elements to store than channel-stats."""
    out = tmp_path / "iw.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "inductor_writes.py"), "--tiny", "--batch", "2",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    rows = {r["group_norm"]: r for r in json.loads(out.read_text())["rows"]}
    # one launch per ResnetBlock norm (two each) and attention norm, counted on the same tiny U-Net
    from ddim.models import UNet
    from ddim.models.unet import AttnBlock, ResnetBlock

    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                 in_channels=3, resolution=16, resamp_with_conv=True)
    norms = sum(2 if isinstance(m, ResnetBlock) else 1 for m in model.modules() if isinstance(m, (ResnetBlock, AttnBlock)))
    assert rows["kernel"]["group_norm_kernel_launches"] == norms
    assert rows["channel-stats"]["group_norm_kernel_launches"] == 0
    assert rows["kernel"]["elements_nan_filled"] == 0
    assert 0 < rows["kernel"]["elements_stored"] < rows["channel-stats"]["elements_stored"]
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, str(REPO / "bench" / "inductor_writes.py"), "--group-norm", "triton"],
                       env=env, capture_output=True, text=True, timeout=60, check=True)
