//! Quantisation arithmetic: int8 per-column codes, Q4_0 blocks, u8 activation parameters.

use super::*;

/// Per-output-channel symmetric int8 quantisation of a `[K, N]` weight: codes in -127..=127
/// (row-major like the weight) and one scale per column.
pub fn quantize_per_column(w: &[f32], k: usize, n: usize) -> (Vec<i8>, Vec<f32>) {
    quantize_per_column_bits(w, k, n, 8)
}

/// [`quantize_per_column`] in `bits` bits (2..=8): codes in `-(2^(bits-1) - 1)..=2^(bits-1) - 1`.
pub fn quantize_per_column_bits(w: &[f32], k: usize, n: usize, bits: u32) -> (Vec<i8>, Vec<f32>) {
    let top = ((1i32 << (bits - 1)) - 1) as f32;
    let mut scales = vec![0f32; n];
    for r in 0..k {
        for c in 0..n {
            scales[c] = scales[c].max(w[r * n + c].abs());
        }
    }
    for s in &mut scales {
        *s = if *s > 0.0 { *s / top } else { 1.0 };
    }
    let q = (0..k * n).map(|i| (w[i] / scales[i % n]).round().clamp(-top, top) as i8).collect();
    (q, scales)
}

/// Symmetric 4-bit block quantisation of a `[K, N]` weight in the `MatMulNBits` layout:
/// `B` is `[N, K/32, 16]` (two codes a byte, low nibble first; code 8 is zero) and one scale
/// per (column, block), rounded to f16 so every runtime dequantises identically.
pub fn quantize_q4(w: &[f32], k: usize, n: usize) -> (Vec<u8>, Vec<f32>) {
    let blocks = k / 32;
    let mut packed = vec![0u8; n * blocks * 16];
    let mut scales = vec![0f32; n * blocks];
    for c in 0..n {
        for b in 0..blocks {
            let vals: Vec<f32> = (0..32).map(|i| w[(b * 32 + i) * n + c]).collect();
            // Q4_0: the largest-magnitude value maps to code 0 (-8 * d), using the full range.
            let m = vals.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = f16::from_f32(m / -8.0).to_f32();
            scales[c * blocks + b] = d;
            for (i, v) in vals.iter().enumerate() {
                let q = if d == 0.0 { 8u8 } else { ((v / d).round() + 8.0).clamp(0.0, 15.0) as u8 };
                packed[(c * blocks + b) * 16 + i / 2] |= q << (4 * (i % 2));
            }
        }
    }
    (packed, scales)
}

/// Activation quantisation parameters: scale and u8 zero point of the range `[lo, hi]`
/// (widened to contain 0).
pub fn u8_params(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}
