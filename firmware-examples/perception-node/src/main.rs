//! `perception-node`: run the perception node on a simulated sensor (default) or, with
//! `--features linux` and `--i2c /dev/i2c-1`, on a real AMG8833.

use anyhow::{bail, Context, Result};
use clap::Parser;
use perceiver_edge_runtime::{npy, to_vec, Session};
use perception_node::node::{self, Classifier, Config};
use perception_node::publish::{Sink, Stdout, Udp};
use perception_node::sensor::{Amg8833, DEFAULT_ADDRESS, PIXELS};
use perception_node::sim::SimulatedAmg8833;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "perception-node", about = "Fixed-rate PerceiverIO perception node (JSON lines out)")]
struct Args {
    /// Exported model (ONNX) taking [1, C, 8, 8] pixels, e.g. models/digits exported.
    #[arg(long)]
    model: PathBuf,
    /// Frames per second.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Frames to acquire.
    #[arg(long, default_value_t = 300)]
    frames: u32,
    /// Images the simulated sensor serves (f32 [N, C, 8, 8] in 0..1, channel 0 used), cycling.
    #[arg(long, default_value = "models/digits/samples/heldout_inputs.npy")]
    source: PathBuf,
    /// True classes of the source images (int64 [N]); adds accuracy to the summary.
    #[arg(long, default_value = "models/digits/samples/heldout_labels.npy")]
    labels: PathBuf,
    /// Publish over UDP to this address (e.g. 127.0.0.1:9000) instead of stdout.
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// Only the summary line (no per-frame lines).
    #[arg(long)]
    summary_only: bool,
    /// Temperature (degC) mapped to pixel value 0.
    #[arg(long, default_value_t = 20.0)]
    t_min: f32,
    /// Temperature span (degC) mapped to pixel values 0..1.
    #[arg(long, default_value_t = 16.0)]
    t_span: f32,
    /// Sensor I2C address.
    #[arg(long, default_value_t = DEFAULT_ADDRESS, value_parser = parse_addr)]
    address: u8,
    /// Read a real sensor on this Linux I2C bus (needs `--features linux`).
    #[arg(long)]
    i2c: Option<PathBuf>,
}

fn parse_addr(s: &str) -> Result<u8, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u8::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("bad I2C address {s}: {e}"))
}

/// Source images as simulated sensor temperatures: pixel p -> t_min + p * t_span degC.
fn load_frames(path: &Path, t_min: f32, t_span: f32) -> Result<Vec<[f32; PIXELS]>> {
    let t = npy::read_npy(path)?;
    let data = to_vec::<f32>(&t).with_context(|| format!("{}: expected float32", path.display()))?;
    let shape = t.shape();
    if shape.len() != 4 || shape[2] * shape[3] != PIXELS || shape[0] == 0 {
        bail!("{}: expected [N, C, 8, 8], got {:?}", path.display(), shape);
    }
    let per = shape[1] * PIXELS;
    Ok(data
        .chunks_exact(per)
        .map(|img| {
            let mut f = [0f32; PIXELS];
            for (o, p) in f.iter_mut().zip(&img[..PIXELS]) {
                *o = t_min + p * t_span;
            }
            f
        })
        .collect())
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
        bail!("--rate must be a positive number of frames per second");
    }
    let mut classifier = Classifier::new(Session::load(&a.model)?)?;
    let cfg =
        Config { rate_hz: a.rate, frames: a.frames, t_min: a.t_min, t_span: a.t_span, per_frame: !a.summary_only };
    let mut sink: Box<dyn Sink> = match a.udp {
        Some(to) => Box::new(Udp::new(to).with_context(|| format!("UDP socket for {to}"))?),
        None => Box::new(Stdout),
    };
    let labels: Option<Vec<i64>> = if a.i2c.is_none() && a.labels.is_file() {
        Some(
            to_vec::<i64>(&npy::read_npy(&a.labels)?)
                .with_context(|| format!("{}: expected int64", a.labels.display()))?,
        )
    } else {
        None
    };
    match &a.i2c {
        None => {
            let frames = load_frames(&a.source, a.t_min, a.t_span)?;
            let sensor = Amg8833::new(SimulatedAmg8833::new(a.address, frames), a.address);
            node::run(sensor, &mut classifier, &cfg, sink.as_mut(), labels.as_deref())?;
        }
        #[cfg(feature = "linux")]
        Some(bus) => {
            let i2c = linux_embedded_hal::I2cdev::new(bus).with_context(|| format!("{}", bus.display()))?;
            node::run(Amg8833::new(i2c, a.address), &mut classifier, &cfg, sink.as_mut(), None)?;
        }
        #[cfg(not(feature = "linux"))]
        Some(_) => bail!("--i2c needs a build with `--features linux`"),
    }
    Ok(())
}
