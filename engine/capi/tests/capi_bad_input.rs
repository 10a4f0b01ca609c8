//! Every class of bad input gets its status code and a one-line message naming the function and
//! the argument at fault, never a crash: NULL pointers, wrong buffer sizes and counts, wrong
//! dtypes (including integers that are no `pe_dtype`), out-of-range values, handles used after
//! free or never loaded, unloadable models. Failed runs leave the output buffers untouched.

use perceiver_edge::*;
use std::ffi::{c_int, c_void, CString};
use std::ptr;

mod common;
use common::*;

/// Asserts `status == want` and a one-line last error starting with `func: ` and containing
/// every needle.
#[track_caller]
fn expect(status: pe_status, want: pe_status, func: &str, needles: &[&str]) {
    let msg = last_error();
    assert_eq!(status, want, "message: {msg}");
    assert_eq!(msg.lines().count(), 1, "one line: {msg:?}");
    assert!(msg.starts_with(&format!("{func}: ")), "names {func}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "message should contain `{n}`: {msg}");
    }
}

fn digits_model() -> (tempfile::TempDir, Model) {
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::load(&digits(tmp.path()));
    (tmp, m)
}

const SENTINEL: f32 = 7.25;

/// A digits input and an output buffer pre-filled with SENTINEL.
fn buffers() -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = perceiver_edge_runtime::to_vec(&digit_samples()[0].1).unwrap();
    (x, vec![SENTINEL; 10])
}

fn input(x: &[f32]) -> pe_input {
    pe_input { data: x.as_ptr().cast(), byte_len: std::mem::size_of_val(x), dtype: pe_dtype::PE_DTYPE_F32 }
}

fn output(y: &mut [f32]) -> pe_output {
    pe_output { data: y.as_mut_ptr().cast(), byte_len: std::mem::size_of_val(y), dtype: pe_dtype::PE_DTYPE_F32 }
}

fn run(m: &Model, ins: &[pe_input], outs: &mut [pe_output]) -> pe_status {
    unsafe { pe_model_run(m.0, ins.as_ptr(), ins.len(), outs.as_mut_ptr(), outs.len()) }
}

#[test]
fn null_pointers() {
    use pe_status::PE_NULL_ARGUMENT as NULL;
    let (tmp, m) = digits_model();
    let path = CString::new(tmp.path().join("digits.onnx").to_str().unwrap()).unwrap();
    // Loads: *out is reset to NULL on failure.
    let mut out: *mut pe_model = ptr::dangling_mut();
    expect(unsafe { pe_model_load(ptr::null(), &mut out) }, NULL, "pe_model_load", &["`path` is NULL"]);
    assert!(out.is_null());
    expect(unsafe { pe_model_load(path.as_ptr(), ptr::null_mut()) }, NULL, "pe_model_load", &["`out` is NULL"]);
    out = ptr::dangling_mut();
    expect(
        unsafe { pe_model_load_from_memory(ptr::null(), 100, &mut out) },
        NULL,
        "pe_model_load_from_memory",
        &["`data` is NULL"],
    );
    assert!(out.is_null());
    let bytes = [0u8; 4];
    expect(
        unsafe { pe_model_load_from_memory(bytes.as_ptr().cast(), 4, ptr::null_mut()) },
        NULL,
        "pe_model_load_from_memory",
        &["`out` is NULL"],
    );

    // Queries: NULL handle, NULL out-parameters.
    let mut n = 0usize;
    expect(unsafe { pe_model_input_count(ptr::null(), &mut n) }, NULL, "pe_model_input_count", &["`model` is NULL"]);
    expect(unsafe { pe_model_output_count(m.0, ptr::null_mut()) }, NULL, "pe_model_output_count", &["`count` is NULL"]);
    expect(unsafe { pe_model_input_name(m.0, 0, ptr::null_mut()) }, NULL, "pe_model_input_name", &["`name` is NULL"]);
    expect(
        unsafe { pe_model_output_dtype(m.0, 0, ptr::null_mut()) },
        NULL,
        "pe_model_output_dtype",
        &["`dtype` is NULL"],
    );
    expect(unsafe { pe_model_input_rank(m.0, 0, ptr::null_mut()) }, NULL, "pe_model_input_rank", &["`rank` is NULL"]);
    expect(
        unsafe { pe_model_input_shape(m.0, 0, ptr::null_mut(), 4) },
        NULL,
        "pe_model_input_shape",
        &["`dims` is NULL"],
    );
    expect(
        unsafe { pe_model_output_byte_size(ptr::null(), 0, &mut n) },
        NULL,
        "pe_model_output_byte_size",
        &["`model` is NULL"],
    );

    // Runs: NULL handle, arrays, data pointers.
    let (x, mut y) = buffers();
    let ins = [input(&x)];
    let mut outs = [output(&mut y)];
    expect(
        unsafe { pe_model_run(ptr::null_mut(), ins.as_ptr(), 1, outs.as_mut_ptr(), 1) },
        NULL,
        "pe_model_run",
        &["`model` is NULL"],
    );
    expect(
        unsafe { pe_model_run(m.0, ptr::null(), 1, outs.as_mut_ptr(), 1) },
        NULL,
        "pe_model_run",
        &["`inputs` is NULL"],
    );
    expect(
        unsafe { pe_model_run(m.0, ins.as_ptr(), 1, ptr::null_mut(), 1) },
        NULL,
        "pe_model_run",
        &["`outputs` is NULL"],
    );
    let null_in = [pe_input { data: ptr::null(), ..ins[0] }];
    expect(run(&m, &null_in, &mut outs), NULL, "pe_model_run", &["input 0 `pixel_values`", "`data` is NULL"]);
    let mut null_out = [pe_output { data: ptr::null_mut(), ..outs[0] }];
    expect(run(&m, &ins, &mut null_out), NULL, "pe_model_run", &["output 0 `logits`", "`data` is NULL"]);
    assert!(y.iter().all(|v| *v == SENTINEL), "failed runs write nothing");

    // Freeing NULL is a no-op, like free(); the handle still works and clears the last error.
    assert_eq!(unsafe { pe_model_free(ptr::null_mut()) }, pe_status::PE_OK);
    let mut outs = [output(&mut y)];
    ok(run(&m, &ins, &mut outs));
    assert_eq!(last_error(), "", "a successful call clears the last error");
    assert!(y.iter().all(|v| *v != SENTINEL));
}

