//! What `inspect` reports: architecture sizes, parameters, FLOPs per stage and memory, computed
//! from the built graph (so it describes exactly what is exported).

use crate::ir::{DType, Graph, Node};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// The summary is stored as JSON in the ONNX model under [`metadata::SUMMARY`]; its fields keep
/// the tuple form already written into exported files, which `inspect` reads back.
use crate::metadata;

/// Architecture, cost and memory of an exported graph.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// transformers head class.
    pub architecture: String,
    /// Sizes: `N`, `D` (latents), `M`, `C` (inputs), `O`, `E` (output queries).
    pub dims: BTreeMap<String, usize>,
    /// `num_blocks` x `num_self_attends_per_block`.
    pub depth: (usize, usize),
    /// Cross- and self-attention heads of the encoder.
    pub heads: (usize, usize),
    /// Fixed batch size.
    pub batch: usize,
    /// Parameters in the checkpoint.
    pub parameters: usize,
    /// Multiply-add FLOPs (2 per MAC) of matmuls and convolutions, per stage, in graph order.
    pub flops: Vec<(String, u64)>,
    /// Bytes of constants (weights and precomputed tables) in the graph.
    pub weight_bytes: usize,
    /// The largest intermediate value: (name, bytes).
    pub largest_activation: (String, usize),
    /// Graph inputs: (name, dtype, shape).
    pub inputs: Vec<(String, String, Vec<usize>)>,
    /// Graph outputs: (name, dtype, shape).
    pub outputs: Vec<(String, String, Vec<usize>)>,
    /// Precomputed tables added by rewrite passes (memory traded for speed): (pass, bytes).
    #[serde(default)]
    pub tables: Vec<(String, usize)>,
    /// Exact rewrite passes that changed the graph: (pass, sites rewritten).
    #[serde(default)]
    pub rewrites: Vec<(String, usize)>,
    /// The table policy's decisions at export (`--tables`): printed by `export`, not stored in
    /// the file (whose summary keeps `tables`, the tables it holds).
    #[serde(skip)]
    pub table_decisions: Vec<TableDecision>,
}

/// One table rewrite kept or skipped by the table policy (see [`crate::passes::tables`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableDecision {
    /// The rewrite pass.
    pub pass: String,
    /// Whether its tables are in the exported graph.
    pub kept: bool,
    /// Bytes of its tables (measured, or estimated from the matched shapes when it was not run).
    pub bytes: usize,
    /// Bytes of the constants the rewrite removes, when known.
    pub replaces: Option<usize>,
    /// Multiply-add FLOPs (2 per MAC) per inference the rewrite saves (0: unknown).
    pub flops_saved: u64,
    /// Why it was kept or skipped.
    pub reason: String,
}

impl TableDecision {
    /// A rewrite skipped before anything about it could be measured.
    pub fn unknown(pass: &str, reason: String) -> TableDecision {
        TableDecision { pass: pass.to_string(), reason, ..Default::default() }
    }
}

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

/// What a graph costs to run and to hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cost {
    /// Multiply-add FLOPs (2 per MAC) of matmuls and convolutions, per stage, in graph order.
    pub flops: Vec<(String, u64)>,
    /// Bytes of constants (weights and precomputed tables).
    pub weight_bytes: usize,
    /// The largest intermediate value: (name, bytes).
    pub largest_activation: (String, usize),
}

/// Multiply-add FLOPs (2 per MAC) of node `n` if it is a matmul or convolution, else 0.
fn node_flops(n: &Node, shapes: &HashMap<&str, &[usize]>) -> u64 {
    let numel = n.outputs[0].numel() as u64;
    match n.op.as_str() {
        "MatMul" | "MatMulInteger" | "MatMulNBits" => {
            let k = shapes.get(n.inputs[0].as_str()).and_then(|s| s.last()).copied().unwrap_or(0);
            2 * numel * k as u64
        }
        "Conv" => {
            let w = shapes.get(n.inputs[1].as_str()).map(|s| s[1..].iter().product::<usize>()).unwrap_or(0);
            2 * numel * w as u64
        }
        _ => 0,
    }
}

