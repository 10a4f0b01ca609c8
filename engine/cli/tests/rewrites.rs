//! The exact performance rewrites (issue #3), tested against the graph without them: every
//! fixture case is exported twice (`--no-rewrites` and default), both run in tract; outputs must
//! agree to 1e-5 (+ 1e-5 relative) with each other and still match transformers' outputs to the
//! fixture tolerance. The rewrites must actually fire on the heads with position features.

use perceiver_edge_runtime::{
    f32_packed_kernel, int8_matmul_kernel, npy, set_attention, set_epilogues, set_f32_packed, set_gemm_matmul,
    set_int8_matmul, set_layer_norm_rows, set_q4_decoded, set_q4_matmul, set_reference_order, set_softmax_rows,
    set_spin, set_threads, to_vec, Session, Tensor,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{bin, root};

fn read(p: &Path) -> Vec<f32> {
    to_vec(&npy::read_npy(p).unwrap()).expect("f32 output")
}

fn export(dir: &Path, args: &[&str], extra: &[&str], onnx: &Path) -> String {
    let out = bin().arg("export").arg(dir).arg("-o").arg(onnx).args(args).args(extra).output().unwrap();
    assert!(out.status.success(), "export {dir:?} {args:?} {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    let out = bin().arg("inspect").arg(onnx).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(onnx: &Path, inputs: &[PathBuf], out_dir: &Path) {
    let mut cmd = bin();
    cmd.arg("run").arg(onnx);
    for i in inputs {
        cmd.arg("--input").arg(i);
    }
    let out = cmd.arg("--output").arg(out_dir).output().unwrap();
    assert!(out.status.success(), "run {onnx:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Compares each output of case `c` from `other` (a rewritten graph, `label`) with `plain` (the
/// unrewritten graph's) to 1e-5 + 1e-5 |x|, and with transformers to the case's tolerance;
/// prints the largest differences.
fn compare_outputs(c: &Case, plain: &Path, other: &Path, label: &str) {
    let (fixture, case) = (&c.fixture, &c.name);
    for (name, want) in &c.outputs {
        let p = read(&plain.join(format!("{name}.npy")));
        let f = read(&other.join(format!("{name}.npy")));
        let want = read(want);
        assert_eq!(p.len(), f.len());
        let (mut d_pf, mut d_ft) = (0f64, 0f64);
        for i in 0..p.len() {
            let e = (p[i] as f64 - f[i] as f64).abs();
            assert!(
                e <= 1e-5 + 1e-5 * (p[i] as f64).abs(),
                "{fixture}/{case} {name}[{i}]: {label} {} vs plain {} ({e:.2e})",
                f[i],
                p[i]
            );
            let t = (f[i] as f64 - want[i] as f64).abs();
            assert!(
                t <= c.atol + c.rtol * (want[i] as f64).abs(),
                "{fixture}/{case} {name}[{i}]: {label} {} vs transformers {} ({t:.2e})",
                f[i],
                want[i]
            );
            d_pf = d_pf.max(e);
            d_ft = d_ft.max(t);
        }
        eprintln!(
            "{fixture:>15}/{case:<7} {name:<18} |{label} - plain| {d_pf:.2e}  |{label} - transformers| {d_ft:.2e}"
        );
    }
}

/// One fixture case: its folder, names, tolerances, export arguments, inputs and expected
/// outputs (name, transformers' file).
struct Case {
    dir: PathBuf,
    fixture: String,
    name: String,
    atol: f64,
    rtol: f64,
    args: Vec<String>,
    inputs: Vec<PathBuf>,
    outputs: Vec<(String, PathBuf)>,
}

/// Every case of every fixture, in folder order.
fn cases() -> Vec<Case> {
    let fixtures = root().join("models/reference/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&fixtures).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    let mut all = vec![];
    for dir in dirs.into_iter().filter(|d| d.join("fixture.json").is_file()) {
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
        let fixture = dir.file_name().unwrap().to_string_lossy().into_owned();
        for c in meta["cases"].as_array().unwrap() {
            let file = |v: &Value| dir.join(v["file"].as_str().unwrap());
            all.push(Case {
                fixture: fixture.clone(),
                name: c["name"].as_str().unwrap().to_string(),
                atol: c["atol"].as_f64().or(meta["atol"].as_f64()).unwrap_or(1e-4),
                rtol: c["rtol"].as_f64().or(meta["rtol"].as_f64()).unwrap_or(1e-5),
                args: c["export_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect(),
                inputs: c["inputs"].as_array().unwrap().iter().map(file).collect(),
                outputs: c["outputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| (o["name"].as_str().unwrap().to_string(), file(o)))
                    .collect(),
                dir: dir.clone(),
            });
        }
    }
    all
}

/// Exports case `c` with `--no-rewrites` and with `extra` (`label`); when `check` accepts the second
/// export's report, runs both and compares their outputs ([`compare_outputs`]). Returns that report.
fn exact_against_plain(tmp: &Path, c: &Case, label: &str, extra: &[&str], check: impl Fn(&str) -> bool) -> String {
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let path = |what: &str| tmp.join(format!("{}_{}_{what}", c.fixture, c.name));
    let (plain, other) = (path("plain.onnx"), path(&format!("{label}.onnx")));
    export(&c.dir, &args, &["--no-rewrites"], &plain);
    let report = export(&c.dir, &args, extra, &other);
    if check(&report) {
        let (po, oo) = (path("plain.out/"), path(&format!("{label}.out/")));
        run(&plain, &c.inputs, &po);
        run(&other, &c.inputs, &oo);
        compare_outputs(c, &po, &oo, label);
    }
    report
}

#[test]
fn rewrites_are_exact_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fired = vec![];
    let mut n = 0;
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        // Every table rewrite, whatever the default policy keeps: they are what is tested.
        let report = exact_against_plain(tmp.path(), &c, "fast", &["--tables", "all"], |_| true);
        let rewrites = report.lines().find(|l| l.starts_with("rewrites")).unwrap_or("");
        for pass in ["position_split", "constant_query_attention", "few_query_attention"] {
            if rewrites.contains(&format!("{pass} x")) {
                fired.push(format!("{pass}:{fixture}/{case}"));
            }
        }
        n += 1;
    }
    assert!(n >= 19, "fixtures missing: {n} cases");
    eprintln!("rewrites fired on: {fired:?}");
    for must in ["image_fourier", "image_learned", "image_conv"] {
        for pass in ["position_split", "constant_query_attention", "few_query_attention"] {
            assert!(fired.iter().any(|f| f.starts_with(&format!("{pass}:{must}"))), "{pass} did not fire on {must}");
        }
    }
}

#[test]
fn position_tables_are_a_budget_knob() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = root().join("models/reference/fixtures/image_fourier");
    let size = ["--image-size", "12", "16"];
    let on = export(&dir, &size, &["--tables", "all"], &tmp.path().join("on.onnx"));
    let off = export(&dir, &size, &["--no-position-tables"], &tmp.path().join("off.onnx"));
    assert!(on.contains("of precomputed constants from pass position_split"), "{on}");
    assert!(!off.contains("position_split"), "{off}");
    // `--tables none` is `--no-position-tables`; on this fixture `auto` keeps the tables (they
    // are smaller than the position features they replace), so it is `all`.
    export(&dir, &size, &["--tables", "none"], &tmp.path().join("none.onnx"));
    export(&dir, &size, &[], &tmp.path().join("auto.onnx"));
    let bytes = |n: &str| std::fs::read(tmp.path().join(n)).unwrap();
    assert_eq!(bytes("none.onnx"), bytes("off.onnx"));
    assert_eq!(bytes("auto.onnx"), bytes("on.onnx"));
    // The export report lists each table rewrite with its bytes and the FLOPs it saves.
    let out = bin().arg("export").arg(&dir).args(size).arg("-o").arg(tmp.path().join("r.onnx")).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    for pass in ["position_split", "constant_query_attention"] {
        assert!(
            report.lines().any(|l| l.contains(&format!("kept    {pass}:")) && l.contains("GFLOPs per inference")),
            "{report}"
        );
    }
    let out = bin()
        .arg("export")
        .arg(&dir)
        .args(["--tables", "none", "--no-position-tables", "-o"])
        .arg(tmp.path().join("x.onnx"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the two spellings conflict");
}

/// `--tables auto` below f32, on the bench model (image 64 x 64: 4 096 Fourier inputs; random
/// weights from transformers, `bench_vs_onnxruntime.py::build_model`): at int8 the tables grow the
/// stored graph by about 40 % for 57 % fewer FLOPs and are kept (the file is the `--tables all`
/// file, and its logits match transformers' to int8's target); at q4 they grow it by 65 %, more
/// than the FLOPs they save, but halve the largest activation, so a run needs less memory: kept,
/// at q4's target. A model of 512 latents of 128 over a 32 x 32 image, whose q4 tables grow the
/// graph by about 120 % for 20 % fewer FLOPs and a larger run, drops them (the `--tables none`
/// file). The report gives the figures.
#[test]
fn tables_below_f32_are_kept_where_they_pay() {
    let Some(py) = common::require_train_python("tables_below_f32_are_kept_where_they_pay") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (ck, wide) = (tmp.path().join("bench"), tmp.path().join("wide"));
    let script = "import sys, numpy as np, torch\n\
                  sys.path.insert(0, sys.argv[1])\n\
                  import bench_vs_onnxruntime as b\n\
                  from transformers import PerceiverConfig, PerceiverForImageClassificationFourier as F\n\
                  m = b.build_model(sys.argv[2])\n\
                  x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)\n\
                  np.save(sys.argv[3], x)\n\
                  with torch.no_grad():\n    np.save(sys.argv[4], m(pixel_values=torch.from_numpy(x)).logits.numpy())\n\
                  c = PerceiverConfig(num_latents=512, d_latents=128, d_model=261, num_self_attends_per_block=8,\n\
                  num_self_attention_heads=8, num_cross_attention_heads=1, image_size=32, num_labels=10)\n\
                  torch.manual_seed(0)\n\
                  F(c).eval().save_pretrained(sys.argv[5])\n";
    let (x, want) = (tmp.path().join("x.npy"), tmp.path().join("want.npy"));
    common::ok(
        std::process::Command::new(&py)
            .arg("-c")
            .arg(script)
            .arg(root().join("models/reference"))
            .arg(&ck)
            .arg(&x)
            .arg(&want)
            .arg(&wide)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    );
    let file = |n: &str| tmp.path().join(n);
    let bytes = |n: &str| std::fs::read(file(n)).unwrap();
    let report = |ck: &Path, args: &[&str], n: &str| {
        let out = bin().arg("export").arg(ck).args(args).arg("-o").arg(file(n)).output().unwrap();
        assert!(out.status.success(), "export {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = |r: &str, what: &str| r.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("{r}")).to_string();
    let int8 = report(&ck, &["--precision", "int8"], "int8.onnx");
    report(&ck, &["--precision", "int8", "--tables", "all"], "int8-all.onnx");
    assert_eq!(bytes("int8.onnx"), bytes("int8-all.onnx"), "int8: auto keeps both tables");
    let kept = line(&int8, "kept    position_split:");
    assert!(kept.contains("at the stored precision the graph grows by") && kept.contains("fewer FLOPs"), "{kept}");
    let q4 = report(&ck, &["--precision", "q4"], "q4.onnx");
    report(&ck, &["--precision", "q4", "--tables", "all"], "q4-all.onnx");
    assert_eq!(bytes("q4.onnx"), bytes("q4-all.onnx"), "q4: auto keeps both tables");
    assert!(line(&q4, "kept    position_split:").contains("less memory"), "{q4}");
    let dropped = report(&wide, &["--precision", "q4"], "wide-q4.onnx");
    report(&wide, &["--precision", "q4", "--tables", "none"], "wide-q4-none.onnx");
    assert_eq!(bytes("wide-q4.onnx"), bytes("wide-q4-none.onnx"), "wide q4: auto drops the tables");
    let skipped = line(&dropped, "skipped position_split:");
    assert!(skipped.contains("more memory; --tables all keeps them"), "{skipped}");
    // The kept tables (stored f16, run in f32) keep int8's and q4's fidelity.
    let want = npy::read_npy(&want).unwrap();
    for (precision, target) in [("int8", 0.999), ("q4", 0.95)] {
        let out = file(&format!("out-{precision}"));
        std::fs::create_dir(&out).unwrap();
        run(&file(&format!("{precision}.onnx")), std::slice::from_ref(&x), &out);
        let (cos, _) = common::metrics(&npy::read_npy(&out.join("logits.npy")).unwrap(), &want);
        assert!(cos >= target, "{precision} with tables: cosine {cos:.6} to transformers");
    }
}

/// `chunked_attention` (running softmax over chunks of the inputs) against the graph without
/// rewrites, on every fixture: with a limit of a few bytes every attention core the other
/// rewrites leave is chunked (up to 16 chunks). Outputs agree to 1e-5 and still match
/// transformers to the fixture tolerance.
#[test]
fn chunked_attention_is_exact_on_every_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut fired = vec![];
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        let chunked = |report: &str| report.contains("chunked_attention x");
        if chunked(&exact_against_plain(tmp.path(), &c, "chunked", &["--max-scores-mib", "0.00001"], chunked)) {
            fired.push(format!("{fixture}/{case}"));
        }
    }
    eprintln!("chunked_attention fired on: {fired:?}");
    for must in ["image_fourier", "image_learned", "image_conv", "mlm", "flow"] {
        assert!(fired.iter().any(|f| f.starts_with(must)), "chunked_attention did not fire on {must}");
    }
}

/// The runtime's own kernels (`engine/runtime/src/gemm_matmul.rs`, f32 products on the `gemm`
/// crate; `softmax_rows.rs`) against tract's, on every fixture: each default export is loaded with
/// both switches off (tract's kernels only) and on, at 1 and 2 threads. Outputs agree to 1e-5 and
/// match transformers to the fixture tolerance, and the kernels ran where switched on.
#[test]
fn runtime_kernels_agree_with_tracts_on_every_fixture() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    // Runs with the kernels on in which a LayerNorm, and an attention, ran as one op.
    let layer_norms = std::cell::Cell::new(0usize);
    let attentions = std::cell::Cell::new(0usize);
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let onnx = tmp.path().join(format!("{fixture}_{case}.onnx"));
        export(&c.dir, &args, &[], &onnx);
        let inputs: Vec<Tensor> = c.inputs.iter().map(|p| npy::read_npy(p).unwrap()).collect();
        let run_with = |on: bool, threads: usize| -> PathBuf {
            set_gemm_matmul(on);
            set_softmax_rows(on);
            set_layer_norm_rows(on);
            set_attention(on);
            let dir = tmp.path().join(format!("{fixture}_{case}_{on}_{threads}"));
            let ops = run_into(&onnx, &inputs, threads, &dir);
            // With a weight packed for the AVX2 kernel (`f32_packed.rs`) the op is `PackedMatMul`.
            let gemm = ops.keys().any(|k| k.starts_with("GemmMatMul") || k.starts_with("PackedMatMul"));
            assert_eq!(gemm, on, "{fixture}/{case}: {:?}", ops.keys());
            assert!(on || !ops.contains_key("LayerNormRows"), "{fixture}/{case}: LayerNormRows while switched off");
            layer_norms.set(layer_norms.get() + (on && ops.contains_key("LayerNormRows")) as usize);
            assert!(on || !ops.contains_key("Attention"), "{fixture}/{case}: Attention while switched off");
            attentions.set(attentions.get() + (on && ops.contains_key("Attention")) as usize);
            dir
        };
        let tract = run_with(false, 1);
        compare_outputs(&c, &tract, &run_with(true, 1), "kernels");
        compare_outputs(&c, &tract, &run_with(true, 2), "kernels, 2 threads");
        n += 1;
    }
    set_gemm_matmul(true);
    set_softmax_rows(true);
    set_layer_norm_rows(true);
    set_attention(true);
    set_threads(1).unwrap();
    assert!(n >= 19, "fixtures missing: {n} cases");
    assert!(attentions.get() >= 2 * n, "Attention ran in {} of {} runs with the kernels", attentions.get(), 2 * n);
    assert!(
        layer_norms.get() >= 2 * n,
        "LayerNormRows ran in {} of {} runs with the kernels",
        layer_norms.get(),
        2 * n
    );
}

/// The runtime's packed f32 kernel (`engine/runtime/src/f32_packed.rs`: constant weights packed
/// once, AVX2 or AVX-512 tiles) against the `gemm` crate's products, on every fixture's default
/// export, at 1 and 2 threads: outputs agree to 1e-5 and match transformers to the fixture
/// tolerance. The kernel runs in every case where the CPU has it (AVX2 and FMA, or AVX-512), never
/// elsewhere. Switching it off also sends `Attention`'s one-chunk products back to the crate
/// (session 32), so both of its routes are compared here too.
#[test]
fn packed_f32_kernel_agrees_with_the_crates_on_every_fixture() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let (mut n, mut with_kernel) = (0, 0);
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        let (onnx, inputs) = export_at(tmp.path(), &c, "f32");
        let run_with = |on: bool, threads: usize| -> (PathBuf, bool) {
            set_f32_packed(on);
            let dir = tmp.path().join(format!("{fixture}_{case}_packed_{on}_{threads}"));
            let ops = run_into(&onnx, &inputs, threads, &dir);
            (dir, ops.keys().any(|k| k.starts_with("PackedMatMul")))
        };
        let (crate_dir, used) = run_with(false, 1);
        assert!(!used, "{fixture}/{case}: PackedMatMul while switched off");
        for threads in [1, 2] {
            let (dir, used) = run_with(true, threads);
            assert_eq!(used, f32_packed_kernel(), "{fixture}/{case}: PackedMatMul ran: {used}");
            compare_outputs(&c, &crate_dir, &dir, &format!("packed, {threads} threads"));
            with_kernel += used as usize;
        }
        n += 1;
    }
    set_f32_packed(true);
    set_threads(1).unwrap();
    assert!(n >= 19, "fixtures missing: {n} cases");
    eprintln!("PackedMatMul ran in {with_kernel} of {} runs (kernel on this CPU: {})", 2 * n, f32_packed_kernel());
}

/// Loads `onnx` at `threads` threads, runs it once on `inputs` and writes each output to
/// `dir/NAME.npy` (for [`compare_outputs`]); returns the ops that ran.
fn run_into(onnx: &Path, inputs: &[Tensor], threads: usize, dir: &Path) -> BTreeMap<String, (usize, Duration)> {
    set_threads(threads).unwrap();
    let mut s = Session::load(onnx).unwrap();
    let mut ops = std::collections::BTreeMap::new();
    let outs = s.run_profiled(inputs.to_vec(), &mut ops, perceiver_edge_runtime::OpKey::Kind).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (spec, t) in s.outputs().iter().zip(&outs) {
        npy::write_npy(&dir.join(format!("{}.npy", spec.name)), t).unwrap();
    }
    ops
}

/// Case `c` exported at `precision` into `dir`, and its inputs.
fn export_at(dir: &Path, c: &Case, precision: &str) -> (PathBuf, Vec<Tensor>) {
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let onnx = dir.join(format!("{}_{}.{precision}.onnx", c.fixture, c.name));
    export(&c.dir, &args, &["--precision", precision], &onnx);
    (onnx, c.inputs.iter().map(|p| npy::read_npy(p).unwrap()).collect())
}

/// Held by each test that flips the runtime's process-wide switches (kernels, threads), so that
/// tests running in parallel in this process do not flip them under one another (the q4 test's
/// resident bytes changed when the int8 test switched `Int8MatMul` while it loaded).
static SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn switches() -> std::sync::MutexGuard<'static, ()> {
    SWITCHES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads `onnx` at `threads` threads and runs it once on `inputs`: its outputs, whether an op
/// named `op` ran, and the resident weights' bytes.
fn run_counting(onnx: &Path, inputs: &[Tensor], threads: usize, op: &str) -> (Vec<Vec<f32>>, bool, usize) {
    set_threads(threads).unwrap();
    let mut s = Session::load(onnx).unwrap();
    let mut ops = std::collections::BTreeMap::new();
    let outs = s.run_profiled(inputs.to_vec(), &mut ops, perceiver_edge_runtime::OpKey::Kind).unwrap();
    let resident = s.resident_weights().iter().map(|e| e.1).sum();
    // An op with an epilogue taken in is named `OP+epilogue`.
    let used = ops.keys().any(|k| k == op || k.strip_prefix(op).is_some_and(|rest| rest.starts_with('+')));
    (outs.iter().map(|t| to_vec(t).unwrap()).collect(), used, resident)
}

/// Runs the first case of every fixture's `precisions` exports at `threads` threads with `switch`
/// off, then on (left on): the outputs' bits must be identical (`what` names the switch).
fn bit_identical_with(switch: fn(bool), what: &str, precisions: &[&str], threads: usize) {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for c in cases().into_iter().filter(|c| seen.insert(c.fixture.clone())) {
        for precision in precisions {
            let (onnx, inputs) = export_at(tmp.path(), &c, precision);
            let bits = |on: bool| -> Vec<Vec<u32>> {
                switch(on);
                let (outs, _, _) = run_counting(&onnx, &inputs, threads, "");
                outs.iter().map(|o| o.iter().map(|v| v.to_bits()).collect()).collect()
            };
            let (off, on) = (bits(false), bits(true));
            assert!(off == on, "{}/{} {precision}: outputs differ with {what}", c.fixture, c.name);
        }
    }
    set_threads(1).unwrap();
    assert!(seen.len() >= 5, "fixtures missing: {}", seen.len());
}

/// Plans in the order tract chose before the runtime fused ops (`order.rs`, the default) against
/// tract's order of the fused graph, on the first case of every fixture's f32, int8 and q4
/// exports: the same ops on the same inputs, so the outputs' bits are identical.
#[test]
fn reference_order_is_bit_identical() {
    bit_identical_with(set_reference_order, "the reference order", &["f32", "int8", "q4"], 1);
}

/// Runs on two threads with the pool's other thread kept spinning (`spin.rs`, the default)
/// against runs that let it sleep, on the first case of every fixture's f32 and q4 exports: the
/// same ops split the same work, so the outputs' bits are identical.
#[test]
fn spinning_threads_are_bit_identical() {
    bit_identical_with(set_spin, "spinning threads", &["f32", "q4"], 2);
}

/// Twenty runs of one session at two threads (the placement's trial, runs on one thread then on
/// the pool, then its choice: `spin::Placement`) against one run at one thread, on the first case
/// of every fixture's f32, int8 and q4 exports: products and row-wise ops split by rows or columns
/// without changing any sum's order, and no fixture's attention splits its keys (at most 2048), so
/// every run's bits are one thread's.
#[test]
fn runs_at_two_threads_are_one_threads_bits_through_the_placement_trial() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let bits = |outs: Vec<Tensor>| -> Vec<Vec<u32>> {
        outs.iter().map(|t| to_vec::<f32>(t).unwrap().iter().map(|v| v.to_bits()).collect()).collect()
    };
    for c in cases().into_iter().filter(|c| seen.insert(c.fixture.clone())) {
        for precision in ["f32", "int8", "q4"] {
            let (onnx, inputs) = export_at(tmp.path(), &c, precision);
            set_threads(1).unwrap();
            let one = bits(Session::load(&onnx).unwrap().run(inputs.clone()).unwrap());
            set_threads(2).unwrap();
            let mut session = Session::load(&onnx).unwrap();
            for run in 0..20 {
                let two = bits(session.run(inputs.clone()).unwrap());
                assert!(
                    two == one,
                    "{}/{} {precision}: run {run} at two threads differs from one thread",
                    c.fixture,
                    c.name
                );
            }
        }
    }
    set_threads(1).unwrap();
    assert!(seen.len() >= 5, "fixtures missing: {}", seen.len());
}

/// Asserts every output value of `got` within 1e-5 x (1 + the largest |value| of its output) of
/// `want`'s (`what` names the comparison); returns the largest difference.
fn within_1e5(want: &[Vec<f32>], got: &[Vec<f32>], what: &str) -> f64 {
    let mut worst = 0f64;
    for (t, g) in want.iter().zip(got) {
        let scale = t.iter().fold(0f64, |m, v| m.max((*v as f64).abs()));
        for (i, (a, b)) in t.iter().zip(g).enumerate() {
            let e = (*a as f64 - *b as f64).abs();
            assert!(e <= 1e-5 * (1.0 + scale), "{what} [{i}]: {b} against {a}");
            worst = worst.max(e);
        }
    }
    worst
}

/// The runtime's 4-bit product (`GemmQ4`) against tract's Q4_0 kernel, on every fixture's q4
/// export: the same decoded weights in both, so the outputs differ by the order of the sums only.
#[test]
fn q4_kernel_agrees_with_tracts_on_every_fixture() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let (mut n, mut with_kernel) = (0, 0);
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        let (onnx, inputs) = export_at(tmp.path(), &c, "q4");
        let run_with = |on: bool, threads: usize| {
            set_q4_matmul(on);
            run_counting(&onnx, &inputs, threads, "GemmQ4")
        };
        let (tract, used, tract_resident) = run_with(false, 1);
        assert!(!used, "{fixture}/{case}: GemmQ4 while switched off");
        for threads in [1, 2] {
            let (got, used, resident) = run_with(true, threads);
            // The 4-bit weights count as resident whichever op holds them (tract packs them in
            // about the same bytes).
            let ratio = resident as f64 / tract_resident as f64;
            assert!(
                (0.7..1.3).contains(&ratio),
                "{fixture}/{case}: resident {resident} B with GemmQ4, {tract_resident} B without"
            );
            with_kernel += used as usize;
            let worst =
                within_1e5(&tract, &got, &format!("{fixture}/{case} at {threads} threads, GemmQ4 against tract"));
            eprintln!(
                "{fixture:>15}/{case:<7} q4 |GemmQ4 - tract| {worst:.2e} ({threads} threads, kernel used: {used})"
            );
        }
        n += 1;
    }
    set_q4_matmul(true);
    set_threads(1).unwrap();
    assert!(n >= 19, "fixtures missing: {n} cases");
    assert!(with_kernel >= n, "GemmQ4 ran in only {with_kernel} of {} runs", 2 * n);
}

