//! The precomputed tables the rewrites add (memory bought for speed): their names, so the
//! quantisation passes and the export report can tell them from weights, and the policy that
//! decides which are kept (`--tables auto|all|none`).
//!
//! **The `auto` rule.** The table rewrites run in order (`position_split`, then
//! `constant_query_attention`, which needs the first one's tables). A rewrite's tables are kept
//! when the graph's constants grow by no more than [`MAX_SHARE`] (25 %) of the model's weight
//! bytes (the constants the outputs depend on before any table rewrite), counting every kept
//! rewrite together: tables no larger than the constants they replace (position features,
//! projection weights, an earlier table) always pass; larger ones pass while the excess stays
//! within the share.
//!
//! Growth is measured on the rewritten graph. Before that, a rewrite whose estimated tables
//! (sizes from the matched shapes, nothing computed) exceed the weights plus the share, so
//! that it must fail whatever it replaces, is skipped without building them. When
//! `position_split` is skipped, `constant_query_attention` cannot apply. `all` keeps every
//! table that applies; `none` runs neither rewrite. Each decision is listed in the export report
//! with the table bytes, the bytes replaced and the multiply-add FLOPs per inference the rewrite
//! saves where it runs (before `few_query_attention`).

use super::{constant_query, position_split, ConstantQueryAttention, Pass, PositionSplit};
use crate::error::Result;
use crate::ir::{Graph, TensorData};
use crate::options::{PerfOptions, Tables};
use crate::summary::TableDecision;

/// Names of the constants the rewrites precompute from constant queries and positions (kept in
/// f32 by the int8 and q4 passes: attention scores are where quantisation error hurts most).
pub const TABLE_CONSTANTS: &[&str] =
    &["position_table", "query_position_scores", "value_position_table", "query_key_weight"];

/// The largest share of the model's weight bytes by which `auto` lets tables grow the graph.
pub const MAX_SHARE: f64 = 0.25;

/// Whether a constant of `name` is a rewrite table (see [`TABLE_CONSTANTS`]).
pub fn is_table(name: &str) -> bool {
    TABLE_CONSTANTS.iter().any(|t| name.contains(t))
}

/// Constant bytes and multiply-add FLOPs of what the outputs depend on (what the final prune
/// keeps), measured on a copy of the graph without the constants' data.
pub fn live_cost(g: &Graph) -> (usize, u64) {
    let (bytes, cost) = live(g);
    (bytes, cost.flops.iter().map(|(_, f)| f).sum())
}

/// Constant bytes and [`crate::summary::Cost`] of what the outputs depend on.
fn live(g: &Graph) -> (usize, crate::summary::Cost) {
    let mut s = Graph::default();
    s.inputs = g.inputs.clone();
    s.outputs = g.outputs.clone();
    s.nodes = g.nodes.clone();
    s.constants = g
        .constants
        .iter()
        .map(|(n, t)| (n.clone(), TensorData { dtype: t.dtype, shape: t.shape.clone(), bytes: Default::default() }))
        .collect();
    s.prune();
    let len: std::collections::HashMap<&str, usize> =
        g.constants.iter().map(|(n, t)| (n.as_str(), t.byte_len())).collect();
    let bytes = s.constants.iter().map(|(n, _)| len.get(n.as_str()).copied().unwrap_or(0)).sum();
    (bytes, crate::summary::cost(&s))
}

/// What one table rewrite did to a graph.
struct Step {
    /// Bytes of the tables it recorded.
    tables: usize,
    /// Bytes of constants it removed (net of the other constants it added).
    replaces: usize,
    /// Multiply-add FLOPs per inference saved.
    flops_saved: u64,
}

fn run_measured(g: &mut Graph, pass: &dyn Pass) -> Result<Step> {
    let (bytes, flops) = live_cost(g);
    pass.run(g)?;
    let key = crate::metadata::tables_key(pass.name());
    let tables = g.metadata.iter().find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let (bytes_after, flops_after) = live_cost(g);
    let removed = (bytes + tables).saturating_sub(bytes_after);
    Ok(Step { tables, replaces: removed, flops_saved: flops.saturating_sub(flops_after) })
}

