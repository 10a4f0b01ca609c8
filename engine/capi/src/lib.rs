//! C API of the perceiver-edge runtime (`libperceiver_edge.a` / `libperceiver_edge.so`, header
//! `include/perceiver_edge.h`, generated from this file by cbindgen in build.rs).
//!
//! A model is an opaque `pe_model*`: load it from a file or a memory buffer (parsed, typed and
//! optimised once), query its inputs and outputs (name, dtype, rank, shape, byte size), run it on
//! caller-owned input and output buffers, free it. Every function returns a [`pe_status`] and,
//! on failure, leaves a one-line message for [`pe_last_error`] (thread-local). No function
//! unwinds or aborts across the FFI boundary: each body runs under `catch_unwind`, and a panic
//! becomes [`pe_status::PE_PANIC`].
//!
//! Handles are checked before they are dereferenced: live handles are kept in a registry, so a
//! NULL, freed or foreign pointer gives [`pe_status::PE_INVALID_HANDLE`] rather than a crash (use
//! after free stays undefined in the contract: a newer model may reuse a freed address). A
//! handle's run state is behind a lock taken with `try_lock`, so two threads running one handle
//! at once get [`pe_status::PE_BUSY`] instead of a data race.
#![allow(non_camel_case_types)]
#![deny(missing_docs, unsafe_op_in_unsafe_fn)]

use perceiver_edge_runtime::{dtype_name, DatumType, Error, IoSpec, Session, Tensor};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;
use std::sync::{Mutex, MutexGuard, TryLockError};

/// Large buffers in memory maps of their own, as in the CLI: huge pages while loading, and the
/// pages of run-time buffers of 32 MiB or more kept from run to run instead of faulted in again
/// at every run (they go back to the system with `pe_model_free`). A refused allocation aborts,
/// as with the system allocator.
#[global_allocator]
static ALLOC: perceiver_edge_runtime::alloc::Mapped = perceiver_edge_runtime::alloc::Mapped;

/// Status code returned by every `pe_*` function that can fail. On anything but `PE_OK`,
/// `pe_last_error()` gives a one-line message naming the function and the argument at fault.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pe_status {
    /// Success.
    PE_OK = 0,
    /// A required pointer argument (handle, buffer, out-parameter) is NULL.
    PE_NULL_ARGUMENT = 1,
    /// An argument is out of range: index, count, thread number, token id, bool byte.
    PE_INVALID_ARGUMENT = 2,
    /// A buffer's byte length does not match the model's input or output, or a shape array is
    /// too small for the rank.
    PE_BUFFER_SIZE = 3,
    /// A buffer's declared `pe_dtype` differs from the model's.
    PE_DTYPE = 4,
    /// The model could not be read, parsed or optimised.
    PE_LOAD = 5,
    /// Inference failed.
    PE_RUN = 6,
    /// The handle is not a live `pe_model` (already freed, or never returned by a load function).
    PE_INVALID_HANDLE = 7,
    /// Another thread is running or freeing this handle right now.
    PE_BUSY = 8,
    /// An internal error (a Rust panic) was caught; the handle stays usable.
    PE_PANIC = 9,
}

/// Element type of a model input or output.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum pe_dtype {
    /// A type this API cannot pass (such a model loads and can be queried, but not run).
    PE_DTYPE_UNKNOWN = 0,
    /// 32-bit float (`float`).
    PE_DTYPE_F32 = 1,
    /// 16-bit IEEE half float (raw `uint16_t` bits).
    PE_DTYPE_F16 = 2,
    /// 64-bit float (`double`).
    PE_DTYPE_F64 = 3,
    /// `int8_t`.
    PE_DTYPE_I8 = 4,
    /// `int16_t`.
    PE_DTYPE_I16 = 5,
    /// `int32_t`.
    PE_DTYPE_I32 = 6,
    /// `int64_t` (token ids, indices, masks in exported PerceiverIO graphs).
    PE_DTYPE_I64 = 7,
    /// `uint8_t`.
    PE_DTYPE_U8 = 8,
    /// `uint16_t`.
    PE_DTYPE_U16 = 9,
    /// `uint32_t`.
    PE_DTYPE_U32 = 10,
    /// `uint64_t`.
    PE_DTYPE_U64 = 11,
    /// One byte per element, 0 or 1.
    PE_DTYPE_BOOL = 12,
}

