#!/usr/bin/env bash
# Benchmark of the whole pipeline (std-daq demo: JUNGFRAU modules of 1 MiB, UDP GSO) at several
# frame rates, several trials each. Prints one line per trial and a summary table in Markdown.
# Usage: [MODULES=n] [WRITERS="1 2"] [OUT_DIR=dir] [DEMO_ARGS="..."] \
#        scripts/bench-pipeline.sh [seconds per trial] [trials] [rates...]
# WRITERS: one or more writer counts (`std-daq demo --writers`), run interleaved in the same
# trials, one table column group each. OUT_DIR: where the files go (e.g. /dev/shm to measure
# without the disk; default a temporary folder on /tmp's file system).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-4}; trials=${2:-3}; shift 2 || true
rates=("$@"); [ ${#rates[@]} -gt 0 ] || rates=(100 200 300 400 500 600 800)
read -r -a writer_counts <<<"${WRITERS:-1}"
read -r -a demo_args <<<"${DEMO_ARGS:-}"
cargo build --workspace --bins -q
out=$(mktemp -d "${OUT_DIR:-${TMPDIR:-/tmp}}/bench-pipeline.XXXXXX")
trap 'rm -rf "$out"' EXIT
demo() { # demo WRITERS IMAGES RATE FILE
  local writers=(); [ -n "${WRITERS:-}" ] && writers=(--writers "$1")
  RUST_BACKTRACE=0 ./target/debug/std-daq demo --modules "${MODULES:-2}" ${writers[@]+"${writers[@]}"} \
    --images "$2" --rate "$3" --gso --output "$4" ${demo_args[@]+"${demo_args[@]}"} 2>&1 || true
}
# Warm-up (not counted): the first run after a pause touches fresh page-cache memory, which is
# very slow on these VMs.
demo "${writer_counts[0]}" "$(( rates[0] * secs ))" "${rates[0]}" "$out/warmup.h5" >/dev/null
rm -f "$out"/warmup*.h5
header='| rate (Hz) | images/trial |'; rule='|---|---|'
for w in "${writer_counts[@]}"; do
  header+=" writers=$w lossless | good images/s | MB/s into the file |"; rule+='---|---|---|'
done
printf '%s\n%s\n' "$header" "$rule" > "$out/table"
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for rate in "${rates[@]}"; do
  n=$(( rate * secs ))
  declare -A good_trials=() goods=() mbs=()
  for t in $(seq 1 "$trials"); do
    for w in "${writer_counts[@]}"; do
      f="$out/r$rate-$t-w$w.h5"
      log=$(demo "$w" "$n" "$rate" "$f")
      written=$(sed -n 's/.*images written: *\([0-9]*\) (good.*/\1/p' <<<"$log")
      good=$(sed -n 's/.*images written: *\([0-9]*\) (good \([0-9]*\).*/\2/p' <<<"$log")
      lost=$(sed -n 's/.*images lost in shm: *\([0-9]*\).*/\1/p' <<<"$log")
      s=$(sed -n 's/.*MB\/s over \([0-9.]*\) s.*/\1/p' <<<"$log")
      sent=$(sed -n 's/.*detector rate: *\([0-9.]*\) frames\/s.*/\1/p' <<<"$log")
      # The writer's time from its first image to the file closed; a run that missed images on
      # the stream is stopped by the demo after 5 s without one: those 5 s are not writing.
      grep -q 'run ended: *stopped' <<<"$log" && s=$(awk -v s="${s:-0}" 'BEGIN {print s - 5}')
      # MB/s that went into the file: images with pixels (an image lost in shm costs no write).
      read -r gps mb < <(awk -v g="${good:-0}" -v w="${written:-0}" -v l="${lost:-0}" -v s="${s:-0}" \
        -v m="${MODULES:-2}" 'BEGIN {if (s <= 0) {print 0, 0} else
        {printf "%.0f %.1f\n", g / s, (w - l) * m * 1.048576 / s}}')
      echo "rate=$rate trial=$t writers=$w images=$n good=${good:-0} sent_rate=${sent:-?} good_per_s=$gps written_MBps=${mb:-?}"
      [ "${good:-0}" = "$n" ] && good_trials[$w]=$(( ${good_trials[$w]:-0} + 1 ))
      goods[$w]="${goods[$w]:-} $gps"; mbs[$w]="${mbs[$w]:-} ${mb:-0}"
      rm -f "$out"/r"$rate"-"$t"-w"$w"*.h5
    done
  done
  row="| $rate | $n |"
  for w in "${writer_counts[@]}"; do
    # shellcheck disable=SC2086  # word splitting of the collected numbers is wanted
    row+=" ${good_trials[$w]:-0} of $trials | $(median ${goods[$w]}) | $(median ${mbs[$w]}) |"
  done
  echo "$row" >> "$out/table"
  unset good_trials goods mbs
done
cat "$out/table"