#[test]
fn wrong_sizes_counts_and_indices() {
    let (_tmp, m) = digits_model();
    let (x, mut y) = buffers();
    let good_in = input(&x);
    let short_in = [pe_input { byte_len: 764, ..good_in }];
    let mut outs = [output(&mut y)];
    expect(
        run(&m, &short_in, &mut outs),
        pe_status::PE_BUFFER_SIZE,
        "pe_model_run",
        &["input 0 `pixel_values` (float32 [1, 3, 8, 8], 768 bytes)", "buffer is 764 bytes, expected 768"],
    );
    let long_in = [pe_input { byte_len: 772, ..good_in }];
    expect(run(&m, &long_in, &mut outs), pe_status::PE_BUFFER_SIZE, "pe_model_run", &["buffer is 772 bytes"]);
    let mut short_out = [pe_output { byte_len: 36, ..outs[0] }];
    expect(
        run(&m, &[good_in], &mut short_out),
        pe_status::PE_BUFFER_SIZE,
        "pe_model_run",
        &["output 0 `logits` (float32 [1, 10], 40 bytes)", "buffer is 36 bytes, expected 40"],
    );
    // Counts.
    expect(
        run(&m, &[good_in, good_in], &mut outs),
        pe_status::PE_INVALID_ARGUMENT,
        "pe_model_run",
        &["got 2 input(s), the model takes 1 (pixel_values)"],
    );
    expect(
        run(&m, &[good_in], &mut []),
        pe_status::PE_INVALID_ARGUMENT,
        "pe_model_run",
        &["got 0 output(s), the model produces 1 (logits)"],
    );
    assert!(y.iter().all(|v| *v == SENTINEL), "failed runs write nothing");
    // Shape arrays too small for the rank; indices out of range.
    let mut dims = [0usize; 3];
    expect(
        unsafe { pe_model_input_shape(m.0, 0, dims.as_mut_ptr(), 3) },
        pe_status::PE_BUFFER_SIZE,
        "pe_model_input_shape",
        &["`dims` holds 3 value(s), the rank is 4"],
    );
    assert_eq!(dims, [0, 0, 0], "nothing written");
    let mut name = ptr::null();
    expect(
        unsafe { pe_model_input_name(m.0, 1, &mut name) },
        pe_status::PE_INVALID_ARGUMENT,
        "pe_model_input_name",
        &["input index 1 out of range (the model has 1)"],
    );
    let mut bytes = 0;
    expect(
        unsafe { pe_model_output_byte_size(m.0, usize::MAX, &mut bytes) },
        pe_status::PE_INVALID_ARGUMENT,
        "pe_model_output_byte_size",
        &["output index 18446744073709551615 out of range"],
    );
    // Zero threads.
    expect(pe_set_threads(0), pe_status::PE_INVALID_ARGUMENT, "pe_set_threads", &["thread count 0"]);
}

