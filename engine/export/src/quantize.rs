//! Reduced-precision graphs: one [`Pass`] per precision over the exporter's [`Graph`].
//!
//! - [`ToF16`]: f16 constants and arithmetic; graph inputs and outputs stay f32 (a `Cast` at
//!   each end), and the sensitive ops (LayerNorm, Softmax) run in f32 between casts.
//! - [`Int8Dynamic`]: every Linear (`MatMul` by a constant weight) becomes
//!   `DynamicQuantizeLinear` + `MatMulInteger` with per-output-channel symmetric int8 weights,
//!   then one f32 rescale (`x_scale * w_scale[n]`). tract keeps the weight int8 and runs an
//!   int8 kernel with i32 accumulation.
//! - [`Int8Static`]: the same, with the activation scale and zero point fixed from calibration
//!   ranges (`QuantizeLinear` with constant parameters feeding `MatMulInteger`). A pure QDQ
//!   graph (`DequantizeLinear` on the weight) would be folded back to f32 weights by tract, so
//!   the integer matmul is written explicitly.
//! - [`Q4`]: `com.microsoft` `MatMulNBits` (4-bit, block 32, symmetric, implicit zero point 8;
//!   tract keeps it packed as Q4_0). K is zero-padded to a multiple of 32 where needed;
//!   Linears with K < 32 fall back to dynamic int8.
//!
//! The int8 and q4 passes also store the other large constants (position tables, latents,
//! embeddings, convolution kernels) as int8 with a per-axis `DequantizeLinear`: that shrinks
//! the file; tract folds them back to f32 at load.
//!
//! Every rewritten node keeps the name of the value it replaces, so the graphs stay comparable
//! layer by layer (`perceiver-edge compare`).

use crate::error::{Error, Result};
use crate::graph::{Attr, DType, Graph, Node, TensorData, Val};
use crate::passes::Pass;
use half::f16;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

/// Numeric precision of an exported graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit float (no quantisation pass).
    #[default]
    F32,
    /// f16 weights and arithmetic.
    F16,
    /// int8 weights, activations quantised at run time.
    Int8,
    /// int8 weights, activation scales from calibration data.
    Int8Static,
    /// 4-bit block-quantised weights (MatMulNBits, block 32).
    Q4,
}

impl Precision {
    /// All precisions with their command-line names.
    pub const ALL: [(Precision, &'static str); 5] = [
        (Precision::F32, "f32"),
        (Precision::F16, "f16"),
        (Precision::Int8, "int8"),
        (Precision::Int8Static, "int8-static"),
        (Precision::Q4, "q4"),
    ];

    /// Bytes per stored weight (q4: half a byte, block scales aside).
    pub fn weight_bytes(self) -> f64 {
        match self {
            Precision::F32 => 4.0,
            Precision::F16 => 2.0,
            Precision::Int8 | Precision::Int8Static => 1.0,
            Precision::Q4 => 0.5,
        }
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Precision::ALL.iter().find(|(p, _)| *p == self).map(|(_, n)| *n).unwrap_or("?")
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Precision> {
        Precision::ALL.iter().find(|(_, n)| *n == s).map(|(p, _)| *p).ok_or_else(|| {
            Error::invalid(format!("unknown precision \"{s}\" (expected f32, f16, int8, int8-static or q4)"))
        })
    }
}

/// Ops that [`ToF16`] keeps in f32 by default (numerically sensitive reductions).
pub const F16_KEEP_OPS: [&str; 2] = ["LayerNormalization", "Softmax"];

/// Metadata key recording the precision of an exported graph.
pub const PRECISION_KEY: &str = "perceiver_edge.precision";

/// Constants with fewer elements than this stay f32 in the int8/q4 graphs (biases, LayerNorm
/// parameters, scales): they cost little and some are sensitive.
pub const MIN_QUANT_ELEMENTS: usize = 1024;

/// Name patterns selecting nodes or weights to keep in f32: a pattern matches a name that
/// contains it, `*` matching any run of characters (`encoder.cross*key`).
#[derive(Clone, Debug, Default)]
pub struct KeepF32 {
    patterns: Vec<String>,
}

impl KeepF32 {
    /// Patterns as given on the command line.
    pub fn new(patterns: &[String]) -> KeepF32 {
        KeepF32 { patterns: patterns.to_vec() }
    }

    /// True if any pattern matches `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob_contains(p, name))
    }

    /// Fails with a one-line error naming the first pattern that matches none of `names`.
    pub fn check_all_used<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        for p in &self.patterns {
            if !names.clone().any(|n| glob_contains(p, n)) {
                return Err(Error::invalid(format!(
                    "--keep-f32 \"{p}\" matches no node or weight name of the graph (names look like \
                     `encoder.self.0.1/mlp/MatMul_96` or `perceiver.encoder.cross_attention.attention.self.key.weight.T`)"
                )));
            }
        }
        Ok(())
    }
}

