//! `chunked_attention`: an attention whose scores `[B, H, N, M]` are larger than a limit
//! ([`PerfOptions::max_scores_bytes`], 32 MiB by default) is computed over chunks of its M
//! inputs with a running softmax, chunks of at most 8 MiB of scores (or the limit, if smaller),
//! so that neither the scores nor the key and value projections of all M inputs exist at once
//! (nor tract's packed copies of them). Below the limit the chunks' own copies would cost about
//! what they save (language-perceiver's 16 MiB scores in 2 chunks: `run` peak 198 -> 206 MiB).
//!
//! ```text
//! for each chunk c of the inputs X[:, c]:       K_c = X_c Wk + bk,  V_c = X_c Wv + bv
//!     S_c = Q K_c^T / s,   m' = max(m, rowmax S_c),   a = exp(m - m'),   E_c = exp(S_c - m')
//!     z = z a + rowsum E_c,   acc = acc a + E_c V_c,   m = m'
//! out = acc / z                                  (= softmax(Q K^T / s) V)
//! ```
//!
//! Exact up to float rounding (the softmax's maximum and sums are taken chunk by chunk). It
//! applies to the attention cores the blocks emit ([`attention_core`]) whose keys and values are
//! Linears of the same input `X [B, M, D]` and whose scores get no mask: in the published
//! architectures, the encoder's cross-attention over 224 x 224 pixels (int8 / q4, where
//! `few_query_attention` does not run: scores `[512, 50176]`, 98 MiB, 13 chunks). Not optical
//! flow's 182528 inputs (1.4 GiB of scores: see [`MAX_CHUNKS`]). It reads no constant's data,
//! only shapes.
//!
//! [`PerfOptions::max_scores_bytes`]: crate::options::PerfOptions::max_scores_bytes

use super::util::{attention_core, emit_before, producers, val, Producers};
use super::Pass;
use crate::error::Result;
use crate::ir::{Attr, Graph, Val};
use crate::options::PerfOptions;

/// Scores above this many bytes are computed in chunks unless the options say otherwise.
pub const DEFAULT_MAX_SCORES_BYTES: usize = 32 << 20;

/// Bytes of scores one chunk computes at most (a working set of about eight such tensors).
const CHUNK_SCORES_BYTES: usize = 8 << 20;

/// Most chunks one attention is split into (each adds some 20 nodes). Scores larger than this
/// many chunks of [`CHUNK_SCORES_BYTES`] are left whole: optical flow's 1.4 GiB in 64 chunks
/// made a graph tract had not finished optimising after 30 minutes.
const MAX_CHUNKS: usize = 16;

/// See the module documentation.
pub struct ChunkedAttention {
    /// Scores larger than this many bytes are chunked.
    pub max_scores_bytes: usize,
}

impl ChunkedAttention {
    /// The pass with the limit `o` sets (or the default); `None` when the options turn it off.
    pub fn from_options(o: &PerfOptions) -> Option<ChunkedAttention> {
        let max = o.max_scores_bytes.unwrap_or(DEFAULT_MAX_SCORES_BYTES);
        (max > 0 && !o.no_rewrites).then_some(ChunkedAttention { max_scores_bytes: max })
    }
}

/// `Add(MatMul(x, W), b)` or `MatMul(x, W)` with a 2-D constant `W` (and constant `b`): the input
/// and the weight and bias values.
fn linear(g: &Graph, prod: &Producers, name: &str) -> Option<(String, Val, Option<Val>)> {
    let is_const = |n: &str| g.constants.iter().any(|(c, _)| c == n);
    let mut n = &g.nodes[*prod.get(name)?];
    let mut bias = None;
    if n.op == "Add" {
        if !is_const(&n.inputs[1]) {
            return None;
        }
        bias = Some(val(g, &n.inputs[1])?);
        n = &g.nodes[*prod.get(n.inputs[0].as_str())?];
    }
    if n.op != "MatMul" || !is_const(&n.inputs[1]) {
        return None;
    }
    let w = val(g, &n.inputs[1])?;
    (w.shape.len() == 2).then(|| (n.inputs[0].clone(), w, bias))
}