impl pe_dtype {
    fn of(dt: DatumType) -> pe_dtype {
        match dt {
            DatumType::F32 => pe_dtype::PE_DTYPE_F32,
            DatumType::F16 => pe_dtype::PE_DTYPE_F16,
            DatumType::F64 => pe_dtype::PE_DTYPE_F64,
            DatumType::I8 => pe_dtype::PE_DTYPE_I8,
            DatumType::I16 => pe_dtype::PE_DTYPE_I16,
            DatumType::I32 => pe_dtype::PE_DTYPE_I32,
            DatumType::I64 => pe_dtype::PE_DTYPE_I64,
            DatumType::U8 => pe_dtype::PE_DTYPE_U8,
            DatumType::U16 => pe_dtype::PE_DTYPE_U16,
            DatumType::U32 => pe_dtype::PE_DTYPE_U32,
            DatumType::U64 => pe_dtype::PE_DTYPE_U64,
            DatumType::Bool => pe_dtype::PE_DTYPE_BOOL,
            _ => pe_dtype::PE_DTYPE_UNKNOWN,
        }
    }

    /// Reads a value written by C code, where any integer may arrive.
    fn from_raw(v: c_int) -> Option<pe_dtype> {
        use pe_dtype::*;
        [
            PE_DTYPE_UNKNOWN,
            PE_DTYPE_F32,
            PE_DTYPE_F16,
            PE_DTYPE_F64,
            PE_DTYPE_I8,
            PE_DTYPE_I16,
            PE_DTYPE_I32,
            PE_DTYPE_I64,
            PE_DTYPE_U8,
            PE_DTYPE_U16,
            PE_DTYPE_U32,
            PE_DTYPE_U64,
            PE_DTYPE_BOOL,
        ]
        .into_iter()
        .find(|d| *d as c_int == v)
    }
}

/// One input buffer of `pe_model_run`, owned by the caller (read during the call only).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pe_input {
    /// The elements, row-major (C order), native byte order.
    pub data: *const c_void,
    /// Size of `data` in bytes; must equal `pe_model_input_byte_size`.
    pub byte_len: usize,
    /// Element type of `data`; must equal `pe_model_input_dtype`.
    pub dtype: pe_dtype,
}

/// One output buffer of `pe_model_run`, owned by the caller (written on success only).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct pe_output {
    /// Where the elements are written, row-major (C order), native byte order.
    pub data: *mut c_void,
    /// Size of `data` in bytes; must equal `pe_model_output_byte_size`.
    pub byte_len: usize,
    /// Element type expected in `data`; must equal `pe_model_output_dtype`.
    pub dtype: pe_dtype,
}

// What the library reads from the caller's arrays: the same layout with the dtype as a plain
// int, since C may store any integer in an enum field and an out-of-range Rust enum is undefined.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawBuffer {
    data: *const c_void,
    byte_len: usize,
    dtype: c_int,
}
const _: () = assert!(std::mem::size_of::<pe_dtype>() == std::mem::size_of::<c_int>());
const _: () = assert!(std::mem::size_of::<pe_input>() == std::mem::size_of::<RawBuffer>());
const _: () = assert!(std::mem::size_of::<pe_output>() == std::mem::size_of::<RawBuffer>());
const _: () = assert!(std::mem::align_of::<pe_input>() == std::mem::align_of::<RawBuffer>());
const _: () = assert!(std::mem::align_of::<pe_output>() == std::mem::align_of::<RawBuffer>());

/// One input or output of a loaded model, with what the C side asks for ready.
struct Io {
    spec: IoSpec,
    name: CString,
    dtype: pe_dtype,
    bytes: usize,
}

impl Io {
    fn new(spec: &IoSpec) -> Io {
        // ONNX names hold no NUL; should one appear, the C name stops there.
        let cut = spec.name.split('\0').next().unwrap_or("");
        Io {
            name: CString::new(cut).unwrap_or_default(),
            dtype: pe_dtype::of(spec.dtype),
            bytes: spec.shape.iter().product::<usize>() * spec.dtype.size_of(),
            spec: spec.clone(),
        }
    }

    fn describe(&self) -> String {
        format!("`{}` ({} {:?}, {} bytes)", self.spec.name, dtype_name(self.spec.dtype), self.spec.shape, self.bytes)
    }
}

const MAGIC: u64 = u64::from_le_bytes(*b"pe_model");

/// A loaded, optimised model (opaque). Create with `pe_model_load` or
/// `pe_model_load_from_memory`, release with `pe_model_free`. Use one handle from one thread at
/// a time; distinct handles are independent and may run in parallel on different threads.
pub struct pe_model {
    magic: u64,
    session: Mutex<Session>,
    inputs: Vec<Io>,
    outputs: Vec<Io>,
}

// A handle may be created on one thread and used on another.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<Session>();
};

/// Addresses of the live handles. Every entry point checks its handle here before touching it,
/// under this lock, so a freed or foreign pointer is reported, never dereferenced.
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<usize>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// A failed call: its status and what went wrong (without the function name).
struct Failure {
    status: pe_status,
    msg: String,
}