/// True if `name` contains `pattern`, `*` in the pattern matching any run of characters.
pub fn glob_contains(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').filter(|p| !p.is_empty()).collect();
    let mut at = 0;
    for part in parts {
        match name[at..].find(part) {
            Some(i) => at += i + part.len(),
            None => return false,
        }
    }
    true
}

/// A Linear of the graph: a `MatMul` whose second input is a 2-D f32 constant `[K, N]`.
struct Linear {
    node: usize,
    weight: String,
    k: usize,
    n: usize,
}

fn linears(g: &Graph) -> Vec<Linear> {
    let consts: HashMap<&str, &TensorData> = g.constants.iter().map(|(n, t)| (n.as_str(), t)).collect();
    g.nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op == "MatMul" && n.domain.is_empty())
        .filter_map(|(i, n)| {
            let w = consts.get(n.inputs[1].as_str())?;
            (w.dtype == DType::F32 && w.shape.len() == 2).then(|| Linear {
                node: i,
                weight: n.inputs[1].clone(),
                k: w.shape[0],
                n: w.shape[1],
            })
        })
        .collect()
}

/// The value names of `g` that carry activations into the Linears the int8 passes quantise
/// (graph order, deduplicated): what int8-static calibration must measure.
pub fn int8_activation_inputs(g: &Graph, keep: &KeepF32) -> Vec<String> {
    let mut seen = HashSet::new();
    let constant = input_independent(g);
    linears(g)
        .into_iter()
        .filter(|l| !kept(g, l, keep) && !weight_only(l) && !constant.contains(&g.nodes[l.node].inputs[0]))
        .map(|l| g.nodes[l.node].inputs[0].clone())
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

fn kept(g: &Graph, l: &Linear, keep: &KeepF32) -> bool {
    keep.matches(&g.nodes[l.node].name) || keep.matches(&l.weight) || crate::is_table(&l.weight)
}

fn all_names(g: &Graph) -> Vec<&str> {
    g.nodes.iter().map(|n| n.name.as_str()).chain(g.constants.iter().map(|(n, _)| n.as_str())).collect()
}

fn node(name: String, op: &str, inputs: Vec<String>, out: Val, attrs: Vec<(&str, Attr)>) -> Node {
    Node {
        name,
        op: op.into(),
        domain: String::new(),
        inputs,
        outputs: vec![out],
        attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

fn val(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Val {
    Val { name: name.into(), dtype, shape: shape.to_vec() }
}

fn tensor(dtype: DType, shape: &[usize], bytes: Vec<u8>) -> TensorData {
    TensorData { dtype, shape: shape.to_vec(), bytes }
}

/// Per-output-channel symmetric int8 quantisation of a `[K, N]` weight: codes in -127..=127
/// (row-major like the weight) and one scale per column.
pub fn quantize_per_column(w: &[f32], k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scales = vec![0f32; n];
    for r in 0..k {
        for c in 0..n {
            scales[c] = scales[c].max(w[r * n + c].abs());
        }
    }
    for s in &mut scales {
        *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
    }
    let q = (0..k * n).map(|i| (w[i] / scales[i % n]).round().clamp(-127.0, 127.0) as i8).collect();
    (q, scales)
}

/// Symmetric 4-bit block quantisation of a `[K, N]` weight in the `MatMulNBits` layout:
/// `B` is `[N, K/32, 16]` (two codes a byte, low nibble first; code 8 is zero) and one scale
/// per (column, block), rounded to f16 so every runtime dequantises identically.
pub fn quantize_q4(w: &[f32], k: usize, n: usize) -> (Vec<u8>, Vec<f32>) {
    let blocks = k / 32;
    let mut packed = vec![0u8; n * blocks * 16];
    let mut scales = vec![0f32; n * blocks];
    for c in 0..n {
        for b in 0..blocks {
            let vals: Vec<f32> = (0..32).map(|i| w[(b * 32 + i) * n + c]).collect();
            // Q4_0: the largest-magnitude value maps to code 0 (-8 * d), using the full range.
            let m = vals.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = f16::from_f32(m / -8.0).to_f32();
            scales[c * blocks + b] = d;
            for (i, v) in vals.iter().enumerate() {
                let q = if d == 0.0 { 8u8 } else { ((v / d).round() + 8.0).clamp(0.0, 15.0) as u8 };
                packed[(c * blocks + b) * 16 + i / 2] |= q << (4 * (i % 2));
            }
        }
    }
    (packed, scales)
}

/// Replaces the large f32 constants that are not Linear weights (and not LayerNorm
/// parameters) by int8 codes + per-axis scales + `DequantizeLinear`, keeping their names.
/// Per-head `[H, K, N]` MatMul weights (from the attention rewrites) are stored this way too;
/// the rewrites' precomputed tables are stored f16.
fn quantize_storage(g: &mut Graph, keep: &KeepF32) {
    let mut uses: HashMap<String, Vec<(String, usize)>> = HashMap::new();
    for n in &g.nodes {
        for (i, x) in n.inputs.iter().enumerate() {
            uses.entry(x.clone()).or_default().push((n.op.clone(), i));
        }
    }
    let mut new_nodes = vec![];
    let mut constants = vec![];
    for (name, t) in std::mem::take(&mut g.constants) {
        let u = uses.get(&name).cloned().unwrap_or_default();
        let skip = t.dtype != DType::F32
            || t.len() < MIN_QUANT_ELEMENTS
            || t.shape.is_empty()
            || keep.matches(&name)
            || u.iter().any(|(op, i)| {
                (op == "LayerNormalization" && *i > 0) || (op == "MatMul" && *i == 1 && t.shape.len() == 2)
            });
        if !skip && crate::is_table(&name) {
            // Precomputed tables: f16 storage (relative error 5e-4, well below int8's) and a
            // `Cast` back to f32; tract folds it at load.
            let bytes: Vec<u8> = t
                .as_f32()
                .expect("f32 constant")
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let hn = format!("{name}.f16");
            constants.push((hn.clone(), tensor(DType::F16, &t.shape, bytes)));
            new_nodes.push(node(
                format!("{name}/Cast"),
                "Cast",
                vec![hn],
                val(&name, DType::F32, &t.shape),
                vec![("to", Attr::Int(crate::onnx::dtype_code(DType::F32) as i64))],
            ));
            continue;
        }
        if skip || crate::is_table(&name) {
            constants.push((name, t));
            continue;
        }
        // Per row for tables indexed by row (embeddings) and per output channel for kernels,
        // else per channel of the last axis.
        let axis = if u.iter().any(|(op, i)| (op == "Gather" && *i == 0) || (op == "Conv" && *i == 1)) {
            0
        } else {
            t.shape.len() - 1
        };
        let data = t.as_f32().expect("f32 constant");
        let c = t.shape[axis];
        let inner: usize = t.shape[axis + 1..].iter().product();
        let mut scales = vec![0f32; c];
        for (i, v) in data.iter().enumerate() {
            let ch = (i / inner) % c;
            scales[ch] = scales[ch].max(v.abs());
        }
        for s in &mut scales {
            *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
        }
        let q: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, v)| (v / scales[(i / inner) % c]).round().clamp(-127.0, 127.0) as i8 as u8)
            .collect();
        let (qn, sn) = (format!("{name}.q"), format!("{name}.scale"));
        constants.push((qn.clone(), tensor(DType::I8, &t.shape, q)));
        constants.push((sn.clone(), TensorData::f32(&[c], &scales)));
        new_nodes.push(node(
            format!("{name}/DequantizeLinear"),
            "DequantizeLinear",
            vec![qn, sn],
            val(&name, DType::F32, &t.shape),
            vec![("axis", Attr::Int(axis as i64))],
        ));
    }
    g.constants = constants;
    new_nodes.append(&mut g.nodes);
    g.nodes = new_nodes;
}

/// Short names for what a quantisation pass added. Names are a fixed cost of an ONNX file (each
/// appears in its producer and every consumer): on a small model they are a third of an int8
/// file. Constants become `c<i>`, values the pass introduced `q<i>` and their nodes
/// `<stage>/q<i>` (the first name segment is kept: profiles group nodes by it). Values in
/// `primary` (those of the graph before quantisation) keep their names, so `compare` still
/// matches them against the f32 graph layer by layer.
pub fn compact_names(g: &mut Graph, primary: &HashSet<String>) {
    let mut map: HashMap<String, String> = HashMap::new();
    for (i, (name, _)) in g.constants.iter_mut().enumerate() {
        let short = format!("c{i}");
        map.insert(std::mem::replace(name, short.clone()), short);
    }
    let io: HashSet<String> = g.inputs.iter().chain(&g.outputs).map(|v| v.name.clone()).collect();
    let mut k = 0;
    for n in &mut g.nodes {
        let mut internal = false;
        for o in &mut n.outputs {
            if !primary.contains(&o.name) && !io.contains(&o.name) {
                let short = format!("q{k}");
                k += 1;
                map.insert(std::mem::replace(&mut o.name, short.clone()), short);
                internal = true;
            }
        }
        if internal && !primary.contains(&n.name) {
            let stage = n.name.split('/').next().unwrap_or("").to_string();
            n.name = format!("{stage}/{}", n.outputs[0].name);
        }
        for x in &mut n.inputs {
            if let Some(s) = map.get(x.as_str()) {
                *x = s.clone();
            }
        }
    }
}

/// Activation quantisation parameters: scale and u8 zero point of the range `[lo, hi]`
/// (widened to contain 0).
pub fn u8_params(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// How a Linear's activation input is quantised.
enum ActQuant {
    /// `DynamicQuantizeLinear` at run time.
    Dynamic,
    /// Fixed scale and zero point.
    Static(f32, u8),
}

/// Rewrites Linear `l` as an integer matmul; returns the nodes replacing it. The activation
/// quantisation of an input shared by several Linears (Q, K, V) is emitted once (`shared`).
fn int8_linear(g: &mut Graph, l: &Linear, act: ActQuant, shared: &mut HashSet<String>) -> Vec<Node> {
    let mm = g.nodes[l.node].clone();
    let (x, y) = (mm.inputs[0].clone(), mm.outputs[0].clone());
    let base = &mm.name;
    let w = g.constant_data(&l.weight).and_then(|t| t.as_f32()).expect("f32 weight");
    let (q, wscale) = quantize_per_column(&w, l.k, l.n);
    let xshape = g.value_shapes().get(x.as_str()).map(|s| s.to_vec()).unwrap_or_default();
    let wq = format!("{}.q", l.weight);
    if g.constant_data(&wq).is_none() {
        g.constants.push((wq.clone(), tensor(DType::I8, &[l.k, l.n], q.iter().map(|v| *v as u8).collect())));
    }
    let mut nodes = vec![];
    let first = shared.insert(x.clone());
    let (xq, xs, xz) = (format!("{x}.q"), format!("{x}.scale"), format!("{x}.zero_point"));
    let scale = match act {
        ActQuant::Dynamic => {
            if first {
                nodes.push(Node {
                    name: format!("{x}/DynamicQuantizeLinear"),
                    op: "DynamicQuantizeLinear".into(),
                    domain: String::new(),
                    inputs: vec![x.clone()],
                    outputs: vec![val(&xq, DType::U8, &xshape), val(&xs, DType::F32, &[]), val(&xz, DType::U8, &[])],
                    attrs: vec![],
                });
            }
            let ws = format!("{}.scale", l.weight);
            if g.constant_data(&ws).is_none() {
                g.constants.push((ws.clone(), TensorData::f32(&[l.n], &wscale)));
            }
            let s = format!("{base}/rescale");
            nodes.push(node(format!("{base}/Mul_rescale"), "Mul", vec![xs, ws], val(&s, DType::F32, &[l.n]), vec![]));
            s
        }
        ActQuant::Static(scale, zp) => {
            if first {
                g.constants.push((xs.clone(), TensorData::f32(&[], &[scale])));
                g.constants.push((xz.clone(), tensor(DType::U8, &[], vec![zp])));
                nodes.push(node(
                    format!("{x}/QuantizeLinear"),
                    "QuantizeLinear",
                    vec![x.clone(), xs.clone(), xz.clone()],
                    val(&xq, DType::U8, &xshape),
                    vec![],
                ));
            }
            let s = format!("{base}/rescale");
            let combined: Vec<f32> = wscale.iter().map(|w| w * scale).collect();
            g.constants.push((s.clone(), TensorData::f32(&[l.n], &combined)));
            s
        }
    };
    let xzp = xz;
    let acc = format!("{base}/acc");
    nodes.push(node(
        format!("{base}/MatMulInteger"),
        "MatMulInteger",
        vec![xq, wq, xzp],
        val(&acc, DType::I32, &y.shape),
        vec![],
    ));
    let accf = format!("{base}/acc.f32");
    nodes.push(node(
        format!("{base}/Cast"),
        "Cast",
        vec![acc],
        val(&accf, DType::F32, &y.shape),
        vec![("to", Attr::Int(crate::onnx::dtype_code(DType::F32) as i64))],
    ));
    // The last node takes the MatMul's name and output, so consumers (and compare) see it.
    nodes.push(node(base.clone(), "Mul", vec![accf, scale], y, vec![]));
    nodes
}

/// Replaces the nodes at the given indices by the given node lists; drops unused constants.
fn splice(g: &mut Graph, mut replacements: HashMap<usize, Vec<Node>>) {
    let old = std::mem::take(&mut g.nodes);
    for (i, n) in old.into_iter().enumerate() {
        match replacements.remove(&i) {
            Some(ns) => g.nodes.extend(ns),
            None => g.nodes.push(n),
        }
    }
    g.prune();
}

/// Linears whose activations int8 does not quantise by default (weight-only int8 instead):
/// the encoder's first K/V projections, which read the raw inputs and position features, and
/// the output layers (decoder `final_layer`, postprocessor classifiers). On the fixtures these
/// add the largest errors of all Linears (`perceiver-edge compare`); as weight-only int8 they
/// keep the file small.
pub const INT8_WEIGHT_ONLY: [&str; 4] = [
    "encoder.cross_attention.attention.self.key.weight",
    "encoder.cross_attention.attention.self.value.weight",
    "final_layer.weight",
    "output_postprocessor*.weight",
];

/// True for a Linear the int8 passes quantise weight-only by default.
fn weight_only(l: &Linear) -> bool {
    INT8_WEIGHT_ONLY.iter().any(|p| glob_contains(p, &l.weight))
}

/// Weight-only int8: `DequantizeLinear` (per output channel) feeding the original f32 MatMul.
/// The file stores int8; tract folds the weight back to f32 at load.
fn weight_only_linear(g: &mut Graph, l: &Linear) -> Vec<Node> {
    let mut mm = g.nodes[l.node].clone();
    let w = g.constant_data(&l.weight).and_then(|t| t.as_f32()).expect("f32 weight");
    let (q, wscale) = quantize_per_column(&w, l.k, l.n);
    let (wq, ws, wd) = (format!("{}.q", l.weight), format!("{}.scale", l.weight), format!("{}.dq", l.weight));
    let mut nodes = vec![];
    if g.constant_data(&wq).is_none() {
        g.constants.push((wq.clone(), tensor(DType::I8, &[l.k, l.n], q.iter().map(|v| *v as u8).collect())));
        g.constants.push((ws.clone(), TensorData::f32(&[l.n], &wscale)));
        nodes.push(node(
            format!("{}/DequantizeLinear", l.weight),
            "DequantizeLinear",
            vec![wq, ws],
            val(&wd, DType::F32, &[l.k, l.n]),
            vec![("axis", Attr::Int(1))],
        ));
    }
    mm.inputs[1] = wd;
    nodes.push(mm);
    nodes
}

/// Values that do not depend on any graph input (computed from constants only): the latents'
/// and output queries' projections. tract folds them at load, so quantising their activations
/// would only add error.
fn input_independent(g: &Graph) -> HashSet<String> {
    let mut set: HashSet<String> = g.constants.iter().map(|(n, _)| n.clone()).collect();
    for n in &g.nodes {
        if !n.inputs.is_empty() && n.inputs.iter().all(|x| x.is_empty() || set.contains(x)) {
            set.extend(n.outputs.iter().map(|o| o.name.clone()));
        }
    }
    set
}

fn int8_pass(g: &mut Graph, keep: &KeepF32, ranges: Option<&HashMap<String, (f32, f32)>>) -> Result<()> {
    keep.check_all_used(all_names(g).into_iter())?;
    let constant = input_independent(g);
    let mut rep = HashMap::new();
    let mut shared = HashSet::new();
    for l in linears(g) {
        if kept(g, &l, keep) {
            continue;
        }
        if weight_only(&l) || constant.contains(&g.nodes[l.node].inputs[0]) {
            rep.insert(l.node, weight_only_linear(g, &l));
            continue;
        }
        let x = g.nodes[l.node].inputs[0].clone();
        let act = match ranges {
            None => ActQuant::Dynamic,
            Some(r) => {
                let (lo, hi) = r.get(&x).copied().ok_or_else(|| {
                    Error::invalid(format!("int8-static: no calibration range for `{x}` (calibrate the same graph)"))
                })?;
                let (s, z) = u8_params(lo, hi);
                ActQuant::Static(s, z)
            }
        };
        rep.insert(l.node, int8_linear(g, &l, act, &mut shared));
    }
    splice(g, rep);
    quantize_storage(g, keep);
    Ok(())
}

/// int8 weights (per output channel, symmetric), activations quantised at run time.
pub struct Int8Dynamic {
    /// Nodes and weights kept in f32.
    pub keep: KeepF32,
}

impl Pass for Int8Dynamic {
    fn name(&self) -> &'static str {
        "quantize-int8"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        int8_pass(g, &self.keep, None)?;
        g.metadata.push((PRECISION_KEY.into(), Precision::Int8.name().into()));
        Ok(())
    }
}

/// int8 weights, activation ranges fixed from calibration (value name -> `[lo, hi]`, see
/// [`int8_activation_inputs`] and [`crate::calibrate`]).
pub struct Int8Static {
    /// Nodes and weights kept in f32.
    pub keep: KeepF32,
    /// Calibrated range of every quantised Linear's input.
    pub ranges: HashMap<String, (f32, f32)>,
}

impl Pass for Int8Static {
    fn name(&self) -> &'static str {
        "quantize-int8-static"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        int8_pass(g, &self.keep, Some(&self.ranges))?;
        g.metadata.push((PRECISION_KEY.into(), Precision::Int8Static.name().into()));
        Ok(())
    }
}

/// 4-bit block-quantised Linear weights (`MatMulNBits`, block 32); K is zero-padded to a
/// multiple of 32 (a `Pad` on the activation) when needed. Linears with K < 32 use dynamic
/// int8.
pub struct Q4 {
    /// Nodes and weights kept in f32.
    pub keep: KeepF32,
}

impl Pass for Q4 {
    fn name(&self) -> &'static str {
        "quantize-q4"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        self.keep.check_all_used(all_names(g).into_iter())?;
        let mut rep = HashMap::new();
        let mut shared = HashSet::new();
        for l in linears(g) {
            if kept(g, &l, &self.keep) {
                continue;
            }
            if l.k < 32 {
                rep.insert(l.node, int8_linear(g, &l, ActQuant::Dynamic, &mut shared));
                continue;
            }
            let mm = g.nodes[l.node].clone();
            let mut nodes = vec![];
            let mut x = mm.inputs[0].clone();
            // K not a multiple of 32: zero-pad the weight's rows and the activation's last axis
            // (one `Pad` per activation), so tract keeps the weight packed as Q4_0.
            let kp = l.k.next_multiple_of(32);
            let mut w = g.constant_data(&l.weight).and_then(|t| t.as_f32()).expect("f32 weight");
            if kp != l.k {
                w.resize(kp * l.n, 0.0);
                let padded = format!("{x}.pad32");
                if shared.insert(padded.clone()) {
                    let shape = g.value_shapes().get(x.as_str()).map(|s| s.to_vec()).unwrap_or_default();
                    let rank = shape.len();
                    let mut pads = vec![0i64; 2 * rank];
                    pads[2 * rank - 1] = (kp - l.k) as i64;
                    let pn = format!("{x}.pad32.pads");
                    g.constants.push((pn.clone(), TensorData::i64(&[2 * rank], &pads)));
                    let mut out_shape = shape.clone();
                    out_shape[rank - 1] = kp;
                    nodes.push(node(
                        format!("{x}/Pad"),
                        "Pad",
                        vec![x.clone(), pn],
                        val(&padded, DType::F32, &out_shape),
                        vec![],
                    ));
                }
                x = padded;
            }
            let (packed, scales) = quantize_q4(&w, kp, l.n);
            let (bn, sn) = (format!("{}.q4", l.weight), format!("{}.q4scale", l.weight));
            if g.constant_data(&bn).is_none() {
                g.constants.push((bn.clone(), tensor(DType::U8, &[l.n, kp / 32, 16], packed)));
                g.constants.push((sn.clone(), TensorData::f32(&[l.n * (kp / 32)], &scales)));
            }
            nodes.push(Node {
                name: mm.name.clone(),
                op: "MatMulNBits".into(),
                domain: "com.microsoft".into(),
                inputs: vec![x, bn, sn],
                outputs: mm.outputs.clone(),
                attrs: vec![
                    ("K".into(), Attr::Int(kp as i64)),
                    ("N".into(), Attr::Int(l.n as i64)),
                    ("bits".into(), Attr::Int(4)),
                    ("block_size".into(), Attr::Int(32)),
                ],
            });
            rep.insert(l.node, nodes);
        }
        splice(g, rep);
        quantize_storage(g, &self.keep);
        g.metadata.push((PRECISION_KEY.into(), Precision::Q4.name().into()));
        Ok(())
    }
}

