//! Every reference fixture (models/reference/fixtures, produced by transformers) is exported and
//! run through the `perceiver-edge` binary as a user would; outputs must match transformers'
//! to `atol + rtol * |expected|`. The same ONNX files are then checked in onnxruntime.

use perceiver_edge_runtime::{npy, to_vec};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::*;

struct Case {
    fixture: String,
    dir: PathBuf,
    json: Value,
    atol: f64,
    rtol: f64,
}

fn cases() -> Vec<Case> {
    let mut out = vec![];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.join("fixture.json").is_file()) {
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
        for c in meta["cases"].as_array().unwrap() {
            out.push(Case {
                fixture: dir.file_name().unwrap().to_string_lossy().into(),
                atol: c["atol"].as_f64().or(meta["atol"].as_f64()).unwrap_or(1e-4),
                rtol: c["rtol"].as_f64().or(meta["rtol"].as_f64()).unwrap_or(1e-5),
                dir: dir.clone(),
                json: c.clone(),
            });
        }
    }
    out
}

fn export_case(c: &Case, onnx: &Path) {
    let args: Vec<&str> = c.json["export_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let out = bin().arg("export").arg(&c.dir).arg("-o").arg(onnx).args(&args).output().unwrap();
    assert!(out.status.success(), "export {} {:?}: {}", c.fixture, args, String::from_utf8_lossy(&out.stderr));
}

fn compare(c: &Case, name: &str, got: &Path, want: &Path) -> f64 {
    let g = npy::read_npy(got).unwrap();
    let w = npy::read_npy(want).unwrap();
    assert_eq!(g.shape(), w.shape(), "{}/{} {name}: shape", c.fixture, c.json["name"]);
    let g: Vec<f32> = to_vec(&g).expect("f32 output");
    let w: Vec<f32> = to_vec(&w).expect("f32 expected");
    let mut worst = 0f64;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let err = (*a as f64 - *b as f64).abs();
        let tol = c.atol + c.rtol * (*b as f64).abs();
        assert!(
            err <= tol,
            "{}/{} {name}[{i}]: got {a}, transformers {b} (|err| {err:.3e} > {tol:.3e})",
            c.fixture,
            c.json["name"]
        );
        worst = worst.max(err);
    }
    worst
}

/// Exports every fixture case into `dir` as `<fixture>__<case>.onnx`, runs it with the CLI at
/// one thread and at `run --threads 2`, and compares both against transformers' outputs.
fn export_and_run_all(dir: &Path) -> usize {
    let cases = cases();
    assert!(cases.len() >= 19, "fixtures missing: found {} cases", cases.len());
    for c in &cases {
        let case = c.json["name"].as_str().unwrap();
        let onnx = dir.join(format!("{}__{case}.onnx", c.fixture));
        export_case(c, &onnx);
        for threads in [1, 2] {
            let mut cmd = bin();
            cmd.arg("run").arg(&onnx);
            for i in c.json["inputs"].as_array().unwrap() {
                cmd.arg("--input").arg(c.dir.join(i["file"].as_str().unwrap()));
            }
            // Two threads' outputs in a folder of their own, apart from the ONNX files.
            let out_dir = match threads {
                1 => dir.join(format!("{}__{case}.out/", c.fixture)),
                _ => dir.join(format!("threads{threads}/{}__{case}.out/", c.fixture)),
            };
            std::fs::create_dir_all(&out_dir).unwrap();
            cmd.arg("--output").arg(&out_dir).args(["--threads", &threads.to_string()]);
            let out = cmd.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "run {}/{case} --threads {threads}: {stderr}", c.fixture);
            for o in c.json["outputs"].as_array().unwrap() {
                let name = o["name"].as_str().unwrap();
                let want = c.dir.join(o["file"].as_str().unwrap());
                let worst = compare(c, name, &out_dir.join(format!("{name}.npy")), &want);
                eprintln!("tract T{threads} {:>15}/{case:<7} {name:<18} max |err| {worst:.2e}", c.fixture);
            }
        }
    }
    cases.len()
}

#[test]
fn all_heads_match_transformers_in_tract_and_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let n = export_and_run_all(tmp.path());
    let Some(py) = python() else {
        eprintln!("onnxruntime check skipped: set PERCEIVER_EDGE_PYTHON to a python with onnx + onnxruntime (scripts/test.sh does)");
        return;
    };
    let out = Command::new(&py)
        .arg(root().join("models/reference/check_onnxruntime.py"))
        .arg("--onnx-dir")
        .arg(tmp.path())
        .arg("--fixtures")
        .arg(fixtures_dir())
        .arg("--require-all")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "onnxruntime check failed");
    assert!(stdout.contains(&format!("{n} passed, 0 failed")), "onnxruntime checked every case");
}
