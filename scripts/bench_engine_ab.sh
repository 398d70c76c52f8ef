#!/usr/bin/env bash
# Encrypted inference of this checkout against an older commit, side by side: both binaries
# run `beaa bench inference --batch full` on the same random model at the same time, one
# thread each (one per core of this 2-core machine), so machine noise hits both alike.
# Prints one JSON object: each side's report, page faults, and the time ratio old/new.
#   bash scripts/bench_engine_ab.sh OLD_COMMIT [MODEL_SIZE]
# MODEL_SIZE as for `random_model` (default cifar10/1@8: full CIFAR-10 channel widths on an
# 8x8 input, 1/16 of the positions; about 5 minutes per side). Needs `perf` for the page
# faults (optional) and ~3 GB of disk per side.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: bench_engine_ab.sh OLD_COMMIT [MODEL_SIZE]}
size=${2:-cifar10/1@8}
work=$(mktemp -d /tmp/beaa-ab.XXXXXX)
trap 'git worktree remove --force "$work/old-tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p evaluator --bin beaa -p beaa-engine --example random_model >&2
git worktree add -q --detach "$work/old-tree" "$old" >&2
old_target="${BEAA_AB_OLD_TARGET:-/tmp/beaa-ab-target}"
(cd "$work/old-tree" && CARGO_TARGET_DIR="$old_target" cargo build --release -q -p evaluator --bin beaa) >&2
cp "$old_target/release/beaa" "$work/beaa-old"
cp "$target/release/beaa" "$work/beaa-new"
"$target/release/examples/random_model" "$work/model" "$size" >&2
echo "machine: $(nproc) cpus, $(uptime)" >&2
for side in old new; do
  faults=()
  command -v perf >/dev/null && faults=(perf stat -x, -e page-faults -o "$work/$side.faults")
  RAYON_NUM_THREADS=1 "${faults[@]}" "$work/beaa-$side" bench inference --model "$work/model" \
    --batch full --json --work-dir "$work/wd-$side" > "$work/$side.json" 2> "$work/$side.err" &
done
wait
python3 - "$work" "$old" "$size" <<'PY'
import json, sys, os
work, old, size = sys.argv[1:]
out = {"old_commit": old, "model": size}
for side in ("old", "new"):
    r = json.load(open(f"{work}/{side}.json"))
    f = f"{work}/{side}.faults"
    if os.path.exists(f):
        for line in open(f):
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[2] == "page-faults":
                r["page_faults"] = int(parts[0])
    out[side] = r
out["time_ratio_old_over_new"] = out["old"]["total_s"] / out["new"]["total_s"]
print(json.dumps(out))
PY
