//! ONNX external data (issue #12): `export --external-data` writes the weights to one side file
//! next to the model; the runtime loads it with bit-identical outputs, the onnx checker (full
//! check) and onnxruntime accept it, and a side file that escapes the model's folder, is too
//! short or is missing gets one `error:` line naming the tensor and the file, exit 1, nothing
//! written.

use perceiver_edge_runtime::tract_onnx::pb;
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::*;

/// Exports the image_fourier fixture into `dir` twice: `single.onnx` and `ext.onnx` (+ data).
fn export_both(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = fixtures_dir().join("image_fourier");
    let single = dir.join("single.onnx");
    let ext = dir.join("ext.onnx");
    let size = ["--image-size", "12", "16"];
    ok(bin().arg("export").arg(&ck).args(size).arg("-o").arg(&single));
    let said = ok(bin().arg("export").arg(&ck).args(size).arg("-o").arg(&ext).arg("--external-data"));
    assert!(said.contains("ext.onnx.data"), "{said}");
    (single, ext)
}

fn external_tensors(model: &Path) -> Vec<pb::TensorProto> {
    let proto = pb::ModelProto::decode(std::fs::read(model).unwrap().as_slice()).unwrap();
    proto.graph.unwrap().initializer.into_iter().filter(|t| t.data_location == Some(1)).collect()
}

fn entry(t: &pb::TensorProto, k: &str) -> String {
    t.external_data.iter().find(|e| e.key == k).unwrap().value.clone()
}

#[test]
fn external_data_is_standard_and_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, ext) = export_both(tmp.path());
    let data = tmp.path().join("ext.onnx.data");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "model, side file, single-file model; no temporary files: {names:?}");
    let tensors = external_tensors(&ext);
    assert!(!tensors.is_empty());
    let data_len = std::fs::metadata(&data).unwrap().len();
    for t in &tensors {
        assert_eq!(entry(t, "location"), "ext.onnx.data");
        let (off, len): (u64, u64) = (entry(t, "offset").parse().unwrap(), entry(t, "length").parse().unwrap());
        assert_eq!(off % 4096, 0, "offsets aligned to pages");
        assert!(off + len <= data_len);
        assert!(t.raw_data.is_empty());
    }
    assert!(std::fs::metadata(&ext).unwrap().len() < std::fs::metadata(&single).unwrap().len() / 2);

    // run: bit-identical outputs.
    let input = fixtures_dir().join("image_fourier/b1.in.pixel_values.npy");
    let (o1, o2) = (tmp.path().join("o1.npy"), tmp.path().join("o2.npy"));
    ok(bin().arg("run").arg(&single).arg("-i").arg(&input).arg("-o").arg(&o1));
    // From another working directory, by a relative path: the folder is the model's, not ours.
    ok(bin().current_dir(tmp.path()).arg("run").arg("ext.onnx").arg("-i").arg(&input).arg("-o").arg(&o2));
    assert_eq!(std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap(), "outputs differ");

    // inspect, bench, compare work on it.
    let said = ok(bin().arg("inspect").arg(&ext));
    assert!(said.contains("PerceiverForImageClassificationFourier"), "{said}");
    ok(bin().arg("bench").arg(&ext).args(["--runs", "3", "--warmup", "1"]));
    let said = ok(bin().arg("compare").arg(&single).arg(&ext).arg("--inputs").arg(&input));
    assert!(!said.is_empty());

    // The onnx checker (full check, by path) and onnxruntime load it and agree.
    let Some(py) = python() else {
        eprintln!("onnx checker / onnxruntime check skipped: set PERCEIVER_EDGE_PYTHON");
        return;
    };
    let script = r#"
import sys, onnx, onnxruntime as ort, numpy as np
single, ext, inp = sys.argv[1:4]
onnx.checker.check_model(ext, full_check=True)
x = np.load(inp)
a = ort.InferenceSession(single).run(None, {"pixel_values": x})[0]
b = ort.InferenceSession(ext).run(None, {"pixel_values": x})[0]
assert np.array_equal(a, b), (a, b)
print("ok")
"#;
    let out = Command::new(py).arg("-c").arg(script).arg(&single).arg(&ext).arg(&input).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Rewrites the first external tensor's entries of `model` with `f` (into `out`).
