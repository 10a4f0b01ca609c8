//! Helpers shared by the C API tests: exports (in-process, through perceiver-edge-export), the
//! reference fixtures, and a thin Rust wrapper that goes through the `extern "C"` functions only.
#![allow(dead_code)]

use perceiver_edge::*;
use perceiver_edge_export::ExportOptions;
use perceiver_edge_runtime::{DatumType, Tensor};
use serde_json::Value;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr;

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Exports checkpoint `dir` (relative to the root or absolute) with `opts` to `out`.
pub fn export_to(dir: &Path, opts: &ExportOptions, out: &Path) {
    perceiver_edge_export::export(&root().join(dir), opts)
        .unwrap_or_else(|e| panic!("export {}: {e}", dir.display()))
        .write(out)
        .unwrap();
}

/// `models/digits` exported with no options into `tmp`.
pub fn digits(tmp: &Path) -> PathBuf {
    let p = tmp.join("digits.onnx");
    export_to("models/digits".as_ref(), &ExportOptions::default(), &p);
    p
}

/// `models/marker` exported with `--seq-len 256` into `tmp` (as scripts/firmware.sh does).
pub fn marker(tmp: &Path) -> PathBuf {
    let p = tmp.join("marker.onnx");
    export_to("models/marker".as_ref(), &ExportOptions { seq_len: Some(256), ..Default::default() }, &p);
    p
}

/// The bundled digit samples as (file name, tensor), sorted.
pub fn digit_samples() -> Vec<(String, Tensor)> {
    let dir = root().join("models/digits/samples");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("digit_") && n.ends_with(".npy"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 5, "bundled digit samples");
    v.into_iter().map(|n| (n.clone(), read_npy(&dir.join(&n)))).collect()
}

pub fn read_npy(p: &Path) -> Tensor {
    perceiver_edge_runtime::npy::read_npy(p).unwrap_or_else(|e| panic!("{e}"))
}

/// Raw bytes of a tensor (row-major, native order): what a C caller passes.
pub fn bytes_of(t: &Tensor) -> Vec<u8> {
    t.as_bytes().to_vec()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_ne_bytes(c.try_into().unwrap())).collect()
}

pub fn dtype_of(dt: DatumType) -> pe_dtype {
    match dt {
        DatumType::F32 => pe_dtype::PE_DTYPE_F32,
        DatumType::I64 => pe_dtype::PE_DTYPE_I64,
        other => panic!("no test uses {other:?}"),
    }
}

/// `pe_last_error()` as a Rust string.
pub fn last_error() -> String {
    let p = pe_last_error();
    assert!(!p.is_null());
    unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_string()
}

/// A model input or output as the C API reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub name: String,
    pub dtype: pe_dtype,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// A `pe_model*` used only through the C functions; freed (and checked) on drop.
pub struct Model(pub *mut pe_model);

/// Asserts `status == PE_OK`, showing the last error otherwise.
#[track_caller]
pub fn ok(status: pe_status) {
    assert_eq!(status, pe_status::PE_OK, "{}", last_error());
}

impl Model {
    pub fn load(path: &Path) -> Model {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let mut m = ptr::null_mut();
        ok(unsafe { pe_model_load(c.as_ptr(), &mut m) });
        assert!(!m.is_null());
        Model(m)
    }

    pub fn from_memory(bytes: &[u8]) -> Model {
        let mut m = ptr::null_mut();
        ok(unsafe { pe_model_load_from_memory(bytes.as_ptr().cast(), bytes.len(), &mut m) });
        assert!(!m.is_null());
        Model(m)
    }

    fn spec(&self, input: bool, i: usize) -> Spec {
        let m = self.0;
        let mut name = ptr::null();
        let mut dtype = pe_dtype::PE_DTYPE_UNKNOWN;
        let (mut rank, mut bytes) = (0usize, 0usize);
        unsafe {
            if input {
                ok(pe_model_input_name(m, i, &mut name));
                ok(pe_model_input_dtype(m, i, &mut dtype));
                ok(pe_model_input_rank(m, i, &mut rank));
                ok(pe_model_input_byte_size(m, i, &mut bytes));
            } else {
                ok(pe_model_output_name(m, i, &mut name));
                ok(pe_model_output_dtype(m, i, &mut dtype));
                ok(pe_model_output_rank(m, i, &mut rank));
                ok(pe_model_output_byte_size(m, i, &mut bytes));
            }
        }
        let mut shape = vec![0usize; rank];
        unsafe {
            if input {
                ok(pe_model_input_shape(m, i, shape.as_mut_ptr(), rank));
            } else {
                ok(pe_model_output_shape(m, i, shape.as_mut_ptr(), rank));
            }
        }
        let name = unsafe { CStr::from_ptr(name) }.to_str().unwrap().to_string();
        Spec { name, dtype, shape, bytes }
    }

    pub fn inputs(&self) -> Vec<Spec> {
        let mut n = 0;
        ok(unsafe { pe_model_input_count(self.0, &mut n) });
        (0..n).map(|i| self.spec(true, i)).collect()
    }

