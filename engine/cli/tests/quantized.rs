//! Reduced-precision exports (`--precision f16|int8|int8-static|q4`) against the f32 export and
//! transformers' outputs: every committed fixture and the trained digits model, in tract and
//! (with PERCEIVER_EDGE_PYTHON or a python3 that has onnx + onnxruntime) in onnxruntime.
//!
//! Targets (issue #4): on every fixture, cosine similarity >= 0.999 for int8 and int8-static,
//! max abs error <= 1e-2 x max |reference| for f16, both against the f32 export and against
//! transformers. On the trained digits model: int8 top-1 agreement with f32 >= 99 % over >= 200
//! held-out inputs and accuracy within 1 point; weight bytes <= 0.30x (int8), <= 0.55x (f16),
//! <= 0.20x (q4) of f32.

use perceiver_edge_runtime::{npy, Session, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::*;

fn export(checkpoint: &Path, onnx: &Path, args: &[&str]) {
    let out = bin().arg("export").arg(checkpoint).arg("-o").arg(onnx).args(args).output().unwrap();
    assert!(out.status.success(), "export {} {args:?}: {}", checkpoint.display(), String::from_utf8_lossy(&out.stderr));
}

fn run(onnx: &Path, inputs: Vec<Tensor>) -> Vec<Tensor> {
    Session::load(onnx).unwrap().run(inputs).unwrap()
}

/// Bytes of the constants of an exported graph (from the summary it stores).
fn weight_bytes(onnx: &Path) -> f64 {
    let s = Session::load(onnx).unwrap();
    let json: Value = serde_json::from_str(s.metadata("perceiver_edge.summary").unwrap()).unwrap();
    json["weight_bytes"].as_f64().unwrap()
}

fn file_bytes(p: &Path) -> f64 {
    std::fs::metadata(p).unwrap().len() as f64
}

const PRECISIONS: [&str; 4] = ["f16", "int8", "int8-static", "q4"];

/// Asserts the fidelity target of `precision`; returns the value it was judged on.
fn assert_target(what: &str, precision: &str, (cos, rel): (f64, f64)) {
    match precision {
        "f16" => assert!(rel <= 1e-2, "{what}: f16 relative error {rel:.3e} > 1e-2"),
        "int8" | "int8-static" => assert!(cos >= 0.999, "{what}: {precision} cosine {cos:.6} < 0.999"),
        // No target in the issue for q4; a sanity bound so a broken packing fails.
        _ => assert!(cos >= 0.95, "{what}: q4 cosine {cos:.6} < 0.95"),
    }
}

#[test]
fn every_fixture_meets_the_precision_targets_in_tract_and_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut fixture_dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("fixture.json").is_file())
        .collect();
    fixture_dirs.sort();
    let mut checked = 0;
    for fdir in &fixture_dirs {
        let fixture = fdir.file_name().unwrap().to_string_lossy().to_string();
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(fdir.join("fixture.json")).unwrap()).unwrap();
        for case in meta["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let args: Vec<&str> = case["export_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            let inputs: Vec<Tensor> = case["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| npy::read_npy(&fdir.join(i["file"].as_str().unwrap())).unwrap())
                .collect();
            let expected: Vec<(String, Tensor)> = case["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    (
                        o["name"].as_str().unwrap().to_string(),
                        npy::read_npy(&fdir.join(o["file"].as_str().unwrap())).unwrap(),
                    )
                })
                .collect();
            let stem = format!("{fixture}__{name}");
            let f32_onnx = dir.join(format!("{stem}.f32.onnx"));
            export(fdir, &f32_onnx, &args);
            let reference = run(&f32_onnx, inputs.clone());
            for precision in PRECISIONS {
                let onnx = dir.join(format!("{stem}.{precision}.onnx"));
                let mut a = args.clone();
                a.extend(["--precision", precision]);
                // int8-static calibrates on the fixture's own inputs (the default for a folder
                // holding `<case>.in.<input>.npy` files).
                export(fdir, &onnx, &a);
                let got = run(&onnx, inputs.clone());
                let tract_dir = dir.join(format!("{stem}.{precision}.tract"));
                std::fs::create_dir_all(&tract_dir).unwrap();
                for (i, (out_name, want)) in expected.iter().enumerate() {
                    npy::write_npy(&tract_dir.join(format!("{out_name}.npy")), &got[i]).unwrap();
                    let vs_f32 = metrics(&got[i], &reference[i]);
                    let vs_hf = metrics(&got[i], want);
                    let what = format!("{stem} {precision} {out_name}");
                    eprintln!(
                        "{what:<44} vs f32: cos {:.6} rel {:.2e} | vs transformers: cos {:.6} rel {:.2e} | weights {:.2}x file {:.2}x",
                        vs_f32.0,
                        vs_f32.1,
                        vs_hf.0,
                        vs_hf.1,
                        weight_bytes(&onnx) / weight_bytes(&f32_onnx),
                        file_bytes(&onnx) / file_bytes(&f32_onnx)
                    );
                    assert_target(&format!("{what} vs f32"), precision, vs_f32);
                    assert_target(&format!("{what} vs transformers"), precision, vs_hf);
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 19 * PRECISIONS.len(), "only {checked} graphs checked");
    let Some(py) = python() else {
        eprintln!("onnxruntime check skipped: set PERCEIVER_EDGE_PYTHON to a python with onnx + onnxruntime (scripts/test.sh does)");
        return;
    };
    let out = Command::new(&py)
        .arg(root().join("models/reference/check_quantized.py"))
        .arg("--onnx-dir")
        .arg(dir)
        .arg("--fixtures")
        .arg(fixtures_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "onnxruntime check of the quantised graphs failed");
    assert!(stdout.contains(&format!("{checked} passed, 0 failed")), "onnxruntime checked every graph");
}

