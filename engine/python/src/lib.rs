//! Python bindings of perceiver-edge (`import perceiver_edge`), built with PyO3 and maturin.
//!
//! - [`Model`]: `Model.load(path)` loads and optimises an exported ONNX file once (the runtime's
//!   `Session`); `model.run({"name": array})` checks each numpy input's dtype and shape, copies
//!   it once into a tract tensor, runs with the GIL released and returns the outputs as numpy
//!   arrays that borrow the output tensors (no copy); `model.bench(...)` is the CLI's `bench`.
//! - `export`, `inspect`, `compare`: the CLI's subcommands, returning the reports as dicts (the
//!   runtime's and exporter's serde forms, through `json.loads`).
//!
//! Every failure is a Python exception (`ValueError` for bad input or options,
//! `FileNotFoundError` for a missing path, `OSError` for a failed write, `RuntimeError` for an
//! inference failure); a panic inside Rust is caught and raised as `RuntimeError`.

use numpy::{Element, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use perceiver_edge_export as ex;
use perceiver_edge_runtime as rt;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use rt::tract_onnx::prelude::{DatumType, Tensor};
use rt::{bench, Device, IoSpec, Session};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Counts heap bytes, like the CLI, so `Model.bench` reports peak heap and steady-state growth
/// (of the Rust side: tract's allocations, not Python's).
#[global_allocator]
static ALLOC: rt::alloc::Counting = rt::alloc::Counting;

/// Matmul threads set by `set_threads` (restored after `Model.bench(threads=...)`).
static THREADS: AtomicUsize = AtomicUsize::new(1);

// ---------------------------------------------------------------------------------------------
// Errors: every Rust failure becomes one Python exception with a one-line message.

fn value_err(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

fn not_found(path: &Path) -> PyErr {
    PyFileNotFoundError::new_err(format!("{}: no such file or directory", path.display()))
}

/// `FileNotFoundError` naming `path` unless it exists.
fn existing(path: &Path) -> PyResult<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(not_found(path))
    }
}

fn runtime_err(e: rt::Error) -> PyErr {
    match &e {
        rt::Error::Input { .. } | rt::Error::Npy { .. } | rt::Error::Setting(_) => value_err(e.to_string()),
        rt::Error::Load { path, msg } => {
            if !Path::new(path).exists() && path != "<memory>" {
                not_found(Path::new(path))
            } else if msg.starts_with("cannot read") {
                PyOSError::new_err(e.to_string())
            } else {
                value_err(e.to_string())
            }
        }
        rt::Error::Run(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

fn export_err(e: ex::Error) -> PyErr {
    match e {
        ex::Error::Runtime(r) => runtime_err(r),
        ex::Error::File { ref path, .. } if !Path::new(path).exists() => PyFileNotFoundError::new_err(e.to_string()),
        ex::Error::Write { .. } => PyOSError::new_err(e.to_string()),
        other => value_err(other.to_string()),
    }
}

/// Errors of the tune crate (anyhow): the exporter's and runtime's keep their kinds.
fn anyhow_err(e: anyhow::Error) -> PyErr {
    let e = match e.downcast::<ex::Error>() {
        Ok(x) => return export_err(x),
        Err(e) => e,
    };
    match e.downcast::<rt::Error>() {
        Ok(x) => runtime_err(x),
        Err(e) => value_err(format!("{e:#}").replace('\n', " ")),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic into `RuntimeError` so that none crosses into Python.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(PyRuntimeError::new_err(format!("internal error: {}", panic_message(p)))),
    }
}

/// Runs `f` with the GIL released (other Python threads run meanwhile), panics caught.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> PyResult<T> + Send) -> PyResult<T> {
    py.detach(|| guarded(f))
}

/// A serde-serialisable report as a Python object (dicts, lists, numbers, None), through
/// `json.loads`.
fn to_py(py: Python<'_>, value: &impl serde::Serialize) -> PyResult<Py<PyAny>> {
    let json = serde_json::to_string(value).map_err(|e| PyRuntimeError::new_err(format!("cannot serialise: {e}")))?;
    Ok(py.import("json")?.call_method1("loads", (json,))?.unbind())
}

// ---------------------------------------------------------------------------------------------
// numpy <-> tract

/// numpy's name of a graph dtype (`float32`, `int64`, `uint16`, ...).
fn dtype_name(dt: DatumType) -> String {
    match dt {
        DatumType::I16 => "int16".into(),
        DatumType::U16 => "uint16".into(),
        DatumType::U32 => "uint32".into(),
        DatumType::U64 => "uint64".into(),
        other => rt::dtype_name(other),
    }
}

/// The numpy dtype matching a graph dtype, if numpy has one.
fn numpy_dtype<'py>(py: Python<'py>, dt: DatumType) -> Option<Bound<'py, numpy::PyArrayDescr>> {
    Some(match dt {
        DatumType::F32 => f32::get_dtype(py),
        DatumType::F64 => f64::get_dtype(py),
        DatumType::F16 => half::f16::get_dtype(py),
        DatumType::I64 => i64::get_dtype(py),
        DatumType::I32 => i32::get_dtype(py),
        DatumType::I16 => i16::get_dtype(py),
        DatumType::I8 => i8::get_dtype(py),
        DatumType::U64 => u64::get_dtype(py),
        DatumType::U32 => u32::get_dtype(py),
        DatumType::U16 => u16::get_dtype(py),
        DatumType::U8 => u8::get_dtype(py),
        DatumType::Bool => bool::get_dtype(py),
        _ => return None,
    })
}

