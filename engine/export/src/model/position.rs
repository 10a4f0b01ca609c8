//! Position encodings. Fourier features depend only on the (fixed) index shape, so they are
//! computed here, in f32 exactly as torch does, and enter the graph as constants. For decoding
//! an arbitrary subset of output positions, [`fourier_at_indices`] emits the same features as
//! graph nodes computed from an index input.

use crate::ir::{DType, Graph, Val};

/// Parameters of transformers' `PerceiverFourierPositionEncoding`.
#[derive(Clone, Debug, PartialEq)]
pub struct Fourier {
    /// Frequency bands per dimension.
    pub num_bands: usize,
    /// Resolution the bands are scaled to, one per index dimension.
    pub max_resolution: Vec<usize>,
    /// Prepend the raw positions.
    pub concat_pos: bool,
    /// Only sines (no cosines).
    pub sine_only: bool,
}

impl Fourier {
    /// Output width: `d * bands * (1 or 2) + (d if concat_pos)`.
    pub fn width(&self) -> usize {
        let d = self.max_resolution.len();
        d * self.num_bands * if self.sine_only { 1 } else { 2 } + if self.concat_pos { d } else { 0 }
    }

    /// Frequency bands of dimension `d`: `linspace(1, max_resolution[d] / 2, num_bands)`.
    fn bands(&self, d: usize) -> Vec<f32> {
        linspace(1.0, self.max_resolution[d] as f32 / 2.0, self.num_bands)
    }

    /// Features of positions `pos` (`[K, d]`, row-major) as `[K, width]`.
    pub fn features(&self, pos: &[f32]) -> Vec<f32> {
        let d = self.max_resolution.len();
        let k = pos.len() / d;
        let bands: Vec<Vec<f32>> = (0..d).map(|i| self.bands(i)).collect();
        let w = self.width();
        let mut out = Vec::with_capacity(k * w);
        for p in pos.chunks_exact(d) {
            // Products as f32, then pi * f as f32 (torch's order); sin/cos rounded from f64.
            let f: Vec<f32> =
                (0..d).flat_map(|i| bands[i].iter().map(move |b| std::f32::consts::PI * (p[i] * b))).collect();
            if self.concat_pos {
                out.extend_from_slice(p);
            }
            out.extend(f.iter().map(|&x| (x as f64).sin() as f32));
            if !self.sine_only {
                out.extend(f.iter().map(|&x| (x as f64).cos() as f32));
            }
        }
        out
    }

    /// Features of the full grid over `index_dims` (`linspace(-1, 1, n)` per axis, 'ij' order).
    /// Its size is checked against [`perceiver_edge_runtime::limits`] before anything is
    /// computed (the grid comes from `--image-size` or config.json's sizes).
    pub fn grid(&self, index_dims: &[usize]) -> crate::error::Result<Vec<f32>> {
        let rows = index_dims.iter().fold(1usize, |a, &d| a.saturating_mul(d));
        let cols = self.width().max(index_dims.len());
        perceiver_edge_runtime::limits::tensor_bytes(&[rows, cols], 4).map_err(|m| {
            crate::error::Error::invalid(format!(
                "position features of the input grid {index_dims:?} ({} values each): {m}",
                self.width()
            ))
        })?;
        Ok(self.features(&linear_positions(index_dims)))
    }
}

/// `torch.linspace(start, end, steps)` in f32, with torch's two-sided formula.
pub fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            let (base, k) = if i < half { (start, i as f64) } else { (end, -((steps - 1 - i) as f64)) };
            (base as f64 + step as f64 * k) as f32
        })
        .collect()
}

/// transformers' `build_linear_positions`: `[prod(dims), d]` grid of `linspace(-1, 1)` coordinates.
pub fn linear_positions(index_dims: &[usize]) -> Vec<f32> {
    let axes: Vec<Vec<f32>> = index_dims.iter().map(|&n| linspace(-1.0, 1.0, n)).collect();
    let total: usize = index_dims.iter().product();
    let mut out = Vec::with_capacity(total * index_dims.len());
    for flat in 0..total {
        let mut rem = flat;
        let mut coord = vec![0usize; index_dims.len()];
        for (i, &n) in index_dims.iter().enumerate().rev() {
            coord[i] = rem % n;
            rem /= n;
        }
        out.extend(coord.iter().enumerate().map(|(i, &c)| axes[i][c]));
    }
    out
}

/// transformers' `PerceiverTrainablePositionEncoding.interpolate_pos_encoding`: the `[S*S, C]`
/// trained positions as an `S x S` grid resized to `h x w` with torch's bicubic interpolation
/// (`align_corners=False`, A = -0.75, edge pixels repeated). Returns `[h*w, C]`, computed in f64.
pub fn bicubic_positions(table: &[f32], side: usize, channels: usize, h: usize, w: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cc1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    // Source taps and weights along one axis, as torch's upsample_bicubic2d computes them.
    let taps = |out: usize| -> Vec<([usize; 4], [f64; 4])> {
        let scale = side as f32 / out as f32;
        (0..out)
            .map(|o| {
                let src = scale as f64 * (o as f64 + 0.5) - 0.5;
                let i0 = src.floor();
                let t = src - i0;
                let idx = [-1i64, 0, 1, 2].map(|d| (i0 as i64 + d).clamp(0, side as i64 - 1) as usize);
                (idx, [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)])
            })
            .collect()
    };
    let (ty, tx) = (taps(h), taps(w));
    let mut out = vec![0f32; h * w * channels];
    for (y, (iy, wy)) in ty.iter().enumerate() {
        for (x, (ix, wx)) in tx.iter().enumerate() {
            for c in 0..channels {
                let mut acc = 0f64;
                for a in 0..4 {
                    for b in 0..4 {
                        acc += wy[a] * wx[b] * table[(iy[a] * side + ix[b]) * channels + c] as f64;
                    }
                }
                out[(y * w + x) * channels + c] = acc as f32;
            }
        }
    }
    out
}

