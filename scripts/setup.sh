#!/usr/bin/env bash
# Installs every tool the tests need; idempotent and quick when all is there.
#
#   bash scripts/setup.sh
#
# Installs (each only if missing or at the wrong version):
#   - the rustup target wasm32-unknown-unknown
#   - wasm-bindgen-cli at exactly the wasm-bindgen version in Cargo.lock
#   - wasm-pack (built with cargo; used with --mode no-install)
#   - Debian's chromium + chromium-driver (for wasm-pack test --headless --chrome
#     and the page tests)
#   - the locked npm packages of scripts/node/ (playwright-core, no browser download)
#
# Cargo installs are compiled under `nice`. Set BEAA_SETUP_SKIP_APT=1 to skip
# the Debian packages (e.g. when not root).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

WASM_PACK_VERSION=0.15.1

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Prefer the rustup-installed cargo bin dir (cargo install puts binaries there).
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in *":$CARGO_BIN:"*) ;; *) export PATH="$CARGO_BIN:$PATH" ;; esac

command -v cargo >/dev/null || die "cargo not found (install the Rust toolchain with rustup)"

# --- wasm32 target ------------------------------------------------------------
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  log "wasm32-unknown-unknown target: present"
else
  log "adding rustup target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown >&2
fi

# --- wasm-bindgen-cli, same version as Cargo.lock ---------------------------------
lock_version() {
  # Version of the package named $1 in Cargo.lock (first match).
  awk -v want="$1" '
    /^\[\[package\]\]/ { name = "" }
    /^name = / { gsub(/"/, "", $3); name = $3 }
    /^version = / && name == want { gsub(/"/, "", $3); print $3; exit }
  ' "$ROOT/Cargo.lock"
}
WB_VERSION=$(lock_version wasm-bindgen)
[ -n "$WB_VERSION" ] || die "wasm-bindgen not found in Cargo.lock"

have_wb=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
have_wbr=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have_wb" = "$WB_VERSION" ] && [ "$have_wbr" = "$WB_VERSION" ]; then
  log "wasm-bindgen-cli $WB_VERSION: present"
else
  log "installing wasm-bindgen-cli $WB_VERSION (have: ${have_wb:-none}); this compiles for several minutes"
  nice -n 10 cargo install wasm-bindgen-cli --version "$WB_VERSION" --force >&2
fi

# --- wasm-pack ----------------------------------------------------------------------
have_wp=$(wasm-pack --version 2>/dev/null | awk '{print $2}' || true)
if [ -n "$have_wp" ]; then
  log "wasm-pack $have_wp: present"
else
  log "installing wasm-pack $WASM_PACK_VERSION; this compiles for several minutes"
  nice -n 10 cargo install wasm-pack --version "$WASM_PACK_VERSION" >&2
fi

# --- Debian chromium + chromedriver ------------------------------------------------------
if [ "${BEAA_SETUP_SKIP_APT:-0}" = 1 ]; then
  log "skipping Debian packages (BEAA_SETUP_SKIP_APT=1)"
else
  missing=()
  for p in chromium chromium-driver; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "chromium + chromium-driver: present ($(dpkg-query -W -f='${Version}' chromium))"
  else
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only if the package lists don't know the packages yet.
    policy=$(apt-cache policy "${missing[@]}" 2>/dev/null || true)
    if [ "$(grep -c 'Candidate: [0-9]' <<<"$policy" || true)" -lt ${#missing[@]} ]; then
      log "apt-get update"
      $SUDO apt-get update -q >&2
    fi
    log "apt-get install ${missing[*]}"
    if ! $SUDO apt-get install -y -q "${missing[@]}" >&2; then
      log "install failed; retrying after apt-get update"
      $SUDO apt-get update -q >&2
      $SUDO apt-get install -y -q "${missing[@]}" >&2
    fi
  fi
  command -v chromedriver >/dev/null || die "chromedriver not on PATH after install"
fi

# --- npm packages for page tests ------------------------------------------------------
NODE_DIR="$ROOT/scripts/node"
if ! command -v npm >/dev/null; then
  log "npm not found: page tests will not be able to run"
elif [ -f "$NODE_DIR/package-lock.json" ] \
  && [ -f "$NODE_DIR/node_modules/.package-lock.json" ] \
  && [ ! "$NODE_DIR/package-lock.json" -nt "$NODE_DIR/node_modules/.package-lock.json" ]; then
  log "npm packages (scripts/node): present"
else
  log "npm packages (scripts/node): installing"
  # Playwright must never download its own browsers; we use Debian's chromium.
  export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
  if [ -f "$NODE_DIR/package-lock.json" ]; then
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
  else
    (cd "$NODE_DIR" && npm install --no-audit --no-fund --loglevel=error >&2)
  fi
fi

log "done"
