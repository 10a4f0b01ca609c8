//! The marker model's input and output conventions (see models/marker/README.md): tokens from
//! a frame, and the marker position from the heat map the output queries decode.

use crate::scene::{PIXELS, SIZE};

/// Fourier bands of the input position features.
pub const NUM_BANDS: usize = 6;
/// Position feature width: 2 raw coordinates + sin and cos of 2 x 6 bands.
pub const POS_WIDTH: usize = 2 + 2 * 2 * NUM_BANDS;
/// Token width: intensity + position features.
pub const TOKEN_WIDTH: usize = 1 + POS_WIDTH;

/// `torch.linspace(start, end, steps)` in f32 (torch's two-sided formula).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// transformers' Fourier position features of the 16x16 grid (`build_linear_positions` +
/// `generate_fourier_features`, 6 bands, max resolution 16, positions concatenated), `[256 * 26]`.
pub fn position_table() -> Vec<f32> {
    let axis = linspace(-1.0, 1.0, SIZE);
    let bands = linspace(1.0, SIZE as f32 / 2.0, NUM_BANDS);
    let mut out = Vec::with_capacity(PIXELS * POS_WIDTH);
    for i in 0..SIZE {
        for j in 0..SIZE {
            let p = [axis[i], axis[j]];
            let f: Vec<f32> =
                p.iter().flat_map(|&c| bands.iter().map(move |&b| std::f32::consts::PI * (c * b))).collect();
            out.extend_from_slice(&p);
            out.extend(f.iter().map(|&x| (x as f64).sin() as f32));
            out.extend(f.iter().map(|&x| (x as f64).cos() as f32));
        }
    }
    out
}

/// Builds model input tokens `[256 * 27]` (intensity, then the position features) in place.
pub fn fill_tokens(frame: &[f32; PIXELS], table: &[f32], tokens: &mut [f32]) {
    for (k, tok) in tokens.chunks_exact_mut(TOKEN_WIDTH).enumerate() {
        tok[0] = frame[k];
        tok[1..].copy_from_slice(&table[k * POS_WIDTH..(k + 1) * POS_WIDTH]);
    }
}

/// Marker centre (x, y) in pixels and the heat map's peak probability, from heat-map logits
/// `[256]`: softmax, arg-max, then the probability-weighted centroid of the 3x3 window around
/// it (clipped at the border). Same as `locate` in models/train_marker.py.
pub fn locate(logits: &[f32]) -> ([f64; 2], f64) {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    let p = |k: usize| (logits[k] as f64 - m).exp() / z;
    let best = (0..logits.len()).fold(0, |b, k| if logits[k] > logits[b] { k } else { b });
    let (i, j) = (best / SIZE, best % SIZE);
    let (mut w, mut sx, mut sy) = (0.0, 0.0, 0.0);
    for ii in i.saturating_sub(1)..(i + 2).min(SIZE) {
        for jj in j.saturating_sub(1)..(j + 2).min(SIZE) {
            let q = p(ii * SIZE + jj);
            w += q;
            sx += q * jj as f64;
            sy += q * ii as f64;
        }
    }
    ([sx / w, sy / w], p(best))
}
