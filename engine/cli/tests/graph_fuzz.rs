//! The runtime's rewrites on random graphs of the blocks an export holds, chained in ways the
//! exported architectures never chain them (an attention reading an attention, LayerNorms in a
//! row, a fused value that is also an output), run by the binary and by onnxruntime
//! (`models/reference/graph_fuzz.py`): every output must agree. Seeded, so a failure names a graph
//! that always fails; `python models/reference/graph_fuzz.py --graphs 5000` runs more by hand.

use std::process::Command;

mod common;
use common::*;

/// Runs `graph_fuzz.py` on `graphs` graphs with `args` (skipped without a Python).
fn graph_fuzz(graphs: usize, args: &[&str]) {
    let Some(py) = python() else {
        eprintln!(
            "graph fuzz skipped: set PERCEIVER_EDGE_PYTHON to a python with onnx + onnxruntime (scripts/test.sh does)"
        );
        return;
    };
    if std::env::var("PERCEIVER_EDGE_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty()) {
        eprintln!("graph fuzz skipped under a test runner: onnxruntime runs on the host");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(py)
        .arg(root().join("models/reference/graph_fuzz.py"))
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_perceiver-edge"))
        .arg("--work")
        .arg(tmp.path())
        .args(["--graphs", &graphs.to_string()])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let all = format!("{graphs} passed, 0 failed");
    assert!(out.status.success() && stdout.contains(&all), "random graphs {args:?} differ from onnxruntime");
}

#[test]
fn random_graphs_match_onnxruntime() {
    graph_fuzz(400, &[]);
}

/// Sizes past the kernels' row, `k` and column blocks, attentions over several chunks of keys,
/// on two threads (the split products and attentions, the parts joined).
#[test]
fn large_random_graphs_on_two_threads_match_onnxruntime() {
    graph_fuzz(150, &["--large", "--threads", "2", "--seed", "100000"]);
}
