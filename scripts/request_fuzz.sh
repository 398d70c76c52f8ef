#!/usr/bin/env bash
# Request fuzzer against `beaa serve` on loopback, bounded in time (default 600 s). Builds beaa
# and the driver, makes a small random model at the insecure test parameters, starts the
# server (short job TTL, small disk quota) and sends random, mutated and valid requests from
# several threads while checking every second that the server is alive and healthy. Prints one
# JSON line (requests by status and kind, 5xx, health failures, panics, peak RSS); exits
# non-zero on a crash, a failed health check, an undocumented 5xx or a panic in the log.
#   bash scripts/request_fuzz.sh [--seconds 600] [--threads 4] [--seed 1] [--max-disk-gb 0.3]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p evaluator --bin beaa --example request_fuzz >&2
cargo build --release -q -p beaa-engine --example random_model >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$target/release/examples/random_model" "$work/zoo/tiny" tiny >&2
"$target/release/examples/request_fuzz" --beaa "$target/release/beaa" --zoo "$work/zoo" \
  --model tiny --data-dir "$work/data" "$@"
