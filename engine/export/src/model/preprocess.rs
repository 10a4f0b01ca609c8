//! Input preprocessors: turn the raw graph inputs into the `[B, M, C]` array the encoder
//! attends to (text embeddings, image pixels / conv stems with position features, flow
//! patches, multimodal video + audio, or raw sensor tokens).

use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Val};
use crate::model::blocks::Builder;
use crate::model::position::Fourier;

/// What a preprocessor hands to the encoder and decoders.
pub struct Preprocessed {
    /// Network inputs with position features, `[B, M, C]`.
    pub inputs: Val,
    /// Additive attention mask for the encoder cross-attention, `[B, 1, 1, M]`.
    pub mask: Option<Val>,
    /// Per-modality token counts, in concatenation order (multimodal only).
    pub modality_sizes: Vec<(String, usize)>,
}

impl Preprocessed {
    fn plain(inputs: Val) -> Preprocessed {
        Preprocessed { inputs, mask: None, modality_sizes: vec![] }
    }
}

/// Graph input `attention_mask` (`[B, M]`, int64, 1 = attend) as an additive `[B, 1, 1, M]` mask.
pub fn attention_mask(b: &mut Builder, m: usize) -> Val {
    let batch = b.batch;
    let g = &mut b.g;
    let mask = g.input("attention_mask", DType::I64, &[batch, m]);
    g.input_range("attention_mask", 0, 1);
    let f = g.cast(&mask, DType::F32);
    let one = g.scalar(1.0);
    let inv = g.binary("Sub", &one, &f);
    let add = g.mul_scalar(&inv, f32::MIN);
    g.reshape(&add, &[batch, 1, 1, m])
}

/// Concatenates constant position features `[M, P]` to per-batch inputs `[B, M, C]`.
fn concat_positions(b: &mut Builder, x: &Val, pos: &[f32], width: usize) -> Val {
    let (batch, m) = (x.shape[0], x.shape[1]);
    let p = b.g.const_f32("positions", &[1, m, width], pos);
    let p = b.g.expand(&p, &[batch, m, width]);
    b.g.concat(&[x, &p], 2)
}

