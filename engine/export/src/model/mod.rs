//! The PerceiverIO concepts, each emitting graph nodes through the [`blocks::Builder`]: the
//! shared building blocks (linear, LayerNorm, attention, MLP, `PerceiverLayer`), the encoder
//! (cross-attention onto the latents, then the weight-shared latent blocks), the decoder
//! (output queries attending to the latents), the preprocessors, position encodings, and the
//! budget knobs the builder applies (kept latents, block repetitions).

pub mod blocks;
pub mod budget;
pub mod decoder;
pub mod encoder;
pub mod position;
pub mod preprocess;
