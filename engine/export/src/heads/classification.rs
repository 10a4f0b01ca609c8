//! Classification heads: `PerceiverForImageClassificationLearned`, `-Fourier`,
//! `-ConvProcessing` and `PerceiverForSequenceClassification`. One trainable query decodes
//! `logits` `[B, num_labels]`.

use super::{first_query, preprocess, Head};
use crate::error::Result;
use crate::model::blocks::{Builder, LayerOpts};
use crate::model::decoder::{Decoder, Queries};
use crate::model::encoder::encode;
use crate::model::preprocess as pre;
use crate::options::ExportOptions;

/// Builds a classification head at image size `(h, w)` (images) or `--seq-len` (text).
pub(super) fn build(b: &mut Builder, head: Head, opts: &ExportOptions, (h, w): (usize, usize)) -> Result<()> {
    let p = match head {
        Head::ImageLearned => preprocess(b, |b| pre::image_conv1x1(b, h, w))?,
        Head::ImageFourier => preprocess(b, |b| pre::image_pixels(b, h, w))?,
        Head::ImageConv => preprocess(b, |b| pre::image_conv(b, h, w))?,
        _ => {
            let s = opts.seq_len.unwrap_or(b.ck.config.max_position_embeddings);
            preprocess(b, |b| pre::text(b, s, opts.attention_mask))?
        }
    };
    let z = encode(b, &p.inputs, p.mask.as_ref())?;
    let dec = Decoder {
        prefix: "decoder.decoder".into(),
        queries: Queries::Trainable,
        opts: LayerOpts { heads: 1, query_residual: true },
    };
    let y = b.scoped("decoder", |b| {
        let q = dec.query_array(b, None)?;
        let y = dec.decode(b, &q, &z)?;
        Ok(first_query(b, &y))
    })?;
    b.g.output(&y, "logits");
    Ok(())
}
