//! perceiver-edge runtime (device side): loads a fixed-shape ONNX graph with tract, optimises it
//! once and runs it with reused state. It carries nothing of the exporter, so a board build
//! stays small.
//!
//! ```no_run
//! use perceiver_edge_runtime::{Session, Tensor};
//! let mut session = Session::load("model.onnx".as_ref())?;
//! let spec = &session.inputs()[0];
//! let pixels = vec![0f32; spec.shape.iter().product()];
//! let x = perceiver_edge_runtime::tensor(&spec.shape, &pixels).expect("shape matches");
//! let outputs = session.run(vec![x])?;
//! let logits: Vec<f32> = perceiver_edge_runtime::to_vec(&outputs[0]).expect("f32 output");
//! println!("{logits:?}");
//! # Ok::<(), perceiver_edge_runtime::Error>(())
//! ```

pub mod alloc;
mod attention;
pub mod bench;
pub mod compare;
pub mod dataset;
mod dequant_const;
mod dynamic_quantize;
mod epilogue;
pub mod f16_as_f32;
mod f32_packed;
pub mod fsio;
mod gemm_matmul;
mod guard;
mod int8_matmul;
mod layer_norm_rows;
pub mod limits;
pub mod metadata;
mod nbits_import;
pub mod npy;
mod order;
mod pack_once;
pub mod precision;
pub mod profile;
mod q4_matmul;
mod softmax_last;
mod softmax_rows;
mod spin;
pub mod split;
mod weights_once;

/// The README's library example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::*;

pub use spin::{PoolUse, Share};
/// The tract ONNX crate this runtime is built on (for examples and tools that need its API).
pub use tract_onnx;
pub use tract_onnx::prelude::{DatumType, Tensor};

/// A runtime failure; every message is one line naming the file or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file could not be read or prepared.
    #[error("{}: {}", one_line(.path), one_line(.msg))]
    Load {
        /// The model file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// An input has the wrong count, type or shape.
    #[error("input `{}`: {}", one_line(.name), one_line(.msg))]
    Input {
        /// Graph input name.
        name: String,
        /// What was wrong and what was expected.
        msg: String,
    },
    /// A .npy file could not be read or written.
    #[error("{}: {}", one_line(.path), one_line(.msg))]
    Npy {
        /// The file.
        path: String,
        /// What was wrong.
        msg: String,
    },
    /// Inference failed.
    #[error("inference failed: {}", one_line(.0))]
    Run(String),
    /// A setting is out of range; the message starts with the flag, e.g. `--threads 0: ...`.
    #[error("{}", one_line(.0))]
    Setting(String),
}

/// `s` on one line: control characters (a newline in a tensor or node name taken from a file)
/// are written escaped, as Rust string literals write them, so every error stays one line.
pub fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Result alias for the runtime.
pub type Result<T> = std::result::Result<T, Error>;

/// Sets the number of threads tract's matrix products use (1 = single-threaded, the default)
/// and returns the number it will use: `n`, capped at this machine's cores (more threads than
/// cores only wait on each other). Needs the `threads` feature (on by default); without it only
/// 1 is accepted. At more than one, each session times its runs on the pool against one thread
/// and runs on one thread where that is faster: a small model, or the pool's cores busy with
/// another process ([`Session::pool_use`]).
pub fn set_threads(n: usize) -> Result<usize> {
    if n == 0 || n > limits::MAX_THREADS {
        return Err(Error::Setting(format!("--threads {n}: expected 1 to {}", limits::MAX_THREADS)));
    }
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{set_default_executor, Executor};
        let n = n.min(std::thread::available_parallelism().map_or(1, |c| c.get()));
        set_default_executor(if n > 1 { Executor::multithread(n) } else { Executor::SingleThread });
        // tract splits an element-wise op over the threads from 32768 values (a latent array of
        // 128 x 256), where the split costs more than it saves; from 131072 (bench model, 2
        // threads, `bench --runs 60` alternated three times: p50 7.9 / 9.5 / 9.7 ms at 32768,
        // 7.3 / 8.8 / 9.1 at 131072).
        tract_linalg::multithread::set_threading_element_threshold(ELEMENTWISE_PARALLEL_MIN);
        Ok(n)
    }
    #[cfg(not(feature = "threads"))]
    match n {
        1 => Ok(1),
        _ => Err(Error::Setting(format!("--threads {n}: this build has no `threads` feature (only 1)"))),
    }
}

/// Values from which tract splits an element-wise op over the threads (see [`set_threads`]).
#[cfg(feature = "threads")]
const ELEMENTWISE_PARALLEL_MIN: usize = 1 << 17;

/// tract's thread pool for this thread's work when it has more than one thread (see
/// [`set_threads`]): the runtime's own ops split their work over it as tract's kernels do.
#[cfg(feature = "threads")]
pub(crate) fn thread_pool() -> Option<std::sync::Arc<rayon::ThreadPool>> {
    use tract_linalg::multithread::{current_tract_executor, Executor};
    match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 => Some(pool),
        _ => None,
    }
}

/// How the runtime's passes put their ops in tract's place: fusions found in one scan of a model,
/// then made one after another. An input found as the output an earlier fusion replaced (a second
/// attention or LayerNorm right after the first) is read from that fusion's op.
#[derive(Default)]
pub(crate) struct Substitutions(std::collections::HashMap<OutletId, OutletId>);

impl Substitutions {
    /// Points every reader of outlet `replaced` of `model` at a new node `name` computing `op` on
    /// `inputs` (outlets of `model` as found).
    pub(crate) fn substitute(
        &mut self,
        model: &mut TypedModel,
        replaced: OutletId,
        name: String,
        op: impl Into<Box<dyn tract_onnx::tract_core::ops::TypedOp>>,
        inputs: &[OutletId],
    ) -> TractResult<()> {
        let mut patch = tract_onnx::tract_core::model::TypedModelPatch::default();
        let taps = inputs
            .iter()
            .map(|i| patch.tap_model(model, *self.0.get(i).unwrap_or(i)))
            .collect::<TractResult<TVec<_>>>()?;
        let out = patch.wire_node(name, op, &taps)?;
        patch.shunt_outside(model, replaced, out[0])?;
        // The patch adds one node, at the end of the model.
        let id = model.nodes().len();
        patch.apply(model)?;
        tract_onnx::tract_core::internal::ensure!(
            model.nodes().len() == id + 1,
            "a substitution added {} nodes",
            model.nodes().len() - id
        );
        self.0.insert(replaced, OutletId::new(id, 0));
        Ok(())
    }
}

