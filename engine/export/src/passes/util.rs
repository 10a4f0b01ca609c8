//! Graph queries shared by the rewrite passes.

use crate::ir::{Attr, DType, Graph, Node, TensorData, Val};
use std::collections::HashMap;

/// Value name -> index of the node that produces it. Owned, so a pass builds it once per scan
/// of the graph and again only after a rewrite (once per node made the passes quadratic in the
/// graph's size).
pub type Producers = HashMap<String, usize>;

/// The [`Producers`] of `g`.
pub fn producers(g: &Graph) -> Producers {
    let mut m = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for o in &n.outputs {
            m.insert(o.name.clone(), i);
        }
    }
    m
}

/// Indices of the nodes that read value `name` (each once), in graph order.
pub fn consumers(g: &Graph, name: &str) -> Vec<usize> {
    g.nodes.iter().enumerate().filter(|(_, n)| n.inputs.iter().any(|i| i == name)).map(|(i, _)| i).collect()
}

/// A constant's shape and f32 data.
pub fn const_f32(g: &Graph, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    let t = g.constant_data(name)?;
    Some((t.shape.clone(), t.as_f32()?))
}

/// Constant `name` if it is f32, sharing its bytes with the graph (no copy: for tables and
/// position features, which can be the largest tensors of an export).
pub fn const_f32_shared(g: &Graph, name: &str) -> Option<TensorData> {
    g.constant_data(name).filter(|t| t.dtype == DType::F32).cloned()
}

/// An f32 from its 4 little-endian bytes (a `chunks_exact(4)` item of a tensor's bytes).
pub fn f32_le(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `x` (of `shape`) broadcast numpy-style to `to`.
fn broadcast_to(shape: &[usize], x: &[f32], to: &[usize]) -> Vec<f32> {
    let off = to.len() - shape.len();
    let (st, so) = (strides(shape), strides(to));
    (0..to.iter().product::<usize>())
        .map(|i| {
            let mut src = 0;
            for (d, &n) in to.iter().enumerate() {
                let idx = (i / so[d]) % n;
                if d >= off && shape[d - off] != 1 {
                    src += idx * st[d - off];
                }
            }
            x[src]
        })
        .collect()
}

/// Evaluates value `name` at export time when it depends on constants only (LayerNorm,
/// MatMul with a 2-D right side, element-wise arithmetic, Reshape, Transpose, Expand), in f64
/// accumulation; `None` when it depends on a graph input or an op outside that set.
pub fn eval_const(g: &Graph, prod: &Producers, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    if reads_an_input(g, prod, name) {
        return None;
    }
    eval_with(g, prod, name)
}

/// Whether value `name` depends on a graph input (a walk up its producers, each value once).
fn reads_an_input(g: &Graph, prod: &Producers, name: &str) -> bool {
    let inputs: std::collections::HashSet<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![name];
    while let Some(v) = todo.pop() {
        if inputs.contains(v) {
            return true;
        }
        if !seen.insert(v) {
            continue;
        }
        if let Some(&i) = prod.get(v) {
            todo.extend(g.nodes[i].inputs.iter().map(String::as_str).filter(|s| !s.is_empty()));
        }
    }
    false
}

fn eval_with(g: &Graph, prod: &Producers, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    if let Some(c) = const_f32(g, name) {
        return Some(c);
    }
    let n = &g.nodes[*prod.get(name)?];
    let shape = n.outputs[0].shape.clone();
    let arg = |i: usize| eval_with(g, prod, &n.inputs[i]);
    let out = match n.op.as_str() {
        "Identity" | "Reshape" => arg(0)?.1,
        "Expand" => {
            let (s, x) = arg(0)?;
            broadcast_to(&s, &x, &shape)
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let (sa, a) = arg(0)?;
            let (sb, b) = arg(1)?;
            let (a, b) = (broadcast_to(&sa, &a, &shape), broadcast_to(&sb, &b, &shape));
            let f: fn(f32, f32) -> f32 = match n.op.as_str() {
                "Add" => |x, y| x + y,
                "Sub" => |x, y| x - y,
                "Mul" => |x, y| x * y,
                _ => |x, y| x / y,
            };
            a.iter().zip(&b).map(|(x, y)| f(*x, *y)).collect()
        }
        "Transpose" => {
            let (s, x) = arg(0)?;
            let perm: Vec<usize> = match n.attrs.iter().find(|(k, _)| k == "perm") {
                Some((_, crate::ir::Attr::Ints(p))) => p.iter().map(|&v| v as usize).collect(),
                _ => return None,
            };
            let (si, so) = (strides(&s), strides(&shape));
            (0..x.len())
                .map(|i| {
                    let src: usize = (0..shape.len()).map(|d| ((i / so[d]) % shape[d]) * si[perm[d]]).sum();
                    x[src]
                })
                .collect()
        }
        "MatMul" => {
            let (sa, a) = arg(0)?;
            let (sb, b) = arg(1)?;
            if sb.len() != 2 {
                return None;
            }
            let (k, o) = (sb[0], sb[1]);
            let rows = a.len() / k;
            let mut y = vec![0f32; rows * o];
            for r in 0..rows {
                for j in 0..o {
                    y[r * o + j] = (0..k).map(|i| a[r * k + i] as f64 * b[i * o + j] as f64).sum::<f64>() as f32;
                }
            }
            let _ = sa;
            y
        }
        "LayerNormalization" => {
            let (_, x) = arg(0)?;
            let (_, w) = arg(1)?;
            let (_, b) = arg(2)?;
            let eps = match n.attrs.iter().find(|(k, _)| k == "epsilon") {
                Some((_, crate::ir::Attr::Float(e))) => *e as f64,
                _ => 1e-5,
            };
            let c = w.len();
            let mut y = vec![0f32; x.len()];
            for (row, out) in x.chunks(c).zip(y.chunks_mut(c)) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
                let rs = 1.0 / (var + eps).sqrt();
                for i in 0..c {
                    out[i] = ((row[i] as f64 - mean) * rs * w[i] as f64 + b[i] as f64) as f32;
                }
            }
            y
        }
        _ => return None,
    };
    (out.len() == shape.iter().product::<usize>()).then_some((shape, out))
}

