//! `constant_query_attention`: cross-attention whose queries are constant (the encoder's
//! latents: LayerNorm and Q projection evaluated at export time) and whose keys / values are in
//! `position_split` form `K = r * (z Wz + T) + c` (`z = [dx | dp]`, the few data channels).
//!
//! ```text
//! scores_h = Q_h K_h^T / s = r^T * (A_h + B_h z^T) + (Q_h c_h / s)     A_h = Q_h T_h^T / s [N, M]
//!                                                                      B_h = Q_h Wz_h^T / s
//! ```
//!
//! The last term is constant along each softmax row, so it is dropped (softmax is invariant to
//! it). Values are never built: with `p' = probs * r^T`,
//!
//! ```text
//! probs_h V_h = p'_h Tv_h + (p'_h z) Wz_h + cv_h        (rows of probs sum to 1)
//! ```
//!
//! so the per-inference work is one `[N, M] x [M, dv]` matmul with constant right side plus
//! products with the `Cd + 1` data columns. The `[H, N, M]` score table replaces the key table
//! of `position_split` (memory: `H N M` floats instead of `M dk`).

use super::util::{
    const_f32, const_f32_shared, constant_query_core, emit_before, f32_le, producers, val, ConstantQueryCore, Producers,
};
use super::{Pass, PositionSplit};
use crate::error::Result;
use crate::ir::{DType, Graph, Node, TensorData, Val};

/// See the module documentation.
pub struct ConstantQueryAttention;

/// `Add(Mul(Add(MatMul(z, Wz), T), r), c)` as emitted by `position_split`.
struct Split {
    z: Val,
    r: Val,
    wz: Vec<f32>,
    /// The `[M, O]` position table, shared with the graph (not copied).
    t: TensorData,
    c: Vec<f32>,
    o: usize,
}

fn split_form(g: &Graph, prod: &Producers, name: &str) -> Option<Split> {
    let node = |v: &str, op: &str| -> Option<&Node> { Some(&g.nodes[*prod.get(v)?]).filter(|n| n.op == op) };
    let add_c = node(name, "Add")?;
    let (_, c) = const_f32(g, &add_c.inputs[1])?;
    let mul_r = node(&add_c.inputs[0], "Mul")?;
    if const_f32(g, &mul_r.inputs[1]).is_some() {
        return None;
    }
    let add_t = node(&mul_r.inputs[0], "Add")?;
    let t = const_f32_shared(g, &add_t.inputs[1])?;
    let mm = node(&add_t.inputs[0], "MatMul")?;
    let (ws, wz) = const_f32(g, &mm.inputs[1])?;
    let (z, r) = (val(g, &mm.inputs[0])?, val(g, &mul_r.inputs[1])?);
    (ws.len() == 2 && c.len() == ws[1] && z.shape.len() == 3 && r.shape == [z.shape[0], z.shape[1], 1]).then(|| Split {
        z,
        r,
        wz,
        t,
        c,
        o: ws[1],
    })
}

struct Match {
    cq: ConstantQueryCore,
    k: Split,
    v: Split,
}

fn find(g: &Graph, prod: &Producers, div: usize) -> Option<Match> {
    let cq = constant_query_core(g, prod, div)?;
    let k = split_form(g, prod, &cq.core.k)?;
    let v = split_form(g, prod, &cq.core.v)?;
    if v.z.name != k.z.name || v.r.name != k.r.name || k.o != cq.heads * cq.dk || v.o % cq.heads != 0 {
        return None;
    }
    Some(Match { cq, k, v })
}

