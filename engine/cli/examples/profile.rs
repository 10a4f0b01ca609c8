//! Per-node profile of an exported graph in tract: loads it with tract's own optimiser (without
//! the runtime's rewrites, such as the `gemm` products: `perceiver-edge bench --profile RUNS` times
//! the runtime's plan per kind of op), runs it on synthetic inputs and times every node with
//! `SimpleState::run_plan_with_eval`, then prints time per stage (the first segment of the
//! exporter's node names), per op and the slowest nodes.
//!
//! ```sh
//! cargo run --release -p perceiver-edge --example profile -- model.onnx [RUNS]
//! ```
//!
//! Environment: `TOP=N` (slowest nodes listed), `INFO=1` (each node's op details: kernel,
//! packing), `CONSTS=1` (every constant of 1 MiB or more left in the plan, with the ops that
//! read it: where a weight stays unpacked next to its packed copy).

use perceiver_edge_runtime::tract_onnx;
use perceiver_edge_runtime::{bench::synthetic_inputs, Session};
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: profile MODEL.onnx [RUNS]");
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(20);
    let session = Session::load(path.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let inputs = synthetic_inputs(&session).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut typed = tract_onnx::onnx().model_for_path(path)?.into_typed()?;
    // As `Session` does: f16 computed in f32 where the CPU has no f16 arithmetic.
    perceiver_edge_runtime::f16_as_f32::apply(&mut typed)?;
    let plan = typed.into_optimized()?.into_runnable()?;
    let mut state = TypedSimpleState::new(&plan)?;
    let mut per_node: HashMap<usize, f64> = HashMap::new();
    let tv: TVec<TValue> = inputs.iter().cloned().map(|t| t.into_tvalue()).collect();
    state.run(tv.clone())?;
    let t0 = Instant::now();
    for _ in 0..runs {
        state.run_plan_with_eval(tv.clone(), |ctx, st, node, input| {
            let t = Instant::now();
            let r = tract_onnx::tract_core::plan::eval(ctx, st, node, input);
            *per_node.entry(node.id).or_default() += t.elapsed().as_secs_f64() * 1e3 / runs as f64;
            r
        })?;
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3 / runs as f64;
    let model = plan.model();
    let total: f64 = per_node.values().sum();
    let mut by_stage: Vec<(String, f64)> = vec![];
    let mut by_op: HashMap<String, f64> = HashMap::new();
    for (id, t) in &per_node {
        let n = model.node(*id);
        let s = perceiver_edge_runtime::metadata::stage_of(&n.name);
        match by_stage.iter_mut().find(|(k, _)| *k == s) {
            Some(e) => e.1 += t,
            None => by_stage.push((s, *t)),
        }
        *by_op.entry(n.op().name().to_string()).or_default() += t;
    }
    by_stage.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("{path}: {wall:.2} ms per run (wall, {runs} runs), {total:.2} ms in nodes");
    println!("per stage:");
    for (s, t) in &by_stage {
        println!("  {s:<28} {t:8.3} ms  {:5.1} %", 100.0 * t / total);
    }
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("per op:");
    for (s, t) in ops.iter().take(12) {
        println!("  {s:<28} {t:8.3} ms  {:5.1} %", 100.0 * t / total);
    }
    let mut nodes: Vec<_> = per_node.into_iter().collect();
    nodes.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("slowest nodes:");
    for (id, t) in nodes.iter().take(std::env::var("TOP").ok().and_then(|v| v.parse().ok()).unwrap_or(25)) {
        let n = model.node(*id);
        let fact = model.outlet_fact(OutletId::new(*id, 0)).map(|f| format!("{f:?}")).unwrap_or_default();
        println!("  {t:8.3} ms  {:<60} {:<20} {}", n.name, n.op().name(), fact);
        if std::env::var("INFO").is_ok() {
            for line in n.op().info().unwrap_or_default() {
                println!("              {line}");
            }
        }
    }
    if std::env::var("CONSTS").is_ok() {
        println!("constants of 1 MiB or more:");
        for n in model.nodes() {
            let Some(c) = n.op_as::<tract_onnx::tract_core::ops::konst::Const>() else { continue };
            let t = c.val();
            let bytes = t.len() * t.datum_type().size_of();
            if bytes < 1 << 20 {
                continue;
            }
            let readers: Vec<String> = n.outputs[0]
                .successors
                .iter()
                .map(|s| format!("{} ({})", model.node(s.node).name, model.node(s.node).op().name()))
                .collect();
            println!(
                "  {:8.2} MiB {:?} {:<50} -> {}",
                bytes as f64 / 1048576.0,
                t.datum_type(),
                n.name,
                readers.join(", ")
            );
        }
    }
    Ok(())
}
