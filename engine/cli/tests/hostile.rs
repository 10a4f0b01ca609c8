//! Hostile input, one test per class (issue #13): each case must end in exactly one `error:`
//! line naming the file, tensor or flag, exit status 1 (never 101 from a panic, never a signal
//! from an abort), and leave every file as it was: nothing created, nothing changed.

use perceiver_edge_runtime::tract_onnx::pb;
use prost::Message;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

mod common;
use common::*;

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A copy of fixture `name` in `t/case` with `edit` applied to its config.json.
fn with_config(t: &Path, name: &str, case: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = t.join(case);
    copy_dir(&fixture(name), &d);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    d
}

fn export_ok(ck: &Path, out: &Path, extra: &[&str]) {
    let o = bin().arg("export").arg(ck).arg("-o").arg(out).args(extra).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn config_values_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out").join("m.onnx");
    std::fs::create_dir(t.join("out")).unwrap();
    let cases: Vec<(&str, &str, serde_json::Value, &[&str])> = vec![
        ("image_fourier", "empty_image_size", serde_json::json!({"image_size": []}), &["config.json", "image_size"]),
        ("image_fourier", "three_image_size", serde_json::json!({"image_size": [16, 16, 3]}), &["image_size"]),
        ("image_fourier", "zero_image", serde_json::json!({"image_size": 0}), &["image_size", "at least 1"]),
        ("flow", "empty_train_size", serde_json::json!({"train_size": []}), &["config.json", "train_size"]),
        ("flow", "odd_train_size", serde_json::json!({"train_size": [8]}), &["train_size"]),
        ("image_fourier", "zero_latents", serde_json::json!({"num_latents": 0}), &["num_latents", "at least 1"]),
        ("image_fourier", "more_latents", serde_json::json!({"num_latents": 9}), &["num_latents is 9", "8 rows"]),
        ("image_fourier", "wider_latents", serde_json::json!({"d_latents": 64}), &["d_latents is 64"]),
        (
            "image_fourier",
            "dropped_layers",
            serde_json::json!({"num_self_attends_per_block": 1}),
            &["num_self_attends_per_block is 1", "2 latent self-attention layers"],
        ),
        (
            "image_fourier",
            "zero_heads",
            serde_json::json!({"num_self_attention_heads": 0}),
            &["num_self_attention_heads"],
        ),
        ("image_fourier", "absurd_image", serde_json::json!({"image_size": 1_000_000}), &["limit"]),
        (
            "image_fourier",
            "absurd_blocks",
            serde_json::json!({"num_blocks": 1_000_000_000}),
            &["num_blocks", "latent layers"],
        ),
    ];
    for (name, case, patch, needles) in cases {
        let d = with_config(t, name, case, |cfg| {
            for (k, v) in patch.as_object().unwrap() {
                cfg[k] = v.clone();
            }
        });
        refused(t, &[&"export", &d, &"-o", &out], needles);
    }
    let ok = fixture("image_fourier");
    refused(t, &[&"export", &ok, &"-o", &out, &"--image-size", &"1000000", &"1000000"], &["limit"]);
    refused(t, &[&"export", &ok, &"-o", &out, &"--blocks", &"1000000000"], &["--blocks 1000000000"]);
    refused(t, &[&"export", &ok, &"-o", &out, &"--batch", &"100000000"], &["limit", "--max-tensor-gib"]);
    refused(t, &[&"export", &ok, &"-o", &out, &"--max-tensor-gib=-1"], &["--max-tensor-gib"]);
    // The ceiling is a flag: lowering it refuses a normal export, naming the figure.
    refused(t, &[&"export", &ok, &"-o", &out, &"--max-tensor-gib", &"0.000001"], &["over the 1.0 KiB limit"]);
}