type Res<T = ()> = Result<T, Failure>;

fn failure(status: pe_status, msg: impl Into<String>) -> Failure {
    Failure { status, msg: msg.into() }
}

fn null_arg(name: &str) -> Failure {
    failure(pe_status::PE_NULL_ARGUMENT, format!("`{name}` is NULL"))
}

fn from_runtime(e: Error) -> Failure {
    let status = match e {
        Error::Load { .. } => pe_status::PE_LOAD,
        Error::Input { .. } | Error::Setting(_) => pe_status::PE_INVALID_ARGUMENT,
        Error::Npy { .. } | Error::Run(_) => pe_status::PE_RUN,
    };
    failure(status, e.to_string())
}

fn set_last_error(msg: &str) {
    // One line, no NUL: the C side prints it as is.
    let line: String =
        msg.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).filter(|c| *c != '\0').collect();
    let _ = LAST_ERROR.try_with(|e| {
        let mut e = e.borrow_mut();
        if !(line.is_empty() && e.as_bytes().is_empty()) {
            *e = CString::new(line).unwrap_or_default();
        }
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs the body of entry point `func`: catches panics, records the message, returns the status.
fn guard(func: &str, body: impl FnOnce() -> Res) -> pe_status {
    let (status, msg) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (pe_status::PE_OK, String::new()),
        Ok(Err(f)) => (f.status, format!("{func}: {}", f.msg)),
        Err(payload) => (pe_status::PE_PANIC, format!("{func}: internal error: {}", panic_message(&*payload))),
    };
    // Formatting the message cannot unwind out of here: a panic while recording it is dropped.
    let _ = catch_unwind(|| set_last_error(&msg));
    status
}

/// The out-parameter `out` (argument `name`), or PE_NULL_ARGUMENT if it is NULL.
fn out_param<T>(out: *mut T, name: &str) -> Res<*mut T> {
    if out.is_null() {
        Err(null_arg(name))
    } else {
        Ok(out)
    }
}

/// Checks `model` against the registry and runs `f` on it while the registry is locked (so it
/// cannot be freed meanwhile).
fn with_model<T>(model: *const pe_model, f: impl FnOnce(&pe_model) -> Res<T>) -> Res<T> {
    if model.is_null() {
        return Err(null_arg("model"));
    }
    let registry = live();
    let m = checked(&registry, model)?;
    f(m)
}

/// The model behind a registered, intact handle.
fn checked<'a>(registry: &[usize], model: *const pe_model) -> Res<&'a pe_model> {
    let invalid =
        || failure(pe_status::PE_INVALID_HANDLE, "not a live pe_model handle (freed, or not from pe_model_load*)");
    if !registry.contains(&(model as usize)) {
        return Err(invalid());
    }
    // SAFETY: registered handles point to live `pe_model`s (only pe_model_free unregisters and
    // frees, under the same lock).
    let m = unsafe { &*model };
    if m.magic != MAGIC {
        return Err(invalid());
    }
    Ok(m)
}

fn register(session: Session) -> *mut pe_model {
    let model = Box::new(pe_model {
        magic: MAGIC,
        inputs: session.inputs().iter().map(Io::new).collect(),
        outputs: session.outputs().iter().map(Io::new).collect(),
        session: Mutex::new(session),
    });
    let ptr = Box::into_raw(model);
    live().push(ptr as usize);
    ptr
}

/// Loads an ONNX model exported by `perceiver-edge export` from a file, and fixes, types and
/// optimises it once. On success `*out` is a new handle (free it with `pe_model_free`); on
/// failure `*out` is NULL and the status is `PE_LOAD` (unreadable file, not ONNX, symbolic
/// shapes) or `PE_NULL_ARGUMENT`. A model with ONNX external data (`export --external-data`)
/// reads it from the side file in the model's folder, checked and confined to that folder.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or points to writable storage for a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn pe_model_load(path: *const c_char, out: *mut *mut pe_model) -> pe_status {
    guard("pe_model_load", || {
        let out = out_param(out, "out")?;
        // SAFETY: checked non-NULL; the caller provides writable storage.
        unsafe { *out = ptr::null_mut() };
        if path.is_null() {
            return Err(null_arg("path"));
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let path = path_from_c(unsafe { CStr::from_ptr(path) })?;
        let session = Session::load(&path).map_err(from_runtime)?;
        // SAFETY: as above.
        unsafe { *out = register(session) };
        Ok(())
    })
}

#[cfg(unix)]
fn path_from_c(s: &CStr) -> Res<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
}

