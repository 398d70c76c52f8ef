#!/usr/bin/env bash
# OCT (OCTDL ERM vs NO) family: ReLU teacher from scratch, then polynomial students
# initialised from it (least-squares ReLU fit), fine-tuned with and without KD.
# This is the table's single-split family from teachers trained from scratch; the shipped
# models/zoo/octdl (since 2026-12-05) starts its teacher from a CIFAR-10 run instead
# (--pretrained): its commands are in models/README.md, "OCT cross-validation".
# Re-running resumes/skips finished runs. One thread. Usage:
#   BIN=target-models/release/beaa-train DATA=/work/data/OCTDL RUNS=/work/runs bash models/scripts/train_oct.sh
set -euo pipefail
BIN=${BIN:-target-models/release/beaa-train}
DATA=${DATA:-/work/data/OCTDL}
RUNS=${RUNS:-/work/runs}
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
common=(--data "$DATA" --preset octdl --width 0.5 --batch 32 --seed 1)
"$BIN" fit --run "$RUNS/oct-relu" "${common[@]}" --act relu --epochs 60 --lr 0.05
for act in layer channel element; do
  "$BIN" fit --run "$RUNS/oct-$act" "${common[@]}" --act "$act" --init-from "$RUNS/oct-relu" --epochs 20
done
for act in channel element; do
  "$BIN" distill --run "$RUNS/oct-$act-kd" "${common[@]}" --act "$act" --teacher "$RUNS/oct-relu" --epochs 20
done
