//! `perceiver-edge distill`: bad input (one line, exit 1, no student folder) and a short
//! recovery on the bundled digits model, judged with the engine on the held-out images (which
//! recovery never sees: it trains on the training split, written by models/make_calibration.py).
//!
//! The recovery test needs the training Python (torch + transformers): `PERCEIVER_EDGE_TRAIN_PYTHON`
//! or the venv `distill` creates on first use. Without one it is skipped with a message, unless
//! `PERCEIVER_EDGE_REQUIRE_TRAIN` is set (CI sets it: there the test must run).

use std::path::{Path, PathBuf};

mod common;
use common::{bin, ok, refused, require_train_python, root};

/// The digits training split as calibration data (never the held-out samples).
fn digits_calibration(py: &Path, dir: &Path) -> PathBuf {
    let data = dir.join("train.npy");
    let labels = dir.join("train_labels.npy");
    ok(std::process::Command::new(py)
        .arg(root().join("models/make_calibration.py"))
        .args(["digits"])
        .arg(&data)
        .arg("--labels")
        .arg(&labels)
        .env("PYTHONDONTWRITEBYTECODE", "1"));
    data
}

fn export(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    ok(bin().arg("export").args(args.iter().map(|a| a.as_ref())));
}

/// Top-1 agreement of `candidate` with `reference` on the held-out digits, by the engine.
fn agreement(reference: &Path, candidate: &Path) -> f64 {
    let out = ok(bin()
        .arg("compare")
        .arg(reference)
        .arg(candidate)
        .arg("--inputs")
        .arg(root().join("models/digits/samples/heldout_inputs.npy"))
        .arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["top1_agreement"].as_f64().unwrap_or_else(|| panic!("no top1_agreement in {out}"))
}

#[test]
fn bad_budgets_heads_and_data_are_refused_without_a_student_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("student");
    let digits = root().join("models/digits");
    let data = root().join("models/digits/samples/heldout_inputs.npy");
    let marker_tokens = root().join("models/marker/samples/tokens_0.npy");
    let multimodal = root().join("models/reference/fixtures/multimodal");
    let run = |extra: &[&dyn AsRef<std::ffi::OsStr>], needles: &[&str]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"distill"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&"-o", &out, &"--quiet"]);
        refused(dir.path(), &args, needles);
    };
    run(&[&digits, &"--latents", &"17", &"--calibrate", &data], &["--latents 17", "expected 1 to 16"]);
    run(&[&digits, &"--blocks", &"2", &"--calibrate", &data], &["--blocks 2", "expected 1 to 1"]);
    run(&[&digits, &"--latents", &"0", &"--calibrate", &data], &["--latents 0", "expected 1 to 16"]);
    run(&[&digits, &"--calibrate", &data], &["--latents K and/or --blocks B"]);
    run(&[&digits, &"--latents", &"16", &"--calibrate", &data], &["nothing to recover"]);
    run(
        &[&multimodal, &"--latents", &"2", &"--calibrate", &data],
        &["PerceiverForMultimodalAutoencoding", "no recovery"],
    );
    run(&[&digits, &"--latents", &"8", &"--calibrate", &marker_tokens], &["tokens_0.npy", "[1, 3, 8, 8]"]);
    run(&[&digits, &"--latents", &"8", &"--calibrate", &data, &"--epochs", &"0"], &["--epochs 0"]);
    run(&[&digits, &"--latents", &"8", &"--calibrate", &data, &"--lr", &"0"], &["--lr 0"]);
    // Float labels are target outputs: they must be shaped like the model's output.
    run(
        &[&digits, &"--latents", &"8", &"--calibrate", &data, &"--labels", &data],
        &["heldout_inputs.npy", "target outputs [450, 3, 8, 8], expected [450, 10]"],
    );
    assert!(!out.exists());
    // The student to continue cannot be the output: it would be overwritten while read.
    let kept = dir.path().join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("model.safetensors"), b"weights").unwrap();
    let args: [&dyn AsRef<std::ffi::OsStr>; 10] =
        [&"distill", &digits, &"--latents", &"8", &"--calibrate", &data, &"--init", &kept, &"-o", &kept];
    refused(dir.path(), &args, &["would overwrite the --init student"]);
    assert_eq!(std::fs::read(kept.join("model.safetensors")).unwrap(), b"weights");
}

