//! How a quantised graph is stored: large non-Linear constants as int8 + `DequantizeLinear`,
//! compact names for what the passes add, and node splicing.

use super::*;

/// Replaces the large f32 constants that are not Linear weights (and not LayerNorm
/// parameters) by int8 codes + per-axis scales + `DequantizeLinear`, keeping their names.
/// A constant whose axis would give every value its own scale (a 1-D one) stays f32.
/// Per-head `[H, K, N]` MatMul weights (from the attention rewrites) are stored this way too;
/// the rewrites' precomputed tables are stored f16.
pub(super) fn quantize_storage(g: &mut Graph, keep: &KeepF32) {
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
        if !skip && is_table(&name) {
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
                vec![("to", Attr::Int(DType::F32.onnx_code() as i64))],
            ));
            continue;
        }
        if skip || is_table(&name) {
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
        let c = t.shape[axis];
        if c == t.len() {
            // One scale per value (a 1-D constant: a q4 weight's block scales, a bias) would
            // store 5 bytes where f32 stores 4, and tract would fold it back to f32 at load.
            constants.push((name, t));
            continue;
        }
        let data = t.as_f32().expect("f32 constant");
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

/// Replaces the nodes at the given indices by the given node lists; drops unused constants.
pub(super) fn splice(g: &mut Graph, mut replacements: HashMap<usize, Vec<Node>>) {
    let old = std::mem::take(&mut g.nodes);
    for (i, n) in old.into_iter().enumerate() {
        match replacements.remove(&i) {
            Some(ns) => g.nodes.extend(ns),
            None => g.nodes.push(n),
        }
    }
    g.prune();
}
