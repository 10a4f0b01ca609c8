//! `ar-headset`: 90 Hz marker tracking on synthetic frames; prints deadline and tracking
//! statistics (and, with `--per-frame`, one JSON line per frame).

use anyhow::{bail, Result};
use ar_headset::tracker::{self, Config, MarkerModel, Report};
use clap::Parser;
use perceiver_edge_runtime::Session;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "ar-headset", about = "90 Hz PerceiverIO marker tracking on synthetic frames")]
struct Args {
    /// The marker model exported to ONNX (`perceiver-edge export models/marker -o marker.onnx --seq-len 256`).
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
    let mut model = MarkerModel::new(Session::load(&a.model)?)?;
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
                r.k, r.processed, r.missed, r.latency_us / 1e3, r.output_px[0], r.output_px[1], r.truth_px[0], r.truth_px[1]
            );
        }
    })?;
    let r = Report::of(&results);
    let period_ms = 1e3 / a.rate;
    println!("ar-headset: {} frames at {} Hz (deadline {:.2} ms), stall every {} frames ({} ms)",
        r.frames, a.rate, period_ms, a.spike_every, if a.spike_every > 0 { a.spike_ms } else { 0.0 });
    println!("  processed {}  dropped {} ({:.1} %)  deadline misses {} ({:.2} %)",
        r.processed, r.dropped, 100.0 * r.dropped as f64 / r.frames as f64, r.missed, 100.0 * r.missed as f64 / r.frames as f64);
    println!("  latency ms      p50 {:.3}  p99 {:.3}  max {:.3}", r.latency_ms[0], r.latency_ms[1], r.latency_ms[2]);
    println!("  inference ms    p50 {:.3}  p99 {:.3}  max {:.3}", r.inference_ms[0], r.inference_ms[1], r.inference_ms[2]);
    println!("  model error px  mean {:.3}  p95 {:.3}   (processed frames, raw heat-map estimate)", r.measured_err_px[0], r.measured_err_px[1]);
    println!("  output error px mean {:.3}  p95 {:.3}   (filtered / predicted, every frame)", r.output_err_px[0], r.output_err_px[1]);
    println!("  output error    mean {:.3} deg  p95 {:.3} deg (viewing-ray angle, 60 deg FOV)", r.angle_err_deg[0], r.angle_err_deg[1]);
    Ok(())
}