/// The C side of `pe_input` with the dtype as a plain int, as C code may fill it.
#[repr(C)]
struct CInput {
    data: *const c_void,
    byte_len: usize,
    dtype: c_int,
}

#[test]
fn wrong_dtypes() {
    let (_tmp, m) = digits_model();
    let (x, mut y) = buffers();
    let good_in = input(&x);
    let mut outs = [output(&mut y)];
    expect(
        run(&m, &[pe_input { dtype: pe_dtype::PE_DTYPE_I32, ..good_in }], &mut outs),
        pe_status::PE_DTYPE,
        "pe_model_run",
        &["input 0 `pixel_values`", "buffer dtype PE_DTYPE_I32, the model's is PE_DTYPE_F32"],
    );
    let mut f16_out = [pe_output { dtype: pe_dtype::PE_DTYPE_F16, ..outs[0] }];
    expect(
        run(&m, &[good_in], &mut f16_out),
        pe_status::PE_DTYPE,
        "pe_model_run",
        &["output 0 `logits`", "buffer dtype PE_DTYPE_F16"],
    );
    // Integers that are no pe_dtype at all (C lets any int into an enum field).
    for bad in [999, -1, 13] {
        let raw = [CInput { data: x.as_ptr().cast(), byte_len: 768, dtype: bad }];
        let status = unsafe { pe_model_run(m.0, raw.as_ptr().cast::<pe_input>(), 1, outs.as_mut_ptr(), 1) };
        expect(status, pe_status::PE_DTYPE, "pe_model_run", &[&format!("unknown pe_dtype value {bad}")]);
    }
    assert!(y.iter().all(|v| *v == SENTINEL), "failed runs write nothing");

    // An int64 model (token ids): float buffers are refused, and so are ids outside the vocabulary.
    let tmp = tempfile::tempdir().unwrap();
    let mlm = tmp.path().join("mlm.onnx");
    export_to(&fixtures_dir().join("mlm"), &Default::default(), &mlm);
    let m = Model::load(&mlm);
    assert_eq!(m.inputs()[0].dtype, pe_dtype::PE_DTYPE_I64);
    let vocab = m.outputs()[0].shape[2] as i64;
    let mut ids: Vec<i64> =
        perceiver_edge_runtime::to_vec(&read_npy(&fixtures_dir().join("mlm/default.in.input_ids.npy"))).unwrap();
    let as_f32 = vec![0f32; ids.len()];
    let mut logits = vec![SENTINEL; m.outputs()[0].bytes / 4];
    let mut outs = [output(&mut logits)];
    expect(
        run(&m, &[input(&as_f32)], &mut outs),
        pe_status::PE_DTYPE,
        "pe_model_run",
        &["input 0 `input_ids` (int64 [1, 24], 192 bytes)", "buffer dtype PE_DTYPE_F32, the model's is PE_DTYPE_I64"],
    );
    for bad in [vocab, -1] {
        ids[5] = bad;
        let ins = [pe_input { data: ids.as_ptr().cast(), byte_len: 192, dtype: pe_dtype::PE_DTYPE_I64 }];
        expect(
            run(&m, &ins, &mut outs),
            pe_status::PE_INVALID_ARGUMENT,
            "pe_model_run",
            &["input `input_ids`", &format!("value {bad} at flat index 5 is out of range 0..={}", vocab - 1)],
        );
    }
    assert!(logits.iter().all(|v| *v == SENTINEL), "failed runs write nothing");
    ids[5] = vocab - 1;
    let ins = [pe_input { data: ids.as_ptr().cast(), byte_len: 192, dtype: pe_dtype::PE_DTYPE_I64 }];
    ok(run(&m, &ins, &mut outs));
}