/// f16 constants and arithmetic. Graph inputs and outputs stay f32; LayerNorm, Softmax, nodes
/// matching `keep` and the additive attention mask (beyond f16's range) run in f32 between
/// casts.
pub struct ToF16 {
    /// Nodes kept in f32 (besides [`F16_KEEP_OPS`]).
    pub keep: KeepF32,
}

impl Pass for ToF16 {
    fn name(&self) -> &'static str {
        "to-f16"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        self.keep.check_all_used(all_names(g).into_iter())?;
        let output_names: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
        let consts: HashMap<String, TensorData> = g.constants.iter().cloned().collect();
        // Current dtype of every f32-or-f16 value.
        let mut dtype: HashMap<String, DType> = HashMap::new();
        for v in &g.inputs {
            dtype.insert(v.name.clone(), v.dtype);
        }
        for (n, t) in &g.constants {
            dtype.insert(n.clone(), t.dtype);
        }
        let mut casts: HashMap<(String, bool), String> = HashMap::new();
        let mut new_consts: Vec<(String, TensorData)> = vec![];
        let mut nodes = vec![];
        let f16_code = crate::onnx::dtype_code(DType::F16) as i64;
        let f32_code = crate::onnx::dtype_code(DType::F32) as i64;
        // Values beyond f16's range (the attention mask's f32::MIN) stay f32 up to the Softmax
        // that consumes them: in f16 they would become infinities (and 0 * inf = NaN).
        let out_of_range = |t: &TensorData| t.as_f32().is_some_and(|v| v.iter().any(|x| x.abs() > 65504.0));
        let mut wide: HashSet<String> = HashSet::new();
        for mut n in std::mem::take(&mut g.nodes) {
            let is_output = n.outputs.iter().any(|o| output_names.contains(&o.name));
            let needs_range = n.inputs.iter().any(|x| wide.contains(x) || consts.get(x).is_some_and(out_of_range));
            if needs_range && !F16_KEEP_OPS.contains(&n.op.as_str()) {
                wide.extend(n.outputs.iter().map(|o| o.name.clone()));
            }
            let keep32 = F16_KEEP_OPS.contains(&n.op.as_str())
                || is_output
                || needs_range
                || self.keep.matches(&n.name)
                || n.inputs.iter().any(|x| consts.contains_key(x) && self.keep.matches(x));
            let want = if keep32 { DType::F32 } else { DType::F16 };
            for x in n.inputs.iter_mut() {
                let Some(&dt) = dtype.get(x.as_str()) else { continue };
                if !matches!(dt, DType::F32 | DType::F16) || dt == want {
                    continue;
                }
                if let Some(t) = consts.get(x.as_str()).filter(|t| t.dtype == DType::F32) {
                    // Constants are converted at export time, once per precision needed.
                    let name = format!("{x}.f16");
                    if !dtype.contains_key(&name) {
                        let bytes = t
                            .as_f32()
                            .unwrap()
                            .iter()
                            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                            .collect();
                        new_consts.push((name.clone(), tensor(DType::F16, &t.shape, bytes)));
                        dtype.insert(name.clone(), DType::F16);
                    }
                    *x = name;
                    continue;
                }
                let key = (x.clone(), want == DType::F16);
                let cast = casts.entry(key).or_insert_with(|| {
                    let name = format!("{x}.{}", if want == DType::F16 { "f16" } else { "f32" });
                    let shape = nodes
                        .iter()
                        .flat_map(|m: &Node| m.outputs.iter())
                        .chain(g.inputs.iter())
                        .find(|v| v.name == *x)
                        .map(|v| v.shape.clone())
                        .unwrap_or_default();
                    let code = if want == DType::F16 { f16_code } else { f32_code };
                    nodes.push(node(
                        format!("{x}/Cast_{}", if want == DType::F16 { "f16" } else { "f32" }),
                        "Cast",
                        vec![x.clone()],
                        val(&name, want, &shape),
                        vec![("to", Attr::Int(code))],
                    ));
                    name
                });
                *x = cast.clone();
            }
            if !keep32 {
                for o in n.outputs.iter_mut() {
                    if o.dtype == DType::F32 {
                        o.dtype = DType::F16;
                    }
                }
                if n.op == "Cast" {
                    for (k, a) in n.attrs.iter_mut() {
                        if k == "to" && *a == Attr::Int(f32_code) {
                            *a = Attr::Int(f16_code);
                        }
                    }
                }
            }
            for o in &n.outputs {
                dtype.insert(o.name.clone(), o.dtype);
            }
            nodes.push(n);
        }
        g.nodes = nodes;
        g.constants.extend(new_consts);
        g.prune();
        g.metadata.push((PRECISION_KEY.into(), Precision::F16.name().into()));
        Ok(())
    }
}

