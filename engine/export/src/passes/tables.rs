//! The precomputed tables the rewrites add (memory bought for speed): their names, so the
//! quantisation passes and the export report can tell them from weights.

/// Names of the constants the rewrites precompute from constant queries and positions (kept in
/// f32 by the int8 and q4 passes: attention scores are where quantisation error hurts most).
pub const TABLE_CONSTANTS: &[&str] =
    &["position_table", "query_position_scores", "value_position_table", "query_key_weight"];

/// Whether a constant of `name` is a rewrite table (see [`TABLE_CONSTANTS`]).
pub fn is_table(name: &str) -> bool {
    TABLE_CONSTANTS.iter().any(|t| name.contains(t))
}
