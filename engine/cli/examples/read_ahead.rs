//! The packed f32 products' read-ahead (`f32_packed.rs`: the next pass's weight panels fetched
//! into L2) measured against the products without it: one session, blocks of runs alternated
//! with the read-ahead on and off (the order reversed every other block, so neither side always
//! follows the other), the median of the per-block ratios printed. On a shared host whose speed
//! changes for seconds at a time, alternated blocks in one process are what compares.
//!
//! ```sh
//! cargo run --release -p perceiver-edge --example read_ahead -- model.onnx [BLOCKS] [RUNS] [THREADS]
//! ```
//!
//! Defaults: 10 blocks of 3 runs a side, one thread. Synthetic inputs, as `bench` uses; the two
//! sides' outputs are checked bit for bit equal first.

use perceiver_edge_runtime::bench::{percentile, synthetic_inputs};
use perceiver_edge_runtime::{set_read_ahead, set_threads, to_vec, Session, Tensor};
use std::time::Instant;

fn main() {
    if let Err(e) = measure() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Loads the model, checks both sides' outputs, alternates the blocks and prints the figures.
fn measure() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: read_ahead MODEL.onnx [BLOCKS] [RUNS] [THREADS]";
    let path = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?;
    let number = |i: usize, default: usize| -> anyhow::Result<usize> {
        args.get(i).map_or(Ok(default), |v| v.parse().map_err(|_| anyhow::anyhow!("{usage}: {v:?} is not a count")))
    };
    let (blocks, runs, threads) = (number(2, 10)?.max(1), number(3, 3)?.max(1), number(4, 1)?.max(1));
    set_threads(threads).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut session = Session::load(path.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let inputs = synthetic_inputs(&session).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Warm-up (at several threads, until the engine has chosen between its pool and one thread).
    session.warm_up(&inputs, 2).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut run = |on: bool| -> anyhow::Result<(f64, Vec<Tensor>)> {
        set_read_ahead(on);
        let t = Instant::now();
        let out = session.run(inputs.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((t.elapsed().as_secs_f64() * 1e3, out))
    };
    let (on, off) = (run(true)?.1, run(false)?.1);
    // Every output, f32 ones bit for bit.
    let same = on.len() == off.len()
        && on.iter().zip(&off).all(|(x, y)| match (to_vec::<f32>(x), to_vec::<f32>(y)) {
            (Some(a), Some(b)) => a.len() == b.len() && a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            _ => x == y,
        });
    anyhow::ensure!(same, "outputs differ with the read-ahead on and off");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(&v, 50.0)
    };
    let (mut t_on, mut t_off) = (vec![], vec![]);
    for b in 0..blocks {
        let order = if b % 2 == 0 { [true, false] } else { [false, true] };
        for on in order {
            let times = (0..runs).map(|_| run(on).map(|r| r.0)).collect::<anyhow::Result<Vec<_>>>()?;
            if on { &mut t_on } else { &mut t_off }.push(median(times));
        }
    }
    set_read_ahead(true);
    let ratios: Vec<f64> = t_on.iter().zip(&t_off).map(|(a, b)| a / b).collect();
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" ");
    println!("{path}, {threads} thread(s), {blocks} blocks of {runs} runs a side (p50 ms a block)");
    println!("  read-ahead on : {}", list(&t_on));
    println!("  read-ahead off: {}", list(&t_off));
    println!("  on / off, median of the blocks' ratios: {:.3}", median(ratios));
    Ok(())
}
