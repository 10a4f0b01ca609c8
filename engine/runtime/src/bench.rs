//! Self-benchmark: load time, latency percentiles, throughput, memory (peak RSS, heap, growth
//! over the run) and a paced mode that runs at a fixed rate like a camera loop and counts
//! deadline misses. The JSON form ([`BenchReport`]) is stable; see docs/cli.md (`bench`).

use crate::{alloc, Error, OpKey, Result, Session};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Measured runs (ignored when `duration` is set).
    pub runs: usize,
    /// Measure for this long instead of a fixed count.
    pub duration: Option<Duration>,
    /// Unmeasured runs first.
    pub warmup: usize,
    /// Fixed rate in Hz (paced mode), or as fast as possible.
    pub rate_hz: Option<f64>,
    /// Matmul threads (1 = single-threaded).
    pub threads: usize,
}

/// The most measured or warm-up runs one benchmark takes (latencies are kept per run).
pub const MAX_RUNS: usize = 10_000_000;
/// The longest `duration`: one week.
pub const MAX_DURATION_S: f64 = 7.0 * 24.0 * 3600.0;
/// The slowest and fastest paced rates, in Hz.
pub const RATE_RANGE_HZ: (f64, f64) = (1e-3, 1e6);

/// A flag value as a person would type it (`0.5`, `1e20`, `1e-300`).
fn num(x: f64) -> String {
    if x == 0.0 || (1e-3..1e7).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

impl BenchOptions {
    /// Options from flag values (seconds, Hz), each checked: one-line errors naming the flag.
    pub fn from_flags(
        runs: usize,
        duration_s: Option<f64>,
        warmup: usize,
        rate_hz: Option<f64>,
        threads: usize,
    ) -> Result<BenchOptions> {
        let bad = |msg: String| Err(Error::Setting(msg));
        if duration_s.is_none() && !(1..=MAX_RUNS).contains(&runs) {
            return bad(format!("--runs {runs}: expected 1 to {MAX_RUNS} (or give --duration)"));
        }
        if warmup > MAX_RUNS {
            return bad(format!("--warmup {warmup}: expected at most {MAX_RUNS}"));
        }
        if let Some(d) = duration_s {
            if !(d > 0.0 && d <= MAX_DURATION_S) {
                return bad(format!("--duration {}: expected seconds in (0, {MAX_DURATION_S}]", num(d)));
            }
        }
        if let Some(r) = rate_hz {
            let (lo, hi) = RATE_RANGE_HZ;
            if !(lo..=hi).contains(&r) {
                return bad(format!("--rate {}: expected Hz in [{}, {}]", num(r), num(lo), num(hi)));
            }
        }
        if threads == 0 || threads > crate::limits::MAX_THREADS {
            return bad(format!("--threads {threads}: expected 1 to {}", crate::limits::MAX_THREADS));
        }
        Ok(BenchOptions { runs, duration: duration_s.map(Duration::from_secs_f64), warmup, rate_hz, threads })
    }
}

/// Non-finite (NaN or infinite) values among the float elements of `tensors`.
pub fn count_nonfinite(tensors: &[Tensor]) -> usize {
    fn count<T: Datum + Copy>(t: &Tensor, finite: impl Fn(T) -> bool) -> usize {
        let plain = t.try_as_plain_ram().ok();
        plain.and_then(|p| p.as_slice::<T>().ok().map(|v| v.iter().filter(|x| !finite(**x)).count())).unwrap_or(0)
    }
    tensors
        .iter()
        .map(|t| match t.datum_type() {
            DatumType::F32 => count::<f32>(t, f32::is_finite),
            DatumType::F64 => count::<f64>(t, f64::is_finite),
            DatumType::F16 => count::<f16>(t, |x| x.to_f32().is_finite()),
            _ => 0,
        })
        .sum()
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { runs: 100, duration: None, warmup: 5, rate_hz: None, threads: 1 }
    }
}

/// Latency distribution in milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latency {
    /// Fastest run.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest run.
    pub max: f64,
    /// Standard deviation.
    pub stddev: f64,
}

/// Fixed-rate results.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Paced {
    /// Requested rate.
    pub rate_hz: f64,
    /// Period = deadline of each frame, ms.
    pub deadline_ms: f64,
    /// Frames finished after their deadline (scheduled start + period).
    pub deadline_misses: usize,
    /// `deadline_misses / runs`.
    pub miss_rate: f64,
    /// Lateness of each frame's start behind its schedule, ms (jitter).
    pub start_lateness_ms: Latency,
}

