#!/usr/bin/env bash
# The main job: a simulated 2-module JUNGFRAU streamed through std-udp-recv, std-assembler and
# std-h5-writer (separate processes, shared memory, ZMQ) into an HDF5 file, then a summary of
# rates and losses and an independent h5py check of every pixel. Extra arguments go to
# `std-daq demo` (see `std-daq demo --help`), e.g. --images 2000 --rate 500.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --bins
mkdir -p demo-output
out="demo-output/std-daq-demo-$(date +%Y%m%d-%H%M%S).h5"
./target/debug/std-daq demo --output "$out" "$@"
detector=$(h5ls "$out" | awk '{print $1; exit}')
echo
echo "h5py check of every pixel against the simulator's formula:"
report=$(/usr/bin/python3 tests/python/verify_h5.py "$out" --detector "$detector" || true)
REPORT="$report" /usr/bin/python3 - <<'PY'
import json, os, sys
r = json.loads(os.environ["REPORT"])
print(f"  {r['exact_images']} of {r['images']} images exact, shape {r['shape']} {r['dtype']}, "
      f"ids strictly increasing: {r['ids_strictly_increasing']}, status counts {r['status_counts']}")
sys.exit(0 if r["exact_images"] == r["images"] else 1)
PY