/// A graph's product FLOPs by the arithmetic they run in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ProductFlops {
    /// f32 products, 4-bit weight products included (their weights are decoded to f32).
    pub f32: u64,
    /// Products with f16 results.
    pub f16: u64,
    /// Integer products (`MatMulInteger`).
    pub int8: u64,
}

/// Splits `g`'s product FLOPs by arithmetic (their sum is [`Cost::flops`]' total).
pub fn product_flops(g: &Graph) -> ProductFlops {
    let shapes = g.value_shapes();
    let mut p = ProductFlops::default();
    for n in &g.nodes {
        let f = node_flops(n, &shapes);
        match (n.op.as_str(), n.outputs[0].dtype) {
            ("MatMulInteger", _) => p.int8 += f,
            (_, DType::F16) => p.f16 += f,
            _ => p.f32 += f,
        }
    }
    p
}

/// Computes FLOPs per stage and memory of `g`.
pub fn cost(g: &Graph) -> Cost {
    let shapes = g.value_shapes();
    let mut flops: Vec<(String, u64)> = vec![];
    let mut largest = (String::new(), 0usize);
    for n in &g.nodes {
        let out = &n.outputs[0];
        let f = node_flops(n, &shapes);
        if f > 0 {
            let stage = metadata::stage_of(&n.name);
            match flops.iter_mut().find(|(s, _)| *s == stage) {
                Some(e) => e.1 += f,
                None => flops.push((stage, f)),
            }
        }
        let bytes = out.numel() * out.dtype.size();
        if bytes > largest.1 {
            largest = (out.name.clone(), bytes);
        }
    }
    let weight_bytes = g.constants.iter().map(|(_, t)| t.byte_len()).sum();
    Cost { flops, weight_bytes, largest_activation: largest }
}

