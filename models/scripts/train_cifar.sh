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
# Students: batch norm frozen (eval mode) while training, so they learn the function that
# encrypted inference runs. With batch statistics, the element-wise + KD student reached 83%
# training accuracy but 10% in eval mode (stacked quadratics: outliers no longer squashed by
# the batch's own variance). Quadratics fitted to ReLU progressively (layer by layer on the
# partly polynomial network's own inputs): the student starts at 51.7% in eval mode instead of
# 10% (channel-wise: it never left 10% with the all-at-once fit). 6 epochs each: what one core
# affords per session.
students=(--epochs 6 --freeze-bn --poly-fit-progressive)
for act in channel element; do
  "$BIN" distill --run "$RUNS/cifar-$act-kd" "${common[@]}" --act "$act" --teacher "$RUNS/cifar-relu" "${students[@]}"
done
for act in element channel layer; do
  "$BIN" fit --run "$RUNS/cifar-$act" "${common[@]}" --act "$act" --init-from "$RUNS/cifar-relu" "${students[@]}"
done
