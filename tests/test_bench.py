"""CPU smoke tests of the fast paths (ddim.accel.inference) and of the benchmarks in bench/ at tiny sizes."""
from __future__ import annotations

import copy
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddim.accel import inference as perf
from ddim.models.unet import ResnetBlock

REPO = Path(__file__).resolve().parents[1]


def _unet(**kw):
    from ddim.models import UNet

    cfg = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
               in_channels=3, resolution=16, resamp_with_conv=True)
    cfg.update(kw)
    return UNet(**cfg)


def test_count_flops_of_a_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    # 2 FLOPs (multiply + add) per weight per output pixel per image
    assert perf.count_flops(lambda: conv(x)) == 2 * 3 * 8 * 9 * 25 * 2


def test_prepare_for_inference_matches_fp32_and_leaves_model_alone():
    torch.manual_seed(0)
    model = _unet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        ref = model(x, t)
        exact = perf.prepare_for_inference(model, dtype="fp32", compile=False)(x, t)
        fast = perf.prepare_for_inference(model, dtype="bf16", backend="eager")(x, t)
    assert torch.allclose(exact, ref, atol=1e-5, rtol=1e-5)  # channels_last alone changes nothing
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    rel = ((fast - ref).norm() / ref.norm()).item()
    assert 0 < rel < 3e-2, rel  # bf16 operands: visibly rounded, still close
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    assert next(model.parameters()).is_contiguous()


def test_prepare_for_inference_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="int8"):
        perf.prepare_for_inference(nn.Linear(2, 2), dtype="int8")


@pytest.mark.parametrize("fast", [False, True])
def test_train_step_learns_and_keeps_ema(fast):
    from ddim.diffusion import alphas_cumprod, beta_schedule

    torch.manual_seed(0)
    model = _unet(attn_resolutions=())
    ac = alphas_cumprod(beta_schedule("linear", T=1000))
    step = perf.DiffusionTrainStep(model, ac, lr=2e-3, ema_decay=0.5, fast=fast, backend="eager")
    ema0 = [p.clone() for p in step.ema_params]
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    first = torch.stack([step(x0) for _ in range(3)]).mean().item()
    p1 = [p.detach().clone() for p in step.params]
    for _ in range(25):
        step(x0)
    last = torch.stack([step(x0) for _ in range(3)]).mean().item()
    assert last < first, (first, last)
    # EMA follows the weights: not frozen at init, and between init and the current weights' scale
    moved = sum((e - e0).abs().sum().item() for e, e0 in zip(step.ema_params, ema0))
    assert moved > 0
    assert any(not torch.equal(p, q) for p, q in zip(p1, step.params))


