//! Budget knobs at export: fewer latents (`--latents K`), a different number of repetitions of
//! the weight-shared latent block (`--blocks B`), and the calibration that chooses the latents.
//!
//! The knobs are builder options ([`Budget`], set from [`ExportOptions`] by `spec::build_graph`),
//! so the graph is still built in one place:
//!
//! * **latents** keeps rows `keep` (ascending indices into the trained `N x D` latent array) of
//!   `embeddings.latents`; every later layer is unchanged and attends over the `K` kept latents.
//!   Keeping all `N` rows reproduces the trained model bit for bit.
//! * **blocks** applies the shared block (`num_self_attends_per_block` layers) `B` times instead
//!   of the trained `num_blocks`, as transformers does when `num_blocks` is changed in the config.
//!
//! **Latent importance** (what [`latent_importance`] computes, and what
//! `models/reference/latent_importance.py` recomputes independently from transformers'
//! `output_attentions`): run the full f32 graph on each calibration sample with every attention
//! probability tensor exposed as an extra output. For each attention that reads the latents as
//! keys, the share of its attention mass that latent `j` receives is
//!
//! * latent self-attention layer (`[B, H, N, N]`): `sum_{b,h} sum_{i != j} P[b,h,i,j] / (B H N)`
//!   (mass from the *other* latents; a latent attending to itself does not show others need it);
//! * decoder cross-attention (`[B, H, O, N]`): `sum_{b,h,o} P[b,h,o,j] / (B H O)`.
//!
//! A latent's importance is the sum over these attentions, averaged over the samples. The `K`
//! most important latents are kept (ties broken by the lower index), in ascending index order.

use crate::checkpoint::{Checkpoint, Weight};
use crate::error::{Error, Result};
use crate::spec::ExportOptions;
use serde::Serialize;
use tract_onnx::prelude::*;

/// Budget options of the graph builder.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    /// Indices of the trained latents to keep (strictly ascending); `None` keeps all.
    pub latents: Option<Vec<usize>>,
    /// Repetitions of the weight-shared latent block; `None` is the trained `num_blocks`.
    pub blocks: Option<usize>,
    /// Record every attention's probabilities (for calibration).
    pub expose_attention: bool,
}

/// Prefix of the extra outputs that expose attention probabilities: `attention_probs.{i}.{prefix}`.
pub const PROBS_OUTPUT: &str = "attention_probs";

impl Budget {
    /// The budget options of `opts`, checked against checkpoint `ck`.
    pub fn from_options(ck: &Checkpoint, opts: &ExportOptions) -> Result<Budget> {
        if opts.blocks == Some(0) {
            return Err(Error::invalid("--blocks must be at least 1"));
        }
        if let Some(keep) = &opts.latents {
            let n = ck.get_shaped("embeddings.latents", &[None, None])?.shape[0];
            check_keep(keep, n)?;
        }
        Ok(Budget { latents: opts.latents.clone(), blocks: opts.blocks, expose_attention: opts.expose_attention })
    }
}

fn check_keep(keep: &[usize], n: usize) -> Result<()> {
    if keep.is_empty() || keep.len() > n {
        return Err(Error::invalid(format!("--latents {} must be in 1..={n} (the trained latents)", keep.len())));
    }
    if let Some(bad) = keep.iter().find(|&&i| i >= n) {
        return Err(Error::invalid(format!("latent index {bad} is out of range 0..{n}")));
    }
    if keep.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::invalid("kept latent indices must be strictly ascending"));
    }
    Ok(())
}

/// Rows `keep` of the `[N, D]` latent array `w`, row-major `[K, D]`.
pub fn gather_rows(w: &Weight, keep: &[usize]) -> Result<Vec<f32>> {
    let (n, d) = (w.shape[0], w.shape[1]);
    check_keep(keep, n)?;
    Ok(keep.iter().flat_map(|&i| w.data[i * d..(i + 1) * d].iter().copied()).collect())
}

/// The `k` most important latents (ties broken by the lower index), in ascending index order.
pub fn select_latents(importance: &[f64], k: usize) -> Result<Vec<usize>> {
    let n = importance.len();
    if k == 0 || k > n {
        return Err(Error::invalid(format!("--latents {k} must be in 1..={n} (the trained latents)")));
    }
    if let Some(i) = importance.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!("latent {i} has a non-finite importance")));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
    let mut keep = order[..k].to_vec();
    keep.sort_unstable();
    Ok(keep)
}

/// Which attentions count towards latent importance, from their checkpoint prefix.
fn reads_latents(prefix: &str) -> Option<bool> {
    if prefix.contains("self_attends") {
        Some(true) // latent self-attention: exclude the diagonal
    } else if prefix.starts_with("decoder") {
        Some(false)
    } else {
        None
    }
}