#[test]
fn trained_digits_keep_their_accuracy_and_shrink() {
    let digits = root().join("models/digits");
    let samples = digits.join("samples");
    assert!(samples.join("heldout_inputs.npy").is_file(), "models/digits with its held-out set is required");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Calibrate on the first 100 held-out images, evaluate on the others.
    let x = npy::read_npy(&samples.join("heldout_inputs.npy")).unwrap();
    let y = npy::read_npy(&samples.join("heldout_labels.npy")).unwrap();
    let n = x.shape()[0];
    assert!(n >= 300, "{n} held-out inputs");
    npy::write_npy(&dir.join("calib.npy"), &x.slice(0, 0, 100).unwrap()).unwrap();
    npy::write_npy(&dir.join("eval.npy"), &x.slice(0, 100, n).unwrap()).unwrap();
    npy::write_npy(&dir.join("eval_labels.npy"), &y.slice(0, 100, n).unwrap()).unwrap();
    let path = |p: &str| dir.join(format!("digits.{p}.onnx"));
    // Reduced-precision exports leave out the perf rewrites' position tables: compare with the
    // f32 export of the same graph.
    export(&digits, &path("f32"), &["--no-position-tables"]);
    // `int8-reduce-range`: int8 with 7-bit weights (the fast exact AVX2 kernel's).
    for p in PRECISIONS.iter().copied().chain(["int8-static-percentile", "int8-reduce-range"]) {
        let mut a = vec!["--precision", p.trim_end_matches("-percentile").trim_end_matches("-reduce-range")];
        if p.ends_with("reduce-range") {
            a.push("--reduce-range");
        }
        let calib = dir.join("calib.npy");
        if p.starts_with("int8-static") {
            a.extend(["--calibrate", calib.to_str().unwrap()]);
        }
        if p.ends_with("percentile") {
            a.extend(["--calibration-method", "percentile:99.9"]);
        }
        export(&digits, &path(p), &a);
        let out = bin()
            .arg("compare")
            .arg(path("f32"))
            .arg(path(p))
            .arg("--inputs")
            .arg(dir.join("eval.npy"))
            .arg("--labels")
            .arg(dir.join("eval_labels.npy"))
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "compare {p}: {}", String::from_utf8_lossy(&out.stderr));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let agree = r["top1_agreement"].as_f64().unwrap();
        let (acc_ref, acc) =
            (r["accuracy"]["reference"].as_f64().unwrap(), r["accuracy"]["candidate"].as_f64().unwrap());
        let stats = &r["outputs"][0]["stats"];
        let weights = weight_bytes(&path(p)) / weight_bytes(&path("f32"));
        let file = file_bytes(&path(p)) / file_bytes(&path("f32"));
        eprintln!(
            "digits {p:<12} {} inputs: top-1 agreement {:.2} %, accuracy {:.2} % -> {:.2} %, cosine {:.6}, rel {:.2e}, weights {weights:.3}x, file {file:.3}x",
            r["samples"],
            100.0 * agree,
            100.0 * acc_ref,
            100.0 * acc,
            stats["cosine"].as_f64().unwrap(),
            stats["rel_max"].as_f64().unwrap()
        );
        assert!(r["samples"].as_u64().unwrap() >= 200);
        assert!(!r["layers"].as_array().unwrap().is_empty(), "per-layer table");
        match p {
            "int8" | "int8-static" | "int8-static-percentile" | "int8-reduce-range" => {
                assert!(agree >= 0.99, "{p}: top-1 agreement {agree}");
                assert!((acc - acc_ref).abs() <= 0.01, "{p}: accuracy {acc} vs f32 {acc_ref}");
                assert!(weights <= 0.30 && file <= 0.30, "{p}: weights {weights:.3}x, file {file:.3}x of f32 > 0.30x");
            }
            "f16" => {
                assert!(stats["rel_max"].as_f64().unwrap() <= 1e-2);
                assert!(weights <= 0.55 && file <= 0.55, "f16: weights {weights:.3}x, file {file:.3}x of f32 > 0.55x");
            }
            _ => assert!(weights <= 0.20 && file <= 0.20, "q4: weights {weights:.3}x, file {file:.3}x of f32 > 0.20x"),
        }
    }
}

