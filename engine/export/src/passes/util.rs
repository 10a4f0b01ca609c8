//! Graph queries shared by the rewrite passes.

use crate::graph::Graph;
use std::collections::HashMap;

/// Value name -> index of the node that produces it.
pub fn producers(g: &Graph) -> HashMap<&str, usize> {
    let mut m = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for o in &n.outputs {
            m.insert(o.name.as_str(), i);
        }
    }
    m
}

/// Indices of the nodes that read value `name` (each once), in graph order.
pub fn consumers(g: &Graph, name: &str) -> Vec<usize> {
    g.nodes.iter().enumerate().filter(|(_, n)| n.inputs.iter().any(|i| i == name)).map(|(i, _)| i).collect()
}