/// Importance of each trained latent on calibration `samples` (each one the graph's inputs, in
/// graph order, at batch size `opts.batch`); see the module documentation for the definition.
/// `opts` may set `blocks`; `latents` must be unset (importance is over all trained latents).
pub fn latent_importance(ck: &Checkpoint, opts: &ExportOptions, samples: &[Vec<Tensor>]) -> Result<Vec<f64>> {
    if opts.latents.is_some() {
        return Err(Error::invalid("latent importance is computed over all latents: leave latents unset"));
    }
    if samples.is_empty() {
        return Err(Error::invalid("calibration needs at least one sample"));
    }
    let opts = ExportOptions { expose_attention: true, ..opts.clone() };
    let exported = crate::build(ck, &opts)?;
    let n = exported.summary.dims.get("N").copied().unwrap_or(0);
    let outs: Vec<(usize, bool)> = exported
        .graph
        .outputs
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let prefix = v.name.strip_prefix(PROBS_OUTPUT)?.splitn(3, '.').nth(2)?;
            Some((i, reads_latents(prefix)?))
        })
        .collect();
    if outs.is_empty() {
        return Err(Error::invalid("this model has no attention over its latents to calibrate on"));
    }
    let bytes = exported.to_bytes();
    let run_err = |e: TractError| {
        Error::invalid(format!("calibration run failed: {}", e.to_string().lines().next().unwrap_or("")))
    };
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(run_err)?;
    let mut total = vec![0f64; n];
    for (s, inputs) in samples.iter().enumerate() {
        let inputs: TVec<TValue> = inputs.iter().cloned().map(TValue::from).collect();
        let res = plan.run(inputs).map_err(|e| {
            Error::invalid(format!("calibration sample {s}: {}", e.to_string().lines().next().unwrap_or("")))
        })?;
        for &(i, self_attn) in &outs {
            let t = &res[i];
            let shape = t.shape().to_vec();
            let p = t.try_as_plain_ram().and_then(|r| r.as_slice::<f32>()).map_err(run_err)?;
            accumulate(&mut total, p, &shape, self_attn);
        }
    }
    Ok(total.iter().map(|v| v / samples.len() as f64).collect())
}

/// Adds one attention's per-latent mass share (`probs` `[B, H, Lq, N]`) to `acc`.
pub fn accumulate(acc: &mut [f64], probs: &[f32], shape: &[usize], exclude_diagonal: bool) {
    let (b, h, lq, n) = (shape[0], shape[1], shape[2], shape[3]);
    let norm = (b * h * lq) as f64;
    for bh in 0..b * h {
        for i in 0..lq {
            let row = &probs[(bh * lq + i) * n..(bh * lq + i + 1) * n];
            for (j, &p) in row.iter().enumerate() {
                if !(exclude_diagonal && i == j) {
                    acc[j] += p as f64 / norm;
                }
            }
        }
    }
}

/// Splits stacked calibration data `[S, ...]` into samples shaped like graph input `shape`
/// (`[batch, ...]`); `S` must be a multiple of the batch size. A tensor shaped exactly like the
/// input is one sample.
pub fn split_samples(t: &Tensor, shape: &[usize], what: &str) -> Result<Vec<Tensor>> {
    let ts = t.shape();
    let bad = || Error::invalid(format!("{what}: shape {ts:?} does not stack samples of shape {shape:?}"));
    if ts.len() != shape.len()
        || ts[1..] != shape[1..]
        || shape[0] == 0
        || !ts[0].is_multiple_of(shape[0])
        || ts[0] == 0
    {
        return Err(bad());
    }
    (0..ts[0] / shape[0]).map(|i| t.slice(0, i * shape[0], (i + 1) * shape[0]).map_err(|_| bad())).collect()
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

fn argmax(v: &[f32]) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_keeps_the_most_important_with_ties_by_index() {
        let imp = [0.5, 0.9, 0.5, 0.1, 0.9];
        assert_eq!(select_latents(&imp, 2).unwrap(), vec![1, 4]);
        // 0.5 tie between 0 and 2: the lower index wins.
        assert_eq!(select_latents(&imp, 3).unwrap(), vec![0, 1, 4]);
        assert_eq!(select_latents(&imp, 5).unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(select_latents(&imp, 0).is_err());
        assert!(select_latents(&imp, 6).is_err());
        assert!(select_latents(&[1.0, f64::NAN], 1).is_err());
    }

    #[test]
    fn keep_lists_are_checked() {
        assert!(check_keep(&[0, 2, 3], 4).is_ok());
        assert!(check_keep(&[], 4).is_err());
        assert!(check_keep(&[0, 4], 4).is_err());
        assert!(check_keep(&[2, 1], 4).is_err());
        assert!(check_keep(&[1, 1], 4).is_err());
    }

    #[test]
    fn gather_rows_picks_rows() {
        let w = Weight { name: "l".into(), shape: vec![3, 2], data: vec![0., 1., 2., 3., 4., 5.] };
        assert_eq!(gather_rows(&w, &[0, 2]).unwrap(), vec![0., 1., 4., 5.]);
    }

    #[test]
    fn attention_mass_excludes_the_diagonal_for_self_attention() {
        // [1 batch, 1 head, 2 queries, 2 keys]
        let p = [0.75f32, 0.25, 0.5, 0.5];
        let mut acc = vec![0.0; 2];
        accumulate(&mut acc, &p, &[1, 1, 2, 2], true);
        assert_eq!(acc, vec![0.25, 0.125]);
        let mut acc = vec![0.0; 2];
        accumulate(&mut acc, &p, &[1, 1, 2, 2], false);
        assert_eq!(acc, vec![0.625, 0.375]);
    }

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
}