/// Test helper: `run` (a rewritten model's outputs) at one thread and, with threads, at three,
/// each within `1e-5 (1 + |x|)` of `plain` (tract's outputs without the rewrite).
#[cfg(test)]
pub(crate) fn assert_like_tract(plain: &[f32], run: impl Fn() -> Vec<f32>) {
    let mut results = vec![run()];
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        results.push(multithread_tract_scope(Executor::multithread(3), &run));
    }
    for got in results {
        assert_eq!(got.len(), plain.len());
        for (i, (a, b)) in plain.iter().zip(&got).enumerate() {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "[{i}]: {b} vs tract {a}");
        }
    }
}

/// The only reader of node `id`'s output in `model`, if it has exactly one and the output is not
/// one of the model's (a rewrite may then fuse the two nodes).
pub(crate) fn only_reader(model: &TypedModel, id: usize) -> Option<InletId> {
    let out = OutletId::new(id, 0);
    match model.node(id).outputs[0].successors.as_slice() {
        [one] if !model.outputs.contains(&out) => Some(*one),
        _ => None,
    }
}

/// The other input of two-input node `node` (which reads the fused value at input `slot`), if it
/// is an f32 constant of one value per column for an output of shape `shape`: `[1, .., 1, n]` of
/// the same rank (a Linear's bias, a LayerNorm's scale or shift).
pub(crate) fn column_constant(model: &TypedModel, node: &TypedNode, slot: usize, shape: &[usize]) -> Option<OutletId> {
    let [a, b] = node.inputs.as_slice() else { return None };
    let other = if slot == 0 { *b } else { *a };
    let fact = model.outlet_fact(other).ok()?;
    let cs = fact.shape.as_concrete()?;
    let (last, rest) = cs.split_last()?;
    let columns = cs.len() == shape.len() && shape.last() == Some(last) && rest.iter().all(|&d| d == 1);
    (columns && fact.konst.is_some() && fact.datum_type == f32::datum_type()).then_some(other)
}

/// A process-wide switch for one of the runtime's passes, on by default; the `set_*` functions
/// below turn them off for comparisons.
pub(crate) struct Switch(std::sync::atomic::AtomicBool);

impl Switch {
    pub(crate) const fn on() -> Switch {
        Switch(std::sync::atomic::AtomicBool::new(true))
    }

    pub(crate) const fn off() -> Switch {
        Switch(std::sync::atomic::AtomicBool::new(false))
    }

    pub(crate) fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether models loaded from now on pack each constant matmul operand once (the default) or, with
/// `false`, as tract's own code generation does (a packed copy per matmul node: a weight-shared
/// latent block applied 8 times holds 8 copies), and translate the parsed graph dropping each
/// weight once read (or with tract's `into_typed`, which holds every parsed weight to the end).
/// For comparisons; outputs are bit-identical.
pub fn set_pack_once(on: bool) {
    pack_once::ENABLED.set(on);
}

/// Whether models loaded from now on translate a 4-bit product that repeats an earlier one (a
/// weight-shared block applied several times) by repeating the earlier one's nodes (the default),
/// so each parsed 4-bit weight is dropped after its first reader, or, with `false`, as tract
/// does: repacked for every reader and held until the last. For comparisons; outputs are
/// bit-identical (see `weights_once.rs`).
pub fn set_repeats_once(on: bool) {
    weights_once::REPEATS_ONCE.set(on);
}

/// Whether models loaded from now on read a 4-bit `MatMulNBits` weight in blocks of 32 straight
/// into tract's Q4_0 blocks (the default) or, with `false`, through tract-onnx's translation,
/// which widens it to a byte per weight first. For comparisons; the graphs are identical (see
/// `nbits_import.rs`).
pub fn set_nbits_import(on: bool) {
    nbits_import::ENABLED.set(on);
}

/// Whether models loaded from now on compute f32 matrix products with the `gemm` crate (the
/// default) or, with `false`, with tract's own kernels. For comparisons; outputs differ by
/// rounding only (see `gemm_matmul.rs`).
pub fn set_gemm_matmul(on: bool) {
    gemm_matmul::ENABLED.set(on);
}

/// Whether models loaded from now on compute products by 4-bit (Q4_0) weights with the `gemm`
/// crate on blocks of decoded weight rows (the default) or, with `false`, with tract's own
/// kernels. For comparisons; outputs differ by rounding only (see `q4_matmul.rs`).
pub fn set_q4_matmul(on: bool) {
    q4_matmul::ENABLED.set(on);
}

/// Whether models loaded from now on decode their 4-bit (Q4_0) weights into f32 at load on the CPU
/// as well (`false`, the default: they stay 4-bit), as `--device cuda` always does. For
/// comparisons; outputs differ by rounding only (see `q4_matmul::decode_weights`).
pub fn set_q4_decoded(on: bool) {
    q4_matmul::DECODE_AT_LOAD.set(on);
}

/// Whether models loaded from now on compute int8 products (`MatMulInteger`, its cast and its
/// rescaling) in one op of the runtime's where it has a kernel for the CPU (the default) or, with
/// `false`, with tract's kernels. For comparisons; outputs are bit-identical (see `int8_matmul.rs`).
pub fn set_int8_matmul(on: bool) {
    int8_matmul::ENABLED.set(on);
}

/// Whether models loaded from now on pack each constant f32 weight once for the runtime's kernels
/// (the default, where they run: x86 with AVX2 and FMA or AVX-512) or, with `false`, leave the
/// products to the `gemm` crate. For comparisons; outputs differ by rounding
/// only (see `f32_packed.rs`).
pub fn set_f32_packed(on: bool) {
    f32_packed::ENABLED.set(on);
}

/// Whether runs from now on fetch the weight panels of a packed f32 product's next pass (over
/// its next 128 columns) into L2 while the current one runs (the default), or, with `false`, leave
/// them to the hardware. For comparisons; outputs are bit-identical (see `f32_packed.rs`).
pub fn set_read_ahead(on: bool) {
    f32_packed::READ_AHEAD.set(on);
}

/// Whether the runtime's packed f32 kernel runs on this CPU (see [`set_f32_packed`]).
pub fn f32_packed_kernel() -> bool {
    f32_packed::available()
}

/// The runtime's int8 product kernel for the CPU running this process (`"AMX"` tiles,
/// `"AVX-512 VNNI"`, `"AVX-VNNI"`, `"AVX2"`), or `None` where int8 products stay with tract's
/// kernels.
pub fn int8_matmul_kernel() -> Option<&'static str> {
    int8_matmul::kernel().map(|k| k.name())
}

