//! Calibration data: `.npy` files (one stacked `[S, ...]` array, or a folder of them) split into
//! samples shaped like the graph's input, with optional integer labels.

use anyhow::{bail, Context, Result};
use perceiver_edge_runtime::{dataset, npy, to_vec, IoSpec, Tensor};
use std::path::{Path, PathBuf};

/// Calibration samples (each the graph's inputs, in order) and their labels, if known.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// Samples, each a list of graph inputs.
    pub samples: Vec<Vec<Tensor>>,
    /// One label per sample (for classification accuracy).
    pub labels: Option<Vec<i64>>,
    /// Where they came from (for reports).
    pub source: String,
}

fn is_label_file(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("label"))
}

/// Loads `data` through the runtime's one dataset reader ([`dataset::load_inputs`]: a stacked
/// `.npy`, a folder of them, or a fixture folder) for a graph with `inputs` (one input only);
/// in a folder, a `.npy` file whose name contains `label` holds the labels. `labels` overrides.
pub fn load(data: &Path, labels: Option<&Path>, inputs: &[IoSpec]) -> Result<Calibration> {
    if inputs.len() != 1 {
        let names: Vec<&str> = inputs.iter().map(|v| v.name.as_str()).collect();
        bail!("calibration supports single-input models; this one takes {}", names.join(", "));
    }
    if !data.exists() {
        bail!("{}: no such calibration file or folder", data.display());
    }
    let samples = dataset::load_inputs(data, inputs)?;
    let mut label_files: Vec<PathBuf> = if data.is_dir() {
        let mut all: Vec<PathBuf> = std::fs::read_dir(data)
            .with_context(|| format!("{}: cannot list", data.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "npy") && is_label_file(p))
            .collect();
        all.sort();
        all
    } else {
        vec![]
    };
    let batch = inputs[0].shape[0];
    if let Some(l) = labels {
        label_files = vec![l.to_path_buf()];
    }
    let labels = match label_files.as_slice() {
        [one] => {
            let t = npy::read_npy(one)?;
            let v = to_vec::<i64>(&t).with_context(|| format!("{}: labels must be int64", one.display()))?;
            if v.len() != samples.len() * batch {
                if labels.is_some() {
                    bail!("{}: {} labels for {} samples", one.display(), v.len(), samples.len() * batch);
                }
                None // a folder's label file that does not match: no accuracy
            } else {
                Some(v)
            }
        }
        _ => None,
    };
    Ok(Calibration { samples, labels, source: data.display().to_string() })
}

impl Calibration {
    /// Splits into (selection, validation) sets: even-numbered samples choose latents, odd ones
    /// measure fidelity, so the reported loss is on data the selection did not see. With one
    /// sample both use it.
    pub fn split(&self) -> (Calibration, Calibration) {
        if self.samples.len() < 2 {
            return (self.clone(), self.clone());
        }
        let batch = self.samples[0][0].shape()[0];
        let pick = |parity: usize| Calibration {
            samples: self.samples.iter().skip(parity).step_by(2).cloned().collect(),
            labels: self
                .labels
                .as_ref()
                .map(|l| l.chunks(batch).skip(parity).step_by(2).flatten().copied().collect::<Vec<i64>>()),
            source: format!("{} ({} samples)", self.source, if parity == 0 { "even" } else { "odd" }),
        };
        (pick(0), pick(1))
    }
}
