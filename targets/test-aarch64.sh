#!/usr/bin/env bash
# The test suite on aarch64 under emulation: cross-builds every test binary (release) for
# aarch64-unknown-linux-gnu and runs them with qemu-aarch64 -cpu max (NEON, fp16 and dot-product
# instructions enabled, so tract's ARM kernels really execute). The fixture tests export and run
# all 19 transformers fixtures through the aarch64 CLI (PERCEIVER_EDGE_TEST_RUNNER starts it
# under qemu). Doc tests are host-only (the README example runs in scripts/test.sh). The
# onnxruntime half of the fixture test is arch-independent and runs on the host suite, so it is
# skipped here. Extra arguments go to the test binaries (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
. targets/cross-env.sh
cross_setup aarch64
t0=$SECONDS
cargo test --release --workspace --tests --no-run --target "$TRIPLE"
echo "== cross build of the test binaries took $((SECONDS - t0)) s"
t0=$SECONDS
env -u PERCEIVER_EDGE_PYTHON PERCEIVER_EDGE_TEST_RUNNER="$QEMU" \
  cargo test --release --workspace --tests --target "$TRIPLE" -- "$@"
echo "== aarch64 tests under qemu took $((SECONDS - t0)) s"
