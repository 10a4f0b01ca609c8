//! f16 pass: [`ToF16`].

use super::*;

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
        let f16_code = DType::F16.onnx_code() as i64;
        let f32_code = DType::F32.onnx_code() as i64;
        // Values beyond f16's range (the attention mask's f32::MIN) stay f32 up to the Softmax
        // that consumes them: in f16 they would become infinities (and 0 * inf = NaN).
        let out_of_range = |t: &TensorData| t.as_f32().is_some_and(|v| v.iter().any(|x| x.abs() > 65504.0));
        // Deferred weights ([`Graph::defer`]) are read back one at a time: their range checked
        // and their f16 copy made, then dropped again (read back at the end if an f32 reader
        // remains), so the pass never holds every f32 weight next to the f16 copies.
        let (mut deferred, mut far): (HashMap<String, Vec<u8>>, HashSet<String>) = Default::default();
        for name in g.stripped().map(|(n, _)| n.to_string()).collect::<Vec<_>>() {
            g.restore(&name)?;
            let t = g.constants.iter().find(|(n, t)| *n == name && !t.is_stripped()).map(|(_, t)| t);
            let t = t.ok_or_else(|| Error::tensor(&name, "not held, and the graph cannot read it back"))?;
            if out_of_range(t) {
                far.insert(name.clone());
            }
            deferred.insert(name.clone(), f16_of(t));
            g.strip_constants(|n| n == name);
        }
        let mut wide: HashSet<String> = HashSet::new();
        for mut n in std::mem::take(&mut g.nodes) {
            let is_output = n.outputs.iter().any(|o| output_names.contains(&o.name));
            let needs_range =
                n.inputs.iter().any(|x| wide.contains(x) || consts.get(x).is_some_and(out_of_range) || far.contains(x));
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
                        let bytes = deferred.remove(x.as_str()).unwrap_or_else(|| f16_of(t));
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
        g.metadata.push((metadata::PRECISION.into(), Precision::F16.name().into()));
        Ok(())
    }
}

/// The little-endian f16 bytes of f32 data.
fn f16_of(t: &TensorData) -> Vec<u8> {
    t.bytes
        .chunks_exact(4)
        .flat_map(|c| f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_bits().to_le_bytes())
        .collect()
}