/// Copies a numpy array of element type `T` (already checked) into a tract tensor: one copy
/// for a C-contiguous array, two for any other layout.
fn copy_in<T: Element + rt::tract_onnx::prelude::Datum + Copy>(
    a: &Bound<'_, PyUntypedArray>,
    spec: &IoSpec,
) -> PyResult<Tensor> {
    let typed = a.cast::<PyArrayDyn<T>>().map_err(|_| value_err(format!("input `{}`: unexpected dtype", spec.name)))?;
    let ro = typed.try_readonly().map_err(|e| value_err(format!("input `{}`: {e}", spec.name)))?;
    // `as_slice` also accepts Fortran-ordered data, whose memory order is not the row-major
    // order tract reads: take it only for C order.
    let t = match ro.as_slice() {
        Ok(s) if a.is_c_contiguous() => Tensor::from_shape(&spec.shape, s),
        _ => {
            // Logical (row-major) order, whatever the strides.
            let v: Vec<T> = ro.as_array().iter().copied().collect();
            Tensor::from_shape(&spec.shape, &v)
        }
    };
    t.map_err(|e| value_err(format!("input `{}`: {e}", spec.name)))
}

/// Checks `obj` against graph input `spec` (a numpy array of its dtype and shape) and copies it
/// into a tensor.
fn tensor_from_numpy(obj: &Bound<'_, PyAny>, spec: &IoSpec) -> PyResult<Tensor> {
    let py = obj.py();
    let a = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("input `{}`: expected a numpy.ndarray, got {ty}", spec.name))
    })?;
    let want = numpy_dtype(py, spec.dtype).ok_or_else(|| {
        value_err(format!(
            "input `{}`: the model's dtype {} has no numpy equivalent",
            spec.name,
            dtype_name(spec.dtype)
        ))
    })?;
    let got = a.dtype();
    if !got.is_equiv_to(&want) {
        return Err(value_err(format!(
            "input `{}`: dtype {}, expected {}",
            spec.name,
            got.str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into()),
            dtype_name(spec.dtype)
        )));
    }
    if a.shape() != spec.shape.as_slice() {
        return Err(value_err(format!("input `{}`: shape {:?}, expected {:?}", spec.name, a.shape(), spec.shape)));
    }
    match spec.dtype {
        DatumType::F32 => copy_in::<f32>(a, spec),
        DatumType::F64 => copy_in::<f64>(a, spec),
        DatumType::F16 => copy_in::<half::f16>(a, spec),
        DatumType::I64 => copy_in::<i64>(a, spec),
        DatumType::I32 => copy_in::<i32>(a, spec),
        DatumType::I16 => copy_in::<i16>(a, spec),
        DatumType::I8 => copy_in::<i8>(a, spec),
        DatumType::U64 => copy_in::<u64>(a, spec),
        DatumType::U32 => copy_in::<u32>(a, spec),
        DatumType::U16 => copy_in::<u16>(a, spec),
        DatumType::U8 => copy_in::<u8>(a, spec),
        DatumType::Bool => copy_in::<bool>(a, spec),
        other => Err(value_err(format!("input `{}`: unsupported dtype {}", spec.name, dtype_name(other)))),
    }
}

