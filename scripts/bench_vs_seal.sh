#!/usr/bin/env bash
# Benchmarks our CKKS (beaa bench ckks) against Microsoft SEAL (via TenSEAL) at the
# same ring degree, alternating the two so that machine noise hits both, then
# prints a side-by-side table with SEAL/ours ratios and writes the combined JSON.
#
#   bash scripts/bench_vs_seal.sh --n 32768 [--limbs 16] [--coeff-bits 60,40,...,60] \
#        [--rounds 3] [--reps R] [--out runs/bench-32768.json] [--build]
#
#   --n N            ring degree (8192, 16384, 32768); default 32768
#   --limbs L        our ciphertext limb count; default: SEAL's (len(coeff-bits) - 1,
#                    since SEAL keeps the last prime as the key-switching prime)
#   --coeff-bits B   SEAL's prime sizes (default per N, see scripts/seal_bench.py)
#   --rounds K       alternations ours/SEAL; each op's figure is the median over rounds (default 3)
#   --digits D       our key-switching digit count (passed to beaa; default: its own).
#                    --digits <limbs> gives our one special prime, one digit per prime:
#                    SEAL's own key-switching layout, for a like-for-like relin
#   --reps R         repetitions per op, passed to both (default: each tool's own)
#   --out FILE       combined JSON (default runs/bench-vs-seal-N<N>-<time>.json)
#   --build          cargo build --release -p evaluator first
#
# Needs: target/release/beaa (or BEAA_BIN=/path/to/beaa) and the SEAL venv from
# `bash scripts/setup-seal.sh` (or SEAL_PYTHON=/path/to/python with tenseal).
# Both benchmarks are single-threaded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

log() { printf '[bench_vs_seal] %s\n' "$*" >&2; }
die() { printf '[bench_vs_seal] ERROR: %s\n' "$*" >&2; exit 1; }

N=32768 LIMBS="" DIGITS="" COEFF_BITS="" ROUNDS=3 REPS="" OUT="" BUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --n) N=$2; shift 2 ;;
    --limbs) LIMBS=$2; shift 2 ;;
    --coeff-bits) COEFF_BITS=$2; shift 2 ;;
    --digits) DIGITS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --build) BUILD=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

BEAA="${BEAA_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/beaa}"
if [ "$BUILD" = 1 ]; then
  log "cargo build --release -p evaluator --bin beaa"
  cargo build --release -p evaluator --bin beaa
fi
[ -x "$BEAA" ] || die "our binary $BEAA is missing: build it with 'cargo build --release -p evaluator' (or pass --build, or set BEAA_BIN)"

SEAL_PY="${SEAL_PYTHON:-$ROOT/target/venv-seal/bin/python}"
[ -x "$SEAL_PY" ] || die "SEAL venv missing ($SEAL_PY): run 'bash scripts/setup-seal.sh' first"
"$SEAL_PY" -c 'import tenseal' 2>/dev/null || die "tenseal not importable by $SEAL_PY: run 'bash scripts/setup-seal.sh'"

seal_args=(--n "$N")
[ -n "$COEFF_BITS" ] && seal_args+=(--coeff-bits "$COEFF_BITS")
[ -n "$REPS" ] && seal_args+=(--reps "$REPS")

if [ -z "$LIMBS" ]; then
  LIMBS=$(PYTHONDONTWRITEBYTECODE=1 "$SEAL_PY" - "$N" "$COEFF_BITS" <<'PY'
import sys
sys.path.insert(0, "scripts")
from seal_bench import DEFAULT_COEFF_BITS
n, bits = int(sys.argv[1]), sys.argv[2]
cb = [int(x) for x in bits.split(",") if x] if bits else DEFAULT_COEFF_BITS[n]
print(len(cb) - 1)
PY
  ) || die "no default limb count for n=$N: pass --limbs"
fi

ours_args=(bench ckks --n "$N" --limbs "$LIMBS" --json)
[ -n "$DIGITS" ] && ours_args+=(--digits "$DIGITS")
[ -n "$REPS" ] && ours_args+=(--reps "$REPS")

if [ -z "$OUT" ]; then
  mkdir -p "$ROOT/runs"
  OUT="$ROOT/runs/bench-vs-seal-N$N-$(date -u +%Y%m%dT%H%M%SZ).json"
fi
mkdir -p "$(dirname "$OUT")"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
ours_files=() seal_files=()
for r in $(seq 1 "$ROUNDS"); do
  log "round $r/$ROUNDS: ours: $BEAA ${ours_args[*]}"
  if ! "$BEAA" "${ours_args[@]}" >"$TMP/ours-$r.json" 2>"$TMP/ours-$r.err"; then
    cat "$TMP/ours-$r.err" >&2
    die "'beaa bench ckks' failed (round $r)"
  fi
  ours_files+=("$TMP/ours-$r.json")
  log "round $r/$ROUNDS: SEAL: seal_bench.py ${seal_args[*]}"
  "$SEAL_PY" "$ROOT/scripts/seal_bench.py" "${seal_args[@]}" >"$TMP/seal-$r.json" || die "seal_bench.py failed (round $r)"
  seal_files+=("$TMP/seal-$r.json")
done

python3 "$ROOT/scripts/compare_bench.py" --ours "${ours_files[@]}" --seal "${seal_files[@]}" --out "$OUT"
