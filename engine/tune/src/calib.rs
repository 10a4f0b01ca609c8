//! Calibration data: `.npy` files (one stacked `[S, ...]` array, or a folder of them) split into
//! samples shaped like the graph's input, with optional integer labels (or float target outputs).

use anyhow::{bail, Context, Result};
use perceiver_edge_runtime::{dataset, npy, to_vec, IoSpec, Tensor};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::Datum;

/// Calibration samples (each the graph's inputs, in order) and their labels, if known.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// Samples, each a list of graph inputs.
    pub samples: Vec<Vec<Tensor>>,
    /// One label per sample (for classification accuracy).
    pub labels: Option<Vec<i64>>,
    /// Target outputs per sample (float labels shaped like the model's output: a heat map's
    /// target distribution, a regression target), for `distill`'s task loss; `None` with `labels`.
    pub targets: Option<Vec<Tensor>>,
    /// Where they came from (for reports).
    pub source: String,
    /// The file the labels or targets came from (for reports).
    pub labels_source: Option<String>,
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
    let mut targets = None;
    let labels_source = label_files.first().map(|p| p.display().to_string());
    let labels = match label_files.as_slice() {
        [one] => {
            let t = npy::read_npy(one)?;
            let rows = t.shape().first().copied().unwrap_or(0);
            if t.datum_type() == f32::datum_type() && labels.is_some() && t.rank() >= 2 {
                // Float labels: one target output per sample row.
                if rows != samples.len() * batch {
                    bail!("{}: {rows} target rows for {} samples", one.display(), samples.len() * batch);
                }
                let per: Result<Vec<Tensor>> = (0..samples.len())
                    .map(|i| t.slice(0, i * batch, (i + 1) * batch).with_context(|| format!("{}", one.display())))
                    .collect();
                targets = Some(per?);
                None
            } else {
                let v = to_vec::<i64>(&t).with_context(|| {
                    format!(
                        "{}: labels must be int64 class labels [S], or float32 target outputs [S, ...] (with --labels)",
                        one.display()
                    )
                })?;
                if v.len() != samples.len() * batch {
                    if labels.is_some() {
                        bail!("{}: {} labels for {} samples", one.display(), v.len(), samples.len() * batch);
                    }
                    None // a folder's label file that does not match: no accuracy
                } else {
                    Some(v)
                }
            }
        }
        _ => None,
    };
    let labels_source = if labels.is_some() || targets.is_some() { labels_source } else { None };
    Ok(Calibration { samples, labels, targets, source: data.display().to_string(), labels_source })
}

impl Calibration {
    /// Checks that float target outputs, if any, hold one model output (`output_shape`, batch
    /// included) per sample.
    pub fn check_targets(&self, output_shape: &[usize]) -> Result<()> {
        let want: usize = output_shape.iter().product();
        if let Some(t) = self.targets.as_ref().and_then(|t| t.iter().find(|t| t.len() != want)) {
            let mut shape = output_shape.to_vec();
            if let Some(d) = shape.first_mut() {
                *d *= self.samples.len();
            }
            let mut got = t.shape().to_vec();
            if let Some(d) = got.first_mut() {
                *d *= self.samples.len();
            }
            bail!(
                "{}: target outputs {got:?}, expected {shape:?} (one model output per sample)",
                self.labels_source.as_deref().unwrap_or("labels")
            );
        }
        Ok(())
    }

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
            targets: self.targets.as_ref().map(|t| t.iter().skip(parity).step_by(2).cloned().collect()),
            source: format!("{} ({} samples)", self.source, if parity == 0 { "even" } else { "odd" }),
            labels_source: self.labels_source.clone(),
        };
        (pick(0), pick(1))
    }
}