/// Memory figures in bytes (`None` where the platform or build cannot tell).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Memory {
    /// Peak resident set size of the process (Linux `VmHWM`).
    pub peak_rss: Option<u64>,
    /// Peak resident set size of the process when the model had loaded (parsed and optimised),
    /// before any run (process-wide: it includes whatever the process did before `bench`).
    pub peak_rss_load: Option<u64>,
    /// Resident set size after warm-up.
    pub rss_after_warmup: Option<u64>,
    /// Resident set size after the last run.
    pub rss_end: Option<u64>,
    /// Peak heap bytes in use (needs the counting allocator, which the CLI installs).
    pub peak_heap: Option<u64>,
    /// Heap bytes in use after warm-up.
    pub heap_after_warmup: Option<u64>,
    /// Heap bytes in use after the last run; equal to `heap_after_warmup` in a steady state.
    pub heap_end: Option<u64>,
}

/// Everything `bench` measured. Field names and units are stable (times in ms, memory in bytes).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BenchReport {
    /// Model file.
    pub model: String,
    /// Weight precision recorded by the exporter (`f32`, `f16`, `int8`, `int8-static`, `q4`).
    pub precision: String,
    /// Size of the model file.
    pub file_bytes: u64,
    /// Bytes its tensors keep in ONNX external data (side file); absent when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub external_data_bytes: u64,
    /// Weight bytes tract keeps resident after optimisation (packed int8 / 4-bit stay small).
    pub resident_weight_bytes: u64,
    /// Load + optimise time.
    pub load_ms: f64,
    /// Warm-up runs made: `--warmup`, and at several threads more until the session has chosen
    /// where its runs go ([`Session::warm_up`]).
    pub warmup: usize,
    /// Measured runs.
    pub runs: usize,
    /// Matmul threads used (`--threads`, capped at this machine's cores).
    pub threads: usize,
    /// Measured runs on the thread pool, at several threads; the others ran on one thread, found
    /// faster (a small model, or the pool's cores busy with another process).
    pub pool_runs: u64,
    /// The pool's threads' share of their cores (CPU time over wall time) in those runs, where
    /// known: under 1 when another process took their cores.
    pub pool_share: Option<f64>,
    /// NaN / infinite values in the inputs (a broken sensor shows up here).
    pub nonfinite_input_values: usize,
    /// Measured runs whose outputs held a NaN or infinite value.
    pub nonfinite_output_runs: usize,
    /// Per-run latency.
    pub latency_ms: Latency,
    /// Runs per second (free-running: 1000 / mean latency; paced: achieved rate).
    pub throughput_per_s: f64,
    /// Memory.
    pub memory: Memory,
    /// Fixed-rate results, in paced mode.
    pub paced: Option<Paced>,
}

/// Percentile `q` (0..=100) of sorted `v`, linear interpolation between ranks (numpy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = (q / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Summary statistics of samples in ms.
pub fn latency(samples: &[f64]) -> Latency {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len().max(1) as f64;
    let mean = s.iter().sum::<f64>() / n;
    let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Latency {
        min: s.first().copied().unwrap_or(f64::NAN),
        mean,
        p50: percentile(&s, 50.0),
        p90: percentile(&s, 90.0),
        p99: percentile(&s, 99.0),
        max: s.last().copied().unwrap_or(f64::NAN),
        stddev: var.sqrt(),
    }
}

/// Deadline misses of a paced run: frame `i` is scheduled at `i * period`; it misses when it
/// finishes (`ends[i]`, offset from the first schedule) after `scheduled + period`.
pub fn deadline_misses(ends: &[f64], period: f64) -> usize {
    ends.iter().enumerate().filter(|(i, end)| **end > (*i as f64 + 1.0) * period).count()
}

/// Reads a `VmXXX:` field of /proc/self/status in bytes (Linux only).
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Deterministic inputs matching the model's inputs: f32 values in [-1, 1), integer inputs
/// within their declared range (token ids, distinct indices, all-ones masks).
pub fn synthetic_inputs(session: &Session) -> Result<Vec<Tensor>> {
    synthetic_for(session.inputs(), |i| session.input_range(i))
}

