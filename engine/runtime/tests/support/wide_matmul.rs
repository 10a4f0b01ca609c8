//! A graph whose activations are large enough (36 MB) for the kept pages of `alloc::keep`, the
//! f64 reference of its output, and the process's page faults. Shared by the runtime's
//! `keep_freed.rs` and the C API's `capi_kept_pages.rs` (included with `#[path]`).

use perceiver_edge_runtime::tract_onnx::pb;
use prost::Message;

pub const M: usize = 8192;
pub const K: usize = 8;
pub const N: usize = 1100;

/// Bytes of one activation, `[M, N]` floats.
pub const ACTIVATION_BYTES: usize = M * N * 4;

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

/// `relu(x @ w) + 1`, `x` `[M, K]`, `w` a constant: two activations of `M * N` floats.
pub fn model(w: &[f32]) -> Vec<u8> {
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

/// Weights `[K, N]` and an input `[M, K]` in [-0.5, 0.5), from a fixed seed.
pub fn weights_and_input() -> (Vec<f32>, Vec<f32>) {
    let mut seed = 1u32;
    let mut next = || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..K * N).map(|_| next()).collect();
    let x: Vec<f32> = (0..M * K).map(|_| next()).collect();
    (w, x)
}

/// Asserts `z` is `relu(x @ w) + 1` within 1e-5 of the product computed in f64.
pub fn check(z: &[f32], x: &[f32], w: &[f32]) {
    assert_eq!(z.len(), M * N);
    for (j, &got) in z.iter().enumerate() {
        let (r, c) = (j / N, j % N);
        let want = (0..K).map(|k| x[r * K + k] as f64 * w[k * N + c] as f64).sum::<f64>().max(0.0) + 1.0;
        assert!((got as f64 - want).abs() <= 1e-5, "[{r}, {c}]: {got} vs {want}");
    }
}

/// Minor page faults of this process so far.
pub fn faults() -> i64 {
    // SAFETY: getrusage writes the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_minflt
    }
}

/// The resident set now, in bytes (`/proc/self/statm`).
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf takes no pointers.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// The largest resident set so far, in bytes (`getrusage`).
pub fn max_rss() -> u64 {
    // SAFETY: getrusage writes the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u.ru_maxrss as u64 * 1024
    }
}

/// Pages of one activation.
pub fn activation_pages() -> i64 {
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
    ACTIVATION_BYTES as i64 / page
}

/// Whether page faults count pages: not where every map gets transparent huge pages (a fault
/// then brings in 2 MiB).
pub fn faults_count_pages() -> bool {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    !thp.contains("[always]")
}
