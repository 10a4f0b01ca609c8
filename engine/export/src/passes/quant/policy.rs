//! Which constants and Linears a precision touches: `--keep-f32` patterns, the size floor,
//! the weight-only Linears, and the values that do not depend on any input.

use super::*;

/// Ops that [`ToF16`] keeps in f32 by default (numerically sensitive reductions).
pub const F16_KEEP_OPS: [&str; 2] = ["LayerNormalization", "Softmax"];

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

/// How many nodes still read each constant, so a pass can drop an f32 weight as soon as the
/// last Linear reading it is rewritten: an export then never holds every f32 weight next to
/// every quantised one (the bench model's int8 export peaked at both).
pub(super) struct Readers(HashMap<String, usize>);

impl Readers {
    /// Counts the readers of every constant of `g`.
    pub(super) fn of(g: &Graph) -> Readers {
        let mut m: HashMap<String, usize> = g.constants.iter().map(|(n, _)| (n.clone(), 0)).collect();
        for x in g.nodes.iter().flat_map(|n| n.inputs.iter()) {
            if let Some(c) = m.get_mut(x) {
                *c += 1;
            }
        }
        Readers(m)
    }

    /// One reader of constant `name` has been rewritten to read something else; once none is
    /// left the constant is removed from `g` (the rewritten node is spliced in later).
    pub(super) fn rewritten(&mut self, g: &mut Graph, name: &str) {
        if let Some(c) = self.0.get_mut(name) {
            *c = c.saturating_sub(1);
            if *c == 0 && !g.outputs.iter().any(|o| o.name == name) {
                g.constants.retain(|(n, _)| n != name);
            }
        }
    }
}

/// A Linear of the graph: a `MatMul` whose second input is a 2-D f32 constant `[K, N]`.
pub(super) struct Linear {
    pub(super) node: usize,
    pub(super) weight: String,
    pub(super) k: usize,
    pub(super) n: usize,
}

pub(super) fn linears(g: &Graph) -> Vec<Linear> {
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
        .filter(|l| !kept(g, l, keep) && !small(l) && !weight_only(l) && !constant.contains(&g.nodes[l.node].inputs[0]))
        .map(|l| g.nodes[l.node].inputs[0].clone())
        .filter(|x| seen.insert(x.clone()))
        .collect()
}

pub(super) fn kept(g: &Graph, l: &Linear, keep: &KeepF32) -> bool {
    keep.matches(&g.nodes[l.node].name) || keep.matches(&l.weight) || is_table(&l.weight)
}

pub(super) fn all_names(g: &Graph) -> Vec<&str> {
    g.nodes.iter().map(|n| n.name.as_str()).chain(g.constants.iter().map(|(n, _)| n.as_str())).collect()
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

/// True for a Linear the int8 passes leave in f32, weight and activations: one whose weight has
/// fewer than [`MIN_QUANT_ELEMENTS`] elements. Its weight would save under 3 KiB, and quantising
/// the activations of a projection with a handful of input channels (an image's 3 colours,
/// vision-perceiver-learned's `[50176, 3]` pixels) costs more time and memory than the matmul.
/// q4, chosen for size, still stores them int8.
pub(super) fn small(l: &Linear) -> bool {
    l.k * l.n < MIN_QUANT_ELEMENTS
}

/// True for a Linear the int8 passes quantise weight-only by default.
pub(super) fn weight_only(l: &Linear) -> bool {
    INT8_WEIGHT_ONLY.iter().any(|p| glob_contains(p, &l.weight))
}

/// Values that do not depend on any graph input (computed from constants only): the latents'
/// and output queries' projections. tract folds them at load, so quantising their activations
/// would only add error.
pub(crate) fn input_independent(g: &Graph) -> HashSet<String> {
    let mut set: HashSet<String> = g.constants.iter().map(|(n, _)| n.clone()).collect();
    for n in &g.nodes {
        if !n.inputs.is_empty() && n.inputs.iter().all(|x| x.is_empty() || set.contains(x)) {
            set.extend(n.outputs.iter().map(|o| o.name.clone()));
        }
    }
    set
}
