//! The bundled models/shapes classifier (32x32 colour images, conv front end, 64 latents, two
//! applications of a weight-shared block) exported and run through the `perceiver-edge` binary
//! as a user would, against transformers' logits for the sample images
//! (models/shapes/samples/logits_*.npy, written by models/train_shapes.py); then at 16 of its 64
//! latents, where the export must still run and the FLOPs fall.

use perceiver_edge_runtime::{npy, to_vec, Session};
use serde_json::Value;
use std::path::Path;

mod common;
use common::*;

fn export(onnx: &Path, args: &[&str]) {
    let out =
        bin().arg("export").arg("models/shapes").arg("-o").arg(onnx).args(args).current_dir(root()).output().unwrap();
    assert!(out.status.success(), "export {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn flops(onnx: &Path) -> f64 {
    let s = Session::load(onnx).unwrap();
    let json: Value = serde_json::from_str(s.metadata("perceiver_edge.summary").unwrap()).unwrap();
    json["flops"].as_array().unwrap().iter().map(|stage| stage[1].as_f64().unwrap()).sum()
}

#[test]
fn shapes_matches_transformers_and_classifies_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("shapes.onnx");
    export(&onnx, &[]);
    let samples = root().join("models/shapes/samples");
    let labels: Value = serde_json::from_str(&std::fs::read_to_string(samples.join("labels.json")).unwrap()).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("models/shapes/config.json")).unwrap()).unwrap();
    for i in 0..5 {
        let input = samples.join(format!("shape_{i}.npy"));
        let out = dir.path().join(format!("out_{i}.npy"));
        ok(bin().arg("run").arg(&onnx).arg("--input").arg(&input).arg("--output").arg(&out));
        let got: Vec<f32> = to_vec(&npy::read_npy(&out).unwrap()).unwrap();
        let want: Vec<f32> = to_vec(&npy::read_npy(&samples.join(format!("logits_{i}.npy"))).unwrap()).unwrap();
        assert_eq!(got.len(), 10);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 + 1e-4 * b.abs(), "sample {i}: got {a}, transformers {b}");
        }
        let best = perceiver_edge_runtime::compare::argmax(&got);
        let name = config["id2label"][best.to_string()].as_str().unwrap();
        assert_eq!(Some(name), labels[format!("shape_{i}.npy")].as_str(), "sample {i}");
    }
}

#[test]
fn shapes_at_a_quarter_of_its_latents() {
    let dir = tempfile::tempdir().unwrap();
    let (full, k16) = (dir.path().join("full.onnx"), dir.path().join("k16.onnx"));
    export(&full, &[]);
    export(&k16, &["--latents", "16", "--calibrate", "models/shapes/samples/shape_0.npy"]);
    let (f, q) = (flops(&full), flops(&k16));
    // Encoder and decoder do not shrink with the latents, the weight-shared blocks do (4x).
    assert!(q < 0.5 * f && q > 0.2 * f, "FLOPs {f} -> {q}");
    let x = npy::read_npy(&root().join("models/shapes/samples/shape_0.npy")).unwrap();
    let y = Session::load(&k16).unwrap().run(vec![x]).unwrap();
    assert_eq!(y[0].shape(), &[1, 10]);
}