#[cfg(not(unix))]
fn path_from_c(s: &CStr) -> Res<PathBuf> {
    s.to_str().map(PathBuf::from).map_err(|_| failure(pe_status::PE_INVALID_ARGUMENT, "`path` is not valid UTF-8"))
}

/// Loads an ONNX model from `len` bytes at `data` (a file read into memory, or a model linked
/// into the firmware image). The bytes are parsed during the call and not kept: the caller may
/// free them afterwards. Same results and statuses as `pe_model_load`, except that a model with
/// external data is refused (`PE_LOAD`): it has no folder to read it from.
///
/// # Safety
/// `data` is NULL or points to `len` readable bytes; `out` is NULL or points to writable storage
/// for a pointer.
#[no_mangle]
pub unsafe extern "C" fn pe_model_load_from_memory(
    data: *const c_void,
    len: usize,
    out: *mut *mut pe_model,
) -> pe_status {
    guard("pe_model_load_from_memory", || {
        let out = out_param(out, "out")?;
        // SAFETY: checked non-NULL; the caller provides writable storage.
        unsafe { *out = ptr::null_mut() };
        if data.is_null() {
            return Err(null_arg("data"));
        }
        // SAFETY: non-NULL, `len` readable bytes per the contract.
        let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        let session = Session::from_bytes(bytes).map_err(from_runtime)?;
        // SAFETY: as above.
        unsafe { *out = register(session) };
        Ok(())
    })
}

/// Frees a model and everything it owns (including the name strings it handed out). Freeing
/// NULL does nothing and returns `PE_OK`, like `free`. A handle must not be used after it is
/// freed; doing so is undefined, though this library reports `PE_INVALID_HANDLE` for it as long
/// as no newer model reuses the address. Freeing a handle another thread is running gives
/// `PE_BUSY` and frees nothing.
///
/// # Safety
/// `model` is NULL or a pointer returned by a `pe_model_load*` function.
#[no_mangle]
pub unsafe extern "C" fn pe_model_free(model: *mut pe_model) -> pe_status {
    guard("pe_model_free", || {
        if model.is_null() {
            return Ok(());
        }
        let mut registry = live();
        let m = checked(&registry, model)?;
        match m.session.try_lock() {
            Ok(_) | Err(TryLockError::Poisoned(_)) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(failure(pe_status::PE_BUSY, "the model is running on another thread"))
            }
        }
        registry.retain(|a| *a != model as usize);
        // SAFETY: the handle was registered (so it came from Box::into_raw) and is now
        // unregistered under the lock, so nobody else can reach it.
        unsafe {
            ptr::write_volatile(ptr::addr_of_mut!((*model).magic), 0);
            drop(Box::from_raw(model));
        }
        Ok(())
    })
}

#[derive(Clone, Copy)]
enum Side {
    Input,
    Output,
}

fn io_of(m: &pe_model, side: Side, index: usize) -> Res<&Io> {
    let (list, what) = match side {
        Side::Input => (&m.inputs, "input"),
        Side::Output => (&m.outputs, "output"),
    };
    list.get(index).ok_or_else(|| {
        failure(
            pe_status::PE_INVALID_ARGUMENT,
            format!("{what} index {index} out of range (the model has {})", list.len()),
        )
    })
}

fn count(model: *const pe_model, side: Side, out: *mut usize) -> Res {
    let out = out_param(out, "count")?;
    let n = with_model(model, |m| {
        Ok(match side {
            Side::Input => m.inputs.len(),
            Side::Output => m.outputs.len(),
        })
    })?;
    // SAFETY: checked non-NULL; writable per the contract.
    unsafe { *out = n };
    Ok(())
}

fn query<T>(
    model: *const pe_model,
    side: Side,
    index: usize,
    out: *mut T,
    name: &str,
    f: impl FnOnce(&Io) -> T,
) -> Res {
    let out = out_param(out, name)?;
    let v = with_model(model, |m| Ok(f(io_of(m, side, index)?)))?;
    // SAFETY: checked non-NULL; writable per the contract.
    unsafe { *out = v };
    Ok(())
}

fn shape(model: *const pe_model, side: Side, index: usize, dims: *mut usize, capacity: usize) -> Res {
    with_model(model, |m| {
        let shape = &io_of(m, side, index)?.spec.shape;
        if shape.is_empty() {
            return Ok(());
        }
        if dims.is_null() {
            return Err(null_arg("dims"));
        }
        if capacity < shape.len() {
            return Err(failure(
                pe_status::PE_BUFFER_SIZE,
                format!("`dims` holds {capacity} value(s), the rank is {}", shape.len()),
            ));
        }
        // SAFETY: `dims` holds `capacity >= shape.len()` writable values per the contract.
        unsafe { ptr::copy_nonoverlapping(shape.as_ptr(), dims, shape.len()) };
        Ok(())
    })
}

