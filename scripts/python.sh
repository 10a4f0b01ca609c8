#!/usr/bin/env bash
# The Python package (engine/python, `import perceiver_edge`): makes or reuses the venv .venv-py
# (maturin, pytest, numpy), builds and installs the package into it the way a user does
# (`pip install ./engine/python`, release profile; no build isolation, so the venv's maturin
# is used and nothing is downloaded), builds the CLI the tests compare against, and runs pytest
# on engine/python/tests. Cargo builds into $CARGO_TARGET_DIR (default: this repository's
# target/), so tract is shared with the other builds there. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
venv=.venv-py
export PATH="$PWD/$venv/bin:$PATH"  # the maturin build backend runs the venv's `maturin`
if ! "$venv/bin/python" -c "import maturin, pytest, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check maturin pytest numpy
fi
# The CLI the tests compare against. Selecting both packages resolves features as for the
# package, so the CLI uses the same tract build as the package (and as `cargo test --release
# --workspace`); `--bin` builds only the CLI (maturin builds the package below).
cargo build --release --quiet -p perceiver-edge -p perceiver-edge-python --bin perceiver-edge
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall ./engine/python
export PERCEIVER_EDGE_BIN="$CARGO_TARGET_DIR/release/perceiver-edge"
# Run from the tests folder's parent so pytest imports the installed package, not a source tree.
"$venv/bin/python" -m pytest engine/python/tests -q "$@"