/// One site: the core's nodes and the shapes the rewrite needs.
struct Site {
    /// The `probs @ Vh` node, replaced by the chunked computation.
    ctx: usize,
    x: Val,
    q: Val,
    divisor: f32,
    k: (Val, Option<Val>),
    v: (Val, Option<Val>),
    heads: usize,
    chunks: usize,
}

fn find(g: &Graph, prod: &Producers, div: usize, max_bytes: usize) -> Option<Site> {
    let core = attention_core(g, prod, div)?;
    // No mask: the softmax reads the scaled scores directly.
    let sm = &g.nodes[*prod.get(core.probs.name.as_str())?];
    if sm.inputs[0] != g.nodes[div].outputs[0].name {
        return None;
    }
    let (xk, wk, bk) = linear(g, prod, &core.k)?;
    let (xv, wv, bv) = linear(g, prod, &core.v)?;
    if xk != xv {
        return None;
    }
    let x = val(g, &xk)?;
    let q = val(g, &core.q)?;
    let scores = &g.nodes[div].outputs[0].shape;
    if x.shape.len() != 3 || q.shape.len() != 4 || scores.len() != 4 {
        return None;
    }
    let (m, heads) = (x.shape[1], q.shape[1]);
    if heads == 0 {
        return None;
    }
    let bytes = scores.iter().product::<usize>() * 4;
    if bytes <= max_bytes || bytes > MAX_CHUNKS * CHUNK_SCORES_BYTES || m < 2 {
        return None;
    }
    if wk.shape[1] % heads != 0 || wv.shape[1] % heads != 0 {
        return None;
    }
    let chunks = bytes.div_ceil(max_bytes.min(CHUNK_SCORES_BYTES)).clamp(2, MAX_CHUNKS.min(m));
    Some(Site { ctx: core.ctx, x, q, divisor: core.divisor, k: (wk, bk), v: (wv, bv), heads, chunks })
}

/// `x[:, start..end]` along axis 1.
fn slice_rows(g: &mut Graph, x: &Val, start: usize, end: usize) -> Val {
    let (s, e, a) =
        (g.const_i64("start", &[start as i64]), g.const_i64("end", &[end as i64]), g.const_i64("axis", &[1]));
    let mut shape = x.shape.clone();
    shape[1] = end - start;
    g.node("Slice", &[x, &s, &e, &a], vec![], x.dtype, shape)
}

/// Row-wise maximum / sum over the last axis, kept as a unit axis.
fn row_reduce(g: &mut Graph, op: &str, x: &Val) -> Val {
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank 4") = 1;
    match op {
        // opset 17: ReduceMax takes its axes as an attribute, ReduceSum as an input.
        "ReduceMax" => {
            g.node(op, &[x], vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))], x.dtype, shape)
        }
        _ => {
            let axes = g.const_i64("axes", &[-1]);
            g.node(op, &[x, &axes], vec![("keepdims", Attr::Int(1))], x.dtype, shape)
        }
    }
}

