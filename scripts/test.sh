#!/usr/bin/env bash
# Runs every test of std-daq: set-up (idempotent), build of all service binaries, then the unit,
# property and end-to-end tests (which start the real binaries as processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
cargo test --workspace "$@"
