//! The one place that knows transformers' Perceiver heads: each `architectures` class maps to a
//! preprocessor, the shared encoder, a decoder and a postprocessor, with the sizes and fixed
//! hyper-parameters transformers hard-codes for it.

use crate::blocks::{Builder, LayerOpts};
use crate::checkpoint::Checkpoint;
use crate::decoder::{Decoder, Queries};
use crate::encoder::encode;
use crate::error::{Error, Result};
use crate::graph::{DType, Graph, Val};
use crate::position::Fourier;
use crate::summary::Summary;
use crate::{multimodal, preprocess};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The Perceiver head classes perceiver-edge exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// `PerceiverForImageClassificationLearned`.
    ImageLearned,
    /// `PerceiverForImageClassificationFourier`.
    ImageFourier,
    /// `PerceiverForImageClassificationConvProcessing`.
    ImageConv,
    /// `PerceiverForMaskedLM`.
    MaskedLm,
    /// `PerceiverForSequenceClassification`.
    SequenceClassification,
    /// `PerceiverForOpticalFlow`.
    OpticalFlow,
    /// `PerceiverForMultimodalAutoencoding`.
    MultimodalAutoencoding,
    /// `PerceiverModel` over raw `[B, M, C]` inputs, decoder declared in a sidecar file.
    Bare,
}

impl Head {
    /// All heads with their transformers class names.
    pub const ALL: [(Head, &'static str); 8] = [
        (Head::ImageLearned, "PerceiverForImageClassificationLearned"),
        (Head::ImageFourier, "PerceiverForImageClassificationFourier"),
        (Head::ImageConv, "PerceiverForImageClassificationConvProcessing"),
        (Head::MaskedLm, "PerceiverForMaskedLM"),
        (Head::SequenceClassification, "PerceiverForSequenceClassification"),
        (Head::OpticalFlow, "PerceiverForOpticalFlow"),
        (Head::MultimodalAutoencoding, "PerceiverForMultimodalAutoencoding"),
        (Head::Bare, "PerceiverModel"),
    ];

    /// The head of a checkpoint, from `config.json`'s `architectures`.
    pub fn of(ck: &Checkpoint) -> Result<Head> {
        let arch = ck.architecture()?;
        Head::ALL.iter().find(|(_, n)| *n == arch).map(|(h, _)| *h).ok_or_else(|| {
            let known: Vec<&str> = Head::ALL.iter().map(|(_, n)| *n).collect();
            Error::file(
                &ck.dir.join("config.json"),
                format!("unknown architecture \"{arch}\" (expected one of: {})", known.join(", ")),
            )
        })
    }

    /// The transformers class name.
    pub fn class_name(self) -> &'static str {
        Head::ALL.iter().find(|(h, _)| *h == self).map(|(_, n)| *n).unwrap_or("?")
    }
}

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
    pub perf: crate::passes::PerfOptions,
    /// `--latents K`: indices of the trained latents to keep, strictly ascending (choose them
    /// with [`crate::budget::latent_importance`] and [`crate::budget::select_latents`]).
    pub latents: Option<Vec<usize>>,
    /// `--blocks B`: repetitions of the weight-shared latent block (default `num_blocks`).
    pub blocks: Option<usize>,
    /// Calibration: expose every attention's probabilities as extra outputs
    /// (`attention_probs.{i}.{checkpoint prefix}`).
    pub expose_attention: bool,
}

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
    Ok(d)
}

fn classification_decoder(prefix: &str, d_latents_heads: usize, residual: bool) -> Decoder {
    Decoder {
        prefix: prefix.into(),
        queries: Queries::Trainable,
        opts: LayerOpts { heads: d_latents_heads, query_residual: residual },
    }
}

/// `[B, 1, F]` -> `[B, F]` (transformers' `logits[:, 0, :]`).
fn first_query(b: &mut Builder, y: &Val) -> Val {
    let shape = [y.shape[0], y.shape[2]];
    b.g.reshape(y, &shape)
}

