//! `perceiver-edge`: export a PerceiverIO checkpoint to ONNX, run it with tract, inspect either.

use anyhow::{bail, Context, Result};
#[cfg(feature = "export")]
use clap::Args;
use clap::{Parser, Subcommand};
use perceiver_edge_runtime::{bench, npy, profile::Profile, Device, Session};

/// Counts heap bytes so `bench` can report peak heap and steady-state growth.
#[global_allocator]
static ALLOC: perceiver_edge_runtime::alloc::Counting = perceiver_edge_runtime::alloc::Counting;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "perceiver-edge", version, about = "PerceiverIO on edge hardware: export, run, inspect")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a checkpoint directory (config.json + model.safetensors) to a fixed-shape ONNX file.
    #[cfg(feature = "export")]
    Export {
        /// Checkpoint directory in Hugging Face layout.
        checkpoint: PathBuf,
        /// Output ONNX file.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        sizes: Sizes,
    },
    /// Run an exported model on .npy inputs and write its outputs as .npy.
    Run {
        /// ONNX model written by `export`.
        model: PathBuf,
        /// Input .npy files in graph-input order, or NAME=FILE.
        #[arg(short, long = "input", required = true)]
        inputs: Vec<String>,
        /// Output .npy file(s), one per graph output in order, or one existing folder
        /// (outputs are written there as NAME.npy).
        #[arg(short, long = "output", required = true)]
        outputs: Vec<PathBuf>,
        /// Also print small outputs (up to 32 values per batch row) and, for [batch, classes]
        /// outputs, the arg-max class.
        #[arg(long)]
        print: bool,
        /// Where to run: cpu, or cuda (builds with `--features cuda`; Jetson / NVIDIA GPU).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
    },
    /// Benchmark a model: load time, latency percentiles, throughput, memory; `--rate` runs at a
    /// fixed rate and counts deadline misses.
    Bench {
        /// ONNX model.
        model: PathBuf,
        /// Measured runs.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Measure for this many seconds instead of a fixed number of runs.
        #[arg(long, value_name = "S")]
        duration: Option<f64>,
        /// Unmeasured warm-up runs.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Matmul threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Paced mode: start a run every 1/HZ seconds (camera loop) and count deadline misses.
        #[arg(long, value_name = "HZ")]
        rate: Option<f64>,
        /// Input .npy files (graph order); synthetic inputs if omitted.
        #[arg(short, long = "input")]
        inputs: Vec<PathBuf>,
        /// Print the report as JSON (stable field names; times in ms, memory in bytes).
        #[arg(long)]
        json: bool,
        /// Where to run: cpu, or cuda (builds with `--features cuda`).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
    },
    /// Check a board profile (targets/*.toml) and print what it says.
    Profile {
        /// Profile file, e.g. targets/raspberry-pi-5.toml.
        file: PathBuf,
    },
    /// Print architecture, parameters, FLOPs per stage and memory of a checkpoint or ONNX file.
    Inspect {
        /// Checkpoint directory or .onnx file.
        path: PathBuf,
        #[cfg(feature = "export")]
        #[command(flatten)]
        sizes: Sizes,
    },
}

/// Shape options; every one defaults to a value from the checkpoint's config.json.
#[cfg(feature = "export")]
#[derive(Args, Clone, Debug, Default)]
struct Sizes {
    /// Fixed batch size [default: 1].
    #[arg(long)]
    batch: Option<usize>,
    /// Image height and width [default: config image_size, or train_size for optical flow].
    #[arg(long, num_args = 2, value_names = ["H", "W"])]
    image_size: Option<Vec<usize>>,
    /// Token count (text heads) or input count M (bare PerceiverModel) [default: max_position_embeddings].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Add an `attention_mask` input (int64 [batch, seq], 1 = attend).
    #[arg(long)]
    attention_mask: bool,
    /// Decode only K output positions, chosen at run time by an `output_indices` input (int64 [K]).
    #[arg(long, value_name = "K")]
    decode_subset: Option<usize>,
    /// Multimodal: decode a chunk of K video points chosen by an `image_points` input.
    #[arg(long, value_name = "K")]
    image_points: Option<usize>,
    /// Multimodal: decode a chunk of K audio patches chosen by an `audio_points` input.
    #[arg(long, value_name = "K")]
    audio_points: Option<usize>,
    /// Decoder declaration of a bare PerceiverModel [default: CHECKPOINT/perceiver_edge_decoder.json].
    #[arg(long, value_name = "FILE")]
    decoder: Option<PathBuf>,
}

