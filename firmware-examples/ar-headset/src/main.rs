//! `ar-headset`: 90 Hz marker tracking on synthetic frames; prints deadline and tracking
//! statistics (and, with `--per-frame`, one JSON line per frame).

use anyhow::{bail, Context, Result};
use ar_headset::scene::PIXELS;
use ar_headset::tracker::{self, Config, MarkerModel, Report};
use clap::Parser;
use std::path::{Path, PathBuf};

fn heldout(model: &mut MarkerModel, dir: &Path, split: bool) -> Result<()> {
    let read = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let p = dir.join(name);
        let t = perceiver_edge_runtime::npy::read_npy(&p)?;
        let v =
            perceiver_edge_runtime::to_vec::<f32>(&t).with_context(|| format!("{}: expected float32", p.display()))?;
        Ok((t.shape().to_vec(), v))
    };
    let (shape, frames) = read("heldout_frames.npy")?;
    let (_, truth) = read("heldout_positions.npy")?;
    if shape.len() != 3 || shape[1] * shape[2] != PIXELS || truth.len() != 2 * shape[0] {
        bail!("{}: expected [K, 16, 16] frames and [K, 2] positions", dir.display());
    }
    let mut errs = Vec::with_capacity(shape[0]);
    let (mut win_errs, mut t_full, mut t_win) = (vec![], 0.0, 0.0);
    for k in 0..shape[0] {
        let f: [f32; PIXELS] = frames[k * PIXELS..(k + 1) * PIXELS].try_into().expect("size");
        let t = std::time::Instant::now();
        let p = model.locate(&f)?;
        t_full += t.elapsed().as_secs_f64();
        let (tx, ty) = (f64::from(truth[2 * k]), f64::from(truth[2 * k + 1]));
        errs.push((p[0] - tx).hypot(p[1] - ty));
        if split {
            // A tracker's prediction: the true position off by up to 2 px (deterministic).
            let off = |i: usize| ((k * 7 + i * 3) % 5) as f64 - 2.0;
            let t = std::time::Instant::now();
            let q = model.locate_near(&f, Some([tx + off(0), ty + off(1)]))?;
            t_win += t.elapsed().as_secs_f64();
            win_errs.push((q[0] - tx).hypot(q[1] - ty));
        }
    }
    if split {
        let n = shape[0] as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        println!(
            "split model, {} frames: full map {:.3} ms/frame, mean error {:.4} px; 7x7 window around a prediction off by <= 2 px {:.3} ms/frame, mean error {:.4} px ({} of {} frames fell back to the full map)",
            shape[0],
            1e3 * t_full / n,
            mean(&errs),
            1e3 * t_win / n,
            mean(&win_errs),
            model.full - shape[0] as u64,
            shape[0]
        );
    }
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    let over = errs.iter().filter(|e| **e > 2.0).count();
    let median = tracker::percentile(&mut errs.clone(), 0.5);
    let p95 = tracker::percentile(&mut errs, 0.95);
    println!(
        "held-out frames {}: mean {mean:.3} px  median {median:.3} px  p95 {p95:.3} px  >2px {:.2} %  (tract f32)",
        shape[0],
        100.0 * over as f64 / shape[0] as f64
    );
    Ok(())
}

#[derive(Parser)]
#[command(name = "ar-headset", about = "90 Hz PerceiverIO marker tracking on synthetic frames")]
struct Args {
    /// The marker model exported to ONNX (`perceiver-edge export models/marker -o marker.onnx --seq-len 256`),
    /// or a split model folder (`... -o marker/ --seq-len 256 --split`): then only a 7x7 window
    /// of the heat map around the tracker's prediction is decoded.
    #[arg(long)]
    model: PathBuf,
    /// Frame rate (display refresh).
    #[arg(long, default_value_t = 90.0)]
    rate: f64,
    /// Frames to run.
    #[arg(long, default_value_t = 900)]
    frames: u64,
    /// Scene seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Simulate a compositor stall every N frames (0: none).
    #[arg(long, default_value_t = 0)]
    spike_every: u64,
    /// Length of each stall, ms.
    #[arg(long, default_value_t = 10.0)]
    spike_ms: f64,
    /// One JSON line per frame.
    #[arg(long)]
    per_frame: bool,
    /// Instead of the loop: localisation error of the engine on the held-out frames stored by
    /// models/train_marker.py in this folder (heldout_frames.npy, heldout_positions.npy).
    #[arg(long, value_name = "DIR")]
    heldout: Option<PathBuf>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let a = Args::parse();
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        bail!("--rate must be positive");
    }
    let mut model = MarkerModel::load(&a.model)?;
    let split = perceiver_edge_runtime::split::is_split(&a.model);
    if let Some(dir) = &a.heldout {
        return heldout(&mut model, dir, split);
    }
    let cfg = Config {
        rate_hz: a.rate,
        frames: a.frames,
        seed: a.seed,
        spike_every: a.spike_every,
        spike_ms: a.spike_ms,
        ..Config::default()
    };
    let results = tracker::run(&mut model, &cfg, |r| {
        if a.per_frame {
            println!(
                r#"{{"k":{},"processed":{},"missed":{},"latency_ms":{:.3},"output_px":[{:.3},{:.3}],"truth_px":[{:.3},{:.3}]}}"#,
                r.k,
                r.processed,
                r.missed,
                r.latency_us / 1e3,
                r.output_px[0],
                r.output_px[1],
                r.truth_px[0],
                r.truth_px[1]
            );
        }
    })?;
    let r = Report::of(&results);
    let period_ms = 1e3 / a.rate;
    println!(
        "ar-headset: {} frames at {} Hz (deadline {:.2} ms), stall every {} frames ({} ms)",
        r.frames,
        a.rate,
        period_ms,
        a.spike_every,
        if a.spike_every > 0 { a.spike_ms } else { 0.0 }
    );
    println!(
        "  processed {}  dropped {} ({:.1} %)  deadline misses {} ({:.2} %)",
        r.processed,
        r.dropped,
        100.0 * r.dropped as f64 / r.frames as f64,
        r.missed,
        100.0 * r.missed as f64 / r.frames as f64
    );
    println!("  latency ms      p50 {:.3}  p99 {:.3}  max {:.3}", r.latency_ms[0], r.latency_ms[1], r.latency_ms[2]);
    println!(
        "  inference ms    p50 {:.3}  p99 {:.3}  max {:.3}",
        r.inference_ms[0], r.inference_ms[1], r.inference_ms[2]
    );
    println!(
        "  model error px  mean {:.3}  p95 {:.3}   (processed frames, raw heat-map estimate)",
        r.measured_err_px[0], r.measured_err_px[1]
    );
    println!(
        "  output error px mean {:.3}  p95 {:.3}   (filtered / predicted, every frame)",
        r.output_err_px[0], r.output_err_px[1]
    );
    println!(
        "  output error    mean {:.3} deg  p95 {:.3} deg (viewing-ray angle, 60 deg FOV)",
        r.angle_err_deg[0], r.angle_err_deg[1]
    );
    if split {
        println!(
            "  heat map        {} frames from a 7x7 window around the prediction, {} from the full map",
            model.windowed, model.full
        );
    }
    Ok(())
}