#[test]
fn weights_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("m.onnx");
    let ok = fixture("image_fourier");
    let base = tensors(&ok.join("model.safetensors"));
    let case = |name: &str, edit: &dyn Fn(&mut Tensors)| {
        let d = t.join(name);
        copy_dir(&ok, &d);
        let mut ts = base.clone();
        edit(&mut ts);
        write_tensors(&d.join("model.safetensors"), &ts);
        d
    };
    let latents = "perceiver.embeddings.latents";
    let d = case("nan", &|ts| {
        let l = ts.iter_mut().find(|t| t.0 == latents).unwrap();
        l.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    refused(t, &[&"export", &d, &"-o", &out], &["model.safetensors", latents, "NaN"]);
    let d = case("inf", &|ts| {
        let l = ts.iter_mut().find(|t| t.0.ends_with("final_layer.bias") || t.0.ends_with("decoder.bias")).unwrap();
        l.3[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    });
    refused(t, &[&"export", &d, &"-o", &out], &["infinite"]);
    refused(t, &[&"export", &d, &"-o", &t.join("m.pack"), &"--format", &"pack"], &["infinite"]);
    let d = case("empty", &|ts| {
        let l = ts.iter_mut().find(|t| t.0 == latents).unwrap();
        l.2 = vec![0, 32];
        l.3.clear();
    });
    refused(t, &[&"export", &d, &"-o", &out], &[latents, "no elements"]);
    // Widths that disagree: the attention output projection one wider than the latents.
    let name = "perceiver.encoder.self_attends.0.attention.output.dense";
    let d = case("wide", &|ts| {
        for suffix in ["weight", "bias"] {
            let w = ts.iter_mut().find(|t| t.0 == format!("{name}.{suffix}")).unwrap();
            w.2[0] += 1;
            let n: usize = w.2.iter().product();
            w.3 = vec![0u8; 4 * n];
        }
    });
    refused(t, &[&"export", &d, &"-o", &out], &["self_attends"]);
}

#[test]
fn shards_stay_in_the_checkpoint_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("m.onnx");
    let ok = fixture("image_fourier");
    let ts = tensors(&ok.join("model.safetensors"));
    let (a, b) = ts.split_at(ts.len() / 2);
    std::fs::write(t.join("outside.safetensors"), std::fs::read(ok.join("model.safetensors")).unwrap()).unwrap();
    let sharded = |name: &str, shard_b: &str, map_b: &str, b_tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]| {
        let d = t.join(name);
        copy_dir(&ok, &d);
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        write_tensors(&d.join("a.safetensors"), a);
        if !shard_b.is_empty() {
            write_tensors(&d.join(shard_b), b_tensors);
        }
        let map: serde_json::Map<String, serde_json::Value> = a
            .iter()
            .map(|x| (x.0.clone(), "a.safetensors".into()))
            .chain(b.iter().map(|x| (x.0.clone(), map_b.into())))
            .collect();
        std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string())
            .unwrap();
        d
    };
    let d = sharded("dotdot", "", "../outside.safetensors", b);
    refused(t, &[&"export", &d, &"-o", &out], &["model.safetensors.index.json", "../outside.safetensors", "inside"]);
    let d = sharded("absolute", "", "/dev/zero", b);
    refused(t, &[&"export", &d, &"-o", &out], &["/dev/zero", "inside the checkpoint folder"]);
    let d = sharded("symlink", "", "b.safetensors", b);
    std::os::unix::fs::symlink(t.join("outside.safetensors"), d.join("b.safetensors")).unwrap();
    refused(t, &[&"export", &d, &"-o", &out], &["b.safetensors", "not a file inside the checkpoint folder"]);
    // A tensor stored in a shard the index does not assign it to (defined twice).
    let mut b_plus = b.to_vec();
    b_plus.push(a[0].clone());
    let d = sharded("twice", "b.safetensors", "b.safetensors", &b_plus);
    refused(t, &[&"export", &d, &"-o", &out], &["b.safetensors", &a[0].0, "another shard"]);
    // A tensor the index assigns to a shard that does not hold it.
    let d = sharded("absent", "b.safetensors", "b.safetensors", &b[1..]);
    refused(t, &[&"export", &d, &"-o", &out], &["b.safetensors", &b[0].0, "not in it"]);
}

