#!/usr/bin/env bash
# Side-by-side training-step timing, beaa-train (candle + our im2col/fused kernels) vs PyTorch,
# same network, batch and thread count, alternating runs so background load hits both alike.
#   PY=/path/to/python-with-torch BIN=target-models/release/beaa-train bash models/scripts/bench_compare.sh
set -euo pipefail
BIN=${BIN:-target-models/release/beaa-train}
PY=${PY:-python3}
BATCH=${BATCH:-128}
STEPS=${STEPS:-10}
ROUNDS=${ROUNDS:-3}
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
here=$(dirname "$0")
for r in $(seq "$ROUNDS"); do
  "$BIN" bench --batch "$BATCH" --steps "$STEPS" --json | sed "s/^{/{\"round\":$r,\"framework\":\"beaa-train (candle)\",/"
  "$PY" "$here/bench_torch.py" --batch "$BATCH" --steps "$STEPS" --threads 1 | sed "s/^{/{\"round\":$r,/"
done