/// Number of inputs the model takes (`pe_model_run`'s `n_inputs`).
///
/// # Safety
/// `model` is NULL or a handle; `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_input_count(model: *const pe_model, count: *mut usize) -> pe_status {
    guard("pe_model_input_count", || self::count(model, Side::Input, count))
}

/// Number of outputs the model produces (`pe_model_run`'s `n_outputs`).
///
/// # Safety
/// `model` is NULL or a handle; `count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_output_count(model: *const pe_model, count: *mut usize) -> pe_status {
    guard("pe_model_output_count", || self::count(model, Side::Output, count))
}

/// Name of input `index` (the ONNX graph input name, e.g. `pixel_values`). The string belongs to
/// the model and stays valid until `pe_model_free`.
///
/// # Safety
/// `model` is NULL or a handle; `name` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_input_name(
    model: *const pe_model,
    index: usize,
    name: *mut *const c_char,
) -> pe_status {
    guard("pe_model_input_name", || query(model, Side::Input, index, name, "name", |io| io.name.as_ptr()))
}

/// Name of output `index` (the ONNX graph output name, e.g. `logits`). The string belongs to the
/// model and stays valid until `pe_model_free`.
///
/// # Safety
/// `model` is NULL or a handle; `name` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_output_name(
    model: *const pe_model,
    index: usize,
    name: *mut *const c_char,
) -> pe_status {
    guard("pe_model_output_name", || query(model, Side::Output, index, name, "name", |io| io.name.as_ptr()))
}

/// Element type of input `index`.
///
/// # Safety
/// `model` is NULL or a handle; `dtype` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_input_dtype(model: *const pe_model, index: usize, dtype: *mut pe_dtype) -> pe_status {
    guard("pe_model_input_dtype", || query(model, Side::Input, index, dtype, "dtype", |io| io.dtype))
}

/// Element type of output `index`.
///
/// # Safety
/// `model` is NULL or a handle; `dtype` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_output_dtype(
    model: *const pe_model,
    index: usize,
    dtype: *mut pe_dtype,
) -> pe_status {
    guard("pe_model_output_dtype", || query(model, Side::Output, index, dtype, "dtype", |io| io.dtype))
}

/// Rank (number of dimensions) of input `index`.
///
/// # Safety
/// `model` is NULL or a handle; `rank` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_input_rank(model: *const pe_model, index: usize, rank: *mut usize) -> pe_status {
    guard("pe_model_input_rank", || query(model, Side::Input, index, rank, "rank", |io| io.spec.shape.len()))
}

/// Rank (number of dimensions) of output `index`.
///
/// # Safety
/// `model` is NULL or a handle; `rank` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_output_rank(model: *const pe_model, index: usize, rank: *mut usize) -> pe_status {
    guard("pe_model_output_rank", || query(model, Side::Output, index, rank, "rank", |io| io.spec.shape.len()))
}

/// Writes the fixed shape of input `index` to `dims[0 .. rank)`. `PE_BUFFER_SIZE` if `capacity`
/// (the number of `size_t` values `dims` holds) is below the rank; `dims` may be NULL for rank 0.
///
/// # Safety
/// `model` is NULL or a handle; `dims` is NULL or holds `capacity` writable values.
#[no_mangle]
pub unsafe extern "C" fn pe_model_input_shape(
    model: *const pe_model,
    index: usize,
    dims: *mut usize,
    capacity: usize,
) -> pe_status {
    guard("pe_model_input_shape", || shape(model, Side::Input, index, dims, capacity))
}

/// Writes the fixed shape of output `index` to `dims[0 .. rank)`. `PE_BUFFER_SIZE` if `capacity`
/// (the number of `size_t` values `dims` holds) is below the rank; `dims` may be NULL for rank 0.
///
/// # Safety
/// `model` is NULL or a handle; `dims` is NULL or holds `capacity` writable values.
#[no_mangle]
pub unsafe extern "C" fn pe_model_output_shape(
    model: *const pe_model,
    index: usize,
    dims: *mut usize,
    capacity: usize,
) -> pe_status {
    guard("pe_model_output_shape", || shape(model, Side::Output, index, dims, capacity))
}

/// Size in bytes of input `index` (elements x element size): the `byte_len` `pe_model_run`
/// requires.
///
/// # Safety
/// `model` is NULL or a handle; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_input_byte_size(
    model: *const pe_model,
    index: usize,
    bytes: *mut usize,
) -> pe_status {
    guard("pe_model_input_byte_size", || query(model, Side::Input, index, bytes, "bytes", |io| io.bytes))
}