/// A `.npy` file with a hand-written header and `data` after it.
fn raw_npy(path: &Path, version: u8, header: &str, declared_len: Option<u32>, data: &[u8]) {
    let mut bytes = b"\x93NUMPY".to_vec();
    bytes.push(version);
    bytes.push(0);
    let len = declared_len.unwrap_or(header.len() as u32);
    if version == 1 {
        bytes.extend_from_slice(&(len as u16).to_le_bytes());
    } else {
        bytes.extend_from_slice(&len.to_le_bytes());
    }
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn npy_headers_are_checked_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("m.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    let out = t.join("y.npy");
    let huge = t.join("huge.npy");
    raw_npy(&huge, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000, 13), }\n", None, &[0; 40]);
    let big_header = t.join("big_header.npy");
    raw_npy(
        &big_header,
        2,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 12, 16), }\n",
        Some(u32::MAX),
        &[],
    );
    let short = t.join("short.npy");
    raw_npy(&short, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 12, 16), }\n", None, &[0; 100]);
    let odd = t.join("odd.npy");
    raw_npy(&odd, 1, "{'descr': '<c16', 'fortran_order': False, 'shape': (2,), }\n", None, &[0; 32]);
    let bad_shape = t.join("bad_shape.npy");
    raw_npy(&bad_shape, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-3, 2), }\n", None, &[]);
    for (f, needle) in [
        (&huge, "limit"),
        (&big_header, "header declares 4294967295 bytes"),
        (&short, "the file holds 100 bytes"),
        (&odd, "'<c16' is not supported"),
        (&bad_shape, "shape"),
    ] {
        let name = f.file_name().unwrap().to_str().unwrap();
        refused(t, &[&"run", &model, &"--input", f, &"--output", &out], &[name, needle]);
        refused(t, &[&"bench", &model, &"--input", f, &"--runs", &"1"], &[name, needle]);
        refused(t, &[&"compare", &model, &model, &"--inputs", f], &[name, needle]);
        refused(
            t,
            &[
                &"export",
                &fixture("image_fourier"),
                &"-o",
                &t.join("q.onnx"),
                &"--precision",
                &"int8-static",
                &"--calibrate",
                f,
                &"--image-size",
                &"12",
                &"16",
            ],
            &[name, needle],
        );
    }
}

fn read_model(p: &Path) -> pb::ModelProto {
    pb::ModelProto::decode(&*std::fs::read(p).unwrap()).unwrap()
}

fn write_model(p: &Path, m: &pb::ModelProto) {
    std::fs::write(p, m.encode_to_vec()).unwrap();
}

