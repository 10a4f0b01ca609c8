//! The 90 Hz tracking loop. Each frame has a deadline one period after its capture tick. Before
//! running the engine the loop asks the [`DropPolicy`] whether inference would still finish in
//! time; if not, the frame is dropped and the filter's prediction is shown instead (late
//! pixels on an AR display are worse than slightly extrapolated ones).

use crate::geometry::{AlphaBeta, Camera};
use crate::model::{fill_tokens, locate, position_table, TOKEN_WIDTH};
use crate::scene::{Sequence, PIXELS, SIZE};
use nalgebra::Vector2;
use perceiver_edge_runtime::Session;
use std::time::{Duration, Instant};

/// Decides whether to run inference for a frame, from a running estimate of the engine time
/// (exponentially weighted mean and mean absolute deviation, as TCP estimates round trips).
/// It never drops more than `max_in_row` frames in a row (the prediction would drift, and the
/// estimate could never recover from one slow outlier), and each drop forgets part of the
/// deviation.
#[derive(Clone, Debug)]
pub struct DropPolicy {
    mean_us: f64,
    dev_us: f64,
    in_row: u32,
    /// Deviations added to the mean for the time budget.
    pub k: f64,
    /// Most consecutive drops.
    pub max_in_row: u32,
}

impl DropPolicy {
    /// A policy that expects `initial_us` per inference until it has measured.
    pub fn new(initial_us: f64) -> DropPolicy {
        DropPolicy { mean_us: initial_us, dev_us: initial_us / 4.0, in_row: 0, k: 3.0, max_in_row: 2 }
    }

    /// Decides for one frame with `remaining_us` left before its deadline, and records the
    /// decision: true = drop it.
    pub fn decide(&mut self, remaining_us: f64) -> bool {
        let drop = self.in_row < self.max_in_row && self.should_drop(remaining_us);
        if drop {
            self.in_row += 1;
            self.dev_us *= 0.75;
        } else {
            self.in_row = 0;
        }
        drop
    }

    /// Time to budget for one inference: mean + k deviations.
    pub fn budget_us(&self) -> f64 {
        self.mean_us + self.k * self.dev_us
    }

    /// True when inference started with `remaining_us` left before the deadline would likely
    /// finish late.
    pub fn should_drop(&self, remaining_us: f64) -> bool {
        self.budget_us() > remaining_us
    }

    /// Feeds one measured inference time.
    pub fn observe(&mut self, us: f64) {
        let err = us - self.mean_us;
        self.mean_us += 0.125 * err;
        self.dev_us += 0.25 * (err.abs() - self.dev_us);
    }
}

/// Loop settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Display / camera rate.
    pub rate_hz: f64,
    /// Frames to run.
    pub frames: u64,
    /// Scene seed.
    pub seed: u64,
    /// Every this many frames the compositor steals `spike_ms` of CPU before inference (0: never).
    pub spike_every: u64,
    /// Length of those stalls.
    pub spike_ms: f64,
    /// Filter gains.
    pub alpha: f64,
    /// Filter velocity gain.
    pub beta: f64,
    /// Camera horizontal field of view, degrees.
    pub hfov_deg: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate_hz: 90.0,
            frames: 900,
            seed: 7,
            spike_every: 0,
            spike_ms: 0.0,
            alpha: 0.5,
            beta: 0.1,
            hfov_deg: 60.0,
        }
    }
}

/// One frame's outcome.
#[derive(Clone, Copy, Debug)]
pub struct FrameResult {
    /// Frame number.
    pub k: u64,
    /// Inference ran (false: dropped, the prediction was shown).
    pub processed: bool,
    /// Finished after its deadline.
    pub missed: bool,
    /// Tick -> output, microseconds.
    pub latency_us: f64,
    /// Engine time (processed frames), microseconds.
    pub inference_us: f64,
    /// Marker from the model alone, pixels (processed frames).
    pub measured_px: Option<[f64; 2]>,
    /// Output (filtered / predicted) marker, pixels.
    pub output_px: [f64; 2],
    /// True marker, pixels.
    pub truth_px: [f64; 2],
    /// Angle between output and true viewing rays, degrees.
    pub angle_err_deg: f64,
}

