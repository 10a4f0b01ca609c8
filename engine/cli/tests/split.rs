//! Encode once, query many (`export --split`, `run DIR/ --points/--blocks/--deadline-ms`): on
//! every fixture case the chain of parts reproduces the single-graph export (<= 1e-6 x (1 + the
//! largest |value|)) and transformers (the fixture tolerance), in tract and in onnxruntime; decoding chosen positions
//! equals the full output at those positions (<= 1e-5), also multimodal's video points and
//! audio patches chosen together; `--blocks b` equals `export --blocks b`.

use perceiver_edge_runtime::{npy, to_vec, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::*;

fn f32s(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = npy::read_npy(p).unwrap();
    (t.shape().to_vec(), to_vec(&t).expect("f32"))
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max)
}

struct Case {
    dir: PathBuf,
    name: String,
    args: Vec<String>,
    inputs: Vec<(String, PathBuf)>,
    outputs: Vec<(String, PathBuf)>,
    atol: f64,
    rtol: f64,
}

/// Fixture cases that decode every position (subset cases take index inputs of their own).
fn cases() -> Vec<Case> {
    let mut out = vec![];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.join("fixture.json").is_file()) {
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
        for c in meta["cases"].as_array().unwrap() {
            let args: Vec<String> =
                c["export_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
            if args.iter().any(|a| a.contains("subset") || a.contains("points")) {
                continue;
            }
            let io = |k: &str| -> Vec<(String, PathBuf)> {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| (x["name"].as_str().unwrap().to_string(), dir.join(x["file"].as_str().unwrap())))
                    .collect()
            };
            out.push(Case {
                name: format!("{}/{}", dir.file_name().unwrap().to_string_lossy(), c["name"].as_str().unwrap()),
                args,
                inputs: io("inputs"),
                outputs: io("outputs"),
                atol: c["atol"].as_f64().or(meta["atol"].as_f64()).unwrap_or(1e-4),
                rtol: c["rtol"].as_f64().or(meta["rtol"].as_f64()).unwrap_or(1e-5),
                dir: dir.clone(),
            });
        }
    }
    out
}

fn run_split(dir: &Path, c: &Case, extra: &[&str], out: &Path) -> String {
    let mut cmd = bin();
    cmd.arg("run").arg(dir);
    for (n, f) in &c.inputs {
        cmd.arg("--input").arg(format!("{n}={}", f.display()));
    }
    cmd.args(extra).arg("--output").arg(format!("{}/", out.display()));
    ok(&mut cmd)
}

fn run_single(model: &Path, c: &Case, out: &Path) {
    let mut cmd = bin();
    cmd.arg("run").arg(model);
    for (n, f) in &c.inputs {
        cmd.arg("--input").arg(format!("{n}={}", f.display()));
    }
    ok(cmd.arg("--output").arg(format!("{}/", out.display())));
}

