#!/usr/bin/env bash
# The main job: the evaluator with the web page, serving the shipped models at 128-bit
# parameters on http://127.0.0.1:8080/ (open it in a browser).
#
#   bash scripts/run.sh                # tools, beaa, the page's wasm package, then beaa serve
#   bash scripts/run.sh serve ARGS...  # the same with more serve options (e.g. --addr, --data-dir)
#   bash scripts/run.sh ARGS...        # beaa ARGS... (e.g. demo, plan --model cifar10,
#                                      # bench ckks --n 8192 --limbs 4 --json)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET="${CARGO_TARGET_DIR:-target}"
[ $# -gt 0 ] || set -- serve
if [ "$1" = serve ]; then
  # The page needs the wasm package: the wasm target and wasm-pack (no browser needed here).
  BEAA_SETUP_SKIP_APT=1 bash scripts/setup.sh
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  echo "[run] wasm-pack build wasm-client -> web/pkg" >&2
  wasm-pack build --mode no-install --release --target web --out-dir "$PWD/web/pkg" wasm-client >&2
fi
echo "[run] cargo build --release -p evaluator --bin beaa" >&2
cargo build --release -p evaluator --bin beaa
if [ "$1" = serve ]; then
  shift
  # conv2 and conv3 in Winograd's form (1.46x faster whole CIFAR-10 jobs, every prediction
  # equal at N = 32768 for both shipped models: BENCHMARKS.md) unless the caller chose.
  case " $* " in *" --winograd"*) ;; *) set -- --winograd "$@" ;; esac
  echo "[run] $TARGET/release/beaa serve --web-dir web $* (the page lists each model once it is planned, ~20-30 s each)" >&2
  exec "$TARGET/release/beaa" serve --web-dir web "$@"
fi
echo "[run] $TARGET/release/beaa $*" >&2
exec "$TARGET/release/beaa" "$@"
