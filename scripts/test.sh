#!/usr/bin/env bash
# Runs every test of the project; the one command the README and CI use.
#
#   bash scripts/test.sh
#
# Stages, in order (each prints a banner; the first failure stops the run):
#   setup   scripts/setup.sh (tools: wasm target, wasm-bindgen-cli, wasm-pack,
#           chromium + chromedriver, npm packages)
#   fmt     cargo fmt --all -- --check
#   clippy  cargo clippy --workspace --all-targets --release -- -D warnings
#   test    cargo test --workspace --release
#   wasm    wasm-pack test --headless --chrome wasm-client --release
#           (the wasm crate's tests in real headless Chromium), with the native
#           peer beaa-crosscheck running on 127.0.0.1 and its address passed at
#           build time in BEAA_CROSSCHECK_URL
#   web     page tests: node runs each tests/web/*.mjs (skipped if none); the
#           wasm package is built into web/pkg first
#
# Environment:
#   BEAA_SKIP="clippy wasm"  skip the named stages (space separated)
#   BEAA_ONLY="fmt test"     run only the named stages
#   CI=true                  sets CARGO_INCREMENTAL=0
#
# clippy runs with --release so that build scripts and proc-macros are shared
# with the release test build.
# Functions below are called indirectly (run_stage NAME DESC FUNC, trap).
# shellcheck disable=SC2317
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in *":$CARGO_BIN:"*) ;; *) export PATH="$CARGO_BIN:$PATH" ;; esac

if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
  export CARGO_INCREMENTAL=0
  export CARGO_TERM_COLOR=never
fi
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

START=$SECONDS
STAGE=""
STAGES_RUN=()

banner() { printf '\n==> [test.sh] stage %s: %s\n' "$1" "$2" >&2; }
on_exit() {
  local rc=$?
  stop_crosscheck
  if [ "$rc" -ne 0 ] && [ -n "$STAGE" ]; then
    printf '\n==> [test.sh] FAILED in stage "%s" (exit %d) after %ds\n' "$STAGE" "$rc" $((SECONDS - START)) >&2
  fi
}
trap on_exit EXIT

want() {
  local s=$1
  if [ -n "${BEAA_ONLY:-}" ]; then
    case " $BEAA_ONLY " in *" $s "*) ;; *) return 1 ;; esac
  fi
  case " ${BEAA_SKIP:-} " in *" $s "*) printf '==> [test.sh] stage %s: skipped (BEAA_SKIP)\n' "$s" >&2; return 1 ;; esac
  return 0
}

run_stage() {
  # run_stage NAME DESCRIPTION CMD...
  local name=$1 desc=$2; shift 2
  want "$name" || return 0
  STAGE=$name
  banner "$name" "$desc"
  local t0=$SECONDS
  "$@"
  printf '==> [test.sh] stage %s: ok (%ds)\n' "$name" $((SECONDS - t0)) >&2
  STAGES_RUN+=("$name")
  STAGE=""
}

