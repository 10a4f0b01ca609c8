//! Output and per-layer comparison of two graphs of the same model (f32 reference vs a
//! quantised candidate), as `perceiver-edge compare` prints it.
//!
//! Both graphs run on the same inputs in tract. Besides the graph outputs, every intermediate
//! value whose ONNX name exists in both graphs (perceiver-edge's passes keep the names of the
//! values they replace) is exposed and compared: the per-layer table shows where the error
//! appears.

use crate::{to_vec, Error, Result, Session, Tensor};
use prost::Message;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tract_onnx::pb;
use tract_onnx::prelude::DatumType;

/// Error statistics of one value over all compared inputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Largest |candidate - reference|.
    pub max_abs: f64,
    /// Mean |candidate - reference|.
    pub mean_abs: f64,
    /// Cosine similarity of the flattened values.
    pub cosine: f64,
    /// `max_abs / max |reference|`.
    pub rel_max: f64,
    /// `||candidate - reference||_2 / ||reference||_2`.
    pub rel_l2: f64,
}

#[derive(Clone, Default)]
struct Acc {
    n: u64,
    sum_abs: f64,
    max_abs: f64,
    max_ref: f64,
    dot: f64,
    nr: f64,
    nc: f64,
    nd: f64,
}

impl Acc {
    fn add(&mut self, r: &[f32], c: &[f32]) {
        for (a, b) in r.iter().zip(c) {
            let (a, b) = (*a as f64, *b as f64);
            let d = (b - a).abs();
            self.n += 1;
            self.sum_abs += d;
            self.max_abs = self.max_abs.max(d);
            self.max_ref = self.max_ref.max(a.abs());
            self.dot += a * b;
            self.nr += a * a;
            self.nc += b * b;
            self.nd += d * d;
        }
    }

    fn stats(&self) -> Stats {
        let cosine = if self.nr > 0.0 && self.nc > 0.0 {
            self.dot / (self.nr.sqrt() * self.nc.sqrt())
        } else if self.nr == self.nc {
            1.0
        } else {
            0.0
        };
        Stats {
            max_abs: self.max_abs,
            mean_abs: self.sum_abs / self.n.max(1) as f64,
            cosine,
            rel_max: if self.max_ref > 0.0 { self.max_abs / self.max_ref } else { self.max_abs },
            rel_l2: if self.nr > 0.0 { (self.nd / self.nr).sqrt() } else { self.nd.sqrt() },
        }
    }
}

/// One row of the per-layer table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Layer {
    /// Value (and reference node) name.
    pub name: String,
    /// Op producing it in the reference graph.
    pub reference_op: String,
    /// Op producing it in the candidate graph.
    pub candidate_op: String,
    /// Error statistics.
    pub stats: Stats,
    /// Relative L2 error this node adds: its own minus the largest of its compared inputs'.
    pub added: f64,
}

/// What `compare` measured (`compare --json` prints its serialised form).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Input sets compared.
    pub samples: usize,
    /// Graph outputs: name and statistics (serialised as `{"name", "stats"}` objects).
    #[serde(serialize_with = "named_stats")]
    pub outputs: Vec<(String, Stats)>,
    /// Arg-max agreement over the last axis of the first output: (agreeing rows, rows)
    /// (serialised as the fraction `top1_agreement`).
    #[serde(rename = "top1_agreement", serialize_with = "fraction")]
    pub top1: Option<(usize, usize)>,
    /// With labels: (reference accuracy, candidate accuracy), fractions of rows (serialised as
    /// `{"reference", "candidate"}`).
    #[serde(serialize_with = "accuracies")]
    pub accuracy: Option<(f64, f64)>,
    /// Intermediate values present in both graphs, in reference graph order.
    pub layers: Vec<Layer>,
}

fn named_stats<S: serde::Serializer>(v: &[(String, Stats)], s: S) -> std::result::Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Named<'a> {
        name: &'a str,
        stats: &'a Stats,
    }
    s.collect_seq(v.iter().map(|(name, stats)| Named { name, stats }))
}

fn fraction<S: serde::Serializer>(v: &Option<(usize, usize)>, s: S) -> std::result::Result<S::Ok, S::Error> {
    v.map(|(a, n)| a as f64 / n as f64).serialize(s)
}