/// Size in bytes of output `index` (elements x element size): the `byte_len` `pe_model_run`
/// requires.
///
/// # Safety
/// `model` is NULL or a handle; `bytes` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pe_model_output_byte_size(
    model: *const pe_model,
    index: usize,
    bytes: *mut usize,
) -> pe_status {
    guard("pe_model_output_byte_size", || query(model, Side::Output, index, bytes, "bytes", |io| io.bytes))
}

/// Checks one caller buffer against the model's input or output `i`.
fn check_buffer(b: &RawBuffer, io: &Io, what: &str, i: usize) -> Res {
    let at = || format!("{what} {i} {}", io.describe());
    if b.data.is_null() && io.bytes > 0 {
        return Err(failure(pe_status::PE_NULL_ARGUMENT, format!("{}: `data` is NULL", at())));
    }
    match pe_dtype::from_raw(b.dtype) {
        None => return Err(failure(pe_status::PE_DTYPE, format!("{}: unknown pe_dtype value {}", at(), b.dtype))),
        Some(d) if d != io.dtype || d == pe_dtype::PE_DTYPE_UNKNOWN => {
            return Err(failure(
                pe_status::PE_DTYPE,
                format!("{}: buffer dtype {d:?}, the model's is {:?}", at(), io.dtype),
            ))
        }
        Some(_) => {}
    }
    if b.byte_len != io.bytes {
        return Err(failure(
            pe_status::PE_BUFFER_SIZE,
            format!("{}: buffer is {} bytes, expected {}", at(), b.byte_len, io.bytes),
        ));
    }
    Ok(())
}

/// Bytes of a bool buffer must be 0 or 1 (any other value is not a valid Rust `bool`).
fn check_bools(bytes: &[u8], io: &Io, i: usize) -> Res {
    match bytes.iter().position(|b| *b > 1) {
        None => Ok(()),
        Some(at) => Err(failure(
            pe_status::PE_INVALID_ARGUMENT,
            format!("input {i} `{}`: bool byte {} at flat index {at} (must be 0 or 1)", io.spec.name, bytes[at]),
        )),
    }
}