/// Reads `{name: array}` into tensors in graph-input order: every input present, no unknown
/// names, each checked by [`tensor_from_numpy`].
fn tensors_from_dict(inputs: &Bound<'_, PyDict>, specs: &[IoSpec]) -> PyResult<Vec<Tensor>> {
    let names = || specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    for key in inputs.keys() {
        let key: String =
            key.extract().map_err(|_| PyTypeError::new_err(format!("input names must be str, got {key:?}")))?;
        if !specs.iter().any(|s| s.name == key) {
            return Err(value_err(format!("input `{key}`: the model has no such input (it takes {})", names())));
        }
    }
    specs
        .iter()
        .map(|spec| match inputs.get_item(&spec.name)? {
            Some(v) => tensor_from_numpy(&v, spec),
            None => Err(value_err(format!(
                "input `{}`: missing ({} {:?}; the model takes {})",
                spec.name,
                dtype_name(spec.dtype),
                spec.shape,
                names()
            ))),
        })
        .collect()
}

/// Owns an output tensor for the numpy array that views its data (the array's base object).
/// Never read or changed after the view is made, so the data never moves.
#[pyclass(module = "perceiver_edge", frozen)]
struct OutputBuffer(Tensor);

/// A numpy array over output tensor `t` of element type `T`: a view of its data kept alive by
/// an [`OutputBuffer`], or a copy where the tensor's data is not plain host memory.
fn numpy_from_tensor<'py, T: Element + rt::tract_onnx::prelude::Datum>(
    py: Python<'py>,
    t: Tensor,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let view_err = |e: rt::tract_onnx::prelude::TractError| PyRuntimeError::new_err(format!("output `{name}`: {e}"));
    if t.as_plain_ram().is_none() {
        let owned = t.to_plain_array_view::<T>().map_err(view_err)?.to_owned();
        return Ok(PyArray::from_owned_array(py, owned).into_any());
    }
    let owner = Bound::new(py, OutputBuffer(t))?;
    let view = owner.get().0.to_plain_array_view::<T>().map_err(view_err)?;
    // SAFETY: the array's data lives in the tensor inside `owner`, which becomes the array's
    // base object and so outlives it; `OutputBuffer` is frozen and never touched again, so the
    // tensor's storage is never reallocated or freed before the array is.
    let array = unsafe { PyArrayDyn::<T>::borrow_from_array(&view, owner.clone().into_any()) };
    Ok(array.into_any())
}