/// Nearest-rank percentile of `v` (sorted here); 0 for empty input.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let r = (p * v.len() as f64).ceil() as usize;
    v[r.clamp(1, v.len()) - 1]
}

/// Run statistics.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Frames run.
    pub frames: u64,
    /// Frames inferred.
    pub processed: u64,
    /// Frames dropped by the policy.
    pub dropped: u64,
    /// Frames (processed or not) whose output came after the deadline.
    pub missed: u64,
    /// Latency p50 / p99 / max, ms.
    pub latency_ms: [f64; 3],
    /// Engine time p50 / p99 / max, ms.
    pub inference_ms: [f64; 3],
    /// Model-only error (processed frames): mean / p95, px.
    pub measured_err_px: [f64; 2],
    /// Output error (all frames): mean / p95, px.
    pub output_err_px: [f64; 2],
    /// Output angular error mean / p95, degrees.
    pub angle_err_deg: [f64; 2],
}

impl Report {
    /// Statistics of `results`.
    pub fn of(results: &[FrameResult]) -> Report {
        let err = |a: [f64; 2], b: [f64; 2]| (a[0] - b[0]).hypot(a[1] - b[1]);
        let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
        let mut lat: Vec<f64> = results.iter().map(|r| r.latency_us / 1e3).collect();
        let mut inf: Vec<f64> = results.iter().filter(|r| r.processed).map(|r| r.inference_us / 1e3).collect();
        let mut meas: Vec<f64> = results.iter().filter_map(|r| r.measured_px.map(|m| err(m, r.truth_px))).collect();
        let mut out: Vec<f64> = results.iter().map(|r| err(r.output_px, r.truth_px)).collect();
        let mut ang: Vec<f64> = results.iter().map(|r| r.angle_err_deg).collect();
        let tri = |v: &mut Vec<f64>| [percentile(v, 0.5), percentile(v, 0.99), percentile(v, 1.0)];
        Report {
            frames: results.len() as u64,
            processed: results.iter().filter(|r| r.processed).count() as u64,
            dropped: results.iter().filter(|r| !r.processed).count() as u64,
            missed: results.iter().filter(|r| r.missed).count() as u64,
            latency_ms: tri(&mut lat),
            inference_ms: tri(&mut inf),
            measured_err_px: [mean(&meas), percentile(&mut meas, 0.95)],
            output_err_px: [mean(&out), percentile(&mut out, 0.95)],
            angle_err_deg: [mean(&ang), percentile(&mut ang, 0.95)],
        }
    }
}

/// Side of the heat-map window decoded around the tracker's prediction (7 x 7 = 49 of the 256
/// positions: the split export's 64-query decoder).
pub const WINDOW: usize = 7;

/// A window whose best logit is below this does not hold the marker (on the held-out frames the
/// background sits near -8 and the marker's peak between +9 and +13): decode the full map.
pub const LOST_LOGIT: f32 = 0.0;

/// How the marker model runs.
enum Engine {
    /// One graph: every heat-map position, every frame.
    Single(Box<Session>),
    /// A split model folder (`export --split`): encode, then decode only a window around the
    /// prediction, or the whole map when there is none.
    Split(Box<perceiver_edge_runtime::split::Model>),
}

/// The marker model: tokens in, marker position out.
pub struct MarkerModel {
    engine: Engine,
    table: Vec<f32>,
    tokens: Vec<f32>,
    /// Frames located from a window / from the full map (split models).
    pub windowed: u64,
    /// Frames that needed the full map (no prediction, or the peak on the window's border).
    pub full: u64,
}

fn check_inputs(inputs: &[perceiver_edge_runtime::IoSpec]) -> anyhow::Result<()> {
    match inputs {
        [i] if i.shape == [1, PIXELS, TOKEN_WIDTH] => Ok(()),
        other => anyhow::bail!(
            "expected the marker model (one input [1, 256, 27]; export it with --seq-len 256), got {:?}",
            other.iter().map(|i| (&i.name, &i.shape)).collect::<Vec<_>>()
        ),
    }
}