/// Runs the model once. `inputs` holds `n_inputs` buffers in graph-input order (see
/// `pe_model_input_*`), `outputs` holds `n_outputs` buffers in graph-output order; the caller
/// owns all of them, so a loop allocates nothing on its side. Every buffer's `dtype` and
/// `byte_len` must equal the model's (`PE_DTYPE`, `PE_BUFFER_SIZE`), and integer inputs with a
/// declared range (token ids, indices) are range-checked (`PE_INVALID_ARGUMENT`); all checks
/// happen before running. The outputs are written only on success. Inputs are copied before
/// the run, so input and output buffers may overlap.
///
/// A handle runs on one thread at a time: a second thread calling this on the same handle
/// meanwhile gets `PE_BUSY`.
///
/// # Safety
/// `model` is NULL or a handle; `inputs` is NULL or holds `n_inputs` `pe_input`s whose `data`
/// point to `byte_len` readable bytes; `outputs` is NULL or holds `n_outputs` `pe_output`s whose
/// `data` point to `byte_len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn pe_model_run(
    model: *mut pe_model,
    inputs: *const pe_input,
    n_inputs: usize,
    outputs: *mut pe_output,
    n_outputs: usize,
) -> pe_status {
    guard("pe_model_run", || {
        if model.is_null() {
            return Err(null_arg("model"));
        }
        // Take the run lock while the registry is held, so the handle cannot be freed under us.
        let (m, mut session) = {
            let registry = live();
            let m = checked(&registry, model)?;
            let session = match m.session.try_lock() {
                Ok(s) => s,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    return Err(failure(pe_status::PE_BUSY, "the model is running on another thread"))
                }
            };
            (m, session)
        };
        let names = |list: &[Io]| list.iter().map(|io| io.spec.name.as_str()).collect::<Vec<_>>().join(", ");
        if n_inputs != m.inputs.len() {
            return Err(failure(
                pe_status::PE_INVALID_ARGUMENT,
                format!("got {n_inputs} input(s), the model takes {} ({})", m.inputs.len(), names(&m.inputs)),
            ));
        }
        if n_outputs != m.outputs.len() {
            return Err(failure(
                pe_status::PE_INVALID_ARGUMENT,
                format!("got {n_outputs} output(s), the model produces {} ({})", m.outputs.len(), names(&m.outputs)),
            ));
        }
        if inputs.is_null() && n_inputs > 0 {
            return Err(null_arg("inputs"));
        }
        if outputs.is_null() && n_outputs > 0 {
            return Err(null_arg("outputs"));
        }
        // SAFETY (both reads): the arrays hold n_inputs / n_outputs elements per the contract;
        // RawBuffer has their layout with the dtype read as a plain int.
        let raw_in: Vec<RawBuffer> =
            (0..n_inputs).map(|i| unsafe { inputs.cast::<RawBuffer>().add(i).read() }).collect();
        let raw_out: Vec<RawBuffer> =
            (0..n_outputs).map(|i| unsafe { outputs.cast_const().cast::<RawBuffer>().add(i).read() }).collect();
        for (i, (b, io)) in raw_in.iter().zip(&m.inputs).enumerate() {
            check_buffer(b, io, "input", i)?;
        }
        for (i, (b, io)) in raw_out.iter().zip(&m.outputs).enumerate() {
            check_buffer(b, io, "output", i)?;
        }
        let mut tensors = Vec::with_capacity(n_inputs);
        for (i, (b, io)) in raw_in.iter().zip(&m.inputs).enumerate() {
            let bytes: &[u8] = if io.bytes == 0 {
                &[]
            } else {
                // SAFETY: non-NULL and `byte_len == io.bytes` readable bytes per the contract.
                unsafe { std::slice::from_raw_parts(b.data.cast::<u8>(), io.bytes) }
            };
            if io.dtype == pe_dtype::PE_DTYPE_BOOL {
                check_bools(bytes, io, i)?;
            }
            // SAFETY: the byte count matches dtype x shape (checked), bool bytes are 0 / 1, and
            // every other supported dtype accepts any bit pattern.
            let t = unsafe { Tensor::from_raw_dt(io.spec.dtype, &io.spec.shape, bytes) }
                .map_err(|e| failure(pe_status::PE_RUN, format!("input {i}: {e}")))?;
            tensors.push(t);
        }
        let results = session.run(tensors).map_err(from_runtime)?;
        drop(session);
        if results.len() != m.outputs.len() {
            return Err(failure(pe_status::PE_RUN, format!("the model returned {} output(s)", results.len())));
        }
        let mut views = Vec::with_capacity(results.len());
        for (i, (t, io)) in results.iter().zip(&m.outputs).enumerate() {
            let bytes = t
                .try_as_plain_ram()
                .ok()
                .map(|v| v.as_bytes())
                .filter(|b| {
                    t.datum_type() == io.spec.dtype && t.shape() == io.spec.shape.as_slice() && b.len() == io.bytes
                })
                .ok_or_else(|| {
                    failure(
                        pe_status::PE_RUN,
                        format!(
                            "output {i} `{}`: the model produced {} {:?}, expected {}",
                            io.spec.name,
                            dtype_name(t.datum_type()),
                            t.shape(),
                            io.describe()
                        ),
                    )
                })?;
            views.push(bytes);
        }
        for (bytes, b) in views.iter().zip(&raw_out) {
            if !bytes.is_empty() {
                // SAFETY: `data` holds `byte_len == bytes.len()` writable bytes per the contract.
                unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), b.data.cast_mut().cast::<u8>(), bytes.len()) };
            }
        }
        Ok(())
    })
}

/// Sets the number of threads the matrix products use, for every model in the process (1, the
/// default, runs each model on its caller's thread). Call it before running, not while another
/// thread runs a model. `PE_INVALID_ARGUMENT` for 0, or for more than 1 in a build without the
/// runtime's `threads` feature.
#[no_mangle]
pub extern "C" fn pe_set_threads(n: usize) -> pe_status {
    guard("pe_set_threads", || {
        if n == 0 {
            return Err(failure(pe_status::PE_INVALID_ARGUMENT, "thread count 0 (use 1 or more)"));
        }
        perceiver_edge_runtime::set_threads(n)
            .map(|_| ())
            .map_err(|e| failure(pe_status::PE_INVALID_ARGUMENT, e.to_string()))
    })
}

/// The message of the last failed `pe_*` call on this thread (one line, NUL-terminated, naming
/// the function, e.g. `pe_model_run: input 0 ...: buffer is 12 bytes, expected 768`), or `""`
/// if the last call succeeded. The string belongs to the library and stays valid until the next
/// `pe_*` call on the same thread; copy it to keep it. Never NULL.
#[no_mangle]
pub extern "C" fn pe_last_error() -> *const c_char {
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// Name of a status code (`"PE_OK"`, `"PE_BUFFER_SIZE"`, ...), `"PE_UNKNOWN"` for any other
/// value. Static string; never NULL.
#[no_mangle]
pub extern "C" fn pe_status_name(status: c_int) -> *const c_char {
    let name = match status {
        0 => c"PE_OK",
        1 => c"PE_NULL_ARGUMENT",
        2 => c"PE_INVALID_ARGUMENT",
        3 => c"PE_BUFFER_SIZE",
        4 => c"PE_DTYPE",
        5 => c"PE_LOAD",
        6 => c"PE_RUN",
        7 => c"PE_INVALID_HANDLE",
        8 => c"PE_BUSY",
        9 => c"PE_PANIC",
        _ => c"PE_UNKNOWN",
    };
    name.as_ptr()
}

const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(v) => v,
    Err(_) => panic!("version string"),
};

