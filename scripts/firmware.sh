#!/usr/bin/env bash
# The firmware examples end to end (issue 6), what CI runs after scripts/test.sh (which runs
# their tests as workspace members):
#   1. perception-node on its simulated AMG8833 (digits model), 30 Hz, 300 frames
#   2. ar-headset on synthetic frames (marker model), 90 Hz, plain and with compositor stalls,
#      plus its localisation error on the marker model's stored held-out frames
#   3. the Cortex-M firmware under qemu-system-arm (M4F and M7), compared with the host engine
# Builds with --workspace so it reuses the build CI already made (same feature set).
# Needs for step 3: rustc-web rust-web-src lld qemu-system-arm (installed here if missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
out=${OUT_DIR:-target/fw}
mkdir -p "$out"

cargo build --release --quiet --workspace
bin=${CARGO_TARGET_DIR:-target}/release/perceiver-edge
$bin export models/digits -o "$out/digits.onnx" > /dev/null
$bin export models/marker -o "$out/marker.onnx" --seq-len 256 > /dev/null

echo "== perception-node (simulated I2C sensor, 30 Hz, 300 frames)"
"${CARGO_TARGET_DIR:-target}"/release/perception-node --model "$out/digits.onnx" --rate 30 --frames 300 --summary-only

echo "== ar-headset (synthetic frames, 90 Hz, 900 frames)"
"${CARGO_TARGET_DIR:-target}"/release/ar-headset --model "$out/marker.onnx" --frames 900
echo "== ar-headset with a 10 ms compositor stall every 45 frames (drop policy at work)"
"${CARGO_TARGET_DIR:-target}"/release/ar-headset --model "$out/marker.onnx" --frames 900 --spike-every 45 --spike-ms 10
echo "== ar-headset localisation error on models/marker/samples (tract f32)"
"${CARGO_TARGET_DIR:-target}"/release/ar-headset --model "$out/marker.onnx" --heldout models/marker/samples

echo "== cortex-m (qemu-system-arm)"
if ! { command -v qemu-system-arm && command -v ld.lld && [ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/src/rust ]; } > /dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc-web rust-web-src lld qemu-system-arm > /dev/null
fi
firmware-examples/cortex-m/run.sh
