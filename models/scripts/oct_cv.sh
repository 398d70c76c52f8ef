#!/usr/bin/env bash
# OCT (OCTDL ERM vs NO) K-fold patient-level cross-validation of the teacher and the shipped
# recipe (element-wise + KD): fold k validates on the k-th share of each class's patients,
# so the pooled table row scores all 366 images once instead of one 98-image split.
# Re-running resumes/skips finished runs. One thread. Usage:
#   BIN=target/release/beaa-train DATA=/work/data/OCTDL RUNS=/work/runs/oct-cv FOLDS=5 SIZE=64 \
#     STUDENT_FLAGS="--freeze-bn" TAG=-fb bash models/scripts/oct_cv.sh [act ...]
# (students: element by default; `none` trains the teachers only). TAG names the student runs
# of one STUDENT_FLAGS setting; TEACHER_TAG the teachers of one TEACHER_FLAGS setting (e.g.
# TEACHER_FLAGS="--pretrained /work/runs/cifar-relu-w05" TEACHER_TAG=-pt: teachers started
# from a CIFAR-10 run of the same widths; TEACHER_LR sets their peak rate, 0.05 by default;
# STUDENT_EPOCHS the students' epochs, 20 by default).
# ONLY="0 2 4" runs just those folds (two processes, one per core, on disjoint folds).
set -euo pipefail
BIN=${BIN:-target/release/beaa-train}
DATA=${DATA:-/work/data/OCTDL}
RUNS=${RUNS:-/work/runs/oct-cv}
FOLDS=${FOLDS:-5}
SIZE=${SIZE:-64}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-60}
TEACHER_LR=${TEACHER_LR:-0.05}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-20}
TAG=${TAG:-}
TEACHER_TAG=${TEACHER_TAG:-}
read -r -a student_flags <<< "${STUDENT_FLAGS:-}"
read -r -a teacher_flags <<< "${TEACHER_FLAGS:-}"
acts=("$@")
[ ${#acts[@]} -gt 0 ] || acts=(element)
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
read -r -a only <<< "${ONLY:-$(seq -s ' ' 0 $((FOLDS - 1)))}"
for k in "${only[@]}"; do
  common=(--data "$DATA" --preset octdl --size "$SIZE" --width 0.5 --batch 32 --seed 1 --folds "$FOLDS" --fold "$k")
  t="$RUNS/relu-$SIZE-e$TEACHER_EPOCHS$TEACHER_TAG-f$k"
  "$BIN" fit --run "$t" "${common[@]}" --act relu --epochs "$TEACHER_EPOCHS" --lr "$TEACHER_LR" \
    ${teacher_flags[@]+"${teacher_flags[@]}"}
  for act in "${acts[@]}"; do
    [ "$act" = none ] && continue
    "$BIN" distill --run "$RUNS/$act-kd$TAG-$SIZE-e$TEACHER_EPOCHS$TEACHER_TAG-f$k" "${common[@]}" --act "$act" \
      --teacher "$t" --epochs "$STUDENT_EPOCHS" ${student_flags[@]+"${student_flags[@]}"}
  done
done
