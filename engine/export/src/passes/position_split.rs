//! `position_split`: the encoder's `LayerNorm(concat(data, positions)) -> Linear` with constant
//! position channels, rewritten so that per-inference work scales with the few data channels.
//!
//! With `x = [d | p]` (`Cd` data channels, `P` constant position channels, `C = Cd + P`),
//! LayerNorm statistics split into a data part and a constant position part:
//!
//! ```text
//! mu  = (sum(d) + S1p) / C                     S1p = sum(p), pbar = S1p / P     (constants)
//! dx  = d - mu,  dp = pbar - mu
//! var = (sum(dx^2) + P dp^2 + Qp) / C          Qp  = sum((p - pbar)^2)          (constant)
//! r   = 1 / sqrt(var + eps)
//! LN(x) W + b = r * ([dx | dp] @ [g_d W_d ; sum_p g_p W_p] + Tc) + (beta W + b)
//!               Tc = (p - pbar) @ (g_p W_p)    [M, O] precomputed table
//! ```
//!
//! and since `mu` is linear in `d`, the product with `[dx | dp]` folds into one with `d` itself
//! (no concat, `Cd` columns): with `wp = sum_p g_p W_p` and `u = 1^T (g_d W_d) + wp`,
//!
//! ```text
//! [dx | dp] @ [g_d W_d ; wp] + Tc = d @ (g_d W_d - u / C) + (Tc + pbar wp - (S1p / C) u)
//! ```
//!
//! This is LayerNorm's algebra rearranged (exact up to f32 rounding); the constants are
//! computed in f64. The `[M, O]` tables (one per projection) trade memory for speed: the pass
//! records their size under `perceiver_edge.tables.position_split` for `inspect`.

use super::util::{const_f32, const_f32_shared, consumers, f32_le, producers, Producers};
use super::Pass;
use crate::error::Result;
use crate::ir::{Attr, DType, Graph, Node, TensorData, Val};

/// See the module documentation.
pub struct PositionSplit;

/// One `MatMul(LN, W) (+ Add b)` consumer of the LayerNorm.
struct Proj {
    /// Node indices to remove (the MatMul, and the bias Add if folded).
    remove: Vec<usize>,
    /// The value the rewritten projection must produce.
    out: Val,
    /// `W` as `[C][O]`.
    w: Vec<f32>,
    o: usize,
    bias: Option<Vec<f32>>,
}

struct Match {
    ln: usize,
    data: Val,
    /// `[M, P]` position table.
    pos: TensorData,
    p: usize,
    /// Position channels come first in the concat.
    pos_first: bool,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
    projs: Vec<Proj>,
}

fn find(g: &Graph, prod: &Producers, ln: usize) -> Option<Match> {
    let node = &g.nodes[ln];
    if node.op != "LayerNormalization" || node.inputs.len() < 3 {
        return None;
    }
    let rank = node.outputs[0].shape.len();
    let axis = node.attrs.iter().find(|(k, _)| k == "axis").map_or(-1, |(_, a)| match a {
        Attr::Int(i) => *i,
        _ => 0,
    });
    if axis != -1 && axis != rank as i64 - 1 {
        return None;
    }
    let eps = node.attrs.iter().find(|(k, _)| k == "epsilon").map_or(1e-5, |(_, a)| match a {
        Attr::Float(f) => *f,
        _ => 1e-5,
    });
    let cat = &g.nodes[*prod.get(node.inputs[0].as_str())?];
    if cat.op != "Concat" || cat.inputs.len() != 2 || rank != 3 {
        return None;
    }
    if !matches!(cat.attrs.iter().find(|(k, _)| k == "axis"), Some((_, Attr::Int(a))) if *a == 2 || *a == -1) {
        return None;
    }
    // Which input is the constant position table (directly or through an Expand)?
    let as_const = |name: &str| -> Option<TensorData> {
        if let Some(c) = const_f32_shared(g, name) {
            return Some(c);
        }
        let e = &g.nodes[*prod.get(name)?];
        (e.op == "Expand").then(|| const_f32_shared(g, &e.inputs[0])).flatten()
    };
    let (pos_first, pos, data_name) = match (as_const(&cat.inputs[0]), as_const(&cat.inputs[1])) {
        (None, Some(c)) => (false, c, &cat.inputs[0]),
        (Some(c), None) => (true, c, &cat.inputs[1]),
        _ => return None,
    };
    let m = node.outputs[0].shape[1];
    let c = node.outputs[0].shape[2];
    let p = *pos.shape.last()?;
    if pos.len() != m * p || p >= c {
        return None;
    }
    let data =
        g.value_shape(data_name).map(|s| Val { name: data_name.clone(), dtype: DType::F32, shape: s.to_vec() })?;
    let (_, gamma) = const_f32(g, &node.inputs[1])?;
    let (_, beta) = const_f32(g, &node.inputs[2])?;
    let ln_out = &node.outputs[0].name;
    let mut projs = vec![];
    for ci in consumers(g, ln_out) {
        let mm = &g.nodes[ci];
        if mm.op != "MatMul" || mm.inputs[0] != *ln_out || mm.inputs[1] == *ln_out {
            return None;
        }
        let (wshape, w) = const_f32(g, &mm.inputs[1])?;
        if wshape.len() != 2 || wshape[0] != c {
            return None;
        }
        let o = wshape[1];
        let mut proj = Proj { remove: vec![ci], out: mm.outputs[0].clone(), w, o, bias: None };
        let next = consumers(g, &mm.outputs[0].name);
        if let [ai] = next[..] {
            let add = &g.nodes[ai];
            let other = if add.inputs[0] == mm.outputs[0].name { &add.inputs[1] } else { &add.inputs[0] };
            if add.op == "Add" && add.outputs[0].shape == mm.outputs[0].shape {
                if let Some((bs, b)) = const_f32(g, other) {
                    if bs == [o] {
                        proj.remove.push(ai);
                        proj.out = add.outputs[0].clone();
                        proj.bias = Some(b);
                    }
                }
            }
        }
        projs.push(proj);
    }
    if projs.is_empty() {
        return None;
    }
    Some(Match { ln, data, pos, p, pos_first, gamma, beta, eps, projs })
}

