//! 4-bit pass: [`Q4`] (`MatMulNBits`, block 32).

use super::*;

/// 4-bit block-quantised Linear weights (`MatMulNBits`, block 32); K is zero-padded to a
/// multiple of 32 (a `Pad` on the activation) when needed. Linears with K < 32 use dynamic
/// int8. A Linear on a value that no graph input reaches (the latents' and output queries'
/// projections) is stored as weight-only int8: tract folds it at load, and a 4-bit weight there
/// would be folded through tract's reference einsum (vision-conv: 50 s of loading).
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
        let constant = input_independent(g);
        let mut readers = Readers::of(g);
        for l in linears(g) {
            if kept(g, &l, &self.keep) {
                continue;
            }
            g.restore(&l.weight)?;
            if constant.contains(&g.nodes[l.node].inputs[0]) {
                rep.insert(l.node, weight_only_linear(g, &l));
                readers.rewritten(g, &l.weight);
                continue;
            }
            if l.k < 32 {
                rep.insert(l.node, int8_linear(g, &l, ActQuant::Dynamic, 8, &mut shared));
                readers.rewritten(g, &l.weight);
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
                    let shape = g.value_shape(&x).map(|s| s.to_vec()).unwrap_or_default();
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
            readers.rewritten(g, &l.weight);
        }
        splice(g, rep);
        g.restore_all()?;
        quantize_storage(g, &self.keep);
        g.metadata.push((metadata::PRECISION.into(), Precision::Q4.name().into()));
        Ok(())
    }
}
