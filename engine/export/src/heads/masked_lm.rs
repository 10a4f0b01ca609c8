//! `PerceiverForMaskedLM`: text in, one trainable query per position, and the
//! post-processing transformers applies (logits through the transposed input embeddings).

use super::{preprocess, subset_input};
use crate::checkpoint::check_shape;
use crate::error::Result;
use crate::model::blocks::{Builder, LayerOpts};
use crate::model::decoder::{Decoder, Queries};
use crate::model::encoder::encode;
use crate::model::preprocess as pre;
use crate::options::ExportOptions;

/// Builds the masked-LM graph: `logits` `[B, S, vocab]` (or `[B, K, vocab]` with `--decode-subset`).
pub(super) fn build(b: &mut Builder, opts: &ExportOptions) -> Result<()> {
    let cfg = b.ck.config.clone();
    let s = opts.seq_len.unwrap_or(cfg.max_position_embeddings);
    let p = preprocess(b, |b| pre::text(b, s, opts.attention_mask))?;
    let z = encode(b, &p.inputs, p.mask.as_ref())?;
    let dec = Decoder {
        prefix: "decoder".into(),
        queries: Queries::Trainable,
        opts: LayerOpts { heads: 8, query_residual: false },
    };
    let o = dec.num_outputs(b)?;
    let idx = subset_input(b, opts.decode_subset, o)?;
    let y = b.scoped("decoder", |b| {
        let q = dec.query_array(b, idx.as_ref())?;
        dec.decode(b, &q, &z)
    })?;
    let logits = b.scoped("postprocess", |b| {
        let (v, c) = (cfg.vocab_size, cfg.d_model);
        let emb = b.ck.get_shaped("input_preprocessor.embeddings.weight", &[Some(v), Some(c)])?;
        let mut t = vec![0f32; v * c];
        for i in 0..v {
            for j in 0..c {
                t[j * v + i] = emb.data[i * c + j];
            }
        }
        let wt = b.g.const_f32("embedding_decoder_t", &[c, v], &t);
        let y = b.g.matmul(&y, &wt);
        let bias = b.ck.get_top("embedding_decoder.bias")?;
        check_shape(&bias, &[Some(v)])?;
        let bias = b.g.const_f32("embedding_decoder.bias", &[v], &bias.data);
        Ok(b.g.add(&y, &bias))
    })?;
    b.g.output(&logits, "logits");
    Ok(())
}