/// The f32 value `name` with its shape.
pub fn val(g: &Graph, name: &str) -> Option<Val> {
    Some(Val { name: name.to_string(), dtype: DType::F32, shape: g.value_shape(name)?.to_vec() })
}

/// Follows `x -> Reshape [B, M, H, d] -> Transpose(perm)` and returns the transpose's output.
pub fn heads_of(g: &Graph, x: &str, perm: &[i64]) -> Option<String> {
    let [ri] = consumers(g, x)[..] else { return None };
    let rs = &g.nodes[ri];
    if rs.op != "Reshape" || rs.outputs[0].shape.len() != 4 {
        return None;
    }
    let [ti] = consumers(g, &rs.outputs[0].name)[..] else { return None };
    let tr = &g.nodes[ti];
    let ok = tr.op == "Transpose" && matches!(tr.attrs.first(), Some((_, Attr::Ints(p))) if p == perm);
    ok.then(|| tr.outputs[0].name.clone())
}

/// Emits nodes via `f` and moves them to just before node `at` (by name), renaming the last
/// one's output to `out`.
pub fn emit_before(g: &mut Graph, at: &str, out: &Val, f: impl FnOnce(&mut Graph)) {
    let scope: Vec<String> = at.split('/').map(String::from).collect();
    for s in &scope[..scope.len() - 1] {
        g.push_scope(s);
    }
    let start = g.nodes.len();
    f(g);
    g.nodes.last_mut().expect("emitted").outputs[0] = out.clone();
    for _ in &scope[..scope.len() - 1] {
        g.pop_scope();
    }
    let new: Vec<Node> = g.nodes.drain(start..).collect();
    let i = g.nodes.iter().position(|n| n.name == at).expect("anchor node");
    g.nodes.splice(i..i, new);
}

