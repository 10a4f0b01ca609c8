#!/usr/bin/env bash
# The engine on aarch64 under emulation (qemu-aarch64 -cpu max: NEON, fp16 and dot-product
# instructions enabled, so tract's ARM kernels really execute). Cross-builds (static glibc, see
# cross-env.sh) and runs:
#   1. the runtime's unit tests (percentiles, pacing, profile parsing) under qemu;
#   2. the fixture test: every transformers fixture exported and run by the aarch64 CLI
#      (PERCEIVER_EDGE_TEST_RUNNER starts it under qemu), outputs against transformers';
#   3. the board binary (no exporter) on every fixture exported by the host in f32, f16, int8 and
#      q4: f32 against transformers, the others against the host build running the same graph
#      (models/reference/check_device.py), so ARM's fp16 / int8 (SDOT) / 4-bit kernels are
#      checked against x86's.
# The onnxruntime half of the fixture test is architecture-independent: the host suite runs it.
# Needs the host build (scripts/test.sh makes it) and a python with numpy (PERCEIVER_EDGE_PYTHON
# or python3). Extra arguments go to the fixture test binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. targets/cross-env.sh
cross_setup aarch64
py=${PERCEIVER_EDGE_PYTHON:-python3}
host=${PERCEIVER_EDGE_HOST_BIN:-target/release/perceiver-edge}
[ -n "${PERCEIVER_EDGE_HOST_BIN:-}" ] || env -u RUSTC -u RUSTDOC cargo build --release -p perceiver-edge

t0=$SECONDS
cargo test --release --target "$TRIPLE" -p perceiver-edge-runtime --lib --no-run
cargo test --release --target "$TRIPLE" -p perceiver-edge --test fixtures --no-run
echo "== cross build of the tests took $((SECONDS - t0)) s"

t0=$SECONDS
cargo test --release --target "$TRIPLE" -p perceiver-edge-runtime --lib
env -u PERCEIVER_EDGE_PYTHON PERCEIVER_EDGE_TEST_RUNNER="$QEMU" \
  cargo test --release --target "$TRIPLE" -p perceiver-edge --test fixtures -- --nocapture "$@"
echo "== aarch64 unit + fixture tests under qemu took $((SECONDS - t0)) s"

# The board binary last: it replaces the test's CLI (same path, no exporter).
t0=$SECONDS
cargo build --release --target "$TRIPLE" -p perceiver-edge --no-default-features
board=target/$TRIPLE/release/perceiver-edge
for p in f32 f16 int8 q4; do
  echo "== board binary under qemu, precision $p"
  "$py" models/reference/check_device.py --bin "$board" --runner "$QEMU" --export-bin "$host" --precision "$p"
done
echo "== board binary checks under qemu took $((SECONDS - t0)) s"