    pub fn outputs(&self) -> Vec<Spec> {
        let mut n = 0;
        ok(unsafe { pe_model_output_count(self.0, &mut n) });
        (0..n).map(|i| self.spec(false, i)).collect()
    }

    /// Runs on `inputs` (raw bytes, in graph-input order, with the model's dtypes) into output
    /// buffers sized from the model's specs; the status and message on failure.
    pub fn run(&self, inputs: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, (pe_status, String)> {
        let in_specs = self.inputs();
        let out_specs = self.outputs();
        let ins: Vec<pe_input> = inputs
            .iter()
            .zip(&in_specs)
            .map(|(b, s)| pe_input { data: b.as_ptr().cast(), byte_len: b.len(), dtype: s.dtype })
            .collect();
        let mut bufs: Vec<Vec<u8>> = out_specs.iter().map(|s| vec![0u8; s.bytes]).collect();
        let mut outs: Vec<pe_output> = bufs
            .iter_mut()
            .zip(&out_specs)
            .map(|(b, s)| pe_output { data: b.as_mut_ptr().cast(), byte_len: b.len(), dtype: s.dtype })
            .collect();
        let status = unsafe { pe_model_run(self.0, ins.as_ptr(), ins.len(), outs.as_mut_ptr(), outs.len()) };
        match status {
            pe_status::PE_OK => Ok(bufs),
            s => Err((s, last_error())),
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        let status = unsafe { pe_model_free(self.0) };
        if !std::thread::panicking() {
            assert_eq!(status, pe_status::PE_OK, "{}", last_error());
        }
    }
}

// The tests move handles into threads (the contract allows it: one thread at a time), and
// capi_threads.rs shares one on purpose to check that the library answers PE_BUSY.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// `models/reference/fixtures` (transformers' reference outputs).
pub fn fixtures_dir() -> PathBuf {
    root().join("models/reference/fixtures")
}

/// One case of a reference fixture: export flags, inputs and transformers' outputs.
pub struct Case {
    pub fixture: String,
    pub dir: PathBuf,
    pub json: Value,
    pub atol: f64,
    pub rtol: f64,
}

impl Case {
    pub fn name(&self) -> String {
        format!("{}/{}", self.fixture, self.json["name"].as_str().unwrap())
    }

    /// The case's `export_args` (CLI flags) as export options.
    pub fn options(&self) -> ExportOptions {
        let args: Vec<&str> =
            self.json["export_args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let mut o = ExportOptions::default();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut num = || it.next().expect("flag value").parse::<usize>().expect("integer flag value");
            match flag {
                "--seq-len" => o.seq_len = Some(num()),
                "--decode-subset" => o.decode_subset = Some(num()),
                "--batch" => o.batch = Some(num()),
                "--image-points" => o.image_points = Some(num()),
                "--audio-points" => o.audio_points = Some(num()),
                "--image-size" => {
                    let h = num();
                    let w = num();
                    o.image_size = Some((h, w));
                }
                "--attention-mask" => o.attention_mask = true,
                other => panic!("{}: export flag {other} is not mapped in tests/common", self.name()),
            }
        }
        o
    }

    /// (graph input name, file) in the fixture's order.
    pub fn inputs(&self) -> Vec<(String, PathBuf)> {
        let list = self.json["inputs"].as_array().unwrap();
        list.iter()
            .map(|i| (i["name"].as_str().unwrap().to_string(), self.dir.join(i["file"].as_str().unwrap())))
            .collect()
    }

    /// (graph output name, file with transformers' values).
    pub fn outputs(&self) -> Vec<(String, PathBuf)> {
        let list = self.json["outputs"].as_array().unwrap();
        list.iter()
            .map(|o| (o["name"].as_str().unwrap().to_string(), self.dir.join(o["file"].as_str().unwrap())))
            .collect()
    }
}

/// Every case of every fixture (same reading as engine/cli/tests/fixtures.rs).
pub fn cases() -> Vec<Case> {
    let mut out = vec![];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.join("fixture.json").is_file()) {
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
        for c in meta["cases"].as_array().unwrap() {
            out.push(Case {
                fixture: dir.file_name().unwrap().to_string_lossy().into(),
                atol: c["atol"].as_f64().or(meta["atol"].as_f64()).unwrap_or(1e-4),
                rtol: c["rtol"].as_f64().or(meta["rtol"].as_f64()).unwrap_or(1e-5),
                dir: dir.clone(),
                json: c.clone(),
            });
        }
    }
    out
}

/// Resident set size of this process in bytes: resident pages from `/proc/self/statm` times
/// the kernel page size (`KernelPageSize` in `/proc/self/smaps`; 4 KiB if absent).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm (Linux only)");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * page_size()
}

fn page_size() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    smaps
        .lines()
        .find_map(|l| l.strip_prefix("KernelPageSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(4096, |kb| kb * 1024)
}
