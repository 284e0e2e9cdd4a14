#!/usr/bin/env bash
# Builds the libFuzzer targets with the stable toolchain and runs them.
#
#   fuzz/run.sh <seconds-per-target> [target...]   fuzz each target in turn (one job,
#                                                 nice 10), growing fuzz/corpus/<target>
#   fuzz/run.sh --replay [target...]              CI: run every committed seed and crash
#                                                 regression once, then 2 s of fuzzing each
#   fuzz/run.sh --build                           only build (release profile); run one
#                                                 input with target/<host>/release/<t> FILE
#
# Coverage instrumentation without nightly: `-Cpasses=sancov-module` plus the
# sanitizer-coverage LLVM options are stable rustc flags (no `-Zsanitizer`, so no ASan;
# Rust's own checks do that job: debug assertions and overflow checks are on).
# `--target` keeps the flags off build scripts and proc macros.
#
# Prints one line per target: executions, corpus size, crashes. Exits 1 on any crash.
# Crash inputs land in fuzz/artifacts/<target>/; logs in fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n 2,10p "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
mode=fuzz
if [ "$1" = "--replay" ]; then
  mode=replay
  secs=2
elif [ "$1" = "--build" ]; then
  mode=build
  secs=0
else
  secs=$1
  [[ "$secs" =~ ^[0-9]+$ ]] || usage
fi
shift
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^guestd-fuzz$')
targets=${*:-$all}

host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cdebug-assertions -Coverflow-checks"
profile=release
[ "$mode" = replay ] && profile=replay
build_start=$(date +%s)
# Not --locked: a dependency the agent gains is added to fuzz/Cargo.lock here.
nice -n 10 cargo build --profile "$profile" --target "$host" --bins
echo "fuzz build ($profile): $(( $(date +%s) - build_start )) s"
bin=target/$host/$profile
[ "$mode" = build ] && exit 0

mkdir -p corpus artifacts logs
shm=/dev/shm; [ -d "$shm" ] && [ -w "$shm" ] || shm=${TMPDIR:-/tmp}
GUESTD_FUZZ_SCRATCH=$(mktemp -d "$shm/guestd-fuzz.XXXXXX")
export GUESTD_FUZZ_SCRATCH
trap 'rm -rf "$GUESTD_FUZZ_SCRATCH"' EXIT
printf '%-18s %12s %8s %8s %8s\n' target execs exec/s corpus crashes
total=0; crashed=0
for t in $targets; do
  seeds=seeds/$t; regress=regressions/$t
  mkdir -p "$seeds" "$regress" "corpus/$t" "artifacts/$t"
  max_len=4096
  [ -f "seeds/$t.options" ] && max_len=$(sed -n 's/^max_len *= *//p' "seeds/$t.options")
  dict=()
  [ -f "seeds/$t.dict" ] && dict=(-dict="seeds/$t.dict")
  log=logs/$t.log
  # The first corpus dir receives new inputs; seeds and regressions are only read.
  status=0
  nice -n 10 "$bin/$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
    -max_len="$max_len" -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
    "${dict[@]}" "corpus/$t" "$seeds" "$regress" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  size=$(find "corpus/$t" -type f | wc -l)
  crashes=$(find "artifacts/$t" -type f | wc -l)
  printf '%-18s %12s %8s %8s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$size" "$crashes"
  total=$(( total + ${execs:-0} ))
  if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    crashed=1
    echo "--- $t failed (exit $status); end of $log:" >&2
    tail -40 "$log" >&2
  fi
done
echo "total executions: $total"
exit $crashed