/// Where [`fourier_at_indices`] puts an output index on its axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexPositions {
    /// transformers' subsampled decoding: `-1 + 2 * coord / dim`.
    Subsampled,
    /// The full grid's `linspace(-1, 1, dim)[coord]` (a gathered constant), so the features are
    /// the rows of [`Fourier::grid`] (a split export's query buckets).
    Grid,
}

/// Graph nodes computing the Fourier features of flat output indices `idx` (`[K]`, int64) over
/// `index_dims`, with positions placed as `at` says. Returns `[K, width]`.
pub fn fourier_at_indices(g: &mut Graph, f: &Fourier, idx: &Val, index_dims: &[usize], at: IndexPositions) -> Val {
    let k = idx.shape[0];
    let d = index_dims.len();
    let mut coords = Vec::new();
    let mut stride: usize = index_dims.iter().product();
    for &n in index_dims {
        stride /= n;
        let s = g.const_i64("stride", &[stride as i64]);
        let q = g.binary("Div", idx, &s);
        let nn = g.const_i64("dim", &[n as i64]);
        let c = g.binary("Mod", &q, &nn);
        let p = match at {
            // (2 * coord) / n - 1, as transformers computes it.
            IndexPositions::Subsampled => {
                let two = g.const_i64("two", &[2]);
                let c2 = g.binary("Mul", &c, &two);
                let cf = g.cast(&c2, DType::F32);
                let nf = g.const_f32("dim_f", &[1], &[n as f32]);
                let p = g.binary("Div", &cf, &nf);
                let m1 = g.const_f32("minus_one", &[1], &[-1.0]);
                g.add(&p, &m1)
            }
            IndexPositions::Grid => {
                let axis = g.const_f32("linspace", &[n], &linspace(-1.0, 1.0, n));
                g.gather(&axis, &c, 0)
            }
        };
        coords.push(g.reshape(&p, &[k, 1]));
    }
    let refs: Vec<&Val> = coords.iter().collect();
    let pos = if d == 1 { coords[0].clone() } else { g.concat(&refs, 1) };
    let bands: Vec<f32> = (0..d).flat_map(|i| f.bands(i)).collect();
    let bands = g.const_f32("bands", &[1, d, f.num_bands], &bands);
    let p3 = g.reshape(&pos, &[k, d, 1]);
    let prod = g.mul(&p3, &bands);
    let prod = g.reshape(&prod, &[k, d * f.num_bands]);
    let arg = g.mul_scalar(&prod, std::f32::consts::PI);
    let mut parts = vec![];
    if f.concat_pos {
        parts.push(pos.clone());
    }
    parts.push(g.unary("Sin", &arg));
    if !f.sine_only {
        parts.push(g.unary("Cos", &arg));
    }
    let refs: Vec<&Val> = parts.iter().collect();
    g.concat(&refs, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_bits() {
        let v = linspace(-1.0, 1.0, 5);
        assert_eq!(v, vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(linspace(1.0, 112.0, 64)[63], 112.0);
        // torch.linspace(-1, 1, 55)[9] and torch.linspace(1, 28, 64)[3] (torch 2.15, x86-64),
        // where f32 arithmetic or an f32 FMA rounds differently.
        let want: [(f32, f32, usize, usize, u32); 2] = [(-1.0, 1.0, 55, 9, 0xbf2aaaab), (1.0, 28.0, 64, 3, 0x40124925)];
        for (s, e, n, i, bits) in want {
            assert_eq!(linspace(s, e, n)[i].to_bits(), bits, "linspace({s}, {e}, {n})[{i}]");
        }
    }

    #[test]
    fn grid_layout_is_pos_then_sin_then_cos() {
        let f = Fourier { num_bands: 2, max_resolution: vec![4, 6], concat_pos: true, sine_only: false };
        assert_eq!(f.width(), 2 * 2 * 2 + 2);
        let g = f.grid(&[2, 3]).unwrap();
        assert_eq!(g.len(), 6 * 10);
        // Second position: coordinates (-1, 0); bands dim0 = [1, 2], dim1 = [1, 3].
        let row = &g[10..20];
        assert_eq!(&row[..2], &[-1.0, 0.0]);
        let pi = std::f64::consts::PI;
        let want_sin = [(-pi).sin(), (-2.0 * pi).sin(), 0.0, 0.0];
        for (a, b) in row[2..6].iter().zip(want_sin) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
        assert!((row[6] as f64 - (-pi).cos()).abs() < 1e-6);
    }
}
