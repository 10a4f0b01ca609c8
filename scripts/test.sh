#!/usr/bin/env bash
# The test suite (what CI runs): every workspace test in the release profile, so tract is built
# once for the binary and the tests; then the patched tract-linalg's kernel tests. The onnxruntime parity check needs a Python with onnx and
# onnxruntime: set PERCEIVER_EDGE_PYTHON, or this script makes .venv from requirements-ci.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PERCEIVER_EDGE_PYTHON:-}" ]; then
  if ! .venv/bin/python -c "import onnx, onnxruntime, numpy" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r models/reference/requirements-ci.txt
  fi
  export PERCEIVER_EDGE_PYTHON="$PWD/.venv/bin/python"
fi
cargo test --release --workspace "$@"
# The patched tract-linalg (vendor/tract-linalg/PATCHES.md): tract's own tests of this host's
# matmul kernels and panel extractors against its reference implementation (debug profile:
# quicker to build).
case "$(uname -m)" in
  x86_64) kernels="x86_64::mmm:: x86_64::panel_extract" ;;
  aarch64) kernels=arm64:: ;;
  *) kernels= ;;
esac
cargo test --manifest-path vendor/tract-linalg/Cargo.toml --target-dir target/vendor-tests --lib -- $kernels
