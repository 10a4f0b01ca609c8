//! Building blocks shared by every PerceiverIO part: linear layers, LayerNorm, activations,
//! multi-head attention and the pre-LN `PerceiverLayer` (attention + MLP with residuals).

use crate::checkpoint::{Checkpoint, Weight};
use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Graph, TensorData, Val};
use std::collections::{BTreeMap, HashMap};

/// LayerNorm epsilon: transformers' Perceiver uses `nn.LayerNorm` defaults, not `layer_norm_eps`.
pub const LN_EPS: f32 = 1e-5;

/// Emits graph nodes for checkpoint weights, loading each tensor once (shared blocks reuse it).
pub struct Builder<'a> {
    /// The graph under construction.
    pub g: Graph,
    /// The checkpoint the weights come from.
    pub ck: &'a Checkpoint,
    /// Fixed batch size of the exported graph.
    pub batch: usize,
    /// Architecture sizes noted while building (`N`, `D`, `M`, `C`, `O`, `E`), for `inspect`.
    pub dims: BTreeMap<&'static str, usize>,
    /// Budget knobs (kept latents, block repetitions) and calibration hooks.
    pub budget: crate::model::budget::Budget,
    /// With `budget.expose_attention`: every attention's probabilities `[B, H, Lq, Lk]`, with
    /// the checkpoint prefix of the attention that produced them, in graph order.
    pub attention_probs: Vec<(String, Val)>,
    /// Subset queries are rows of the full query grid ([`crate::options::ExportOptions::grid_subset`]).
    pub grid_subset: bool,
    /// Leave weight matrices of [`DEFERRED_MIN_ELEMENTS`] or more on disk: their constants are
    /// stripped ([`TensorData::deferred_f32`]) and read back when asked for (see
    /// [`crate::heads::build_graph_deferred`]).
    pub defer_weights: bool,
    weights: HashMap<String, Val>,
}

/// The smallest weight matrix a deferred build leaves on disk: smaller ones and every vector
/// (scales, biases: the passes' matchers look them up anywhere) are read at once.
pub const DEFERRED_MIN_ELEMENTS: usize = 1024;