/// Flat positions of the `WINDOW` x `WINDOW` window centred as near `px` (x, y) as the grid
/// allows.
pub fn window_around(px: [f64; 2]) -> Vec<i64> {
    let start = |c: f64| ((c.round() as i64) - (WINDOW as i64) / 2).clamp(0, (SIZE - WINDOW) as i64);
    let (x0, y0) = (start(px[0]), start(px[1]));
    (y0..y0 + WINDOW as i64).flat_map(|y| (x0..x0 + WINDOW as i64).map(move |x| y * SIZE as i64 + x)).collect()
}

impl MarkerModel {
    /// Wraps `session`; errors unless it takes `[1, 256, 27]` tokens.
    pub fn new(session: Session) -> anyhow::Result<MarkerModel> {
        check_inputs(session.inputs())?;
        Ok(MarkerModel::with(Engine::Single(Box::new(session))))
    }

    /// Loads an ONNX file or a split model folder (`export models/marker --seq-len 256 --split`).
    pub fn load(path: &std::path::Path) -> anyhow::Result<MarkerModel> {
        if perceiver_edge_runtime::split::is_split(path) {
            let m = perceiver_edge_runtime::split::Model::load(path)?;
            check_inputs(m.inputs())?;
            if m.manifest().num_queries != PIXELS {
                anyhow::bail!(
                    "{}: expected 256 heat-map positions, the model decodes {}",
                    path.display(),
                    m.manifest().num_queries
                );
            }
            return Ok(MarkerModel::with(Engine::Split(Box::new(m))));
        }
        MarkerModel::new(Session::load(path)?)
    }

    fn with(engine: Engine) -> MarkerModel {
        MarkerModel { engine, table: position_table(), tokens: vec![0.0; PIXELS * TOKEN_WIDTH], windowed: 0, full: 0 }
    }

    /// Heat-map logits `[256]` of a frame (every position).
    pub fn heat_map(&mut self, frame: &[f32; PIXELS]) -> anyhow::Result<Vec<f32>> {
        fill_tokens(frame, &self.table, &mut self.tokens);
        let x = perceiver_edge_runtime::tensor(&[1, PIXELS, TOKEN_WIDTH], &self.tokens).expect("shape");
        let out = match &mut self.engine {
            Engine::Single(s) => s.run(vec![x])?,
            Engine::Split(m) => {
                let z = m.encode(vec![x])?;
                m.decode_all(&z)?
            }
        };
        perceiver_edge_runtime::to_vec::<f32>(&out[0]).ok_or_else(|| anyhow::anyhow!("output is not f32"))
    }

    /// Marker centre (x, y) in pixels.
    pub fn locate(&mut self, frame: &[f32; PIXELS]) -> anyhow::Result<[f64; 2]> {
        self.locate_near(frame, None)
    }

