#!/usr/bin/env bash
# The test suite (what CI runs): every workspace test in the release profile, so tract is built
# once for the binary and the tests. The onnxruntime parity check needs a Python with onnx and
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