fn decision(pass: &dyn Pass, kept: bool, step: &Step, reason: String) -> TableDecision {
    TableDecision {
        pass: pass.name().to_string(),
        kept,
        bytes: step.tables,
        replaces: Some(step.replaces),
        flops_saved: step.flops_saved,
        reason,
    }
}

fn human(b: usize) -> String {
    crate::summary::human(b)
}

/// Runs the table rewrites on `g` as policy `o.tables` decides (see the module documentation).
/// Returns the names of the rewrites applied (for the graph's pass list) and every decision.
pub fn apply(g: &mut Graph, o: &PerfOptions) -> Result<(Vec<&'static str>, Vec<TableDecision>)> {
    let (split, cq): (&dyn Pass, &dyn Pass) = (&PositionSplit, &ConstantQueryAttention);
    let mut decisions = vec![];
    if o.no_rewrites {
        return Ok((vec![], decisions));
    }
    let needs = || format!("needs {}'s tables", split.name());
    if o.tables == Tables::None {
        let (sites, bytes, flops) = position_split::estimate(g);
        if sites > 0 {
            let reason = o.tables_off_reason.unwrap_or("--tables none").to_string();
            decisions.push(TableDecision {
                pass: split.name().into(),
                kept: false,
                bytes,
                replaces: None,
                flops_saved: flops,
                reason,
            });
            decisions.push(TableDecision::unknown(cq.name(), needs()));
        }
        return Ok((vec![], decisions));
    }
    let names = vec![split.name(), cq.name()];
    let (sites, estimate, estimate_flops) = position_split::estimate(g);
    if sites == 0 || o.tables == Tables::All {
        // Nothing to decide (or `all`): both rewrites run on the graph itself.
        let why = if o.tables == Tables::All { "--tables all" } else { "auto" };
        for pass in [split, cq] {
            let step = run_measured(g, pass)?;
            if step.tables > 0 {
                decisions.push(decision(pass, true, &step, why.to_string()));
            }
        }
        return Ok((names, decisions));
    }
    let weights = o.table_share_of.unwrap_or_else(|| live_cost(g).0);
    let share = o.max_table_share.unwrap_or(MAX_SHARE);
    let budget = (share * weights as f64) as i64;
    let signed = |b: i64| if b < 0 { format!("-{}", human(b.unsigned_abs() as usize)) } else { human(b as usize) };
    let over = |t: usize, growth: Option<i64>| match growth {
        None => format!(
            "auto: {} of tables, more than the {} of weights plus {:.0} %",
            human(t),
            human(weights),
            share * 100.0
        ),
        Some(g) => format!(
            "auto: the graph would grow by {}, over {:.0} % of the {} of weights",
            signed(g),
            share * 100.0,
            human(weights)
        ),
    };
    let kept_why = |growth: i64| {
        if growth <= 0 {
            "auto: no larger than what they replace".to_string()
        } else {
            format!("auto: the graph grows by {}, within {:.0} % of the weights", signed(growth), share * 100.0)
        }
    };
    if estimate as i64 > weights as i64 + budget {
        decisions.push(TableDecision {
            pass: split.name().into(),
            kept: false,
            bytes: estimate,
            replaces: None,
            flops_saved: estimate_flops,
            reason: over(estimate, None),
        });
        decisions.push(TableDecision::unknown(cq.name(), needs()));
        return Ok((vec![], decisions));
    }
    let mut g1 = g.clone();
    let s1 = run_measured(&mut g1, split)?;
    let growth1 = s1.tables as i64 - s1.replaces as i64;
    if growth1 > budget {
        decisions.push(decision(split, false, &s1, over(s1.tables, Some(growth1))));
        decisions.push(TableDecision::unknown(cq.name(), needs()));
        return Ok((vec![], decisions));
    }
    *g = g1;
    decisions.push(decision(split, true, &s1, kept_why(growth1)));
    let (cq_sites, added, removed) = constant_query::estimate(g);
    if cq_sites == 0 {
        run_measured(g, cq)?;
        return Ok((names, decisions));
    }
    if added as i64 > (removed + weights) as i64 + budget {
        decisions.push(TableDecision {
            pass: cq.name().into(),
            kept: false,
            bytes: added,
            replaces: Some(removed),
            flops_saved: 0,
            reason: over(added, None),
        });
        return Ok((vec![split.name()], decisions));
    }
    let mut g2 = g.clone();
    let s2 = run_measured(&mut g2, cq)?;
    // Net change of both rewrites together (may be negative: tables replacing larger features).
    let total = growth1 + s2.tables as i64 - s2.replaces as i64;
    if total > budget {
        decisions.push(decision(cq, false, &s2, over(s2.tables, Some(total))));
        return Ok((vec![split.name()], decisions));
    }
    *g = g2;
    decisions.push(decision(cq, true, &s2, kept_why(total)));
    Ok((names, decisions))
}