/// [`synthetic_inputs`] for input specs with their declared ranges.
pub fn synthetic_for(specs: &[crate::IoSpec], range: impl Fn(usize) -> Option<(i64, i64)>) -> Result<Vec<Tensor>> {
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let n: usize = spec.shape.iter().product();
            let t = match spec.dtype {
                DatumType::F32 => {
                    let v: Vec<f32> = (0..n).map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect();
                    Tensor::from_shape(&spec.shape, &v)
                }
                DatumType::I64 => {
                    let (lo, hi) = range(i).unwrap_or((0, 0));
                    let v: Vec<i64> = if spec.name == "attention_mask" {
                        vec![1; n]
                    } else if spec.shape.len() == 1 {
                        // Index inputs: distinct positions spread over the range.
                        (0..n as i64).map(|k| lo + k * (hi - lo + 1) / n as i64).collect()
                    } else {
                        (0..n).map(|_| lo + (next() % (hi - lo + 1) as u64) as i64).collect()
                    };
                    Tensor::from_shape(&spec.shape, &v)
                }
                other => {
                    return Err(Error::Input {
                        name: spec.name.clone(),
                        msg: format!("no synthetic data for {other:?} inputs; pass --input"),
                    })
                }
            };
            t.map_err(|e| Error::Run(e.to_string()))
        })
        .collect()
}

/// Loads `model` and benchmarks it on `inputs` (synthetic ones if `None`).
pub fn bench(model: &Path, inputs: Option<Vec<Tensor>>, opts: &BenchOptions) -> Result<BenchReport> {
    bench_on(model, inputs, opts, crate::Device::Cpu)
}

/// [`bench`](fn@bench) with the model prepared for `device` (CPU or, with the `cuda` feature, CUDA).
pub fn bench_on(
    model: &Path,
    inputs: Option<Vec<Tensor>>,
    opts: &BenchOptions,
    device: crate::Device,
) -> Result<BenchReport> {
    let threads = crate::set_threads(opts.threads)?;
    let t0 = Instant::now();
    let mut session = Session::load_on(model, device)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let peak_rss_load = proc_status_bytes("VmHWM:");
    let inputs = match inputs {
        Some(i) => i,
        None => synthetic_inputs(&session)?,
    };
    session.check_inputs(&inputs)?;
    let nonfinite_input_values = count_nonfinite(&inputs);
    let mut nonfinite_output_runs = 0;
    // `--warmup 0` times from the first run, the trial's included.
    let warmup = session.warm_up(&inputs, opts.warmup)?;
    // The per-run records are allocated before the steady-state snapshot, so a long run shows
    // the model's memory, not the benchmark's own bookkeeping. Runs expected: the count, or
    // the duration at the paced rate (or at the warm-up speed), up to a million (24 MB).
    let expected = match (opts.duration, opts.rate_hz) {
        (None, _) => opts.runs,
        (Some(d), Some(hz)) => (d.as_secs_f64() * hz).ceil() as usize + 1,
        (Some(d), None) => {
            let t = Instant::now();
            session.run(inputs.clone())?;
            (d.as_secs_f64() / t.elapsed().as_secs_f64().max(1e-6) * 1.25) as usize + 1
        }
    }
    .min(1_000_000);
    let mut samples = Vec::with_capacity(expected);
    let (mut starts, mut ends) = (Vec::with_capacity(expected), Vec::with_capacity(expected));
    for v in [&mut samples, &mut starts, &mut ends] {
        // Touch the pages now, so resident memory at the snapshot already holds them.
        v.resize(expected, 0.0f64);
        v.clear();
    }
    let rss_after_warmup = proc_status_bytes("VmRSS:");
    let heap_after_warmup = alloc::in_use();
    alloc::reset_peak();
    let used_before = session.pool_use();

    let period = opts.rate_hz.map(|hz| Duration::from_secs_f64(1.0 / hz));
    let begin = Instant::now();
    let mut i = 0usize;
    loop {
        let done = match opts.duration {
            Some(d) => begin.elapsed() >= d,
            None => i >= opts.runs,
        };
        if done {
            break;
        }
        if let Some(p) = period {
            let scheduled = begin + p.mul_f64(i as f64);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
        }
        let s = Instant::now();
        let outputs = session.run(inputs.clone())?;
        let e = Instant::now();
        nonfinite_output_runs += (count_nonfinite(&outputs) > 0) as usize;
        samples.push((e - s).as_secs_f64() * 1e3);
        starts.push((s - begin).as_secs_f64() * 1e3);
        ends.push((e - begin).as_secs_f64() * 1e3);
        i += 1;
    }
    let total_s = begin.elapsed().as_secs_f64();
    let used = session.pool_use().since(&used_before);
    let latency_ms = latency(&samples);
    let paced = period.map(|p| {
        let p_ms = p.as_secs_f64() * 1e3;
        let lateness: Vec<f64> = starts.iter().enumerate().map(|(i, s)| (s - i as f64 * p_ms).max(0.0)).collect();
        let misses = deadline_misses(&ends, p_ms);
        Paced {
            rate_hz: opts.rate_hz.unwrap_or_default(),
            deadline_ms: p_ms,
            deadline_misses: misses,
            miss_rate: misses as f64 / samples.len().max(1) as f64,
            start_lateness_ms: latency(&lateness),
        }
    });
    let throughput_per_s =
        if paced.is_some() { samples.len() as f64 / total_s.max(1e-9) } else { 1e3 / latency_ms.mean.max(1e-9) };
    Ok(BenchReport {
        model: model.display().to_string(),
        precision: session.metadata(crate::metadata::PRECISION).unwrap_or("f32").to_string(),
        file_bytes: std::fs::metadata(model).map(|m| m.len()).unwrap_or(0),
        external_data_bytes: session.external_data_bytes(),
        resident_weight_bytes: session.resident_weights().iter().map(|(_, b)| *b as u64).sum(),
        load_ms,
        warmup,
        runs: samples.len(),
        threads,
        pool_runs: used.pool_runs,
        pool_share: used.pool_share(),
        nonfinite_input_values,
        nonfinite_output_runs,
        latency_ms,
        throughput_per_s,
        memory: Memory {
            peak_rss: proc_status_bytes("VmHWM:"),
            peak_rss_load,
            rss_after_warmup,
            rss_end: proc_status_bytes("VmRSS:"),
            peak_heap: alloc::peak(),
            heap_after_warmup,
            heap_end: alloc::in_use(),
        },
        paced,
    })
}