fn rewrite(g: &mut Graph, mt: Match) -> usize {
    let (b, m, cd) = (mt.data.shape[0], mt.data.shape[1], mt.data.shape[2]);
    let (p, c) = (mt.p, mt.data.shape[2] + mt.p);
    // Channel index of data channel i / position channel j in the concatenated input.
    let di = |i: usize| if mt.pos_first { p + i } else { i };
    let pj = |j: usize| if mt.pos_first { j } else { cd + j };
    // Row r of the position table (read from the graph's bytes, not copied whole).
    let pos_row =
        |r: usize| -> Vec<f32> { mt.pos.bytes[4 * r * p..4 * (r + 1) * p].chunks_exact(4).map(f32_le).collect() };
    let mut s1 = vec![0f32; m];
    let mut pbar = vec![0f32; m];
    let mut qp = vec![0f32; m];
    let mut mean64 = vec![0f64; m];
    for r in 0..m {
        let row = pos_row(r);
        let s: f64 = row.iter().map(|&v| v as f64).sum();
        let mean = s / p as f64;
        let q: f64 = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        s1[r] = s as f32;
        pbar[r] = mean as f32;
        mean64[r] = mean;
        qp[r] = (q / c as f64 + mt.eps as f64) as f32;
    }
    let scope: Vec<String> = {
        let name = &g.nodes[mt.ln].name;
        let parts: Vec<&str> = name.split('/').collect();
        parts[..parts.len() - 1].iter().map(|s| s.to_string()).collect()
    };
    for s in &scope {
        g.push_scope(s);
    }
    let start = g.nodes.len();
    let x = &mt.data;
    let mean_axes = vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))];
    let xm = g.node("ReduceMean", &[x], mean_axes.clone(), DType::F32, vec![b, m, 1]);
    let xm = g.mul_scalar(&xm, cd as f32 / c as f32);
    let s1c: Vec<f32> = s1.iter().map(|v| v / c as f32).collect();
    let s1c = g.const_f32("pos_sum", &[m, 1], &s1c);
    let mu = g.add(&xm, &s1c);
    let dx = g.binary("Sub", x, &mu);
    let pbar_v = g.const_f32("pos_mean", &[m, 1], &pbar);
    let dp = g.binary("Sub", &pbar_v, &mu);
    let dx2 = g.mul(&dx, &dx);
    let v1 = g.node("ReduceMean", &[&dx2], mean_axes, DType::F32, vec![b, m, 1]);
    let v1 = g.mul_scalar(&v1, cd as f32 / c as f32);
    let dp2 = g.mul(&dp, &dp);
    let v2 = g.mul_scalar(&dp2, p as f32 / c as f32);
    let var = g.add(&v1, &v2);
    let qpv = g.const_f32("pos_var", &[m, 1], &qp);
    let var = g.add(&var, &qpv);
    let sd = g.unary("Sqrt", &var);
    let r = g.unary("Reciprocal", &sd);
    let mut table_bytes = 0;
    let mut remove = vec![mt.ln];
    for proj in &mt.projs {
        let o = proj.o;
        let w = |ch: usize, k: usize| proj.w[ch * o + k] as f64;
        let mut gp = vec![0f64; p * o];
        for j in 0..p {
            for k in 0..o {
                gp[j * o + k] = mt.gamma[pj(j)] as f64 * w(pj(j), k);
            }
        }
        // wp = sum_p g_p W_p and u = 1^T (g_d W_d) + wp, in f64.
        let wd = |i: usize, k: usize| mt.gamma[di(i)] as f64 * w(di(i), k);
        let wp: Vec<f64> = (0..o).map(|k| (0..p).map(|j| gp[j * o + k]).sum()).collect();
        let u: Vec<f64> = (0..o).map(|k| (0..cd).map(|i| wd(i, k)).sum::<f64>() + wp[k]).collect();
        let mut wz = vec![0f32; cd * o];
        for i in 0..cd {
            for k in 0..o {
                wz[i * o + k] = (wd(i, k) - u[k] / c as f64) as f32;
            }
        }
        let mut table = Vec::with_capacity(m * o * 4);
        let mut acc = vec![0f64; o];
        for (r, &pm) in mean64.iter().enumerate() {
            acc.iter_mut().for_each(|a| *a = 0.0);
            // The centred position row, in f64 (computed per row: an [M, P] f64 copy of the
            // positions would be the largest allocation of the export).
            for (j, &v) in pos_row(r).iter().enumerate() {
                let cv = v as f64 - pm;
                let gr = &gp[j * o..(j + 1) * o];
                for k in 0..o {
                    acc[k] += cv * gr[k];
                }
            }
            let sc = pm * p as f64 / c as f64;
            for k in 0..o {
                table.extend_from_slice(&((acc[k] + pm * wp[k] - sc * u[k]) as f32).to_le_bytes());
            }
        }
        let cst: Vec<f32> = (0..o)
            .map(|k| {
                let s: f64 = (0..c).map(|ch| mt.beta[ch] as f64 * w(ch, k)).sum();
                (s + proj.bias.as_ref().map_or(0.0, |b| b[k] as f64)) as f32
            })
            .collect();
        table_bytes += table.len();
        let wzv = g.const_f32("split_weight", &[cd, o], &wz);
        let t = g.matmul(x, &wzv);
        let tv = g.constant("position_table", TensorData::f32_le_bytes(&[m, o], table));
        let t = g.add(&t, &tv);
        let t = g.mul(&t, &r);
        let cv = g.const_f32("split_bias", &[o], &cst);
        let _ = g.add(&t, &cv);
        g.nodes.last_mut().expect("just added").outputs[0] = proj.out.clone();
        remove.extend(proj.remove.iter().copied());
    }
    for _ in &scope {
        g.pop_scope();
    }
    let new: Vec<Node> = g.nodes.drain(start..).collect();
    let ln_name = g.nodes[mt.ln].name.clone();
    remove.sort_unstable();
    for i in remove.iter().rev() {
        if *i != mt.ln {
            g.nodes.remove(*i);
        }
    }
    // The LayerNorm stays (pruned later if unused); the new nodes go right before it, where
    // all their inputs exist.
    let at = g.nodes.iter().position(|n| n.name == ln_name).expect("LayerNorm kept");
    g.nodes.splice(at..at, new);
    table_bytes
}