/// Bytes of a graph's f32 constants stored at `weight_bytes` per weight (f16 2, int8 1, q4
/// 0.5), as the quantisation passes store them: small tensors stay f32, the tables are stored
/// f16 (`quant::quantize_storage`), q4 Linear weights (a `MatMul`'s 2-D second input)
/// take 4 bits plus an f16 scale per 32, and below f16 every other large constant is stored int8.
pub fn stored_bytes(g: &Graph, weight_bytes: f64) -> f64 {
    let linear: std::collections::HashSet<&str> =
        g.nodes.iter().filter(|n| n.op == "MatMul").filter_map(|n| n.inputs.get(1).map(String::as_str)).collect();
    g.constants
        .iter()
        .filter(|(_, t)| t.dtype == crate::ir::DType::F32)
        .map(|(n, t)| {
            let per = if t.len() < super::quant::MIN_QUANT_ELEMENTS {
                4.0
            } else if is_table(n) {
                2.0
            } else if weight_bytes >= 1.0 {
                weight_bytes
            } else if t.shape.len() == 2 && linear.contains(n.as_str()) {
                weight_bytes + 2.0 / 32.0
            } else {
                1.0
            };
            per * t.len() as f64
        })
        .sum()
}

/// A graph's size when stored below f32 ([`stored_bytes`]), its multiply-add FLOPs per
/// inference and its largest activation: what `--tables auto` weighs for a graph stored below f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoredCost {
    /// Stored bytes of its constants.
    pub bytes: f64,
    /// FLOPs per inference.
    pub flops: u64,
    /// Bytes of its largest intermediate value.
    pub activation: f64,
}

impl StoredCost {
    /// The cost of `g` stored at `weight_bytes` per weight.
    pub fn of(g: &Graph, weight_bytes: f64) -> StoredCost {
        let (_, cost) = live(g);
        StoredCost {
            bytes: stored_bytes(g, weight_bytes),
            flops: cost.flops.iter().map(|(_, f)| f).sum(),
            activation: cost.largest_activation.1 as f64,
        }
    }

    /// Memory a run needs, as `tune` and the memory bounds model it: the stored constants plus
    /// twice the largest activation (the runtime's base left out: the same either way).
    pub fn run_bytes(&self) -> f64 {
        self.bytes + 2.0 * self.activation
    }
}

/// The share by which the tables grow the stored graph and the share of its FLOPs they save.
fn shares(without: StoredCost, with: StoredCost) -> (f64, f64) {
    let growth = (with.bytes - without.bytes) / without.bytes.max(1.0);
    let saved = without.flops.saturating_sub(with.flops) as f64 / without.flops.max(1) as f64;
    (growth, saved)
}

/// Whether a graph stored below f32 keeps the tables `auto` would keep in f32: when they make it
/// no larger, or grow it by a smaller share than the share of its FLOPs they save (memory bought
/// for speed at no worse than one to one), or save FLOPs and make a run need no more memory
/// ([`StoredCost::run_bytes`]: the activations they remove outweigh the bytes they add). The
/// bench model's int8 graph grows by 42 % for 57 % fewer FLOPs (kept: it runs 3x faster and
/// peaks lower, the inputs' keys and values never exist); its q4 graph by 65 % for 57 %, but a
/// run needs 20 % less memory (kept); vision-perceiver-fourier's by 64 % for 3 % fewer, and its
/// largest activation doubles (dropped).
pub fn pay_at_stored_precision(without: StoredCost, with: StoredCost) -> bool {
    let (growth, saved) = shares(without, with);
    growth <= 0.0 || growth <= saved || (saved > 0.0 && with.run_bytes() <= without.run_bytes())
}

