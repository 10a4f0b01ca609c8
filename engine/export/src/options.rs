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
    /// `tables` chooses which precomputed tables the rewrites keep (budget knob).
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

/// Which precomputed tables the exact rewrites `position_split` and `constant_query_attention`
/// may add (`--tables`): memory bought for speed. See [`crate::passes::tables`] for the rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tables {
    /// Keep a rewrite's tables only when they are no larger than the constants the rewrite
    /// removes and all kept tables stay within [`crate::passes::tables::MAX_SHARE`] of the
    /// model's weight bytes (exports below f32 also require them to pay at the stored precision,
    /// see [`crate::passes::tables::pay_at_stored_precision`]).
    #[default]
    Auto,
    /// Every table rewrite that applies, whatever it costs.
    All,
    /// No table rewrites (`--no-position-tables`).
    None,
}

impl std::str::FromStr for Tables {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Tables> {
        match s {
            "auto" => Ok(Tables::Auto),
            "all" => Ok(Tables::All),
            "none" => Ok(Tables::None),
            _ => Err(crate::Error::invalid(format!("--tables {s}: expected auto, all or none"))),
        }
    }
}

impl Tables {
    /// The option's spelling on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Tables::Auto => "auto",
            Tables::All => "all",
            Tables::None => "none",
        }
    }
}

/// Which exact performance rewrites run at export (all by default; tables by [`Tables`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct PerfOptions {
    /// Export the unrewritten graph (the reference the rewrites are tested against).
    pub no_rewrites: bool,
    /// Which rewrite tables are kept (memory for speed; the export report lists each).
    pub tables: Tables,
    /// Why the tables were turned off for this export, when not by the user (reported).
    pub tables_off_reason: Option<&'static str>,
    /// The share of the weights `auto` may spend on tables (default
    /// [`crate::passes::tables::MAX_SHARE`]; a library knob, tests use it).
    pub max_table_share: Option<f64>,
    /// The weight bytes that share is taken of (default: the graph's own live constants). A
    /// split part is judged against the whole model's weights, as the single graph is.
    pub table_share_of: Option<usize>,
    /// The graph will be quantised to int8 / q4: `few_query_attention` is skipped. Exact in
    /// f32, it would quantise the probability-weighted mean of the keys' inputs once instead of
    /// each key's projection (whose errors the softmax average partly cancels): measured on the
    /// seqcls fixture, int8 cosine 0.99891 with it against 0.99988 without.
    pub quantised: bool,
    /// Bytes per weight the graph will be stored at when below f32 (f16 2, int8 1, q4 0.5):
    /// `auto` then also requires the tables to pay at that precision.
    pub stored_weight_bytes: Option<f64>,
    /// Attention scores larger than this many bytes are computed in chunks of the inputs
    /// (`chunked_attention`; default 32 MiB, 0 never).
    pub max_scores_bytes: Option<usize>,
}