/// Runs the CLI, expects exit status 1 with one `error:` line containing every needle.
fn fails(args: &[&std::ffi::OsStr], needles: &[&str]) {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error, got: {err}");
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

#[test]
fn bad_precision_options_and_calibration_data_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ck = fixtures_dir().join("image_fourier");
    let onnx = t.join("out.onnx");
    let os = |s: &str| std::ffi::OsString::from(s);
    let export_args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v = vec![os("export"), ck.clone().into_os_string(), os("-o"), onnx.clone().into_os_string()];
        v.extend(["--image-size", "12", "16"].iter().map(|s| os(s)));
        v.extend(extra.iter().map(|s| os(s)));
        v
    };
    let check = |extra: &[&str], needles: &[&str]| {
        let a = export_args(extra);
        let refs: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
        fails(&refs, needles);
        assert!(!onnx.exists(), "no output file after a failed export ({extra:?})");
        let leftovers: Vec<_> = std::fs::read_dir(t)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(leftovers.is_empty(), "no partial file ({extra:?})");
    };
    check(&["--precision", "int4"], &["unknown precision \"int4\"", "int8-static"]);
    check(
        &["--precision", "int8", "--keep-f32", "no_such_layer"],
        &["--keep-f32 \"no_such_layer\"", "matches no node"],
    );
    check(&["--precision", "f16", "--keep-f32", "no*such"], &["no*such"]);
    check(&["--keep-f32", "query"], &["--keep-f32 needs a reduced --precision"]);
    check(&["--precision", "int8", "--calibrate", "x.npy"], &["--calibrate applies to --precision int8-static"]);
    check(&["--precision", "f16", "--reduce-range"], &["--reduce-range", "int8 or int8-static, not f16"]);
    check(&["--reduce-range"], &["--reduce-range", "not f32"]);
    check(
        &["--precision", "int8-static", "--calibration-method", "median"],
        &["unknown calibration method \"median\""],
    );

    // Calibration data: wrong shape, wrong dtype, empty set, empty folder, missing file.
    let write = |name: &str, dt: perceiver_edge_runtime::DatumType, shape: &[usize]| {
        let p = t.join(name);
        npy::write_npy(&p, &Tensor::zero_dt(dt, shape).unwrap()).unwrap();
        p.to_string_lossy().to_string()
    };
    use perceiver_edge_runtime::DatumType as D;
    let bad_shape = write("shape.npy", D::F32, &[2, 3, 5, 5]);
    check(&["--precision", "int8-static", "--calibrate", &bad_shape], &["shape.npy", "[2, 3, 5, 5]", "[1, 3, 12, 16]"]);
    let bad_dtype = write("dtype.npy", D::I64, &[1, 3, 12, 16]);
    check(&["--precision", "int8-static", "--calibrate", &bad_dtype], &["dtype.npy", "int64", "float32"]);
    let empty = write("empty.npy", D::F32, &[0, 3, 12, 16]);
    check(&["--precision", "int8-static", "--calibrate", &empty], &["empty.npy", "no inputs"]);
    let empty_dir = t.join("empty_dir");
    std::fs::create_dir(&empty_dir).unwrap();
    check(&["--precision", "int8-static", "--calibrate", empty_dir.to_str().unwrap()], &["empty_dir", "no inputs"]);
    check(&["--precision", "int8-static", "--calibrate", t.join("missing.npy").to_str().unwrap()], &["missing.npy"]);
    // No calibration data at all: a checkpoint folder without fixture inputs or samples.
    let bare = t.join("bare_ck");
    std::fs::create_dir(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(ck.join(f), bare.join(f)).unwrap();
    }
    let a: Vec<std::ffi::OsString> = vec![
        os("export"),
        bare.into_os_string(),
        os("-o"),
        onnx.clone().into_os_string(),
        os("--image-size"),
        os("12"),
        os("16"),
        os("--precision"),
        os("int8-static"),
    ];
    let refs: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
    fails(&refs, &["int8-static needs calibration inputs", "--calibrate"]);
    assert!(!onnx.exists());

    // compare: graphs with different inputs, bad labels.
    let (a16, b16) = (t.join("a.onnx"), t.join("b.onnx"));
    export(&ck, &a16, &["--image-size", "12", "16"]);
    export(&ck, &b16, &["--image-size", "8", "8", "--precision", "int8"]);
    let input = write("in.npy", D::F32, &[1, 3, 12, 16]);
    fails(
        &[
            std::ffi::OsStr::new("compare"),
            a16.as_os_str(),
            b16.as_os_str(),
            std::ffi::OsStr::new("--inputs"),
            std::ffi::OsStr::new(&input),
        ],
        &["take different inputs"],
    );
    let labels = write("labels.npy", D::I64, &[3]);
    fails(
        &[
            std::ffi::OsStr::new("compare"),
            a16.as_os_str(),
            a16.as_os_str(),
            std::ffi::OsStr::new("--inputs"),
            std::ffi::OsStr::new(&input),
            std::ffi::OsStr::new("--labels"),
            std::ffi::OsStr::new(&labels),
        ],
        &["3 labels for 1 output rows"],
    );
}
