//! The PerceiverIO forward pass of an image Fourier classifier, `no_std` and without a heap:
//! every buffer is an array whose size is a compile-time constant from the pack header
//! ([`crate::pack::dims`]), held in one static [`Workspace`]. Linear layers over f32 weights use
//! nalgebra matrix views of flash (no copies); int8 weights use a per-row scaled dot product.
//!
//! Numerics follow transformers' Perceiver (engine notes): pre-LN attention layers, LayerNorm
//! eps 1e-5, softmax(QK^T / sqrt(qk/heads)), exact (erf) GELU, query residual per layer.

use crate::pack::dims::*;
use crate::pack::{Reader, Weights};
use nalgebra::{SMatrixView, SVectorView, SVectorViewMut};

/// LayerNorm epsilon of transformers' Perceiver.
const LN_EPS: f32 = 1e-5;

/// A Linear layer `I -> O` (weights `[O, I]` row-major, as torch stores them).
pub struct Linear<const I: usize, const O: usize> {
    w: Weights,
    b: &'static [f32],
}

impl<const I: usize, const O: usize> Linear<I, O> {
    fn read(r: &mut Reader) -> Self {
        Linear { w: r.take_matrix(O, I), b: r.take(O) }
    }

    /// `y = W x + b`.
    pub fn apply(&self, x: &[f32; I], y: &mut [f32; O]) {
        match self.w {
            Weights::F32(w) => {
                // Row-major [O, I] is nalgebra's column-major I x O: y = (that)^T x.
                let wm = SMatrixView::<f32, I, O>::from_slice(w);
                let xv = SVectorView::<f32, I>::from_slice(x);
                let mut yv = SVectorViewMut::<f32, O>::from_slice(y);
                wm.tr_mul_to(&xv, &mut yv);
            }
            Weights::I8(q, scale) => {
                for (o, yo) in y.iter_mut().enumerate() {
                    let row = &q[o * I..(o + 1) * I];
                    let acc: f32 = row.iter().zip(x).map(|(&a, &b)| f32::from(a) * b).sum();
                    *yo = acc * scale[o];
                }
            }
        }
        for (yo, b) in y.iter_mut().zip(self.b) {
            *yo += b;
        }
    }
}

/// LayerNorm parameters (weight, bias).
#[derive(Clone, Copy)]
pub struct Norm {
    w: &'static [f32],
    b: &'static [f32],
}

impl Norm {
    fn read(r: &mut Reader, k: usize) -> Self {
        Norm { w: r.take(k), b: r.take(k) }
    }

    /// `out = (x - mean) / sqrt(var + eps) * w + b` (biased variance, as torch).
    pub fn apply<const K: usize>(&self, x: &[f32; K], out: &mut [f32; K]) {
        let mean = x.iter().sum::<f32>() / K as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / K as f32;
        let inv = 1.0 / libm::sqrtf(var + LN_EPS);
        for i in 0..K {
            out[i] = (x[i] - mean) * inv * self.w[i] + self.b[i];
        }
    }
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2))
}

/// One PerceiverIO attention layer: queries of width `QD`, keys/values from rows of width
/// `KD`, `QK`/`V` attention widths, MLP hidden width `HID`.
pub struct Layer<const QD: usize, const KD: usize, const QK: usize, const V: usize, const HID: usize> {
    ln_q: Norm,
    ln_kv: Norm,
    q: Linear<QD, QK>,
    k: Linear<KD, QK>,
    v: Linear<KD, V>,
    o: Linear<V, QD>,
    ln: Norm,
    mlp1: Linear<QD, HID>,
    mlp2: Linear<HID, QD>,
    heads: usize,
    residual: bool,
}

impl<const QD: usize, const KD: usize, const QK: usize, const V: usize, const HID: usize> Layer<QD, KD, QK, V, HID> {
    /// Reads a layer in pack order; self-attention layers (`cross == false`) normalise keys and
    /// values with the query LayerNorm.
    fn read(r: &mut Reader, cross: bool, heads: usize, residual: bool) -> Self {
        let ln_q = Norm::read(r, QD);
        let ln_kv = if cross { Norm::read(r, KD) } else { ln_q };
        assert!(cross || QD == KD);
        Layer {
            ln_q,
            ln_kv,
            q: Linear::read(r),
            k: Linear::read(r),
            v: Linear::read(r),
            o: Linear::read(r),
            ln: Norm::read(r, QD),
            mlp1: Linear::read(r),
            mlp2: Linear::read(r),
            heads,
            residual,
        }
    }

    /// Keys and values of `NKV` rows; `row(m, out)` writes row `m` (before normalisation).
    pub fn project_kv<const NKV: usize>(
        &self,
        mut row: impl FnMut(usize, &mut [f32; KD]),
        k: &mut [[f32; QK]; NKV],
        v: &mut [[f32; V]; NKV],
    ) {
        let mut raw = [0f32; KD];
        let mut n = [0f32; KD];
        for m in 0..NKV {
            row(m, &mut raw);
            self.ln_kv.apply(&raw, &mut n);
            self.k.apply(&n, &mut k[m]);
            self.v.apply(&n, &mut v[m]);
        }
    }

