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

/// A constant's shape and f32 data.
pub fn const_f32(g: &Graph, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    let t = g.constant_data(name)?;
    Some((t.shape.clone(), t.as_f32()?))
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
pub fn eval_const(g: &Graph, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    if let Some(c) = const_f32(g, name) {
        return Some(c);
    }
    let n = g.nodes.iter().find(|n| n.outputs.iter().any(|o| o.name == name))?;
    let shape = n.outputs[0].shape.clone();
    let arg = |i: usize| eval_const(g, &n.inputs[i]);
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
                Some((_, crate::graph::Attr::Ints(p))) => p.iter().map(|&v| v as usize).collect(),
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
                Some((_, crate::graph::Attr::Float(e))) => *e as f64,
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