/// What `bench` measures on a split model folder ([`crate::split`]).
#[derive(Clone, Debug, Serialize)]
pub struct SplitBenchReport {
    /// The folder.
    pub model: String,
    /// Loading and optimising every part.
    pub load_ms: f64,
    /// Measured runs of each step.
    pub runs: usize,
    /// Matmul threads used (`--threads`, capped at this machine's cores).
    pub threads: usize,
    /// Encoder (inputs -> latents, including the cross-attention).
    pub encoder_ms: Latency,
    /// One application of the weight-shared block, if the model has one.
    pub block_ms: Option<Latency>,
    /// Decoding: every position (`queries` null), and each bucket at its full size.
    pub decode_ms: Vec<DecodeTime>,
    /// End to end (encode with B block applications, decode every position), for B = 1 to the
    /// exported depth.
    pub per_block_count_ms: Vec<BlockCountTime>,
}

/// Decode latency for one query count.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeTime {
    /// Positions decoded (`None`: every position, the full decoder).
    pub queries: Option<usize>,
    /// Latency.
    pub latency_ms: Latency,
}

/// End-to-end latency for one block count.
#[derive(Clone, Debug, Serialize)]
pub struct BlockCountTime {
    /// Block applications.
    pub blocks: usize,
    /// Latency.
    pub latency_ms: Latency,
}