fn output_to_numpy<'py>(py: Python<'py>, t: Tensor, name: &str) -> PyResult<Bound<'py, PyAny>> {
    match t.datum_type() {
        DatumType::F32 => numpy_from_tensor::<f32>(py, t, name),
        DatumType::F64 => numpy_from_tensor::<f64>(py, t, name),
        DatumType::F16 => numpy_from_tensor::<half::f16>(py, t, name),
        DatumType::I64 => numpy_from_tensor::<i64>(py, t, name),
        DatumType::I32 => numpy_from_tensor::<i32>(py, t, name),
        DatumType::I16 => numpy_from_tensor::<i16>(py, t, name),
        DatumType::I8 => numpy_from_tensor::<i8>(py, t, name),
        DatumType::U64 => numpy_from_tensor::<u64>(py, t, name),
        DatumType::U32 => numpy_from_tensor::<u32>(py, t, name),
        DatumType::U16 => numpy_from_tensor::<u16>(py, t, name),
        DatumType::U8 => numpy_from_tensor::<u8>(py, t, name),
        DatumType::Bool => numpy_from_tensor::<bool>(py, t, name),
        other => Err(PyRuntimeError::new_err(format!(
            "output `{name}`: dtype {} has no numpy equivalent",
            dtype_name(other)
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Model

/// Name, numpy dtype and fixed shape of a model input or output.
#[pyclass(module = "perceiver_edge", frozen, eq)]
#[derive(Clone, PartialEq)]
struct TensorSpec {
    name: String,
    dtype: String,
    shape: Vec<usize>,
}

#[pymethods]
impl TensorSpec {
    /// Graph name (the key of `Model.run`'s dicts).
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// numpy dtype name (`float32`, `int64`, ...).
    #[getter]
    fn dtype(&self) -> &str {
        &self.dtype
    }

    /// Fixed shape.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    fn __repr__(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
        format!("TensorSpec(name='{}', dtype='{}', shape={tuple})", self.name, self.dtype)
    }
}

impl From<&IoSpec> for TensorSpec {
    fn from(s: &IoSpec) -> Self {
        TensorSpec { name: s.name.clone(), dtype: dtype_name(s.dtype), shape: s.shape.clone() }
    }
}

/// A loaded, optimised model (an exported fixed-shape ONNX file).
#[pyclass(module = "perceiver_edge", frozen)]
struct Model {
    /// One run at a time; callers from several threads queue here (without the GIL).
    session: Mutex<Session>,
    path: PathBuf,
    device: Device,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
    precision: String,
    summary: Option<String>,
}

fn parse_device(device: &str) -> PyResult<Device> {
    let d = Device::parse(device).ok_or_else(|| value_err(format!("unknown device `{device}` (cpu or cuda)")))?;
    if !d.compiled_in() {
        return Err(value_err(format!(
            "this build has no {device} support (build the package with the runtime's `{device}` feature)"
        )));
    }
    Ok(d)
}

#[pymethods]
impl Model {
    /// Loads an ONNX file exported by perceiver-edge (or any fixed-shape ONNX graph), fixes its
    /// shapes and optimises it once.
    #[classmethod]
    #[pyo3(signature = (path, device = "cpu"))]
    fn load(_cls: &Bound<'_, pyo3::types::PyType>, py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Model> {
        let device = parse_device(device)?;
        if path.is_dir() {
            return Err(value_err(format!(
                "{}: is a folder; Model.load takes an .onnx file (export a checkpoint folder first)",
                path.display()
            )));
        }
        existing(&path)?;
        let session = detached(py, || Session::load_on(&path, device).map_err(runtime_err))?;
        Ok(Model {
            inputs: session.inputs().to_vec(),
            outputs: session.outputs().to_vec(),
            precision: session.metadata(rt::metadata::PRECISION).unwrap_or("f32").to_string(),
            summary: session.metadata(rt::metadata::SUMMARY).map(str::to_string),
            session: Mutex::new(session),
            path,
            device,
        })
    }

    /// Graph inputs, in graph order.
    #[getter]
    fn inputs(&self) -> Vec<TensorSpec> {
        self.inputs.iter().map(TensorSpec::from).collect()
    }

    /// Graph outputs, in graph order (the order of `run`'s result).
    #[getter]
    fn outputs(&self) -> Vec<TensorSpec> {
        self.outputs.iter().map(TensorSpec::from).collect()
    }

    /// The model file.
    #[getter]
    fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// Weight precision recorded by the exporter (`f32`, `f16`, `int8`, `int8-static`, `q4`).
    #[getter]
    fn precision(&self) -> &str {
        &self.precision
    }

    /// The exporter's summary stored in the file (what `inspect` prints), or None.
    #[getter]
    fn summary(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match &self.summary {
            None => Ok(None),
            Some(json) => Ok(Some(py.import("json")?.call_method1("loads", (json.as_str(),))?.unbind())),
        }
    }

    /// Runs the model: `{input name: numpy array}` -> `{output name: numpy array}` (outputs in
    /// graph order). Each input must have the model's dtype and shape (`ValueError` otherwise);
    /// the GIL is released while the model runs.
    fn run<'py>(&self, py: Python<'py>, inputs: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
        let tensors = tensors_from_dict(inputs, &self.inputs)?;
        let results = detached(py, || {
            let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            session.run(tensors).map_err(runtime_err)
        })?;
        let out = PyDict::new(py);
        for (t, spec) in results.into_iter().zip(&self.outputs) {
            out.set_item(&spec.name, output_to_numpy(py, t, &spec.name)?)?;
        }
        Ok(out)
    }

    /// Warm-up before timed or real-time runs: runs the model `runs` times on `inputs` (outputs
    /// dropped) and, at more than one thread (`set_threads`), on until the engine has chosen
    /// between its thread pool and one thread for this model (a model whose first run is short
    /// times a few runs of each, at most 12 more). Returns the runs made.
    #[pyo3(signature = (inputs, runs = 5))]
    fn warm_up(&self, py: Python<'_>, inputs: &Bound<'_, PyDict>, runs: usize) -> PyResult<usize> {
        let tensors = tensors_from_dict(inputs, &self.inputs)?;
        detached(py, || {
            let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            session.warm_up(&tensors, runs).map_err(runtime_err)
        })
    }

    /// Where this model's runs went at more than one thread (`set_threads`), from its load:
    /// `{"pool_runs", "one_thread_runs", "pool_share"}`. The engine runs on one thread where
    /// that is faster (a small model, or the pool's cores busy with another process);
    /// `pool_share` is the share of their cores the pool's threads had (None without pool runs).
    fn pool_use<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let used = self.session.lock().unwrap_or_else(|p| p.into_inner()).pool_use();
        let d = PyDict::new(py);
        d.set_item("pool_runs", used.pool_runs)?;
        d.set_item("one_thread_runs", used.one_thread_runs)?;
        d.set_item("pool_share", used.pool_share())?;
        Ok(d)
    }

    /// Benchmarks the model like `perceiver-edge bench --json`: loads the file again (load +
    /// optimise time), `warmup` unmeasured runs, then `runs` measured runs (or `duration`
    /// seconds of them), optionally paced at `rate` Hz, on `inputs` or synthetic inputs.
    /// Returns the report as a dict with the CLI's field names (times in ms, memory in bytes).
    #[pyo3(signature = (runs = 100, warmup = 5, threads = 1, *, duration = None, rate = None, inputs = None))]
    #[allow(clippy::too_many_arguments)]
    fn bench(
        &self,
        py: Python<'_>,
        runs: usize,
        warmup: usize,
        threads: usize,
        duration: Option<f64>,
        rate: Option<f64>,
        inputs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let opts = bench::BenchOptions::from_flags(runs, duration, warmup, rate, threads)
            .map_err(|e| value_err(e.to_string().replace("--", "")))?;
        let inputs = inputs.map(|d| tensors_from_dict(d, &self.inputs)).transpose()?;
        let report = detached(py, || {
            let r = bench::bench_on(&self.path, inputs, &opts, self.device).map_err(runtime_err);
            // bench sets the matmul threads for its runs; later `run` calls keep the count
            // chosen with `set_threads`.
            rt::set_threads(THREADS.load(Ordering::Relaxed)).map_err(runtime_err)?;
            r
        })?;
        to_py(py, &report)
    }

    fn __repr__(&self) -> String {
        let list = |v: &[IoSpec]| {
            v.iter().map(|s| format!("{}: {}{:?}", s.name, dtype_name(s.dtype), s.shape)).collect::<Vec<_>>().join(", ")
        };
        format!(
            "Model('{}', precision='{}', inputs=[{}], outputs=[{}])",
            self.path.display(),
            self.precision,
            list(&self.inputs),
            list(&self.outputs)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Module functions: the CLI's export / inspect / compare.

/// Shape options of `export` and `inspect` (each defaults to a value from config.json).
struct Sizes {
    batch: Option<usize>,
    image_size: Option<(usize, usize)>,
    seq_len: Option<usize>,
    attention_mask: bool,
    decode_subset: Option<usize>,
    image_points: Option<usize>,
    audio_points: Option<usize>,
    decoder: Option<PathBuf>,
    no_rewrites: bool,
    tables: ex::Tables,
}

/// The table policy from `tables` (`"auto"`, `"all"`, `"none"`) and the older
/// `no_position_tables` flag (same as `"none"`).
fn table_policy(tables: Option<&str>, no_position_tables: bool) -> PyResult<ex::Tables> {
    match (tables, no_position_tables) {
        (Some(t), true) if t != "none" => {
            Err(value_err(format!("tables={t:?} and no_position_tables=True contradict each other")))
        }
        (_, true) => Ok(ex::Tables::None),
        (Some(t), false) => t.parse().map_err(export_err),
        (None, false) => Ok(ex::Tables::Auto),
    }
}

impl Sizes {
    fn given(&self) -> bool {
        self.batch.is_some()
            || self.image_size.is_some()
            || self.seq_len.is_some()
            || self.attention_mask
            || self.decode_subset.is_some()
            || self.image_points.is_some()
            || self.audio_points.is_some()
            || self.decoder.is_some()
            || self.no_rewrites
            || self.tables != ex::Tables::Auto
    }

    fn options(&self) -> ex::ExportOptions {
        ex::ExportOptions {
            batch: self.batch,
            image_size: self.image_size,
            seq_len: self.seq_len,
            attention_mask: self.attention_mask,
            decode_subset: self.decode_subset,
            image_points: self.image_points,
            audio_points: self.audio_points,
            decoder: self.decoder.clone(),
            perf: ex::passes::PerfOptions { no_rewrites: self.no_rewrites, tables: self.tables, ..Default::default() },
            ..Default::default()
        }
    }
}

/// What `export` returns besides the summary.
struct ExportResult {
    summary: ex::Summary,
    latents_kept: Option<Vec<usize>>,
    /// The external-data side file, when one was written.
    data_path: Option<PathBuf>,
}

#[allow(clippy::too_many_arguments)]
fn run_export(
    checkpoint: &Path,
    output: &Path,
    sizes: &Sizes,
    precision: &str,
    latents: Option<usize>,
    blocks: Option<usize>,
    calibrate: Option<PathBuf>,
    calibration_method: &str,
    keep_f32: Vec<String>,
    external_data: bool,
    reduce_range: bool,
) -> PyResult<ExportResult> {
    let q = ex::QuantOptions {
        precision: precision.parse().map_err(|e: rt::precision::UnknownPrecision| value_err(e.to_string()))?,
        keep_f32,
        calibrate: calibrate.clone(),
        method: calibration_method.parse().map_err(export_err)?,
        reduce_range,
    };
    if let Some(c) = &calibrate {
        existing(c)?;
    }
    if latents.is_some() && calibrate.is_none() {
        return Err(value_err("latents=K chooses latents on calibration data: give calibrate=DATA"));
    }
    let mut opts = sizes.options();
    opts.blocks = blocks;
    let (exported, choice) =
        perceiver_edge_tune::export_checkpoint(checkpoint, opts, latents, q, &mut |_, _| {}).map_err(anyhow_err)?;
    let data_path = exported.write_with(output, external_data).map_err(export_err)?;
    let latents_kept = choice.map(|c| c.kept);
    Ok(ExportResult { summary: exported.summary, latents_kept, data_path })
}

/// Exports a checkpoint folder (config.json + model.safetensors) to one fixed-shape ONNX file,
/// like `perceiver-edge export`. Returns the summary (what `inspect` reports) plus `path`,
/// `file_bytes`, `precision` and, with `latents`, `latents_kept`.
#[pyfunction]
#[pyo3(name = "export", signature = (
    checkpoint, output, precision = "f32", *, batch = None, image_size = None, seq_len = None,
    attention_mask = false, decode_subset = None, image_points = None, audio_points = None,
    decoder = None, no_rewrites = false, no_position_tables = false, latents = None, blocks = None,
    calibrate = None, calibration_method = "minmax", keep_f32 = None, tables = None, external_data = false,
    reduce_range = false
))]
#[allow(clippy::too_many_arguments)]
fn py_export(
    py: Python<'_>,
    checkpoint: PathBuf,
    output: PathBuf,
    precision: &str,
    batch: Option<usize>,
    image_size: Option<(usize, usize)>,
    seq_len: Option<usize>,
    attention_mask: bool,
    decode_subset: Option<usize>,
    image_points: Option<usize>,
    audio_points: Option<usize>,
    decoder: Option<PathBuf>,
    no_rewrites: bool,
    no_position_tables: bool,
    latents: Option<usize>,
    blocks: Option<usize>,
    calibrate: Option<PathBuf>,
    calibration_method: &str,
    keep_f32: Option<Vec<String>>,
    tables: Option<&str>,
    external_data: bool,
    reduce_range: bool,
) -> PyResult<Py<PyAny>> {
    existing(&checkpoint)?;
    if let Some(d) = &decoder {
        existing(d)?;
    }
    let sizes = Sizes {
        batch,
        image_size,
        seq_len,
        attention_mask,
        decode_subset,
        image_points,
        audio_points,
        decoder,
        no_rewrites,
        tables: table_policy(tables, no_position_tables)?,
    };
    let precision_name = precision.to_string();
    let method = calibration_method.to_string();
    let result = detached(py, || {
        run_export(
            &checkpoint,
            &output,
            &sizes,
            &precision_name,
            latents,
            blocks,
            calibrate,
            &method,
            keep_f32.unwrap_or_default(),
            external_data,
            reduce_range,
        )
    })?;
    let dict = to_py(py, &result.summary)?;
    let d = dict.bind(py).cast::<PyDict>()?;
    d.set_item("path", output.display().to_string())?;
    d.set_item("file_bytes", std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0))?;
    d.set_item("precision", precision)?;
    if let Some(p) = &result.data_path {
        d.set_item("external_data", p.display().to_string())?;
        d.set_item("external_data_bytes", std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))?;
    }
    let decisions: Vec<_> = result
        .summary
        .table_decisions
        .iter()
        .map(|t| (t.pass.clone(), t.kept, t.bytes, t.replaces, t.flops_saved, t.reason.clone()))
        .collect();
    d.set_item("table_decisions", decisions)?;
    if let Some(k) = result.latents_kept {
        d.set_item("latents_kept", k)?;
    }
    Ok(dict)
}