#[test]
fn use_after_free_and_foreign_handles() {
    let tmp = tempfile::tempdir().unwrap();
    let path = digits(tmp.path());
    let c = CString::new(path.to_str().unwrap()).unwrap();
    let mut m = ptr::null_mut();
    ok(unsafe { pe_model_load(c.as_ptr(), &mut m) });
    ok(unsafe { pe_model_free(m) });
    let mut n = 0usize;
    let needle = ["not a live pe_model handle"];
    expect(unsafe { pe_model_input_count(m, &mut n) }, pe_status::PE_INVALID_HANDLE, "pe_model_input_count", &needle);
    let (x, mut y) = buffers();
    let (ins, mut outs) = ([input(&x)], [output(&mut y)]);
    expect(
        unsafe { pe_model_run(m, ins.as_ptr(), 1, outs.as_mut_ptr(), 1) },
        pe_status::PE_INVALID_HANDLE,
        "pe_model_run",
        &needle,
    );
    expect(unsafe { pe_model_free(m) }, pe_status::PE_INVALID_HANDLE, "pe_model_free", &needle);
    assert!(y.iter().all(|v| *v == SENTINEL));
    // Pointers that were never handles are rejected without being dereferenced.
    let foreign = Box::into_raw(Box::new([0u64; 16])).cast::<pe_model>();
    expect(
        unsafe { pe_model_output_count(foreign, &mut n) },
        pe_status::PE_INVALID_HANDLE,
        "pe_model_output_count",
        &needle,
    );
    expect(unsafe { pe_model_free(foreign) }, pe_status::PE_INVALID_HANDLE, "pe_model_free", &needle);
    drop(unsafe { Box::from_raw(foreign.cast::<[u64; 16]>()) });
    let wild = 0x10 as *mut pe_model;
    expect(unsafe { pe_model_free(wild) }, pe_status::PE_INVALID_HANDLE, "pe_model_free", &needle);
}

#[test]
fn unloadable_models() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.onnx");
    let c = CString::new(missing.to_str().unwrap()).unwrap();
    let mut m: *mut pe_model = ptr::dangling_mut();
    expect(
        unsafe { pe_model_load(c.as_ptr(), &mut m) },
        pe_status::PE_LOAD,
        "pe_model_load",
        &["missing.onnx", "cannot read"],
    );
    assert!(m.is_null());
    let garbage = b"this is not an ONNX protobuf, just text";
    let file = tmp.path().join("garbage.onnx");
    std::fs::write(&file, garbage).unwrap();
    let c = CString::new(file.to_str().unwrap()).unwrap();
    expect(unsafe { pe_model_load(c.as_ptr(), &mut m) }, pe_status::PE_LOAD, "pe_model_load", &["garbage.onnx"]);
    assert!(m.is_null());
    m = ptr::dangling_mut();
    expect(
        unsafe { pe_model_load_from_memory(garbage.as_ptr().cast(), garbage.len(), &mut m) },
        pe_status::PE_LOAD,
        "pe_model_load_from_memory",
        &["<memory>", "not a loadable ONNX model"],
    );
    assert!(m.is_null());
    // A valid model cut short.
    let bytes = std::fs::read(digits(tmp.path())).unwrap();
    expect(
        unsafe { pe_model_load_from_memory(bytes.as_ptr().cast(), bytes.len() / 2, &mut m) },
        pe_status::PE_LOAD,
        "pe_model_load_from_memory",
        &["<memory>"],
    );
    // A directory.
    let c = CString::new(tmp.path().to_str().unwrap()).unwrap();
    expect(unsafe { pe_model_load(c.as_ptr(), &mut m) }, pe_status::PE_LOAD, "pe_model_load", &["cannot read"]);
}

#[test]
fn last_error_is_per_thread() {
    expect(pe_set_threads(0), pe_status::PE_INVALID_ARGUMENT, "pe_set_threads", &["thread count 0"]);
    std::thread::spawn(|| {
        assert_eq!(last_error(), "", "a new thread starts with no error");
        let mut n = 0usize;
        let status = unsafe { pe_model_input_count(ptr::null(), &mut n) };
        expect(status, pe_status::PE_NULL_ARGUMENT, "pe_model_input_count", &["`model` is NULL"]);
    })
    .join()
    .unwrap();
    assert!(last_error().starts_with("pe_set_threads: "), "this thread's error is untouched: {}", last_error());
}
