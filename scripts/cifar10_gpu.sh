#!/usr/bin/env bash
# One GPU, about 12 minutes on an H200 (14 on an H100): train the CIFAR-10 U-Net on the JPEG CIFAR-10 copy in
# ../shared/data, then FID on 5,000 samples for eta in {0, 1, hat} x S in {10, 20, 50, 100} (Table 1),
# reconstruction error (Table 2), FID-vs-S plot, sample grids, FID against NFE for DDIM and the ODE solvers,
# and the bf16-vs-fp32 numerics check.
#
#   scripts/cifar10_gpu.sh OUT_DIR [DATA_NPZ] [INCEPTION_WEIGHTS]
#
# INCEPTION_WEIGHTS: torch-fidelity-format FID Inception weights (see ddim.evaluation.fid.resolve_inception_weights;
# without it that function's own search is used). STEPS (15000, the recorded run) and MINUTES (9) bound training.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/cifar10_gpu.sh OUT_DIR [DATA_NPZ] [INCEPTION_WEIGHTS]}
DATA=${2:-../shared/data/cifar10_jpeg_q75.npz}
WEIGHTS=${3:-}
export PYTHONUNBUFFERED=1
# 15,000 steps (STEPS), at most MINUTES of training (default 9, compilation included) on a slower GPU
python3 scripts/cifar10_gpu.py train --out "$OUT" --data "$DATA" --minutes "${MINUTES:-9}" --max-steps "${STEPS:-15000}"
python3 scripts/cifar10_gpu.py eval --out "$OUT" --data "$DATA" --fp32-check --nfe 5,10,20,50 ${WEIGHTS:+--weights "$WEIGHTS"} \
    --cache "$OUT/fid_cache"