    /// Updates the `NQ` query rows `x` in place: attention over `k`/`v`, residual, MLP.
    pub fn attend<const NQ: usize, const NKV: usize>(
        &self,
        x: &mut [[f32; QD]; NQ],
        k: &[[f32; QK]; NKV],
        v: &[[f32; V]; NKV],
        scores: &mut [f32; NKV],
    ) {
        let (dq, dv) = (QK / self.heads, V / self.heads);
        let scale = 1.0 / libm::sqrtf(dq as f32);
        let mut qn = [0f32; QD];
        let mut q = [0f32; QK];
        let mut att = [0f32; V];
        let mut y = [0f32; QD];
        let mut yn = [0f32; QD];
        let mut hid = [0f32; HID];
        let mut out = [0f32; QD];
        for xi in x.iter_mut() {
            self.ln_q.apply(xi, &mut qn);
            self.q.apply(&qn, &mut q);
            att.fill(0.0);
            for h in 0..self.heads {
                let qh = &q[h * dq..(h + 1) * dq];
                let mut max = f32::NEG_INFINITY;
                for (s, km) in scores.iter_mut().zip(k) {
                    *s = qh.iter().zip(&km[h * dq..(h + 1) * dq]).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*s);
                }
                let mut z = 0.0;
                for s in scores.iter_mut() {
                    *s = libm::expf(*s - max);
                    z += *s;
                }
                let ah = &mut att[h * dv..(h + 1) * dv];
                for (s, vm) in scores.iter().zip(v) {
                    let p = s / z;
                    for (a, b) in ah.iter_mut().zip(&vm[h * dv..(h + 1) * dv]) {
                        *a += p * b;
                    }
                }
            }
            self.o.apply(&att, &mut y);
            if self.residual {
                for (a, b) in y.iter_mut().zip(xi.iter()) {
                    *a += b;
                }
            }
            self.ln.apply(&y, &mut yn);
            self.mlp1.apply(&yn, &mut hid);
            for h in hid.iter_mut() {
                *h = gelu(*h);
            }
            self.mlp2.apply(&hid, &mut out);
            for i in 0..QD {
                xi[i] = y[i] + out[i];
            }
        }
    }
}

/// Activation memory: one static instance, sized at compile time.
pub struct Workspace {
    z: [[f32; D]; N],
    k_x: [[f32; X_QK]; M],
    v_x: [[f32; X_V]; M],
    s_x: [f32; M],
    k_s: [[f32; S_QK]; N],
    v_s: [[f32; S_V]; N],
    s_n: [f32; N],
    q_o: [[f32; E]; 1],
    k_o: [[f32; O_QK]; N],
    v_o: [[f32; O_V]; N],
}

impl Workspace {
    /// All zeros (lands in .bss).
    pub const ZERO: Workspace = Workspace {
        z: [[0.0; D]; N],
        k_x: [[0.0; X_QK]; M],
        v_x: [[0.0; X_V]; M],
        s_x: [0.0; M],
        k_s: [[0.0; S_QK]; N],
        v_s: [[0.0; S_V]; N],
        s_n: [0.0; N],
        q_o: [[0.0; E]; 1],
        k_o: [[0.0; O_QK]; N],
        v_o: [[0.0; O_V]; N],
    };
}

/// The model: views of the pack.
pub struct Model {
    pos: &'static [f32],
    latents: &'static [f32],
    cross: Layer<D, C, X_QK, X_V, X_HIDDEN>,
    latent_layers: [Layer<D, D, S_QK, S_V, S_HIDDEN>; S_LAYERS],
    query: &'static [f32],
    decoder: Layer<E, D, O_QK, O_V, O_HIDDEN>,
    last: Linear<E, LABELS>,
}

impl Model {
    /// Reads every tensor of the pack (in pack order) and checks that none is left.
    pub fn load() -> Model {
        let mut r = Reader::new();
        let pos = r.take(M * (C - IN_CH));
        let latents = r.take(N * D);
        let cross = Layer::read(&mut r, true, X_HEADS, X_RESIDUAL == 1);
        let latent_layers = core::array::from_fn(|_| Layer::read(&mut r, false, S_HEADS, true));
        let query = r.take(E);
        let decoder = Layer::read(&mut r, true, O_HEADS, O_RESIDUAL == 1);
        let last = Linear::read(&mut r);
        assert!(r.remaining() == 0, "pack has extra tensors");
        Model { pos, latents, cross, latent_layers, query, decoder, last }
    }

    /// Logits of one image, `pixels` `[IN_CH, H, W]` (NCHW, batch 1) in 0..1.
    pub fn forward(&self, ws: &mut Workspace, pixels: &[f32], logits: &mut [f32; LABELS]) {
        assert!(pixels.len() == IN_CH * M);
        let pos_w = C - IN_CH;
        // Encoder: latents cross-attend to [pixels, Fourier features] tokens built on the fly.
        for (zi, l) in ws.z.iter_mut().zip(self.latents.chunks_exact(D)) {
            zi.copy_from_slice(l);
        }
        let pos = self.pos;
        self.cross.project_kv(
            |m, out: &mut [f32; C]| {
                for c in 0..IN_CH {
                    out[c] = pixels[c * M + m];
                }
                out[IN_CH..].copy_from_slice(&pos[m * pos_w..(m + 1) * pos_w]);
            },
            &mut ws.k_x,
            &mut ws.v_x,
        );
        self.cross.attend(&mut ws.z, &ws.k_x, &ws.v_x, &mut ws.s_x);
        // Latent self-attention, the block applied BLOCKS times with the same weights.
        for _ in 0..BLOCKS {
            for layer in &self.latent_layers {
                let z = &ws.z;
                layer.project_kv(|m, out: &mut [f32; D]| *out = z[m], &mut ws.k_s, &mut ws.v_s);
                layer.attend(&mut ws.z, &ws.k_s, &ws.v_s, &mut ws.s_n);
            }
        }
        // Classification decoder: one trainable query attends to the latents.
        ws.q_o[0].copy_from_slice(self.query);
        let z = &ws.z;
        self.decoder.project_kv(|m, out: &mut [f32; D]| *out = z[m], &mut ws.k_o, &mut ws.v_o);
        self.decoder.attend(&mut ws.q_o, &ws.k_o, &ws.v_o, &mut ws.s_n);
        self.last.apply(&ws.q_o[0], logits);
    }
}