/// One attention core as the exporter emits it:
/// `Div(MatMul(Qh, Transpose(Reshape(K))), s) -> (Add mask)* -> Softmax -> MatMul(probs, Vh)`,
/// with `Qh = [B, H, O, dk]`, `Kh^T` from `K [B, N, H dk]` (perm `[0, 2, 3, 1]`) and `Vh` from
/// `V [B, N, H dv]` (perm `[0, 2, 1, 3]`).
pub struct AttentionCore {
    /// The scores divisor `s`.
    pub divisor: f32,
    /// The queries `Qh` as fed to the scores `MatMul`.
    pub q: String,
    /// `K` and `V` before their head split.
    pub k: String,
    pub v: String,
    /// The softmax output and the `probs @ Vh` node.
    pub probs: Val,
    pub ctx: usize,
}

/// An [`AttentionCore`] whose queries are constant (evaluated at export time).
pub struct ConstantQueryCore {
    /// The `Div` node producing the scaled scores.
    pub div: usize,
    pub core: AttentionCore,
    /// `[H, O, dk]` queries, row-major.
    pub q: Vec<f32>,
    pub heads: usize,
    /// Queries per head.
    pub rows: usize,
    pub dk: usize,
}

/// Matches an [`AttentionCore`] at node `div` whose queries (batch 1) are constant.
pub fn constant_query_core(g: &Graph, prod: &Producers, div: usize) -> Option<ConstantQueryCore> {
    let core = attention_core(g, prod, div)?;
    let (qs, q) = eval_const(g, prod, &core.q)?;
    if qs.len() != 4 || qs[0] != 1 {
        return None;
    }
    Some(ConstantQueryCore { div, q, heads: qs[1], rows: qs[2], dk: qs[3], core })
}