/// Whether models loaded from now on compute each f32 attention (scores, softmax, product with
/// the values, each the only reader of the one before) in one op that never stores the scores
/// whole (the default), or, with `false`, as three ops. For comparisons; outputs differ by
/// rounding only (see `attention.rs`).
pub fn set_attention(on: bool) {
    attention::ENABLED.set(on);
}

/// Whether runs on several threads keep the pool's other threads awake, polling for work, until
/// the run ends (the default), or, with `false`, let them sleep between ops as rayon does. For
/// comparisons; outputs are bit-identical (see `spin.rs`).
pub fn set_spin(on: bool) {
    spin::ENABLED.set(on);
}

/// Whether models loaded from now on run in the order tract chose before the runtime fused ops
/// (the default), or, with `false`, in the order tract chooses for the fused graph. For
/// comparisons; outputs are identical (see `order.rs`).
pub fn set_reference_order(on: bool) {
    order::ENABLED.set(on);
}

/// Whether models loaded from now on apply the bias adds, residual adds and GELUs that follow a
/// product (f32, int8 on AMX tiles, 4-bit) inside it, each thread to the block it just computed
/// (the default), or, with `false`, as ops of their own. For comparisons; outputs are bit-identical (see `epilogue.rs`).
pub fn set_epilogues(on: bool) {
    epilogue::ENABLED.set(on);
}

/// Whether models loaded from now on compute each f32 LayerNorm over the last axis in one op,
/// rows split over the threads (the default), or, with `false`, as tract expands it (four ops).
/// For comparisons; outputs differ by rounding only (see `layer_norm_rows.rs`).
pub fn set_layer_norm_rows(on: bool) {
    layer_norm_rows::ENABLED.set(on);
}

/// Whether models loaded from now on compute f32 softmaxes with the runtime's kernel, over the
/// last axis or a strided one in place, split over the threads (the default), or, with `false`,
/// with tract's. For comparisons; outputs differ by rounding only (see `softmax_rows.rs`).
pub fn set_softmax_rows(on: bool) {
    softmax_rows::ENABLED.set(on);
}

/// Whether models loaded from now on run a softmax over a strided axis that the runtime's kernel
/// does not take (not f32, or that kernel switched off) on a contiguous copy (the default) or,
/// with `false`, where tract put it. For comparisons; outputs differ by
/// rounding only.
pub fn set_softmax_last(on: bool) {
    softmax_last::ENABLED.set(on);
}

/// Whether models loaded from now on decode constants stored as 8-bit codes (a quantised
/// export's position table) in one pass at each run (the default) or, with `false`, with tract's
/// `Cast` and broadcasting `Mul`. For comparisons; outputs are bit-identical (see
/// `dequant_const.rs`).
pub fn set_dequant_const(on: bool) {
    dequant_const::ENABLED.set(on);
}

/// Whether models loaded from now on quantise int8 graphs' activations with the runtime's
/// vectorised `DynamicQuantizeLinear` (the default) or, with `false`, with tract-onnx's. For
/// comparisons; outputs are bit-identical (see `dynamic_quantize.rs`).
pub fn set_fast_dynamic_quantize(on: bool) {
    dynamic_quantize::ENABLED.set(on);
}

/// Whether models loaded from now on compute an f16 graph in f32 on a CPU without f16 arithmetic
/// (the default) or, with `false`, as tract does (f16 values, converted around each op). For
/// comparisons; see [`f16_as_f32`].
pub fn set_f16_as_f32(on: bool) {
    f16_as_f32::ENABLED.set(on);
}

/// Where a model's protobuf comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A file (path, length in bytes), decoded through a window.
    File(&'a Path, u64),
    /// Bytes in memory.
    Bytes(&'a [u8]),
}

/// Name, element type and fixed shape of a graph input or output.
#[derive(Clone, Debug, PartialEq)]
pub struct IoSpec {
    /// Graph name.
    pub name: String,
    /// Element type.
    pub dtype: DatumType,
    /// Fixed shape.
    pub shape: Vec<usize>,
}

/// Human name of a datum type, numpy-style (`float32`, `int64`).
pub fn dtype_name(dt: DatumType) -> String {
    match dt {
        DatumType::F32 => "float32".into(),
        DatumType::F16 => "float16".into(),
        DatumType::F64 => "float64".into(),
        DatumType::I64 => "int64".into(),
        DatumType::I32 => "int32".into(),
        DatumType::I8 => "int8".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::Bool => "bool".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

type Plan = Arc<TypedRunnableModel>;

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// tract's CPU kernels (NEON / fp16 / SDOT on aarch64, AVX2 / FMA on x86-64).
    #[default]
    Cpu,
    /// tract's CUDA backend (Jetson Orin, desktop NVIDIA GPUs). Needs the `cuda` feature at build
    /// time and a CUDA driver and GPU at run time.
    Cuda,
}

impl Device {
    /// Parses `cpu` or `cuda`.
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda),
            _ => None,
        }
    }

    /// Whether this build can run on the device at all (CUDA: built with the `cuda` feature;
    /// a GPU is only looked for when a model is loaded).
    pub fn compiled_in(self) -> bool {
        match self {
            Device::Cpu => true,
            Device::Cuda => cfg!(any(feature = "cuda", feature = "cuda-13")),
        }
    }
}

