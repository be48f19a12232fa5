#!/usr/bin/env bash
# Benchmark of the whole pipeline (std-daq demo: 2 JUNGFRAU modules, 2 MiB images) at several
# frame rates, several trials each. Prints one line per trial and a summary table in Markdown.
# Usage: [MODULES=n] scripts/bench-pipeline.sh [seconds per trial] [trials] [rates...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-4}; trials=${2:-3}; shift 2 || true
rates=("$@"); [ ${#rates[@]} -gt 0 ] || rates=(100 200 300 400 500 600 800)
cargo build --workspace --bins -q
out=$(mktemp -d)
declare -A ok
# Warm-up (not counted): the first run after a pause touches fresh page-cache memory, which is
# very slow on these VMs.
RUST_BACKTRACE=0 ./target/debug/std-daq demo --modules "${MODULES:-2}" --images "$(( ${rates[0]} * secs ))" \
  --rate "${rates[0]}" --gso --output "$out/warmup.h5" >/dev/null 2>&1 || true
rm -f "$out/warmup.h5"
printf '| rate (Hz) | images/trial | lossless trials | written MB/s (median) |\n|---|---|---|---|\n' > "$out/table"
for rate in "${rates[@]}"; do
  n=$(( rate * secs )); good_trials=0; mbs=()
  for t in $(seq 1 "$trials"); do
    f="$out/r$rate-$t.h5"
    log=$(RUST_BACKTRACE=0 ./target/debug/std-daq demo --modules "${MODULES:-2}" --images "$n" --rate "$rate" --gso --output "$f" 2>&1 || true)
    good=$(sed -n 's/.*images written: *\([0-9]*\) (good \([0-9]*\).*/\2/p' <<<"$log")
    mb=$(sed -n 's/.*images\/s, \([0-9.]*\) MB\/s over.*/\1/p' <<<"$log")
    sent=$(sed -n 's/.*detector rate: *\([0-9.]*\) frames\/s.*/\1/p' <<<"$log")
    echo "rate=$rate trial=$t images=$n good=${good:-0} sent_rate=${sent:-?} written_MBps=${mb:-?}"
    [ "${good:-0}" = "$n" ] && good_trials=$((good_trials + 1))
    mbs+=("${mb:-0}")
    rm -f "$f"
  done
  med=$(printf '%s\n' "${mbs[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '| %s | %s | %s of %s | %s |\n' "$rate" "$n" "$good_trials" "$trials" "$med" >> "$out/table"
done
cat "$out/table"
rm -rf "$out"