def test_train_step_ema_is_the_official_update():
    from ddim.diffusion import alphas_cumprod, beta_schedule

    torch.manual_seed(0)
    model = _unet(attn_resolutions=())
    step = perf.DiffusionTrainStep(model, alphas_cumprod(beta_schedule("linear")), ema_decay=0.9, fast=True,
                                   compile=False)
    ema0 = [p.clone() for p in step.ema_params]
    step(torch.rand(4, 3, 16, 16) * 2 - 1)
    for e, e0, p in zip(step.ema_params, ema0, step.params):
        assert torch.allclose(e, 0.9 * e0 + 0.1 * p.detach(), atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_train_step_ema_warmup_ramps_the_decay_and_forgets_the_initial_weights(fast):
    """ema_warmup: update n uses d = min(decay, (1+n)/(10+n)), so 0.1 then 2/11 with decay 0.9999 (without it the
    shadow would keep 0.9999 ** n of the random initial weights); ema_updates counts the updates."""
    from ddim.diffusion import alphas_cumprod, beta_schedule

    torch.manual_seed(0)
    step = perf.DiffusionTrainStep(_unet(attn_resolutions=()), alphas_cumprod(beta_schedule("linear")),
                                   ema_decay=0.9999, ema_warmup=True, fast=fast, compile=False)
    for n, d in enumerate([1 / 10, 2 / 11]):
        ema0 = [e.clone() for e in step.ema_params]
        step(torch.rand(4, 3, 16, 16) * 2 - 1)
        assert step.ema_updates == n + 1
        for e, e0, p in zip(step.ema_params, ema0, step.params):
            torch.testing.assert_close(e, d * e0 + (1 - d) * p.detach(), rtol=1e-5, atol=1e-6)


def test_train_step_rejects_bad_settings():
    from ddim.diffusion import alphas_cumprod, beta_schedule

    ac = alphas_cumprod(beta_schedule("linear"))
    with pytest.raises(ValueError, match="ema_decay"):
        perf.DiffusionTrainStep(_unet(), ac, ema_decay=1.5)
    with pytest.raises(ValueError, match="grad_clip"):
        perf.DiffusionTrainStep(_unet(), ac, grad_clip=0.0)
    with pytest.raises(ValueError, match="step_graph=True captures.*compile_mode='reduce-overhead'"):
        perf.DiffusionTrainStep(_unet(), ac, fast=True, compile_mode="reduce-overhead", step_graph=True)


def test_train_step_with_step_graph_takes_the_plain_steps():
    """DiffusionTrainStep(step_graph=True) (eager on a CPU) updates weights and EMA as the plain step does."""
    from ddim.diffusion import alphas_cumprod, beta_schedule

    ac = alphas_cumprod(beta_schedule("linear"))
    torch.manual_seed(0)
    base = _unet(dropout=0.0)
    x0 = torch.randn(4, 3, 16, 16)
    steps = []
    for step_graph in (False, True):
        torch.manual_seed(1)
        step = perf.DiffusionTrainStep(copy.deepcopy(base), ac, fast=True, compile=False, grad_clip=0.05,
                                       ema_decay=0.5, step_graph=step_graph)
        losses = [step(x0) for _ in range(3)]
        steps.append((step, torch.stack(losses)))
    (plain, lp), (graph, lg) = steps
    torch.testing.assert_close(lg, lp)
    for a, b in zip(graph.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(graph.ema.parameters(), plain.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package; its scripts import each other by name)."""
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _run_bench(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--tiny", "--device", "cpu",
                           "--backend", "eager", "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_sampling_benchmark_tiny_cpu(tmp_path):
    rec, stdout = _run_bench("sampling", tmp_path, "--variants", "fp32,fast,fast-gn-phase", "--repeats", "1")
    assert [r["variant"] for r in rec["rows"]] == ["fp32", "fast", "fast-gn-phase"]
    from ddim.diffusion import timesteps

    assert rec["nfe"] == len(timesteps(1000, 3, "linear")) and rec["batch"] == 4
    assert rec["gflop_per_forward"] > 0
    for r in rec["rows"]:
        assert r["images_per_s"] > 0 and r["nonfinite"] == 0
        # TFLOP/s is the counted work over the measured time
        assert r["tflops"] == pytest.approx(rec["gflop_per_forward"] * 4 * rec["nfe"] / r["seconds_median"] / 1e3)
    fast = rec["rows"][1]
    assert 0 < fast["diff_mean"] <= fast["diff_max"] <= 2.0
    assert all(r["within_tol"] for r in rec["rows"][1:])  # the phase upsampling too, against fp32
    assert "images/s" in stdout and "fast" in stdout
    # one graph per compiled network, made in the warm-up; no recompilation while the steps' t change
    assert [(r["graphs_warmup"], r["graphs_timed"]) for r in rec["rows"]] == [(0, 0), (1, 0), (1, 0)]


def test_sampling_benchmark_keeps_the_warm_up_peak_memory_apart(monkeypatch):
    """The warm-up's allocations (compilation, cuDNN's algorithm search: paid only by the first variant of a run to
    meet a shape) must not count as the variant's peak, or the run order decides it.  A simulated allocator whose
    peak jumps during the warm-up (CPU tensors have no peak statistics)."""
    import argparse

    sampling = _bench_module("sampling")
    from ddim.diffusion import alphas_cumprod, beta_schedule, timesteps

    mem = {"now": 1.0, "peak": 1.0}
    monkeypatch.setattr(perf, "peak_memory_gib", lambda device: mem["peak"])
    monkeypatch.setattr(perf, "reset_peak_memory", lambda device: mem.update(peak=mem["now"]))
    # perf.synchronize ends the warm-up: let it have allocated and freed a 9 GiB workspace
    monkeypatch.setattr(perf, "synchronize", lambda device: mem.update(peak=max(mem["peak"], 9.0)))
    monkeypatch.setattr(perf, "timed", lambda fn, device, repeats: [fn() or 0.5])
    ac = alphas_cumprod(beta_schedule("linear"))
    args = argparse.Namespace(backend="eager", steps=3, eta=0.0, repeats=1, batch=2)
    row = sampling.run_variant("fp32", None, _unet().eval(), torch.randn(2, 3, 16, 16), ac,
                               timesteps(1000, 3, "linear"), args, torch.device("cpu"), 1e9, 3, None, {
                                   "cudnn.allow_tf32": True, "cuda.matmul.allow_tf32": True})
    assert row["peak_mem_warmup_gib"] == 9.0 and row["peak_mem_gib"] == 1.0


def test_sampling_benchmark_loads_the_cifar10_scripts_checkpoint(tmp_path):
    """--ckpt takes scripts/cifar10_gpu.py's ckpt.pt too: the U-Net from its config, the EMA weights (not the raw
    ones) loaded."""
    import argparse

    sampling = _bench_module("sampling")
    cfg = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, in_channels=3,
               resolution=16, resamp_with_conv=True)
    raw, ema = _unet(), _unet()
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_()
    torch.save(dict(ema=ema.state_dict(), model=raw.state_dict(), unet=cfg, steps=123), tmp_path / "ckpt.pt")
    model, ac, info = sampling.build(argparse.Namespace(ckpt=str(tmp_path / "ckpt.pt")), torch.device("cpu"))
    assert info["train_steps"] == 123 and ac.shape == (1000,) and not model.training
    for a, b in zip(model.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)


def test_fid_precision_takes_the_trajectory_and_a_bf16_rounded_start(tmp_path):
    """bench/fid_precision.py --trajectory picks tau; the fp32-xT-bf16 variant samples in fp32 from x_T rounded to
    bf16, which moves the images, and (on this model) less than computing in bf16 does."""
    from conftest import load_script

    bench = load_script("bench/fid_precision.py")
    common = ["--tiny", "--device", "cpu", "--no-fid"]
    lin = bench.main([*common, "--trajectory", "linear", "--variants", "fp32,fp32-xT-bf16,bf16",
                      "--grids", str(tmp_path / "lin")])
    quad = bench.main([*common, "--variants", "fp32", "--grids", str(tmp_path / "quad")])
    assert (lin["trajectory"], quad["trajectory"]) == ("linear", "quadratic")
    assert (tmp_path / "lin" / "fp32_S2.png").read_bytes() != (tmp_path / "quad" / "fp32_S2.png").read_bytes()
    fp32, rounded, bf16 = lin["rows"]
    assert rounded["variant"] == "fp32-xT-bf16" and bf16["variant"] == "bf16"
    assert 0 < rounded["u8_mean_abs_vs_fp32"] < bf16["u8_mean_abs_vs_fp32"]


def test_batch_places_benchmark_tiny_cpu(tmp_path):
    """bench/batch_places.py: a rerun of the same batches and evaluate's generate() (Trainer.predict over whole
    batches) give exactly the images of the same batches sampled by hand, fp32 and fast."""
    rec, stdout = _run_bench("batch_places", tmp_path)
    comps = rec["comparisons"]
    assert len(comps) == 8 and rec["samples"] == 24
    for name, row in comps.items():
        assert 0 <= row["images_differ"] <= 24 and 0 <= row["max_u8"] <= 255
        if "rerun" in name or "generate()" in name:
            assert row["images_differ"] == 0, name
    assert "images differ" in stdout


def test_training_benchmark_tiny_cpu(tmp_path):
    names = ["fp32", "fast", "fast-cudagraphs-gn-phase", "fast-step-graph-gn-phase"]
    rec, stdout = _run_bench("training", tmp_path, "--variants", ",".join(names), "--windows", "1")
    assert [r["variant"] for r in rec["rows"]] == names
    for r in rec["rows"]:
        assert r["it_per_s"] > 0 and r["loss_finite"]
        assert r["sync_free"] is None  # only checked on CUDA
    assert rec["gflop_per_step_per_image"] > 0
    assert "it/s" in stdout


def test_benchmarks_reject_unknown_variant(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sampling.py"), "--tiny", "--variants", "turbo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "turbo" in proc.stderr


@pytest.mark.parametrize("step_graph", [False, True])
def test_ddp_benchmark_two_processes_tiny_cpu(tmp_path, step_graph):
    """bench/ddp.py on 1 and 2 gloo processes: ranks end with the same weights (DDP's all-reduce, or the step
    graph's own), sharded sampling gives exactly the images of one process, throughput figures are reported."""
    out = tmp_path / "ddp.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ddp.py"), "--world", "1,2", "--tiny", "--device", "cpu",
                           "--samples", "6", "--json", str(out), *(["--step-graph"] if step_graph else [])],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert [r["world"] for r in rec["rows"]] == [1, 2]
    for r in rec["rows"]:
        assert r["weights_agree"] and r["same_images_as_first"] and r["max_u8_diff_to_first"] == 0
        assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0
    assert rec["rows"][0]["train_scaling"] == pytest.approx(1.0) and rec["step_graph"] is step_graph
    assert "same images" in proc.stdout
    # destroy_process_group freed the group: no gloo/TCPStore thread runs on into exit() (one did when a late
    # import bound the group as a default argument, and a worker then sometimes aborted at exit)
    assert [r["threads_left_after_destroy"] for r in rec["rows"]] == [[], []]