page_tests() {
  shopt -s nullglob
  local files=("$ROOT"/tests/web/*.mjs)
  shopt -u nullglob
  if [ ${#files[@]} -eq 0 ]; then
    echo "no tests/web/*.mjs: no page tests to run" >&2
    return 0
  fi
  command -v node >/dev/null || { echo "node not found" >&2; return 1; }
  # The page loads the wasm package from web/pkg (gitignored): build it fresh.
  echo "building wasm package into web/pkg" >&2
  wasm-pack build --mode no-install --release --target web --out-dir "$ROOT/web/pkg" "$ROOT/wasm-client"
  # The end-to-end test runs the real server (beaa serve) on fixtures from beaa-fixtures;
  # it finds both in $(target_dir)/release.
  echo "building beaa and beaa-fixtures" >&2
  cargo build --release -p evaluator --bin beaa -p beaa-tests --bin beaa-fixtures
  export BEAA_CHROMIUM="${BEAA_CHROMIUM:-/usr/bin/chromium}"
  export BEAA_ROOT="$ROOT"
  export NODE_PATH="$ROOT/scripts/node/node_modules${NODE_PATH:+:$NODE_PATH}"
  local f failed=0
  for f in "${files[@]}"; do
    echo "--- node ${f#"$ROOT"/}" >&2
    if ! node --import "$ROOT/scripts/node/register.mjs" "$f"; then
      echo "--- FAILED: ${f#"$ROOT"/}" >&2
      failed=1
    fi
  done
  return "$failed"
}

target_dir() {
  local d="${CARGO_TARGET_DIR:-$ROOT/target}"
  case "$d" in /*) ;; *) d="$ROOT/$d" ;; esac
  printf '%s\n' "$d"
}

CROSSCHECK_PID=""
stop_crosscheck() {
  if [ -n "$CROSSCHECK_PID" ]; then
    kill "$CROSSCHECK_PID" 2>/dev/null || true
    wait "$CROSSCHECK_PID" 2>/dev/null || true
    CROSSCHECK_PID=""
  fi
}

start_crosscheck() {
  # The native peer of the browser's byte-format test (tests/src/bin/crosscheck.rs):
  # serves on 127.0.0.1, prints BEAA_CROSSCHECK_URL=..., exits by itself after --seconds.
  grep -q '"beaa-crosscheck"' "$ROOT/tests/Cargo.toml" 2>/dev/null || return 0
  echo "building and starting beaa-crosscheck (native peer on 127.0.0.1)" >&2
  cargo build --release -p beaa-tests --bin beaa-crosscheck
  local out
  out=$(mktemp)
  "$(target_dir)/release/beaa-crosscheck" --seconds 1800 >"$out" &
  CROSSCHECK_PID=$!
  local url=""
  for _ in $(seq 1 300); do
    url=$(sed -n 's/^BEAA_CROSSCHECK_URL=//p' "$out" | head -n 1)
    [ -n "$url" ] && break
    kill -0 "$CROSSCHECK_PID" 2>/dev/null || break
    sleep 0.1
  done
  rm -f "$out"
  [ -n "$url" ] || { echo "beaa-crosscheck did not print its address" >&2; return 1; }
  echo "beaa-crosscheck at $url (pid $CROSSCHECK_PID)" >&2
  # Read at compile time (option_env!) by wasm-client's browser tests.
  export BEAA_CROSSCHECK_URL="$url"
}

wasm_browser_tests() {
  start_crosscheck
  # --chromedriver: use Debian's driver; never let wasm-pack download one.
  # WASM_BINDGEN_USE_BROWSER=1: test binaries without wasm_bindgen_test_configure!
  # run in Chromium too (the runner's default for them would be Node.js).
  local rc=0
  WASM_BINDGEN_USE_BROWSER=1 wasm-pack test --mode no-install --headless --chrome \
    --chromedriver "$(command -v chromedriver)" --release "$ROOT/wasm-client" || rc=$?
  stop_crosscheck
  return "$rc"
}

main() {
  run_stage setup "install/check tools (scripts/setup.sh)" bash "$ROOT/scripts/setup.sh"
  run_stage fmt "cargo fmt --all -- --check" cargo fmt --all -- --check
  run_stage clippy "cargo clippy --workspace --all-targets --release -- -D warnings" \
    cargo clippy --workspace --all-targets --release -- -D warnings
  run_stage test "cargo test --workspace --release" cargo test --workspace --release
  run_stage wasm "wasm-pack test --headless --chrome wasm-client --release (headless Chromium)" wasm_browser_tests
  run_stage web "page tests (tests/web/*.mjs)" page_tests
  printf '\n==> [test.sh] all stages ok: %s (%ds)\n' "${STAGES_RUN[*]:-none}" $((SECONDS - START)) >&2
}

# Everything runs from inside main, which bash has parsed in full before it
# starts: editing this file (or a git checkout) during a run cannot derail it.
main "$@"
exit $?