/// 4-bit weights decoded into f32 at load (`q4_matmul::decode_weights`, what `--device cuda` does
/// before tract-cuda sees the graph) against the 4-bit products, on every fixture's q4 export: the
/// same decoded values, so the outputs differ by the order of the sums only, and they match
/// transformers' to q4's target; no 4-bit product runs and the resident weights grow (f32 instead
/// of 4.5 bits a weight).
#[test]
fn q4_weights_decoded_at_load_agree_with_the_4_bit_products_on_every_fixture() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        let (onnx, inputs) = export_at(tmp.path(), &c, "q4");
        let run_with = |decoded: bool| {
            set_q4_decoded(decoded);
            run_counting(&onnx, &inputs, 1, "GemmQ4")
        };
        let (want, _, resident_4bit) = run_with(false);
        let (got, used, resident) = run_with(true);
        set_q4_decoded(false);
        assert!(!used, "{fixture}/{case}: a 4-bit product ran with the weights decoded");
        assert!(resident > resident_4bit, "{fixture}/{case}: resident {resident} B decoded, {resident_4bit} B 4-bit");
        let worst = within_1e5(&want, &got, &format!("{fixture}/{case}, decoded against 4-bit"));
        // And against transformers' outputs, at q4's target (`quantized.rs`).
        let names: Vec<String> = Session::load(&onnx).unwrap().outputs().iter().map(|o| o.name.clone()).collect();
        for (name, file) in &c.outputs {
            let reference = npy::read_npy(file).unwrap();
            let at =
                names.iter().position(|n| n == name).unwrap_or_else(|| panic!("{fixture}/{case}: no output {name}"));
            let decoded = Tensor::from_shape(reference.shape(), &got[at]).unwrap();
            let (cos, _) = common::metrics(&decoded, &reference);
            assert!(cos >= 0.95, "{fixture}/{case} {name}: decoded q4 cosine {cos:.6} to transformers");
        }
        eprintln!("{fixture:>15}/{case:<7} q4 |decoded - 4-bit| {worst:.2e}, resident {resident_4bit} -> {resident} B");
        n += 1;
    }
    assert!(n >= 19, "fixtures missing: {n} cases");
}