fn rewrite(g: &mut Graph, mt: Match) -> (usize, usize) {
    let (b, m, cz) = (mt.k.z.shape[0], mt.k.z.shape[1], mt.k.z.shape[2]);
    let (h, n, dk) = (mt.cq.heads, mt.cq.rows, mt.cq.dk);
    let dv = mt.v.o / h;
    let div = mt.cq.core.divisor as f64;
    // A [H, N, M] and B [H, N, Cz] (scores tables), Tv [H, M, dv], Wvz [H, Cz, dv], cv [H, 1, dv].
    // A is written straight into its tensor's bytes and Tv shares the value table's where the
    // layout is the same (one head): no second copy of a table.
    let mut a = Vec::with_capacity(h * n * m * 4);
    let mut bq = vec![0f32; h * n * cz];
    for hh in 0..h {
        for i in 0..n {
            let qrow = &mt.cq.q[(hh * n + i) * dk..(hh * n + i + 1) * dk];
            for j in 0..m {
                let base = 4 * (j * mt.k.o + hh * dk);
                let trow = mt.k.t.bytes[base..base + 4 * dk].chunks_exact(4);
                let s: f64 = qrow.iter().zip(trow).map(|(x, y)| *x as f64 * f32_le(y) as f64).sum();
                a.extend_from_slice(&((s / div) as f32).to_le_bytes());
            }
            for c in 0..cz {
                let s: f64 = (0..dk).map(|e| qrow[e] as f64 * mt.k.wz[c * mt.k.o + hh * dk + e] as f64).sum();
                bq[(hh * n + i) * cz + c] = (s / div) as f32;
            }
        }
    }
    let per_head = |x: &[f32], rows: usize| -> Vec<f32> {
        let mut y = vec![0f32; h * rows * dv];
        for hh in 0..h {
            for r in 0..rows {
                for e in 0..dv {
                    y[(hh * rows + r) * dv + e] = x[r * mt.v.o + hh * dv + e];
                }
            }
        }
        y
    };
    let tv = if h == 1 {
        TensorData { shape: vec![h, m, dv], ..mt.v.t.clone() }
    } else {
        let mut y = Vec::with_capacity(h * m * dv * 4);
        for hh in 0..h {
            for r in 0..m {
                let at = 4 * (r * mt.v.o + hh * dv);
                y.extend_from_slice(&mt.v.t.bytes[at..at + 4 * dv]);
            }
        }
        TensorData::f32_le_bytes(&[h, m, dv], y)
    };
    let a_bytes = a.len();
    let k_table_bytes = mt.k.t.bytes.len();
    drop(mt.k.t);
    let wvz = per_head(&mt.v.wz, cz);
    let cv = per_head(&mt.v.c, 1);
    let div_node = g.nodes[mt.cq.div].clone();
    let ctx_node = g.nodes[mt.cq.core.ctx].clone();
    let (z, r) = (mt.k.z.clone(), mt.k.r.clone());
    let rt_name = std::cell::RefCell::new(String::new());
    emit_before(g, &div_node.name, &div_node.outputs[0], |g| {
        let zt = g.transpose(&z, &[0, 2, 1]);
        let zt = g.reshape(&zt, &[b, 1, cz, m]);
        let bv = g.const_f32("query_data_scores", &[h, n, cz], &bq);
        let s = g.matmul(&bv, &zt);
        let av = g.constant("query_position_scores", TensorData::f32_le_bytes(&[h, n, m], a));
        let s = g.add(&s, &av);
        let rt = g.reshape(&r, &[b, 1, 1, m]);
        *rt_name.borrow_mut() = rt.name.clone();
        let _ = g.mul(&s, &rt);
    });
    let rt = Val { name: rt_name.into_inner(), dtype: DType::F32, shape: vec![b, 1, 1, m] };
    let probs = mt.cq.core.probs.clone();
    emit_before(g, &ctx_node.name, &ctx_node.outputs[0], |g| {
        let pr = g.mul(&probs, &rt);
        let tvv = g.constant("value_position_table", tv);
        let c1 = g.matmul(&pr, &tvv);
        let z4 = g.reshape(&z, &[b, 1, m, cz]);
        let pz = g.matmul(&pr, &z4);
        let wshape: &[usize] = if h == 1 { &[cz, dv] } else { &[h, cz, dv] };
        let wv = g.const_f32("value_data_weight", wshape, &wvz);
        let c2 = g.matmul(&pz, &wv);
        let c = g.add(&c1, &c2);
        let cvv = g.const_f32("value_bias", &[h, 1, dv], &cv);
        let _ = g.add(&c, &cvv);
    });
    for name in [&div_node.name, &ctx_node.name] {
        let i = g.nodes.iter().position(|n| n.name == *name).expect("replaced node");
        g.nodes.remove(i);
    }
    // Score table added; the key table of position_split goes away.
    (a_bytes, k_table_bytes)
}

/// What the rewrite would do to `g` (after `position_split`) without doing it: (sites, bytes of
/// the `[H, N, M]` score tables it would add, bytes of the key tables they replace).
pub(crate) fn estimate(g: &Graph) -> (usize, usize, usize) {
    let (mut sites, mut added, mut removed) = (0, 0, 0);
    let prod = producers(g);
    for i in 0..g.nodes.len() {
        if let Some(mt) = find(g, &prod, i) {
            sites += 1;
            added += mt.cq.heads * mt.cq.rows * mt.k.z.shape[1] * 4;
            removed += mt.k.t.bytes.len();
        }
    }
    (sites, added, removed)
}

impl Pass for ConstantQueryAttention {
    fn name(&self) -> &'static str {
        "constant_query_attention"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        let (mut added, mut removed, mut sites) = (0, 0, 0);
        let mut i = 0;
        let mut prod = producers(g);
        while i < g.nodes.len() {
            if let Some(mt) = find(g, &prod, i) {
                let (a, r) = rewrite(g, mt);
                prod = producers(g);
                added += a;
                removed += r;
                sites += 1;
            }
            i += 1;
        }
        super::record_rewrites(g, self.name(), sites);
        if added > 0 {
            g.prune();
            g.metadata.push((crate::metadata::tables_key(self.name()), added.to_string()));
            if let Some(e) =
                g.metadata.iter_mut().find(|(k, _)| *k == crate::metadata::tables_key(PositionSplit.name()))
            {
                let v: usize = e.1.parse().unwrap_or(0);
                e.1 = v.saturating_sub(removed).to_string();
            }
        }
        Ok(())
    }
}