def test_ddp_scaling_is_against_a_measured_one_process_row():
    ddp = _bench_module("ddp")
    rows = [dict(world=1, train_images_per_s=100.0, sample_images_per_s=50.0),
            dict(world=2, train_images_per_s=190.0, sample_images_per_s=99.0)]
    ddp.add_scaling(rows)
    assert [r["train_scaling"] for r in rows] == pytest.approx([1.0, 1.9])
    assert rows[1]["sample_scaling"] == pytest.approx(1.98)
    alone = [dict(world=2, train_images_per_s=190.0, sample_images_per_s=99.0)]  # `--world 2`: nothing to divide by
    ddp.add_scaling(alone)
    assert alone[0]["train_scaling"] is None and alone[0]["sample_scaling"] is None


def test_ddp_benchmark_rejects_bad_world(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ddp.py"), "--world", "1,x", "--tiny", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "'1,x'" in proc.stderr


def test_sampling_benchmark_pure_bf16_variant_runs_within_tolerance(tmp_path):
    """fast-pure casts the weights themselves to bf16 (no autocast): it must run and stay close to fp32."""
    rec, _ = _run_bench("sampling", tmp_path, "--variants", "fp32,fast-pure", "--repeats", "1")
    pure = rec["rows"][1]
    assert "error" not in pure, pure.get("error")
    assert pure["images_per_s"] > 0 and pure["nonfinite"] == 0 and 0 < pure["diff_mean"] <= pure["diff_max"]


@pytest.mark.parametrize("affine", [True, False])
def test_channel_stat_group_norm_equals_group_norm(affine):
    """Statistics pooled from channels give GroupNorm's output and gradients, also for data with a large
    offset (the pooled variance has no E[x^2] - E[x]^2 cancellation)."""
    torch.manual_seed(0)
    ref = nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    new = perf.swap_group_norm(copy.deepcopy(ref))
    assert isinstance(new, perf.ChannelStatGroupNorm) and new.state_dict().keys() == ref.state_dict().keys()
    # reference in float64; float32 torch GroupNorm itself loses the digits at an offset 1e4 x the spread
    ref64 = copy.deepcopy(ref).double()
    x = (torch.randn(3, 32, 7, 5) * 0.01 + 100.0).double().to(memory_format=torch.channels_last)  # fp32 values
    x64, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    y_ref, y_new = ref64(x64), new(x32)
    assert torch.allclose(y_new.double(), y_ref, atol=2e-3, rtol=0), (y_new - y_ref).abs().max()
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_new.backward(g.float())
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-2 * x64.grad.abs().max().item())
    # ordinary data: the same output and gradients as float32 nn.GroupNorm
    new.zero_grad()
    xo = (torch.randn(3, 32, 7, 5) * 3 + 1).requires_grad_()
    xn = xo.detach().clone().requires_grad_()
    yo, yn = ref(xo), new(xn)
    assert torch.allclose(yn, yo, atol=1e-5)
    go = torch.randn_like(yo)
    yo.backward(go)
    yn.backward(go)
    assert torch.allclose(xn.grad, xo.grad, atol=1e-5)
    if affine:
        assert torch.allclose(new.weight.grad, ref.weight.grad, atol=1e-4)
        assert torch.allclose(new.bias.grad, ref.bias.grad, atol=1e-4)
    # bf16 input: float32 statistics, output in the input's dtype
    xb = torch.randn(2, 32, 4, 4).bfloat16()
    assert new(xb).dtype == torch.bfloat16
    assert torch.allclose(new(xb).float(), ref(xb.float()), atol=3e-2)


@pytest.mark.parametrize("kw, cls, swap, bad", [
    (dict(group_norm="channel-stats"), "ChannelStatGroupNorm", "swap_group_norm", "welford"),
    (dict(upsample="phases"), "PhaseUpsample", "swap_upsample", "bilinear"),
    (dict(thin_convs="matmul"), "MatmulConv2d", "swap_thin_convs", "winograd")])