/// Matches the [`AttentionCore`] whose scores divisor is node `div`.
pub fn attention_core(g: &Graph, prod: &Producers, div: usize) -> Option<AttentionCore> {
    let d = &g.nodes[div];
    if d.op != "Div" {
        return None;
    }
    let (ds, dv) = const_f32(g, &d.inputs[1])?;
    if !ds.is_empty() {
        return None;
    }
    let sm = &g.nodes[*prod.get(d.inputs[0].as_str())?];
    if sm.op != "MatMul" {
        return None;
    }
    let pre_heads = |heads: &str, perm: &[i64]| -> Option<String> {
        let t = &g.nodes[*prod.get(heads)?];
        let r = &g.nodes[*prod.get(t.inputs.first()?.as_str())?];
        let x = r.inputs.first()?.clone();
        (heads_of(g, &x, perm).as_deref() == Some(heads)).then_some(x)
    };
    let k = pre_heads(&sm.inputs[1], &[0, 2, 3, 1])?;
    let mut cur = d.outputs[0].name.clone();
    let probs = loop {
        let [ci] = consumers(g, &cur)[..] else { return None };
        let c = &g.nodes[ci];
        match c.op.as_str() {
            "Add" if c.inputs[0] == cur => cur = c.outputs[0].name.clone(),
            "Softmax" => break c.outputs[0].clone(),
            _ => return None,
        }
    };
    let [ctx] = consumers(g, &probs.name)[..] else { return None };
    let cm = &g.nodes[ctx];
    if cm.op != "MatMul" || cm.inputs[0] != probs.name {
        return None;
    }
    let v = pre_heads(&cm.inputs[1], &[0, 2, 1, 3])?;
    Some(AttentionCore { divisor: dv[0], q: sm.inputs[0].clone(), k, v, probs, ctx })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn broadcast_repeats_unit_axes() {
        assert_eq!(broadcast_to(&[2, 1], &[1.0, 2.0], &[2, 3]), [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(broadcast_to(&[3], &[1.0, 2.0, 3.0], &[2, 3]), [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn evaluates_matmul_bias_transpose_and_layernorm() {
        let mut g = Graph::new();
        let a = g.const_f32("a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let w = g.const_f32("w", &[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, -1.0]);
        let b = g.const_f32("b", &[2], &[0.5, -0.5]);
        let mm = g.matmul(&a, &w);
        let y = g.add(&mm, &b);
        // [[1+3, 2-3], [4+6, 5-6]] + [0.5, -0.5]
        close(&eval_const(&g, &producers(&g), &y.name).unwrap().1, &[4.5, -1.5, 10.5, -1.5]);
        let t = g.transpose(&a, &[1, 0]);
        let (ts, tv) = eval_const(&g, &producers(&g), &t.name).unwrap();
        assert_eq!(ts, [3, 2]);
        close(&tv, &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        // LayerNorm of [1, 2, 3]: mean 2, var 2/3 -> (x - 2) / sqrt(2/3 + eps).
        let gamma = g.const_f32("g", &[3], &[1.0, 1.0, 2.0]);
        let beta = g.const_f32("be", &[3], &[0.0, 1.0, 0.0]);
        let ln = g.node(
            "LayerNormalization",
            &[&a, &gamma, &beta],
            vec![("epsilon", Attr::Float(0.0))],
            DType::F32,
            vec![2, 3],
        );
        let s = (2.0f32 / 3.0).sqrt();
        close(&eval_const(&g, &producers(&g), &ln.name).unwrap().1, &[-1.0 / s, 1.0, 2.0 / s, -1.0 / s, 1.0, 2.0 / s]);
    }

    #[test]
    fn a_graph_input_is_not_constant() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]);
        let w = g.const_f32("w", &[3, 1], &[1.0, 1.0, 1.0]);
        let y = g.matmul(&x, &w);
        assert!(eval_const(&g, &producers(&g), &y.name).is_none());
        assert!(eval_const(&g, &producers(&g), &w.name).is_some());
    }

    #[test]
    fn matches_the_attention_core_the_blocks_emit() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[1, 4, 6]);
        let wq = g.const_f32("wq", &[6, 6], &[0.1; 36]);
        let wk = g.const_f32("wk", &[6, 6], &[0.2; 36]);
        let wv = g.const_f32("wv", &[6, 6], &[0.3; 36]);
        let (q, k, v) = (g.matmul(&x, &wq), g.matmul(&x, &wk), g.matmul(&x, &wv));
        let heads = |g: &mut Graph, t: &Val, perm: &[usize]| {
            let r = g.reshape(t, &[1, 4, 2, 3]);
            g.transpose(&r, perm)
        };
        let qh = heads(&mut g, &q, &[0, 2, 1, 3]);
        let kt = heads(&mut g, &k, &[0, 2, 3, 1]);
        let vh = heads(&mut g, &v, &[0, 2, 1, 3]);
        let s = g.matmul(&qh, &kt);
        let d = g.scalar(3f32.sqrt());
        let s = g.binary("Div", &s, &d);
        let p = g.node("Softmax", &[&s], vec![("axis", Attr::Int(-1))], DType::F32, s.shape.clone());
        let ctx = g.matmul(&p, &vh);
        let div = g.nodes.iter().position(|n| n.op == "Div").unwrap();
        let core = attention_core(&g, &producers(&g), div).expect("matched");
        assert_eq!(
            (core.q.as_str(), core.k.as_str(), core.v.as_str()),
            (qh.name.as_str(), k.name.as_str(), v.name.as_str())
        );
        assert_eq!(core.probs.name, p.name);
        assert_eq!(g.nodes[core.ctx].outputs[0].name, ctx.name);
        assert!((core.divisor - 3f32.sqrt()).abs() < 1e-7);
        // Scores not produced by a MatMul: no match.
        let mm = g.nodes.iter().position(|n| n.outputs[0].name == s.name).unwrap();
        g.nodes[mm].op = "Add".into();
        assert!(attention_core(&g, &producers(&g), div).is_none());
    }
}
