#!/usr/bin/env bash
# Upload throughput of `beaa serve` on loopback and the server's peak RSS at two total sizes
# (real server, temporary data directory, real keys and seeded ciphertexts at the production
# parameters of the shipped model `octdl`: 2,662,482 bytes per ciphertext). Prints one JSON
# object. Extra arguments go to `beaa bench upload` (see `beaa bench upload --help`), e.g.
#   bash scripts/bench_upload.sh --sizes-mb 256,1024 --connections 4 --start
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p evaluator --bin beaa >&2
echo "machine: $(nproc) cpus, $(uptime)" >&2
"$target/release/beaa" bench upload --json "$@"