/// Prepares a typed model with tract-cuda's runtime (CUDA transform, optimisation, device
/// memory handling); the result is an ordinary tract plan whose ops run on the GPU, and whether
/// the graph's f16 values were widened to f32 first.
#[cfg(any(feature = "cuda", feature = "cuda-13"))]
fn cuda_plan(mut typed: TypedModel) -> std::result::Result<(Plan, bool), String> {
    // Naming the crate links it, so its runtime registers itself with tract-core.
    std::hint::black_box(&tract_cuda::CudaTransform);
    let runtime = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
        // `{:#}`: the whole cause chain on one line (which library or driver check failed).
        .map_err(|e| format!("CUDA is not usable here: {}", format!("{e:#}").replace('\n', " ")))?
        .ok_or("this build has no CUDA runtime registered")?;
    // tract-cuda's 4-bit products do not reproduce the CPU's results; its f32 products do.
    q4_matmul::decode_weights(&mut typed)
        .map_err(|e| format!("cannot decode the 4-bit weights: {}", first_line(&e)))?;
    // Its f16 graphs ran 72x slower than f32 ones (H200): computed in f32, as on x86 CPUs.
    let widened =
        f16_as_f32::widen(&mut typed).map_err(|e| format!("cannot widen the f16 graph to f32: {}", first_line(&e)))?;
    let model = typed.into_decluttered().map_err(|e| format!("cannot declutter the graph: {}", first_line(&e)))?;
    let runnable = runtime
        .prepare(model)
        .map_err(|e| format!("cannot prepare the graph for CUDA: {}", format!("{e:#}").replace('\n', " ")))?;
    let plan = runnable.typed_plan().cloned().ok_or_else(|| "the CUDA runtime returned no tract plan".to_string())?;
    Ok((plan, widened))
}

#[cfg(not(any(feature = "cuda", feature = "cuda-13")))]
fn cuda_plan(_typed: TypedModel) -> std::result::Result<(Plan, bool), String> {
    Err("this build has no CUDA support (rebuild with `--features cuda`)".to_string())
}

/// Each key's node count and summed time, as [`Session::run_profiled`] adds them up.
pub type OpTimes = std::collections::BTreeMap<String, (usize, std::time::Duration)>;

/// What [`Session::run_profiled`] adds each node's time under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpKey {
    /// The op's name (`OptMatMul`, `Softmax`, ...): one entry per kind of op.
    #[default]
    Kind,
    /// The op's name and tract's description of the node (`Op::info`: a product's sizes, kernel
    /// and epilogue, ...): one entry per kind of op and shape.
    Shape,
}

impl OpKey {
    /// The key of a node running `op`.
    fn of(self, op: &dyn tract_onnx::tract_core::ops::Op) -> String {
        let name = op.name();
        match (self, op.info()) {
            (OpKey::Shape, Ok(info)) if !info.is_empty() => format!("{name} [{}]", info.join("; ")),
            _ => name.to_string(),
        }
    }
}

/// A loaded, optimised model with its reusable run state.
pub struct Session {
    plan: Plan,
    state: TypedSimpleState,
    inputs: Vec<IoSpec>,
    /// Valid value range of integer inputs (token ids, indices), by input position.
    ranges: Vec<Option<(i64, i64)>>,
    outputs: Vec<IoSpec>,
    metadata: Vec<(String, String)>,
    /// Bytes its tensors keep in ONNX external data files (0 for a self-contained model).
    external_bytes: u64,
    /// Whether its f16 values are computed in f32 ([`f16_as_f32`]).
    f16_in_f32: bool,
    /// Where its runs go: the thread pool, or the calling thread where a trial found that faster.
    placement: spin::Placement,
    /// Last, so it drops after the plan and its state: the pages kept from their large buffers
    /// go back to the system with the session, not at the next load.
    _release: alloc::ReleaseOnDrop,
}

fn fixed_shape(fact: &TypedFact, what: &str, name: &str) -> Result<Vec<usize>> {
    fact.shape.as_concrete().map(|s| s.to_vec()).ok_or_else(|| Error::Input {
        name: name.into(),
        msg: format!("{what} has a symbolic shape; perceiver-edge needs fixed shapes"),
    })
}

impl Session {
    /// Loads an ONNX file: fixes shapes, declutters and optimises once (on the CPU).
    pub fn load(path: &Path) -> Result<Session> {
        Session::load_on(path, Device::Cpu)
    }

    /// Loads an ONNX file and prepares it for `device`. External data (ONNX's `location` /
    /// `offset` / `length` initializers) is read from the model's folder, confined to it, and
    /// checked against the side file before tract reads it.
    pub fn load_on(path: &Path, device: Device) -> Result<Session> {
        Session::load_exposing_on(path, &[], device).map(|(s, _)| s)
    }

    /// [`Session::from_bytes_exposing`] for an ONNX file (CPU): the model's folder is where its
    /// external data is looked for.
    pub fn load_exposing(path: &Path, extra: &[String]) -> Result<(Session, Vec<String>)> {
        Session::load_exposing_on(path, extra, Device::Cpu)
    }

    /// [`Session::load_exposing`] on `device`.
    pub fn load_exposing_on(path: &Path, extra: &[String], device: Device) -> Result<(Session, Vec<String>)> {
        let load_err = |msg: String| Error::Load { path: path.display().to_string(), msg };
        let len = std::fs::metadata(path).map_err(|e| load_err(format!("cannot read: {e}")))?.len();
        limits::check_fits_memory(len).map_err(load_err)?;
        let dir = model_dir(path);
        // Decoded from the file through a window, its weights handed to tract one by one
        // (`weights_once`): one copy of the weights at the load's peak, not three.
        Session::load_caught(Source::File(path, len), Some(&dir), extra, device).map_err(|e| match e {
            Error::Load { msg, .. } => load_err(msg),
            other => other,
        })
    }

