#!/usr/bin/env bash
# Runs every test of std-daq: set-up (idempotent), build of all service binaries, then the unit,
# property and end-to-end tests (which start the real binaries as processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
cargo test --workspace "$@"
# A short bounded run of every cargo-fuzz target (docs/fuzzing.md); FUZZ_SECONDS=0 skips it.
if [ "${FUZZ_SECONDS:-10}" != 0 ]; then
  bash scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
fi
