//! `PerceiverForMultimodalAutoencoding`: video + audio (+ a label that transformers always
//! masks) encoded together, decoded in chunks of output points chosen by index inputs, the
//! way transformers' `subsampled_output_points` does it.

use crate::error::{Error, Result};
use crate::ir::{DType, Val};
use crate::model::blocks::{Builder, LayerOpts};
use crate::model::decoder::{Decoder, Queries};
use crate::model::encoder::encode;
use crate::model::position::{fourier_at_indices, Fourier, IndexPositions};
use crate::options::ExportOptions;

/// Name of the index input choosing video points (flat indices into `image_logits`' points).
pub const IMAGE_POINTS: &str = "image_points";
/// Name of the index input choosing audio patches (`samples_per_patch` values of `audio_logits` each).
pub const AUDIO_POINTS: &str = "audio_points";

/// The chunked-decoding index inputs: (input name, positions of a full decode, the output whose
/// positions it chooses), video points first.
pub fn point_inputs(cfg: &crate::checkpoint::PerceiverConfig) -> [(&'static str, usize, &'static str); 2] {
    let images = cfg.output_shape.iter().skip(1).fold(1usize, |a, &d| a.saturating_mul(d));
    let audio = cfg.num_frames.saturating_mul(cfg.audio_samples_per_frame) / cfg.samples_per_patch.max(1);
    [(IMAGE_POINTS, images, "image_logits"), (AUDIO_POINTS, audio, "audio_logits")]
}

/// Fourier queries `[K, width]` of the points `idx` (in-graph; rows of the full grid when the
/// builder decodes grid subsets, else transformers' subsampled positions), or of the whole grid
/// (constant).
fn fourier_queries(b: &mut Builder, f: &Fourier, idx: Option<&Val>, dims: &[usize]) -> Result<Val> {
    let at = if b.grid_subset { IndexPositions::Grid } else { IndexPositions::Subsampled };
    Ok(match idx {
        Some(idx) => fourier_at_indices(&mut b.g, f, idx, dims, at),
        None => {
            let rows = dims.iter().product();
            b.g.const_f32("queries", &[rows, f.width()], &f.grid(dims)?)
        }
    })
}

/// Pads `x` (`[B, M, c]`) to `width` channels with the trainable vector `pad_name` (`[1, width - c]`).
fn pad(b: &mut Builder, x: &Val, pad_name: &str, width: usize) -> Result<Val> {
    let c = x.last_dim();
    let p = b.param(pad_name, &[Some(1), Some(width - c)])?;
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = width - c;
    let p = b.g.expand(&p, &shape);
    Ok(b.g.concat(&[x, &p], x.shape.len() - 1))
}

/// Video position features: 3-D, 32 bands, max resolution (frames, image_size, image_size).
fn video_fourier(cfg: &crate::checkpoint::PerceiverConfig) -> Fourier {
    let s = cfg.image_hw().0;
    Fourier { num_bands: 32, max_resolution: vec![cfg.num_frames, s, s], concat_pos: true, sine_only: false }
}

