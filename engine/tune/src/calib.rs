//! Calibration data: `.npy` files (one stacked `[S, ...]` array, or a folder of them) split into
//! samples shaped like the graph's input, with optional integer labels.

use anyhow::{bail, Context, Result};
use perceiver_edge_export::budget::split_samples;
use perceiver_edge_export::graph::Val;
use perceiver_edge_runtime::{npy, to_vec, Tensor};
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

/// Loads `data` (a stacked `.npy` or a folder of `.npy` files; files whose name contains
/// `label` are labels) for a graph with `inputs` (one input only). `labels` overrides.
pub fn load(data: &Path, labels: Option<&Path>, inputs: &[Val]) -> Result<Calibration> {
    if inputs.len() != 1 {
        let names: Vec<&str> = inputs.iter().map(|v| v.name.as_str()).collect();
        bail!("calibration supports single-input models; this one takes {}", names.join(", "));
    }
    let (files, mut label_files): (Vec<PathBuf>, Vec<PathBuf>) = if data.is_dir() {
        let mut all: Vec<PathBuf> = std::fs::read_dir(data)
            .with_context(|| format!("{}: cannot list", data.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "npy"))
            .collect();
        all.sort();
        all.into_iter().partition(|p| !is_label_file(p))
    } else if data.exists() {
        (vec![data.to_path_buf()], vec![])
    } else {
        bail!("{}: no such calibration file or folder", data.display());
    };
    if files.is_empty() {
        bail!("{}: no .npy calibration files", data.display());
    }
    let shape = &inputs[0].shape;
    let mut samples = vec![];
    for f in &files {
        let t = npy::read_npy(f)?;
        let what = f.display().to_string();
        for s in split_samples(&t, shape, &what)? {
            samples.push(vec![s]);
        }
    }
    if let Some(l) = labels {
        label_files = vec![l.to_path_buf()];
    }
    let labels = match label_files.as_slice() {
        [one] => {
            let t = npy::read_npy(one)?;
            let v = to_vec::<i64>(&t).with_context(|| format!("{}: labels must be int64", one.display()))?;
            if v.len() != samples.len() * shape[0] {
                if labels.is_some() {
                    bail!("{}: {} labels for {} samples", one.display(), v.len(), samples.len() * shape[0]);
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
