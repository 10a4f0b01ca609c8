//! `PerceiverForOpticalFlow`: two frames as 3x3 patches with Fourier positions; the decoder's
//! queries are the encoder's inputs, and the post-processing scales the flow by 1/100.

use super::{preprocess, subset_input};
use crate::error::{Error, Result};
use crate::model::blocks::{Builder, LayerOpts};
use crate::model::decoder::{Decoder, Queries};
use crate::model::encoder::encode;
use crate::model::preprocess as pre;
use crate::options::ExportOptions;

/// Builds the flow graph: `logits` `[B, H, W, 2]` (or `[B, K, 2]` with `--decode-subset`), at
/// the checkpoint's `train_size` only.
pub(super) fn build(b: &mut Builder, opts: &ExportOptions) -> Result<()> {
    let ck = b.ck;
    let cfg = &ck.config;
    let batch = b.batch;
    let (th, tw) = cfg.train_hw();
    let (h, w) = opts.image_size.unwrap_or((th, tw));
    if (h, w) != (th, tw) {
        return Err(Error::invalid(format!(
            "--image-size {h} {w}: the flow head decodes to train_size {th}x{tw}; export at that size"
        )));
    }
    let p = preprocess(b, |b| pre::flow_patches(b, h, w))?;
    b.g.marks.push((crate::model::decoder::MARK_QUERIES.into(), p.inputs.clone()));
    let z = encode(b, &p.inputs, None)?;
    let dec = Decoder {
        prefix: "decoder.decoder".into(),
        queries: Queries::Inputs(p.inputs.clone()),
        opts: LayerOpts { heads: 1, query_residual: false },
    };
    let idx = subset_input(b, opts.decode_subset, h * w)?;
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
    Ok(())
}