fn rewrite(g: &mut Graph, s: Site) {
    let ctx = g.nodes[s.ctx].clone();
    let (b, m) = (s.x.shape[0], s.x.shape[1]);
    let per = m.div_ceil(s.chunks);
    emit_before(g, &ctx.name, &ctx.outputs[0], |g| {
        let divisor = g.scalar(s.divisor);
        let project = |g: &mut Graph, x: &Val, (w, bias): &(Val, Option<Val>), perm: &[usize]| {
            let y = g.matmul(x, w);
            let y = match bias {
                Some(bias) => g.add(&y, bias),
                None => y,
            };
            let d = y.shape[2] / s.heads;
            let y = g.reshape(&y, &[b, y.shape[1], s.heads, d]);
            g.transpose(&y, perm)
        };
        // (running max, running sum, running numerator)
        let mut state: Option<(Val, Val, Val)> = None;
        for start in (0..m).step_by(per) {
            let xc = slice_rows(g, &s.x, start, (start + per).min(m));
            let kt = project(g, &xc, &s.k, &[0, 2, 3, 1]);
            let vh = project(g, &xc, &s.v, &[0, 2, 1, 3]);
            let sc = g.matmul(&s.q, &kt);
            let sc = g.binary("Div", &sc, &divisor);
            let mc = row_reduce(g, "ReduceMax", &sc);
            state = Some(match state {
                None => {
                    let e = g.binary("Sub", &sc, &mc);
                    let e = g.unary("Exp", &e);
                    let z = row_reduce(g, "ReduceSum", &e);
                    let acc = g.matmul(&e, &vh);
                    (mc, z, acc)
                }
                Some((mx, z, acc)) => {
                    let m2 = g.binary("Max", &mx, &mc);
                    let a = g.binary("Sub", &mx, &m2);
                    let a = g.unary("Exp", &a);
                    let e = g.binary("Sub", &sc, &m2);
                    let e = g.unary("Exp", &e);
                    let z = g.mul(&z, &a);
                    let ze = row_reduce(g, "ReduceSum", &e);
                    let z = g.add(&z, &ze);
                    let acc = g.mul(&acc, &a);
                    let ev = g.matmul(&e, &vh);
                    let acc = g.add(&acc, &ev);
                    (m2, z, acc)
                }
            });
        }
        let (_, z, acc) = state.expect("at least two chunks");
        let _ = g.binary("Div", &acc, &z);
    });
    let i = g.nodes.iter().position(|n| n.name == ctx.name).expect("replaced node");
    g.nodes.remove(i);
}

impl Pass for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked_attention"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        let mut sites = 0;
        let mut prod = producers(g);
        let mut i = 0;
        while i < g.nodes.len() {
            if g.nodes[i].op == "Div" {
                if let Some(site) = find(g, &prod, i, self.max_scores_bytes) {
                    rewrite(g, site);
                    prod = producers(g);
                    sites += 1;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;

    /// An attention core as the blocks emit it: X [1, M, D] -> K, V Linears, constant queries.
    fn core(m: usize) -> Graph {
        let (d, h, dk, n) = (8, 2, 4, 3);
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[1, m, d]);
        let w = |g: &mut Graph, name: &str, seed: usize| {
            let data: Vec<f32> = (0..d * h * dk).map(|i| ((i * 7 + seed) % 11) as f32 / 11.0 - 0.5).collect();
            g.const_f32(name, &[d, h * dk], &data)
        };
        let (wk, wv) = (w(&mut g, "wk", 1), w(&mut g, "wv", 2));
        let bk = g.const_f32("bk", &[h * dk], &[0.1; 8]);
        let k = g.matmul(&x, &wk);
        let k = g.add(&k, &bk);
        let v = g.matmul(&x, &wv);
        let qd: Vec<f32> = (0..h * n * dk).map(|i| (i % 5) as f32 / 5.0).collect();
        let q = g.const_f32("q", &[1, h, n, dk], &qd);
        let kt = g.reshape(&k, &[1, m, h, dk]);
        let kt = g.transpose(&kt, &[0, 2, 3, 1]);
        let vh = g.reshape(&v, &[1, m, h, dk]);
        let vh = g.transpose(&vh, &[0, 2, 1, 3]);
        let s = g.matmul(&q, &kt);
        let two = g.scalar(2.0);
        let s = g.binary("Div", &s, &two);
        let p = g.softmax(&s);
        let o = g.matmul(&p, &vh);
        g.output(&o, "o");
        g
    }

    #[test]
    fn fires_above_the_limit_only_and_chunks_the_inputs() {
        // Scores [1, 2, 3, 40] are 960 bytes.
        let mut g = core(40);
        ChunkedAttention { max_scores_bytes: 960 }.run(&mut g).unwrap();
        assert!(!g.nodes.iter().any(|n| n.op == "Slice"), "at the limit: unchanged");
        ChunkedAttention { max_scores_bytes: 250 }.run(&mut g).unwrap();
        let slices: Vec<usize> = g.nodes.iter().filter(|n| n.op == "Slice").map(|n| n.outputs[0].shape[1]).collect();
        assert_eq!(slices, vec![10, 10, 10, 10], "4 chunks of the 40 inputs");
        assert!(!g.nodes.iter().any(|n| n.op == "Softmax"));
        assert_eq!(g.nodes.iter().filter(|n| n.op == "ReduceMax").count(), 4);
    }
}
