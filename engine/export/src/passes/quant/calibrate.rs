//! Activation ranges for int8-static: the f32 graph is run in tract with the inputs of every
//! quantised Linear exposed as extra outputs, over a calibration set.

use crate::error::{Error, Result};
use crate::ir::Graph;
use perceiver_edge_runtime::{dataset, to_vec, Session, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// How a calibration range is chosen from the observed activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Smallest and largest value seen.
    MinMax,
    /// The `p` and `100 - p` percentiles of the values seen (e.g. 99.99), clipping outliers.
    Percentile(f64),
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        let bad = || {
            Error::invalid(format!(
                "unknown calibration method \"{s}\" (expected minmax, percentile or percentile:P with 50 < P <= 100)"
            ))
        };
        match s {
            "minmax" => Ok(Method::MinMax),
            "percentile" => Ok(Method::Percentile(99.99)),
            _ => {
                let p: f64 = s.strip_prefix("percentile:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
                if p > 50.0 && p <= 100.0 {
                    Ok(Method::Percentile(p))
                } else {
                    Err(bad())
                }
            }
        }
    }
}

/// Values kept per tensor for percentiles (a strided sample beyond this).
const PERCENTILE_SAMPLE: usize = 1 << 20;

/// Reads calibration inputs for graph `g` from `path` (see [`perceiver_edge_runtime::dataset`]).
pub fn load(g: &Graph, path: &Path) -> Result<Vec<Vec<Tensor>>> {
    Ok(dataset::load_inputs(path, &g.input_specs())?)
}

/// Runs f32 graph `g` on every input set and returns the range of each value in `values`;
/// `progress(done, total)` is called after each input set.
pub fn ranges(
    g: &Graph,
    values: &[String],
    inputs: &[Vec<Tensor>],
    method: Method,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HashMap<String, (f32, f32)>> {
    if inputs.is_empty() {
        return Err(Error::invalid("the calibration set is empty"));
    }
    let mut probe = g.clone();
    let shapes: HashMap<String, usize> =
        probe.value_shapes().into_iter().map(|(k, s)| (k.to_string(), s.iter().product())).collect();
    let first_extra = probe.outputs.len();
    for v in values {
        let val = probe
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter())
            .chain(probe.inputs.iter())
            .find(|o| o.name == *v)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("calibration: no value `{v}` in the graph")))?;
        probe.output(&val, &format!("calibrate:{v}"));
    }
    let bytes = crate::ir::onnx::to_bytes(&probe);
    let mut session = Session::from_bytes(&bytes).map_err(|e| Error::invalid(format!("calibration: {e}")))?;
    let mut minmax = vec![(f32::INFINITY, f32::NEG_INFINITY); values.len()];
    let mut samples: Vec<Vec<f32>> = vec![vec![]; values.len()];
    for (i, set) in inputs.iter().enumerate() {
        let out = session.run(set.clone()).map_err(|e| Error::invalid(format!("calibration input {i}: {e}")))?;
        for (j, t) in out[first_extra..].iter().enumerate() {
            let v: Vec<f32> = to_vec(t).ok_or_else(|| Error::invalid("calibration: non-f32 activation"))?;
            for x in &v {
                minmax[j].0 = minmax[j].0.min(*x);
                minmax[j].1 = minmax[j].1.max(*x);
            }
            if let Method::Percentile(_) = method {
                let total = shapes.get(&values[j]).copied().unwrap_or(v.len()) * inputs.len();
                let stride = total.div_ceil(PERCENTILE_SAMPLE).max(1);
                samples[j].extend(v.iter().step_by(stride));
            }
        }
        progress(i + 1, inputs.len());
    }
    let mut out = HashMap::new();
    for (j, v) in values.iter().enumerate() {
        let r = match method {
            Method::MinMax => minmax[j],
            Method::Percentile(p) => {
                let s = &mut samples[j];
                s.sort_by(f32::total_cmp);
                let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
                (at(1.0 - p / 100.0), at(p / 100.0))
            }
        };
        if !r.0.is_finite() || !r.1.is_finite() {
            return Err(Error::invalid(format!("calibration: activation `{v}` is not finite")));
        }
        out.insert(v.clone(), r);
    }
    Ok(out)
}