    /// Loads an ONNX model from memory (CPU).
    pub fn from_bytes(bytes: &[u8]) -> Result<Session> {
        Session::from_bytes_on(bytes, Device::Cpu)
    }

    /// Loads an ONNX model from memory and prepares it for `device`.
    pub fn from_bytes_on(bytes: &[u8], device: Device) -> Result<Session> {
        Session::from_bytes_exposing_on(bytes, &[], device).map(|(s, _)| s)
    }

    /// Loads an ONNX model from memory (CPU) with the intermediate values named `extra` (ONNX
    /// value names) exposed as outputs after the graph's own; names not in the graph are skipped.
    /// Returns the session and the names actually exposed, in output order. A model with
    /// external data needs its folder: load it with [`Session::load_exposing`].
    pub fn from_bytes_exposing(bytes: &[u8], extra: &[String]) -> Result<(Session, Vec<String>)> {
        Session::from_bytes_exposing_on(bytes, extra, Device::Cpu)
    }

    /// [`Session::from_bytes_exposing`] on `device`.
    pub fn from_bytes_exposing_on(bytes: &[u8], extra: &[String], device: Device) -> Result<(Session, Vec<String>)> {
        Session::from_bytes_in(bytes, None, extra, device)
    }

    /// Loads ONNX protobuf `bytes` whose external data, if any, lies in folder `dir` (the model
    /// file's folder; `None`: the model must hold all its data), exposing `extra` values (see
    /// [`Session::from_bytes_exposing`]) and preparing it for `device`.
    pub fn from_bytes_in(
        bytes: &[u8],
        dir: Option<&Path>,
        extra: &[String],
        device: Device,
    ) -> Result<(Session, Vec<String>)> {
        Session::load_caught(Source::Bytes(bytes), dir, extra, device)
    }

    fn load_caught(
        bytes: Source<'_>,
        dir: Option<&Path>,
        extra: &[String],
        device: Device,
    ) -> Result<(Session, Vec<String>)> {
        // A panic inside tract (a malformed graph it did not expect) becomes a load error.
        let load = std::panic::AssertUnwindSafe(|| Session::load_unguarded(bytes, dir, extra, device));
        match std::panic::catch_unwind(load) {
            Ok(r) => r,
            Err(panic) => Err(Error::Load {
                path: "<memory>".into(),
                msg: format!("not a loadable ONNX model: internal error in tract: {}", panic_message(&panic)),
            }),
        }
    }

    fn load_unguarded(
        source: Source<'_>,
        dir: Option<&Path>,
        extra: &[String],
        device: Device,
    ) -> Result<(Session, Vec<String>)> {
        use prost::Message;
        let _phase = alloc::LoadPhase::begin();
        let err = |msg: String| Error::Load { path: "<memory>".into(), msg };
        // tract resolves external data only inside the model's folder, given as UTF-8: a model
        // file that is a symlink to elsewhere keeps its weights in the protobuf.
        let utf8_dir = dir.and_then(|d| d.to_str()).map(str::to_string);
        let inside = |path: &Path| match (path.canonicalize(), dir.map(Path::canonicalize)) {
            (Ok(p), Some(Ok(d))) => p.starts_with(d),
            _ => false,
        };
        let (proto, len, handed) = match source {
            // A file's large weights stay in it until tract reads them (`weights_once`).
            Source::File(path, len) => {
                let defer = utf8_dir.is_some() && inside(path);
                let (proto, handed) = weights_once::decode_file(path, defer).map_err(err)?;
                (proto, len, handed)
            }
            Source::Bytes(bytes) => {
                let proto = tract_onnx::pb::ModelProto::decode(bytes)
                    .map_err(|e| err(format!("not a loadable ONNX model: not an ONNX protobuf ({e})")))?;
                (proto, bytes.len() as u64, None)
            }
        };
        // The weights left in the model file count as external data here; they are in `len`.
        let in_file = handed.as_ref().map_or(0, weights_once::HandOver::bytes);
        let external = guard::check_proto(&proto, dir).map_err(err)?.saturating_sub(in_file);
        if external > 0 {
            limits::check_fits_memory(len + external).map_err(err)?;
        }
        if let (Some(d), None, true) = (dir, &utf8_dir, external > 0) {
            return Err(err(format!("{}: the model's folder must be valid UTF-8", d.display())));
        }
        let mut onnx = tract_onnx::onnx();
        nbits_import::register(&mut onnx);
        let dir_str = match handed {
            Some(handed) => {
                onnx.provider = Arc::new(handed);
                utf8_dir
            }
            None if external > 0 => utf8_dir,
            None => None,
        };
        let parsed = onnx
            .parse(&proto, dir_str.as_deref())
            .map_err(|e| err(format!("not a loadable ONNX model: {}", first_line(&e))))?;
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(err(format!("not a loadable ONNX model: unresolved inputs {:?}", parsed.unresolved_inputs)));
        }
        let mut model = parsed.model;
        let mut exposed = vec![];
        if !extra.is_empty() {
            let mut outlets = model.output_outlets().map_err(|e| err(e.to_string()))?.to_vec();
            for name in extra {
                if let Some(o) = model.find_outlet_label(name) {
                    if !outlets.contains(&o) {
                        outlets.push(o);
                        exposed.push(name.clone());
                    }
                }
            }
            model.select_output_outlets(&outlets).map_err(|e| err(e.to_string()))?;
        }
        let typed = if pack_once::ENABLED.get() { weights_once::into_typed(model) } else { model.into_typed() };
        let mut typed = typed.map_err(|e| err(format!("cannot type the graph: {}", with_cause(&e))))?;
        guard::check_facts(&typed).map_err(err)?;

