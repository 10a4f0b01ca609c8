//! Graph rewrites. Each pass is named, acts on the exporter's [`Graph`] and must keep the
//! graph's outputs (exact passes) or state its tolerance (lossy ones, e.g. quantisation).

use crate::error::Result;
use crate::ir::Graph;

// --- performance rewrites (issue #3) ---
mod chunked_attention;
mod constant_query;
mod few_queries;
mod position_split;
pub mod quant;
pub mod tables;
mod util;
pub use chunked_attention::ChunkedAttention;
pub use constant_query::ConstantQueryAttention;
pub use few_queries::FewQueryAttention;
pub use position_split::PositionSplit;

pub use crate::options::PerfOptions;

/// The performance passes selected by `o` that add no tables, in order (the table rewrites run
/// before them, by [`tables::apply`]).
pub fn perf_passes(o: &PerfOptions) -> Vec<&'static dyn Pass> {
    let mut v: Vec<&'static dyn Pass> = vec![];
    if !o.no_rewrites && !o.quantised {
        v.push(&FewQueryAttention);
    }
    v
}
// --- end performance rewrites ---

/// A named `Graph -> Graph` rewrite.
pub trait Pass {
    /// Short name used on the command line and in reports.
    fn name(&self) -> &'static str;
    /// Rewrites `g` in place.
    fn run(&self, g: &mut Graph) -> Result<()>;
}

/// Removes nodes and constants no output depends on.
pub struct Prune;

impl Pass for Prune {
    fn name(&self) -> &'static str {
        "prune"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        g.prune();
        Ok(())
    }
}

/// Records in `g`'s metadata that pass `name` rewrote `sites` places (`inspect` and the export
/// report list them).
pub fn record_rewrites(g: &mut Graph, name: &str, sites: usize) {
    if sites > 0 {
        g.metadata.push((crate::metadata::rewrites_key(name), sites.to_string()));
    }
}

/// The default pass sequence of an export: the table rewrites `o.tables` allows (with their
/// decisions, for the report), the other performance rewrites, then [`Prune`].
pub fn run_default(g: &mut Graph, o: &PerfOptions) -> Result<Vec<crate::summary::TableDecision>> {
    let (done, decisions) = tables::apply(g, o)?;
    let mut list: Vec<&dyn Pass> = perf_passes(o);
    let chunked = ChunkedAttention::from_options(o);
    if let Some(c) = &chunked {
        list.push(c);
    }
    list.push(&Prune);
    run_all_after(g, &done, &list)?;
    Ok(decisions)
}

/// Runs `passes` in order, recording their names in the graph metadata.
pub fn run_all(g: &mut Graph, passes: &[&dyn Pass]) -> Result<()> {
    run_all_after(g, &[], passes)
}

/// [`run_all`] after the passes named `done` already ran (recorded first).
pub fn run_all_after(g: &mut Graph, done: &[&str], passes: &[&dyn Pass]) -> Result<()> {
    let mut names: Vec<&str> = done.to_vec();
    for p in passes {
        p.run(g)?;
        names.push(p.name());
    }
    g.metadata.push((crate::metadata::PASSES.into(), names.join(",")));
    Ok(())
}