/// What the rewrite would do to `g` without doing it: (sites, table bytes it would add,
/// multiply-add FLOPs per inference it would save: each projection's product shrinks from `C`
/// to `Cd` input channels).
pub(crate) fn estimate(g: &Graph) -> (usize, usize, u64) {
    let (mut sites, mut bytes, mut flops) = (0, 0, 0u64);
    let prod = producers(g);
    for i in 0..g.nodes.len() {
        if let Some(mt) = find(g, &prod, i) {
            let (b, m) = (mt.data.shape[0], mt.data.shape[1]);
            sites += 1;
            for proj in &mt.projs {
                bytes += m * proj.o * 4;
                flops += 2 * (b * m * mt.p * proj.o) as u64;
            }
        }
    }
    (sites, bytes, flops)
}

impl Pass for PositionSplit {
    fn name(&self) -> &'static str {
        "position_split"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        let (mut total, mut sites) = (0, 0);
        let mut i = 0;
        let mut prod = producers(g);
        while i < g.nodes.len() {
            if let Some(mt) = find(g, &prod, i) {
                total += rewrite(g, mt);
                prod = producers(g);
                sites += 1;
            }
            i += 1;
        }
        super::record_rewrites(g, self.name(), sites);
        if total > 0 {
            g.metadata.push((crate::metadata::tables_key(self.name()), total.to_string()));
        }
        g.prune();
        Ok(())
    }
}
