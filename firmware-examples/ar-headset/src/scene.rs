//! Synthetic camera frames for the marker model: the distribution `models/train_marker.py`
//! trains on (bull's-eye marker, optional plain blob, gradient, noise; 16x16 in 0..1), here
//! with the marker following a smooth head-motion path so that tracking can be scored.

/// Frame side in pixels.
pub const SIZE: usize = 16;
/// Pixels per frame.
pub const PIXELS: usize = SIZE * SIZE;

/// Small deterministic PRNG (SplitMix64), so runs are reproducible without dependencies.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// One frame's scene parameters (pixel units; pixel (row i, column j) is centred at (x, y) = (j, i)).
#[derive(Clone, Copy, Debug)]
pub struct Scene {
    /// Marker centre (x, y).
    pub marker: [f64; 2],
    /// Marker amplitude.
    pub amp: f64,
    /// Distractor blob centre and amplitude (0 = none).
    pub blob: [f64; 2],
    /// Blob amplitude.
    pub blob_amp: f64,
    /// Background level.
    pub level: f64,
    /// Background gradient across the frame (x, y).
    pub grad: [f64; 2],
    /// Noise standard deviation.
    pub noise: f64,
}

/// Renders `s` into `out` (row-major, clipped to 0..1), drawing noise from `rng`.
/// Same formulas as `render` in models/train_marker.py.
pub fn render(s: &Scene, rng: &mut Rng, out: &mut [f32; PIXELS]) {
    for i in 0..SIZE {
        for j in 0..SIZE {
            let (x, y) = (j as f64, i as f64);
            let r = (x - s.marker[0]).hypot(y - s.marker[1]);
            let marker =
                (-(r - 2.0).powi(2) / (2.0 * 0.45f64.powi(2))).exp() + (-(r * r) / (2.0 * 0.55f64.powi(2))).exp();
            let rb2 = (x - s.blob[0]).powi(2) + (y - s.blob[1]).powi(2);
            let blob = s.blob_amp * (-rb2 / (2.0 * 1.3f64.powi(2))).exp();
            let bg = s.level + s.grad[0] * (x - 7.5) / 15.0 + s.grad[1] * (y - 7.5) / 15.0;
            let v = bg + s.amp * marker + blob + s.noise * rng.normal();
            out[i * SIZE + j] = v.clamp(0.0, 1.0) as f32;
        }
    }
}

/// A tracking sequence: the marker moves on a Lissajous path (up to about 11 px/s, 0.12 px per
/// frame at 90 Hz), lighting drifts slowly, and every other 2 s a distractor blob sits on the
/// far side of the frame.
pub struct Sequence {
    rng: Rng,
    rate_hz: f64,
}

impl Sequence {
    /// A sequence sampled at `rate_hz`, deterministic in `seed`.
    pub fn new(seed: u64, rate_hz: f64) -> Sequence {
        Sequence { rng: Rng::new(seed), rate_hz }
    }

    /// Scene of frame `k`.
    pub fn scene(&self, k: u64) -> Scene {
        let t = k as f64 / self.rate_hz;
        let tau = std::f64::consts::TAU;
        let marker = [7.5 + 5.5 * (tau * 0.31 * t).sin(), 7.5 + 5.5 * (tau * 0.23 * t + 0.7).sin()];
        let blob = [15.0 - marker[0] + 1.5 * (tau * 0.05 * t).cos(), 15.0 - marker[1]];
        let d = (blob[0] - marker[0]).hypot(blob[1] - marker[1]);
        let blob_on = (t / 2.0).floor() as i64 % 2 == 1 && d >= 4.0;
        Scene {
            marker,
            amp: 0.7 + 0.15 * (tau * 0.11 * t).sin(),
            blob,
            blob_amp: if blob_on { 0.6 } else { 0.0 },
            level: 0.2 + 0.1 * (tau * 0.07 * t).sin(),
            grad: [0.1 * (tau * 0.05 * t).cos(), -0.08],
            noise: 0.05,
        }
    }

    /// Renders frame `k` into `out` and returns its scene.
    pub fn frame(&mut self, k: u64, out: &mut [f32; PIXELS]) -> Scene {
        let s = self.scene(k);
        render(&s, &mut self.rng, out);
        s
    }
}
