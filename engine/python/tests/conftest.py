"""Shared paths and models for the perceiver_edge tests (run by scripts/python.sh)."""

import os
import shutil
from pathlib import Path

import pytest

import perceiver_edge

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "models" / "reference" / "fixtures"
DIGITS = ROOT / "models" / "digits"


def cli_binary():
    """The perceiver-edge CLI the digits test compares against: $PERCEIVER_EDGE_BIN, else
    release/perceiver-edge in $CARGO_TARGET_DIR or the repository's target/."""
    env = os.environ.get("PERCEIVER_EDGE_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    return target / "release" / "perceiver-edge"


@pytest.fixture(scope="session")
def cli():
    path = cli_binary()
    if not path.is_file():
        pytest.fail(f"{path} not found: build it with `cargo build --release -p perceiver-edge` "
                    "(scripts/python.sh does) or set PERCEIVER_EDGE_BIN")
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("perceiver_edge")


@pytest.fixture(scope="session")
def digits_onnx(workdir):
    """models/digits exported with no options (f32)."""
    out = workdir / "digits.onnx"
    perceiver_edge.export(DIGITS, out)
    return out


@pytest.fixture(scope="session")
def digits(digits_onnx):
    return perceiver_edge.Model.load(digits_onnx)


@pytest.fixture(scope="session")
def seqcls_onnx(workdir):
    """The seqcls fixture (int64 token ids with a declared value range)."""
    out = workdir / "seqcls.onnx"
    perceiver_edge.export(FIXTURES / "seqcls", out)
    return out
