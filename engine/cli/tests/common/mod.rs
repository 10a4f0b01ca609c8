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

/// Every file under `dir` with its bytes (a symlink: its target, never followed).
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut m = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                m.insert(p.clone(), target.to_string_lossy().as_bytes().to_vec());
            } else if p.is_dir() {
                stack.push(p);
            } else {
                m.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    m
}

/// Runs the CLI and expects bad input handled: exit status 1 (never 101 from a panic, never a
/// signal), exactly one `error:` line containing every needle, and `dir` unchanged afterwards
/// (nothing created, removed or changed).
pub fn refused(dir: &Path, args: &[&dyn AsRef<std::ffi::OsStr>], needles: &[&str]) {
    let before = snapshot(dir);
    let out = bin().args(args.iter().map(|a| a.as_ref())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().to_string()).collect();
    assert_eq!(out.status.code(), Some(1), "exit status for {shown:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line for {shown:?}, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{shown:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{shown:?}: the error should mention `{n}`: {err}");
    }
    let after = snapshot(dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{shown:?}: files appeared or vanished"
    );
    for (p, b) in &before {
        assert!(after[p] == *b, "{shown:?}: {} changed", p.display());
    }
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Copies the files of folder `from` into `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Tensors of a safetensors file as (name, dtype, shape, bytes), sorted by name.
pub type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Reads the tensors of a safetensors file.
pub fn tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Tensors =
        st.iter().map(|(n, t)| (n.to_string(), t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes tensors as a safetensors file.
pub fn write_tensors(path: &Path, ts: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
    let views: std::collections::HashMap<String, safetensors::tensor::TensorView> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The training Python (torch + transformers): `PERCEIVER_EDGE_TRAIN_PYTHON`, or the venv
/// `distill` creates on first use.
pub fn train_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PERCEIVER_EDGE_TRAIN_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("PERCEIVER_EDGE_TRAIN_VENV").map(PathBuf::from).or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(cache.join("perceiver-edge/train-venv"))
    })?;
    venv.join(".perceiver-edge-ready").is_file().then(|| venv.join("bin/python"))
}

/// The training Python, or `None` with a SKIPPED message; a failure instead when
/// `PERCEIVER_EDGE_REQUIRE_TRAIN` is set (CI sets it: there the tests must run).
pub fn require_train_python(test: &str) -> Option<PathBuf> {
    let p = train_python();
    if p.is_none() {
        assert!(
            std::env::var_os("PERCEIVER_EDGE_REQUIRE_TRAIN").is_none(),
            "{test}: PERCEIVER_EDGE_REQUIRE_TRAIN is set but there is no training Python \
             (set PERCEIVER_EDGE_TRAIN_PYTHON to a Python with models/requirements-train.txt)"
        );
        eprintln!(
            "SKIPPED {test}: no training Python (set PERCEIVER_EDGE_TRAIN_PYTHON to a Python with \
             models/requirements-train.txt installed)"
        );
    }
    p
}

/// (cosine similarity, max |a - b| / max |b|).
pub fn metrics(a: &perceiver_edge_runtime::Tensor, b: &perceiver_edge_runtime::Tensor) -> (f64, f64) {
    assert_eq!(a.shape(), b.shape());
    let a: Vec<f32> = perceiver_edge_runtime::to_vec(a).unwrap();
    let b: Vec<f32> = perceiver_edge_runtime::to_vec(b).unwrap();
    let (mut dot, mut na, mut nb, mut maxd, mut maxb) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (*x as f64, *y as f64);
        assert!(x.is_finite(), "non-finite output");
        dot += x * y;
        na += x * x;
        nb += y * y;
        maxd = maxd.max((x - y).abs());
        maxb = maxb.max(y.abs());
    }
    let cos = if na > 0.0 && nb > 0.0 { dot / (na.sqrt() * nb.sqrt()) } else { (na == nb) as u8 as f64 };
    (cos, if maxb > 0.0 { maxd / maxb } else { maxd })
}