#[test]
fn split_chain_matches_single_graph_and_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let py = python();
    let mut checked = 0;
    for (i, c) in cases().iter().enumerate() {
        let split = t.join(format!("split{i}"));
        let single = t.join(format!("single{i}.onnx"));
        ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).args(&c.args).arg("--split"));
        ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&single).args(&c.args));
        let (ys, y1) = (t.join(format!("ys{i}")), t.join(format!("y1{i}")));
        run_split(&split, c, &[], &ys);
        run_single(&single, c, &y1);
        for (name, want) in &c.outputs {
            let (sa, a) = f32s(&ys.join(format!("{name}.npy")));
            let (sb, b) = f32s(&y1.join(format!("{name}.npy")));
            let (_, w) = f32s(want);
            assert_eq!(sa, sb, "{} {name}: shape", c.name);
            // Rounding only: 1e-6 plus one part in a million of the largest value (on a 2-core AMD
            // EPYC with AVX2, flow's logits, at most 0.72, differed by 1.04e-6 between the graphs).
            let scale = b.iter().fold(0f64, |m, y| m.max((*y as f64).abs()));
            let d = max_diff(&a, &b);
            assert!(d <= 1e-6 * (1.0 + scale), "{} {name}: split vs single graph {d:.3e} (max |y| {scale:.2})", c.name);
            for (k, (x, y)) in a.iter().zip(&w).enumerate() {
                let err = (*x as f64 - *y as f64).abs();
                assert!(err <= c.atol + c.rtol * (*y as f64).abs(), "{} {name}[{k}]: {x} vs transformers {y}", c.name);
            }
        }
        if let Some(py) = &py {
            let mut cmd = std::process::Command::new(py);
            cmd.arg(root().join("models/reference/check_split.py")).arg(&split);
            for (n, f) in &c.inputs {
                cmd.arg("--input").arg(format!("{n}={}", f.display()));
            }
            for (n, f) in &c.outputs {
                cmd.arg("--expect").arg(format!("{n}={}", f.display()));
            }
            cmd.args(["--atol", &c.atol.to_string(), "--rtol", &c.rtol.to_string()]);
            let line = ok(&mut cmd);
            eprintln!("{}: {}", c.name, line.trim());
        }
        checked += 1;
    }
    assert!(checked >= 10, "every head family is covered ({checked} cases)");
}

