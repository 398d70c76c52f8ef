#!/usr/bin/env bash
# Builds the wasm package (release) and measures it in headless Chromium; JSON on stdout.
#   bash scripts/bench_wasm.sh [--preset n32768] [--reps 5] [--workers 1,2] [--cts 64] [--features 3072]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
wasm-pack build --mode no-install --release --target web --out-dir "$PWD/web/pkg" wasm-client >&2
exec node scripts/bench_wasm.mjs "$@"
