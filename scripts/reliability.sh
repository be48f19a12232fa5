#!/usr/bin/env bash
# Runs the reliability tests (fault matrix, crashes, outages, junk, soak) with their output and
# prints the figures each one reports, for docs/reliability.md. Set-up as scripts/test.sh.
#   bash scripts/reliability.sh                        # CI-sized soak (20 s)
#   STD_DAQ_SOAK_SECONDS=1800 bash scripts/reliability.sh   # with a 30-minute soak
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
cargo test -p std-daq-tests --test faults --test recovery --test writer_crash --test disk_full \
    --test slow_writer --test redis_outage --test garbage --test soak -- --nocapture >"$out" 2>&1 \
    || status=1
cargo test -p std-writer-agent --test crash --test broker_restart --test requests \
    -- --nocapture >>"$out" 2>&1 || status=1
grep -E '^test |^test result' "$out" || true
echo
echo "Figures ($(date -u +%Y-%m-%d)):"
grep '^FIGURES' "$out" | sed 's/^FIGURES //' || true
exit "$status"