        let metadata: Vec<(String, String)> = typed
            .properties
            .iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("onnx.metadata_props.")?;
                let s = v.try_as_plain_ram().ok()?.as_slice::<String>().ok()?.first()?.clone();
                Some((key.to_string(), s))
            })
            .collect();
        let io = |outlets: &[OutletId], what: &str| -> Result<Vec<IoSpec>> {
            outlets
                .iter()
                .map(|o| {
                    let fact = typed.outlet_fact(*o).map_err(|e| err(e.to_string()))?;
                    let name = typed.node(o.node).name.clone();
                    Ok(IoSpec { shape: fixed_shape(fact, what, &name)?, dtype: fact.datum_type, name })
                })
                .collect()
        };
        let inputs = io(typed.input_outlets().map_err(|e| err(e.to_string()))?, "input")?;
        let mut outputs = io(typed.output_outlets().map_err(|e| err(e.to_string()))?, "output")?;
        // Output nodes carry the ONNX output names as labels.
        for (spec, o) in outputs.iter_mut().zip(typed.output_outlets().map_err(|e| err(e.to_string()))?) {
            if let Some(label) = typed.outlet_label(*o) {
                spec.name = label.to_string();
            }
        }
        let n_own = outputs.len() - exposed.len();
        for (spec, name) in outputs[n_own..].iter_mut().zip(&exposed) {
            spec.name = name.clone();
        }
        let mut f16_in_f32 = false;
        // tract's order of the graph before the fusing passes (see `order.rs`).
        let mut reference: Option<Vec<String>> = None;
        let plan: Plan = match device {
            Device::Cpu => f16_as_f32::apply(&mut typed)
                .and_then(|widened| {
                    if q4_matmul::DECODE_AT_LOAD.get() {
                        q4_matmul::decode_weights(&mut typed)?;
                    }
                    f16_in_f32 = widened;
                    pack_once::optimize(typed, pack_once::ENABLED.get(), |m| {
                        if gemm_matmul::ENABLED.get() {
                            gemm_matmul::rewrite(m)?;
                        }
                        if q4_matmul::ENABLED.get() {
                            q4_matmul::rewrite(m)?;
                        }
                        if int8_matmul::ENABLED.get() {
                            int8_matmul::rewrite(m)?;
                        }
                        if attention::ENABLED.get() {
                            attention::rewrite(m)?;
                        }
                        if f32_packed::ENABLED.get() {
                            f32_packed::rewrite(m)?;
                        }
                        if order::ENABLED.get() {
                            reference = Some(order::reference(m)?);
                        }
                        if layer_norm_rows::ENABLED.get() {
                            layer_norm_rows::rewrite(m)?;
                        }
                        if epilogue::ENABLED.get() {
                            epilogue::rewrite(m)?;
                        }
                        Ok(())
                    })
                })
                .and_then(|mut m| {
                    // The row kernel takes every f32 softmax, strided or not; what is left
                    // (f16 on ARM, or the kernel switched off) runs on a contiguous copy.
                    if softmax_rows::ENABLED.get() {
                        softmax_rows::rewrite(&mut m)?;
                    }
                    if softmax_last::ENABLED.get() {
                        softmax_last::rewrite(&mut m)?;
                    }
                    if dynamic_quantize::ENABLED.get() {
                        dynamic_quantize::rewrite(&mut m)?;
                    }
                    if dequant_const::ENABLED.get() {
                        dequant_const::rewrite(&mut m)?;
                    }
                    order::plan(m, reference.as_deref())
                })
                .map_err(|e| err(format!("cannot optimise the graph: {}", first_line(&e))))?,
            Device::Cuda => {
                let (plan, widened) = cuda_plan(typed).map_err(err)?;
                f16_in_f32 = widened;
                plan
            }
        };
        let state = TypedSimpleState::new(&plan).map_err(|e| err(e.to_string()))?;
        alloc::release_freed();
        let ranges: Vec<Option<(i64, i64)>> = inputs
            .iter()
            .map(|i| {
                let key = metadata::range_key(&i.name);
                let v = metadata.iter().find(|(k, _)| *k == key)?;
                let mut it = v.1.split_whitespace().map(|x| x.parse::<i64>().ok());
                Some((it.next()??, it.next()??))
            })
            .collect();
        for (spec, range) in inputs.iter().zip(&ranges) {
            if let Some((lo, hi)) = *range {
                if lo > hi || lo.checked_sub(1).is_none() || hi.checked_add(1).is_none() {
                    return Err(err(format!(
                        "metadata `{}` declares the empty or unbounded value range {lo}..={hi} for input `{}`",
                        metadata::range_key(&spec.name),
                        spec.name
                    )));
                }
            }
        }
        Ok((
            Session {
                plan,
                state,
                inputs,
                ranges,
                outputs,
                metadata,
                external_bytes: external,
                f16_in_f32,
                placement: Default::default(),
                _release: alloc::ReleaseOnDrop,
            },
            exposed,
        ))
    }

    /// Bytes of the constants (weights, tables) the optimised plan keeps resident, by element
    /// type of their storage (`f32`, `i8`, `q4_0`/packed formats, ...), largest first. This is
    /// what tract actually holds after it folded or packed the file's weights. Storage shared by
    /// several nodes (a weight-shared latent block unrolled into its repetitions) counts once.
    pub fn resident_weights(&self) -> Vec<(String, usize)> {
        use tract_linalg::mmm::EagerPackedInput;
        use tract_onnx::tract_core::ops::konst::Const;
        use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
        let mut by: Vec<(String, usize)> = vec![];
        let mut seen = std::collections::HashSet::new();
        let mut add = |kind: String, bytes: usize, at: Option<usize>| {
            if at.is_some_and(|p| !seen.insert(p)) {
                return;
            }
            match by.iter_mut().find(|(k, _)| *k == kind) {
                Some(e) => e.1 += bytes,
                None => by.push((kind, bytes)),
            }
        };
        // Short name of a packed or block-quantised format (`PackedI8K4 { r: 8, .. }` -> `PackedI8K4`).
        let short = |debug: String| debug.split(['(', ' ', '{', '[']).next().unwrap_or("exotic").to_string();
        for node in self.plan.model().nodes() {
            if let Some(c) = node.op_as::<Const>() {
                let t = c.val();
                let at = Some(Arc::as_ptr(t) as usize);
                match c.exotic_fact() {
                    Some(f) => add(short(format!("{f:?}")), f.mem_size().to_i64().unwrap_or(0) as usize, at),
                    None => add(dtype_name(t.datum_type()), t.len() * t.datum_type().size_of(), at),
                }
            } else if let Some(q) = node.op_as::<q4_matmul::GemmQ4>() {
                // The runtime's own ops hold their constants too.
                let (bytes, at) = q.weight_held();
                add("Q4_0".into(), bytes, Some(at));
            } else if let Some(p) = node.op_as::<gemm_matmul::GemmMatMul>().and_then(|g| g.packed.as_ref()) {
                add("f32 (panels)".into(), p.bytes(), Some(Arc::as_ptr(p) as usize));
            } else if let Some(q) = node.op_as::<int8_matmul::Int8MatMul>() {
                add(format!("i8 ({} packing)", q.kernel_name()), q.weight_bytes(), Some(q.weight_at()));
            } else if let Some(d) = node.op_as::<dequant_const::DequantConst>() {
                for t in d.constants() {
                    add(dtype_name(t.datum_type()), t.len() * t.datum_type().size_of(), Some(Arc::as_ptr(t) as usize));
                }
            } else if let Some(mm) = node.op_as::<OptMatMul>() {
                // Constant weights are packed into the matmul op itself.
                for spec in &mm.micro_ops {
                    if let ProtoFusedSpec::AddMatMul { a, b, .. } = spec {
                        for operand in [a, b] {
                            if let MatMulOperand::Const(v) = operand {
                                let bytes = v.exotic_fact().mem_size().to_i64().unwrap_or(0) as usize;
                                let at = v.downcast_ref::<EagerPackedInput>().map(|e| Arc::as_ptr(&e.packed) as usize);
                                add(format!("packed {}", short(format!("{:?}", v.format()))), bytes, at);
                            }
                        }
                    }
                }
            }
        }
        by.sort_by_key(|e| std::cmp::Reverse(e.1));
        by
    }

    /// Bytes of the model's tensors read from ONNX external data (side files next to the
    /// model, `export --external-data`); 0 for a self-contained model.
    pub fn external_data_bytes(&self) -> u64 {
        self.external_bytes
    }

    /// Whether this f16 graph runs in f32 here: this CPU lacks f16 arithmetic, or `--device cuda`
    /// ([`f16_as_f32`]).
    pub fn f16_computed_in_f32(&self) -> bool {
        self.f16_in_f32
    }

    /// Graph inputs, in the order `run` takes them.
    pub fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }

    /// Graph outputs, in the order `run` returns them.
    pub fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }

    /// Declared value range of integer input `i` (token ids, indices), if any.
    pub fn input_range(&self, i: usize) -> Option<(i64, i64)> {
        self.ranges.get(i).copied().flatten()
    }

    /// ONNX `metadata_props` of the model (the exporter stores its summary there).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Checks `inputs` against the graph's inputs (count, type, shape).
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<()> {
        if inputs.len() != self.inputs.len() {
            let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::Input {
                name: names.join(", "),
                msg: format!("got {} input(s), the model takes {} ({})", inputs.len(), names.len(), names.join(", ")),
            });
        }
        for (i, t) in inputs.iter().enumerate() {
            self.check_inputs_one(i, t)?;
        }
        Ok(())
    }

    /// Checks tensor `t` against graph input number `i` (type and shape).
    pub fn check_inputs_one(&self, i: usize, t: &Tensor) -> Result<()> {
        let spec = &self.inputs[i];
        if t.datum_type() != spec.dtype {
            return Err(Error::Input {
                name: spec.name.clone(),
                msg: format!("dtype {}, expected {}", dtype_name(t.datum_type()), dtype_name(spec.dtype)),
            });
        }
        if t.shape() != spec.shape.as_slice() {
            return Err(Error::Input {
                name: spec.name.clone(),
                msg: format!("shape {:?}, expected {:?}", t.shape(), spec.shape),
            });
        }
        if let (Some((lo, hi)), Some(values)) = (self.ranges[i], to_vec::<i64>(t)) {
            if let Some((at, v)) = values.iter().enumerate().find(|(_, v)| **v < lo || **v > hi) {
                return Err(Error::Input {
                    name: spec.name.clone(),
                    msg: format!("value {v} at flat index {at} is out of range {lo}..={hi}"),
                });
            }
        }
        Ok(())
    }

    /// Warm-up: runs the model `runs` times on `inputs` (outputs dropped) and, at more than one
    /// thread, on until it has chosen where its runs go: a session whose first run is short (under
    /// 20 ms) times a few runs on the pool and a few on one thread before it chooses (at most 12
    /// runs, again after a change of [`set_threads`]; a session whose pool threads were short of
    /// CPU times a few on one thread again), and runs timed before then would time the trial.
    /// `runs` 0 runs nothing. Returns the runs made.
    pub fn warm_up(&mut self, inputs: &[Tensor], runs: usize) -> Result<usize> {
        let mut made = 0;
        while made < runs || runs > 0 && !self.placement.settled() && made < runs + spin::TRIAL_RUNS {
            self.run(inputs.to_vec())?;
            made += 1;
        }
        Ok(made)
    }

    /// Where this session's runs went at more than one thread, from its load: on the thread
    /// pool or on the calling thread alone, and the pool's threads' share of their cores (a
    /// busy neighbour on a core shows there; see [`set_threads`]).
    pub fn pool_use(&self) -> PoolUse {
        self.placement.used()
    }

    /// Runs the model on `inputs` (in graph-input order) and returns its outputs.
    pub fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.run_with(inputs, None)
    }

    /// [`Session::run`], also adding each node's time to `per_op` under the key `key` gives it
    /// ([`OpKey::Kind`]: tract's optimised op name, `OptMatMul`, `Softmax`, ...), with how many
    /// nodes ran it.
    pub fn run_profiled(&mut self, inputs: Vec<Tensor>, per_op: &mut OpTimes, key: OpKey) -> Result<Vec<Tensor>> {
        self.run_with(inputs, Some((per_op, key)))
    }

    fn run_with(&mut self, inputs: Vec<Tensor>, per_op: Option<(&mut OpTimes, OpKey)>) -> Result<Vec<Tensor>> {
        self.check_inputs(&inputs)?;
        let inputs: TVec<TValue> = inputs.into_iter().map(TValue::from).collect();
        // A panic inside tract must not take the caller down: report it and start a fresh state.
        let (state, placement) = (&mut self.state, &mut self.placement);
        let run = || match per_op {
            None => state.run(inputs),
            Some((per_op, key)) => state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
                let t = std::time::Instant::now();
                let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                // Timed before the key is made: a shape key formats the node's description.
                let took = t.elapsed();
                let e = per_op.entry(key.of(node.op())).or_default();
                e.0 += 1;
                e.1 += took;
                out
            }),
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| placement.run(run))) {
            Ok(Ok(outputs)) => Ok(outputs.into_iter().map(|v| v.into_tensor()).collect()),
            Ok(Err(e)) => Err(Error::Run(first_line(&e))),
            Err(panic) => {
                self.state = TypedSimpleState::new(&self.plan).map_err(|e| Error::Run(e.to_string()))?;
                Err(Error::Run(format!("internal error in tract: {}", panic_message(&panic))))
            }
        }
    }
}

