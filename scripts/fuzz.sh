#!/usr/bin/env bash
# Builds every cargo-fuzz target in tests/fuzz once, then runs each for SECONDS_PER_TARGET
# (default 10). Prints the executions per target; exits non-zero, naming the crash artifact, if any
# target finds a crash (panic, overflow, assertion, timeout or out-of-memory). docs/fuzzing.md.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Environment:
#   FUZZ_TARGETS       space-separated targets to run (default: all, from `cargo fuzz list`)
#   FUZZ_BUILD_FLAGS   cargo fuzz build flags (default "--dev --sanitizer none": the cheap CI build,
#                      overflow checks and debug assertions on; "--sanitizer address" is the
#                      optimised AddressSanitizer build for long runs)
#   FUZZ_JOBS          parallel fuzzing processes per target (default 1)
#
# New corpus entries go to tests/fuzz/corpus-local/<target> (not committed); the committed seeds in
# tests/fuzz/corpus/<target> are only read. Crash inputs land in tests/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-10}
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
  echo "usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET]  (a positive integer, default 10)" >&2
  exit 2
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is not installed (bash scripts/setup.sh installs it)" >&2
  exit 1
fi
# The toolchain is stable: this lets cargo fuzz use the nightly flags it needs (-Zsanitizer, ...).
export RUSTC_BOOTSTRAP=1

fuzz_dir=$PWD/tests/fuzz
read -r -a build_flags <<<"${FUZZ_BUILD_FLAGS:---dev --sanitizer none}"
jobs=${FUZZ_JOBS:-1}
if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
fi
if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz: no fuzz targets found in $fuzz_dir" >&2
  exit 1
fi
logs=$fuzz_dir/target/fuzz-logs
mkdir -p "$logs"

t0=$SECONDS
echo "fuzz: building ${#targets[@]} targets (cargo fuzz build ${build_flags[*]})"
cargo fuzz build --fuzz-dir "$fuzz_dir" "${build_flags[@]}"
echo "fuzz: build took $((SECONDS - t0)) s"

# Run the binaries just built (not `cargo fuzz run`, which would rebuild if a source changed
# meanwhile): cargo fuzz builds into target/<host triple>/{debug with --dev, release otherwise}.
host=$(rustc -vV | sed -n 's/^host: //p')
profile=release
for f in "${build_flags[@]}"; do
  case $f in --dev | -D) profile=debug ;; esac
done
bin_dir=$fuzz_dir/target/$host/$profile

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "$fuzz_dir/corpus-local/$t" "$fuzz_dir/artifacts/$t"
  corpora=("$fuzz_dir/corpus-local/$t")
  [ -d "$fuzz_dir/corpus/$t" ] && corpora+=("$fuzz_dir/corpus/$t")
  args=(-max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1
        -artifact_prefix="$fuzz_dir/artifacts/$t/")
  [ -f "$fuzz_dir/dict/$t.dict" ] && args+=(-dict="$fuzz_dir/dict/$t.dict")
  [ "$jobs" -gt 1 ] && args+=(-fork="$jobs")
  log=$logs/$t.log
  t1=$SECONDS
  status=0
  "$bin_dir/$t" "${args[@]}" "${corpora[@]}" >"$log" 2>&1 || status=$?
  # libFuzzer's final stats (fork mode prints only the "Done" line).
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  [ -n "$execs" ] || execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
  line=$(printf '%-18s %12s executions in %4d s' "$t" "${execs:-?}" "$((SECONDS - t1))")
  if [ "$status" -ne 0 ]; then
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [ -n "$artifact" ]; then
      line+="  CRASH: $artifact"
    else
      line+="  FAILED (exit $status, no crash input; see $log)"
    fi
    failed+=("$t")
    echo "fuzz: $t failed; the end of $log:" >&2
    grep -v '^#[0-9]' "$log" | tail -n 40 >&2
  fi
  echo "fuzz: $line"
  summary+=("$line")
done

echo "fuzz: summary (${secs} s per target, $((SECONDS - t0)) s in all; logs in $logs)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]}; reproduce with" >&2
  echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz ${build_flags[*]} <target> <artifact>" >&2
  echo "  (or run $bin_dir/<target> <artifact>)" >&2
fi
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
