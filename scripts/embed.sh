#!/usr/bin/env bash
# The C API end to end (docs/embedding.md), what CI runs after scripts/test.sh:
#   1. builds libperceiver_edge.{a,so} (engine/capi) and the CLI, then the C and C++ examples
#      (firmware-examples/c-api, system cc / c++, static link);
#   2. runs both on models/digits/samples/digit_*.npy and on models/marker/samples/tokens_*.npy
#      (exported with --seq-len 256) and checks every class and every printed output value
#      against `perceiver-edge run` on the same files: bit-identical float32 (scripts/embed_check.py);
#   3. runs the C example (and the C++ one) under valgrind --leak-check=full when valgrind is
#      installed (Debian: apt-get install valgrind): any error or definite / possible leak fails.
# Builds with --workspace so it reuses the build CI already made (same feature set: building the
# capi package alone unifies features differently and rebuilds tract).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
target=$(mkdir -p "${CARGO_TARGET_DIR:-target}" && cd "${CARGO_TARGET_DIR:-target}" && pwd)
out=${OUT_DIR:-$target/embed}
mkdir -p "$out"
rm -rf "$out/cli"

cargo build --release --quiet --workspace
bin=$target/release/perceiver-edge
make --no-print-directory -C firmware-examples/c-api TARGET_DIR="$target" > "$out/make.log" 2>&1 || { cat "$out/make.log"; exit 1; }
ex=$target/c-api
$bin export models/digits -o "$out/digits.onnx" > /dev/null
$bin export models/marker -o "$out/marker.onnx" --seq-len 256 > /dev/null

# run NAME MODEL SAMPLES...: the CLI's outputs per sample, then both examples' JSON lines.
run() {
  local name=$1 model=$2
  shift 2
  for f in "$@"; do
    $bin run "$model" --input "$f" --output "$out/cli/$name/$(basename "$f" .npy)/" > /dev/null
  done
  "$ex/classify" "$model" "$@" > "$out/$name.c.jsonl"
  "$ex/perception_loop" "$model" "$@" > "$out/$name.cpp.jsonl" 2> "$out/$name.cpp.log"
}
# check NAME SAMPLE_COUNT: classes and values against the CLI (one compact line per example line).
check() {
  python3 scripts/embed_check.py --model "$1" --cli "$out/cli/$1" --samples "$2" "$out/$1.c.jsonl" "$out/$1.cpp.jsonl"
}

echo "== digits: C and C++ examples on models/digits/samples/digit_*.npy"
run digits "$out/digits.onnx" models/digits/samples/digit_*.npy
cat "$out/digits.c.jsonl" "$out/digits.cpp.jsonl"
check digits 5
echo "== marker (--seq-len 256): C and C++ examples on models/marker/samples/tokens_*.npy (256 logits per line, in $out/marker.*.jsonl)"
run marker "$out/marker.onnx" models/marker/samples/tokens_*.npy
check marker 3

if command -v valgrind > /dev/null; then
  for prog in "classify" "perception_loop --repeat 2"; do
    echo "== valgrind --leak-check=full --error-exitcode=1: $prog on digits"
    # shellcheck disable=SC2086
    if ! valgrind --leak-check=full --error-exitcode=1 --log-file="$out/valgrind.log" \
        $ex/$prog "$out/digits.onnx" models/digits/samples/digit_*.npy > "$out/valgrind.jsonl" 2> /dev/null; then
      cat "$out/valgrind.log"
      echo "valgrind reported errors or leaks in $prog" >&2
      exit 1
    fi
    grep -E "in use at exit|definitely lost|indirectly lost|possibly lost|ERROR SUMMARY" "$out/valgrind.log" | sed 's/^==[0-9]*== */  /'
    # Same classes and outputs under valgrind's CPU emulation, to rounding: valgrind's CPU has no
    # AVX-512, so on a host with it tract runs other kernels (summing in another order).
    python3 scripts/embed_check.py --model "digits-valgrind" --cli "$out/cli/digits" --samples 5 --rtol 1e-5 \
        "$out/valgrind.jsonl" > /dev/null
  done
else
  echo "== valgrind not installed: leak check skipped (Debian: apt-get install valgrind)"
fi
echo "== embed: ok"