/// The runtime's int8 product (`Int8MatMul`, `MatMulInteger -> Cast -> Mul` in one op, on AMX
/// tiles or AVX2) against tract's kernels, on every fixture's int8 export: the same integer sums
/// and the same f32 rounding, so outputs are bit-identical, at 1 and 2 threads. Where the runtime has no kernel
/// for the CPU the op must not appear (tract's kernels run).
#[test]
fn int8_matmul_matches_tracts_bit_for_bit_on_every_fixture() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let (mut n, mut with_kernel) = (0, 0);
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        let (onnx, inputs) = export_at(tmp.path(), &c, "int8");
        // Outputs' bits, whether Int8MatMul ran, and the resident weights' bytes.
        let run_with = |on: bool, threads: usize| -> (Vec<Vec<u32>>, bool, usize) {
            set_int8_matmul(on);
            let (outs, used, resident) = run_counting(&onnx, &inputs, threads, "Int8MatMul");
            (outs.iter().map(|o| o.iter().map(|v| v.to_bits()).collect()).collect(), used, resident)
        };
        let (tract, used, tract_resident) = run_with(false, 1);
        assert!(!used, "{fixture}/{case}: Int8MatMul while switched off");
        for threads in [1, 2] {
            let (got, used, resident) = run_with(true, threads);
            assert!(
                int8_matmul_kernel().is_some() || !used,
                "{fixture}/{case}: Int8MatMul on a CPU without its kernels"
            );
            // Tiles pad the weights to whole tiles (64 rows, 32 columns); AVX2's panels to 32
            // columns and an even `k`, where tract's AVX2 packing holds up to 1.5x the weight.
            let ratio = resident as f64 / tract_resident as f64;
            assert!(
                (0.6..1.6).contains(&ratio),
                "{fixture}/{case}: resident {resident} B with Int8MatMul, {tract_resident} B without"
            );
            assert!(got == tract, "{fixture}/{case}: Int8MatMul outputs differ from tract's at {threads} threads");
            eprintln!(
                "{fixture:>15}/{case:<7} int8 Int8MatMul used: {used} ({threads} threads), bit-identical to tract"
            );
            with_kernel += used as usize;
        }
        n += 1;
    }
    set_int8_matmul(true);
    set_threads(1).unwrap();
    assert!(n >= 19, "fixtures missing: {n} cases");
    if int8_matmul_kernel().is_some() {
        assert!(with_kernel >= n, "Int8MatMul ran in only {with_kernel} of {} runs", 2 * n);
    } else {
        eprintln!("no int8 kernel of the runtime's for this CPU: tract's only (Int8MatMul ran in {with_kernel} runs)");
    }
}

