//! Budget knobs on the bundled digits model: `--blocks` at the trained value and `--latents N`
//! are exact, fewer latents lose a measured amount, and latent importance matches an independent
//! transformers computation (models/reference/latent_importance.py).

use perceiver_edge_export::analysis::{latent_importance, select_latents};
use perceiver_edge_export::{build, Checkpoint, ExportOptions};
use perceiver_edge_runtime::compare::fidelity;
use perceiver_edge_runtime::dataset::split_samples;
use std::path::PathBuf;
use tract_onnx::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn digits() -> Checkpoint {
    Checkpoint::open(&root().join("models/digits")).unwrap()
}

/// Heldout digits (`[450, 3, 8, 8]` f32) and labels, from the .npy files (v1 header, little-endian).
fn npy_f32(path: &str) -> Vec<f32> {
    let b = std::fs::read(root().join(path)).unwrap();
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + hl..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn npy_i64(path: &str) -> Vec<i64> {
    let b = std::fs::read(root().join(path)).unwrap();
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + hl..].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn samples() -> (Vec<Vec<Tensor>>, Vec<i64>) {
    let x = npy_f32("models/digits/samples/heldout_inputs.npy");
    let t = Tensor::from_shape(&[450, 3, 8, 8], &x).unwrap();
    let s = split_samples(&t, &[1, 3, 8, 8], "heldout").unwrap();
    (s.into_iter().map(|t| vec![t]).collect(), npy_i64("models/digits/samples/heldout_labels.npy"))
}

fn run(ck: &Checkpoint, opts: &ExportOptions, samples: &[Vec<Tensor>]) -> Vec<Vec<f32>> {
    let bytes = build(ck, opts).unwrap().to_bytes();
    let plan =
        tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap().into_optimized().unwrap().into_runnable().unwrap();
    samples
        .iter()
        .map(|s| {
            let out = plan.run(s.iter().cloned().map(TValue::from).collect()).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        })
        .collect()
}

#[test]
fn trained_blocks_and_all_latents_are_exact() {
    let ck = digits();
    let (s, _) = samples();
    let s = &s[..40];
    let full = run(&ck, &ExportOptions::default(), s);
    let same = ExportOptions { blocks: Some(1), latents: Some((0..16).collect()), ..Default::default() };
    assert_eq!(run(&ck, &same, s), full, "--blocks 1 --latents 16 reproduce the trained model bit for bit");
    let deeper = run(&ck, &ExportOptions { blocks: Some(2), ..Default::default() }, s);
    assert_ne!(deeper, full, "--blocks 2 applies the shared block twice");
    let e = build(&ck, &ExportOptions { blocks: Some(3), ..Default::default() }).unwrap();
    assert_eq!(e.summary.depth, (3, 2));
    let latent_layers = e.graph.nodes.iter().filter(|n| n.name.starts_with("encoder.self.2.1/")).count();
    assert!(latent_layers > 0, "third repetition present");
}

#[test]
fn fewer_latents_lose_a_measured_amount() {
    let ck = digits();
    let (s, labels) = samples();
    let (select, validate): (Vec<_>, Vec<_>) = s.iter().cloned().enumerate().partition(|(i, _)| i % 2 == 0);
    let select: Vec<Vec<Tensor>> = select.into_iter().map(|x| x.1).collect();
    let validate: Vec<Vec<Tensor>> = validate.into_iter().map(|x| x.1).collect();
    let vlabels: Vec<i64> = labels.iter().skip(1).step_by(2).copied().collect();
    let imp = latent_importance(&ck, &ExportOptions::default(), &select).unwrap();
    let full = run(&ck, &ExportOptions::default(), &validate);
    let mut agreements = vec![];
    for k in [16, 12, 8, 4] {
        let keep = select_latents(&imp, k).unwrap();
        let e = build(&ck, &ExportOptions { latents: Some(keep.clone()), ..Default::default() }).unwrap();
        assert_eq!(e.summary.dims["N"], k);
        let out = run(&ck, &ExportOptions { latents: Some(keep), ..Default::default() }, &validate);
        let f = fidelity(&full, &out, 10, Some(&vlabels));
        eprintln!(
            "K={k}: max_abs {:.4} mean_abs {:.4} min_cos {:.5} top1 {:.4} acc {:.4} (full {:.4})",
            f.max_abs,
            f.mean_abs,
            f.min_cosine,
            f.top1_agreement,
            f.accuracy.unwrap(),
            f.reference_accuracy.unwrap()
        );
        if k == 16 {
            assert_eq!(f.max_abs, 0.0);
        } else {
            assert!(f.max_abs > 0.0, "K={k} changes the logits");
        }
        agreements.push(f.top1_agreement);
    }
    assert!(agreements[3] < 1.0, "4 of 16 latents lose top-1 agreement: {agreements:?}");
}

#[test]
fn importance_matches_transformers_attention_mass() {
    let text = std::fs::read_to_string(root().join("models/reference/fixtures/digits_latent_importance.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want: Vec<f64> = v["importance"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let order: Vec<usize> = v["order"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let (s, _) = samples();
    let even: Vec<Vec<Tensor>> = s.into_iter().step_by(2).collect();
    let got = latent_importance(&digits(), &ExportOptions::default(), &even).unwrap();
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-5, "latent {j}: {g} vs transformers {w}");
    }
    for k in 1..=16 {
        let mut expect = order[..k].to_vec();
        expect.sort_unstable();
        assert_eq!(select_latents(&got, k).unwrap(), expect, "K={k}");
    }
}

#[test]
fn bad_budgets_are_rejected() {
    let ck = digits();
    let err = |o: ExportOptions| build(&ck, &o).err().expect("error").to_string();
    assert!(err(ExportOptions { blocks: Some(0), ..Default::default() }).contains("--blocks must be at least 1"));
    assert!(err(ExportOptions { latents: Some(vec![]), ..Default::default() }).contains("1..=16"));
    assert!(err(ExportOptions { latents: Some(vec![3, 16]), ..Default::default() }).contains("out of range"));
    assert!(err(ExportOptions { latents: Some(vec![3, 2]), ..Default::default() }).contains("ascending"));
    let t = Tensor::from_shape(&[5, 3, 8, 8], &[0f32; 960]).unwrap();
    assert!(split_samples(&t, &[2, 3, 8, 8], "x").unwrap_err().to_string().contains("does not stack"));
    assert!(split_samples(&t, &[1, 3, 4, 4], "x").is_err());
}
