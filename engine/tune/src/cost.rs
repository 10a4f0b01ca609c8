//! Cost model: predicts latency and memory of an exported graph from its FLOPs, bytes and node
//! count (the exporter's [`Summary`]), calibrated by a short micro-benchmark of the host and
//! scaled to a board by its profile's peak GFLOP/s and memory bandwidth.
//!
//! latency = FLOPs / (per-thread GFLOP/s x thread speed-up) + nodes x per-node overhead
//!         + weight bytes / bandwidth
//!
//! where, on a board, the FLOPs of f16 and int8 products count at their peak's ratio to f32's on
//! that board (fp16 arithmetic 2x, SDOT 4x: [`perceiver_edge_runtime::profile::Profile::peak_ratio`]).
//!
//! memory  = weight bytes + 2 x largest activation + runtime base
//!
//! On the host the three rates come from the micro-benchmark (a 256^3 matmul chain, a chain of
//! 100 tiny matmuls, a 32 MiB copy), all run through the same runtime. For a board, compute rates are
//! scaled by the ratio of per-core peak GFLOP/s (board profile / host profile) and bandwidth by
//! the ratio of bandwidths, i.e. the board is assumed to reach the same fraction of its peak as
//! the host does of its own f32 peak (at most all of it), in each arithmetic. On the host every
//! product counts at the f32 rate (its own candidates are measured, not predicted, when `tune`
//! judges them).
//!
//! Threads are not assumed to help: the speed-up of T threads is measured, on the micro-benchmark's
//! matmul chain for every count up to the host's cores, and on the model itself when `tune`
//! measured the same candidate at 1 and T threads ([`HostRates::predict_measured`]). Past the
//! host's cores a board's speed-up extrapolates the host's parallel efficiency, and only when the
//! host measured a gain: a measured slow-down is never predicted as a speed-up.

use crate::profile::Profile;
use anyhow::Result;
use perceiver_edge_export::ir::{DType, Graph};
use perceiver_edge_export::summary::{product_flops, ProductFlops};
use perceiver_edge_export::Summary;
use perceiver_edge_runtime::{alloc, tensor, Session};
use serde::Serialize;
use std::time::Instant;

/// Measured host rates.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostRates {
    /// Single-thread matmul GFLOP/s.
    pub gflops_per_thread: f64,
    /// Fixed cost per graph node, microseconds.
    pub us_per_node: f64,
    /// Copy bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Heap the runtime uses for a near-empty graph, bytes.
    pub base_heap_bytes: f64,
    /// Measured speed-up of the matmul chain with 1, 2, ... threads (index 0: 1 thread, 1.0), up
    /// to the host's cores; below 1.0 where more threads were slower.
    pub thread_speedup: Vec<f64>,
    /// Host peak f32 GFLOP/s per core and bandwidth assumed for scaling (from the host profile).
    pub host_peak_gflops_per_core: f64,
    /// Host memory bandwidth assumed for scaling, GB/s.
    pub host_bandwidth_gbs: f64,
}

/// What the model needs to know about one exported candidate.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Features {
    /// FLOPs per inference.
    pub flops: u64,
    /// The same FLOPs by the arithmetic of their products.
    pub products: ProductFlops,
    /// Graph nodes.
    pub nodes: usize,
    /// Constant bytes.
    pub weight_bytes: usize,
    /// Largest activation bytes.
    pub largest_activation: usize,
}

impl Features {
    /// Features of an exported graph.
    pub fn of(g: &Graph, s: &Summary) -> Features {
        Features {
            flops: s.flops.iter().map(|(_, f)| f).sum(),
            products: product_flops(g),
            nodes: g.nodes.len(),
            weight_bytes: s.weight_bytes,
            largest_activation: s.largest_activation.1,
        }
    }
}

/// A prediction.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Predicted {
    /// Latency, ms.
    pub latency_ms: f64,
    /// Peak memory, bytes.
    pub memory_bytes: f64,
}

impl HostRates {
    /// Per-core compute speed-up of `board` over the host (1 for the host itself).
    fn compute_scale(&self, board: Option<&Profile>) -> f64 {
        board.map_or(1.0, |b| (b.peak_gflops_f32 / b.cores as f64) / self.host_peak_gflops_per_core)
    }

    /// Fraction of its per-core f32 peak the host reaches on one thread, as a board is assumed to
    /// reach of its own; at most 1: a measurement above the host profile's peak means that figure
    /// (its clock) is low, and no board beats its peak.
    pub fn efficiency(&self) -> f64 {
        (self.gflops_per_thread / self.host_peak_gflops_per_core).min(1.0)
    }