/// Builds the multimodal graph: inputs `image` `[B, T, 3, H, W]`, `audio` `[B, S, 1]`, and with
/// chunked decoding `image_points` `[Ki]` / `audio_points` `[Ka]`; outputs `audio_logits`
/// `[B, Ka * samples_per_patch]`, `image_logits` `[B, Ki, 3]`, `label_logits` `[B, num_labels]`
/// (Ki, Ka = every point without chunking).
pub fn build(b: &mut Builder, opts: &ExportOptions) -> Result<()> {
    let cfg = b.ck.config.clone();
    let batch = b.batch;
    let (t, spp) = (cfg.num_frames, cfg.samples_per_patch);
    let (h, w) = opts.image_size.unwrap_or_else(|| cfg.image_hw());
    let n_audio = cfg.num_frames.saturating_mul(cfg.audio_samples_per_frame);
    let sizes = [
        ("num_frames", t),
        ("samples_per_patch", spp),
        ("audio_samples_per_frame", cfg.audio_samples_per_frame),
        ("output_num_channels", cfg.output_num_channels),
    ];
    if let Some((k, _)) = sizes.iter().find(|(_, v)| *v == 0) {
        return Err(Error::file(&b.ck.dir.join("config.json"), format!("{k} is 0, expected at least 1")));
    }
    if cfg.output_shape.contains(&0) {
        return Err(Error::file(
            &b.ck.dir.join("config.json"),
            "output_shape has a 0 entry, expected sizes of at least 1",
        ));
    }
    if !h.is_multiple_of(4) || !w.is_multiple_of(4) || !n_audio.is_multiple_of(spp) || cfg.output_shape.len() != 4 {
        return Err(Error::invalid(format!(
            "multimodal: image {h}x{w} must be divisible by 4, audio samples {n_audio} by samples_per_patch {spp}, and output_shape have 4 entries"
        )));
    }
    let common = b.ck.get_shaped("input_preprocessor.mask.image", &[Some(1), None])?.shape[1];

    // Preprocessing: audio patches and video patches with Fourier features, padded to a common
    // width, then the always-masked label token; concatenated in sorted order (audio, image, label).
    let video = b.g.input("image", DType::F32, &[batch, t, 3, h, w]);
    let audio = b.g.input("audio", DType::F32, &[batch, n_audio, 1]);
    let x = b.scoped("preprocess", |b| {
        let na = n_audio / spp;
        let a = b.g.reshape(&audio, &[batch, na, spp]);
        let fa = Fourier { num_bands: 192, max_resolution: vec![n_audio], concat_pos: true, sine_only: false };
        let pa = b.g.const_f32("audio_positions", &[1, na, fa.width()], &fa.grid(&[na])?);
        let pa = b.g.expand(&pa, &[batch, na, fa.width()]);
        let a = b.g.concat(&[&a, &pa], 2);
        let a = pad(b, &a, "input_preprocessor.padding.audio", common)?;

        let (hb, wb) = (h / 4, w / 4);
        // transformers' space_to_depth (block 4): [B*T, 3, Hb, 4, Wb, 4] -> [B*T, Hb, Wb, 4, 4, 3].
        let v = b.g.reshape(&video, &[batch * t, 3, hb, 4, wb, 4]);
        let v = b.g.transpose(&v, &[0, 2, 4, 3, 5, 1]);
        let ni = t * hb * wb;
        let v = b.g.reshape(&v, &[batch, ni, 48]);
        let fi = video_fourier(&cfg);
        let pi = b.g.const_f32("image_positions", &[1, ni, fi.width()], &fi.grid(&[t, hb, wb])?);
        let pi = b.g.expand(&pi, &[batch, ni, fi.width()]);
        let v = b.g.concat(&[&v, &pi], 2);
        let v = pad(b, &v, "input_preprocessor.padding.image", common)?;

        let label = b.param_as("input_preprocessor.mask.label", &[Some(1), Some(common)], &[1, 1, common])?;
        let label = b.g.expand(&label, &[batch, 1, common]);
        Ok(b.g.concat(&[&a, &v, &label], 1))
    })?;
    let z = encode(b, &x, None)?;

    // Decoder queries: Fourier features of the audio patches and video points (all of them on
    // the linspace grid, or the chunk chosen by an index input), and the trainable label query,
    // each padded to the decoder's query width.
    let out_dims = cfg.output_shape[1..].to_vec();
    let [(_, total_img, _), (_, total_audio, _)] = point_inputs(&cfg);
    for (k, total, what) in
        [(opts.image_points, total_img, "--image-points"), (opts.audio_points, total_audio, "--audio-points")]
    {
        if k.is_some_and(|k| k == 0 || k > total) {
            return Err(Error::invalid(format!("{what} must be in 1..={total}")));
        }
    }
    let image_idx = opts.image_points.map(|k| b.g.input(IMAGE_POINTS, DType::I64, &[k]));
    let audio_idx = opts.audio_points.map(|k| b.g.input(AUDIO_POINTS, DType::I64, &[k]));
    b.g.input_range(IMAGE_POINTS, 0, total_img as i64 - 1);
    b.g.input_range(AUDIO_POINTS, 0, total_audio as i64 - 1);
    let (ki, ka) = (opts.image_points.unwrap_or(total_img), opts.audio_points.unwrap_or(total_audio));
    let label_q = "decoder.modalities.label.decoder.output_position_encodings.position_embeddings";
    let qwidth = b.ck.get_shaped("decoder.padding.label", &[Some(1), None])?.shape[1]
        + b.ck.get_shaped(label_q, &[Some(1), None])?.shape[1];
    let y = b.scoped("decoder", |b| {
        let fa = Fourier { num_bands: 192, max_resolution: vec![n_audio], concat_pos: true, sine_only: false };
        let qa = fourier_queries(b, &fa, audio_idx.as_ref(), &[total_audio])?;
        let qa = pad(b, &qa, "decoder.padding.audio", qwidth)?;
        let qi = fourier_queries(b, &video_fourier(&cfg), image_idx.as_ref(), &out_dims)?;
        let qi = pad(b, &qi, "decoder.padding.image", qwidth)?;
        let ql = b.param(label_q, &[Some(1), None])?;
        let ql = pad(b, &ql, "decoder.padding.label", qwidth)?;
        let q = b.g.concat(&[&qa, &qi, &ql], 0);
        let q = b.g.reshape(&q, &[1, ka + ki + 1, qwidth]);
        let dec = Decoder {
            prefix: "decoder.decoder".into(),
            queries: Queries::Inputs(q.clone()),
            opts: LayerOpts { heads: 1, query_residual: false },
        };
        dec.decode(b, &q, &z)
    })?;

    // Postprocessing: split the decoded points by modality and project each.
    b.scoped("postprocess", |b| {
        let f = y.last_dim();
        let split = |b: &mut Builder, start: usize, len: usize| -> Val {
            let idx: Vec<i64> = (start..start + len).map(|i| i as i64).collect();
            let idx = b.g.const_i64("split", &idx);
            b.g.gather(&y, &idx, 1)
        };
        let ya = split(b, 0, ka);
        let ya = b.linear("output_postprocessor.modalities.audio.classifier", &ya)?;
        let ya = b.g.reshape(&ya, &[batch, ka * ya.last_dim()]);
        let yi = split(b, ka, ki);
        let yi = b.linear("output_postprocessor.modalities.image.classifier", &yi)?;
        let yl = split(b, ka + ki, 1);
        let yl = b.linear("output_postprocessor.modalities.label.classifier", &yl)?;
        let yl = b.g.reshape(&yl, &[batch, yl.last_dim()]);
        debug_assert_eq!(f, y.last_dim());
        b.g.output(&ya, "audio_logits");
        b.g.output(&yi, "image_logits");
        b.g.output(&yl, "label_logits");
        Ok(())
    })
}