/// A checkpoint tensor as a constant's shape and bytes (f32, little-endian), transposed if asked
/// (2-D): straight into the bytes, no f32 copy next to the checkpoint's.
pub(crate) fn weight_bytes(w: &Weight, transpose: bool) -> (Vec<usize>, Vec<u8>) {
    if transpose {
        let (r, c) = (w.shape[0], w.shape[1]);
        let mut t = vec![0u8; r * c * 4];
        for (i, row) in w.data.chunks_exact(c).enumerate() {
            for (j, v) in row.iter().enumerate() {
                t[(j * r + i) * 4..][..4].copy_from_slice(&v.to_le_bytes());
            }
        }
        (vec![c, r], t)
    } else {
        (w.shape.clone(), w.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// The name of a checkpoint tensor's constant, and the key it is cached under: the tensor's full
/// name, with `.T` when transposed ([`tensor_of_key`] is the inverse).
fn cache_key(full_name: &str, transpose: bool) -> String {
    if transpose {
        format!("{full_name}.T")
    } else {
        full_name.to_string()
    }
}

/// The checkpoint tensor (full name) and transposition a weight constant named by [`cache_key`]
/// holds: how an export reads a weight back by its constant's name.
pub(crate) fn tensor_of_key(key: &str) -> (&str, bool) {
    match key.strip_suffix(".T") {
        Some(full) => (full, true),
        None => (key, false),
    }
}

/// Weight constant `name` (named by [`cache_key`]) of shape `shape`, read back from the
/// checkpoint's `tensors` for a graph whose weights were left on disk ([`Graph::defer`]).
pub(crate) fn read_back(tensors: &crate::checkpoint::Tensors, name: &str, shape: &[usize]) -> Result<TensorData> {
    let (full, transpose) = tensor_of_key(name);
    let (_, bytes) = weight_bytes(&tensors.read(full)?, transpose);
    Ok(TensorData { dtype: DType::F32, shape: shape.to_vec(), bytes: bytes.into() })
}

/// Options of one `PerceiverLayer` that are not visible in its weights.
#[derive(Clone, Copy, Debug)]
pub struct LayerOpts {
    /// Attention heads.
    pub heads: usize,
    /// Add the (un-normalised) query input to the attention output.
    pub query_residual: bool,
}

impl<'a> Builder<'a> {
    /// A builder over `ck` for graphs of batch size `batch`.
    pub fn new(ck: &'a Checkpoint, batch: usize) -> Builder<'a> {
        Builder {
            g: Graph::new(),
            ck,
            batch,
            dims: BTreeMap::new(),
            budget: Default::default(),
            attention_probs: vec![],
            grid_subset: false,
            defer_weights: false,
            weights: HashMap::new(),
        }
    }

    /// A checkpoint tensor as a graph constant, optionally transposed (2-D only), cached by name.
    fn constant(&mut self, w: &Weight, transpose: bool) -> Val {
        let key = cache_key(&w.name, transpose);
        if let Some(v) = self.weights.get(&key) {
            return v.clone();
        }
        let (shape, bytes) = weight_bytes(w, transpose);
        let v = Val { name: key.clone(), dtype: DType::F32, shape: shape.clone() };
        self.g.constants.push((key.clone(), TensorData::f32_le_bytes(&shape, bytes)));
        self.weights.insert(key, v.clone());
        v
    }

    /// Model tensor `name` (under the `perceiver.` prefix) as a constant of the given shape.
    pub fn param(&mut self, name: &str, shape: &[Option<usize>]) -> Result<Val> {
        self.weight(name, shape, false)
    }

    /// Checkpoint tensor `name` of shape `shape` as a constant, optionally transposed: read from
    /// the checkpoint the first time, shared afterwards (a weight-shared block is applied
    /// several times).
    fn weight(&mut self, name: &str, shape: &[Option<usize>], transpose: bool) -> Result<Val> {
        let full = self.ck.full_name(name);
        let key = cache_key(&full, transpose);
        if let Some(v) = self.weights.get(&key) {
            self.ck.check_stored_shape(name, shape)?;
            return Ok(v.clone());
        }
        if self.defer_weights {
            self.ck.check_stored_shape(name, shape)?;
            let stored = self.ck.stored_shape(&full).unwrap_or_default();
            if stored.len() == 2 && stored[0] * stored[1] >= DEFERRED_MIN_ELEMENTS {
                let shape = if transpose { vec![stored[1], stored[0]] } else { stored.to_vec() };
                let v = Val { name: key.clone(), dtype: DType::F32, shape: shape.clone() };
                self.g.constants.push((key.clone(), TensorData::deferred_f32(&shape)));
                self.weights.insert(key, v.clone());
                return Ok(v);
            }
        }
        let w = self.ck.get_shaped(name, shape)?;
        Ok(self.constant(&w, transpose))
    }

    /// Model tensor `name` as a constant reshaped to `shape` (same element count).
    pub fn param_as(&mut self, name: &str, check: &[Option<usize>], shape: &[usize]) -> Result<Val> {
        let mut w = self.ck.get_shaped(name, check)?;
        if w.data.len() != shape.iter().product::<usize>() {
            return Err(Error::tensor(
                &w.name,
                format!("has shape {:?}, expected {} elements", w.shape, shape.iter().product::<usize>()),
            ));
        }
        w.shape = shape.to_vec();
        Ok(self.constant(&w, false))
    }

    /// `x @ W^T + b` computed at export time for a constant `x` (`[rows, in]`, row-major).
    pub fn linear_const(&self, prefix: &str, x: &[f32], rows: usize) -> Result<(Vec<f32>, usize)> {
        let cin = x.len() / rows.max(1);
        let w = self.ck.get_shaped(&format!("{prefix}.weight"), &[None, Some(cin)])?;
        let out = w.shape[0];
        let bias = format!("{prefix}.bias");
        let b = if self.ck.has(&bias) { Some(self.ck.get_shaped(&bias, &[Some(out)])?) } else { None };
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut acc = 0f64;
                for i in 0..cin {
                    acc += x[r * cin + i] as f64 * w.data[o * cin + i] as f64;
                }
                y[r * out + o] = acc as f32 + b.as_ref().map_or(0.0, |b| b.data[o]);
            }
        }
        Ok((y, out))
    }

    /// `x @ W^T + b` for the checkpoint Linear `prefix` (`prefix.weight [out, in]`, `prefix.bias`).
    pub fn linear(&mut self, prefix: &str, x: &Val) -> Result<Val> {
        let name = format!("{prefix}.weight");
        let wt = self.weight(&name, &[None, Some(x.last_dim())], true)?;
        let out = wt.shape[1];
        let y = self.g.matmul(x, &wt);
        let bias = format!("{prefix}.bias");
        if self.ck.has(&bias) {
            let b = self.param(&bias, &[Some(out)])?;
            Ok(self.g.add(&y, &b))
        } else {
            Ok(y)
        }
    }

    /// LayerNorm over the last axis with the checkpoint's `prefix.weight` / `prefix.bias`.
    pub fn layer_norm(&mut self, prefix: &str, x: &Val) -> Result<Val> {
        let c = Some(x.last_dim());
        let scale = self.param(&format!("{prefix}.weight"), &[c])?;
        let bias = self.param(&format!("{prefix}.bias"), &[c])?;
        Ok(self.g.node(
            "LayerNormalization",
            &[x, &scale, &bias],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(LN_EPS))],
            x.dtype,
            x.shape.clone(),
        ))
    }

    /// The configured MLP activation (`hidden_act`).
    pub fn activation(&mut self, x: &Val) -> Result<Val> {
        let g = &mut self.g;
        Ok(match self.ck.config.hidden_act.as_str() {
            // Exact GELU, in the form tract fuses into one GeluExact op.
            "gelu" => {
                let s = g.mul_scalar(x, 2f32.sqrt().recip());
                let e = g.unary("Erf", &s);
                let one = g.scalar(1.0);
                let e1 = g.add(&e, &one);
                let half = g.mul_scalar(x, 0.5);
                g.mul(&half, &e1)
            }
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let x3 = g.mul(x, x);
                let x3 = g.mul(&x3, x);
                let t = g.mul_scalar(&x3, 0.044715);
                let t = g.add(x, &t);
                let t = g.mul_scalar(&t, (2.0 / std::f32::consts::PI).sqrt());
                let t = g.unary("Tanh", &t);
                let one = g.scalar(1.0);
                let t = g.add(&t, &one);
                let half = g.mul_scalar(x, 0.5);
                g.mul(&half, &t)
            }
            "relu" => g.unary("Relu", x),
            "silu" | "swish" => {
                let s = g.unary("Sigmoid", x);
                g.mul(x, &s)
            }
            "tanh" => g.unary("Tanh", x),
            "sigmoid" => g.unary("Sigmoid", x),
            other => {
                return Err(Error::invalid(format!(
                    "config.json: hidden_act \"{other}\" is not supported (expected gelu, gelu_new, relu, silu, tanh or sigmoid)"
                )))
            }
        })
    }

    /// Splits `[B, L, H*d]` into heads `[B, H, L, d]` (or `[B, H, d, L]` with `keys_t`).
    fn heads(&mut self, x: &Val, heads: usize, keys_t: bool) -> Val {
        let (b, l, c) = (x.shape[0], x.shape[1], x.shape[2]);
        let r = self.g.reshape(x, &[b, l, heads, c / heads]);
        self.g.transpose(&r, if keys_t { &[0, 2, 3, 1] } else { &[0, 2, 1, 3] })
    }

    /// Multi-head attention of `PerceiverSelfAttention` + output dense: queries from `x`,
    /// keys/values from `kv` (cross) or `x` (self); `mask` is additive, `[B, 1, 1, M]`.
    pub fn attention(
        &mut self,
        prefix: &str,
        x: &Val,
        kv: Option<&Val>,
        mask: Option<&Val>,
        heads: usize,
    ) -> Result<Val> {
        let q_in = self.layer_norm(&format!("{prefix}.self.layernorm1"), x)?;
        let kv_in = match kv {
            Some(kv) => self.layer_norm(&format!("{prefix}.self.layernorm2"), kv)?,
            None => q_in.clone(),
        };
        let q = self.linear(&format!("{prefix}.self.query"), &q_in)?;
        let k = self.linear(&format!("{prefix}.self.key"), &kv_in)?;
        let v = self.linear(&format!("{prefix}.self.value"), &kv_in)?;
        for (t, n) in [(&q, "query"), (&k, "key"), (&v, "value")] {
            if !t.last_dim().is_multiple_of(heads) {
                let name = self.ck.get(&format!("{prefix}.self.{n}.weight"))?.name.clone();
                return Err(Error::tensor(
                    &name,
                    format!("{} channels are not divisible by {heads} heads", t.last_dim()),
                ));
            }
        }
        if q.last_dim() != k.last_dim() {
            let name = self.ck.get(&format!("{prefix}.self.key.weight"))?.name.clone();
            return Err(Error::tensor(
                &name,
                format!("projects to {} channels, expected {} (the query's)", k.last_dim(), q.last_dim()),
            ));
        }
        let head_dim = q.last_dim() / heads;
        let qh = self.heads(&q, heads, false);
        let kh = self.heads(&k, heads, true);
        let vh = self.heads(&v, heads, false);
        let scores = self.g.matmul(&qh, &kh);
        let denom = self.g.scalar((head_dim as f32).sqrt());
        let mut scores = self.g.binary("Div", &scores, &denom);
        if let Some(m) = mask {
            scores = self.g.add(&scores, m);
        }
        let probs = self.g.softmax(&scores);
        if self.budget.expose_attention {
            self.attention_probs.push((prefix.to_string(), probs.clone()));
        }
        let ctx = self.g.matmul(&probs, &vh);
        let ctx = self.g.transpose(&ctx, &[0, 2, 1, 3]);
        let (b, n, h, d) = (ctx.shape[0], ctx.shape[1], ctx.shape[2], ctx.shape[3]);
        let ctx = self.g.reshape(&ctx, &[b, n, h * d]);
        self.linear(&format!("{prefix}.output.dense"), &ctx)
    }

    /// One `PerceiverLayer`: attention (+ query residual), then `y + MLP(LN(y))`.
    pub fn perceiver_layer(
        &mut self,
        prefix: &str,
        x: &Val,
        kv: Option<&Val>,
        mask: Option<&Val>,
        opts: LayerOpts,
    ) -> Result<Val> {
        let attn = format!("{prefix}.attention");
        let mut y = self.scoped("attention", |b| b.attention(&attn, x, kv, mask, opts.heads))?;
        if opts.query_residual {
            if y.last_dim() != x.last_dim() {
                let name = self.ck.get(&format!("{attn}.output.dense.weight"))?.name.clone();
                return Err(Error::tensor(
                    &name,
                    format!("outputs {} channels, the residual needs {}", y.last_dim(), x.last_dim()),
                ));
            }
            y = self.g.add(&y, x);
        }
        let out = self.scoped("mlp", |b| {
            let h = b.layer_norm(&format!("{prefix}.layernorm"), &y)?;
            let h = b.linear(&format!("{prefix}.mlp.dense1"), &h)?;
            let h = b.activation(&h)?;
            b.linear(&format!("{prefix}.mlp.dense2"), &h)
        })?;
        Ok(self.g.add(&out, &y))
    }

    /// Runs `f` inside node-name scope `name`.
    pub fn scoped<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.g.push_scope(name);
        let out = f(self);
        self.g.pop_scope();
        out
    }
}
