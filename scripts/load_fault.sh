#!/usr/bin/env bash
# Load and fault run against `beaa serve` on loopback (bounded: fixed jobs, requests, time).
# Builds beaa and the driver, makes a small random model at the insecure test parameters,
# runs concurrent clients through whole jobs (checked against the plaintext model), fires
# malformed requests, SIGKILLs the server once mid-job and restarts it on the same data
# directory. Prints one JSON line: requests, errors, jobs completed, bytes lost, peak RSS.
#   bash scripts/load_fault.sh [--jobs 6] [--clients 3] [--fuzz-requests 400] [--time-limit 240]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p evaluator --bin beaa --example load_fault >&2
cargo build --release -q -p beaa-engine --example random_model >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$target/release/examples/random_model" "$work/zoo/tiny" tiny >&2
"$target/release/examples/load_fault" --beaa "$target/release/beaa" --zoo "$work/zoo" \
  --model tiny --data-dir "$work/data" "$@"