/// The `output_indices` input (`[K]`, values in `0..max`) of `--decode-subset K`.
fn subset_input(b: &mut Builder, k: Option<usize>, max: usize) -> Result<Option<Val>> {
    let what = "decode-subset";
    match k {
        None => Ok(None),
        Some(k) if k == 0 || k > max => {
            Err(Error::invalid(format!("--{what} {k} must be in 1..={max} (the number of output positions)")))
        }
        Some(k) => {
            b.g.input_range("output_indices", 0, max as i64 - 1);
            Ok(Some(b.g.input("output_indices", DType::I64, &[k])))
        }
    }
}

/// Builds the fixed-shape graph of checkpoint `ck` (before any pass) and its summary.
pub fn build_graph(ck: &Checkpoint, opts: &ExportOptions) -> Result<(Graph, Summary)> {
    let head = Head::of(ck)?;
    let batch = opts.batch.unwrap_or(1);
    if batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    let cfg = &ck.config;
    let uses = |set: bool, what: &str, heads: &[Head]| -> Result<()> {
        if set && !heads.contains(&head) {
            return Err(Error::invalid(format!("{what} does not apply to {}", head.class_name())));
        }
        Ok(())
    };
    use Head::*;
    uses(
        opts.image_size.is_some(),
        "--image-size",
        &[ImageLearned, ImageFourier, ImageConv, OpticalFlow, MultimodalAutoencoding],
    )?;
    uses(opts.seq_len.is_some(), "--seq-len", &[MaskedLm, SequenceClassification, Bare])?;
    uses(opts.attention_mask, "--attention-mask", &[MaskedLm, SequenceClassification, Bare])?;
    uses(opts.decode_subset.is_some(), "--decode-subset", &[MaskedLm, OpticalFlow, Bare])?;
    uses(
        opts.image_points.is_some() || opts.audio_points.is_some(),
        "--image-points/--audio-points",
        &[MultimodalAutoencoding],
    )?;
    uses(opts.decoder.is_some(), "--decoder", &[Bare])?;

    let mut b = Builder::new(ck, batch);
    b.budget = crate::budget::Budget::from_options(ck, opts)?;
    let (h, w) = opts.image_size.unwrap_or_else(|| cfg.image_hw());
    if h == 0 || w == 0 || opts.seq_len == Some(0) {
        return Err(Error::invalid("--image-size and --seq-len must be positive"));
    }
    let pre = |b: &mut Builder, f: &dyn Fn(&mut Builder) -> Result<preprocess::Preprocessed>| {
        b.scoped("preprocess", |b| f(b))
    };
    let cls_heads = 1;
    match head {
        ImageLearned | ImageFourier | ImageConv | SequenceClassification => {
            let p = match head {
                ImageLearned => pre(&mut b, &|b| preprocess::image_conv1x1(b, h, w))?,
                ImageFourier => pre(&mut b, &|b| preprocess::image_pixels(b, h, w))?,
                ImageConv => pre(&mut b, &|b| preprocess::image_conv(b, h, w))?,
                _ => {
                    let s = opts.seq_len.unwrap_or(cfg.max_position_embeddings);
                    pre(&mut b, &|b| preprocess::text(b, s, opts.attention_mask))?
                }
            };
            let z = encode(&mut b, &p.inputs, p.mask.as_ref())?;
            let dec = classification_decoder("decoder.decoder", cls_heads, true);
            let y = b.scoped("decoder", |b| {
                let q = dec.query_array(b, None)?;
                let y = dec.decode(b, &q, &z)?;
                Ok(first_query(b, &y))
            })?;
            b.g.output(&y, "logits");
        }
        MaskedLm => {
            let s = opts.seq_len.unwrap_or(cfg.max_position_embeddings);
            let p = pre(&mut b, &|b| preprocess::text(b, s, opts.attention_mask))?;
            let z = encode(&mut b, &p.inputs, p.mask.as_ref())?;
            let dec = Decoder {
                prefix: "decoder".into(),
                queries: Queries::Trainable,
                opts: LayerOpts { heads: 8, query_residual: false },
            };
            let o = dec.num_outputs(&b)?;
            let idx = subset_input(&mut b, opts.decode_subset, o)?;
            let y = b.scoped("decoder", |b| {
                let q = dec.query_array(b, idx.as_ref())?;
                dec.decode(b, &q, &z)
            })?;
            let logits = b.scoped("postprocess", |b| {
                let (v, c) = (cfg.vocab_size, cfg.d_model);
                let emb = b.ck.get_shaped("input_preprocessor.embeddings.weight", &[Some(v), Some(c)])?.clone();
                let mut t = vec![0f32; v * c];
                for i in 0..v {
                    for j in 0..c {
                        t[j * v + i] = emb.data[i * c + j];
                    }
                }
                let wt = b.g.const_f32("embedding_decoder_t", &[c, v], &t);
                let y = b.g.matmul(&y, &wt);
                let bias = b.ck.get_top("embedding_decoder.bias")?.clone();
                crate::checkpoint::check_shape(&bias, &[Some(v)])?;
                let bias = b.g.const_f32("embedding_decoder.bias", &[v], &bias.data);
                Ok(b.g.add(&y, &bias))
            })?;
            b.g.output(&logits, "logits");
        }
        OpticalFlow => {
            let (th, tw) = (cfg.train_size[0], cfg.train_size.get(1).copied().unwrap_or(cfg.train_size[0]));
            let (h, w) = opts.image_size.unwrap_or((th, tw));
            if (h, w) != (th, tw) {
                return Err(Error::invalid(format!(
                    "--image-size {h} {w}: the flow head decodes to train_size {th}x{tw}; export at that size"
                )));
            }
            let p = pre(&mut b, &|b| preprocess::flow_patches(b, h, w))?;
            let z = encode(&mut b, &p.inputs, None)?;
            let dec = Decoder {
                prefix: "decoder.decoder".into(),
                queries: Queries::Inputs(p.inputs.clone()),
                opts: LayerOpts { heads: 1, query_residual: false },
            };
            let idx = subset_input(&mut b, opts.decode_subset, h * w)?;
            let y = b.scoped("decoder", |b| {
                let q = dec.query_array(b, idx.as_ref())?;
                dec.decode(b, &q, &z)
            })?;
            let y = b.scoped("postprocess", |b| {
                let r = b.g.mul_scalar(&y, 1.0 / 100.0);
                let c = r.last_dim();
                Ok(if idx.is_some() { r } else { b.g.reshape(&r, &[batch, h, w, c]) })
            })?;
            b.g.output(&y, "logits");
        }
        MultimodalAutoencoding => multimodal::build(&mut b, opts)?,
        Bare => {
            let m = opts.seq_len.ok_or_else(|| {
                Error::invalid("a bare PerceiverModel takes raw [batch, M, d_model] inputs: give M with --seq-len")
            })?;
            let p = pre(&mut b, &|b| preprocess::raw(b, m, opts.attention_mask))?;
            let z = encode(&mut b, &p.inputs, p.mask.as_ref())?;
            let decl_path = opts.decoder.clone().or_else(|| {
                let p = ck.dir.join(DECODER_FILE);
                p.is_file().then_some(p)
            });
            let has_decoder_weights = ck.has("decoder.decoding_cross_attention.attention.self.query.weight")
                || ck.has("decoder.decoder.decoding_cross_attention.attention.self.query.weight");
            match decl_path {
                None if has_decoder_weights => return Err(Error::file(
                    &ck.dir.join(DECODER_FILE),
                    "missing: the checkpoint has decoder weights but no declaration of its decoder (see the README)",
                )),
                None => {
                    uses(opts.decode_subset.is_some(), "--decode-subset (no decoder)", &[])?;
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
                    let o = dec.num_outputs(&b)?;
                    if classification && opts.decode_subset.is_some() {
                        return Err(Error::invalid("--decode-subset does not apply to a classification decoder"));
                    }
                    let idx = subset_input(&mut b, opts.decode_subset, o)?;
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
        }
    }
    for (i, (prefix, probs)) in std::mem::take(&mut b.attention_probs).into_iter().enumerate() {
        b.g.output(&probs, &format!("{}.{i}.{prefix}", crate::budget::PROBS_OUTPUT));
    }
    let mut g = b.g;
    g.prune();
    let mut summary = Summary::new(&g, head.class_name(), &b.dims, cfg, batch, ck.parameter_count());
    summary.depth.0 = b.budget.blocks.unwrap_or(cfg.num_blocks);
    Ok((g, summary))
}
