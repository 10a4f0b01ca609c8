//! Keys of the metadata an exported graph carries (ONNX `metadata_props`): the one list the
//! exporter writes and the runtime, `inspect`, `bench` and `compare` read.

/// The export summary (architecture, cost, memory) as JSON.
pub const SUMMARY: &str = "perceiver_edge.summary";
/// The graph's numeric precision (`f32`, `f16`, `int8`, `int8-static`, `q4`); absent means f32.
pub const PRECISION: &str = "perceiver_edge.precision";
/// The passes that ran at export, comma-separated, in order.
pub const PASSES: &str = "perceiver_edge.passes";
/// Role of a split-export part (`encoder`, `block`, `decoder`); see [`crate::split`].
pub const PART: &str = "perceiver_edge.part";
/// Prefix of an input's declared value range (`lo hi`): `perceiver_edge.range.INPUT`.
pub const RANGE_PREFIX: &str = "perceiver_edge.range.";
/// Prefix of the bytes of precomputed tables a pass added: `perceiver_edge.tables.PASS`.
pub const TABLES_PREFIX: &str = "perceiver_edge.tables.";
/// Prefix of the number of sites a rewrite pass changed: `perceiver_edge.rewrites.PASS`.
pub const REWRITES_PREFIX: &str = "perceiver_edge.rewrites.";
/// Prefix of the extra outputs that expose attention probabilities for calibration:
/// `attention_probs.{i}.{checkpoint prefix}`.
pub const PROBS_OUTPUT: &str = "attention_probs";

/// The key of input `name`'s value range.
pub fn range_key(name: &str) -> String {
    format!("{RANGE_PREFIX}{name}")
}

/// The key of the tables pass `pass` added.
pub fn tables_key(pass: &str) -> String {
    format!("{TABLES_PREFIX}{pass}")
}

/// The key of the sites pass `pass` rewrote.
pub fn rewrites_key(pass: &str) -> String {
    format!("{REWRITES_PREFIX}{pass}")
}

/// The stage a node of an exported graph belongs to, from its name (the exporter names nodes
/// `scope/.../Op_i`; the first segment is the stage): what `inspect` sums FLOPs by and
/// profilers sum time by.
pub fn stage_of(node: &str) -> String {
    let first = node.split('/').next().unwrap_or(node);
    match first {
        s if s.starts_with("encoder.cross") => "encoder cross-attention".into(),
        s if s.starts_with("encoder.self") => "latent self-attention".into(),
        s => s.to_string(),
    }
}