#[test]
fn chosen_points_equal_the_full_output_there() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut seed = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut checked = 0;
    for (i, c) in cases().iter().enumerate() {
        let split = t.join(format!("split{i}"));
        ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).args(&c.args).arg("--split"));
        let m: Value = serde_json::from_str(&std::fs::read_to_string(split.join("manifest.json")).unwrap()).unwrap();
        if m["index_input"].is_null() {
            continue;
        }
        let n = m["num_queries"].as_u64().unwrap() as usize;
        let full = t.join(format!("full{i}"));
        run_split(&split, c, &[], &full);
        // 1 point, a few, and more than the largest bucket (the full decode and a selection).
        for k in [1, 7.min(n), n.saturating_sub(3).max(1)] {
            let idx: Vec<i64> = (0..k).map(|_| (next() % n as u64) as i64).collect();
            let pf = t.join(format!("p{i}_{k}.npy"));
            npy::write_npy(&pf, &Tensor::from_shape(&[k], &idx).unwrap()).unwrap();
            let out = t.join(format!("pts{i}_{k}"));
            run_split(&split, c, &["--points", pf.to_str().unwrap()], &out);
            for (name, _) in &c.outputs {
                let (sf, f) = f32s(&full.join(format!("{name}.npy")));
                let (sp, p) = f32s(&out.join(format!("{name}.npy")));
                let b = sf[0];
                let per = f.len() / b / n;
                assert_eq!((sp[0], sp[1], sp[2..].iter().product::<usize>()), (b, k, per), "{} {name}: shape", c.name);
                for bi in 0..b {
                    for (j, &q) in idx.iter().enumerate() {
                        let want = &f[(bi * n + q as usize) * per..][..per];
                        let got = &p[(bi * k + j) * per..][..per];
                        let d = max_diff(got, want);
                        assert!(d <= 1e-5, "{} {name}: point {q} differs by {d:.3e}", c.name);
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 9, "flow, masked LM and bare decoders are covered ({checked} point sets)");
}

/// `[B, n * per]` or `[B, n, per]` output `f` at positions `idx`, as `[B, K * per]` values.
fn at_points(f: &[f32], b: usize, n: usize, idx: &[i64]) -> Vec<f32> {
    let per = f.len() / b / n;
    (0..b).flat_map(|bi| idx.iter().flat_map(move |&q| &f[(bi * n + q as usize) * per..][..per])).copied().collect()
}

/// Writes int64 `[K]` indices to `path`.
fn write_points(path: &Path, idx: &[i64]) -> PathBuf {
    npy::write_npy(path, &Tensor::from_shape(&[idx.len()], idx).unwrap()).unwrap();
    path.to_path_buf()
}

#[test]
fn multimodal_chosen_points_equal_the_full_output_there() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let c = cases().into_iter().find(|c| c.name == "multimodal/full").unwrap();
    let split = t.join("split");
    ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).arg("--split"));
    let m: Value = serde_json::from_str(&std::fs::read_to_string(split.join("manifest.json")).unwrap()).unwrap();
    let pi = m["point_inputs"].as_array().unwrap();
    assert_eq!((pi[0]["name"].as_str(), pi[0]["positions"].as_u64()), (Some("image_points"), Some(128)));
    assert_eq!((pi[1]["name"].as_str(), pi[1]["positions"].as_u64()), (Some("audio_points"), Some(2)));
    let buckets: Vec<u64> = m["decoders"].as_array().unwrap().iter().filter_map(|d| d["queries"].as_u64()).collect();
    assert_eq!(buckets, [1, 64], "default buckets below the 128 video points");
    let full = t.join("full");
    run_split(&split, &c, &[], &full);
    let load = |dir: &Path, name: &str| f32s(&dir.join(format!("{name}.npy"))).1;
    let transformers = |name: &str| f32s(&c.dir.join(format!("full.out.{name}.npy"))).1;
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as i64
    };
    // (video points, audio patches): one each (bucket 1), a few (bucket 64), exactly the
    // largest bucket, more than it, and more audio patches than there are (repeats): the full
    // decode and a selection.
    for (ki, ka) in [(1, 1), (7, 2), (64, 2), (100, 2), (5, 3)] {
        let img: Vec<i64> = (0..ki).map(|_| next(128)).collect();
        let aud: Vec<i64> = (0..ka).map(|_| next(2)).collect();
        let pi = write_points(&t.join(format!("img{ki}_{ka}.npy")), &img);
        let pa = write_points(&t.join(format!("aud{ki}_{ka}.npy")), &aud);
        let out = t.join(format!("pts{ki}_{ka}"));
        let said = run_split(
            &split,
            &c,
            &[
                "--points",
                &format!("image_points={}", pi.display()),
                "--points",
                &format!("audio_points={}", pa.display()),
            ],
            &out,
        );
        assert!(said.contains(&format!("1 set(s) of {ki} image_points + {ka} audio_points")), "{said}");
        let (si, yi) = f32s(&out.join("image_logits.npy"));
        let (sa, ya) = f32s(&out.join("audio_logits.npy"));
        assert_eq!((si, sa), (vec![1, ki, 3], vec![1, ka * 16]), "shapes for {ki} + {ka}");
        for (name, got, n, idx) in [("image_logits", &yi, 128, &img), ("audio_logits", &ya, 2, &aud)] {
            let d = max_diff(got, &at_points(&load(&full, name), 1, n, idx));
            assert!(d <= 1e-5, "{ki} + {ka}: {name} differs from the full decode there by {d:.3e}");
            let d = max_diff(got, &at_points(&transformers(name), 1, n, idx));
            assert!(d <= c.atol, "{ki} + {ka}: {name} differs from transformers' full output there by {d:.3e}");
        }
        let d = max_diff(&load(&out, "label_logits"), &load(&full, "label_logits"));
        assert!(d <= 1e-5, "{ki} + {ka}: label_logits {d:.3e}");
    }
    // The fixture's own chunk: its points decoded from the split folder equal transformers'
    // full output there. (transformers' own chunk output `chunk.out.*` places subsampled
    // queries at -1 + 2 i / n, not on the full grid; the single-graph `--image-points` export
    // reproduces that, the fixture's chunk case.)
    let inputs: Vec<(String, PathBuf)> =
        ["image", "audio"].iter().map(|n| (n.to_string(), c.dir.join(format!("chunk.in.{n}.npy")))).collect();
    let chunk = Case { inputs, dir: c.dir.clone(), name: c.name.clone(), args: vec![], outputs: vec![], ..c };
    let out = t.join("chunk");
    let (pi, pa) = (chunk.dir.join("chunk.in.image_points.npy"), chunk.dir.join("chunk.in.audio_points.npy"));
    run_split(
        &split,
        &chunk,
        &["--points", &format!("image_points={}", pi.display()), "--points", &format!("audio_points={}", pa.display())],
        &out,
    );
    let idx = |p: &Path| -> Vec<i64> { to_vec(&npy::read_npy(p).unwrap()).unwrap() };
    for (name, n, p) in [("image_logits", 128, &pi), ("audio_logits", 2, &pa)] {
        let want = at_points(&transformers(name), 1, n, &idx(p));
        let d = max_diff(&load(&out, name), &want);
        assert!(d <= chunk.atol, "fixture chunk: {name} differs from transformers' full output there by {d:.3e}");
    }
    let d = max_diff(&load(&out, "label_logits"), &transformers("label_logits"));
    assert!(d <= chunk.atol, "fixture chunk: label_logits {d:.3e}");
}