/// Describes a checkpoint folder (builds its graph with the shape options) or an exported
/// `.onnx` file, like `perceiver-edge inspect`: the summary (architecture, dims, parameters,
/// FLOPs per stage, memory, rewrites) and, for a file, `file_bytes`, `precision`,
/// `resident_weights` (bytes by storage kind after tract's optimisation) and the I/O specs.
#[pyfunction]
#[pyo3(name = "inspect", signature = (
    path, *, batch = None, image_size = None, seq_len = None, attention_mask = false,
    decode_subset = None, image_points = None, audio_points = None, decoder = None,
    no_rewrites = false, no_position_tables = false, tables = None
))]
#[allow(clippy::too_many_arguments)]
fn py_inspect(
    py: Python<'_>,
    path: PathBuf,
    batch: Option<usize>,
    image_size: Option<(usize, usize)>,
    seq_len: Option<usize>,
    attention_mask: bool,
    decode_subset: Option<usize>,
    image_points: Option<usize>,
    audio_points: Option<usize>,
    decoder: Option<PathBuf>,
    no_rewrites: bool,
    no_position_tables: bool,
    tables: Option<&str>,
) -> PyResult<Py<PyAny>> {
    existing(&path)?;
    let sizes = Sizes {
        batch,
        image_size,
        seq_len,
        attention_mask,
        decode_subset,
        image_points,
        audio_points,
        decoder,
        no_rewrites,
        tables: table_policy(tables, no_position_tables)?,
    };
    if path.is_dir() {
        let summary = detached(py, || {
            let ck = ex::Checkpoint::open(&path).map_err(export_err)?;
            Ok(ex::build(&ck, &sizes.options()).map_err(export_err)?.summary)
        })?;
        let dict = to_py(py, &summary)?;
        dict.bind(py).cast::<PyDict>()?.set_item("path", path.display().to_string())?;
        return Ok(dict);
    }
    if sizes.given() {
        return Err(value_err(format!(
            "{}: shape options apply to a checkpoint folder, not to an exported file",
            path.display()
        )));
    }
    let session = detached(py, || Session::load(&path).map_err(runtime_err))?;
    let d = match session.metadata(rt::metadata::SUMMARY) {
        Some(json) => {
            let s: ex::Summary = serde_json::from_str(json)
                .map_err(|e| value_err(format!("{}: unreadable perceiver-edge summary: {e}", path.display())))?;
            to_py(py, &s)?
        }
        None => {
            // Not exported by perceiver-edge: the I/O specs in the summary's form.
            let io = |v: &[IoSpec]| -> Vec<(String, String, Vec<usize>)> {
                v.iter().map(|s| (s.name.clone(), dtype_name(s.dtype), s.shape.clone())).collect()
            };
            let m = PyDict::new(py);
            m.set_item("inputs", io(session.inputs()))?;
            m.set_item("outputs", io(session.outputs()))?;
            m.into_any().unbind()
        }
    };
    let dict = d.bind(py).cast::<PyDict>()?;
    dict.set_item("path", path.display().to_string())?;
    dict.set_item("file_bytes", std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0))?;
    dict.set_item("precision", session.metadata(rt::metadata::PRECISION).unwrap_or("f32"))?;
    let resident = session.resident_weights();
    let by_kind = PyDict::new(py);
    for (kind, bytes) in &resident {
        by_kind.set_item(kind, bytes)?;
    }
    dict.set_item("resident_weights", by_kind)?;
    dict.set_item("resident_weight_bytes", resident.iter().map(|(_, b)| b).sum::<usize>())?;
    dict.set_item("summary_stored", session.metadata(rt::metadata::SUMMARY).is_some())?;
    Ok(d)
}