/// `[B, C, H, W]` -> `[B, H*W, C]` (channels last, flattened).
fn channels_last(b: &mut Builder, x: &Val) -> Val {
    let (batch, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let t = b.g.transpose(x, &[0, 2, 3, 1]);
    b.g.reshape(&t, &[batch, h * w, c])
}

/// `PerceiverTextPreprocessor`: token + position embeddings, `input_ids` `[B, S]`.
pub fn text(b: &mut Builder, seq_len: usize, with_mask: bool) -> Result<Preprocessed> {
    let cfg = &b.ck.config;
    let (vocab, max_pos, c) = (cfg.vocab_size, cfg.max_position_embeddings, cfg.d_model);
    if seq_len == 0 || seq_len > max_pos {
        return Err(Error::invalid(format!("--seq-len {seq_len} must be in 1..={max_pos} (max_position_embeddings)")));
    }
    let ids = b.g.input("input_ids", DType::I64, &[b.batch, seq_len]);
    b.g.input_range("input_ids", 0, vocab as i64 - 1);
    let table = b.param("input_preprocessor.embeddings.weight", &[Some(vocab), Some(c)])?;
    let emb = b.g.gather(&table, &ids, 0);
    let pos = b.ck.get_shaped("input_preprocessor.position_embeddings.weight", &[Some(max_pos), Some(c)])?;
    let pos = b.g.const_f32("text_positions", &[1, seq_len, c], &pos.data[..seq_len * c]);
    let inputs = b.g.add(&emb, &pos);
    let mask = with_mask.then(|| attention_mask(b, seq_len));
    Ok(Preprocessed { inputs, mask, modality_sizes: vec![] })
}

fn pixel_input(b: &mut Builder, h: usize, w: usize) -> Val {
    b.g.input("pixel_values", DType::F32, &[b.batch, 3, h, w])
}

/// Fourier head (`prep_type="pixels"`): raw pixels + 2-D Fourier features (max resolution 224).
pub fn image_pixels(b: &mut Builder, h: usize, w: usize) -> Result<Preprocessed> {
    let x = pixel_input(b, h, w);
    let x = channels_last(b, &x);
    let f = Fourier { num_bands: 64, max_resolution: vec![224, 224], concat_pos: true, sine_only: false };
    Ok(Preprocessed::plain(concat_positions(b, &x, &f.grid(&[h, w])?, f.width())))
}

/// Learned head (`prep_type="conv1x1"`): 1x1 conv to 256 channels + projected trainable positions.
pub fn image_conv1x1(b: &mut Builder, h: usize, w: usize) -> Result<Preprocessed> {
    let x = pixel_input(b, h, w);
    let x = channels_last(b, &x);
    // A 1x1 convolution is a per-pixel linear layer.
    let wname = "input_preprocessor.convnet_1x1.weight";
    let cw = b.ck.get_shaped(wname, &[None, Some(3), Some(1), Some(1)])?;
    let out = cw.shape[0];
    let wt: Vec<f32> = (0..3).flat_map(|i| (0..out).map(move |o| (o, i))).map(|(o, i)| cw.data[o * 3 + i]).collect();
    let wt = b.g.const_f32("convnet_1x1_t", &[3, out], &wt);
    let y = b.g.matmul(&x, &wt);
    let bias = b.param("input_preprocessor.convnet_1x1.bias", &[Some(out)])?;
    let y = b.g.add(&y, &bias);
    let pname = "input_preprocessor.position_embeddings.position_embeddings";
    let pos = b.ck.get_shaped(pname, &[None, None])?;
    // Another resolution: transformers' `interpolate_pos_encoding=True` (bicubic resize of the
    // trained square grid); the same count in another shape is used as is, as transformers does.
    let table = if pos.shape[0] == h * w {
        pos.data.clone()
    } else {
        let side = (pos.shape[0] as f64).sqrt().round() as usize;
        if side * side != pos.shape[0] {
            return Err(Error::tensor(
                &pos.name,
                format!(
                    "holds {} positions, not a square grid, so a {h}x{w} image cannot be interpolated (use --image-size with {} pixels)",
                    pos.shape[0], pos.shape[0]
                ),
            ));
        }
        crate::model::position::bicubic_positions(&pos.data, side, pos.shape[1], h, w)
    };
    let (proj, width) = b.linear_const("input_preprocessor.positions_projection", &table, h * w)?;
    Ok(Preprocessed::plain(concat_positions(b, &y, &proj, width)))
}

/// Conv head (`prep_type="conv"`): 7x7/2 conv (pad 3), BatchNorm, ReLU, 3x3/2 max-pool, then
/// 2-D Fourier features of the pooled grid (max resolution 56).
pub fn image_conv(b: &mut Builder, h: usize, w: usize) -> Result<Preprocessed> {
    let x = pixel_input(b, h, w);
    let cw = b.param("input_preprocessor.convnet.conv.weight", &[None, Some(3), Some(7), Some(7)])?;
    let c = cw.shape[0];
    let (ho, wo) = ((h + 6 - 7) / 2 + 1, (w + 6 - 7) / 2 + 1);
    if ho < 3 || wo < 3 {
        return Err(Error::invalid(format!("image {h}x{w} is too small for the conv stem (needs at least 5x5)")));
    }
    let y = b.g.node(
        "Conv",
        &[&x, &cw],
        vec![
            ("kernel_shape", Attr::Ints(vec![7, 7])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("pads", Attr::Ints(vec![3, 3, 3, 3])),
        ],
        DType::F32,
        vec![b.batch, c, ho, wo],
    );
    let bn: Vec<Val> = ["weight", "bias", "running_mean", "running_var"]
        .iter()
        .map(|p| b.param(&format!("input_preprocessor.convnet.batchnorm.{p}"), &[Some(c)]))
        .collect::<Result<_>>()?;
    let y = b.g.node(
        "BatchNormalization",
        &[&y, &bn[0], &bn[1], &bn[2], &bn[3]],
        vec![("epsilon", Attr::Float(1e-5))],
        DType::F32,
        y.shape.clone(),
    );
    let y = b.g.unary("Relu", &y);
    let (hp, wp) = ((ho - 3) / 2 + 1, (wo - 3) / 2 + 1);
    let y = b.g.node(
        "MaxPool",
        &[&y],
        vec![("kernel_shape", Attr::Ints(vec![3, 3])), ("strides", Attr::Ints(vec![2, 2]))],
        DType::F32,
        vec![b.batch, c, hp, wp],
    );
    let y = channels_last(b, &y);
    let f = Fourier { num_bands: 64, max_resolution: vec![56, 56], concat_pos: true, sine_only: false };
    Ok(Preprocessed::plain(concat_positions(b, &y, &f.grid(&[hp, wp])?, f.width())))
}

/// Optical flow (`prep_type="patches"`): input `[B, 2, 27, H, W]`, frames folded into 54
/// channels, Linear 54 -> C, then 2-D Fourier features (max resolution = `train_size`).
pub fn flow_patches(b: &mut Builder, h: usize, w: usize) -> Result<Preprocessed> {
    let x = b.g.input("inputs", DType::F32, &[b.batch, 2, 27, h, w]);
    let t = b.g.transpose(&x, &[0, 3, 4, 1, 2]);
    let t = b.g.reshape(&t, &[b.batch, h * w, 54]);
    let y = b.linear("input_preprocessor.conv_after_patches", &t)?;
    let train = &b.ck.config.train_size;
    let f = Fourier { num_bands: 64, max_resolution: train.clone(), concat_pos: true, sine_only: false };
    Ok(Preprocessed::plain(concat_positions(b, &y, &f.grid(&[h, w])?, f.width())))
}

/// Bare `PerceiverModel` without a preprocessor: `inputs` `[B, M, d_model]` as given.
pub fn raw(b: &mut Builder, m: usize, with_mask: bool) -> Result<Preprocessed> {
    let c = b.ck.config.d_model;
    let inputs = b.g.input("inputs", DType::F32, &[b.batch, m, c]);
    let mask = with_mask.then(|| attention_mask(b, m));
    Ok(Preprocessed { inputs, mask, modality_sizes: vec![] })
}
