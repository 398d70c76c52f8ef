#!/usr/bin/env bash
# Opt-in: Python venv with TenSEAL (Microsoft SEAL 4.x) for the SEAL comparison
# benchmark (scripts/seal_bench.py, scripts/bench_vs_seal.sh). CI does not need it.
#
#   bash scripts/setup-seal.sh          # creates/updates target/venv-seal
#   BEAA_SEAL_VENV=/path bash scripts/setup-seal.sh
#
# Prints the venv's python path on stdout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TENSEAL_VERSION=0.3.18
VENV="${BEAA_SEAL_VENV:-$PWD/target/venv-seal}"
log() { printf '[setup-seal] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
if "$VENV/bin/python" -c "import tenseal, sys; sys.exit(0 if tenseal.__version__ == '$TENSEAL_VERSION' else 1)" 2>/dev/null; then
  log "tenseal $TENSEAL_VERSION: present in $VENV"
else
  log "pip install tenseal==$TENSEAL_VERSION into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "tenseal==$TENSEAL_VERSION"
fi
echo "$VENV/bin/python"
