//! Bad input gets a one-line error naming the file or tensor, a non-zero exit, no panic and no
//! partial output file. Checkpoint variants (sharded, f16, bf16) load like the original.

use perceiver_edge_runtime::{npy, to_vec};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

mod common;
use common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/reference/fixtures").join(name)
}

/// Runs the CLI, expects failure with exactly one stderr line containing every `needles`.
fn fails(args: &[&dyn AsRef<std::ffi::OsStr>], needles: &[&str]) {
    let out = bin().args(args.iter().map(|a| a.as_ref())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy().to_string()).collect();
    assert_eq!(out.status.code(), Some(1), "exit code for {shown:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

fn export(dir: &Path, out: &Path) {
    let o = bin().arg("export").arg(dir).arg("-o").arg(out).args(["--image-size", "12", "16"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn run_logits(model: &Path, input: &Path, out: &Path) -> Vec<f32> {
    let o = bin().arg("run").arg(model).arg("--input").arg(input).arg("--output").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    to_vec(&npy::read_npy(out).unwrap()).unwrap()
}

#[test]
fn broken_checkpoints_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ok = fixture("image_fourier");
    let onnx = t.join("out.onnx");
    let case = |name: &str| {
        let d = t.join(name);
        copy_dir(&ok, &d);
        d
    };

    fails(&[&"export", &t.join("missing"), &"-o", &onnx], &["missing", "config.json"]);

    let d = case("bad_json");
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    fails(&[&"export", &d, &"-o", &onnx], &["config.json", "invalid JSON"]);

    let d = case("no_config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    fails(&[&"export", &d, &"-o", &onnx], &["config.json"]);

    let d = case("no_weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    fails(&[&"export", &d, &"-o", &onnx], &["model.safetensors", "missing"]);

    let d = case("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails(&[&"export", &d, &"-o", &onnx], &["model.safetensors", "safetensors"]);

    let d = case("pickle");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("pytorch_model.bin"), b"not executed").unwrap();
    fails(&[&"export", &d, &"-o", &onnx], &["pytorch_model.bin", "safetensors"]);

    let d = case("unknown_arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(d.join("config.json"), cfg.replace("PerceiverForImageClassificationFourier", "BertForMaskedLM"))
        .unwrap();
    fails(&[&"export", &d, &"-o", &onnx], &["config.json", "BertForMaskedLM"]);

    let mut ts = tensors(&ok.join("model.safetensors"));
    let d = case("missing_tensor");
    let without: Vec<_> = ts.iter().filter(|t| t.0 != "perceiver.embeddings.latents").cloned().collect();
    write_tensors(&d.join("model.safetensors"), &without);
    fails(&[&"export", &d, &"-o", &onnx], &["perceiver.embeddings.latents", "missing"]);

    let d = case("misshaped_tensor");
    let q = ts.iter_mut().find(|t| t.0 == "perceiver.encoder.self_attends.0.attention.self.query.weight").unwrap();
    q.2 = vec![q.2[1], q.2[0]];
    write_tensors(&d.join("model.safetensors"), &ts);
    fails(
        &[&"export", &d, &"-o", &onnx, &"--image-size", &"12", &"16"],
        &["encoder.self_attends.0.attention.self.", "shape"],
    );

    fails(
        &[&"export", &ok, &"-o", &onnx, &"--seq-len", &"4"],
        &["--seq-len", "PerceiverForImageClassificationFourier"],
    );
    fails(&[&"export", &ok, &"-o", &onnx, &"--image-size", &"0", &"4"], &["--image-size"]);
    fails(
        &[&"export", &fixture("image_conv"), &"-o", &onnx, &"--image-size", &"3", &"3"],
        &["3x3", "conv stem", "5x5"],
    );
    assert!(!onnx.exists(), "no output file after failed exports");
    let leftovers: Vec<_> =
        std::fs::read_dir(t).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().is_file()).collect();
    assert!(leftovers.is_empty(), "no partial files: {leftovers:?}");
}

#[test]
fn bad_run_inputs_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let onnx = t.join("m.onnx");
    let out = t.join("y.npy");
    let o = bin().arg("export").arg(fixture("seqcls")).arg("-o").arg(&onnx).output().unwrap();
    assert!(o.status.success());
    let ids = fixture("seqcls").join("default.in.input_ids.npy");

    // Wrong dtype, wrong shape, unreadable file, out-of-range token id, wrong input count.
    fails(
        &[&"run", &onnx, &"--input", &fixture("image_learned").join("default.in.pixel_values.npy"), &"--output", &out],
        &["input_ids", "dtype float32, expected int64"],
    );
    let mut v: Vec<i64> = to_vec(&npy::read_npy(&ids).unwrap()).unwrap();
    let short = t.join("short.npy");
    npy::write_npy(&short, &perceiver_edge_runtime::tensor(&[1, 4], &v[..4]).unwrap()).unwrap();
    fails(&[&"run", &onnx, &"--input", &short, &"--output", &out], &["input_ids", "shape [1, 4]"]);
    let junk = t.join("junk.npy");
    std::fs::write(&junk, b"not a numpy file").unwrap();
    fails(&[&"run", &onnx, &"--input", &junk, &"--output", &out], &["junk.npy"]);
    v[3] = 100_000;
    let big = t.join("big.npy");
    let n = v.len();
    npy::write_npy(&big, &perceiver_edge_runtime::tensor(&[1, n], &v).unwrap()).unwrap();
    fails(&[&"run", &onnx, &"--input", &big, &"--output", &out], &["input_ids", "100000", "out of range"]);
    fails(&[&"run", &onnx, &"--input", &ids, &"--input", &ids, &"--output", &out], &["1 input(s)"]);
    let corrupt = t.join("corrupt.onnx");
    std::fs::write(&corrupt, b"\x08\x07garbage").unwrap();
    fails(&[&"run", &corrupt, &"--input", &ids, &"--output", &out], &["corrupt.onnx"]);
    fails(&[&"inspect", &corrupt], &["corrupt.onnx"]);
    assert!(!out.exists(), "no output written by failed runs");
}

/// An output whose folder does not exist: one line naming the output and the missing folder,
/// once, and nothing created.
#[test]
fn outputs_into_a_missing_folder_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let missing = t.join("missing");
    let folder = format!("folder {} does not exist", missing.display());
    let onnx = missing.join("m.onnx");
    fails(&[&"export", &fixture("seqcls"), &"-o", &onnx], &["m.onnx: cannot write", &folder]);
    let good = t.join("m.onnx");
    assert!(bin().arg("export").arg(fixture("seqcls")).arg("-o").arg(&good).status().unwrap().success());
    let ids = fixture("seqcls").join("default.in.input_ids.npy");
    fails(&[&"run", &good, &"--input", &ids, &"--output", &missing.join("y.npy")], &["y.npy", &folder]);
    let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../targets/raspberry-pi-5.toml");
    let cal = digits.join("samples/heldout_inputs.npy");
    fails(&[&"tune", &digits, &"--target", &target, &"--calibrate", &cal, &"-o", &missing.join("out")], &[&folder]);
    let out = bin().arg("export").arg(fixture("seqcls")).arg("-o").arg(&onnx).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("does not exist").count(), 1, "the cause once: {err}");
    assert!(!missing.exists(), "no folder created");
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ok = fixture("image_fourier");
    let input = ok.join("b1.in.pixel_values.npy");
    export(&ok, &t.join("ref.onnx"));
    let reference = run_logits(&t.join("ref.onnx"), &input, &t.join("ref.npy"));

    // Sharded: two files and an index; must give bit-identical outputs.
    let ts = tensors(&ok.join("model.safetensors"));
    let d = t.join("sharded");
    copy_dir(&ok, &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let (a, b) = ts.split_at(ts.len() / 2);
    write_tensors(&d.join("model-00001-of-00002.safetensors"), a);
    write_tensors(&d.join("model-00002-of-00002.safetensors"), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|x| (x.0.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|x| (x.0.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    export(&d, &t.join("sharded.onnx"));
    assert_eq!(run_logits(&t.join("sharded.onnx"), &input, &t.join("s.npy")), reference);

    // f16 / bf16 storage: same outputs as f32 storage of the same rounded values.
    for (dt, name) in [(Dtype::F16, "f16"), (Dtype::BF16, "bf16")] {
        let to_half = |x: f32| -> [u8; 2] {
            if dt == Dtype::F16 {
                half::f16::from_f32(x).to_le_bytes()
            } else {
                half::bf16::from_f32(x).to_le_bytes()
            }
        };
        let from_half = |b: [u8; 2]| -> f32 {
            if dt == Dtype::F16 {
                half::f16::from_le_bytes(b).to_f32()
            } else {
                half::bf16::from_le_bytes(b).to_f32()
            }
        };
        let (mut halfs, mut rounded) = (vec![], vec![]);
        for (n, _, s, bytes) in &ts {
            let h: Vec<u8> =
                bytes.chunks_exact(4).flat_map(|c| to_half(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect();
            let r: Vec<u8> = h.chunks_exact(2).flat_map(|c| from_half([c[0], c[1]]).to_le_bytes()).collect();
            halfs.push((n.clone(), dt, s.clone(), h));
            rounded.push((n.clone(), Dtype::F32, s.clone(), r));
        }
        let (dh, dr) = (t.join(name), t.join(format!("{name}_as_f32")));
        copy_dir(&ok, &dh);
        copy_dir(&ok, &dr);
        write_tensors(&dh.join("model.safetensors"), &halfs);
        write_tensors(&dr.join("model.safetensors"), &rounded);
        export(&dh, &t.join(format!("{name}.onnx")));
        export(&dr, &t.join(format!("{name}_r.onnx")));
        let yh = run_logits(&t.join(format!("{name}.onnx")), &input, &t.join(format!("{name}.npy")));
        let yr = run_logits(&t.join(format!("{name}_r.onnx")), &input, &t.join(format!("{name}_r.npy")));
        assert_eq!(yh, yr, "{name} weights decode to the same f32 values");
        assert_ne!(yh, reference, "{name} rounding is visible (the test would catch a decoder returning f32 data)");
    }
}