fn accuracies<S: serde::Serializer>(v: &Option<(f64, f64)>, s: S) -> std::result::Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Accuracy {
        reference: f64,
        candidate: f64,
    }
    v.map(|(reference, candidate)| Accuracy { reference, candidate }).serialize(s)
}

/// Producer op of every value and the inputs of its node, from the ONNX file, in graph order.
fn producers(bytes: &[u8], path: &Path) -> Result<Vec<(String, String, Vec<String>)>> {
    let m = pb::ModelProto::decode(bytes)
        .map_err(|e| Error::Load { path: path.display().to_string(), msg: format!("not an ONNX model: {e}") })?;
    let g = m.graph.unwrap_or_default();
    Ok(g.node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.clone(), n.op_type.clone(), n.input.clone())))
        .collect())
}

fn floats(t: &Tensor) -> Option<Vec<f32>> {
    match t.datum_type() {
        DatumType::F32 => to_vec(t),
        DatumType::F16 | DatumType::F64 => to_vec(t.cast_to::<f32>().ok()?.as_ref()),
        _ => None,
    }
}

fn argmax_rows(v: &[f32], width: usize) -> Vec<usize> {
    v.chunks(width.max(1)).map(argmax).collect()
}

/// Fidelity of a candidate's outputs against the full model's, over the same samples.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Fidelity {
    /// Samples compared.
    pub samples: usize,
    /// Largest element-wise absolute difference.
    pub max_abs: f64,
    /// Mean element-wise absolute difference.
    pub mean_abs: f64,
    /// Smallest per-sample cosine similarity of the flattened outputs.
    pub min_cosine: f64,
    /// Mean per-sample cosine similarity.
    pub mean_cosine: f64,
    /// Fraction of rows (last axis) whose arg-max agrees with the full model's.
    pub top1_agreement: f64,
    /// Accuracy of the candidate against labels (one label per sample, one row per sample).
    pub accuracy: Option<f64>,
    /// Accuracy of the full model against the same labels.
    pub reference_accuracy: Option<f64>,
}

/// Index of the largest value (the first one on ties; 0 for an empty slice).
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
}

/// Compares `candidate` with `reference` outputs (one flattened output per sample, rows of
/// `row` values); `labels` (one per sample) gives accuracies when each sample is one row.
pub fn fidelity(reference: &[Vec<f32>], candidate: &[Vec<f32>], row: usize, labels: Option<&[i64]>) -> Fidelity {
    assert_eq!(reference.len(), candidate.len(), "same samples");
    let (mut max_abs, mut sum_abs, mut count) = (0f64, 0f64, 0usize);
    let (mut min_cos, mut sum_cos) = (f64::INFINITY, 0f64);
    let (mut agree, mut rows) = (0usize, 0usize);
    for (r, c) in reference.iter().zip(candidate) {
        let (mut dot, mut nr, mut nc) = (0f64, 0f64, 0f64);
        for (&a, &b) in r.iter().zip(c) {
            let d = (a as f64 - b as f64).abs();
            max_abs = max_abs.max(d);
            sum_abs += d;
            dot += a as f64 * b as f64;
            nr += a as f64 * a as f64;
            nc += b as f64 * b as f64;
        }
        count += r.len();
        let cos = if nr == 0.0 && nc == 0.0 { 1.0 } else { dot / (nr.sqrt() * nc.sqrt()).max(1e-300) };
        min_cos = min_cos.min(cos);
        sum_cos += cos;
        for (rr, cr) in r.chunks(row.max(1)).zip(c.chunks(row.max(1))) {
            agree += usize::from(argmax(rr) == argmax(cr));
            rows += 1;
        }
    }
    let s = reference.len();
    let accuracy = |outs: &[Vec<f32>]| -> Option<f64> {
        let l = labels?;
        (l.len() == s && outs.iter().all(|o| o.len() == row))
            .then(|| outs.iter().zip(l).filter(|(o, &y)| argmax(o) as i64 == y).count() as f64 / s.max(1) as f64)
    };
    Fidelity {
        samples: s,
        max_abs,
        mean_abs: sum_abs / count.max(1) as f64,
        min_cosine: if s == 0 { 1.0 } else { min_cos },
        mean_cosine: if s == 0 { 1.0 } else { sum_cos / s as f64 },
        top1_agreement: agree as f64 / rows.max(1) as f64,
        accuracy: accuracy(candidate),
        reference_accuracy: accuracy(reference),
    }
}

