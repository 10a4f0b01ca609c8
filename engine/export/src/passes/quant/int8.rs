//! int8 passes: [`Int8Dynamic`] and [`Int8Static`] (integer matmuls) and weight-only int8.

use super::*;

/// How a Linear's activation input is quantised.
pub(super) enum ActQuant {
    /// `DynamicQuantizeLinear` at run time.
    Dynamic,
    /// Fixed scale and zero point.
    Static(f32, u8),
}

/// Rewrites Linear `l` as an integer matmul; returns the nodes replacing it. The activation
/// quantisation of an input shared by several Linears (Q, K, V) is emitted once (`shared`).
pub(super) fn int8_linear(
    g: &mut Graph,
    l: &Linear,
    act: ActQuant,
    bits: u32,
    shared: &mut HashSet<String>,
) -> Vec<Node> {
    let mm = g.nodes[l.node].clone();
    let (x, y) = (mm.inputs[0].clone(), mm.outputs[0].clone());
    let base = &mm.name;
    let w = g.constant_data(&l.weight).and_then(|t| t.as_f32()).expect("f32 weight");
    let (q, wscale) = quantize_per_column_bits(&w, l.k, l.n, bits);
    let xshape = g.value_shape(&x).map(|s| s.to_vec()).unwrap_or_default();
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
        vec![("to", Attr::Int(DType::F32.onnx_code() as i64))],
    ));
    // The last node takes the MatMul's name and output, so consumers (and compare) see it.
    nodes.push(node(base.clone(), "Mul", vec![accf, scale], y, vec![]));
    nodes
}

/// Weight-only int8: `DequantizeLinear` (per output channel) feeding the original f32 MatMul.
/// The file stores int8; tract folds the weight back to f32 at load.
pub(super) fn weight_only_linear(g: &mut Graph, l: &Linear) -> Vec<Node> {
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

/// Quantises every Linear of `g` not kept in f32: integer products with `bits`-bit weights
/// (8, or 7 for `reduce_range`), weight-only int8 where the input is a constant.
pub(super) fn int8_pass(
    g: &mut Graph,
    keep: &KeepF32,
    ranges: Option<&HashMap<String, (f32, f32)>>,
    bits: u32,
) -> Result<()> {
    keep.check_all_used(all_names(g).into_iter())?;
    let constant = input_independent(g);
    let mut rep = HashMap::new();
    let mut shared = HashSet::new();
    let mut readers = Readers::of(g);
    for l in linears(g) {
        if kept(g, &l, keep) || small(&l) {
            continue;
        }
        g.restore(&l.weight)?;
        if weight_only(&l) || constant.contains(&g.nodes[l.node].inputs[0]) {
            rep.insert(l.node, weight_only_linear(g, &l));
            readers.rewritten(g, &l.weight);
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
        rep.insert(l.node, int8_linear(g, &l, act, bits, &mut shared));
        readers.rewritten(g, &l.weight);
    }
    splice(g, rep);
    g.restore_all()?;
    quantize_storage(g, keep);
    Ok(())
}

/// int8 weights (per output channel, symmetric), activations quantised at run time.
pub struct Int8Dynamic {
    /// Nodes and weights kept in f32.
    pub keep: KeepF32,
    /// Bits of the integer products' weights: 8, or 7 (`reduce_range`).
    pub bits: u32,
}

impl Pass for Int8Dynamic {
    fn name(&self) -> &'static str {
        "quantize-int8"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        int8_pass(g, &self.keep, None, self.bits)?;
        g.metadata.push((metadata::PRECISION.into(), Precision::Int8.name().into()));
        Ok(())
    }
}

/// int8 weights, activation ranges fixed from calibration (value name -> `[lo, hi]`, see
/// [`int8_activation_inputs`] and [`crate::passes::quant::calibrate`]).
pub struct Int8Static {
    /// Nodes and weights kept in f32.
    pub keep: KeepF32,
    /// Calibrated range of every quantised Linear's input.
    pub ranges: HashMap<String, (f32, f32)>,
    /// Bits of the integer products' weights: 8, or 7 (`reduce_range`).
    pub bits: u32,
}

impl Pass for Int8Static {
    fn name(&self) -> &'static str {
        "quantize-int8-static"
    }
    fn run(&self, g: &mut Graph) -> Result<()> {
        int8_pass(g, &self.keep, Some(&self.ranges), self.bits)?;
        g.metadata.push((metadata::PRECISION.into(), Precision::Int8Static.name().into()));
        Ok(())
    }
}
