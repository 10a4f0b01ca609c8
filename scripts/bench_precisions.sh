#!/usr/bin/env bash
# Latency and memory per precision on this machine (not a test: numbers depend on the host).
#   scripts/bench_precisions.sh [CHECKPOINT_DIR [EXPORT_OPTIONS...]]     (default: models/digits)
# Exports the checkpoint in every precision into a temporary folder, then runs
# `perceiver-edge bench` on each graph in its own process (so resident memory is per model).
# Compare ratios within one run: timings on a shared machine drift between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ck="${1:-models/digits}"
shift || true
runs="${BENCH_RUNS:-200}"
cargo build --release --quiet -p perceiver-edge
bin=${CARGO_TARGET_DIR:-target}/release/perceiver-edge
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for p in f32 f16 int8 int8-static q4; do
  "$bin" export "$ck" -o "$tmp/$p.onnx" --precision "$p" "$@" >/dev/null
done
echo "host: $(uname -m), $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs), checkpoint $ck $*"
for p in f32 f16 int8 int8-static q4; do
  "$bin" bench "$tmp/$p.onnx" --runs "$runs" | sed "s|$tmp/||"
done