def test_module_swaps_in_a_unet_keep_outputs_and_keys_and_reject_unknown_kind(kw, cls, swap, bad):
    """prepare_for_inference's swaps change module classes only: same outputs, same state-dict keys, and the
    caller's model is left as it was."""
    cls = getattr(perf, cls)
    torch.manual_seed(0)
    model = _unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        ref = model(x, t)
        fast = perf.prepare_for_inference(model, dtype="fp32", compile=False, **kw)
        assert any(isinstance(m, cls) for m in fast.modules())
        assert not any(isinstance(m, cls) for m in model.modules())  # caller's model untouched
        assert fast.model.state_dict().keys() == model.state_dict().keys()
        assert torch.allclose(fast(x, t), ref, atol=1e-4)
    with pytest.raises(ValueError, match=f"'{bad}'.*allowed"):
        getattr(perf, swap)(model, bad)


def test_compiled_inference_defaults_to_phase_upsampling_thin_matmuls_cast_weights_eager_to_none():
    model = _unet().eval()
    eager = perf.prepare_for_inference(model, dtype="fp32", compile=False)
    compiled = perf.prepare_for_inference(model, dtype="fp32", compile=True, backend="eager")
    official = perf.prepare_for_inference(model, dtype="fp32", compile=True, backend="eager", upsample="nearest")
    kinds = [{type(m).__name__ for m in w.modules()} for w in (eager, compiled, official)]
    assert "PhaseUpsample" not in kinds[0] and "PhaseUpsample" in kinds[1] and "PhaseUpsample" not in kinds[2]
    # and the thin convolutions as matrix products, the autocast weights cast once (bf16)
    bf16 = [perf.prepare_for_inference(model, compile=c, backend="eager") for c in (False, True)]
    assert [any(isinstance(m, perf.MatmulConv2d) for m in w.modules()) for w in bf16] == [False, True]
    assert [{p.dtype for p in w.model.conv_in.parameters()} for w in bf16] == [{torch.float32}, {torch.bfloat16}]
    # and, where the GroupNorm kernel's ResnetBlocks are the compiled default, the merged projections
    from ddim.accel import groupnorm
    assert [w.model.block_shifts is not None for w in bf16] == [False, groupnorm.available()]
    plain = perf.prepare_for_inference(model, compile=True, backend="eager", group_norm="channel-stats")
    assert plain.model.block_shifts is None  # plain ResnetBlocks add the projection themselves
    # "phases-stacked": the same module class with the stacked interleave, undone by swapping back
    ups = [m for m in perf.swap_upsample(copy.deepcopy(model), "phases-stacked").modules()
           if isinstance(m, perf.PhaseUpsample)]
    assert ups and all(m.strided is False for m in ups)
    perf.swap_upsample(ups[0], "phases")
    assert ups[0].strided is None and all(m.strided is False for m in ups[1:])


