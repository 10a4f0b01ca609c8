//! `few_query_attention`: cross-attention with a few constant queries (a classification
//! decoder's single query, say) over runtime keys `K = X Wk + bk`, `V = X Wv + bv`.
//!
//! The key and value projections cost `2 N D (H dk)` per inference although only `O` queries
//! read them. With the queries constant, they fold into the keys' weights:
//!
//! ```text
//! scores_h = Q_h K_h^T / s = (X G_h^T)^T + (Q_h bk_h^T / s)  G_h = Q_h Wk_h^T / s   [O, D]
//! probs_h V_h = (probs_h X) Wv_h + bv_h                       (rows of probs sum to 1)
//! ```
//!
//! The second scores term is constant along each softmax row, so it is dropped. Per inference
//! this leaves `2 H O N D` multiply-adds for scores and `probs X`, plus `H O D dv`; the pass
//! applies where that is less than what it replaces. It adds no table (`G` is `H O D` floats),
//! so it also runs with `--no-position-tables`.

use super::util::{
    const_f32, constant_query_core, emit_before, eval_const, producers, val, ConstantQueryCore, Producers,
};
use super::Pass;
use crate::error::Result;
use crate::ir::{Graph, Val};

/// See the module documentation.
pub struct FewQueryAttention;

/// `Add(MatMul(x, W), b)` or `MatMul(x, W)` with constant `W [D, o]` (and `b [o]`).
struct Linear {
    x: Val,
    w: Vec<f32>,
    d: usize,
    o: usize,
    b: Option<Vec<f32>>,
}

fn linear_form(g: &Graph, prod: &Producers, name: &str) -> Option<Linear> {
    let mut n = &g.nodes[*prod.get(name)?];
    let mut b = None;
    if n.op == "Add" {
        let (bs, bv) = const_f32(g, &n.inputs[1])?;
        b = Some((bs, bv));
        n = &g.nodes[*prod.get(n.inputs[0].as_str())?];
    }
    if n.op != "MatMul" || eval_const(g, prod, &n.inputs[0]).is_some() {
        return None;
    }
    let (ws, w) = const_f32(g, &n.inputs[1])?;
    let x = val(g, &n.inputs[0])?;
    if ws.len() != 2 || x.shape.len() != 3 || x.shape[2] != ws[0] {
        return None;
    }
    let b = match b {
        Some((bs, bv)) if bs == [ws[1]] => Some(bv),
        Some(_) => return None,
        None => None,
    };
    Some(Linear { x, w, d: ws[0], o: ws[1], b })
}

struct Match {
    cq: ConstantQueryCore,
    k: Linear,
    v: Linear,
}

fn find(g: &Graph, prod: &Producers, div: usize) -> Option<Match> {
    let cq = constant_query_core(g, prod, div)?;
    let (heads, o, dk) = (cq.heads, cq.rows, cq.dk);
    let k = linear_form(g, prod, &cq.core.k)?;
    let v = linear_form(g, prod, &cq.core.v)?;
    if v.x.name != k.x.name || k.o != heads * dk || v.o % heads != 0 {
        return None;
    }
    // Multiply-adds per batch item, before and after.
    let (n, d, dv) = (k.x.shape[1], k.d, v.o / heads);
    let before = n * d * (k.o + v.o) + heads * o * n * (dk + dv);
    let after = 2 * heads * o * n * d + heads * o * d * dv;
    (after < before).then_some(Match { cq, k, v })
}

fn rewrite(g: &mut Graph, mt: Match) {
    let (h, o, dk) = (mt.cq.heads, mt.cq.rows, mt.cq.dk);
    let (b, n, d) = (mt.k.x.shape[0], mt.k.x.shape[1], mt.k.d);
    let dv = mt.v.o / h;
    let div = mt.cq.core.divisor as f64;
    // G^T [D, H O] (G_h = Q_h Wk_h^T / s), in f64: the scores are `X @ G^T`, a Linear with a
    // constant 2-D weight (quantised like the key projection it replaces), moved to heads after.
    let mut gt = vec![0f32; d * h * o];
    for hh in 0..h {
        for i in 0..o {
            let qrow = &mt.cq.q[(hh * o + i) * dk..(hh * o + i + 1) * dk];
            for e in 0..d {
                let wrow = &mt.k.w[e * mt.k.o + hh * dk..e * mt.k.o + (hh + 1) * dk];
                let s: f64 = qrow.iter().zip(wrow).map(|(x, y)| *x as f64 * *y as f64).sum();
                gt[e * h * o + hh * o + i] = (s / div) as f32;
            }
        }
    }
    // Wv per head [H, D, dv] and bv [H, 1, dv].
    let mut wv = vec![0f32; h * d * dv];
    for hh in 0..h {
        for e in 0..d {
            for j in 0..dv {
                wv[(hh * d + e) * dv + j] = mt.v.w[e * mt.v.o + hh * dv + j];
            }
        }
    }
    let div_node = g.nodes[mt.cq.div].clone();
    let ctx_node = g.nodes[mt.cq.core.ctx].clone();
    let x = mt.k.x.clone();
    emit_before(g, &div_node.name, &div_node.outputs[0], |g| {
        let gv = g.const_f32("query_key_weight", &[d, h * o], &gt);
        let s = g.matmul(&x, &gv);
        let s = g.reshape(&s, &[b, n, h, o]);
        let _ = g.transpose(&s, &[0, 2, 3, 1]);
    });
    let probs = mt.cq.core.probs.clone();
    let bias = mt.v.b.clone();
    emit_before(g, &ctx_node.name, &ctx_node.outputs[0], |g| {
        let x4 = g.reshape(&x, &[b, 1, n, d]);
        let px = g.matmul(&probs, &x4);
        // One head: a 2-D weight, so quantisation treats it as a Linear.
        let wshape: &[usize] = if h == 1 { &[d, dv] } else { &[h, d, dv] };
        let wvv = g.const_f32("value_weight_heads", wshape, &wv);
        let c = g.matmul(&px, &wvv);
        if let Some(bv) = bias {
            let bh = g.const_f32("value_bias_heads", &[h, 1, dv], &bv);
            let _ = g.add(&c, &bh);
        }
    });
    for name in [&div_node.name, &ctx_node.name] {
        let i = g.nodes.iter().position(|nd| nd.name == *name).expect("replaced node");
        g.nodes.remove(i);
    }
}

impl Pass for FewQueryAttention {
    fn name(&self) -> &'static str {
        "few_query_attention"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        let mut sites = 0;
        let mut i = 0;
        let mut prod = producers(g);
        while i < g.nodes.len() {
            if let Some(mt) = find(g, &prod, i) {
                rewrite(g, mt);
                prod = producers(g);
                sites += 1;
            }
            i += 1;
        }
        if sites > 0 {
            g.prune();
        }
        super::record_rewrites(g, self.name(), sites);
        Ok(())
    }
}
