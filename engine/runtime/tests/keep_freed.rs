//! Freed run-time buffers of 32 MiB or more kept for the next run (`alloc::set_keep_freed`):
//! a graph with 36 MB activations, run with keeping on and off, gives the same outputs, matching
//! a product computed here in f64, and with keeping on its later runs fault no page of them in.
//! One test in its own binary: the allocator's state is the process's.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use perceiver_edge_runtime::alloc::{self, Counting};
use perceiver_edge_runtime::{tensor, to_vec, Session};
use prost::Message;
use tract_onnx::pb;

#[global_allocator]
static A: Counting = Counting;

const M: usize = 8192;
const K: usize = 8;
const N: usize = 1100;

fn info(name: &str, dims: &[usize]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims.iter().map(|&d| Dimension { value: Some(Value::DimValue(d as i64)), ..Default::default() });
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim: dim.collect() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `relu(x @ w) + 1`, `x` `[M, K]`, `w` a constant: two activations of `M * N` floats (36 MB).
fn model(w: &[f32]) -> Vec<u8> {
    let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    let tensor = |name: &str, dims: Vec<i64>, values: &[f32]| pb::TensorProto {
        name: name.into(),
        dims,
        data_type: pb::tensor_proto::DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "keep".into(),
        node: vec![node("MatMul", &["x", "w"], "y"), node("Relu", &["y"], "r"), node("Add", &["r", "one"], "z")],
        initializer: vec![tensor("w", vec![K as i64, N as i64], w), tensor("one", vec![1], &[1.0])],
        input: vec![info("x", &[M, K])],
        output: vec![info("z", &[M, N])],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    };
    model.encode_to_vec()
}

/// Minor page faults of this process so far.
fn faults() -> i64 {
    // SAFETY: getrusage writes the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_minflt
    }
}

/// Runs `session` three times on `x`: the first run's output, whether the later ones equal it,
/// and the faults of the last run.
fn three_runs(session: &mut Session, x: &[f32]) -> (Vec<f32>, bool, i64) {
    let mut first: Option<Vec<f32>> = None;
    let mut same = true;
    let mut last = 0;
    for _ in 0..3 {
        let input = tensor(&[M, K], x).unwrap();
        let before = faults();
        let out = session.run(vec![input]).unwrap();
        last = faults() - before;
        match &first {
            None => first = Some(to_vec::<f32>(&out[0]).unwrap()),
            Some(z) => same &= out[0].to_plain_array_view::<f32>().unwrap().iter().eq(z.iter()),
        }
    }
    (first.unwrap(), same, last)
}

#[test]
fn kept_buffers_serve_the_next_runs_without_faulting_their_pages_in() {
    let mut seed = 1u32;
    let mut next = || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..K * N).map(|_| next()).collect();
    let x: Vec<f32> = (0..M * K).map(|_| next()).collect();
    let bytes = model(&w);
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
    let activation_pages = (M * N * 4) as i64 / page;

    alloc::set_keep_freed(false);
    let mut off = Session::from_bytes(&bytes).unwrap();
    let (plain, plain_same, plain_faults) = three_runs(&mut off, &x);
    assert_eq!(alloc::kept(), 0, "nothing kept while off");
    drop(off);

    alloc::set_keep_freed(true);
    let mut on = Session::from_bytes(&bytes).unwrap();
    let (kept, kept_same, kept_faults) = three_runs(&mut on, &x);
    assert!(alloc::kept() >= (M * N * 4) as u64, "the activations kept after a run: {} bytes", alloc::kept());

    for (j, &got) in plain.iter().enumerate() {
        let (r, c) = (j / N, j % N);
        let want = (0..K).map(|k| x[r * K + k] as f64 * w[k * N + c] as f64).sum::<f64>().max(0.0) + 1.0;
        assert!((got as f64 - want).abs() <= 1e-5, "[{r}, {c}]: {got} vs {want}");
    }
    assert!(plain_same && kept_same, "every run gives the first run's outputs");
    assert!(kept == plain, "the same outputs with buffers kept");
    // Where every map gets transparent huge pages a fault brings in 2 MiB: not counted then.
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !thp.contains("[always]") {
        assert!(
            plain_faults >= activation_pages,
            "without keeping a run faults its activations in: {plain_faults} faults"
        );
        assert!(
            kept_faults < activation_pages / 4,
            "kept buffers are not faulted in again: {kept_faults} faults (without: {plain_faults})"
        );
    }

    // A large buffer grown (`mremap`), then shrunk into glibc's heap, keeps its bytes.
    let before = alloc::kept();
    let mut v: Vec<u8> = Vec::with_capacity(40 << 20);
    assert!(alloc::kept() < before, "a kept map serves it");
    v.extend((0..40 << 20).map(|i| (i % 251) as u8));
    v.reserve_exact(20 << 20);
    v.extend((0..8 << 20).map(|i| (i % 13) as u8));
    assert!(v[..40 << 20].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    v.truncate(1 << 20);
    v.shrink_to_fit();
    assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    drop(v);

    alloc::set_keep_freed(false);
    assert_eq!(alloc::kept(), 0, "switched off: the kept maps unmapped");
}