/// The numbers behind [`pay_at_stored_precision`], for the export report.
pub fn stored_reason(without: StoredCost, with: StoredCost) -> String {
    let (growth, saved) = shares(without, with);
    if growth <= 0.0 {
        return format!("at the stored precision the graph is {:.0} % smaller with them", -100.0 * growth);
    }
    let run = with.run_bytes() / without.run_bytes().max(1.0) - 1.0;
    format!(
        "at the stored precision the graph grows by {:.0} % for {:.0} % fewer FLOPs, and a run needs {:.0} % {} memory",
        100.0 * growth,
        100.0 * saved,
        100.0 * run.abs(),
        if run <= 0.0 { "less" } else { "more" }
    )
}

/// `o` without tables, because at the stored precision they do not pay
/// ([`pay_at_stored_precision`]).
pub fn off_at_stored_precision(o: &PerfOptions) -> PerfOptions {
    PerfOptions {
        tables: Tables::None,
        tables_off_reason: Some("auto: at the stored precision the tables do not pay"),
        ..*o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(mib: f64, gflops: f64) -> StoredCost {
        cost_run(mib, gflops, 0.0)
    }

    fn cost_run(mib: f64, gflops: f64, activation_mib: f64) -> StoredCost {
        StoredCost { bytes: mib * 1048576.0, flops: (gflops * 1e9) as u64, activation: activation_mib * 1048576.0 }
    }

    #[test]
    fn tables_pay_at_stored_precision_when_they_save_a_larger_share_of_flops_than_they_add_bytes() {
        // Smaller with the tables: always kept, whatever the FLOPs.
        assert!(pay_at_stored_precision(cost(4.0, 1.0), cost(3.9, 1.0)));
        // The bench model at int8 (export report figures): +42 % bytes for 57 % fewer FLOPs.
        assert!(pay_at_stored_precision(cost(4.43, 2.47), cost(6.3, 1.07)));
        // vision-perceiver-fourier at int8 with both tables (`--tables all`): twice the bytes
        // for 7 % fewer FLOPs.
        assert!(!pay_at_stored_precision(cost(59.1, 406.0), cost(120.5, 379.0)));
        // Larger and no faster (no FLOPs, or more of them): dropped.
        assert!(!pay_at_stored_precision(cost(4.0, 0.0), cost(4.1, 0.0)));
        assert!(!pay_at_stored_precision(cost(4.0, 1.0), cost(4.1, 1.2)));
        let why = stored_reason(cost(4.0, 2.0), cost(5.0, 1.0));
        assert_eq!(
            why,
            "at the stored precision the graph grows by 25 % for 50 % fewer FLOPs, and a run needs 25 % more memory"
        );
    }

    #[test]
    fn tables_pay_at_stored_precision_when_a_run_needs_less_memory_with_them() {
        // The bench model at q4 (export report figures): +65 % bytes for 57 % fewer FLOPs, but
        // the largest activation halves: 3.4 + 2 x 4.1 MiB without, 5.6 + 2 x 2.0 with.
        let (without, with) = (cost_run(3.4, 2.47, 4.08), cost_run(5.6, 1.07, 2.0));
        assert!(!pay_at_stored_precision(cost(3.4, 2.47), cost(5.6, 1.07)), "on bytes and FLOPs alone: dropped");
        assert!(pay_at_stored_precision(without, with));
        assert!(
            stored_reason(without, with).ends_with("and a run needs 17 % less memory"),
            "{}",
            stored_reason(without, with)
        );
        // vision-perceiver-fourier at q4: twice the bytes, 3 % fewer FLOPs, the largest
        // activation 50 -> 98 MiB: dropped.
        assert!(!pay_at_stored_precision(cost_run(45.0, 406.0, 50.0), cost_run(89.0, 394.0, 98.0)));
        // Less memory but no FLOPs saved: nothing bought, dropped.
        assert!(!pay_at_stored_precision(cost_run(4.0, 1.0, 4.0), cost_run(5.0, 1.0, 2.0)));
    }
}
