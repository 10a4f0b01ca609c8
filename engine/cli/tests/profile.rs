//! `bench --profile`: where a run's time goes, per kind of op and, with `--by-shape`, per kind and
//! shape.

mod common;

use common::*;
use std::path::Path;

/// The `ops` of `bench MODEL --profile 2 --json` with `extra` arguments: (key, nodes per run).
fn ops(model: &Path, extra: &[&str]) -> Vec<(String, usize)> {
    let out = ok(bin()
        .arg("bench")
        .arg(model)
        .args(["--runs", "1", "--warmup", "1", "--profile", "2", "--json"])
        .args(extra));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["ops"]
        .as_array()
        .expect("an `ops` list")
        .iter()
        .map(|o| (o["op"].as_str().unwrap().to_string(), o["nodes"].as_u64().unwrap() as usize))
        .collect()
}

#[test]
fn by_shape_splits_each_kind_and_names_the_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.onnx");
    let ck = fixtures_dir().join("image_fourier");
    ok(bin().arg("export").arg(&ck).arg("-o").arg(&model).args(["--image-size", "12", "16"]));
    let kinds = ops(&model, &[]);
    let shapes = ops(&model, &["--by-shape"]);
    assert!(!kinds.is_empty());
    // Each kind's nodes are its shapes' nodes: no node lost, none counted twice, no other kind.
    let of = |key: &str, kind: &str| key == kind || key.strip_prefix(kind).is_some_and(|r| r.starts_with(" ["));
    for (kind, n) in &kinds {
        let split: usize = shapes.iter().filter(|(k, _)| of(k, kind)).map(|(_, n)| n).sum();
        assert_eq!(split, *n, "{kind}: {shapes:?}");
    }
    for (key, _) in &shapes {
        assert!(kinds.iter().any(|(kind, _)| of(key, kind)), "{key} is no kind of {kinds:?}");
    }
    // The latents' Linears, `[N, D] x [D, D]`, by the checkpoint's sizes.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    let (n, d) = (cfg["num_latents"].as_u64().unwrap(), cfg["d_latents"].as_u64().unwrap());
    let latents = format!("m {n} k {d} n {d},");
    assert!(shapes.iter().any(|(k, _)| k.contains(&latents)), "no `{latents}` in {shapes:?}");
    assert!(!kinds.iter().any(|(k, _)| k.contains(&latents)), "per kind, no shapes: {kinds:?}");
}

#[test]
fn by_shape_needs_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.onnx");
    ok(bin().arg("export").arg(fixtures_dir().join("image_fourier")).arg("-o").arg(&model).args([
        "--image-size",
        "12",
        "16",
    ]));
    refused(tmp.path(), &[&"bench", &model, &"--by-shape"], &["--by-shape", "--profile"]);
}