#[test]
fn heat_map_targets_add_a_task_loss() {
    let Some(py) = require_train_python("heat_map_targets_add_a_task_loss") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (data, targets) = (d.join("frames.npy"), d.join("targets.npy"));
    ok(std::process::Command::new(&py)
        .arg(root().join("models/make_calibration.py"))
        .args(["marker"])
        .arg(&data)
        .args(["--frames", "64", "--labels"])
        .arg(&targets)
        .env("PYTHONDONTWRITEBYTECODE", "1"));
    let record = |out: &Path, labels: Option<&Path>| -> serde_json::Value {
        let mut cmd = bin();
        cmd.arg("distill")
            .arg(root().join("models/marker"))
            .args(["--seq-len", "256", "--latents", "8", "--epochs", "1", "--train-device", "cpu", "--quiet"])
            .arg("--calibrate")
            .arg(&data)
            .arg("-o")
            .arg(out)
            .env("PERCEIVER_EDGE_TRAIN_PYTHON", &py);
        if let Some(l) = labels {
            cmd.arg("--labels").arg(l);
        }
        ok(&mut cmd);
        serde_json::from_str(&std::fs::read_to_string(out.join("distill.json")).unwrap()).unwrap()
    };
    let plain = record(&d.join("plain"), None);
    let task = record(&d.join("task"), Some(&targets));
    assert_eq!(task["labels"].as_str(), Some(targets.to_str().unwrap()));
    assert_eq!(task["loss"].as_str(), Some("map-kl"));
    // The same steps plus the cross-entropy with the target maps (at least their entropy, > 0).
    let first = |r: &serde_json::Value| r["epoch_losses"][0].as_f64().unwrap();
    assert!(first(&task) > first(&plain) + 1.0, "task {} vs plain {}", first(&task), first(&plain));
}

#[test]
fn recovery_improves_agreement_over_the_pruned_model() {
    let Some(py) = require_train_python("recovery_improves_agreement_over_the_pruned_model") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = digits_calibration(&py, d);
    let digits = root().join("models/digits");
    let (full, pruned) = (d.join("full.onnx"), d.join("pruned.onnx"));
    export(&[&digits, &"-o", &full]);
    export(&[&digits, &"-o", &pruned, &"--latents", &"4", &"--calibrate", &data]);
    let student = d.join("student");
    let distill = |out: &Path| {
        ok(bin()
            .arg("distill")
            .arg(&digits)
            .args(["--latents", "4", "--epochs", "3", "--seed", "1", "--train-device", "cpu", "--quiet"])
            .arg("--calibrate")
            .arg(&data)
            .arg("-o")
            .arg(out)
            .env("PERCEIVER_EDGE_TRAIN_PYTHON", &py))
    };
    let printed = distill(&student);
    assert!(printed.contains("student K4 B1 of teacher K16 B1"), "{printed}");
    let mut names: Vec<String> =
        std::fs::read_dir(&student).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "distill.json", "model.safetensors"], "nothing else left in the student");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_latents"].as_u64(), Some(4));
    assert_eq!(cfg["num_blocks"].as_u64(), Some(1));
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("distill.json")).unwrap()).unwrap();
    assert_eq!(rec["epochs"].as_u64(), Some(3));
    assert_eq!(rec["seed"].as_u64(), Some(1));
    assert_eq!(rec["calibration_samples"].as_u64(), Some(1347));

    // The student starts from the latents `export --latents 4` keeps (same importance ranking).
    let kept: Vec<u64> = rec["kept_latents"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let shown = ok(bin().args(["inspect"]).arg(&pruned));
    assert!(shown.contains("4 x 64"), "{shown}");
    assert_eq!(kept.len(), 4);

    // Judged independently of the training script: the engine on the held-out images.
    let rec_onnx = d.join("student.onnx");
    export(&[&student, &"-o", &rec_onnx]);
    let (before, after) = (agreement(&full, &pruned), agreement(&full, &rec_onnx));
    eprintln!("held-out top-1 agreement with the full model: pruned {before:.4}, recovered (3 epochs) {after:.4}");
    assert!(after > before + 0.02, "recovery should improve agreement: pruned {before}, recovered {after}");

    // Deterministic with --seed: a second run writes the same weights.
    let again = d.join("again");
    distill(&again);
    assert!(
        std::fs::read(again.join("model.safetensors")).unwrap()
            == std::fs::read(student.join("model.safetensors")).unwrap(),
        "same seed, same student"
    );

    // --init: more training for this student (its weights, not the teacher's kept rows).
    let more = d.join("more");
    let continued = |budget: &str, init: &Path, out: &Path| {
        bin()
            .arg("distill")
            .arg(&digits)
            .args(["--latents", budget, "--epochs", "1", "--train-device", "cpu", "--quiet"])
            .arg("--calibrate")
            .arg(&data)
            .arg("--init")
            .arg(init)
            .arg("-o")
            .arg(out)
            .env("PERCEIVER_EDGE_TRAIN_PYTHON", &py)
            .output()
            .unwrap()
    };
    let r = continued("4", &student, &more);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(more.join("distill.json")).unwrap()).unwrap();
    assert_eq!(rec["init"].as_str(), Some(student.to_str().unwrap()));
    // Training started from the student: its agreement, not the pruned teacher's.
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("distill.json")).unwrap()).unwrap();
    let start = rec["agreement_with_teacher"]["init"].as_f64().unwrap();
    assert!((start - first["agreement_with_teacher"]["recovered"].as_f64().unwrap()).abs() < 1e-9, "{rec}");
    assert!(start > first["agreement_with_teacher"]["pruned"].as_f64().unwrap() + 0.02, "{rec}");
    let (a, b) = (agreement(&full, &rec_onnx), {
        let o = d.join("more.onnx");
        export(&[&more, &"-o", &o]);
        agreement(&full, &o)
    });
    eprintln!("held-out agreement: student {a:.4}, one more epoch from it {b:.4}");
    // It started from the student, not from the pruned teacher: far above the pruned model.
    assert!(b > before + 0.02, "continued {b}, pruned {before}");
    // A student of another budget, or a folder without weights: one line, no output.
    for (budget, init, needle) in
        [("8", &student, "not a student of this budget"), ("4", &d.to_path_buf(), "no model.safetensors")]
    {
        let bad = d.join("bad");
        let r = continued(budget, init, &bad);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(err.contains("--init") && err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!bad.exists());
    }
}

