//! `perceiver-edge tune` and `export --latents/--blocks` end to end on the bundled digits model.
//! Assertions do not depend on timing: files, candidates, fidelity, importance order, errors.

use std::path::Path;

mod common;
use common::{bin, root};

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).current_dir(root()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

const PROFILE: &str = "engine/tune/tests/data/raspberry-pi-5.toml";
const DATA: &str = "models/digits/samples/heldout_inputs.npy";
const LABELS: &str = "models/digits/samples/heldout_labels.npy";

#[test]
fn tune_writes_model_report_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let (ok, stdout, stderr) = cli(&[
        "tune",
        "models/digits",
        "--target",
        PROFILE,
        "--calibrate",
        DATA,
        "--labels",
        LABELS,
        "-o",
        o,
        "--latents",
        "16,4",
        "--threads",
        "1",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--quiet",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("K16 B1 T1") && stdout.contains("K4 B1 T1"), "{stdout}");
    assert!(!stdout.contains("precisions: not measured"), "f32 only: no precision caveat\n{stdout}");
    for f in ["model.onnx", "report.json", "tradeoff.svg", "accuracy.svg"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert!(!out.join("candidates").exists(), "candidate files are cleaned up");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let c = r["candidates"].as_array().unwrap();
    assert_eq!(c.len(), 2);
    // The full model against itself is exact; 4 of 16 latents is not.
    assert_eq!(c[0]["fidelity"]["max_abs"].as_f64(), Some(0.0));
    assert_eq!(c[0]["fidelity"]["top1_agreement"].as_f64(), Some(1.0));
    assert!(c[1]["fidelity"]["max_abs"].as_f64().unwrap() > 0.0);
    assert_eq!(c[0]["fidelity"]["samples"].as_u64(), Some(225), "validated on the odd half");
    assert!(c[0]["fidelity"]["accuracy"].as_f64().unwrap() > 0.9);
    assert_eq!(r["calibration"]["selection"].as_u64(), Some(225));
    // Latent order is the transformers reference's (models/reference/latent_importance.py).
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("models/reference/fixtures/digits_latent_importance.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r["latent_order"], fixture["order"]);
    assert_eq!(r["judged_on"], "predicted for the board");
    let svg = std::fs::read_to_string(out.join("tradeoff.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("K4 B1 T1"));
    // Accuracy against FLOPs: one circle per budget at the accuracy report.json gives, the full
    // model's accuracy as the reference line, and (no --recover) no recovered squares.
    let acc = std::fs::read_to_string(out.join("accuracy.svg")).unwrap();
    assert_eq!(acc.matches("<circle").count(), 2, "{acc}");
    for cand in c {
        let a = 100.0 * cand["fidelity"]["accuracy"].as_f64().unwrap();
        assert!(acc.contains(&format!("{a:.2} % pruned only")), "{a:.2} in {acc}");
    }
    let full = 100.0 * c[0]["fidelity"]["reference_accuracy"].as_f64().unwrap();
    assert!(acc.contains(&format!("full model {full:.2} %")), "{acc}");
    assert!(!acc.contains("recovered"));
}

#[test]
fn export_budget_knobs() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("k8.onnx");
    let (ok, stdout, stderr) = cli(&[
        "export",
        "models/digits",
        "-o",
        m.to_str().unwrap(),
        "--latents",
        "8",
        "--calibrate",
        DATA,
        "--blocks",
        "2",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("latents        N x D = 8 x 64"), "{stdout}");
    assert!(stdout.contains("depth          2 block(s) x 2"), "{stdout}");
    assert!(stdout.contains("latents kept (8 of 16"), "{stdout}");
    assert!(Path::new(&m).is_file());
}

#[test]
fn errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("x.onnx");
    let m = m.to_str().unwrap();
    let (ok, _, e) = cli(&["export", "models/digits", "-o", m, "--latents", "8"]);
    assert!(!ok && e.contains("give --calibrate DATA"), "{e}");
    let (ok, _, e) = cli(&["export", "models/digits", "-o", m, "--latents", "17", "--calibrate", DATA]);
    assert!(!ok && e.contains("1..=16"), "{e}");
    let (ok, _, e) = cli(&["export", "models/digits", "-o", m, "--blocks", "0"]);
    assert!(!ok && e.contains("--blocks must be at least 1"), "{e}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n[cpu]\ncores = four\n").unwrap();
    let o = dir.path().join("o");
    let o = o.to_str().unwrap();
    // `tune models/digits --target T --calibrate C [extra] -o o`
    let tune = |target: &str, calibrate: &str, extra: &[&str]| {
        let mut args = vec!["tune", "models/digits", "--target", target, "--calibrate", calibrate];
        args.extend_from_slice(extra);
        args.extend(["-o", o]);
        cli(&args)
    };
    let (ok, _, e) = tune(bad.to_str().unwrap(), DATA, &[]);
    assert!(!ok && e.contains("bad.toml") && e.contains("line 3") && e.lines().count() == 1, "{e}");
    let (ok, _, e) = tune(PROFILE, "models/digits/config.json", &[]);
    assert!(!ok && e.starts_with("error:"), "{e}");
    let (ok, _, e) = tune(PROFILE, DATA, &["--latents", "20"]);
    assert!(!ok && e.contains("1..=16"), "{e}");
    assert!(!Path::new(o).join("model.onnx").exists());
    assert_eq!(e.lines().count(), 1, "{e}");
}

/// `tune` on the digits model's 16 latents at one thread, with these precision candidates.
fn tune_precisions(out: &Path, precisions: &str) -> (bool, String, String) {
    let o = out.to_str().unwrap();
    let mut args = vec!["tune", "models/digits", "--target", PROFILE, "--calibrate", DATA, "-o", o];
    args.extend(["--latents", "16", "--threads", "1", "--precisions", precisions]);
    args.extend(["--runs", "3", "--warmup", "1", "--quiet"]);
    cli(&args)
}

#[test]
fn tune_takes_precision_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("out");
    let (ok, stdout, stderr) = tune_precisions(&o, "f32,f16");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("K16 B1 T1 f16"), "{stdout}");
    // A board of another architecture: its speed and fidelity per precision are not measured here.
    assert!(stdout.contains("precisions: not measured on the board"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(o.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["precisions"], serde_json::json!(["f32", "f16"]));
    let f16 = &r["candidates"][1];
    assert_eq!(f16["candidate"]["precision"], "f16");
    // Its products are f16 (the f32 candidate's f32), which the Cortex-A76 board computes at
    // twice f32's peak: the prediction says so.
    let (f32c, flops) = (&r["candidates"][0], f16["flops"].as_u64().unwrap());
    assert!(flops > 0 && f32c["flops"].as_u64() == Some(flops));
    assert_eq!((f16["products"]["f16"].as_u64(), f32c["products"]["f32"].as_u64()), (Some(flops), Some(flops)));
    assert_eq!(
        (r["target"]["peak_ratio_f16"].as_f64(), r["target"]["peak_ratio_int8"].as_f64()),
        (Some(2.0), Some(4.0))
    );
    assert!(stdout.contains("f16 and int8 products are predicted at 2x and 4x f32's rate"), "{stdout}");
    assert!(f16["fidelity"]["max_abs"].as_f64().unwrap() > 0.0 && f16["fidelity"]["max_abs"].as_f64().unwrap() < 0.1);
    let (ok, _, e) = cli(&[
        "tune",
        "models/digits",
        "--target",
        PROFILE,
        "--calibrate",
        DATA,
        "-o",
        o.to_str().unwrap(),
        "--precisions",
        "f8",
    ]);
    assert!(!ok && e.contains("unknown precision \"f8\""), "{e}");
}

/// `int8-7bit` candidates are int8 exports with 7-bit weights: the chosen model is the file
/// `export --precision int8 --reduce-range` writes, not the 8-bit one.
#[test]
fn tune_takes_seven_bit_int8_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let t = |o: &Path, precisions: &str| {
        let (ok, stdout, stderr) = tune_precisions(o, precisions);
        assert!(ok, "{stderr}");
        stdout
    };
    let both = dir.path().join("both");
    let stdout = t(&both, "int8,int8-7bit");
    assert!(stdout.contains("K16 B1 T1 int8-7bit"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(both.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["precisions"], serde_json::json!(["int8", "int8-7bit"]));
    let (c8, c7) = (&r["candidates"][0], &r["candidates"][1]);
    assert_eq!(c7["candidate"]["precision"], "int8-7bit");
    let (m8, m7) = (c8["fidelity"]["max_abs"].as_f64().unwrap(), c7["fidelity"]["max_abs"].as_f64().unwrap());
    assert!(m7 > 0.0 && m7 != m8, "7-bit weights change the outputs: {m7} vs {m8}");
    assert!(c7["fidelity"]["top1_agreement"].as_f64().unwrap() >= 0.99, "{}", c7["fidelity"]);

    let only = dir.path().join("only7");
    t(&only, "int8-7bit");
    let export = |name: &str, extra: &[&str]| {
        let f = dir.path().join(name);
        let mut args = vec!["export", "models/digits", "-o", f.to_str().unwrap(), "--precision", "int8"];
        args.extend(extra);
        let (ok, _, stderr) = cli(&args);
        assert!(ok, "{stderr}");
        std::fs::read(f).unwrap()
    };
    let chosen = std::fs::read(only.join("model.onnx")).unwrap();
    assert!(chosen == export("e7.onnx", &["--reduce-range"]), "tune's int8-7bit is export --reduce-range");
    assert!(chosen != export("e8.onnx", &[]));
    let (ok, _, e) = tune_precisions(&dir.path().join("bad"), "q4-7bit");
    assert!(!ok && e.contains("unknown precision \"q4-7bit\"") && e.contains("int8-7bit"), "{e}");
    assert!(!dir.path().join("bad").exists(), "nothing written");
}

/// The query axis on the marker model (a bare decoder with 256 output positions): the default
/// axis measures every output and 64 positions and chooses a model that decodes every output;
/// `--queries 64` chooses a 64-position model. Both chosen models are checked against
/// transformers' logits (models/marker/samples/logits_0.npy).
#[test]
fn tune_query_axis_on_marker() {
    use perceiver_edge_runtime::{npy, tensor, to_vec};
    let dir = tempfile::tempdir().unwrap();
    let cal = dir.path().join("cal");
    std::fs::create_dir(&cal).unwrap();
    for i in 0..3 {
        let f = format!("tokens_{i}.npy");
        std::fs::copy(root().join("models/marker/samples").join(&f), cal.join(&f)).unwrap();
    }
    let sample = root().join("models/marker/samples");
    let reference: Vec<f32> = to_vec(&npy::read_npy(&sample.join("logits_0.npy")).unwrap()).unwrap();
    let tune = |out: &Path, extra: &[&str]| {
        let mut args = vec!["tune", "models/marker", "--target", PROFILE, "--calibrate", cal.to_str().unwrap()];
        args.extend(["--seq-len", "256", "--latents", "32", "--threads", "1", "--runs", "3", "--warmup", "1"]);
        args.extend(["--quiet", "-o", out.to_str().unwrap()]);
        args.extend(extra);
        let (ok, stdout, stderr) = cli(&args);
        assert!(ok, "{stderr}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        (stdout, r)
    };

    let out = dir.path().join("all");
    let (stdout, r) = tune(&out, &[]);
    assert!(stdout.contains("K32 B1 T1 Q64"), "{stdout}");
    let c = r["candidates"].as_array().unwrap();
    let q: Vec<Option<u64>> = c.iter().map(|c| c["candidate"]["queries"].as_u64()).collect();
    assert_eq!(q, vec![None, Some(64)]);
    // 64 of the full model's own positions: exact up to float noise.
    assert!(c[1]["fidelity"]["max_abs"].as_f64().unwrap() < 1e-4, "{}", c[1]["fidelity"]);
    assert!(c[1]["flops"].as_u64() < c[0]["flops"].as_u64(), "fewer queries cost less");
    assert_eq!(r["chosen"].as_u64(), Some(0), "the chosen model decodes every output");
    let tokens = sample.join("tokens_0.npy");
    // `run` on a chosen model with the marker tokens (and any other inputs): its logits.
    let logits = |model: &Path, more: &[&str]| -> Vec<f32> {
        let y = model.with_extension("y.npy");
        let mut args = vec!["run", model.to_str().unwrap(), "--input", tokens.to_str().unwrap()];
        for m in more {
            args.extend(["--input", m]);
        }
        args.extend(["--output", y.to_str().unwrap()]);
        let (ok, _, stderr) = cli(&args);
        assert!(ok, "{stderr}");
        to_vec(&npy::read_npy(&y).unwrap()).unwrap()
    };
    let got = logits(&out.join("model.onnx"), &[]);
    assert_eq!(got.len(), 256);
    let d = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "full map vs transformers: {d}");

    let out = dir.path().join("q64");
    let (_, r) = tune(&out, &["--queries", "64"]);
    assert_eq!(r["candidates"].as_array().unwrap().len(), 1);
    assert_eq!(r["chosen"].as_u64(), Some(0));
    let rows: Vec<i64> = (0..64).map(|i| (i * 37 % 256) as i64).collect();
    let idx = out.join("idx.npy");
    npy::write_npy(&idx, &tensor(&[64], &rows).unwrap()).unwrap();
    let got = logits(&out.join("model.onnx"), &[&format!("output_indices={}", idx.display())]);
    assert_eq!(got.len(), 64);
    let d = rows.iter().zip(&got).map(|(&r, a)| (a - reference[r as usize]).abs()).fold(0f32, f32::max);
    assert!(d < 1e-4, "64 chosen positions vs transformers: {d}");

    // Not a head with positions to choose: refused with the flag named.
    let (ok, _, stderr) = cli(&[
        "tune",
        "models/digits",
        "--target",
        PROFILE,
        "--calibrate",
        DATA,
        "--queries",
        "4",
        "--quiet",
        "-o",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("--queries") && stderr.lines().count() == 1, "{stderr}");
    assert!(!dir.path().join("d").exists());
}
