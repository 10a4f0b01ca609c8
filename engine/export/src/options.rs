//! What the user asks of an export: plain data, read by every layer below `lib.rs` (heads,
//! model builders, passes) and owned by none of them.

use std::path::PathBuf;

/// Options of `export`; every one has a default taken from the checkpoint.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Fixed batch size (default 1).
    pub batch: Option<usize>,
    /// Image height and width (default: `image_size` / `train_size` from config.json).
    pub image_size: Option<(usize, usize)>,
    /// Text length or raw input count M (default: `max_position_embeddings`).
    pub seq_len: Option<usize>,
    /// Add an `attention_mask` input (text and bare heads).
    pub attention_mask: bool,
    /// Decode only K output positions chosen by an `output_indices` input.
    pub decode_subset: Option<usize>,
    /// Multimodal: decode K video points chosen by an `image_points` input.
    pub image_points: Option<usize>,
    /// Multimodal: decode K audio patches chosen by an `audio_points` input.
    pub audio_points: Option<usize>,
    /// Decoder declaration of a bare `PerceiverModel` (default: `perceiver_edge_decoder.json`
    /// in the checkpoint directory, if present).
    pub decoder: Option<PathBuf>,
    /// Performance rewrites (issue #3): `no_rewrites` exports the unrewritten reference graph;
    /// `no_position_tables` turns off the rewrites that add precomputed tables (budget knob).
    pub perf: PerfOptions,
    /// `--latents K`: indices of the trained latents to keep, strictly ascending (choose them
    /// with [`crate::analysis::latent_importance`] and [`crate::analysis::select_latents`]).
    pub latents: Option<Vec<usize>>,
    /// `--blocks B`: repetitions of the weight-shared latent block (default `num_blocks`).
    pub blocks: Option<usize>,
    /// Calibration: expose every attention's probabilities as extra outputs
    /// (`attention_probs.{i}.{checkpoint prefix}`).
    pub expose_attention: bool,
    /// With `decode_subset`: the chosen queries are rows of the full query grid, so decoding
    /// them equals the full output at those positions (split export). Off, Fourier queries of a
    /// subset use transformers' `subsampled_output_points` positions `-1 + 2 i / n`.
    pub grid_subset: bool,
}

/// Which exact performance rewrites run at export (all by default).
#[derive(Clone, Copy, Debug, Default)]
pub struct PerfOptions {
    /// Export the unrewritten graph (the reference the rewrites are tested against).
    pub no_rewrites: bool,
    /// Skip the rewrites that add precomputed tables (memory for speed; `inspect` reports them).
    pub no_position_tables: bool,
    /// The graph will be quantised to int8 / q4: `few_query_attention` is skipped. Exact in
    /// f32, it would quantise the probability-weighted mean of the keys' inputs once instead of
    /// each key's projection (whose errors the softmax average partly cancels): measured on the
    /// seqcls fixture, int8 cosine 0.99891 with it against 0.99988 without.
    pub quantised: bool,
}