#[test]
fn bad_multimodal_points_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let c = cases().into_iter().find(|c| c.name == "multimodal/full").unwrap();
    let split = t.join("split");
    ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).arg("--split"));
    let fails = |model: &Path, extra: &[String], needle: &str| {
        let out = t.join("out");
        let mut cmd = bin();
        cmd.arg("run").arg(model);
        for (n, f) in &c.inputs {
            cmd.arg("--input").arg(format!("{n}={}", f.display()));
        }
        let o = cmd.args(extra).arg("--output").arg(format!("{}/", out.display())).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!out.exists(), "nothing written");
    };
    let named = |name: &str, p: &Path| vec!["--points".to_string(), format!("{name}={}", p.display())];
    let img = write_points(&t.join("img.npy"), &[3, 127]);
    let aud = write_points(&t.join("aud.npy"), &[1]);
    fails(&split, &named("image_points", &img), "`audio_points` is missing (--points audio_points=FILE)");
    fails(
        &split,
        &["--points".into(), img.display().to_string()],
        "give --points NAME=FILE for each of image_points, audio_points",
    );
    fails(&split, &[named("image_points", &img), named("labels", &aud)].concat(), "`labels` is not an index input");
    let far = write_points(&t.join("far.npy"), &[0, 128]);
    fails(
        &split,
        &[named("image_points", &far), named("audio_points", &aud)].concat(),
        "position 128 at index 1 is out of range 0..=127",
    );
    let far_audio = write_points(&t.join("far_audio.npy"), &[2]);
    fails(
        &split,
        &[named("image_points", &img), named("audio_points", &far_audio)].concat(),
        "input `audio_points`: position 2 at index 0 is out of range 0..=1",
    );
    let empty = t.join("empty.npy");
    npy::write_npy(&empty, &Tensor::from_shape::<i64>(&[0], &[]).unwrap()).unwrap();
    fails(
        &split,
        &[named("image_points", &img), named("audio_points", &empty)].concat(),
        "expected [K] or [S, K] with K >= 1",
    );
    let float = t.join("float.npy");
    npy::write_npy(&float, &Tensor::from_shape(&[1], &[1f32]).unwrap()).unwrap();
    fails(&split, &[named("image_points", &float), named("audio_points", &aud)].concat(), "points must be int64");
    let two_sets = t.join("two.npy");
    npy::write_npy(&two_sets, &Tensor::from_shape(&[2, 1], &[0i64, 1]).unwrap()).unwrap();
    fails(
        &split,
        &[named("image_points", &img), named("audio_points", &two_sets)].concat(),
        "a different number of query sets per index input (image_points 1, audio_points 2)",
    );
    // The library: `decode` names the form multimodal takes; `decode_points` checks each set.
    let mut model = perceiver_edge_runtime::split::Model::load(&split).unwrap();
    let inputs: Vec<Tensor> = model
        .inputs()
        .iter()
        .map(|spec| npy::read_npy(&c.inputs.iter().find(|(n, _)| *n == spec.name).unwrap().1).unwrap())
        .collect();
    let z = model.encode(inputs).unwrap();
    let err = model.decode(&z, &[0]).unwrap_err().to_string();
    assert!(err.contains("image_points, audio_points") && err.contains("decode_points"), "{err}");
    let refused = |model: &mut perceiver_edge_runtime::split::Model, points: &[(&str, &[i64])], needle: &str| {
        let err = model.decode_points(&z, points).unwrap_err().to_string();
        assert!(err.contains(needle) && !err.contains('\n'), "expected `{needle}` in: {err}");
    };
    refused(&mut model, &[("image_points", &[0])], "input `audio_points`: no points given");
    refused(&mut model, &[("image_points", &[]), ("audio_points", &[0])], "an empty set");
    refused(&mut model, &[("image_points", &[0]), ("audio_points", &[-1])], "position -1 at index 0");
    refused(&mut model, &[("image_points", &[0]), ("image_points", &[1]), ("audio_points", &[0])], "given twice");
    let ok_points = model.decode_points(&z, &[("audio_points", &[1]), ("image_points", &[5, 6])]).unwrap();
    assert_eq!(ok_points[1].shape(), &[1, 2, 3], "named sets in any order");
    // A manifest that disagrees with the parts: 4 audio patches where the decoders take 2.
    let broken = t.join("broken");
    std::fs::create_dir(&broken).unwrap();
    for e in std::fs::read_dir(&split).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(split.join("manifest.json")).unwrap();
    let mut m: Value = serde_json::from_str(&text).unwrap();
    m["point_inputs"][1]["positions"] = 4.into();
    std::fs::write(broken.join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
    fails(&broken, &[], "decoder_q64.onnx index input is [2] (`audio_points`, int64), the manifest says int64 [4]");
}