/// Version of the library (the crate version, e.g. `"0.1.0"`). Static string; never NULL.
#[no_mangle]
pub extern "C" fn pe_version() -> *const c_char {
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_pe_panic_with_a_one_line_message() {
        let status = guard("pe_test", || panic!("boom\nsecond line"));
        assert_eq!(status, pe_status::PE_PANIC);
        let msg = unsafe { CStr::from_ptr(pe_last_error()) }.to_str().unwrap().to_string();
        assert_eq!(msg, "pe_test: internal error: boom second line");
        assert_eq!(guard("pe_test", || Ok(())), pe_status::PE_OK);
        assert_eq!(unsafe { CStr::from_ptr(pe_last_error()) }.to_bytes(), b"");
    }

    #[test]
    fn dtype_values_round_trip_and_unknown_ints_are_rejected() {
        for v in 0..=12 {
            assert_eq!(pe_dtype::from_raw(v).map(|d| d as c_int), Some(v));
        }
        assert_eq!(pe_dtype::from_raw(13), None);
        assert_eq!(pe_dtype::from_raw(-1), None);
        assert_eq!(pe_dtype::of(DatumType::F32), pe_dtype::PE_DTYPE_F32);
        assert_eq!(pe_dtype::of(DatumType::I64), pe_dtype::PE_DTYPE_I64);
        assert_eq!(pe_dtype::of(DatumType::TDim), pe_dtype::PE_DTYPE_UNKNOWN);
    }

    #[test]
    fn bool_bytes_other_than_0_and_1_are_rejected() {
        let io = Io::new(&IoSpec { name: "mask".into(), dtype: DatumType::Bool, shape: vec![4] });
        assert!(check_bools(&[0, 1, 1, 0], &io, 0).is_ok());
        let f = check_bools(&[0, 1, 2, 0], &io, 3).unwrap_err();
        assert_eq!(f.status, pe_status::PE_INVALID_ARGUMENT);
        assert_eq!(f.msg, "input 3 `mask`: bool byte 2 at flat index 2 (must be 0 or 1)");
    }

    #[test]
    fn status_names_match_the_enum() {
        for (s, n) in [(pe_status::PE_OK, "PE_OK"), (pe_status::PE_BUSY, "PE_BUSY"), (pe_status::PE_PANIC, "PE_PANIC")]
        {
            assert_eq!(unsafe { CStr::from_ptr(pe_status_name(s as c_int)) }.to_str().unwrap(), n);
        }
        assert_eq!(unsafe { CStr::from_ptr(pe_status_name(42)) }.to_str().unwrap(), "PE_UNKNOWN");
        assert_eq!(unsafe { CStr::from_ptr(pe_version()) }.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    /// A run or free while another thread holds the run lock gives PE_BUSY, deterministically.
    #[test]
    fn busy_handle_is_reported_not_raced() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let exported =
            perceiver_edge_export::export(&root.join("models/digits"), &Default::default()).expect("export digits");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digits.onnx");
        exported.write(&path).unwrap();
        let c_path = CString::new(path.to_str().unwrap()).unwrap();
        let mut model = ptr::null_mut();
        assert_eq!(unsafe { pe_model_load(c_path.as_ptr(), &mut model) }, pe_status::PE_OK);
        let x = vec![0f32; 3 * 8 * 8];
        let mut y = vec![0f32; 10];
        let input = pe_input { data: x.as_ptr().cast(), byte_len: 768, dtype: pe_dtype::PE_DTYPE_F32 };
        let mut output = pe_output { data: y.as_mut_ptr().cast(), byte_len: 40, dtype: pe_dtype::PE_DTYPE_F32 };
        {
            let _held = unsafe { &*model }.session.lock().unwrap();
            assert_eq!(unsafe { pe_model_run(model, &input, 1, &mut output, 1) }, pe_status::PE_BUSY);
            assert_eq!(unsafe { pe_model_free(model) }, pe_status::PE_BUSY);
        }
        assert_eq!(unsafe { pe_model_run(model, &input, 1, &mut output, 1) }, pe_status::PE_OK);
        assert_eq!(unsafe { pe_model_free(model) }, pe_status::PE_OK);
    }
}
