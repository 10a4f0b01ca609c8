//! Runs fuzz target bodies on files, to reproduce a crash the fuzzer or the smoke test saved:
//! `cargo run --release --workspace --example reproduce -- TARGET FILE...` (with the
//! allocation cap of the fuzzer; a panic prints its message and backtrace).

use perceiver_edge_fuzz_targets::alloc_cap::CappedAlloc;
use perceiver_edge_fuzz_targets::{body, TARGETS};

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(f) = args.first().and_then(|t| body(t)) else {
        eprintln!("usage: reproduce TARGET FILE... (TARGET: {})", TARGETS.join(", "));
        std::process::exit(2);
    };
    for file in &args[1..] {
        let data = std::fs::read(file).unwrap_or_else(|e| panic!("{file}: {e}"));
        eprintln!("{file}: {} bytes", data.len());
        f(&data);
        eprintln!("{file}: ok");
    }
}