#[test]
fn blocks_at_run_time_equal_blocks_at_export() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let c = cases().into_iter().find(|c| c.name == "image_fourier/b1").unwrap();
    let split = t.join("split");
    ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).args(&c.args).arg("--split"));
    let m: Value = serde_json::from_str(&std::fs::read_to_string(split.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["blocks"], 2, "the fixture's trained depth");
    // The exact rewrites still apply across the cut: the constant-query ones in the encoder.
    let said = ok(bin().arg("inspect").arg(split.join("encoder.onnx")));
    assert!(said.contains("position_split x1") && said.contains("constant_query_attention x1"), "{said}");
    for b in [1, 2, 3] {
        let single = t.join(format!("b{b}.onnx"));
        ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&single).args(&c.args).args(["--blocks", &b.to_string()]));
        let (ys, y1) = (t.join(format!("ys{b}")), t.join(format!("y1{b}")));
        let said = run_split(&split, &c, &["--blocks", &b.to_string()], &ys);
        assert!(said.contains(&format!("{b} block application(s)")), "{said}");
        run_single(&single, &c, &y1);
        let d = max_diff(&f32s(&ys.join("logits.npy")).1, &f32s(&y1.join("logits.npy")).1);
        assert!(d <= 1e-6, "--blocks {b}: {d:.3e}");
    }
    // Deadline mode: a generous deadline runs the whole depth, a tiny one at least one block.
    let said = run_split(&split, &c, &["--deadline-ms", "100000"], &t.join("dl"));
    assert!(said.contains("2 block application(s)"), "{said}");
    let said = run_split(&split, &c, &["--deadline-ms", "0.000001"], &t.join("dl2"));
    assert!(said.contains("1 block application(s)"), "{said}");
}