#[test]
fn a_non_finite_training_loss_is_one_line_and_leaves_no_student() {
    let Some(py) = require_train_python("a_non_finite_training_loss_is_one_line_and_leaves_no_student") else { return };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let data = digits_calibration(&py, data_dir.path());
    let out = dir.path().join("student");
    std::env::set_var("PERCEIVER_EDGE_TRAIN_PYTHON", &py);
    refused(
        dir.path(),
        &[
            &"distill",
            &root().join("models/digits"),
            &"--latents",
            &"8",
            &"--calibrate",
            &data,
            &"--epochs",
            &"2",
            &"--lr",
            &"1e30",
            &"-o",
            &out,
            &"--quiet",
        ],
        &["non-finite", "--lr"],
    );
    assert!(!out.exists());
}

#[test]
fn tune_recover_shows_each_budget_before_and_after() {
    let Some(py) = require_train_python("tune_recover_shows_each_budget_before_and_after") else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = digits_calibration(&py, dir.path());
    let out = dir.path().join("tuned");
    let table = ok(bin()
        .current_dir(root())
        .args(["tune", "models/digits", "--target", "engine/tune/tests/data/raspberry-pi-5.toml", "--calibrate"])
        .arg(&data)
        .args(["--latents", "16,4", "--threads", "1", "--runs", "3", "--warmup", "1"])
        .args(["--recover", "--epochs", "2", "--train-device", "cpu", "--quiet", "-o"])
        .arg(&out)
        .env("PERCEIVER_EDGE_TRAIN_PYTHON", &py));
    assert!(table.contains("rec %"), "{table}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let c = r["candidates"].as_array().unwrap();
    assert!(c[0]["recovered"].is_null(), "the full model is not recovered");
    let (before, after) = (
        c[1]["fidelity"]["top1_agreement"].as_f64().unwrap(),
        c[1]["recovered"]["top1_agreement"].as_f64().expect("K4 recovered"),
    );
    assert!(after > before, "recovered K4 {after} should beat pruned {before}");
    assert_eq!(r["students"][0]["latents"].as_u64(), Some(4));
    assert!(out.join("students/k4-b1/model.safetensors").is_file());
    assert!(std::fs::read_to_string(out.join("tradeoff.svg")).unwrap().contains("recovered: top-1"));
    let acc = std::fs::read_to_string(out.join("accuracy.svg")).unwrap();
    assert!(acc.contains(&format!("{:.2} % recovered", 100.0 * after)), "{acc}");
}
