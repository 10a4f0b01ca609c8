//! Helpers shared by the CLI integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// `models/reference/fixtures` (transformers' reference outputs).
pub fn fixtures_dir() -> PathBuf {
    root().join("models/reference/fixtures")
}

/// The CLI binary; under emulation (`PERCEIVER_EDGE_TEST_RUNNER="qemu-aarch64 -cpu max"`,
/// set by targets/test-aarch64.sh) it is started through the emulator, as cargo starts the tests.
pub fn bin() -> Command {
    let exe = env!("CARGO_BIN_EXE_perceiver-edge");
    let runner = std::env::var("PERCEIVER_EDGE_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emulator) => {
            let mut cmd = Command::new(emulator);
            cmd.args(words).arg(exe);
            cmd
        }
        None => Command::new(exe),
    }
}

/// The Python interpreter with onnx + onnxruntime: `PERCEIVER_EDGE_PYTHON` (required to work
/// when set, as in CI) or `python3` if it has them.
pub fn python() -> Option<String> {
    if let Ok(p) = std::env::var("PERCEIVER_EDGE_PYTHON") {
        return Some(p);
    }
    let ok = Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| "python3".to_string())
}
