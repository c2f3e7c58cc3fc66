#!/usr/bin/env python
"""What Inductor writes per sampling forward of the compiled U-Net, read from its IR on a CPU (no GPU needed).

Compiles ``prepare_for_inference``'s bf16 network (phase upsampling, as compiled sampling does) for each
``--group-norm`` kind with ``TORCH_LOGS=ir_pre_fusion`` and counts, from Inductor's scheduler nodes before fusion:
the nodes, the elements they store (a proxy for the HBM writes of its generated kernels; extern kernels such as
convolutions and the GroupNorm kernel are not counted), the elements it fills with NaN (copies of an
uninitialised buffer: pure waste), and the GroupNorm kernel's launches.  Triton gets an sm_90 target so that
Inductor can analyse the kernel; code generation then stops (there is no Triton CPU backend), after the IR is
logged.  Each kind runs in its own process, with Inductor's caches off (a cached graph logs no IR).

    python bench/inductor_writes.py                      # CIFAR-10 U-Net, batch 8, channel-stats vs kernel
    python bench/inductor_writes.py --tiny --batch 2     # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget

class Target:  # lets Triton lower the kernel to TTIR for Inductor's analysis without a GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Target())
from ddim.accel import groupnorm as gnk, inference as perf
from ddim.models import UNet, unet_kwargs_from_config

# CPU tensors: take the kernel wherever it would take the shape on a GPU
gnk.kernel_takes = lambda x, groups: x.dim() == 4 and gnk._blocks(x.shape[1], groups, x.shape[2] * x.shape[3]) is not None
kind, batch, tiny = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
cfg = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, in_channels=3,
           resolution=16, resamp_with_conv=True) if tiny else unet_kwargs_from_config("cifar10")
torch.manual_seed(0)
model = UNet(**cfg).eval()
fast = perf.prepare_for_inference(model, dtype="bf16", group_norm=kind, upsample="phases", compile=False)
f = torch.compile(fast, dynamic=False, options=perf.deterministic_options())
res = cfg["resolution"]
try:
    with torch.no_grad():
        f(torch.randn(batch, 3, res, res), torch.full((batch,), 500))
except Exception as e:  # noqa: BLE001 - expected where a Triton kernel would be generated for the CPU
    print("stopped:", type(e).__name__)
"""


def ir_counts(log: str) -> dict:
    """Scheduler nodes of one ``ir_pre_fusion`` log (Nop nodes left out): count, stored and NaN-filled elements,
    GroupNorm kernel launches."""
    text = "\n".join(re.sub(r"^.*?\[__ir_pre_fusion\] ?", "", line) for line in log.splitlines())
    stored = nan = nodes = 0
    for op in re.split(r"\nop\d+: ", text)[1:]:
        m = re.search(r"\.group\.iteration = \(\(([\d, ]*)\),", op)
        if not m or op.startswith("NopKernel"):
            continue
        n = 1
        for v in m.group(1).split(","):
            n *= int(v) if v.strip() else 1
        nodes += 1
        stored += n * op.count("ops.store(")
        if "constant(nan" in op:
            nan += n
    return dict(scheduler_nodes=nodes, elements_stored=stored, elements_nan_filled=nan,
                group_norm_kernel_launches=text.count("ExternKernelSchedulerNode(UserDefinedTritonKernel)"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group-norm", default="channel-stats,kernel", help="comma list of prepare_for_inference kinds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="the tiny U-Net (16x16) instead of CIFAR-10's")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    kinds = args.group_norm.split(",")
    for kind in kinds:
        if kind not in ("torch", "channel-stats", "kernel"):
            p.error(f"unknown --group-norm {kind!r}; allowed: torch, channel-stats, kernel")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    rows = []
    for kind in kinds:
        # caches off: a cached graph skips the lowering, and with it the IR log
        env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "TORCH_LOGS": "ir_pre_fusion",
               "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
               "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(args.batch), "1" if args.tiny else "0"],
                              env=env, capture_output=True, text=True, timeout=1800)
        log = proc.stdout + proc.stderr
        if "BEFORE FUSION" not in log:
            raise RuntimeError(f"no Inductor IR logged for group_norm={kind!r} (exit {proc.returncode}):\n{log[-3000:]}")
        rows.append(dict(group_norm=kind, **ir_counts(log)))
        print(f"  {rows[-1]}", flush=True)
    print(f"# Inductor's writes per forward, bf16 U-Net ({'tiny' if args.tiny else 'CIFAR-10'}), batch {args.batch}")
    print("| group_norm | Inductor nodes before fusion | elements stored | NaN-filled | GroupNorm kernel launches |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['group_norm']} | {r['scheduler_nodes']} | {r['elements_stored'] / 1e6:.2f} M | "
              f"{r['elements_nan_filled'] / 1e6:.2f} M | {r['group_norm_kernel_launches']} |")
    record = dict(benchmark="inductor_writes", batch=args.batch, tiny=args.tiny, rows=rows,
                  command=" ".join(["python", "bench/inductor_writes.py", *(argv if argv is not None else sys.argv[1:])]))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