@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (1, 3, 1, 1), (3, 8, 5, 3)])
def test_upsample_conv_by_phases_equals_nearest_then_conv(shape):
    """The four-phase 2x2 convolution on the low-resolution input is conv3x3(nearest 2x upsample): in
    float64 to rounding, with and without bias, odd sizes and 1x1 inputs (all border), gradients too, both
    interleaves (stacks; one strided view, the default without autograd) and both layouts."""
    torch.manual_seed(0)
    b, c, h, w = shape
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, c, 3, 3, dtype=torch.float64, requires_grad=True)
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        for strided in (False, True):
            for bias in (torch.randn(7, dtype=torch.float64), None):
                ref = F.conv2d(F.interpolate(xi, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
                got = perf.upsample_conv3x3_by_phases(xi, weight, bias, strided=strided)
                assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12, rtol=0)
                with torch.no_grad():  # the default there: the strided view
                    assert torch.allclose(perf.upsample_conv3x3_by_phases(xi, weight, bias), ref, atol=1e-12, rtol=0)
            g = torch.randn_like(ref)
            grads_ref = torch.autograd.grad(ref, (x, weight), g)
            grads_got = torch.autograd.grad(perf.upsample_conv3x3_by_phases(xi, weight, None, strided=strided),
                                            (x, weight), g)
            assert all(torch.allclose(a, r, atol=1e-10) for a, r in zip(grads_got, grads_ref))
            # keeps the layout the next convolution wants
            cl = torch.channels_last
            assert got.is_contiguous(memory_format=cl) == xi.is_contiguous(memory_format=cl)


def test_strided_phase_interleave_is_written_straight_into_the_concatenation():
    """Compiled (Inductor, CPU) without autograd, as in sampling: the strided interleave of the phase upsampling
    leaves no upsampled-size buffer besides the skip concatenation it feeds; the stacks leave one."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 16, 3, 3), torch.randn(16)
    upsampled = 2 * 16 * 16 * 16
    for strided in (True, False):
        torch._dynamo.reset()
        f = torch.compile(lambda x, s: torch.cat([perf.upsample_conv3x3_by_phases(x, weight, bias, strided=strided),
                                                  s], 1), dynamic=False)
        with torch.no_grad():
            out, code = run_and_get_code(f, x, skip)
        want = F.conv2d(F.interpolate(x, scale_factor=2.0), weight, bias, padding=1)
        assert torch.allclose(out[:, :16], want, atol=1e-4) and torch.equal(out[:, 16:], skip)
        sizes = [math.prod(int(d) for d in m.split(",") if d.strip())
                 for m in re.findall(r"empty_strided_cpu\(\(([0-9, ]+)\)", "\n".join(code))]
        assert sizes.count(upsampled) == (0 if strided else 1), sizes


@pytest.mark.parametrize("cin, cout, shape", [(3, 128, (2, 9, 7)), (128, 3, (2, 9, 7)), (2, 19, (1, 1, 1)),
                                              (37, 4, (3, 5, 2))])
def test_thin_conv_as_matmul_equals_conv2d(cin, cout, shape):
    """Both forms of ``conv3x3_as_matmul`` (3x3 patches for few inputs, shifted per-tap partials for few outputs)
    are ``F.conv2d(padding=1)`` in float64 to rounding: borders, 1x1 images, with and without bias, gradients, and
    the channels_last layout of the result; layers that are not thin are refused."""
    torch.manual_seed(0)
    b, h, w = shape
    x = torch.randn(b, cin, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(cout, cin, 3, 3, dtype=torch.float64, requires_grad=True)
    for bias in (torch.randn(cout, dtype=torch.float64), None):
        ref = F.conv2d(x, weight, bias, padding=1)
        got = perf.conv3x3_as_matmul(x, weight, bias)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, weight), g)
    grads_got = torch.autograd.grad(perf.conv3x3_as_matmul(x, weight, None), (x, weight), g)
    assert all(torch.allclose(a, r, atol=1e-10) for a, r in zip(grads_got, grads_ref))
    cl = perf.conv3x3_as_matmul(x.detach().contiguous(memory_format=torch.channels_last), weight, None)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="16 -> 16 channels"):
        perf.conv3x3_as_matmul(torch.randn(1, 16, 4, 4), torch.randn(16, 16, 3, 3), None)


def test_thin_convs_are_the_unets_first_and_last():
    model = _unet()
    swapped = perf.swap_thin_convs(copy.deepcopy(model))
    names = [n for n, m in swapped.named_modules() if isinstance(m, perf.MatmulConv2d)]
    assert names == ["conv_in", "conv_out"]
    assert not any(isinstance(m, perf.MatmulConv2d) for m in perf.swap_thin_convs(swapped, "cudnn").modules())


def test_cast_weights_gives_autocasts_numbers_with_the_casts_done_once():
    """Convolution and linear parameters cast to bf16 once: the same output as autocast casting them at every
    call (official upsampling order: no tap sums of the weights), norms keep fp32; no-op without autocast."""
    torch.manual_seed(0)
    model = _unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    kw = dict(dtype="bf16", compile=False, upsample="nearest")
    per_call, once = (perf.prepare_for_inference(model, cast_weights=c, **kw) for c in (False, True))
    dtypes: dict[str, set] = {}
    for m in once.modules():
        dtypes.setdefault(type(m).__name__, set()).update(p.dtype for p in m.parameters(recurse=False))
    assert dtypes["Conv2d"] == dtypes["Linear"] == {torch.bfloat16}
    assert all(d == {torch.float32} for k, d in dtypes.items() if "Norm" in k)
    assert {p.dtype for p in per_call.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(once(x, t), per_call(x, t))
    fp32 = perf.prepare_for_inference(model, dtype="fp32", compile=False, cast_weights=True)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def test_channels_last_keeps_the_gradient_layout_contract():
    """Every gradient arrives with its parameter's strides (DDP otherwise copies it into the bucket each step):
    the attention projections, used as matrices, stay in the contiguous layout; the convolutions go
    channels_last."""
    torch.manual_seed(0)
    model = perf.to_channels_last(_unet())
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    model(x, torch.randint(0, 1000, (2,))).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []
    convs = [p for n, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] == 3]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)


def test_prepare_for_inference_rejects_mode_with_options():
    with pytest.raises(ValueError, match="compile_mode.*options"):
        perf.prepare_for_inference(nn.Linear(2, 2), compile_mode="reduce-overhead", options={"freezing": True},
                                   deterministic=False)


def test_prepare_for_inference_compiles_deterministic_with_mode_spelled_out(monkeypatch):
    """Timed kernel choices differ between processes (and so did the samples of two GPUs): the default
    compiles in Inductor's deterministic mode; a mode comes along as its options (compile takes one or the other)."""
    import torch._inductor as inductor

    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or m)
    perf.prepare_for_inference(nn.Linear(2, 2), compile_mode="reduce-overhead", options={"freezing": True})
    perf.prepare_for_inference(nn.Linear(2, 2))
    perf.prepare_for_inference(nn.Linear(2, 2), deterministic=False)
    perf.prepare_for_inference(nn.Linear(2, 2), backend="eager")  # no Inductor, no Inductor options
    assert seen[0]["mode"] is None
    assert seen[0]["options"] == {**inductor.list_mode_options("reduce-overhead"), "freezing": True, "deterministic": True}
    assert seen[0]["options"]["triton.cudagraphs"] is True
    assert seen[1]["mode"] is None and seen[1]["options"] == {"deterministic": True}
    assert seen[2]["options"] is None
    assert seen[3]["options"] is None and seen[3]["backend"] == "eager"


def test_freezing_option_folds_the_weights_into_the_compiled_network():
    """``options={"freezing": True}`` must make the weights constants of the compiled graph (their bf16 casts and the
    phase kernels computed once): without dynamo's prepare_freezing, Inductor's freezing found no parameters and every
    forward recomputed them.  Observable: after the first call, changing a weight changes nothing."""
    torch.manual_seed(0)
    model = _unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    outs = {}
    for freezing in (False, True):
        fast = perf.prepare_for_inference(model, dtype="bf16", group_norm="channel-stats",
                                          options={"freezing": True} if freezing else None)
        with torch.no_grad():
            first = fast(x, t)
            conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
            conv.weight.mul_(2.0)
            outs[freezing] = (first, fast(x, t))
    assert isinstance(fast, perf.FreezingCompiled)
    assert not torch.equal(*outs[False])  # weights are inputs of the unfrozen graph
    assert torch.equal(*outs[True])  # and constants of the frozen one
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=2e-2, rtol=0)  # the same network


