//! Whole-model analysis above the builder: which latents a budget keeps.
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

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::metadata::PROBS_OUTPUT;
use crate::options::ExportOptions;
use tract_onnx::prelude::*;

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
}