/// `bytes` in B, KiB or MiB.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1048576.0 {
        format!("{:.2} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

impl Summary {
    /// Builds the summary of graph `g` exported from a checkpoint.
    pub fn new(
        g: &Graph,
        architecture: &str,
        dims: &BTreeMap<&str, usize>,
        cfg: &crate::checkpoint::PerceiverConfig,
        batch: usize,
        parameters: usize,
    ) -> Summary {
        let Cost { flops, weight_bytes, largest_activation } = cost(g);
        let io =
            |v: &[crate::ir::Val]| v.iter().map(|v| (v.name.clone(), dtype_name(v.dtype), v.shape.clone())).collect();
        Summary {
            architecture: architecture.to_string(),
            dims: dims.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            depth: (cfg.num_blocks, cfg.num_self_attends_per_block),
            heads: (cfg.num_cross_attention_heads, cfg.num_self_attention_heads),
            batch,
            parameters,
            flops,
            weight_bytes,
            largest_activation,
            inputs: io(&g.inputs),
            outputs: io(&g.outputs),
            tables: vec![],
            rewrites: vec![],
            table_decisions: vec![],
        }
    }

    /// Recomputes cost and memory of the graph after the rewrite passes, and collects the
    /// tables they recorded (`perceiver_edge.tables.PASS` metadata).
    pub fn after_passes(&mut self, g: &Graph) {
        let c = cost(g);
        self.flops = c.flops;
        self.weight_bytes = c.weight_bytes;
        self.largest_activation = c.largest_activation;
        self.tables = g
            .metadata
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(metadata::TABLES_PREFIX)?.to_string(), v.parse().ok()?)))
            .collect();
        self.rewrites = g
            .metadata
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(metadata::REWRITES_PREFIX)?.to_string(), v.parse().ok()?)))
            .collect();
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |k: &str| self.dims.get(k).map_or("-".to_string(), |v| v.to_string());
        writeln!(f, "architecture   {}", self.architecture)?;
        writeln!(f, "latents        N x D = {} x {}", d("N"), d("D"))?;
        writeln!(
            f,
            "depth          {} block(s) x {} self-attention layer(s) = {} latent layers (weights shared across blocks)",
            self.depth.0,
            self.depth.1,
            self.depth.0 * self.depth.1
        )?;
        writeln!(f, "heads          cross {} / self {}", self.heads.0, self.heads.1)?;
        writeln!(f, "inputs         M x C = {} x {}", d("M"), d("C"))?;
        writeln!(f, "output queries O x E = {} x {}", d("O"), d("E"))?;
        writeln!(f, "batch          {}", self.batch)?;
        writeln!(f, "parameters     {} ({:.2} M)", self.parameters, self.parameters as f64 / 1e6)?;
        let total: u64 = self.flops.iter().map(|(_, v)| v).sum();
        writeln!(f, "FLOPs          {:.4} GFLOPs per inference (matmul + conv, 2 per MAC)", total as f64 / 1e9)?;
        for (stage, v) in &self.flops {
            writeln!(
                f,
                "  {:<24} {:>12.4} GFLOPs  {:5.1} %",
                stage,
                *v as f64 / 1e9,
                100.0 * *v as f64 / total.max(1) as f64
            )?;
        }
        writeln!(
            f,
            "memory         weights {} ; largest activation {} ({})",
            human(self.weight_bytes),
            human(self.largest_activation.1),
            self.largest_activation.0
        )?;
        if !self.rewrites.is_empty() {
            let list: Vec<String> = self.rewrites.iter().map(|(p, n)| format!("{p} x{n}")).collect();
            writeln!(f, "rewrites       {} (exact; off: --no-rewrites)", list.join(", "))?;
        }
        if self.table_decisions.is_empty() {
            for (pass, bytes) in &self.tables {
                writeln!(
                    f,
                    "  table        {} of precomputed constants from pass {pass} (off: --tables none)",
                    human(*bytes)
                )?;
            }
        }
        for d in &self.table_decisions {
            let what = if d.kept { "kept   " } else { "skipped" };
            if d.bytes == 0 && !d.kept {
                writeln!(f, "  table        {what} {} ({})", d.pass, d.reason)?;
                continue;
            }
            let replaces = d.replaces.map(|r| format!(", replaces {}", human(r))).unwrap_or_default();
            writeln!(
                f,
                "  table        {what} {}: {}{replaces}, saves {:.4} GFLOPs per inference where it runs ({})",
                d.pass,
                human(d.bytes),
                d.flops_saved as f64 / 1e9,
                d.reason
            )?;
        }
        for (n, t, s) in &self.inputs {
            writeln!(f, "input          {n}: {t} {s:?}")?;
        }
        for (n, t, s) in &self.outputs {
            writeln!(f, "output         {n}: {t} {s:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::quant::pass_for;
    use crate::{KeepF32, Precision};

    #[test]
    fn product_flops_split_by_the_arithmetic_each_precision_computes_in() {
        // Two [4, 64] x [64, 64] Linears and one activation product [4, 64] x [64, 4]:
        // 2 x 4 x 64 x 64 FLOPs each, 2 x 4 x 64 x 4 for the last.
        let (linear, act) = (2 * 4 * 64 * 64u64, 2 * 4 * 64 * 4u64);
        let graph = || {
            let mut g = Graph::new();
            let x = g.input("x", DType::F32, &[4, 64]);
            let w: Vec<f32> = (0..64 * 64).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
            let (w0, w1) = (g.const_f32("w0", &[64, 64], &w), g.const_f32("w1", &[64, 64], &w));
            let h = g.matmul(&x, &w0);
            let h = g.matmul(&h, &w1);
            let t = g.transpose(&x, &[1, 0]);
            let y = g.matmul(&h, &t);
            g.output(&y, "y");
            g
        };
        let split = |p: Precision| {
            let mut g = graph();
            if let Some(pass) = pass_for(p, &KeepF32::default(), None, false).unwrap() {
                pass.run(&mut g).unwrap();
            }
            let total: u64 = cost(&g).flops.iter().map(|(_, f)| f).sum();
            assert_eq!(total, 2 * linear + act, "{p}");
            product_flops(&g)
        };
        assert_eq!(split(Precision::F32), ProductFlops { f32: 2 * linear + act, f16: 0, int8: 0 });
        // Only weights are quantised: the activation product stays in f32 (int8) or f16.
        assert_eq!(split(Precision::Int8), ProductFlops { f32: act, f16: 0, int8: 2 * linear });
        assert_eq!(split(Precision::F16), ProductFlops { f32: 0, f16: 2 * linear + act, int8: 0 });
        // 4-bit weights are decoded to f32 for the product.
        assert_eq!(split(Precision::Q4), ProductFlops { f32: 2 * linear + act, f16: 0, int8: 0 });
    }
}