def test_fast_paths_choose_group_norm_by_compilation_and_use():
    """Compiled inference: the GroupNorm kernel's blocks (where Triton is installed; not with the fused convolutions);
    compiled training (needs a backward): per-channel statistics; eager: torch's GroupNorm."""
    from ddim.diffusion import alphas_cumprod, beta_schedule
    from ddim.accel import groupnorm

    def kinds(m):
        return {type(x) for x in m.modules() if isinstance(x, nn.GroupNorm)}

    def blocks(m):
        return {type(x).__name__ for x in m.modules() if isinstance(x, ResnetBlock)}

    model = _unet()
    fast = perf.prepare_for_inference(model, backend="eager")
    if groupnorm.available():
        assert blocks(fast) == {"KernelResnetBlock"}
        assert kinds(fast) == {perf.ChannelStatGroupNorm, groupnorm.KernelGroupNorm}  # + the attention norms
    else:
        assert blocks(fast) == {"ResnetBlock"} and kinds(fast) == {perf.ChannelStatGroupNorm}
    assert blocks(perf.prepare_for_inference(model, backend="eager", group_norm="channel-stats")) == {"ResnetBlock"}
    assert perf.default_inference_group_norm(True, fused=True) == "channel-stats"
    assert perf.default_inference_group_norm(False) == "torch"
    assert kinds(perf.prepare_for_inference(model, backend="eager", group_norm="channel-stats")) == {
        perf.ChannelStatGroupNorm}
    assert kinds(perf.prepare_for_inference(model, compile=False)) == {nn.GroupNorm}
    assert kinds(perf.prepare_for_inference(model, backend="eager", group_norm="torch")) == {nn.GroupNorm}
    ac = alphas_cumprod(beta_schedule("linear"))
    assert kinds(perf.DiffusionTrainStep(_unet(), ac, fast=True, backend="eager").model) == {perf.ChannelStatGroupNorm}
    assert kinds(perf.DiffusionTrainStep(_unet(), ac, fast=False).model) == {nn.GroupNorm}
    step = perf.DiffusionTrainStep(_unet(), ac, fast=True, backend="eager", group_norm="torch")
    assert kinds(step.model) == kinds(step.ema) == {nn.GroupNorm}


@pytest.mark.parametrize("what,variant", [("sampling", "fast-gn"), ("training", "fast")])
def test_kernel_profile_tiny_cpu(tmp_path, what, variant):
    """bench/kernels.py: per-kind times add up to the busy time, convolutions show up as such."""
    rec, stdout = _run_bench("kernels", tmp_path, "--what", what, "--variant", variant, "--iters", "1")
    assert rec["what"] == what and rec["variant"] == variant and rec["batch"] == 4
    assert sum(rec["by_kind_ms"].values()) == pytest.approx(rec["busy_ms"])
    assert sum(k["ms"] for k in rec["kernels"]) == pytest.approx(rec["busy_ms"])
    assert rec["by_kind_ms"].get("convolution", 0) > 0
    assert "ms / iteration" in stdout


def test_kernel_profile_of_a_sampling_loop_is_per_step(tmp_path):
    """--loop profiles one sampling loop of --iters steps: per step, the same convolutions as one forward.
    (S = 3 of T = 1000 runs 4 forwards, t = 0, 333, 666, 999: the figures are per forward run.)"""
    one, _ = _run_bench("kernels", tmp_path, "--what", "sampling", "--variant", "fast-gn", "--iters", "1")
    loop, stdout = _run_bench("kernels", tmp_path, "--what", "sampling", "--variant", "fast-gn", "--iters", "3",
                              "--loop")
    assert loop["loop"] and not one["loop"] and loop["iters"] == 4 and "4 steps of one sampling loop" in stdout

    def conv_calls(rec):
        return sum(k["calls"] for k in rec["kernels"] if "conv" in k["name"])

    assert conv_calls(loop) == conv_calls(one) > 0


def test_kernel_kinds_of_gpu_kernel_names():
    kind_of = _bench_module("kernels").kind_of
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kind_of("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8_ffma") == "matmul"
    assert kind_of("triton_red_fused__to_copy_add_convolution_silu_var_mean_12").startswith("triton: group norm")
    assert kind_of("triton_poi_fused__to_copy_26") == "triton: other fused element-wise"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kind_of("Memset (Device)") == "copy / layout"
    assert kind_of("_group_norm_kernel").startswith("triton: group norm")  # ddim.accel.groupnorm's


def test_kernel_profile_rejects_unknown_variant():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), "--what", "training", "--variant",
                           "fast-gn-graphs", "--tiny", "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "'fast-gn-graphs'" in proc.stderr and "fast-cudagraphs" in proc.stderr


def _loss_and_params(seed=0):
    torch.manual_seed(seed)
    model = perf.to_channels_last(_unet()).train()
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 10, 500, 999])
    return model, (lambda x0: (model(x0, t) - x0).square().sum(dim=(1, 2, 3)).mean()), x


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_graph_gives_the_plain_gradients_in_one_buffer(clip):
    model, loss_fn, x = _loss_and_params()
    ref_model = copy.deepcopy(model)
    ref_loss = (ref_model(x, torch.tensor([0, 10, 500, 999])) - x).square().sum(dim=(1, 2, 3)).mean()
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip if clip else float("inf"))
    g = perf.GradientGraph(loss_fn, list(model.parameters()), grad_clip=clip)
    for _ in range(2):  # the buffer is zeroed each call: gradients do not accumulate across steps
        loss, norm = g(x)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        assert p.grad.stride() == p.stride() and p.grad.data_ptr() >= g.flat.data_ptr()
    conv = model.conv_in.weight
    assert conv.grad.is_contiguous(memory_format=torch.channels_last)
    model.zero_grad(set_to_none=True)  # someone drops the views: they are bound again, not silently lost
    g(x)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="grad_clip must be positive or None, got 0"):
        perf.GradientGraph(loss_fn, list(model.parameters()), grad_clip=0)
    with pytest.raises(ValueError, match="fp32 gradients; got a torch.bfloat16 parameter"):
        perf.GradientGraph(loss_fn, [nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])


def _gradient_graph_rank(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, loss_fn, _ = _loss_and_params(seed=0)  # same weights on both ranks
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))  # different data
    g = perf.GradientGraph(loss_fn, list(model.parameters()))
    assert g.all_reduce
    g(x)
    torch.save(g.flat.clone(), f"{out}/flat{rank}.pt")
    model.zero_grad(set_to_none=True)
    g.all_reduce = False
    g(x)
    torch.save(g.flat.clone(), f"{out}/local{rank}.pt")
    dist.destroy_process_group()


def test_gradient_graph_all_reduces_the_mean_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gradient_graph_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    f0, f1 = (torch.load(tmp_path / f"flat{r}.pt") for r in range(2))
    l0, l1 = (torch.load(tmp_path / f"local{r}.pt") for r in range(2))
    assert not torch.allclose(l0, l1)
    torch.testing.assert_close(f0, f1, rtol=0, atol=0)
    torch.testing.assert_close(f0, (l0 + l1) / 2, rtol=1e-5, atol=1e-7)


