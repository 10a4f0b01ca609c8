#!/usr/bin/env bash
# The default demo: build the CLI, export the bundled digits model (no options: sizes come from
# its config.json), inspect it, and classify the bundled sample digits with the tract engine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/perceiver-edge
out=${OUT_DIR:-target/demo}
mkdir -p "$out"
$bin export models/digits -o "$out/digits.onnx"
for f in models/digits/samples/digit_*.npy; do
  name=$(basename "$f" .npy)
  $bin run "$out/digits.onnx" --input "$f" --output "$out/$name.logits.npy" --print
done
echo "true labels: $(cat models/digits/samples/labels.json)"