#[cfg(feature = "export")]
impl Sizes {
    fn options(&self) -> perceiver_edge_export::ExportOptions {
        perceiver_edge_export::ExportOptions {
            batch: self.batch,
            image_size: self.image_size.as_ref().map(|v| (v[0], v[1])),
            seq_len: self.seq_len,
            attention_mask: self.attention_mask,
            decode_subset: self.decode_subset,
            image_points: self.image_points,
            audio_points: self.audio_points,
            decoder: self.decoder.clone(),
        }
    }
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    let d = Device::parse(s).ok_or_else(|| format!("unknown device `{s}` (cpu or cuda)"))?;
    if !d.compiled_in() {
        return Err(format!("this build has no {s} support (rebuild with `--features {s}`)"));
    }
    Ok(d)
}

fn main() {
    // Panics are bugs; still, report them on one line like every other error.
    std::panic::set_hook(Box::new(|info| eprintln!("error: internal error: {info}")));
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        #[cfg(feature = "export")]
        Command::Export { checkpoint, output, sizes } => {
            let exported = perceiver_edge_export::export(&checkpoint, &sizes.options())?;
            exported.write(&output)?;
            let bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            println!("wrote {} ({:.2} MiB)", output.display(), bytes as f64 / 1048576.0);
            print!("{}", exported.summary);
            Ok(())
        }
        Command::Run { model, inputs, outputs, print, device } => run(&model, &inputs, &outputs, print, device),
        Command::Bench { model, runs, duration, warmup, threads, rate, inputs, json, device } => {
            let positive = |v: f64| v > 0.0 && v.is_finite();
            if threads == 0 || rate.is_some_and(|r| !positive(r)) || duration.is_some_and(|d| !positive(d)) {
                bail!("--threads, --rate and --duration must be positive");
            }
            let opts = bench::BenchOptions {
                runs,
                duration: duration.map(std::time::Duration::from_secs_f64),
                warmup,
                rate_hz: rate,
                threads,
            };
            let inputs = if inputs.is_empty() {
                None
            } else {
                Some(inputs.iter().map(|p| npy::read_npy(p)).collect::<Result<Vec<_>, _>>()?)
            };
            let report = bench::bench_on(&model, inputs, &opts, device)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_bench(&report);
            }
            Ok(())
        }
        Command::Profile { file } => {
            let profile = Profile::load(&file)?;
            print!("{profile}");
            let host = perceiver_edge_runtime::profile::host_cpu();
            let yn = |x: bool| if x { "yes" } else { "no" };
            let differs = profile.host_mismatches(&host);
            println!(
                "this machine   {}, {} cores, neon {}, fp16 {}, dotprod {}: {}",
                host.arch,
                host.cores,
                yn(host.neon),
                yn(host.fp16),
                yn(host.dotprod),
                if differs.is_empty() {
                    "can be this board".to_string()
                } else {
                    format!("differs ({})", differs.join("; "))
                }
            );
            Ok(())
        }
        #[cfg(feature = "export")]
        Command::Inspect { path, sizes } => inspect(&path, Some(&sizes)),
        #[cfg(not(feature = "export"))]
        Command::Inspect { path } => inspect(&path),
    }
}

fn run(model: &Path, inputs: &[String], outputs: &[PathBuf], print: bool, device: Device) -> Result<()> {
    let mut session = Session::load_on(model, device)?;
    let specs = session.inputs().to_vec();
    if inputs.len() != specs.len() {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "{}: the model takes {} input(s) ({}), got {}",
            model.display(),
            specs.len(),
            names.join(", "),
            inputs.len()
        );
    }
    // NAME=FILE pairs may come in any order; plain files follow graph-input order.
    let mut tensors = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let named = inputs.iter().find_map(|a| a.strip_prefix(&format!("{}=", spec.name)));
        let file = match named {
            Some(f) => f,
            None if inputs[i].contains('=') && !Path::new(&inputs[i]).exists() => {
                bail!("input `{}`: no --input {}=FILE given", spec.name, spec.name)
            }
            None => inputs[i].as_str(),
        };
        let t = npy::read_npy(Path::new(file))?;
        session.check_inputs_one(i, &t).with_context(|| file.to_string())?;
        tensors.push(t);
    }
    let out_specs = session.outputs().to_vec();
    let dir = (outputs.len() == 1 && (outputs[0].is_dir() || outputs[0].to_string_lossy().ends_with('/')))
        .then(|| outputs[0].clone());
    if dir.is_none() && outputs.len() != out_specs.len() {
        let names: Vec<&str> = out_specs.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "the model has {} output(s) ({}): give one --output per output, or one folder",
            names.len(),
            names.join(", ")
        );
    }
    let results = session.run(tensors)?;
    if let Some(d) = &dir {
        std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create folder", d.display()))?;
    }
    for (i, (t, spec)) in results.iter().zip(&out_specs).enumerate() {
        let path = match &dir {
            Some(d) => d.join(format!("{}.npy", spec.name)),
            None => outputs[i].clone(),
        };
        npy::write_npy(&path, t)?;
        println!("{} {:?} -> {}", spec.name, t.shape(), path.display());
        if print {
            print_values(t);
        }
    }
    Ok(())
}