class _FakeGraph:
    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1


def test_gradient_graph_release_resets_every_captured_graph():
    """release() frees every captured graph once and forgets it, so the next call captures again."""
    model, loss_fn, x = _loss_and_params()
    g = perf.GradientGraph(loss_fn, list(model.parameters()))
    fakes = [_FakeGraph(), _FakeGraph()]
    g._graphs = {("a",): (fakes[0], None, None, None), ("b",): (fakes[1], None, None, None)}
    g.release()
    assert [f.resets for f in fakes] == [1, 1] and g._graphs == {}
    g.release()  # idempotent: nothing is reset twice
    assert [f.resets for f in fakes] == [1, 1]
    loss, _ = g(x)  # and it still steps (eagerly on a CPU)
    assert torch.isfinite(loss)
    # at exit every live one is released (before the process group is destroyed: see release_gradient_graphs)
    late = _FakeGraph()
    g._graphs = {("c",): (late, None, None, None)}
    perf.release_gradient_graphs()
    assert late.resets == 1 and g._graphs == {}


def test_gradient_graphs_are_released_before_earlier_exit_handlers(tmp_path):
    """At exit the graphs are freed before handlers registered earlier run, such as the one Lightning registers
    at init_process_group to destroy the process group (which hangs while a graph holding its all-reduce lives)."""
    script = tmp_path / "exit.py"
    script.write_text(
        "import atexit\n"
        "import torch\n"
        "from ddim.accel import inference as perf\n"
        "class Fake:\n"
        "    def reset(self):\n"
        "        print('graph reset', flush=True)\n"
        "atexit.register(lambda: print('process group destroyed', flush=True))  # as at init_process_group\n"
        "p = torch.nn.Parameter(torch.zeros(2))\n"
        "g = perf.GradientGraph(lambda x: (p * x).sum(), [p])\n"
        "g._graphs = {('k',): (Fake(), None, None, None)}\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["graph reset", "process group destroyed"]


def _release_rank(rank, world, init, out, backend):
    import torch.distributed as dist

    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    torch.manual_seed(0)
    model = perf.to_channels_last(_unet()).to(device).train()
    t = torch.tensor([0, 10, 500, 999], device=device)
    g = perf.GradientGraph(lambda x0: (model(x0, t) - x0).square().mean(), list(model.parameters()))
    assert g.all_reduce
    for seed in range(3):
        g(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed + rank)).to(device))
    assert len(g._graphs) == (1 if cuda else 0)  # captured on a GPU; eager on a CPU
    g.release()
    dist.destroy_process_group()
    Path(out, f"exited{rank}").touch()


