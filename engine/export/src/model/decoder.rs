//! PerceiverIO decoders: output queries (trainable, Fourier, or the preprocessed inputs)
//! cross-attend to the latents, then an optional final projection. With an index input the
//! graph decodes only a subset of output positions.

use crate::error::Result;
use crate::ir::Val;
use crate::model::blocks::{Builder, LayerOpts};
use crate::model::position::{fourier_at_indices, Fourier, IndexPositions};

/// Graph mark of input-dependent decoder queries (optical flow's preprocessed inputs): a split
/// export computes them once in the encoder and hands them to the decoders.
pub const MARK_QUERIES: &str = "decoder.queries";

/// Where a decoder's output queries come from.
#[derive(Clone, Debug)]
pub enum Queries {
    /// `{prefix}.output_position_encodings.position_embeddings` (`[O, E]`), optionally projected.
    Trainable,
    /// Fourier features of the output grid `index_dims`, optionally projected.
    Fourier(Fourier, Vec<usize>),
    /// The preprocessed inputs themselves (optical flow), `[B, M, C]`.
    Inputs(Val),
}

/// A `PerceiverBasicDecoder` under weight prefix `prefix` (`decoder`, `decoder.decoder`, ...).
#[derive(Clone, Debug)]
pub struct Decoder {
    /// Weight prefix.
    pub prefix: String,
    /// Query source.
    pub queries: Queries,
    /// Attention heads and query residual of the decoding cross-attention.
    pub opts: LayerOpts,
}

impl Decoder {
    /// Number of output positions of the full decode.
    pub fn num_outputs(&self, b: &Builder) -> Result<usize> {
        Ok(match &self.queries {
            Queries::Trainable => b.ck.get(&self.pos_name())?.shape[0],
            Queries::Fourier(_, dims) => dims.iter().product(),
            Queries::Inputs(x) => x.shape[1],
        })
    }

    fn pos_name(&self) -> String {
        format!("{}.output_position_encodings.position_embeddings", self.prefix)
    }

    /// The output queries, `[1 or B, O, E]`, or `[.., K, E]` for indices `subset` (`[K]`).
    pub fn query_array(&self, b: &mut Builder, subset: Option<&Val>) -> Result<Val> {
        let proj = format!("{}.positions_projection", self.prefix);
        let has_proj = b.ck.has(&format!("{proj}.weight"));
        match (&self.queries, subset) {
            (Queries::Inputs(x), None) => Ok(x.clone()),
            (Queries::Inputs(x), Some(idx)) => Ok(b.g.gather(x, idx, 1)),
            // Subsampled Fourier queries use transformers' `-1 + 2 * i / n` positions: computed in-graph.
            (Queries::Fourier(f, dims), Some(idx)) if !b.grid_subset => {
                let q = fourier_at_indices(&mut b.g, f, idx, dims, IndexPositions::Subsampled);
                let q = if has_proj { b.linear(&proj, &q)? } else { q };
                let w = q.last_dim();
                Ok(b.g.reshape(&q, &[1, idx.shape[0], w]))
            }
            // Input-independent queries: a constant table (projected at export time).
            (Queries::Trainable | Queries::Fourier(..), _) => {
                let (table, rows) = match &self.queries {
                    Queries::Fourier(f, dims) => (f.grid(dims)?, dims.iter().product()),
                    _ => {
                        let w = b.ck.get_shaped(&self.pos_name(), &[None, None])?;
                        (w.data.clone(), w.shape[0])
                    }
                };
                let (table, width) =
                    if has_proj { b.linear_const(&proj, &table, rows)? } else { (table.clone(), table.len() / rows) };
                Ok(match subset {
                    None => b.g.const_f32("queries", &[1, rows, width], &table),
                    Some(idx) => {
                        let t = b.g.const_f32("queries", &[rows, width], &table);
                        let q = b.g.gather(&t, idx, 0);
                        b.g.reshape(&q, &[1, idx.shape[0], width])
                    }
                })
            }
        }
    }

    /// Decodes latents `z` (`[B, N, D]`) with `queries`: cross-attention, then `final_layer` if
    /// the checkpoint has one. Returns `[B, O, F]`.
    pub fn decode(&self, b: &mut Builder, queries: &Val, z: &Val) -> Result<Val> {
        let prefix = self.prefix.clone();
        b.dims.insert("O", queries.shape[1]);
        b.dims.insert("E", queries.shape[2]);
        let y = b.perceiver_layer(&format!("{prefix}.decoding_cross_attention"), queries, Some(z), None, self.opts)?;
        let fin = format!("{prefix}.final_layer");
        let y = if b.ck.has(&format!("{fin}.weight")) { b.linear(&fin, &y)? } else { y };
        // Queries without a batch axis decode to [1, O, F]; the output always has B rows.
        let shape = [&[b.batch][..], &y.shape[1..]].concat();
        Ok(b.g.expand(&y, &shape))
    }
}
