//! Budget knobs at export: fewer latents (`--latents K`), a different number of repetitions of
//! the weight-shared latent block (`--blocks B`). Which latents to keep is chosen a layer up, in [`crate::analysis`].
//!
//! The knobs are builder options ([`Budget`], set from [`ExportOptions`] by
//! `heads::build_graph`), so the graph is still built in one place:
//!
//! * **latents** keeps rows `keep` (ascending indices into the trained `N x D` latent array) of
//!   `embeddings.latents`; every later layer is unchanged and attends over the `K` kept latents.
//!   Keeping all `N` rows reproduces the trained model bit for bit.
//! * **blocks** applies the shared block (`num_self_attends_per_block` layers) `B` times instead
//!   of the trained `num_blocks`, as transformers does when `num_blocks` is changed in the config.
//!
use crate::checkpoint::{Checkpoint, Weight};
use crate::error::{Error, Result};
use crate::options::ExportOptions;

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

impl Budget {
    /// The budget options of `opts`, checked against checkpoint `ck`.
    pub fn from_options(ck: &Checkpoint, opts: &ExportOptions) -> Result<Budget> {
        if opts.blocks == Some(0) {
            return Err(Error::invalid("--blocks must be at least 1"));
        }
        let per_block = ck.config.num_self_attends_per_block;
        let max = perceiver_edge_runtime::limits::MAX_LATENT_LAYERS;
        if let Some(b) = opts.blocks.filter(|b| b.saturating_mul(per_block) > max) {
            return Err(Error::invalid(format!(
                "--blocks {b}: {b} x {per_block} layers per block is more than the {max} latent layers accepted"
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