    /// Single-thread f32 GFLOP/s on the host (`board` None) or on `board`.
    fn gflops(&self, board: Option<&Profile>) -> f64 {
        board.map_or(self.gflops_per_thread, |b| b.peak_gflops_f32 / b.cores as f64 * self.efficiency())
    }

    /// Speed-up of `threads` threads given the speed-ups measured on the host (`measured[i]`:
    /// i + 1 threads). Up to the host's cores it is the measurement; past them the host's
    /// efficiency at its largest count is extrapolated if that count gained, else no gain.
    fn speedup(measured: &[f64], threads: usize) -> f64 {
        let threads = threads.max(1);
        match measured.get(threads - 1) {
            Some(&s) => s,
            None => {
                let top = measured.len().max(1);
                let s = measured.last().copied().unwrap_or(1.0);
                if s > 1.0 {
                    s * threads as f64 / top as f64
                } else {
                    s.min(1.0)
                }
            }
        }
    }

    /// Predicts `f` with `threads` threads on the host (`board` None) or on `board`, with the
    /// micro-benchmark's thread speed-ups.
    pub fn predict(&self, f: &Features, threads: usize, board: Option<&Profile>) -> Predicted {
        self.predict_with(f, threads, board, &self.thread_speedup)
    }

    /// Like [`HostRates::predict`], with the speed-up of `threads` threads over one measured on
    /// the model itself (`measured`: its 1-thread latency over its `threads`-thread latency on
    /// this host) in place of the micro-benchmark's.
    pub fn predict_measured(&self, f: &Features, threads: usize, board: Option<&Profile>, measured: f64) -> Predicted {
        let host_threads = threads.min(self.thread_speedup.len().max(1));
        let mut curve: Vec<f64> = self.thread_speedup.iter().take(host_threads).copied().collect();
        curve.resize(host_threads, 1.0);
        curve[0] = 1.0;
        curve[host_threads - 1] = measured;
        self.predict_with(f, threads, board, &curve)
    }

    fn predict_with(&self, f: &Features, threads: usize, board: Option<&Profile>, curve: &[f64]) -> Predicted {
        let scale = self.compute_scale(board);
        let bw =
            board.map_or(self.bandwidth_gbs, |b| self.bandwidth_gbs * b.mem_bandwidth_gbs / self.host_bandwidth_gbs);
        let usable = board.map_or(threads, |b| threads.min(b.cores)).max(1);
        let speedup = Self::speedup(curve, usable);
        // FLOPs at f32's rate: on a board, f16 and int8 products count at their peak ratio.
        let f32_equivalent = match board {
            None => f.flops as f64,
            Some(b) => {
                let p = &f.products;
                p.f32 as f64 + p.f16 as f64 / b.peak_ratio_f16 + p.int8 as f64 / b.peak_ratio_int8
            }
        };
        let compute_s = f32_equivalent / (self.gflops(board) * 1e9 * speedup);
        let overhead_s = f.nodes as f64 * self.us_per_node * 1e-6 / scale;
        let memory_s = f.weight_bytes as f64 / (bw * 1e9);
        Predicted {
            latency_ms: (compute_s + overhead_s + memory_s) * 1e3,
            memory_bytes: f.weight_bytes as f64 + 2.0 * f.largest_activation as f64 + self.base_heap_bytes,
        }
    }
}

