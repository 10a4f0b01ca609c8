//! The C API's allocator (`alloc::Mapped`) keeps the pages of run-time buffers of 32 MiB or more
//! from run to run, as the CLI's does: a graph with 36 MB activations, loaded and run three times
//! through the C functions, gives the output of an f64 product, its third run faults no page of
//! them in (with keeping switched off it faults all of them), and `pe_model_free` hands the
//! kept pages back. One test in its own binary: the allocator's state is the process's.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use perceiver_edge_runtime::alloc;

mod common;
use common::*;

// Shared with the runtime's keep_freed.rs, which uses all of it.
#[allow(dead_code)]
#[path = "../../runtime/tests/support/wide_matmul.rs"]
mod wide;

/// Runs `model` three times on `x`: the first run's output bytes, whether the later runs gave
/// the same, and the page faults of the last run. Only the library allocates between runs (the
/// test keeps the first output buffer, not a copy of each).
fn three_runs(model: &Model, x: &[f32]) -> (Vec<u8>, bool, i64) {
    let input = x.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>();
    let mut first: Option<Vec<u8>> = None;
    let mut same = true;
    let mut last = 0;
    for _ in 0..3 {
        let before = wide::faults();
        let mut out = model.run(std::slice::from_ref(&input)).unwrap();
        last = wide::faults() - before;
        match &first {
            None => first = Some(out.remove(0)),
            Some(z) => same &= out[0] == *z,
        }
    }
    (first.unwrap(), same, last)
}

#[test]
fn the_c_api_keeps_large_buffers_from_run_to_run_and_frees_them_with_the_model() {
    let (w, x) = wide::weights_and_input();
    let bytes = wide::model(&w);
    let pages = wide::activation_pages();

    alloc::set_keep_freed(false);
    let (plain, plain_same, plain_faults) = three_runs(&Model::from_memory(&bytes), &x);
    alloc::set_keep_freed(true);
    let model = Model::from_memory(&bytes);
    let (kept, kept_same, kept_faults) = three_runs(&model, &x);
    assert!(alloc::kept() >= wide::ACTIVATION_BYTES as u64, "kept after a run: {} bytes", alloc::kept());
    drop(model);
    assert_eq!(alloc::kept(), 0, "pe_model_free hands the kept pages back");

    wide::check(&f32s(&plain), &x, &w);
    assert!(plain_same && kept_same, "every run gives the first run's output");
    assert!(kept == plain, "the same output with buffers kept");
    if wide::faults_count_pages() {
        assert!(plain_faults >= pages, "without keeping a run faults its activations in: {plain_faults} faults");
        assert!(
            kept_faults < pages / 4,
            "kept buffers are not faulted in again: {kept_faults} faults (without: {plain_faults})"
        );
    }
}
