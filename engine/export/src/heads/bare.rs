//! `PerceiverModel` over raw `[B, M, C]` inputs: its config.json cannot say what decoder it
//! has, so a sidecar file ([`DECODER_FILE`]) declares it; without one the graph outputs the
//! latents (`last_hidden_state`).

use super::{first_query, not_for, preprocess, subset_input, Head};
use crate::error::{Error, Result};
use crate::model::blocks::{Builder, LayerOpts};
use crate::model::decoder::{Decoder, Queries};
use crate::model::encoder::encode;
use crate::model::position::Fourier;
use crate::model::preprocess as pre;
use crate::options::ExportOptions;
use serde::Deserialize;
use std::path::Path;

/// Declares the decoder of a bare `PerceiverModel` checkpoint (its config.json cannot): the
/// arguments of transformers' `PerceiverBasicDecoder` that are not visible in the weights.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderDecl {
    /// `basic` (`decoder.*`, output `[B, O, F]`) or `classification` (`decoder.decoder.*`, `[B, F]`).
    #[serde(rename = "type", default = "default_basic")]
    pub kind: String,
    /// `trainable` or `fourier` output queries.
    pub position_encoding: String,
    /// Output index dimensions (O = their product); needed for Fourier queries.
    #[serde(default)]
    pub output_index_dims: Vec<usize>,
    /// Attention heads of the decoding cross-attention.
    #[serde(default = "one")]
    pub num_heads: usize,
    /// Query residual in the decoding cross-attention.
    #[serde(default)]
    pub use_query_residual: bool,
    /// Fourier parameters (for `fourier` queries).
    pub fourier: Option<FourierDecl>,
    /// Informational fields, checked against the weights where present.
    #[serde(default)]
    pub num_channels: Option<usize>,
    /// Output channels F (checked against `final_layer`).
    #[serde(default)]
    pub output_num_channels: Option<usize>,
    /// Ignored: qk width is read from the weights.
    #[serde(default)]
    pub qk_channels: Option<usize>,
    /// Ignored: v width is read from the weights.
    #[serde(default)]
    pub v_channels: Option<usize>,
    /// Ignored: the MLP width is read from the weights.
    #[serde(default)]
    pub widening_factor: Option<usize>,
    /// Ignored: presence of `final_layer` weights decides.
    #[serde(default)]
    pub final_project: Option<bool>,
    /// Ignored: presence of `positions_projection` weights decides.
    #[serde(default)]
    pub project_pos_dim: Option<i64>,
}

/// Fourier query parameters in a [`DecoderDecl`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FourierDecl {
    /// Bands per dimension.
    pub num_bands: usize,
    /// Max resolution per dimension.
    pub max_resolution: Vec<usize>,
    /// Prepend raw positions (default true).
    #[serde(default = "yes")]
    pub concat_pos: bool,
    /// Sines only (default false).
    #[serde(default)]
    pub sine_only: bool,
}

fn default_basic() -> String {
    "basic".into()
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}

/// File name of the bare-model decoder declaration inside a checkpoint directory.
pub const DECODER_FILE: &str = "perceiver_edge_decoder.json";

/// Reads a decoder declaration.
pub fn read_decoder_decl(path: &Path) -> Result<DecoderDecl> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let d: DecoderDecl =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid decoder declaration: {e}")))?;
    if !matches!(d.kind.as_str(), "basic" | "classification") {
        return Err(Error::file(
            path,
            format!("type \"{}\" is not supported (expected basic or classification)", d.kind),
        ));
    }
    match (d.position_encoding.as_str(), &d.fourier) {
        ("trainable", _) => {}
        ("fourier", Some(f))
            if !d.output_index_dims.is_empty() && f.max_resolution.len() == d.output_index_dims.len() => {}
        ("fourier", _) => {
            return Err(Error::file(
                path,
                "fourier queries need output_index_dims and fourier.max_resolution of the same length",
            ))
        }
        (other, _) => {
            return Err(Error::file(
                path,
                format!("position_encoding \"{other}\" is not supported (expected trainable or fourier)"),
            ))
        }
    }
    let zero_res = d.fourier.as_ref().is_some_and(|f| f.num_bands == 0 || f.max_resolution.contains(&0));
    if d.num_heads == 0 || d.output_index_dims.contains(&0) || zero_res {
        return Err(Error::file(
            path,
            "num_heads, output_index_dims, fourier.num_bands and fourier.max_resolution must be at least 1",
        ));
    }
    Ok(d)
}

/// Builds the bare-model graph: raw inputs (`--seq-len M` required), the declared decoder if any.
pub(super) fn build(b: &mut Builder, opts: &ExportOptions) -> Result<()> {
    let m = opts.seq_len.ok_or_else(|| {
        Error::invalid("a bare PerceiverModel takes raw [batch, M, d_model] inputs: give M with --seq-len")
    })?;
    let p = preprocess(b, |b| pre::raw(b, m, opts.attention_mask))?;
    let z = encode(b, &p.inputs, p.mask.as_ref())?;
    let decl_path = opts.decoder.clone().or_else(|| {
        let p = b.ck.dir.join(DECODER_FILE);
        p.is_file().then_some(p)
    });
    let has_decoder_weights = b.ck.has("decoder.decoding_cross_attention.attention.self.query.weight")
        || b.ck.has("decoder.decoder.decoding_cross_attention.attention.self.query.weight");
    match decl_path {
        None if has_decoder_weights => {
            return Err(Error::file(
                &b.ck.dir.join(DECODER_FILE),
                "missing: the checkpoint has decoder weights but no declaration of its decoder (see the README)",
            ))
        }
        None => {
            if opts.decode_subset.is_some() {
                return Err(not_for("--decode-subset (no decoder)", Head::Bare));
            }
            b.g.output(&z, "last_hidden_state");
        }
        Some(path) => {
            let d = read_decoder_decl(&path)?;
            let classification = d.kind == "classification";
            let queries = match d.position_encoding.as_str() {
                "fourier" => {
                    let f = d.fourier.clone().expect("validated");
                    Queries::Fourier(
                        Fourier {
                            num_bands: f.num_bands,
                            max_resolution: f.max_resolution,
                            concat_pos: f.concat_pos,
                            sine_only: f.sine_only,
                        },
                        d.output_index_dims.clone(),
                    )
                }
                _ => Queries::Trainable,
            };
            let dec = Decoder {
                prefix: if classification { "decoder.decoder".into() } else { "decoder".into() },
                queries,
                opts: LayerOpts { heads: d.num_heads, query_residual: d.use_query_residual },
            };
            let o = dec.num_outputs(b)?;
            if classification && opts.decode_subset.is_some() {
                return Err(Error::invalid("--decode-subset does not apply to a classification decoder"));
            }
            let idx = subset_input(b, opts.decode_subset, o)?;
            let y = b.scoped("decoder", |b| {
                let q = dec.query_array(b, idx.as_ref())?;
                let y = dec.decode(b, &q, &z)?;
                Ok(if classification { first_query(b, &y) } else { y })
            })?;
            if let Some(f) = d.output_num_channels {
                if y.last_dim() != f {
                    return Err(Error::file(
                        &path,
                        format!("output_num_channels is {f} but the decoder weights give {}", y.last_dim()),
                    ));
                }
            }
            b.g.output(&y, "logits");
        }
    }
    Ok(())
}