/// Compares a candidate graph (e.g. quantised) with a reference graph of the same model on
/// `inputs` (a `.npy` stack along axis 0 or a folder of `.npy` files), like
/// `perceiver-edge compare --json`: output errors, top-1 agreement, accuracy with `labels`
/// (int64/int32 `.npy`), and with `layers` the per-layer error table.
#[pyfunction]
#[pyo3(name = "compare", signature = (reference, candidate, inputs, labels = None, *, layers = true))]
fn py_compare(
    py: Python<'_>,
    reference: PathBuf,
    candidate: PathBuf,
    inputs: PathBuf,
    labels: Option<PathBuf>,
    layers: bool,
) -> PyResult<Py<PyAny>> {
    for p in [&reference, &candidate, &inputs].into_iter().chain(labels.as_ref()) {
        existing(p)?;
    }
    let report = detached(py, || {
        let specs = Session::load(&reference).map_err(runtime_err)?.inputs().to_vec();
        let sets = rt::dataset::load_inputs(&inputs, &specs).map_err(runtime_err)?;
        let labels: Option<Vec<i64>> = match &labels {
            None => None,
            Some(p) => {
                let t = rt::npy::read_npy(p).map_err(runtime_err)?;
                let v = rt::to_vec::<i64>(&t)
                    .or_else(|| rt::to_vec::<i32>(&t).map(|v| v.into_iter().map(i64::from).collect()))
                    .ok_or_else(|| value_err(format!("{}: labels must be int64 or int32", p.display())))?;
                Some(v)
            }
        };
        rt::compare::compare(&reference, &candidate, &sets, labels.as_deref(), layers).map_err(runtime_err)
    })?;
    to_py(py, &report)
}

/// Sets the number of threads tract's matrix products use in this process (1 = single-threaded,
/// the default).
#[pyfunction]
fn set_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(value_err("threads must be positive"));
    }
    guarded(|| rt::set_threads(n).map(|_| ()).map_err(runtime_err))?;
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// perceiver-edge: export PerceiverIO checkpoints to fixed-shape ONNX and run them with the
/// tract-based engine, numpy arrays in and out. `Model.load(path)` then
/// `model.run({"name": array})`; `export`, `inspect`, `compare` mirror the CLI.
#[pymodule]
#[pyo3(name = "perceiver_edge")]
fn perceiver_edge_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_class::<TensorSpec>()?;
    m.add_function(wrap_pyfunction!(py_export, m)?)?;
    m.add_function(wrap_pyfunction!(py_inspect, m)?)?;
    m.add_function(wrap_pyfunction!(py_compare, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    let all = PyList::new(
        m.py(),
        ["Model", "TensorSpec", "export", "inspect", "compare", "set_threads", "__version__"]
            .map(|s| PyString::new(m.py(), s)),
    )?;
    m.add("__all__", all)?;
    Ok(())
}
