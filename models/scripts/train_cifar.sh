#!/usr/bin/env bash
# CIFAR-10 family: ReLU teacher from scratch, then polynomial students initialised from it
# (least-squares ReLU fit), fine-tuned with and without KD. Re-running resumes/skips
# finished runs. One thread. Usage:
#   BIN=target-models/release/beaa-train DATA=/work/data/train RUNS=/work/runs bash models/scripts/train_cifar.sh
set -euo pipefail
BIN=${BIN:-target-models/release/beaa-train}
DATA=${DATA:-/work/data/train}
RUNS=${RUNS:-/work/runs}
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
common=(--data "$DATA" --preset cifar10 --seed 1)
"$BIN" fit --run "$RUNS/cifar-relu" "${common[@]}" --act relu --epochs 15
for act in element channel; do
  "$BIN" distill --run "$RUNS/cifar-$act-kd" "${common[@]}" --act "$act" --teacher "$RUNS/cifar-relu" --epochs 10
done
for act in element channel layer; do
  "$BIN" fit --run "$RUNS/cifar-$act" "${common[@]}" --act "$act" --init-from "$RUNS/cifar-relu" --epochs 10
done
