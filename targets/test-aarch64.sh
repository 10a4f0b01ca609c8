#!/usr/bin/env bash
# The engine on aarch64 under emulation (qemu-aarch64 -cpu max: NEON, fp16 and dot-product
# instructions enabled, so tract's ARM kernels really execute). Cross-builds (static glibc, see
# cross-env.sh) in one cargo invocation, so tract is built once, and runs:
#   1. the runtime's unit tests (percentiles, pacing, profile parsing) under qemu;
#   2. the fixture test: every transformers fixture exported and run by the aarch64 CLI
#      (PERCEIVER_EDGE_TEST_RUNNER starts it under qemu), outputs against transformers';
#   3. the aarch64 CLI on every fixture exported by the host in f16, int8 and q4, against the host
#      build running the same graph (models/reference/check_device.py): ARM's fp16 / int8
#      (SDOT) / 4-bit kernels checked against x86's.
# The onnxruntime half of the fixture test is architecture-independent: the host suite runs it.
# Needs the host build (scripts/test.sh makes it) and a python with numpy (PERCEIVER_EDGE_PYTHON
# or python3). Extra arguments go to the fixture test binary (e.g. a name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
. targets/cross-env.sh
cross_setup aarch64
py=${PERCEIVER_EDGE_PYTHON:-python3}
host=${PERCEIVER_EDGE_HOST_BIN:-${CARGO_TARGET_DIR:-target}/release/perceiver-edge}
[ -n "${PERCEIVER_EDGE_HOST_BIN:-}" ] || env -u RUSTC -u RUSTDOC cargo build --release -p perceiver-edge

t0=$SECONDS
json=$(cargo test --release --target "$TRIPLE" -p perceiver-edge-runtime -p perceiver-edge --lib --test fixtures \
  --no-run --message-format=json-render-diagnostics)
exe() {
  "$py" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1" <<<"$json"
}
unit=$(exe perceiver_edge_runtime)
fixtures=$(exe fixtures)
cli=${CARGO_TARGET_DIR:-target}/$TRIPLE/release/perceiver-edge
echo "== cross build of the tests and the CLI took $((SECONDS - t0)) s"
file "$cli" 2>/dev/null || true

t0=$SECONDS
$QEMU "$unit"
env -u PERCEIVER_EDGE_PYTHON PERCEIVER_EDGE_TEST_RUNNER="$QEMU" $QEMU "$fixtures" --nocapture "$@"
echo "== aarch64 unit + fixture tests under qemu took $((SECONDS - t0)) s"

t0=$SECONDS
for p in f16 int8 q4; do
  echo "== aarch64 CLI under qemu, precision $p, against the host build"
  "$py" models/reference/check_device.py --bin "$cli" --runner "$QEMU" --export-bin "$host" --precision "$p"
done
echo "== quantised graphs under qemu took $((SECONDS - t0)) s"