    /// Marker centre (x, y) in pixels, using `prediction` (x, y) when the model is split: only
    /// the window around it is decoded; the full map is decoded when there is no prediction, or
    /// the window's peak lies on its border or is below [`LOST_LOGIT`] (the marker is not in
    /// the window: tracking is lost).
    /// The centroid of `locate` needs only ratios of probabilities inside the 3 x 3 window
    /// around the peak, so a window gives the same position as the full map.
    pub fn locate_near(&mut self, frame: &[f32; PIXELS], prediction: Option<[f64; 2]>) -> anyhow::Result<[f64; 2]> {
        let (Engine::Split(m), Some(p)) = (&mut self.engine, prediction) else {
            self.full += 1;
            return Ok(locate(&self.heat_map(frame)?).0);
        };
        fill_tokens(frame, &self.table, &mut self.tokens);
        let x = perceiver_edge_runtime::tensor(&[1, PIXELS, TOKEN_WIDTH], &self.tokens).expect("shape");
        let z = m.encode(vec![x])?;
        let idx = window_around(p);
        let out = m.decode(&z, &idx)?;
        let vals =
            perceiver_edge_runtime::to_vec::<f32>(&out[0]).ok_or_else(|| anyhow::anyhow!("output is not f32"))?;
        let best = (0..idx.len()).fold(0, |b, k| if vals[k] > vals[b] { k } else { b });
        let (r, c) = (best / WINDOW, best % WINDOW);
        let at_edge = |v: usize, start: i64| {
            let g = start + v as i64; // grid coordinate: a border of the grid is a true border
            (v == 0 && g > 0) || (v == WINDOW - 1 && g < SIZE as i64 - 1)
        };
        let (y0, x0) = (idx[0] / SIZE as i64, idx[0] % SIZE as i64);
        if at_edge(r, y0) || at_edge(c, x0) || vals[best] < LOST_LOGIT {
            let all = m.decode_all(&z)?;
            self.full += 1;
            let v =
                perceiver_edge_runtime::to_vec::<f32>(&all[0]).ok_or_else(|| anyhow::anyhow!("output is not f32"))?;
            return Ok(locate(&v).0);
        }
        let mut logits = vec![f32::NEG_INFINITY; PIXELS];
        for (k, &i) in idx.iter().enumerate() {
            logits[i as usize] = vals[k];
        }
        self.windowed += 1;
        Ok(locate(&logits).0)
    }
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Runs the loop in real time; calls `each` with every frame's result.
pub fn run(
    model: &mut MarkerModel,
    cfg: &Config,
    mut each: impl FnMut(&FrameResult),
) -> anyhow::Result<Vec<FrameResult>> {
    let period = Duration::from_secs_f64(1.0 / cfg.rate_hz);
    let dt = period.as_secs_f64();
    let cam = Camera::new(SIZE, SIZE, cfg.hfov_deg);
    let mut filter = AlphaBeta::new(cfg.alpha, cfg.beta);
    let mut policy = DropPolicy::new(2_000.0);
    let mut seq = Sequence::new(cfg.seed, cfg.rate_hz);
    let mut frame = [0f32; PIXELS];
    let mut results = Vec::with_capacity(cfg.frames as usize);
    let start = Instant::now();
    for k in 0..cfg.frames {
        let tick = start + period * k as u32;
        let now = Instant::now();
        if now < tick {
            std::thread::sleep(tick - now);
        }
        let deadline = tick + period;
        let scene = seq.frame(k, &mut frame);
        if cfg.spike_every > 0 && k % cfg.spike_every == cfg.spike_every - 1 {
            spin(Duration::from_secs_f64(cfg.spike_ms / 1e3));
        }
        let remaining_us = deadline.saturating_duration_since(Instant::now()).as_secs_f64() * 1e6;
        let (processed, measured, inference_us) = if filter.started() && policy.decide(remaining_us) {
            filter.coast(dt);
            (false, None, 0.0)
        } else {
            let t0 = Instant::now();
            let hint = filter.started().then(|| {
                let p = cam.project(filter.predicted(dt));
                [p.x, p.y]
            });
            let px = model.locate_near(&frame, hint)?;
            let us = t0.elapsed().as_secs_f64() * 1e6;
            policy.observe(us);
            filter.update(cam.normalise(Vector2::new(px[0], px[1])), dt);
            (true, Some(px), us)
        };
        let done = Instant::now();
        let out_px = cam.project(filter.pos);
        let truth = Vector2::new(scene.marker[0], scene.marker[1]);
        let r = FrameResult {
            k,
            processed,
            missed: done > deadline,
            latency_us: (done - tick).as_secs_f64() * 1e6,
            inference_us,
            measured_px: measured,
            output_px: [out_px.x, out_px.y],
            truth_px: scene.marker,
            angle_err_deg: Camera::angle_deg(filter.pos, cam.normalise(truth)),
        };
        each(&r);
        results.push(r);
    }
    Ok(results)
}