/// Best of `runs` timed runs, after one untimed run and, at more than one thread, as many as the
/// session takes to choose where its runs go (else the pool's runs would be timed on one thread:
/// the chain measured T2 1.00x where `bench` measures it 1.82x).
fn time_runs(session: &mut Session, inputs: &[perceiver_edge_runtime::Tensor], runs: usize) -> Result<f64> {
    session.warm_up(inputs, 1)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        session.run(inputs.to_vec())?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn session_of(g: &Graph) -> Result<Session> {
    Ok(Session::from_bytes(&perceiver_edge_export::ir::onnx::to_bytes(g))?)
}

/// Runs the host micro-benchmark (about a second) single-threaded, then the matmul chain again
/// with 2 threads up to `max_threads` (the host's cores, at most the runtime's limit). `host` is the host's
/// profile, if known (peak per core and bandwidth for scaling to boards); without one the host
/// is assumed to peak at 64 GFLOP/s per core (AVX2 FMA at 2 GHz) and reach 20 GB/s.
pub fn measure_host(host: Option<&Profile>, max_threads: usize) -> Result<HostRates> {
    perceiver_edge_runtime::set_threads(1)?;
    // Compute: 4 chained 256x256 matmuls (134 MFLOP).
    let n = 256;
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[n, n]);
    let w: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
    let mut y = x.clone();
    for i in 0..4 {
        let wc = g.const_f32(&format!("w{i}"), &[n, n], &w);
        y = g.matmul(&y, &wc);
        y = g.mul_scalar(&y, 1.0 / 16.0);
    }
    g.output(&y, "y");
    let mut s = session_of(&g)?;
    let xin = tensor(&[n, n], &w).expect("shape");
    let t = time_runs(&mut s, std::slice::from_ref(&xin), 5)?;
    let gflops_per_thread = 4.0 * 2.0 * (n * n * n) as f64 / t / 1e9;
    let mut thread_speedup = vec![1.0];
    for threads in 2..=max_threads.min(perceiver_edge_runtime::limits::MAX_THREADS) {
        perceiver_edge_runtime::set_threads(threads)?;
        let tt = time_runs(&mut s, std::slice::from_ref(&xin), 5);
        perceiver_edge_runtime::set_threads(1)?;
        thread_speedup.push(t / tt?);
    }
    // Per-node cost: 100 chained [1, 16] x [16, 16] matmuls (tract cannot fuse them; their
    // compute, 51 kFLOP, is negligible), so the time is mostly per-node dispatch.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[1, 16]);
    let mut y = x.clone();
    let small: Vec<f32> = (0..256).map(|i| if i % 17 == 0 { 1.0 } else { 0.0 }).collect();
    for i in 0..100 {
        let wc = g.const_f32(&format!("s{i}"), &[16, 16], &small);
        y = g.matmul(&y, &wc);
    }
    g.output(&y, "y");
    let before = alloc::in_use();
    let mut s = session_of(&g)?;
    let xin = tensor(&[1, 16], &[0.5f32; 16]).expect("shape");
    s.run(vec![xin.clone()])?;
    // Like `bench`: the peak while running, over the heap in use before loading.
    alloc::reset_peak();
    let t = time_runs(&mut s, std::slice::from_ref(&xin), 20)?;
    let weights_bytes = 100.0 * 256.0 * 4.0;
    let base_heap_bytes = match (alloc::peak(), before) {
        (Some(p), Some(b)) => (p.saturating_sub(b) as f64 - weights_bytes).max(0.0),
        _ => 0.0,
    };
    let us_per_node = t * 1e6 / g.nodes.len() as f64;
    // Bandwidth: copy 32 MiB.
    let src = vec![1u8; 32 << 20];
    let mut dst = vec![0u8; 32 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let bandwidth_gbs = 2.0 * src.len() as f64 / best / 1e9;
    Ok(HostRates {
        gflops_per_thread,
        us_per_node,
        bandwidth_gbs,
        base_heap_bytes,
        thread_speedup,
        host_peak_gflops_per_core: host.map_or(64.0, |h| h.peak_gflops_f32 / h.cores as f64),
        host_bandwidth_gbs: host.map_or(20.0, |h| h.mem_bandwidth_gbs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates() -> HostRates {
        HostRates {
            gflops_per_thread: 10.0,
            us_per_node: 1.0,
            bandwidth_gbs: 10.0,
            base_heap_bytes: 1000.0,
            thread_speedup: vec![1.0, 2.0],
            host_peak_gflops_per_core: 40.0,
            host_bandwidth_gbs: 20.0,
        }
    }

    /// Features of a graph whose products are all f32.
    fn f32_features(flops: u64, nodes: usize, weight_bytes: usize, largest_activation: usize) -> Features {
        let products = ProductFlops { f32: flops, ..Default::default() };
        Features { flops, products, nodes, weight_bytes, largest_activation }
    }

    #[test]
    fn host_prediction_adds_compute_overhead_and_weights() {
        let f = f32_features(1_000_000_000, 100, 10_000_000, 500);
        let p = rates().predict(&f, 1, None);
        // 100 ms compute + 0.1 ms nodes + 1 ms weights
        assert!((p.latency_ms - 101.1).abs() < 1e-9, "{}", p.latency_ms);
        assert_eq!(p.memory_bytes, 10_000_000.0 + 1000.0 + 1000.0);
        let p2 = rates().predict(&f, 2, None);
        assert!((p2.latency_ms - 51.1).abs() < 1e-9);
    }

    /// A 4-core aarch64 board at 20 GFLOP/s f32 per core and 10 GB/s.
    fn board(fp16: bool, dotprod: bool) -> Profile {
        let text = format!(
            "name = \"b\"\n[cpu]\narch = \"aarch64\"\ntarget = \"aarch64-unknown-linux-gnu\"\ncores = 4\n\
             neon = true\nfp16 = {fp16}\ndotprod = {dotprod}\npeak_gflops_f32 = 80.0\nmem_bandwidth_gbs = 10.0\n\
             [budget]\nmemory_mb = 64\ndeadline_ms = 10\nrate_hz = 30\nthreads = 4\nprecisions = [\"f32\"]\n"
        );
        Profile::parse(&text, "b.toml").unwrap()
    }

    #[test]
    fn board_prediction_counts_f16_and_int8_products_at_their_peak_ratio() {
        // 1 GFLOP: 0.2 in f32 products, 0.8 in f16 (an f16 graph's attention products are f16
        // too; here a mix) or in int8 products.
        let mixed = |f16: u64, int8: u64| Features {
            products: ProductFlops { f32: 200_000_000, f16, int8 },
            ..f32_features(1_000_000_000, 0, 0, 0)
        };
        let ms = |f: &Features, b: &Profile| (rates().predict(f, 1, Some(b)).latency_ms * 1e9).round() / 1e9;
        // Board at half the host's per-core peak: 1 GFLOP of f32 products takes 200 ms.
        let (plain, a76) = (board(false, false), board(true, true));
        assert_eq!(ms(&mixed(800_000_000, 0), &plain), 200.0, "no fp16: f16 products at f32's rate");
        assert_eq!(ms(&mixed(0, 800_000_000), &plain), 200.0, "no SDOT: int8 products at f32's rate");
        // fp16 arithmetic: 40 ms + 800 MFLOP at 2x = 40 + 80.
        assert_eq!(ms(&mixed(800_000_000, 0), &a76), 120.0);
        // SDOT: 40 ms + 800 MFLOP at 4x = 40 + 40.
        assert_eq!(ms(&mixed(0, 800_000_000), &a76), 80.0);
        // On the host every product counts at the rate it measured (f32's).
        assert_eq!((rates().predict(&mixed(0, 800_000_000), 1, None).latency_ms * 1e9).round() / 1e9, 100.0);
    }

    #[test]
    fn board_prediction_scales_by_peak_per_core_and_bandwidth() {
        let board = board(false, false);
        let f = f32_features(1_000_000_000, 100, 10_000_000, 0);
        // per-core peak 20 vs host 40: half speed; bandwidth 10 vs 20: half.
        let p = rates().predict(&f, 8, Some(&board));
        // compute 1e9 / (10e9 * 0.5 * 4) = 50 ms; nodes 0.2 ms; weights 10e6 / 5e9 = 2 ms.
        assert!((p.latency_ms - 52.2).abs() < 1e-9, "{}", p.latency_ms);
    }

    #[test]
    fn a_board_never_beats_its_peak() {
        let f = f32_features(1_000_000_000, 0, 0, 0);
        // The host measured 60 GFLOP/s a thread where its profile says 40 a core: the profile's
        // clock is low. The board (20 a core) is predicted at its peak, not at 150 % of it.
        let fast = HostRates { gflops_per_thread: 60.0, ..rates() };
        assert_eq!(fast.efficiency(), 1.0);
        let ms = |r: &HostRates, b: Option<&Profile>| (r.predict(&f, 1, b).latency_ms * 1e9).round() / 1e9;
        assert_eq!(ms(&fast, Some(&board(false, false))), 50.0);
        // On the host the measurement stands.
        assert!((ms(&fast, None) - 1000.0 / 60.0).abs() < 1e-6);
        // Below the peak the host's fraction carries over: 10 of 40 = 25 % of the board's 20.
        assert_eq!(rates().efficiency(), 0.25);
        assert_eq!(ms(&rates(), Some(&board(false, false))), 200.0);
    }

    #[test]
    fn threads_scale_as_measured_never_as_assumed() {
        let f = f32_features(1_000_000_000, 0, 0, 0);
        // The host measured 2 threads 1.5x faster, 3 threads 0.9x (slower than 1).
        let r = HostRates { thread_speedup: vec![1.0, 1.5, 0.9], ..rates() };
        let ms = |p: Predicted| (p.latency_ms * 1e6).round() / 1e6;
        assert_eq!(ms(r.predict(&f, 1, None)), 100.0);
        assert_eq!(ms(r.predict(&f, 2, None)), 66.666667);
        // A measured slow-down stays one, on the host and past its cores.
        assert_eq!(ms(r.predict(&f, 3, None)), 111.111111);
        assert_eq!(ms(r.predict(&f, 6, None)), 111.111111);
        // Past the cores of a host that gained, its efficiency (0.75 at 2) is extrapolated.
        let gain = HostRates { thread_speedup: vec![1.0, 1.5], ..rates() };
        assert_eq!(ms(gain.predict(&f, 4, None)), 33.333333);
        // The model's own measurement replaces the micro-benchmark's: 2 threads measured slower.
        assert_eq!(ms(gain.predict_measured(&f, 2, None, 0.8)), 125.0);
        assert_eq!(ms(gain.predict_measured(&f, 4, None, 0.8)), 125.0);
    }
}