/// Benchmarks a split model folder: each part on its own, then end to end per block count.
pub fn bench_split(dir: &Path, inputs: Option<Vec<Tensor>>, opts: &BenchOptions) -> Result<SplitBenchReport> {
    let threads = crate::set_threads(opts.threads)?;
    let t0 = Instant::now();
    let mut model = crate::split::Model::load(dir)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let inputs = match inputs {
        Some(i) => i,
        None => synthetic_for(model.inputs(), |i| model.input_range(i))?,
    };
    let runs = opts.runs.max(1);
    // Each part's session chooses where its runs go in its first runs (see `Session::warm_up`).
    let warmup = if threads > 1 && opts.warmup > 0 { opts.warmup.max(crate::spin::TRIAL_RUNS) } else { opts.warmup };
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<Latency> {
        for _ in 0..warmup {
            f()?;
        }
        let mut v = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            f()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(latency(&v))
    };
    let m = model.manifest().clone();
    let encoder_ms = time(&mut || model.encode_with_blocks(inputs.clone(), 0).map(|_| ()))?;
    let z = model.encode(inputs.clone())?;
    let block_ms = match m.block {
        Some(_) => Some(time(&mut || model.apply_block_once(&z).map(|_| ()))?),
        None => None,
    };
    let mut decode_ms = vec![DecodeTime { queries: None, latency_ms: time(&mut || model.decode_all(&z).map(|_| ()))? }];
    let sets = model.index_inputs();
    for d in m.decoders.iter().skip(1) {
        let k = d.queries.expect("bucket");
        // Each index input at the bucket's size, spread over its positions.
        let idx: Vec<(String, Vec<i64>)> = sets
            .iter()
            .map(|(name, n)| {
                let len = k.min(*n) as i64;
                (name.clone(), (0..len).map(|i| i * *n as i64 / len).collect())
            })
            .collect();
        let points: Vec<(&str, &[i64])> = idx.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        let l = time(&mut || model.decode_points(&z, &points).map(|_| ()))?;
        decode_ms.push(DecodeTime { queries: Some(k), latency_ms: l });
    }
    let mut per_block_count_ms = vec![];
    for b in if m.blocks > 0 { 1..=m.blocks } else { 0..=0 } {
        let l = time(&mut || {
            let z = model.encode_with_blocks(inputs.clone(), b)?;
            model.decode_all(&z).map(|_| ())
        })?;
        per_block_count_ms.push(BlockCountTime { blocks: b, latency_ms: l });
    }
    Ok(SplitBenchReport {
        model: dir.display().to_string(),
        load_ms,
        runs,
        threads,
        encoder_ms,
        block_ms,
        decode_ms,
        per_block_count_ms,
    })
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy_linear_interpolation() {
        // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3.0, 7.6, 9.76]
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert!((percentile(&v, 90.0) - 7.6).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 9.76).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn latency_summary() {
        let l = latency(&[4.0, 2.0, 2.0, 4.0]);
        assert_eq!((l.min, l.max, l.mean, l.p50), (2.0, 4.0, 3.0, 3.0));
        assert_eq!(l.stddev, 1.0);
    }

    #[test]
    fn deadline_misses_count_late_finishes() {
        // period 10 ms: frame 0 due at 10, frame 1 at 20, frame 2 at 30.
        let ends = [9.0, 21.0, 30.0];
        assert_eq!(deadline_misses(&ends, 10.0), 1);
    }
}

/// Time spent in one kind of op (tract's optimised op name, or name and shape) per run, from
/// [`profile`].
#[derive(Clone, Debug, Serialize)]
pub struct OpTime {
    /// tract's op name (`OptMatMul`, `OptMatMulPack`, `Softmax`, ...), with [`OpKey::Shape`] followed
    /// by the node's description in brackets.
    pub op: String,
    /// Nodes of this kind evaluated per run.
    pub nodes: usize,
    /// Mean time per run, ms.
    pub ms: f64,
    /// Share of the summed op time, 0..=1.
    pub share: f64,
}

/// Where a run's time goes: loads `model`, warms up once, runs it `runs` times timing every node,
/// and returns the time per op kind, or per kind and shape (`key`), slowest first. Per-node timing
/// adds a little overhead, so the sum exceeds a plain run's latency slightly; use it for shares,
/// not for latency.
pub fn profile(
    model: &Path,
    inputs: Option<Vec<Tensor>>,
    runs: usize,
    threads: usize,
    key: OpKey,
) -> Result<Vec<OpTime>> {
    crate::set_threads(threads)?;
    let mut session = Session::load(model)?;
    let inputs = match inputs {
        Some(i) => i,
        None => synthetic_inputs(&session)?,
    };
    session.run(inputs.clone())?;
    let mut per_op = std::collections::BTreeMap::new();
    let runs = runs.max(1);
    for _ in 0..runs {
        session.run_profiled(inputs.clone(), &mut per_op, key)?;
    }
    let total: f64 = per_op.values().map(|(_, d): &(usize, Duration)| d.as_secs_f64()).sum();
    let mut ops: Vec<OpTime> = per_op
        .into_iter()
        .map(|(op, (n, d))| OpTime {
            op,
            nodes: n / runs,
            ms: d.as_secs_f64() * 1e3 / runs as f64,
            share: d.as_secs_f64() / total.max(1e-12),
        })
        .collect();
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(ops)
}