/// The pass of `precision` (`None` for f32). `ranges` are needed for int8-static only.
pub fn pass_for(
    precision: Precision,
    keep: &KeepF32,
    ranges: Option<HashMap<String, (f32, f32)>>,
) -> Result<Option<Box<dyn Pass>>> {
    Ok(match precision {
        Precision::F32 => None,
        Precision::F16 => Some(Box::new(ToF16 { keep: keep.clone() })),
        Precision::Int8 => Some(Box::new(Int8Dynamic { keep: keep.clone() })),
        Precision::Int8Static => Some(Box::new(Int8Static {
            keep: keep.clone(),
            ranges: ranges.ok_or_else(|| Error::invalid("int8-static needs calibration ranges"))?,
        })),
        Precision::Q4 => Some(Box::new(Q4 { keep: keep.clone() })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob_contains("query", "a.query.weight"));
        assert!(glob_contains("encoder.cross*key", "perceiver.encoder.cross_attention.self.key.weight.T"));
        assert!(!glob_contains("cross*query", "encoder.self.key"));
        assert!(glob_contains("*", "x"));
    }

    #[test]
    fn per_column_int8_roundtrips_within_half_a_step() {
        let w = [0.5f32, -2.0, 0.25, 1.0, -0.125, 0.0];
        let (q, s) = quantize_per_column(&w, 3, 2);
        assert_eq!(q[1], -127);
        for i in 0..6 {
            assert!((q[i] as f32 * s[i % 2] - w[i]).abs() <= s[i % 2] / 2.0 + 1e-7);
        }
    }

    #[test]
    fn q4_packs_low_nibble_first() {
        let (k, n) = (32, 1);
        let w: Vec<f32> = (0..k).map(|i| i as f32 - 16.0).collect();
        let (b, s) = quantize_q4(&w, k, n);
        let d = s[0];
        assert_eq!(d, 2.0);
        let code = |i: usize| (b[i / 2] >> (4 * (i % 2))) & 15;
        assert_eq!(code(0), 0, "-16 = (0 - 8) * 2");
        for (i, wi) in w.iter().enumerate() {
            assert!(((code(i) as f32 - 8.0) * d - wi).abs() <= 1.0 + 1e-6);
        }
    }

    #[test]
    fn unknown_precision_is_one_line() {
        let e = "int4".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("int4") && e.contains("int8-static") && !e.contains('\n'));
    }
}
