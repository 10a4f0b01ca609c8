//! Fuzz target bodies for perceiver-edge (issue #13, "hostile input"): one function per input
//! format, each `fn(data: &[u8])`, that feeds arbitrary bytes to the library the way the CLI
//! would. A body never panics and never allocates absurd amounts for any input; where the
//! library refuses the input, the body also checks that the error message is one line.
//!
//! | body                  | input                                   | code under test                                  |
//! |-----------------------|-----------------------------------------|--------------------------------------------------|
//! | [`export_checkpoint`] | option flags, config.json, safetensors  | `export`, int8 / q4 `quantize`, `pack::build`     |
//! | [`npy_inputs`]        | a `.npy` file                           | `npy::read_npy`, `dataset::load_inputs`           |
//! | [`onnx_load_run`]     | an ONNX model                           | `Session::from_bytes`, `Session::load`, `run`     |
//! | [`board_profile`]     | a board TOML                            | `profile::Profile::parse`                         |
//! | [`pack_reader`]       | a weight pack                           | the cortex-m firmware's reader (host build)       |
//!
//! The cargo-fuzz project in `fuzz/` (libFuzzer, nightly) calls these; `tests/smoke.rs` feeds
//! them the committed seed corpus (`fuzz/corpus/<name>/`) and deterministic mutations of it on
//! stable, as part of the workspace tests.

#![warn(missing_docs)]

pub mod alloc_cap;
pub mod cortex_m;

