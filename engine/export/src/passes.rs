//! Graph rewrites. Each pass is named, acts on the exporter's [`Graph`] and must keep the
//! graph's outputs (exact passes) or state its tolerance (lossy ones, e.g. quantisation).

use crate::error::Result;
use crate::graph::Graph;

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

/// Runs `passes` in order, recording their names in the graph metadata.
pub fn run_all(g: &mut Graph, passes: &[&dyn Pass]) -> Result<()> {
    let mut names = vec![];
    for p in passes {
        p.run(g)?;
        names.push(p.name());
    }
    g.metadata.push(("perceiver_edge.passes".into(), names.join(",")));
    Ok(())
}