fn int64_tensor(name: &str, values: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

#[test]
fn onnx_files_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("m.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    let input = t.join("x.npy");
    let x = perceiver_edge_runtime::tensor(&[1, 3, 12, 16], &vec![0.5f32; 12 * 16 * 3]).unwrap();
    perceiver_edge_runtime::npy::write_npy(&input, &x).unwrap();
    let base = read_model(&model);
    let variant = |name: &str, edit: &dyn Fn(&mut pb::ModelProto)| {
        let mut m = base.clone();
        edit(&mut m);
        let p = t.join(name);
        write_model(&p, &m);
        p
    };
    let g = |m: &mut pb::ModelProto| -> *mut pb::GraphProto { m.graph.as_mut().unwrap() };

    let p = variant("string.onnx", &|m| {
        let g = unsafe { &mut *g(m) };
        g.initializer.push(pb::TensorProto {
            name: "words".into(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::String as i32,
            string_data: vec![b"a".to_vec(), b"b".to_vec()],
            ..Default::default()
        });
    });
    refused(
        t,
        &[&"run", &p, &"--input", &input, &"--output", &t.join("y.npy")],
        &["string.onnx", "`words`", "string tensor"],
    );
    let p = variant("short_init.onnx", &|m| {
        let g = unsafe { &mut *g(m) };
        let init = g.initializer.iter_mut().find(|i| i.raw_data.len() > 64).unwrap();
        init.raw_data.truncate(8);
    });
    refused(t, &[&"inspect", &p], &["short_init.onnx", "holds 8 bytes"]);
    let p = variant("huge_const.onnx", &|m| {
        let g = unsafe { &mut *g(m) };
        g.initializer.push(int64_tensor("huge_shape", &[1 << 20, 1 << 20, 1 << 10]));
        g.node.push(pb::NodeProto {
            name: "boom".into(),
            op_type: "ConstantOfShape".into(),
            input: vec!["huge_shape".into()],
            output: vec!["boom_out".into()],
            ..Default::default()
        });
        g.output.push(pb::ValueInfoProto { name: "boom_out".into(), ..Default::default() });
    });
    refused(t, &[&"bench", &p, &"--runs", &"1"], &["huge_const.onnx", "`boom`", "limit"]);
    // An output name that would escape the output folder.
    let p = variant("escape.onnx", &|m| {
        let g = unsafe { &mut *g(m) };
        let old = g.output[0].name.clone();
        g.output[0].name = "../escaped".into();
        for n in &mut g.node {
            for o in &mut n.output {
                if *o == old {
                    *o = "../escaped".into();
                }
            }
        }
    });
    std::fs::create_dir(t.join("outdir")).unwrap();
    refused(
        t,
        &[&"run", &p, &"--input", &input, &"--output", &t.join("outdir/")],
        &["../escaped", "not a plain file name"],
    );
    // A declared value range that is empty.
    let p = variant("range.onnx", &|m| {
        m.metadata_props.push(pb::StringStringEntryProto {
            key: perceiver_edge_runtime::metadata::range_key("pixel_values"),
            value: "0 -1".into(),
        });
    });
    refused(t, &[&"bench", &p, &"--runs", &"1"], &["range.onnx", "empty or unbounded value range"]);
    // compare: graphs whose outputs differ in shape (the logits twice, side by side).
    let p = variant("wide.onnx", &|m| {
        let g = unsafe { &mut *g(m) };
        let logits = g.output[0].name.clone();
        g.node.push(pb::NodeProto {
            name: "twice".into(),
            op_type: "Concat".into(),
            input: vec![logits.clone(), logits],
            output: vec!["twice".into()],
            attribute: vec![pb::AttributeProto {
                name: "axis".into(),
                r#type: pb::attribute_proto::AttributeType::Int as i32,
                i: -1,
                ..Default::default()
            }],
            ..Default::default()
        });
        g.output[0] = pb::ValueInfoProto { name: "twice".into(), ..Default::default() };
    });
    refused(t, &[&"compare", &model, &p, &"--inputs", &input], &["wide.onnx", "output shape"]);
}

/// An edit of a 4-bit product: its `K`, its weight's dims, its weight and its scales.
type NbitsEdit = dyn Fn(&mut i64, &mut Vec<i64>, &mut pb::TensorProto, &mut pb::TensorProto);

/// 4-bit products (`MatMulNBits`, read by the runtime's own translation, `nbits_import.rs`): a
/// weight of the wrong size, and a `K` that is not the activation's last axis.
#[test]
fn four_bit_products_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("q4.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16", "--precision", "q4"]);
    let base = read_model(&model);
    // The first product's own copies of its weight and scales, edited by `edit` (`K`, the
    // weight's rows of blocks, the scales), so that other readers of the originals are untouched.
    let variant = |name: &str, edit: &NbitsEdit| {
        let mut m = base.clone();
        let g = m.graph.as_mut().unwrap();
        let at = g.node.iter().position(|n| n.op_type == "MatMulNBits").unwrap();
        let (b, s) = (g.node[at].input[1].clone(), g.node[at].input[2].clone());
        let mut wb = g.initializer.iter().find(|i| i.name == b).unwrap().clone();
        let mut ws = g.initializer.iter().find(|i| i.name == s).unwrap().clone();
        (wb.name, ws.name) = ("edited_b".into(), "edited_scales".into());
        let k = g.node[at].attribute.iter_mut().find(|a| a.name == "K").unwrap();
        let mut dims = wb.dims.clone();
        edit(&mut k.i, &mut dims, &mut wb, &mut ws);
        wb.dims = dims;
        g.node[at].input[1] = wb.name.clone();
        g.node[at].input[2] = ws.name.clone();
        g.initializer.extend([wb, ws]);
        let p = t.join(name);
        write_model(&p, &m);
        p
    };
    // One row of the weight missing (its dims and bytes agree).
    let p = variant("nbits_short.onnx", &|_, dims, b, _| {
        let row = (dims[1] * dims[2]) as usize;
        dims[0] -= 1;
        b.raw_data.truncate(b.raw_data.len() - row);
    });
    refused(t, &[&"bench", &p, &"--runs", &"1"], &["nbits_short.onnx", "MatMulNBits", "blocks of 16 bytes"]);
    // K one block longer than the activation's last axis, weight and scales to match.
    let p = variant("nbits_k.onnx", &|k, dims, b, s| {
        *k += 32;
        let n = dims[0] as usize;
        dims[1] += 1;
        b.raw_data = vec![0x88; n * dims[1] as usize * 16];
        let scales: Vec<f32> = vec![0.5; n * dims[1] as usize];
        s.dims = vec![scales.len() as i64];
        s.raw_data = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
    });
    refused(t, &[&"bench", &p, &"--runs", &"1"], &["nbits_k.onnx", "MatMulNBits", "last axis of K="]);
}