/// The products' epilogues (`epilogue.rs`: bias adds, residual adds and GELUs taken into the
/// product) against the same graph without them, on every fixture's f32, int8 and q4 exports, at
/// one and two threads: the same arithmetic in the same order, so the outputs' bits are identical.
/// The f32 product takes them in every case (each fixture's Linears have biases), the 4-bit one
/// (`GemmQ4`) in at least half the runs (as often as `GemmQ4` itself runs), the int8 one
/// (`Int8MatMul`) wherever it runs (CPUs with AMX-INT8, AVX-512 VNNI, or AVX2 without VNNI).
#[test]
fn epilogues_are_bit_identical_on_every_fixture() {
    let _switches = switches();
    let tmp = tempfile::tempdir().unwrap();
    let (mut n, mut with_epilogue, mut int8_epilogue, mut q4_epilogue) = (0, 0, 0, 0);
    // f32 Linears run on the packed kernel where the CPU has it (`f32_packed.rs`).
    let f32_op = if f32_packed_kernel() { "PackedMatMul+epilogue" } else { "GemmMatMul+epilogue" };
    for c in cases() {
        let (fixture, case) = (&c.fixture, &c.name);
        for (precision, op) in [("f32", f32_op), ("int8", "Int8MatMul+epilogue"), ("q4", "GemmQ4+epilogue")] {
            let (onnx, inputs) = export_at(tmp.path(), &c, precision);
            let run_with = |on: bool, threads: usize| -> (Vec<Vec<u32>>, bool) {
                set_epilogues(on);
                let (outs, used, _) = run_counting(&onnx, &inputs, threads, op);
                (outs.iter().map(|o| o.iter().map(|v| v.to_bits()).collect()).collect(), used)
            };
            for threads in [1, 2] {
                let (plain, used) = run_with(false, threads);
                assert!(!used, "{fixture}/{case} {precision}: epilogue while switched off");
                let (got, used) = run_with(true, threads);
                assert!(
                    got == plain,
                    "{fixture}/{case} {precision}: outputs with epilogues differ at {threads} threads"
                );
                eprintln!("{fixture:>15}/{case:<7} {precision} {op} used: {used} ({threads} threads), bit-identical");
                match precision {
                    "f32" => with_epilogue += used as usize,
                    "int8" => int8_epilogue += used as usize,
                    _ => q4_epilogue += used as usize,
                }
            }
        }
        n += 1;
    }
    set_epilogues(true);
    set_threads(1).unwrap();
    assert!(n >= 19, "fixtures missing: {n} cases");
    assert!(with_epilogue >= 2 * n, "f32 epilogues ran in only {with_epilogue} of {} runs", 2 * n);
    assert!(q4_epilogue >= n, "q4 epilogues ran in only {q4_epilogue} of {} runs", 2 * n);
    if int8_matmul_kernel().is_some() {
        assert!(int8_epilogue >= n, "int8 epilogues ran in only {int8_epilogue} of {} runs", 2 * n);
    } else {
        assert_eq!(int8_epilogue, 0, "Int8MatMul on a CPU without its kernels");
    }
}