/// Runs `reference` and `candidate` (ONNX files of the same model) on `inputs` and compares
/// their outputs and, with `layers`, every intermediate value the two graphs share.
/// `labels` (one per row of the first output) adds task accuracy.
pub fn compare(
    reference: &Path,
    candidate: &Path,
    inputs: &[Vec<Tensor>],
    labels: Option<&[i64]>,
    layers: bool,
) -> Result<Report> {
    let read = |p: &Path| {
        crate::fsio::read_file(p, u64::MAX)
            .map_err(|e| Error::Load { path: p.display().to_string(), msg: format!("cannot read: {e}") })
    };
    let (rb, cb) = (read(reference)?, read(candidate)?);
    let (rp, cp) = (producers(&rb, reference)?, producers(&cb, candidate)?);
    let cand_ops: HashMap<&str, &str> = cp.iter().map(|(v, op, _)| (v.as_str(), op.as_str())).collect();
    let names: Vec<String> = if layers {
        rp.iter()
            .filter(|(v, op, _)| cand_ops.contains_key(v.as_str()) && op != "Identity")
            .map(|(v, _, _)| v.clone())
            .collect()
    } else {
        vec![]
    };
    let with_path = |p: &Path, e: Error| match e {
        Error::Load { msg, .. } => Error::Load { path: p.display().to_string(), msg },
        o => o,
    };
    let dir = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let (mut rs, rexp) = Session::from_bytes_in(&rb, Some(&dir(reference)), &names, crate::Device::Cpu)
        .map_err(|e| with_path(reference, e))?;
    let (mut cs, cexp) = Session::from_bytes_in(&cb, Some(&dir(candidate)), &names, crate::Device::Cpu)
        .map_err(|e| with_path(candidate, e))?;
    if rs.inputs() != cs.inputs() {
        return Err(Error::Input {
            name: rs.inputs().iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", "),
            msg: format!("{} and {} take different inputs", reference.display(), candidate.display()),
        });
    }
    let n_out = rs.outputs().len() - rexp.len();
    if cs.outputs().len() - cexp.len() != n_out {
        return Err(Error::Input {
            name: "outputs".into(),
            msg: format!("{} and {} have different outputs", reference.display(), candidate.display()),
        });
    }
    for (r, c) in rs.outputs()[..n_out].iter().zip(&cs.outputs()[..n_out]) {
        if r.shape != c.shape {
            return Err(Error::Input {
                name: r.name.clone(),
                msg: format!(
                    "output shape {:?} in {} but {:?} (`{}`) in {}: the graphs are not of the same model",
                    r.shape,
                    reference.display(),
                    c.shape,
                    c.name,
                    candidate.display()
                ),
            });
        }
    }
    let common: Vec<String> = rexp.iter().filter(|n| cexp.contains(n)).cloned().collect();
    let rpos: HashMap<&str, usize> = rexp.iter().enumerate().map(|(i, n)| (n.as_str(), n_out + i)).collect();
    let cpos: HashMap<&str, usize> = cexp.iter().enumerate().map(|(i, n)| (n.as_str(), n_out + i)).collect();
    let mut out_acc = vec![Acc::default(); n_out];
    let mut layer_acc: Vec<Option<Acc>> = vec![Some(Acc::default()); common.len()];
    let (mut agree, mut rows, mut right) = (0usize, 0usize, (0usize, 0usize));
    let mut label_at = 0usize;
    for set in inputs {
        let r = rs.run(set.clone())?;
        let c = cs.run(set.clone())?;
        for i in 0..n_out {
            let (Some(a), Some(b)) = (floats(&r[i]), floats(&c[i])) else { continue };
            out_acc[i].add(&a, &b);
            if i == 0 {
                let width = r[0].shape().last().copied().unwrap_or(1);
                let (ra, ca) = (argmax_rows(&a, width), argmax_rows(&b, width));
                agree += ra.iter().zip(&ca).filter(|(x, y)| x == y).count();
                rows += ra.len();
                if let Some(l) = labels {
                    for (x, y) in ra.iter().zip(&ca) {
                        let Some(&want) = l.get(label_at) else { break };
                        right.0 += (*x as i64 == want) as usize;
                        right.1 += (*y as i64 == want) as usize;
                        label_at += 1;
                    }
                }
            }
        }
        for (j, name) in common.iter().enumerate() {
            let Some(acc) = layer_acc[j].as_mut() else { continue };
            let (a, b) = (&r[rpos[name.as_str()]], &c[cpos[name.as_str()]]);
            match (floats(a), floats(b)) {
                (Some(x), Some(y)) if a.shape() == b.shape() => acc.add(&x, &y),
                _ => layer_acc[j] = None,
            }
        }
    }
    if let Some(l) = labels {
        if l.len() != rows {
            return Err(Error::Input {
                name: "labels".into(),
                msg: format!("{} labels for {rows} output rows", l.len()),
            });
        }
    }
    let out_names: Vec<String> = rs.outputs()[..n_out].iter().map(|o| o.name.clone()).collect();
    let mut rel: HashMap<String, f64> = HashMap::new();
    let mut table = vec![];
    let inputs_of: HashMap<&str, &Vec<String>> = rp.iter().map(|(v, _, i)| (v.as_str(), i)).collect();
    let ref_ops: HashMap<&str, &str> = rp.iter().map(|(v, op, _)| (v.as_str(), op.as_str())).collect();
    for (name, acc) in common.iter().zip(&layer_acc) {
        let Some(acc) = acc else { continue };
        let stats = acc.stats();
        // Upstream error: the largest relative error among this node's (transitively)
        // compared inputs.
        let mut upstream = 0f64;
        let mut stack: Vec<&str> =
            inputs_of.get(name.as_str()).map(|v| v.iter().map(|s| s.as_str()).collect()).unwrap_or_default();
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            if !seen.insert(x) {
                continue;
            }
            if let Some(e) = rel.get(x) {
                upstream = upstream.max(*e);
            } else if let Some(ins) = inputs_of.get(x) {
                stack.extend(ins.iter().map(|s| s.as_str()));
            }
        }
        rel.insert(name.clone(), stats.rel_l2);
        table.push(Layer {
            name: name.clone(),
            reference_op: ref_ops.get(name.as_str()).unwrap_or(&"?").to_string(),
            candidate_op: cand_ops.get(name.as_str()).unwrap_or(&"?").to_string(),
            added: stats.rel_l2 - upstream,
            stats,
        });
    }
    Ok(Report {
        samples: inputs.len(),
        outputs: out_names.into_iter().zip(out_acc.iter().map(Acc::stats)).collect(),
        top1: (rows > 0).then_some((agree, rows)),
        accuracy: labels.map(|_| (right.0 as f64 / rows.max(1) as f64, right.1 as f64 / rows.max(1) as f64)),
        layers: table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fidelity_measures() {
        let r = vec![vec![1.0f32, 0.0, 0.0], vec![0.0, 2.0, 0.0]];
        let f = fidelity(&r, &r, 3, Some(&[0, 2]));
        assert_eq!((f.max_abs, f.mean_abs, f.top1_agreement), (0.0, 0.0, 1.0));
        assert!((f.min_cosine - 1.0).abs() < 1e-12);
        assert_eq!((f.accuracy, f.reference_accuracy), (Some(0.5), Some(0.5)));
        let c = vec![vec![1.0f32, 0.0, 0.0], vec![0.0, 0.0, 2.0]];
        let f = fidelity(&r, &c, 3, Some(&[0, 2]));
        assert_eq!((f.max_abs, f.top1_agreement, f.accuracy), (2.0, 0.5, Some(1.0)));
        assert!((f.mean_abs - 4.0 / 6.0).abs() < 1e-12);
        assert!(f.min_cosine.abs() < 1e-12 && (f.mean_cosine - 0.5).abs() < 1e-12);
    }

    #[test]
    fn stats_of_identical_and_scaled_values() {
        let mut a = Acc::default();
        a.add(&[1.0, -2.0, 3.0], &[1.0, -2.0, 3.0]);
        let s = a.stats();
        assert_eq!(s.max_abs, 0.0);
        assert!((s.cosine - 1.0).abs() < 1e-12);
        let mut b = Acc::default();
        b.add(&[1.0, 0.0], &[0.0, 1.0]);
        assert!(b.stats().cosine.abs() < 1e-12);
        assert_eq!(b.stats().rel_max, 1.0);
    }
}
