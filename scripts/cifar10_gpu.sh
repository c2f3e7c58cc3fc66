#!/usr/bin/env bash
# One GPU, about 20 minutes: train the CIFAR-10 U-Net on the JPEG CIFAR-10 copy in ../shared/data, then
# FID on 5,000 samples for eta in {0, 1, hat} x S in {10, 20, 50, 100} (Table 1), reconstruction error
# (Table 2), FID-vs-S plot, sample grids, FID against NFE for DDIM and the ODE solvers, and the bf16-vs-fp32
# numerics check.
#
#   scripts/cifar10_gpu.sh OUT_DIR [DATA_NPZ] [INCEPTION_WEIGHTS]
#
# INCEPTION_WEIGHTS: torch-fidelity-format FID Inception weights (see ddim.eval.fid.resolve_inception_weights;
# without it that function's own search is used). MINUTES (default 7.6, the recorded run) sets the training budget.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/cifar10_gpu.sh OUT_DIR [DATA_NPZ] [INCEPTION_WEIGHTS]}
DATA=${2:-../shared/data/cifar10_jpeg_q75.npz}
WEIGHTS=${3:-}
export PYTHONUNBUFFERED=1
# --no-ema-warmup: the recorded run predates the EMA warm-up (then 0.9995 ** 15,000 = 0.06 % of the initial
# weights were left in the EMA; the warm-up, now the default, leaves none)
python3 scripts/cifar10_gpu.py train --out "$OUT" --data "$DATA" --minutes "${MINUTES:-7.6}" --no-ema-warmup
python3 scripts/cifar10_gpu.py eval --out "$OUT" --data "$DATA" --fp32-check --nfe 5,10,20,50 ${WEIGHTS:+--weights "$WEIGHTS"} \
    --cache "$OUT/fid_cache"
