//! The PerceiverIO encoder: the latent array cross-attends to the inputs once, then the
//! weight-shared block of latent self-attention layers is applied `num_blocks` times.

use crate::error::Result;
use crate::ir::Val;
use crate::model::blocks::{Builder, LayerOpts};

/// Graph mark of the latents after the encoder cross-attention.
pub const MARK_CROSS: &str = "latents.cross";
/// Graph mark prefix of the latents after block K (`latents.block.K`).
pub const MARK_BLOCK: &str = "latents.block.";

/// Encodes `inputs` (`[B, M, C]`, optional additive mask) into latents `[B, N, D]`.
pub fn encode(b: &mut Builder, inputs: &Val, mask: Option<&Val>) -> Result<Val> {
    let cfg = b.ck.config.clone();
    let n = b.ck.get_shaped("embeddings.latents", &[None, None])?.shape.clone();
    let latents = match b.budget.latents.clone() {
        // `--latents K`: a constant holding only the kept rows of the trained latent array.
        Some(keep) => {
            let all = b.ck.get_shaped("embeddings.latents", &[Some(n[0]), Some(n[1])])?;
            let rows = crate::model::budget::gather_rows(&all, &keep)?;
            b.g.const_f32("embeddings.latents.kept", &[1, keep.len(), n[1]], &rows)
        }
        None => b.param_as("embeddings.latents", &[Some(n[0]), Some(n[1])], &[1, n[0], n[1]])?,
    };
    let n = [latents.shape[1], n[1]];
    for (k, v) in [("N", n[0]), ("D", n[1]), ("M", inputs.shape[1]), ("C", inputs.shape[2])] {
        b.dims.insert(k, v);
    }
    let cross = LayerOpts { heads: cfg.num_cross_attention_heads, query_residual: cfg.use_query_residual };
    let mut z = b.scoped("encoder.cross", |b| {
        b.perceiver_layer("encoder.cross_attention", &latents, Some(inputs), mask, cross)
    })?;
    b.g.marks.push((MARK_CROSS.into(), z.clone()));
    let latent = LayerOpts { heads: cfg.num_self_attention_heads, query_residual: true };
    let blocks = b.budget.blocks.unwrap_or(cfg.num_blocks);
    for block in 0..blocks {
        for i in 0..cfg.num_self_attends_per_block {
            z = b.scoped(&format!("encoder.self.{block}.{i}"), |b| {
                b.perceiver_layer(&format!("encoder.self_attends.{i}"), &z, None, None, latent)
            })?;
        }
        b.g.marks.push((format!("{MARK_BLOCK}{block}"), z.clone()));
    }
    Ok(z)
}
