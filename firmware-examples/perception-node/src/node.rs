//! The node: an acquisition thread reads the sensor at a fixed rate and hands frames to the
//! inference loop through a heapless single-producer single-consumer queue (fixed capacity, no
//! allocation); the inference loop runs the PerceiverIO engine on each frame and publishes one
//! JSON line per frame plus a summary line.
//!
//! Deadline: a frame's result is due before the next frame is captured (one period after its
//! own capture). Latency is capture -> result published. A full queue drops the new frame
//! (counted as `dropped`): a node that falls behind must not build up stale work.

use crate::publish::Sink;
use crate::sensor::{Amg8833, PIXELS};
use crate::stats::LatencyStats;
use core::fmt::Write as _;
use embedded_hal::i2c::I2c;
use heapless::spsc::Queue;
use perceiver_edge_runtime::Session;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Queue slots between acquisition and inference (heapless keeps one slot free: 7 frames).
pub const QUEUE_SLOTS: usize = 8;

/// One captured frame.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    /// Sequence number from 0.
    pub seq: u32,
    /// Capture time.
    pub captured: Instant,
    /// Pixel temperatures, degC, row-major 8x8.
    pub pixels: [f32; PIXELS],
}

/// Node settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Frames per second the acquisition loop runs at.
    pub rate_hz: f64,
    /// Frames to acquire before stopping.
    pub frames: u32,
    /// Temperature mapped to pixel value 0.
    pub t_min: f32,
    /// Temperature span mapped to pixel values 0..1 (clamped).
    pub t_span: f32,
    /// Publish one line per frame (the summary line is always published).
    pub per_frame: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config { rate_hz: 30.0, frames: 300, t_min: 20.0, t_span: 16.0, per_frame: true }
    }
}

/// One inference result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// Frame sequence number.
    pub seq: u32,
    /// Arg-max class.
    pub class: usize,
    /// Its softmax probability.
    pub score: f32,
    /// Capture -> published, microseconds.
    pub latency_us: u32,
    /// Engine time alone, microseconds.
    pub inference_us: u32,
    /// Result later than one period after capture.
    pub missed: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Frames the acquisition loop attempted.
    pub frames: u32,
    /// Results published.
    pub published: u32,
    /// Frames dropped because the queue was full.
    pub dropped: u32,
    /// Sensor read errors (frame skipped).
    pub sensor_errors: u32,
    /// Acquisition ticks that started more than one period late.
    pub late_ticks: u32,
    /// Results later than their deadline.
    pub deadline_misses: u32,
    /// Latency percentiles p50, p90, p99 and max, microseconds.
    pub latency_us: [u32; 4],
    /// Mean latency, microseconds.
    pub latency_mean_us: f64,
    /// Engine-time percentiles p50, p99 and max, microseconds.
    pub inference_us: [u32; 3],
    /// Correct classes (when labels were given).
    pub correct: u32,
}

/// Pixel values the model takes (0..1) from temperatures.
pub fn normalise(t: &[f32; PIXELS], t_min: f32, t_span: f32, out: &mut [f32; PIXELS]) {
    for (o, x) in out.iter_mut().zip(t) {
        *o = ((x - t_min) / t_span).clamp(0.0, 1.0);
    }
}

/// The engine side: a loaded session and its input buffer, for a model taking
/// `[1, C, 8, 8]` pixels (each channel gets the same grey image) and returning `[1, classes]`.
pub struct Classifier {
    session: Session,
    shape: Vec<usize>,
    input: Vec<f32>,
}

impl Classifier {
    /// Wraps `session`; errors if its input is not `[1, C, 8, 8]` f32.
    pub fn new(session: Session) -> anyhow::Result<Classifier> {
        let spec = session.inputs().first().ok_or_else(|| anyhow::anyhow!("the model has no input"))?.clone();
        let ok = session.inputs().len() == 1
            && spec.dtype == perceiver_edge_runtime::DatumType::F32
            && spec.shape.len() == 4
            && spec.shape[0] == 1
            && spec.shape[2] * spec.shape[3] == PIXELS;
        if !ok {
            anyhow::bail!(
                "the node needs a model with one f32 [1, C, 8, 8] input (e.g. models/digits exported), this one takes {:?} {:?}",
                spec.name,
                spec.shape
            );
        }
        let n = spec.shape.iter().product();
        Ok(Classifier { session, shape: spec.shape, input: vec![0.0; n] })
    }

    /// Logits of one normalised 8x8 image.
    pub fn logits(&mut self, pixels: &[f32; PIXELS]) -> anyhow::Result<Vec<f32>> {
        for ch in self.input.chunks_exact_mut(PIXELS) {
            ch.copy_from_slice(pixels);
        }
        let x = perceiver_edge_runtime::tensor(&self.shape, &self.input).expect("shape matches");
        let out = self.session.run(vec![x])?;
        perceiver_edge_runtime::to_vec::<f32>(&out[0]).ok_or_else(|| anyhow::anyhow!("the model output is not f32"))
    }
}

/// Arg-max and its softmax probability.
pub fn top1(logits: &[f32]) -> (usize, f32) {
    let (best, m) =
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
    let z: f32 = logits.iter().map(|x| (x - m).exp()).sum();
    (best, 1.0 / z)
}