#[test]
fn cli_numbers_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("m.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    for (args, needle) in [
        (vec!["--duration", "1e20"], "--duration 1e20"),
        (vec!["--rate", "1e-300"], "--rate 1e-300"),
        (vec!["--rate", "1e-19"], "--rate 1e-19"),
        (vec!["--rate", "0"], "--rate 0"),
        (vec!["--threads", "100000"], "--threads 100000"),
        (vec!["--threads", "0"], "--threads 0"),
        (vec!["--runs", "0"], "--runs 0"),
        (vec!["--runs", "100000000000"], "--runs 100000000000"),
        (vec!["--runs", "-3"], "'-3'"),
        (vec!["--no-such-flag"], "--no-such-flag"),
    ] {
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"bench", &model];
        for x in &args {
            a.push(x);
        }
        refused(t, &a, &[needle]);
    }
    let input = t.join("x.npy");
    let x = perceiver_edge_runtime::tensor(&[1, 3, 12, 16], &vec![0.5f32; 12 * 16 * 3]).unwrap();
    perceiver_edge_runtime::npy::write_npy(&input, &x).unwrap();
    for value in ["0", "100000"] {
        let out = t.join("y.npy");
        refused(
            t,
            &[&"run", &model, &"-i", &input, &"-o", &out, &"--threads", &value],
            &[&format!("--threads {value}")],
        );
    }
    let ck = fixture("image_fourier");
    let data = t.join("calib.npy");
    let x = perceiver_edge_runtime::tensor(&[4, 3, 16, 16], &vec![0.5f32; 4 * 3 * 16 * 16]).unwrap();
    perceiver_edge_runtime::npy::write_npy(&data, &x).unwrap();
    let target = root().join("targets/raspberry-pi-5.toml");
    for (flag, value) in [("--threads", "100000"), ("--blocks", "1000000000")] {
        let out = t.join("tuned");
        let args: [&dyn AsRef<std::ffi::OsStr>; 10] =
            [&"tune", &ck, &"--target", &target, &"--calibrate", &data, &"-o", &out, &flag, &value];
        refused(t, &args, &[&format!("{flag} {value}")]);
    }
}

#[test]
fn outputs_never_overwrite_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ck = t.join("ck");
    copy_dir(&fixture("image_fourier"), &ck);
    let model = t.join("m.onnx");
    export_ok(&ck, &model, &["--image-size", "12", "16"]);
    let input = t.join("x.npy");
    let x = perceiver_edge_runtime::tensor(&[1, 3, 12, 16], &vec![0.5f32; 12 * 16 * 3]).unwrap();
    perceiver_edge_runtime::npy::write_npy(&input, &x).unwrap();
    refused(t, &[&"run", &model, &"--input", &input, &"--output", &input], &["x.npy", "overwrite the input"]);
    refused(t, &[&"run", &model, &"--input", &input, &"--output", &model], &["m.onnx", "overwrite the input"]);
    std::os::unix::fs::symlink(&input, t.join("alias.npy")).unwrap();
    refused(t, &[&"run", &model, &"--input", &input, &"--output", &t.join("alias.npy")], &["overwrite the input"]);
    refused(t, &[&"export", &ck, &"-o", &ck.join("model.safetensors")], &["model.safetensors", "overwrite the input"]);
    refused(
        t,
        &[&"export", &ck, &"-o", &ck.join("config.json"), &"--format", &"pack"],
        &["config.json", "overwrite the input"],
    );
    // Writing next to the checkpoint is fine.
    export_ok(&ck, &ck.join("model.onnx"), &["--image-size", "12", "16"]);
}