use perceiver_edge_export::{options_for_precision, pack, Checkpoint, ExportOptions, Precision, QuantOptions};
use perceiver_edge_runtime::profile::Profile;
use perceiver_edge_runtime::tract_onnx::prelude::{DatumType, Tensor};
use perceiver_edge_runtime::{dataset, npy, IoSpec, Session};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Names of the targets, as in `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: [&str; 5] = ["export_checkpoint", "npy_inputs", "onnx_load_run", "board_profile", "pack_reader"];

/// The body of target `name` (one of [`TARGETS`]).
pub fn body(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "export_checkpoint" => export_checkpoint,
        "npy_inputs" => npy_inputs,
        "onnx_load_run" => onnx_load_run,
        "board_profile" => board_profile,
        "pack_reader" => pack_reader,
        _ => return None,
    })
}

/// Called once by each cargo-fuzz target before the first input: replaces libFuzzer's panic
/// hook, which aborts on every panic, even one the library catches and turns into an error
/// (`Session` reports a panic inside tract as a one-line error), with one that prints the panic
/// and aborts only on a panic in this repository's code ([`in_this_repository`]): the runtime's
/// rewrites and kernels must refuse a bad graph, not panic. A panic that escapes a body also
/// aborts: libfuzzer-sys catches it and calls `std::process::abort`, and libFuzzer saves the
/// input as a crash.
pub fn fuzz_init() {
    set_limits();
    drop(std::panic::take_hook());
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if info.location().is_some_and(|at| in_this_repository(at.file())) {
            std::process::abort();
        }
    }));
}

/// Sets the library's ceiling on one tensor (`--max-tensor-gib`, 4 GiB by default) to half of
/// [`alloc_cap::CAP`], so that a legitimately large tensor is refused by the limit, not aborted
/// by the cap (a `Pad` to 2 GiB + 4 KiB did, in the smoke test), and an allocation over the cap
/// is one the limits did not see. Called by [`fuzz_init`] and the smoke test.
pub fn set_limits() {
    perceiver_edge_runtime::limits::set_max_tensor_bytes((alloc_cap::CAP / 2) as u64);
}

/// Whether a panic's source file is this repository's code (a path under `engine/` or
/// `firmware-examples/`; dependencies' paths are absolute, under the cargo registry).
pub fn in_this_repository(file: &str) -> bool {
    file.starts_with("engine/") || file.starts_with("firmware-examples/")
}

/// `onnx_load_run` runs a loaded model only if its inputs take at most this many bytes.
pub const MAX_RUN_INPUT_BYTES: usize = 4 << 20;

/// Panics (a fuzz finding) if the error message `msg` of `what` spans several lines.
fn one_line(what: &str, msg: &str) {
    assert!(!msg.contains('\n'), "{what}: error message of several lines: {msg:?}");
    assert!(!msg.is_empty(), "{what}: empty error message");
}

/// A fresh, empty folder (in /dev/shm where it exists), removed with its contents on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let dir =
            base.join(format!("perceiver-edge-fuzz-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: cannot create: {e}", dir.display()));
        Scratch(dir)
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("{}: cannot write: {e}", p.display()));
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Layout of an [`export_checkpoint`] input: a flags byte, then the config.json length as a
/// little-endian u32, the config.json bytes and the rest, model.safetensors. [`split_checkpoint`]
/// reads it back.
pub fn join_checkpoint(flags: u8, config: &[u8], safetensors: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend((config.len() as u32).to_le_bytes());
    v.extend(config);
    v.extend(safetensors);
    v
}

/// The flags, config.json and model.safetensors of an [`export_checkpoint`] input; a config
/// length past the end takes everything.
pub fn split_checkpoint(data: &[u8]) -> (u8, &[u8], &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let rest = data.get(1..).unwrap_or_default();
    let (len, rest) = match rest.split_first_chunk::<4>() {
        Some((n, rest)) => (u32::from_le_bytes(*n) as usize, rest),
        None => (0, &[][..]),
    };
    let (config, safetensors) = rest.split_at(len.min(rest.len()));
    (flags, config, safetensors)
}

/// Export flag bits of an [`export_checkpoint`] input (its first byte).
pub mod flags {
    /// `--seq-len 3` (bare and text models).
    pub const SEQ_LEN: u8 = 1;
    /// `--no-rewrites`.
    pub const NO_REWRITES: u8 = 2;
    /// `--batch 2`.
    pub const BATCH_2: u8 = 4;
    /// Also build the f32 weight pack and read it back with the firmware's reader.
    pub const PACK_F32: u8 = 8;
    /// Also build the int8 weight pack and read it back with the firmware's reader.
    pub const PACK_INT8: u8 = 16;
    /// `--no-position-tables`.
    pub const NO_POSITION_TABLES: u8 = 32;
    /// Also export `--precision int8` and `--precision f16` (weights read back from the
    /// checkpoint as the passes and the conversion reach them, `build_deferred`).
    pub const INT8: u8 = 64;
    /// Also export `--precision q4`.
    pub const Q4: u8 = 128;
}

/// A checkpoint folder: `data` split by [`split_checkpoint`] into config.json and
/// model.safetensors, exported to ONNX (options from the flags byte, see [`flags`]) and, if
/// asked, to weight packs that the cortex-m reader must then accept.
pub fn export_checkpoint(data: &[u8]) {
    let (f, config, safetensors) = split_checkpoint(data);
    let dir = Scratch::new();
    dir.write("config.json", config);
    dir.write("model.safetensors", safetensors);
    let mut opts = ExportOptions::default();
    if f & flags::SEQ_LEN != 0 {
        opts.seq_len = Some(3);
    }
    if f & flags::BATCH_2 != 0 {
        opts.batch = Some(2);
    }
    opts.perf.no_rewrites = f & flags::NO_REWRITES != 0;
    if f & flags::NO_POSITION_TABLES != 0 {
        opts.perf.tables = perceiver_edge_export::options::Tables::None;
    }
    match perceiver_edge_export::export(&dir.0, &opts) {
        Ok(out) => {
            let bytes = out.to_bytes();
            assert!(!bytes.is_empty());
        }
        Err(e) => one_line("export", &e.to_string()),
    }
    for (bit, precision) in [(flags::INT8, Precision::Int8), (flags::INT8, Precision::F16), (flags::Q4, Precision::Q4)]
    {
        if f & bit == 0 {
            continue;
        }
        let quantised = Checkpoint::open(&dir.0).and_then(|ck| {
            let mut e = perceiver_edge_export::build_deferred(&ck, &options_for_precision(&opts, precision))?;
            e.quantize(&QuantOptions { precision, ..Default::default() }, &dir.0, &mut |_, _| {})?;
            Ok(e)
        });
        match quantised {
            Ok(out) => {
                assert!(out.graph.stripped().next().is_none(), "{precision}: a weight left on disk after quantising");
                assert!(!out.to_bytes().is_empty());
            }
            Err(e) => one_line("export --precision", &e.to_string()),
        }
    }
    for (bit, precision) in [(flags::PACK_F32, pack::Precision::F32), (flags::PACK_INT8, pack::Precision::Int8)] {
        if f & bit == 0 {
            continue;
        }
        match pack::export_pack(&dir.0, &opts, precision) {
            Ok(p) => {
                if let Err(e) = cortex_m::read_model(&p.bytes) {
                    panic!("the cortex-m reader refuses an exported {precision:?} pack: {e}");
                }
            }
            Err(e) => one_line("export --format pack", &e.to_string()),
        }
    }
}

/// Graph inputs `load_inputs` is asked to fill from the file: float32 images, int64 ids.
fn npy_specs() -> [Vec<IoSpec>; 2] {
    let spec = |name: &str, dtype, shape: &[usize]| IoSpec { name: name.into(), dtype, shape: shape.to_vec() };
    [
        vec![spec("pixel_values", DatumType::F32, &[1, 3, 2, 2])],
        vec![spec("input_ids", DatumType::I64, &[2, 4]), spec("attention_mask", DatumType::I64, &[2, 4])],
    ]
}

/// A `.npy` file: read as a tensor (`run --input`) and as model inputs (`--calibrate`,
/// `compare --inputs`), alone and as a fixture folder.
pub fn npy_inputs(data: &[u8]) {
    let dir = Scratch::new();
    let file = dir.write("x.npy", data);
    if let Err(e) = npy::read_npy(&file) {
        one_line("read_npy", &e.to_string());
    }
    let folder = Scratch::new();
    folder.write("case.in.pixel_values.npy", data);
    folder.write("case.in.input_ids.npy", data);
    folder.write("case.in.attention_mask.npy", data);
    for specs in npy_specs() {
        for path in [&file, &folder.0] {
            if let Err(e) = dataset::load_inputs(path, &specs) {
                one_line("load_inputs", &e.to_string());
            }
        }
    }
}

/// Synthetic inputs for `s`: zeros, or the low end of an integer input's declared range.
/// `None` if they would take more than [`MAX_RUN_INPUT_BYTES`] or cannot be made.
fn synthetic_inputs(s: &Session) -> Option<Vec<Tensor>> {
    let mut total = 0usize;
    for spec in s.inputs() {
        let n = spec.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        total = total.checked_add(n.checked_mul(spec.dtype.size_of())?)?;
    }
    if total > MAX_RUN_INPUT_BYTES {
        return None;
    }
    s.inputs()
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let t = Tensor::zero_dt(spec.dtype, &spec.shape).ok()?;
            match (spec.dtype, s.input_range(i)) {
                (DatumType::I64, Some((lo, _))) => {
                    let n = t.len();
                    perceiver_edge_runtime::tensor(&spec.shape, &vec![lo; n])
                }
                _ => Some(t),
            }
        })
        .collect()
}

/// An ONNX model: loaded from memory (`Session::from_bytes`, as the C API and Python package
/// can) and from a file, as `run`, `bench` and `inspect` do (the protobuf decoded from the file,
/// its large initializers left there until tract reads them), and, if its inputs are small (at
/// most [`MAX_RUN_INPUT_BYTES`]), run once on synthetic inputs.
pub fn onnx_load_run(data: &[u8]) {
    if let Err(e) = Session::from_bytes(data) {
        one_line("Session::from_bytes", &e.to_string());
    }
    let dir = Scratch::new();
    let mut s = match Session::load(&dir.write("model.onnx", data)) {
        Ok(s) => s,
        Err(e) => return one_line("Session::load", &e.to_string()),
    };
    let Some(inputs) = synthetic_inputs(&s) else { return };
    if let Err(e) = s.run(inputs) {
        one_line("Session::run", &e.to_string());
    }
}

/// A board profile (`targets/*.toml`), as `tune --target` and `bench --target` read it.
pub fn board_profile(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Profile::parse(&text, "fuzz.toml") {
        Ok(p) => {
            let _ = p.host_mismatches(&perceiver_edge_runtime::profile::host_cpu());
            let _ = p.period_ms();
        }
        Err(e) => one_line("Profile::parse", &e.to_string()),
    }
}

/// A weight pack, read by the cortex-m firmware's reader on the host ([`cortex_m::read_model`]):
/// header parse, dims check, then every tensor in model order with its bounds checked.
pub fn pack_reader(data: &[u8]) {
    if let Err(e) = cortex_m::read_model(data) {
        one_line("pack reader", &e);
    }
}
