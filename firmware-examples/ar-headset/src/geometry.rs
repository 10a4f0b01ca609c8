//! Geometry with nalgebra: the tracking camera's intrinsics (pixel <-> normalised image
//! coordinates, viewing rays) and an alpha-beta filter that smooths the marker track.

use nalgebra::{Matrix2, Matrix3, Vector2, Vector3};

/// A pinhole camera.
#[derive(Clone, Copy, Debug)]
pub struct Camera {
    /// Intrinsics `[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`.
    pub k: Matrix3<f64>,
    k_inv: Matrix3<f64>,
}

impl Camera {
    /// A camera of `width` x `height` pixels and horizontal field of view `hfov_deg`, square
    /// pixels, principal point at the image centre (pixel centres at integer coordinates).
    pub fn new(width: usize, height: usize, hfov_deg: f64) -> Camera {
        let f = (width as f64 / 2.0) / (hfov_deg.to_radians() / 2.0).tan();
        let (cx, cy) = ((width as f64 - 1.0) / 2.0, (height as f64 - 1.0) / 2.0);
        let k = Matrix3::new(f, 0.0, cx, 0.0, f, cy, 0.0, 0.0, 1.0);
        Camera { k, k_inv: k.try_inverse().expect("intrinsics are invertible") }
    }

    /// Normalised image coordinates (x/z, y/z) of pixel (u, v).
    pub fn normalise(&self, px: Vector2<f64>) -> Vector2<f64> {
        let n = self.k_inv * Vector3::new(px.x, px.y, 1.0);
        Vector2::new(n.x / n.z, n.y / n.z)
    }

    /// Pixel (u, v) of normalised coordinates.
    pub fn project(&self, n: Vector2<f64>) -> Vector2<f64> {
        let p = self.k * Vector3::new(n.x, n.y, 1.0);
        Vector2::new(p.x / p.z, p.y / p.z)
    }

    /// Unit viewing ray through normalised coordinates `n`.
    pub fn ray(n: Vector2<f64>) -> Vector3<f64> {
        Vector3::new(n.x, n.y, 1.0).normalize()
    }

    /// Angle in degrees between the rays through normalised coordinates `a` and `b`.
    pub fn angle_deg(a: Vector2<f64>, b: Vector2<f64>) -> f64 {
        Camera::ray(a).dot(&Camera::ray(b)).clamp(-1.0, 1.0).acos().to_degrees()
    }
}

/// Constant-velocity alpha-beta filter on a 2-D position (normalised coordinates): state
/// `[position, velocity]`; `predict` extrapolates one step, `update` blends in a measurement.
#[derive(Clone, Debug)]
pub struct AlphaBeta {
    /// Position gain (0..1]: 1 = trust measurements fully.
    pub alpha: f64,
    /// Velocity gain.
    pub beta: f64,
    /// Estimated position.
    pub pos: Vector2<f64>,
    /// Estimated velocity per second.
    pub vel: Vector2<f64>,
    started: bool,
}

impl AlphaBeta {
    /// A filter with gains `alpha` and `beta`, no state yet.
    pub fn new(alpha: f64, beta: f64) -> AlphaBeta {
        AlphaBeta { alpha, beta, pos: Vector2::zeros(), vel: Vector2::zeros(), started: false }
    }

    /// Whether a measurement has been seen.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The position `dt` seconds ahead of the state (no state change).
    pub fn predicted(&self, dt: f64) -> Vector2<f64> {
        // [pos; vel] <- [[1, dt], [0, 1]] [pos; vel], applied per axis.
        let f = Matrix2::new(1.0, dt, 0.0, 1.0);
        Vector2::new((f * Vector2::new(self.pos.x, self.vel.x)).x, (f * Vector2::new(self.pos.y, self.vel.y)).x)
    }

    /// Advances the state by `dt` seconds without a measurement (a dropped frame).
    pub fn coast(&mut self, dt: f64) {
        self.pos = self.predicted(dt);
    }

    /// Advances by `dt` and blends in measurement `z`; returns the new position.
    pub fn update(&mut self, z: Vector2<f64>, dt: f64) -> Vector2<f64> {
        if !self.started {
            self.pos = z;
            self.vel = Vector2::zeros();
            self.started = true;
            return self.pos;
        }
        let pred = self.predicted(dt);
        let r = z - pred;
        self.pos = pred + self.alpha * r;
        self.vel += (self.beta / dt) * r;
        self.pos
    }
}