/// Runs the node: `sensor` (initialised here) at `cfg.rate_hz` for `cfg.frames` frames,
/// results to `sink`. `labels` (by sequence number, cycling) adds accuracy to the summary line.
pub fn run<I2C>(
    mut sensor: Amg8833<I2C>,
    classifier: &mut Classifier,
    cfg: &Config,
    sink: &mut dyn Sink,
    labels: Option<&[i64]>,
) -> anyhow::Result<Summary>
where
    I2C: I2c + Send,
{
    sensor.init().map_err(|e| anyhow::anyhow!("sensor init failed: {e:?}"))?;
    let period = Duration::from_secs_f64(1.0 / cfg.rate_hz);
    let mut queue: Queue<Frame, QUEUE_SLOTS> = Queue::new();
    let (mut producer, mut consumer) = queue.split();
    let done = AtomicBool::new(false);
    let dropped = AtomicU32::new(0);
    let sensor_errors = AtomicU32::new(0);
    let late_ticks = AtomicU32::new(0);
    let mut summary = Summary { frames: cfg.frames, ..Default::default() };
    let mut latency = LatencyStats::default();
    let mut engine = LatencyStats::default();
    let mut correct = 0u32;
    let mut line: heapless::String<256> = heapless::String::new();
    let consumer_thread = std::thread::current();

    std::thread::scope(|s| -> anyhow::Result<()> {
        // Acquisition: fixed-rate ticks from one start time (no drift), never blocks on inference.
        s.spawn(|| {
            let start = Instant::now();
            for seq in 0..cfg.frames {
                let tick = start + period * seq;
                let now = Instant::now();
                if now < tick {
                    std::thread::sleep(tick - now);
                } else if now - tick > period {
                    late_ticks.fetch_add(1, Ordering::Relaxed);
                }
                let mut frame = Frame { seq, captured: Instant::now(), pixels: [0.0; PIXELS] };
                if sensor.read_frame(&mut frame.pixels).is_err() {
                    sensor_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if producer.enqueue(frame).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                consumer_thread.unpark();
            }
            done.store(true, Ordering::Release);
            consumer_thread.unpark();
        });

        // Inference: drain the queue until acquisition is done and the queue is empty.
        let mut pixels = [0f32; PIXELS];
        loop {
            let Some(frame) = consumer.dequeue() else {
                if done.load(Ordering::Acquire) && !consumer.ready() {
                    break;
                }
                std::thread::park_timeout(Duration::from_millis(1));
                continue;
            };
            normalise(&frame.pixels, cfg.t_min, cfg.t_span, &mut pixels);
            let t0 = Instant::now();
            let logits = classifier.logits(&pixels)?;
            let inference_us = t0.elapsed().as_micros() as u32;
            let (class, score) = top1(&logits);
            let latency_us = frame.captured.elapsed().as_micros() as u32;
            let d = Detection {
                seq: frame.seq,
                class,
                score,
                latency_us,
                inference_us,
                missed: frame.captured.elapsed() > period,
            };
            summary.published += 1;
            summary.deadline_misses += u32::from(d.missed);
            if let Some(l) = labels.filter(|l| !l.is_empty()) {
                correct += u32::from(l[d.seq as usize % l.len()] == d.class as i64);
            }
            latency.record(d.latency_us);
            engine.record(d.inference_us);
            if cfg.per_frame {
                line.clear();
                write!(
                    line,
                    r#"{{"seq":{},"class":{},"score":{:.4},"latency_us":{},"inference_us":{},"deadline_miss":{}}}"#,
                    d.seq, d.class, d.score, d.latency_us, d.inference_us, d.missed
                )
                .expect("line fits");
                sink.publish(&line)?;
            }
        }
        Ok(())
    })?;

    summary.correct = correct;
    summary.dropped = dropped.into_inner();
    summary.sensor_errors = sensor_errors.into_inner();
    summary.late_ticks = late_ticks.into_inner();
    let [p50, p90, p99] = latency.percentiles([0.5, 0.9, 0.99]);
    summary.latency_us = [p50, p90, p99, latency.max()];
    summary.latency_mean_us = latency.mean();
    let [e50, e99] = engine.percentiles([0.5, 0.99]);
    summary.inference_us = [e50, e99, engine.max()];

    let mut out = String::new();
    write!(
        out,
        r#"{{"summary":{{"rate_hz":{},"deadline_ms":{:.3},"frames":{},"published":{},"dropped":{},"sensor_errors":{},"late_ticks":{},"deadline_misses":{},"latency_us":{{"p50":{},"p90":{},"p99":{},"max":{},"mean":{:.1}}},"inference_us":{{"p50":{},"p99":{},"max":{}}}"#,
        cfg.rate_hz,
        period.as_secs_f64() * 1e3,
        summary.frames,
        summary.published,
        summary.dropped,
        summary.sensor_errors,
        summary.late_ticks,
        summary.deadline_misses,
        p50,
        p90,
        p99,
        latency.max(),
        latency.mean(),
        e50,
        e99,
        engine.max()
    )
    .expect("string write");
    if labels.is_some_and(|l| !l.is_empty()) && summary.published > 0 {
        write!(out, r#","accuracy":{:.4}"#, f64::from(correct) / f64::from(summary.published)).expect("string write");
    }
    out.push_str("}}");
    sink.publish(&out)?;
    Ok(summary)
}
