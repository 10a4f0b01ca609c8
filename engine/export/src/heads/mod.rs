//! The one place that knows transformers' Perceiver heads: each `architectures` class maps to a
//! preprocessor, the shared encoder, a decoder and a postprocessor, with the sizes and fixed
//! hyper-parameters transformers hard-codes for it. One file per head family, each with its
//! post-processing; [`build_graph`] is the dispatch.

mod bare;
mod classification;
mod masked_lm;
pub(crate) mod multimodal;
mod optical_flow;

pub use bare::{read_decoder_decl, DecoderDecl, FourierDecl, DECODER_FILE};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::ir::{DType, Graph, Val};
use crate::metadata;
use crate::model::blocks::Builder;
use crate::model::budget::Budget;
use crate::model::preprocess::Preprocessed;
use crate::options::ExportOptions;
use crate::summary::Summary;

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

/// Runs preprocessor `f` in the `preprocess` scope.
fn preprocess(b: &mut Builder, f: impl FnOnce(&mut Builder) -> Result<Preprocessed>) -> Result<Preprocessed> {
    b.scoped("preprocess", f)
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

/// The error for option `what` given to a head it does not apply to.
fn not_for(what: &str, head: Head) -> Error {
    Error::invalid(format!("{what} does not apply to {}", head.class_name()))
}

/// Builds the fixed-shape graph of checkpoint `ck` (before any pass) and its summary.
pub fn build_graph(ck: &Checkpoint, opts: &ExportOptions) -> Result<(Graph, Summary)> {
    build(ck, opts, false)
}

/// [`build_graph`] with the weight matrices left on disk
/// ([`crate::model::blocks::DEFERRED_MIN_ELEMENTS`] elements or more): their constants are
/// stripped, and the graph reads each back from the checkpoint when asked
/// ([`Graph::restore`]), so the passes and the quantiser can work without holding them all.
pub fn build_graph_deferred(ck: &Checkpoint, opts: &ExportOptions) -> Result<(Graph, Summary)> {
    let (mut g, summary) = build(ck, opts, true)?;
    let tensors = ck.tensors(g.stripped().map(|(n, _)| crate::model::blocks::tensor_of_key(n).0));
    g.defer(move |name, shape| crate::model::blocks::read_back(&tensors, name, shape));
    Ok((g, summary))
}

fn build(ck: &Checkpoint, opts: &ExportOptions, defer_weights: bool) -> Result<(Graph, Summary)> {
    let head = Head::of(ck)?;
    let batch = opts.batch.unwrap_or(1);
    if batch == 0 {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    let cfg = &ck.config;
    let uses = |set: bool, what: &str, heads: &[Head]| -> Result<()> {
        if set && !heads.contains(&head) {
            return Err(not_for(what, head));
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
    b.defer_weights = defer_weights;
    b.budget = Budget::from_options(ck, opts)?;
    b.grid_subset = opts.grid_subset;
    let (h, w) = opts.image_size.unwrap_or_else(|| cfg.image_hw());
    if h == 0 || w == 0 || opts.seq_len == Some(0) {
        return Err(Error::invalid("--image-size and --seq-len must be positive"));
    }
    match head {
        ImageLearned | ImageFourier | ImageConv | SequenceClassification => {
            classification::build(&mut b, head, opts, (h, w))?
        }
        MaskedLm => masked_lm::build(&mut b, opts)?,
        OpticalFlow => optical_flow::build(&mut b, opts)?,
        MultimodalAutoencoding => multimodal::build(&mut b, opts)?,
        Bare => bare::build(&mut b, opts)?,
    }
    for (i, (prefix, probs)) in std::mem::take(&mut b.attention_probs).into_iter().enumerate() {
        b.g.output(&probs, &format!("{}.{i}.{prefix}", metadata::PROBS_OUTPUT));
    }
    if let Some(e) = b.g.error.take() {
        return Err(Error::invalid(format!("{}: {e}", ck.dir.display())));
    }
    let mut g = b.g;
    g.prune();
    let mut summary = Summary::new(&g, head.class_name(), &b.dims, cfg, batch, ck.parameter_count());
    summary.depth.0 = b.budget.blocks.unwrap_or(cfg.num_blocks);
    Ok((g, summary))
}