@pytest.mark.parametrize("backend", [
    "gloo",  # eager on a CPU: checks this harness
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="needs two GPUs (NCCL all-reduce across two ranks)"))])
def test_gradient_graph_release_lets_two_ranks_exit(tmp_path, backend):
    """Two ranks whose graph captured the all-reduce get through destroy_process_group after release().  Without
    it, bench/ddp.py --step-graph and train.py trainer=ddp_step_graph hung there on two H200s."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_release_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path), backend), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"two {backend} ranks did not exit within 240 s (destroy_process_group hung?)")
    assert (tmp_path / "exited0").exists() and (tmp_path / "exited1").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gradient_graph_replays_give_each_inputs_gradients_on_a_gpu():
    """A replay writes the gradients of the new input (not the captured one's) into the same buffer."""
    torch.manual_seed(0)
    model = perf.to_channels_last(_unet()).cuda().train()
    t = torch.tensor([0, 10, 500, 999], device="cuda")
    loss_fn = lambda x0: (model(x0, t) - x0).square().sum(dim=(1, 2, 3)).mean()  # noqa: E731 - no randomness
    g = perf.GradientGraph(loss_fn, list(model.parameters()), grad_clip=1.0)
    eager = perf.GradientGraph(loss_fn, list(model.parameters()), grad_clip=1.0, cuda_graph=False)
    for seed in range(3):
        x = torch.randn(4, 3, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        loss, norm = g(x)
        got = g.flat.clone()
        ref_loss, ref_norm = eager(x)  # binds the views to its own buffer
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(norm, ref_norm)
        torch.testing.assert_close(got, eager.flat, rtol=1e-5, atol=1e-7)
    assert len(g._graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL and CUDA graphs need a GPU")
def test_gradient_graph_captures_the_nccl_all_reduce(tmp_path):
    """The all-reduce runs inside the captured graph (NCCL, one rank here): replays average like eager calls."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    try:
        torch.manual_seed(0)
        model = perf.to_channels_last(_unet()).cuda().train()
        t = torch.tensor([0, 10, 500, 999], device="cuda")
        loss_fn = lambda x0: (model(x0, t) - x0).square().sum(dim=(1, 2, 3)).mean()  # noqa: E731
        g = perf.GradientGraph(loss_fn, list(model.parameters()), all_reduce=True)
        eager = perf.GradientGraph(loss_fn, list(model.parameters()), all_reduce=False, cuda_graph=False)
        for seed in range(2):
            x = torch.randn(4, 3, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            g(x)
            got = g.flat.clone()
            eager(x)
            torch.testing.assert_close(got, eager.flat, rtol=1e-5, atol=1e-7)
        assert len(g._graphs) == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compiled_train_step_graph_captures_without_recompiling():
    """The compiled step's graph capture reuses the warm-up's compilation.  The warm-up once ran under autocast's
    default cast cache and the capture without it: torch.compile recompiled inside the capture, timed its new
    kernels there and broke the capture (bench/training.py fast-step-graph-gn-phase on an H200)."""
    from ddim.diffusion import alphas_cumprod, beta_schedule

    torch._dynamo.reset()
    torch.manual_seed(0)
    step = perf.DiffusionTrainStep(_unet().cuda(), alphas_cumprod(beta_schedule("linear")), fast=True,
                                   step_graph=True)
    x0 = torch.randn(8, 3, 16, 16, device="cuda")
    losses = torch.stack([step(x0) for _ in range(3)])
    assert torch.isfinite(losses).all()
    assert len(step.gradient_graph._graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton kernels need a GPU")
@pytest.mark.parametrize("merge", [False, True])
def test_group_norm_kernel_compiled_by_inductor_gives_the_models_eps(merge):
    """prepare_for_inference(group_norm="kernel") on a GPU (the GroupNorm kernel launched from Inductor's code,
    deterministic mode) computes the U-Net's ε (fp32 here: summation order and TF32 differ); so it does with the
    merged projections (the kernel then reads each block's shift as a view of the merged rows)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _unet(ch=64).cuda().eval()
    fast = perf.prepare_for_inference(model, dtype="fp32", group_norm="kernel", merge=merge)
    assert any(type(m).__name__ == "KernelResnetBlock" for m in fast.modules())
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.tensor([0, 10, 500, 999], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t), model(x, t), rtol=1e-2, atol=1e-2)  # TF32 convolutions on both


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton kernels need a GPU")
def test_compiled_group_norm_kernel_launches_without_nan_filled_copies():
    """The code Inductor generates for the bf16 network with the GroupNorm kernel holds no buffer filled with NaN (a
    copy of an uninitialised output before each launch, as on the H200 before), and its ε is close to the model's.
    (CPU tests check the causes on Inductor's IR, and the kernel's PTX for fp64 arithmetic.)"""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _unet(ch=64).cuda().eval()
    fast = perf.prepare_for_inference(model, dtype="bf16", group_norm="kernel")
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.tensor([0, 10, 500, 999], device="cuda")
    with torch.no_grad():
        eps, codes = run_and_get_code(fast, x, t)
        want = model(x, t)
    code = "\n".join(codes)
    assert "_group_norm_kernel" in code
    assert 'float("nan")' not in code, "Inductor copies an uninitialised buffer (NaN fill) around the kernel"
    assert (eps.float() - want).abs().mean() < 0.02  # bf16 network


def test_format_table_keeps_pipes_inside_their_cells():
    """Headers such as ``mean |d|`` are escaped: a bare '|' would split the cell and shift every column after it."""
    table = perf.format_table([dict(a=1.234, b=None)], [("a", "mean |d|", ".2f"), ("b", "p99", "")])
    head, rule, row = table.splitlines()
    assert head == r"| mean \|d\| | p99 |" and rule == "| --- | --- |" and row == "| 1.23 | - |"

    def cells(line: str) -> list[str]:  # split at the unescaped pipes, as a Markdown renderer does
        return re.split(r"(?<!\\)\|", line)[1:-1]

    assert len(cells(head)) == len(cells(rule)) == len(cells(row)) == 2


def test_ema_warmup_bench_one_step_debiased_is_the_raw_model(tmp_path, capsys):
    """bench/ema_warmup.py: after one step the official EMA is decay * w_0 + (1 - decay) * w_1, so the debiased
    average (the initial weights' share taken out) is w_1, the raw model, exactly; the official and warm-up ones
    are not.  Bad settings are refused by name."""
    from conftest import load_script
    from test_cifar10_script import make_pack

    bench, pack = load_script("bench/ema_warmup.py"), tmp_path / "pack.npz"
    make_pack(pack)
    common = ["--data", str(pack), "--device", "cpu", "--batch", "4", "--train-images", "8", "--test-images", "4"]
    rec = bench.main([*common, "--steps", "1", "--decay", "0.9", "--json", str(tmp_path / "e.json")])
    mse = rec["eps_mse"]
    assert json.loads((tmp_path / "e.json").read_text())["eps_mse"] == mse
    assert rec["initial_weights_left"] == pytest.approx(0.9)
    assert mse["ema debiased"] == pytest.approx(mse["raw"], rel=1e-4)
    assert mse["ema official"] != pytest.approx(mse["raw"], rel=1e-3)
    assert mse["ema warm-up"] != pytest.approx(mse["raw"], rel=1e-3)
    # --save: each average in the export format; the debiased one holds the raw weights
    rec = bench.main([*common, "--steps", "1", "--decay", "0.9", "--save", str(tmp_path / "w"),
                      "--grid", str(tmp_path / "g" / "grid.png")])
    # --grid: a row of 16 samples per weight set (raw, warm-up, official, debiased), all from the same x_T, so the
    # debiased row repeats the raw one and the official row does not
    from torchvision.io import read_image

    grid = read_image(str(tmp_path / "g" / "grid.png")).float()
    assert grid.shape == (3, 1 + 4 * 33, 1 + 16 * 33)
    rows = [grid[:, 1 + 33 * r:33 * (r + 1)] for r in range(4)]
    assert (rows[3] - rows[0]).abs().max() <= 2 and (rows[2] - rows[0]).abs().mean() > 1
    load_ema_unet = load_script("scripts/cifar10_gpu.py").load_ema_unet
    nets = {n: load_ema_unet(tmp_path / "w" / f"{n}.pt")[0]
            for n in ("raw", "ema_warmup", "ema_official", "ema_debiased")}
    for k, v in nets["raw"].state_dict().items():
        torch.testing.assert_close(nets["ema_debiased"].state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(nets["ema_official"].conv_in.weight, nets["raw"].conv_in.weight)
    assert load_ema_unet(tmp_path / "w" / "ema_official.pt")[1]["weights"] == "ema official"
    # loading warns for the averages that hold initial weights (0.9 of them after one official update, 0.1 after
    # one warm-up update), not for the raw or debiased weights
    capsys.readouterr()
    for name in ("raw", "ema_debiased", "ema_official", "ema_warmup"):
        load_ema_unet(tmp_path / "w" / f"{name}.pt")
    said = capsys.readouterr().out
    assert "90.0% of the initial" in said and "10.0% of the initial" in said and said.count("warning") == 2
    for bad, match in ((["--decay", "1.0"], "--decay 1.0"), (["--steps", "0"], "--steps 0")):
        with pytest.raises(SystemExit):
            bench.main([*common, *bad])
        assert match in capsys.readouterr().err