/// The folder of model file `path` (`.` for a bare file name): where its external data lies.
fn model_dir(path: &Path) -> std::path::PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// A caught panic's message on one line, without the backtrace that an `anyhow` error formatted
/// with `{:?}` carries when `RUST_BACKTRACE` is set (tract-cuda panics so when it cannot create
/// a CUDA context: a stub `libcuda.so`, no GPU).
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
    let msg = msg.unwrap_or_default();
    let msg = msg.split("Stack backtrace:").next().unwrap_or_default();
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn first_line(e: &impl std::fmt::Display) -> String {
    // tract errors carry a cause chain; `{:#}` would span lines.
    e.to_string().lines().next().unwrap_or("").to_string()
}

/// The error's first line and, when it is a context (`Translating node ...`), its root cause's:
/// what went wrong as well as where.
fn with_cause(e: &TractError) -> String {
    let (outer, cause) = (first_line(e), first_line(&e.root_cause()));
    if cause.is_empty() || outer.contains(&cause) {
        outer
    } else {
        format!("{outer}: {cause}")
    }
}

/// A tensor of `shape` holding `data` (row-major); `None` if the sizes differ.
pub fn tensor<T: Datum + Copy>(shape: &[usize], data: &[T]) -> Option<Tensor> {
    Tensor::from_shape(shape, data).ok()
}

