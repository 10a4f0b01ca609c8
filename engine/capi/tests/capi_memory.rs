//! Loading, running and freeing models in a loop through the C API keeps the resident set
//! steady: RSS after 200 iterations stays within a few MB of RSS after 20 (the first iterations
//! warm up the allocator and tract's caches). Each iteration also takes the error paths, which
//! allocate messages. Its own test binary, so no other test shares the process.

use perceiver_edge::*;
use std::ptr;

mod common;
use common::*;

#[test]
fn load_run_free_loop_keeps_rss_steady() {
    let tmp = tempfile::tempdir().unwrap();
    let path = digits(tmp.path());
    let bytes = std::fs::read(&path).unwrap();
    let samples = digit_samples();
    let inputs: Vec<Vec<u8>> = samples.iter().map(|(_, t)| bytes_of(t)).collect();
    let expected: Vec<Vec<u8>> = {
        let m = Model::load(&path);
        inputs.iter().map(|x| m.run(std::slice::from_ref(x)).unwrap().remove(0)).collect()
    };
    let mut y = vec![0f32; 10];
    let (mut rss_20, mut rss_100) = (0, 0);
    let t0 = std::time::Instant::now();
    for it in 1..=200 {
        // Alternate the two load paths.
        let m = if it % 2 == 0 { Model::load(&path) } else { Model::from_memory(&bytes) };
        assert_eq!(m.inputs()[0].bytes, 768);
        for (x, want) in inputs.iter().zip(&expected) {
            let ins = [pe_input { data: x.as_ptr().cast(), byte_len: x.len(), dtype: pe_dtype::PE_DTYPE_F32 }];
            let mut outs = [pe_output { data: y.as_mut_ptr().cast(), byte_len: 40, dtype: pe_dtype::PE_DTYPE_F32 }];
            ok(unsafe { pe_model_run(m.0, ins.as_ptr(), 1, outs.as_mut_ptr(), 1) });
            assert_eq!(y.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>(), *want, "iteration {it}");
            // An error path: wrong size.
            let bad = [pe_input { byte_len: 4, ..ins[0] }];
            let status = unsafe { pe_model_run(m.0, bad.as_ptr(), 1, outs.as_mut_ptr(), 1) };
            assert_eq!(status, pe_status::PE_BUFFER_SIZE);
        }
        // A failed load.
        let mut none = ptr::null_mut();
        let status = unsafe { pe_model_load_from_memory(bytes.as_ptr().cast(), 100, &mut none) };
        assert_eq!(status, pe_status::PE_LOAD);
        drop(m);
        match it {
            20 => rss_20 = rss_bytes(),
            100 => rss_100 = rss_bytes(),
            _ => {}
        }
    }
    let rss_200 = rss_bytes();
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "RSS after 20 iterations {:.2} MiB, after 100 {:.2} MiB, after 200 {:.2} MiB: growth 20 -> 200 {:+.2} MiB \
         ({:.1} s, 200 loads, 1000 runs)",
        mib(rss_20),
        mib(rss_100),
        mib(rss_200),
        mib(rss_200) - mib(rss_20),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        rss_200 <= rss_20 + 4 * 1048576,
        "RSS grew by {:.2} MiB between iterations 20 and 200",
        mib(rss_200) - mib(rss_20)
    );
}