/// Prints each batch row of a small f32 output, with the arg-max of `[batch, classes]` rows.
fn print_values(t: &perceiver_edge_runtime::Tensor) {
    let Some(v) = perceiver_edge_runtime::to_vec::<f32>(t) else { return };
    let rows = t.shape().first().copied().unwrap_or(1).max(1);
    let per_row = v.len() / rows;
    if per_row == 0 || per_row > 32 {
        return;
    }
    for (b, row) in v.chunks(per_row).enumerate() {
        let vals: Vec<String> = row.iter().map(|x| format!("{x:.4}")).collect();
        let argmax = row.iter().enumerate().fold(0, |best, (i, x)| if *x > row[best] { i } else { best });
        if t.rank() == 2 {
            println!("  [{b}] class {argmax}  [{}]", vals.join(", "));
        } else {
            println!("  [{b}] [{}]", vals.join(", "));
        }
    }
}

fn print_bench(r: &bench::BenchReport) {
    let mib = |b: Option<u64>| b.map_or("n/a".to_string(), |b| format!("{:.2} MiB", b as f64 / 1048576.0));
    let l = &r.latency_ms;
    println!("model        {}", r.model);
    println!("load         {:.1} ms (parse + optimise)", r.load_ms);
    println!("runs         {} measured after {} warm-up, {} thread(s)", r.runs, r.warmup, r.threads);
    println!(
        "latency ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  (min {:.3}, mean {:.3}, sd {:.3})",
        l.p50, l.p90, l.p99, l.max, l.min, l.mean, l.stddev
    );
    println!("throughput   {:.1} runs/s", r.throughput_per_s);
    let m = &r.memory;
    println!("memory       peak RSS {}  peak heap {}", mib(m.peak_rss), mib(m.peak_heap));
    println!(
        "steady state RSS {} -> {}  heap in use {} -> {} (after warm-up -> after last run)",
        mib(m.rss_after_warmup),
        mib(m.rss_end),
        mib(m.heap_after_warmup),
        mib(m.heap_end)
    );
    if let Some(p) = &r.paced {
        println!(
            "paced        {:.1} Hz (deadline {:.2} ms): {} deadline miss(es) ({:.2} %), start lateness p50 {:.3} p99 {:.3} max {:.3} ms",
            p.rate_hz,
            p.deadline_ms,
            p.deadline_misses,
            100.0 * p.miss_rate,
            p.start_lateness_ms.p50,
            p.start_lateness_ms.p99,
            p.start_lateness_ms.max
        );
    }
}

fn print_io(session: &Session) {
    for s in session.inputs() {
        println!("input          {}: {} {:?}", s.name, perceiver_edge_runtime::dtype_name(s.dtype), s.shape);
    }
    for s in session.outputs() {
        println!("output         {}: {} {:?}", s.name, perceiver_edge_runtime::dtype_name(s.dtype), s.shape);
    }
}

#[cfg(feature = "export")]
fn inspect(path: &Path, sizes: Option<&Sizes>) -> Result<()> {
    if path.is_dir() {
        let opts = sizes.map(Sizes::options).unwrap_or_default();
        let ck = perceiver_edge_export::Checkpoint::open(path)?;
        let exported = perceiver_edge_export::build(&ck, &opts)?;
        print!("{}", exported.summary);
        return Ok(());
    }
    let session = Session::load(path)?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!("file           {} ({:.2} MiB)", path.display(), bytes as f64 / 1048576.0);
    match session.metadata(perceiver_edge_export::summary::METADATA_KEY) {
        Some(json) => {
            let s: perceiver_edge_export::Summary = serde_json::from_str(json)
                .with_context(|| format!("{}: unreadable perceiver-edge summary", path.display()))?;
            print!("{s}");
        }
        None => {
            println!("(not exported by perceiver-edge: no architecture summary)");
            print_io(&session);
        }
    }
    Ok(())
}

#[cfg(not(feature = "export"))]
fn inspect(path: &Path) -> Result<()> {
    let session = Session::load(path)?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!("file           {} ({:.2} MiB)", path.display(), bytes as f64 / 1048576.0);
    if let Some(json) = session.metadata("perceiver_edge.summary") {
        println!("summary        {json}");
    }
    print_io(&session);
    Ok(())
}