#[test]
fn bad_split_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let c = cases().into_iter().find(|c| c.name.starts_with("flow/")).unwrap();
    let split = t.join("split");
    ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).args(&c.args).arg("--split"));
    let input = format!("{}={}", c.inputs[0].0, c.inputs[0].1.display());
    let fails = |extra: &[&dyn AsRef<std::ffi::OsStr>], needle: &str| {
        let out = t.join("out");
        let o = bin()
            .arg("run")
            .arg(&split)
            .arg("--input")
            .arg(&input)
            .args(extra.iter().map(|a| a.as_ref()))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!out.exists(), "nothing written");
    };
    let write = |name: &str, t_: Tensor| {
        let p = t.join(name);
        npy::write_npy(&p, &t_).unwrap();
        p
    };
    let far = write("far.npy", Tensor::from_shape(&[2], &[0i64, 96]).unwrap());
    fails(&[&"--points", &far], "position 96 at index 1 is out of range 0..=95");
    let neg = write("neg.npy", Tensor::from_shape(&[1], &[-1i64]).unwrap());
    fails(&[&"--points", &neg], "position -1");
    let float = write("float.npy", Tensor::from_shape(&[1], &[1f32]).unwrap());
    fails(&[&"--points", &float], "points must be int64");
    let rank3 = write("rank3.npy", Tensor::from_shape(&[1, 1, 1], &[1i64]).unwrap());
    fails(&[&"--points", &rank3], "expected [K] or [S, K]");
    let empty = write("empty.npy", Tensor::from_shape::<i64>(&[0], &[]).unwrap());
    fails(&[&"--points", &empty], "expected [K] or [S, K] with K >= 1");
    fails(&[&"--blocks", &"2"], "no weight-shared block");
    // A manifest naming a missing part, or disagreeing with the parts' shapes.
    let broken = t.join("broken");
    std::fs::create_dir(&broken).unwrap();
    for e in std::fs::read_dir(&split).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    std::fs::remove_file(broken.join("decoder_q64.onnx")).unwrap();
    let o =
        bin().arg("run").arg(&broken).arg("--input").arg(&input).arg("--output").arg(t.join("o2")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("manifest.json") && err.contains("decoder_q64.onnx") && err.contains("missing"), "{err}");
    std::fs::copy(broken.join("decoder_q1.onnx"), broken.join("decoder_q64.onnx")).unwrap();
    let o =
        bin().arg("run").arg(&broken).arg("--input").arg(&input).arg("--output").arg(t.join("o2")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("decoder_q64.onnx") && err.contains("index input is [1]"), "{err}");
    assert!(!t.join("o2").exists());
}

#[test]
fn bench_times_each_part_and_each_block_count() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for (name, blocks, decoders) in [("image_fourier/b1", 2, 1), ("flow/full", 0, 3), ("multimodal/full", 0, 3)] {
        let c = cases().into_iter().find(|c| c.name == name).unwrap();
        let split = t.join(name.replace('/', "_"));
        ok(bin().arg("export").arg(&c.dir).arg("-o").arg(&split).args(&c.args).arg("--split"));
        let said = ok(bin().arg("inspect").arg(&split));
        assert!(
            said.contains("split model") && said.contains("-- encoder.onnx") && said.contains("-- decoder.onnx"),
            "{said}"
        );
        let out = ok(bin().arg("bench").arg(&split).args(["--runs", "3", "--warmup", "1", "--json"]));
        let r: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["block_ms"].is_null(), blocks == 0, "{name}");
        assert_eq!(r["decode_ms"].as_array().unwrap().len(), decoders, "{name}");
        let per = r["per_block_count_ms"].as_array().unwrap();
        let counts: Vec<u64> = per.iter().map(|p| p["blocks"].as_u64().unwrap()).collect();
        assert_eq!(counts, if blocks == 0 { vec![0] } else { (1..=blocks).collect() }, "{name}");
        for p in per {
            assert!(p["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
        }
    }
}
