#!/usr/bin/env bash
# The main job: builds the beaa binary (release) and runs it.
#
#   bash scripts/run.sh            # = beaa demo
#   bash scripts/run.sh ARGS...    # = beaa ARGS...   (e.g. bench ckks --n 8192 --limbs 4 --json)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "[run] cargo build --release -p evaluator --bin beaa" >&2
cargo build --release -p evaluator --bin beaa
[ $# -gt 0 ] || set -- demo
echo "[run] ${CARGO_TARGET_DIR:-target}/release/beaa $*" >&2
exec "${CARGO_TARGET_DIR:-target}/release/beaa" "$@"