#[test]
fn multi_output_runs_write_all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("m.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    // A second output: the same logits through an Identity.
    let mut m = read_model(&model);
    let g = m.graph.as_mut().unwrap();
    let first = g.output[0].clone();
    g.node.push(pb::NodeProto {
        name: "copy".into(),
        op_type: "Identity".into(),
        input: vec![first.name.clone()],
        output: vec!["copy".into()],
        ..Default::default()
    });
    g.output.push(pb::ValueInfoProto { name: "copy".into(), ..first });
    let two = t.join("two.onnx");
    write_model(&two, &m);
    let input = t.join("x.npy");
    let x = perceiver_edge_runtime::tensor(&[1, 3, 12, 16], &vec![0.5f32; 12 * 16 * 3]).unwrap();
    perceiver_edge_runtime::npy::write_npy(&input, &x).unwrap();
    let bad = bin()
        .arg("run")
        .arg(&two)
        .arg("--input")
        .arg(&input)
        .args(["--output"])
        .arg(t.join("a.npy"))
        .args(["--output"])
        .arg(t.join("missing/b.npy"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(!t.join("a.npy").exists(), "the first output must not be written when the second fails");
    let names: Vec<String> =
        std::fs::read_dir(t).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "no temporary file left: {names:?}");
    let ok =
        bin().arg("run").arg(&two).arg("--input").arg(&input).arg("--output").arg(t.join("out/")).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(t.join("out/copy.npy").is_file());
}

#[test]
fn broken_sensors_are_noticed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("m.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    let input = t.join("nan.npy");
    let mut v = vec![0.5f32; 12 * 16 * 3];
    v[7] = f32::NAN;
    v[9] = f32::INFINITY;
    perceiver_edge_runtime::npy::write_npy(&input, &perceiver_edge_runtime::tensor(&[1, 3, 12, 16], &v).unwrap())
        .unwrap();
    let o =
        bin().arg("run").arg(&model).arg("--input").arg(&input).arg("--output").arg(t.join("y.npy")).output().unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning:") && err.contains("nan.npy") && err.contains("2 NaN or infinite"), "{err}");
    let o = bin().arg("bench").arg(&model).arg("--input").arg(&input).args(["--runs", "3", "--json"]).output().unwrap();
    assert!(o.status.success());
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["nonfinite_input_values"], 2);
    assert_eq!(r["nonfinite_output_runs"], 3, "NaN inputs give NaN logits on every run");
}

/// Devices and folders where a file is expected: refused before reading (reading /dev/zero
/// would never end).
#[test]
fn device_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let zero = Path::new("/dev/zero");
    refused(t, &[&"bench", &zero, &"--runs", &"1"], &["/dev/zero", "not a regular file"]);
    refused(t, &[&"inspect", &zero], &["/dev/zero", "not a regular file"]);
    refused(t, &[&"profile", &zero], &["/dev/zero", "not a regular file"]);
    let ck = t.join("ck");
    copy_dir(&fixture("image_fourier"), &ck);
    std::fs::remove_file(ck.join("config.json")).unwrap();
    std::os::unix::fs::symlink(zero, ck.join("config.json")).unwrap();
    refused(t, &[&"export", &ck, &"-o", &t.join("m.onnx")], &["config.json", "not a regular file"]);
    let model = t.join("m2.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    refused(t, &[&"run", &model, &"--input", &zero, &"--output", &t.join("y.npy")], &["/dev/zero"]);
}

/// Inputs the fuzzers found (engine/cli/tests/data/fuzz-findings), each once a panic or an
/// allocation abort: now a one-line error.
#[test]
fn fuzz_findings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-findings");
    let model = t.join("m.onnx");
    export_ok(&fixture("image_fourier"), &model, &["--image-size", "12", "16"]);
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".onnx") {
            refused(t, &[&"inspect", &p], &[&name]);
            refused(t, &[&"bench", &p, &"--runs", &"1"], &[&name]);
        } else if name.ends_with(".npy") {
            refused(t, &[&"run", &model, &"--input", &p, &"--output", &t.join("y.npy")], &[&name]);
        }
    }
}