fn tamper(model: &Path, out: &Path, f: impl Fn(&mut pb::TensorProto)) -> String {
    let mut proto = pb::ModelProto::decode(std::fs::read(model).unwrap().as_slice()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    let t = g.initializer.iter_mut().find(|t| t.data_location == Some(1)).unwrap();
    f(t);
    let name = t.name.clone();
    std::fs::write(out, proto.encode_to_vec()).unwrap();
    name
}

fn set(t: &mut pb::TensorProto, k: &str, v: &str) {
    t.external_data.iter_mut().find(|e| e.key == k).unwrap().value = v.to_string();
}

#[test]
fn bad_external_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let world = tmp.path().join("world");
    let dir = world.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let (_, ext) = export_both(&dir);
    // A copy of the side file outside the model's folder, for the escapes to point at.
    std::fs::copy(dir.join("ext.onnx.data"), world.join("outside.data")).unwrap();
    let input = fixtures_dir().join("image_fourier/b1.in.pixel_values.npy");
    let out = dir.join("out.npy");

    let dotdot = dir.join("dotdot.onnx");
    let name = tamper(&ext, &dotdot, |t| set(t, "location", "../outside.data"));
    for cmd in ["run", "inspect"] {
        let args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            if cmd == "run" { vec![&"run", &dotdot, &"-i", &input, &"-o", &out] } else { vec![&"inspect", &dotdot] };
        refused(&world, &args, &[&name, "../outside.data", "inside the model's folder"]);
    }

    let absolute = dir.join("absolute.onnx");
    let outside = world.join("outside.data");
    let name = tamper(&ext, &absolute, |t| set(t, "location", outside.to_str().unwrap()));
    refused(&world, &[&"run", &absolute, &"-i", &input, &"-o", &out], &[&name, "outside.data", "relative path"]);

    // A symlink inside the folder that points out of it.
    std::os::unix::fs::symlink(&outside, dir.join("link.data")).unwrap();
    let link = dir.join("link.onnx");
    let name = tamper(&ext, &link, |t| set(t, "location", "link.data"));
    refused(&world, &[&"run", &link, &"-i", &input, &"-o", &out], &[&name, "link.data", "outside the model's folder"]);

    // A side file shorter than offset + length.
    let short_data = dir.join("short.data");
    let len = std::fs::metadata(dir.join("ext.onnx.data")).unwrap().len();
    let bytes = std::fs::read(dir.join("ext.onnx.data")).unwrap();
    std::fs::write(&short_data, &bytes[..len as usize / 2]).unwrap();
    let short = dir.join("short.onnx");
    let name = tamper(&ext, &short, |t| {
        set(t, "location", "short.data");
        set(t, "offset", &(len / 2).to_string());
    });
    refused(&world, &[&"run", &short, &"-i", &input, &"-o", &out], &[&name, "short.data", "shorter than offset"]);
    refused(&world, &[&"bench", &short, &"--runs", &"1"], &[&name, "short.data"]);

    // A length that differs from the declared shape.
    let wrong = dir.join("wrong.onnx");
    let name = tamper(&ext, &wrong, |t| {
        let l: u64 = entry(t, "length").parse().unwrap();
        set(t, "length", &(l - 4).to_string());
    });
    refused(&world, &[&"run", &wrong, &"-i", &input, &"-o", &out], &[&name, "ext.onnx.data", "declares"]);

    // A missing side file.
    let missing = dir.join("missing.onnx");
    let name = tamper(&ext, &missing, |t| set(t, "location", "gone.data"));
    refused(&world, &[&"run", &missing, &"-i", &input, &"-o", &out], &[&name, "gone.data"]);
    refused(&world, &[&"compare", &ext, &missing, &"--inputs", &input], &[&name, "gone.data"]);
}

#[test]
fn external_data_export_writes_nothing_on_failure() {
    let tmp = tempfile::tempdir().unwrap();
    // The side file's name is taken by a folder: the rename fails; neither file appears.
    let out = tmp.path().join("m.onnx");
    std::fs::create_dir(tmp.path().join("m.onnx.data")).unwrap();
    std::fs::write(tmp.path().join("m.onnx.data/keep"), b"x").unwrap();
    let ck = fixtures_dir().join("image_fourier");
    refused(tmp.path(), &[&"export", &ck, &"-o", &out, &"--external-data"], &["m.onnx.data"]);
}
