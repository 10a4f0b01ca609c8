#!/usr/bin/env bash
# Runs the cargo-fuzz targets (fuzz/, libFuzzer; needs nightly and `cargo install cargo-fuzz`)
# by hand, one after the other, and prints executions, time and crashes per target.
#
#   scripts/fuzz.sh [TARGET|all] [RUNS]      default: all, 1000000 runs each
#   FUZZ_TIME=SECONDS scripts/fuzz.sh ...    stop each target after SECONDS instead (-max_total_time)
#   FUZZ_BACKTRACE=1 scripts/fuzz.sh ...      print a backtrace for every panic, caught ones too (slow)
#   FUZZ_KEEP_GOING=1 FUZZ_TIME=SECONDS ...   record crashes and go on (-fork=1 -ignore_crashes=1
#                                             -ignore_ooms=1 -ignore_timeouts=1): to collect every
#                                             finding in one run; the default stops at the first
#
# Targets: export_checkpoint npy_inputs onnx_load_run board_profile pack_reader (bodies in
# engine/fuzz-targets). Each fuzzes fuzz/work/corpus/TARGET (new inputs land there, gitignored)
# seeded from the committed fuzz/corpus/TARGET (read only); crashes go to fuzz/artifacts/TARGET/
# (reproduce on stable: cargo run --release --workspace --example reproduce -- TARGET FILE).
#
# Build: `--sanitizer none` (coverage instrumentation only, no AddressSanitizer): the code under
# test is safe Rust apart from tract's kernels, ASan would cost a second instrumented tract build
# and a 2-3x slower run, and what it would add (out-of-bounds reads in unsafe code) Rust's
# bounds checks mostly report as panics already. `--debug-assertions`: overflow checks and
# debug asserts on, so a size computed from hostile input that overflows is a crash rather than
# a silent wrap. Absurd allocations: without a sanitizer libFuzzer's -malloc_limit_mb has no
# malloc hooks to work with, so the targets install perceiver_edge_fuzz_targets::alloc_cap
# (any single allocation over 2 GiB aborts: a crash); -rss_limit_mb=2048 bounds the total.
# -timeout=120: a legitimately large input (a config asking 262 block repetitions exports a
# 16 000-node graph in 2.5 s in a release build) takes 10-20x that instrumented with debug
# assertions on a shared 2-core machine; a hang still ends the run after 2 minutes.
# One build job (CARGO_BUILD_JOBS, default 1): the instrumented tract build takes ~30 min then.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
all=(export_checkpoint npy_inputs onnx_load_run board_profile pack_reader)
target=${1:-all}
runs=${2:-1000000}
if [ "$target" = all ]; then targets=("${all[@]}"); else targets=("$target"); fi
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
# A panic the library catches still goes through the default hook, which with RUST_BACKTRACE=1
# symbolises a backtrace (tens of ms with debug info): off unless asked for, or a run that
# meets many caught panics (tract's asserts on hostile graphs) runs several times slower.
export RUST_BACKTRACE=${FUZZ_BACKTRACE:-0}
flags=(--sanitizer none --debug-assertions)
cargo +nightly fuzz build "${flags[@]}" >&2
limit=(-runs="$runs")
[ -n "${FUZZ_TIME:-}" ] && limit=(-max_total_time="$FUZZ_TIME")
[ -n "${FUZZ_KEEP_GOING:-}" ] && limit+=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
summary=()
for t in "${targets[@]}"; do
  mkdir -p "work/corpus/$t" "artifacts/$t"
  log="work/$t.log"
  # Crashes: libFuzzer's crash-, oom-, timeout- and leak- files. slow-unit- files (an input that
  # took over 10 s, under -timeout) are reported apart: they are not failures.
  count() { find "artifacts/$t" -type f -name "$1" | wc -l; }
  findings() { echo $(( $(count 'crash-*') + $(count 'oom-*') + $(count 'timeout-*') + $(count 'leak-*') )); }
  before=$(findings)
  slow_before=$(count 'slow-unit-*')
  start=$(date +%s.%N)
  rc=0
  cargo +nightly fuzz run "${flags[@]}" "$t" "work/corpus/$t" "corpus/$t" -- \
    "${limit[@]}" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=120 -print_final_stats=1 \
    > "$log" 2>&1 || rc=$?
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  # fork mode prints no final stats: take the last status line (#EXECS ...)
  [ -z "$execs" ] && execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#' || true)
  [ -z "$execs" ] && execs='?'
  crashes=$(( $(findings) - before ))
  slow=$(( $(count 'slow-unit-*') - slow_before ))
  line=$(printf '%-18s %9s execs  %8.1f s  %7s exec/s  crashes %d  slow units %d  exit %d  (log fuzz/%s)' "$t" "$execs" "$secs" \
    "$( [ "$execs" != '?' ] && echo "$execs / $secs" | bc || echo '?')" "$crashes" "$slow" "$rc" "$log")
  echo "$line"
  summary+=("$line")
done
printf '%s\n' "== summary" "${summary[@]}"
