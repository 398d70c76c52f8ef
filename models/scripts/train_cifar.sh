#!/usr/bin/env bash
# CIFAR-10 family: ReLU teacher from scratch, then polynomial students initialised from it
# (least-squares ReLU fit), fine-tuned with and without KD, all with one recipe so the
# accuracy table compares like with like. Re-running resumes/skips finished runs. One thread.
# Usage:
#   BIN=target-models/release/beaa-train DATA=/work/data/train RUNS=/work/runs \
#     [TEACHER=models/runs/cifar-relu-30] [STUDENT_FLAGS="..."] [KD_FLAGS="..."] [TAG=-blend] \
#     bash models/scripts/train_cifar.sh [student ...]
# Students are named `ACT-kd` (distilled) or `ACT` (cross-entropy only), ACT one of
# element, channel, layer; default: all five in the order element-kd channel-kd element
# channel layer. TEACHER given: that finished run is used and no teacher is trained.
# Students land in $RUNS/cifar-STUDENT$TAG.
set -euo pipefail
BIN=${BIN:-target-models/release/beaa-train}
DATA=${DATA:-/work/data/train}
RUNS=${RUNS:-/work/runs}
TAG=${TAG:-}
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
common=(--data "$DATA" --preset cifar10 --seed 1)
if [ -z "${TEACHER:-}" ]; then
  TEACHER="$RUNS/cifar-relu"
  "$BIN" fit --run "$TEACHER" "${common[@]}" --act relu --epochs 15
fi
# Students: batch norm frozen (eval mode) while training, so they learn the function that
# encrypted inference runs. With batch statistics, the element-wise + KD student reached 83%
# training accuracy but 10% in eval mode (stacked quadratics: outliers no longer squashed by
# the batch's own variance). Quadratics fitted to ReLU progressively (layer by layer on the
# partly polynomial network's own inputs): the student starts at 51.7% in eval mode instead of
# 10% (channel-wise: it never left 10% with the all-at-once fit). ReLU blended out over the
# first 3 of 8 epochs: element-wise + KD 82.36% from the 30-epoch teacher (78.02% with 6 epochs
# from the fit alone, from the 15-epoch teacher; models/README.md, "CIFAR-10 students from the
# 30-epoch teacher"); about 2-2.5 h per student on one core. Element-wise coefficients trained
# as channel share + per-element offset (--poly-channel-share; a no-op for the other kinds):
# 84.10%, the shipped models/zoo/cifar10. STUDENT_FLAGS replaces these flags for every student
# alike (the table's earlier runs: the same without --poly-channel-share). KD_FLAGS are added
# for the distilled students only, e.g. KD_FLAGS="--feature-kd 1" (each activation's input
# pulled toward the teacher's): 85.98%, but framed images overflow its encrypted batch
# (models/README.md, "Feature distillation"), so it is not the default; the shipped
# models/zoo/cifar10 (85.96%) is that run plus 2 epochs with the off-data penalty
# ("Feature distillation made robust" there).
default_flags="--epochs 8 --relu-blend-epochs 3 --freeze-bn --poly-fit-progressive"
default_flags+=" --poly-channel-share"
read -r -a student_flags <<< "${STUDENT_FLAGS:-$default_flags}"
read -r -a kd_flags <<< "${KD_FLAGS:-}"
students=("$@")
[ ${#students[@]} -gt 0 ] || students=(element-kd channel-kd element channel layer)
for s in "${students[@]}"; do
  act=${s%-kd}
  case "$act" in element | channel | layer) ;; *) echo "unknown student $s" >&2; exit 2 ;; esac
  run="$RUNS/cifar-$s$TAG"
  if [ "$act" != "$s" ]; then
    "$BIN" distill --run "$run" "${common[@]}" --act "$act" --teacher "$TEACHER" "${student_flags[@]}" \
      ${kd_flags[@]+"${kd_flags[@]}"}
  else
    "$BIN" fit --run "$run" "${common[@]}" --act "$act" --init-from "$TEACHER" "${student_flags[@]}"
  fi
done
