#![no_main]
//! Target `pack_reader`: the body is perceiver_edge_fuzz_targets::pack_reader (engine/fuzz-targets).

#[global_allocator]
static ALLOC: perceiver_edge_fuzz_targets::alloc_cap::CappedAlloc = perceiver_edge_fuzz_targets::alloc_cap::CappedAlloc;

libfuzzer_sys::fuzz_target!(init: perceiver_edge_fuzz_targets::fuzz_init(), |data: &[u8]| perceiver_edge_fuzz_targets::pack_reader(data));