/// The elements of a tensor of type `T` as a vector; `None` for another type.
pub fn to_vec<T: Datum + Clone>(t: &Tensor) -> Option<Vec<T>> {
    (t.datum_type() == T::datum_type()).then(|| t.try_as_plain_ram().ok()?.as_slice::<T>().ok().map(|s| s.to_vec()))?
}

#[cfg(test)]
mod panic_message_tests {
    use super::panic_message;

    #[test]
    fn a_panics_message_is_one_line_without_its_backtrace() {
        // As tract-cuda's panic read on a GPU machine with RUST_BACKTRACE=1 (session 33).
        let text = "Could not create CUDA context: Could not find system default CUDA device\n\nCaused by:\n    \
                    DriverError(CUDA_ERROR_STUB_LIBRARY, \"\")\n\nStack backtrace:\n   0: <unknown>\n   1: main\n";
        let caught = std::panic::catch_unwind(|| std::panic::panic_any(text.to_string())).unwrap_err();
        assert_eq!(
            panic_message(&caught),
            "Could not create CUDA context: Could not find system default CUDA device Caused by: \
             DriverError(CUDA_ERROR_STUB_LIBRARY, \"\")"
        );
        let caught = std::panic::catch_unwind(|| panic!("index out of bounds")).unwrap_err();
        assert_eq!(panic_message(&caught), "index out of bounds");
    }
}

#[cfg(all(test, feature = "threads"))]
mod warm_up_tests {
    use super::*;
    use tract_linalg::multithread::{multithread_tract_scope, Executor};

    /// The bundled digits model (its first run is far below the trial's 20 ms on a native CPU).
    fn digits() -> (Session, Vec<Tensor>) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::temp_dir().join(format!("pe-warm-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let onnx = dir.join("digits.onnx");
        perceiver_edge_export::export(&root.join("models/digits"), &Default::default()).unwrap().write(&onnx).unwrap();
        let session = Session::load(&onnx).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let inputs = bench::synthetic_inputs(&session).unwrap();
        (session, inputs)
    }

    #[test]
    fn warm_up_runs_until_the_trial_has_chosen() {
        let (mut s, x) = digits();
        multithread_tract_scope(Executor::multithread(2), || {
            assert_eq!(s.warm_up(&x, 0).unwrap(), 0, "0 runs nothing");
            let made = s.warm_up(&x, 1).unwrap();
            assert!((1..=1 + spin::TRIAL_RUNS).contains(&made), "{made} runs");
            assert!(s.placement.settled(), "timed runs after warm_up(1) would time the trial ({made} runs made)");
            // Once chosen, exactly the runs asked for, unless the pool's threads were short of
            // CPU meanwhile (tests run side by side): then up to a probe's runs more, on one thread.
            let before = s.pool_use();
            let more = s.warm_up(&x, 2).unwrap();
            let probed = s.pool_use().one_thread_runs > before.one_thread_runs && before.pool_runs > 0;
            assert!(more == 2 || (probed && more <= 2 + spin::TRIAL_RUNS), "{more} runs for 2");
            assert!(s.placement.settled());
        });
        // One thread: nothing to choose.
        multithread_tract_scope(Executor::SingleThread, || assert_eq!(s.warm_up(&x, 3).unwrap(), 3));
    }
}
