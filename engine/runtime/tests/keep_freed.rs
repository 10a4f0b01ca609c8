//! Freed run-time buffers of 32 MiB or more kept for the next run (`alloc::set_keep_freed`):
//! a graph with 36 MB activations, run with keeping on and off, gives the same outputs, matching
//! a product computed here in f64, and with keeping on its later runs fault no page of them in;
//! smaller buffers growing the heap take the kept pages' room (peak RSS as without); dropping the
//! session hands the kept pages back.
//! One test in its own binary: the allocator's state is the process's.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use perceiver_edge_runtime::alloc::{self, Counting};
use perceiver_edge_runtime::{tensor, to_vec, Session};

#[global_allocator]
static A: Counting = Counting;

#[path = "support/wide_matmul.rs"]
mod wide;
use wide::{faults, K, M};

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
    let (w, x) = wide::weights_and_input();
    let bytes = wide::model(&w);
    let activation_pages = wide::activation_pages();

    alloc::set_keep_freed(false);
    let mut off = Session::from_bytes(&bytes).unwrap();
    let (plain, plain_same, plain_faults) = three_runs(&mut off, &x);
    assert_eq!(alloc::kept(), 0, "nothing kept while off");
    drop(off);

    alloc::set_keep_freed(true);
    let mut on = Session::from_bytes(&bytes).unwrap();
    let (kept, kept_same, kept_faults) = three_runs(&mut on, &x);
    assert!(
        alloc::kept() >= wide::ACTIVATION_BYTES as u64,
        "the activations kept after a run: {} bytes",
        alloc::kept()
    );

    wide::check(&plain, &x, &w);
    assert!(plain_same && kept_same, "every run gives the first run's outputs");
    assert!(kept == plain, "the same outputs with buffers kept");
    if wide::faults_count_pages() {
        assert!(
            plain_faults >= activation_pages,
            "without keeping a run faults its activations in: {plain_faults} faults"
        );
        assert!(
            kept_faults < activation_pages / 4,
            "kept buffers are not faulted in again: {kept_faults} faults (without: {plain_faults})"
        );
    }

    // Smaller buffers growing the heap take the kept pages' room: the resident set peaks where
    // it would have without kept pages (a buffer's pages are counted before it is touched).
    let kept_before = alloc::kept();
    let (rss_before, max_before) = (wide::rss(), wide::max_rss());
    // Buffers under 32 MiB (glibc's heap), each as large as can be, past the kept bytes: each
    // touched only after it is made, so only counting its pages when made keeps the peak.
    const CHUNK: u64 = 30 << 20;
    let chunks = (kept_before + (24 << 20)).div_ceil(CHUNK);
    let heap: Vec<Vec<u8>> = (0..chunks).map(|_| vec![1u8; CHUNK as usize]).collect();
    let without = max_before.max(rss_before - kept_before + chunks * CHUNK);
    assert!(alloc::kept() < kept_before, "{} of {kept_before} bytes kept", alloc::kept());
    let mib = |b: u64| b >> 20;
    assert!(
        wide::max_rss() <= without + (2 << 20),
        "peak RSS {} MiB, {} MiB without kept pages",
        mib(wide::max_rss()),
        mib(without)
    );
    drop(heap);
    let (plain_again, _, _) = three_runs(&mut on, &x);
    assert!(plain_again == plain, "the same outputs after kept pages were unmapped");

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
    assert!(alloc::kept() > 0);
    drop(on);
    assert_eq!(alloc::kept(), 0, "dropping the session hands the kept pages back");

    alloc::set_keep_freed(false);
    assert_eq!(alloc::kept(), 0, "switched off: the kept maps unmapped");
}
