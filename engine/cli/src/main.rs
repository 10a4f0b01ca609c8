//! `perceiver-edge`: export a PerceiverIO checkpoint to ONNX, run it with tract, inspect either.

use anyhow::{bail, Context, Result};
#[cfg(feature = "export")]
use clap::Args;
use clap::{Parser, Subcommand};
use perceiver_edge_runtime::{bench, npy, profile::Profile, Device, OpKey, Session};

/// Counts heap bytes so `bench` can report peak heap and steady-state growth.
#[global_allocator]
static ALLOC: perceiver_edge_runtime::alloc::Counting = perceiver_edge_runtime::alloc::Counting;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "perceiver-edge",
    version,
    about = "PerceiverIO on edge hardware: export, run, inspect",
    after_help = "Code layout: engine/runtime (Session, shared vocabulary), engine/export (ir -> model -> heads -> passes), \
                  engine/tune, engine/cli; see docs/layout.md. Every subcommand: perceiver-edge help SUBCOMMAND."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Refuse any single tensor (input, weight, activation, table) larger than this many GiB.
    #[arg(long, global = true, value_name = "GIB", default_value_t = 4.0)]
    max_tensor_gib: f64,
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
        #[command(flatten)]
        budget: BudgetArgs,
        #[command(flatten)]
        quant: Quant,
        /// Output format: `onnx`, or `pack` (flat weight pack for no_std firmware; image
        /// Fourier classifiers, batch 1; see firmware-examples/cortex-m).
        #[arg(long, default_value = "onnx", value_parser = ["onnx", "pack"])]
        format: String,
        /// Weight precision of a pack: `f32`, or `int8` (Linear weights, per-row scales).
        #[arg(long, default_value = "f32")]
        pack_precision: perceiver_edge_export::pack::Precision,
        /// Encode once, query many: write a model folder (-o DIR/) with encoder.onnx, block.onnx
        /// (weight-shared blocks), decoder.onnx and per-bucket decoders, and manifest.json.
        #[arg(long)]
        split: bool,
        /// With --split: query counts of the extra decoders [default: 1,64,1024, those below
        /// the full output count; multimodal: below the larger of its video points and audio
        /// patches, each index input min(K, its count) long].
        #[arg(long, value_delimiter = ',', value_name = "K,...")]
        buckets: Option<Vec<usize>>,
        /// Store the weights as ONNX external data in one side file next to the model
        /// (OUTPUT.data, offsets aligned to 4096). Automatic when the single file would pass
        /// protobuf's 2 GiB limit.
        #[arg(long)]
        external_data: bool,
    },
    /// Fit a checkpoint to a board: explore latents / blocks / threads, measure latency, memory and
    /// fidelity here, print a Pareto table, write the chosen ONNX, report.json and tradeoff.svg.
    #[cfg(feature = "export")]
    Tune {
        /// Checkpoint directory in Hugging Face layout.
        checkpoint: PathBuf,
        /// Board profile (targets/*.toml).
        #[arg(long)]
        target: PathBuf,
        /// Calibration data: a stacked .npy ([S, ...] like the model input) or a folder of .npy
        /// files (files named *label* are int64 labels).
        #[arg(long, value_name = "DATA")]
        calibrate: PathBuf,
        /// Labels (int64 .npy, one per sample) for accuracy.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Output folder (model.onnx, report.json, tradeoff.svg).
        #[arg(short, long)]
        output: PathBuf,
        /// Host profile used to scale predictions to the board [default: targets/x86-64-host.toml
        /// next to --target, on x86-64].
        #[arg(long, value_name = "FILE")]
        host_profile: Option<PathBuf>,
        /// Latent counts to try [default: N, 3N/4, N/2, N/4, N/8].
        #[arg(long, value_delimiter = ',', value_name = "K,...")]
        latents: Option<Vec<usize>>,
        /// Block repetitions to try [default: trained, halved down to 1].
        #[arg(long, value_delimiter = ',', value_name = "B,...")]
        blocks: Option<Vec<usize>>,
        /// Thread counts to try [default: 1 and the board's threads, capped at this host's cores].
        #[arg(long, value_delimiter = ',', value_name = "T,...")]
        threads: Option<Vec<usize>>,
        /// Precisions to try (f32, f16, int8, int8-static, q4; int8-7bit and int8-static-7bit
        /// for 7-bit weights, `export --reduce-range`), or `profile` for the board's preferred
        /// list [default: f32].
        #[arg(long, value_delimiter = ',', value_name = "P,...")]
        precisions: Option<Vec<String>>,
        /// Output positions decoded per inference, for heads that decode chosen positions
        /// (optical flow, masked LM, bare decoders) [default: every output, 1024 and 64 below it].
        /// The chosen model decodes the largest count given.
        #[arg(long, value_delimiter = ',', value_name = "K,...")]
        queries: Option<Vec<usize>>,
        /// Image height and width of every candidate [default: config image_size / train_size].
        #[arg(long, num_args = 2, value_names = ["H", "W"])]
        image_size: Option<Vec<usize>>,
        /// Token count or raw input count M (bare PerceiverModel) [default: max_position_embeddings].
        #[arg(long)]
        seq_len: Option<usize>,
        /// Decoder declaration of a bare PerceiverModel [default: CHECKPOINT/perceiver_edge_decoder.json].
        #[arg(long, value_name = "FILE")]
        decoder: Option<PathBuf>,
        /// Measured runs per candidate.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Warm-up runs per candidate.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Required top-1 agreement with the full model (0..1).
        #[arg(long, default_value_t = 0.99)]
        min_agreement: f64,
        /// Recover the pruned candidates below --min-agreement by distillation (as `distill`,
        /// trained on the selection half of DATA) and re-measure them; the students are written
        /// under OUT/students/.
        #[arg(long)]
        recover: bool,
        #[command(flatten)]
        training: Training,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Recover a pruned budget by distillation: build a student with K of the teacher's latents
    /// (chosen by importance on DATA) and B blocks, train it to match the teacher (transformers,
    /// in the training Python), write it as a checkpoint folder with distill.json.
    #[cfg(feature = "export")]
    Distill {
        /// Teacher checkpoint directory in Hugging Face layout.
        checkpoint: PathBuf,
        /// Latents the student keeps [default: the teacher's].
        #[arg(long, value_name = "K")]
        latents: Option<usize>,
        /// Repetitions of the weight-shared block in the student [default: the teacher's].
        #[arg(long, value_name = "B")]
        blocks: Option<usize>,
        /// Calibration data of the model's domain (a stacked .npy shaped like the model input, or
        /// a folder of .npy files); never the held-out set you evaluate on.
        #[arg(long, value_name = "DATA")]
        calibrate: PathBuf,
        /// Labels, adding a task loss: int64 class labels (classifiers, one per sample) or float32
        /// target outputs shaped like the model's output (heat maps, regression).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Student folder to write (config.json, model.safetensors, distill.json).
        #[arg(short, long)]
        output: PathBuf,
        /// Start from a student distill wrote before for the same budget (more training for it)
        /// instead of the teacher's kept weights.
        #[arg(long, value_name = "STUDENT")]
        init: Option<PathBuf>,
        #[command(flatten)]
        training: Training,
        /// Image height and width of the model input [default: config image_size].
        #[arg(long, num_args = 2, value_names = ["H", "W"])]
        image_size: Option<Vec<usize>>,
        /// Token count (text heads) or input count M (bare PerceiverModel) [default:
        /// max_position_embeddings].
        #[arg(long)]
        seq_len: Option<usize>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
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
        /// Split model folder: decode only these output positions (int64 .npy, [K], or [S, K]
        /// for S query sets against one encoding); repeatable. Multimodal: NAME=FILE for each of
        /// image_points and audio_points.
        #[arg(long = "points", value_name = "[NAME=]FILE")]
        points: Vec<String>,
        /// Split model folder: apply the weight-shared block this many times [default: the
        /// exported depth].
        #[arg(long, value_name = "B")]
        blocks: Option<usize>,
        /// Split model folder: apply blocks while they fit in this many milliseconds (anytime
        /// mode); prints how many ran.
        #[arg(long, value_name = "MS", conflicts_with = "blocks")]
        deadline_ms: Option<f64>,
        /// Matmul threads (as `bench --threads`; capped at this machine's cores).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Compare a candidate graph (e.g. quantised) with a reference graph of the same model:
    /// output errors, top-1 agreement, accuracy with labels, and a per-layer error table.
    Compare {
        /// Reference ONNX file (usually the f32 export).
        reference: PathBuf,
        /// Candidate ONNX file.
        candidate: PathBuf,
        /// Inputs: a .npy file (a stack along axis 0) or a folder of .npy files.
        #[arg(long, value_name = "DATA")]
        inputs: PathBuf,
        /// Labels (.npy int64, one per row of the first output) for task accuracy.
        #[arg(long, value_name = "LABELS")]
        labels: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Rows of the per-layer table to print (the largest added errors), 0 = all.
        #[arg(long, default_value_t = 12)]
        top: usize,
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
        /// Unmeasured warm-up runs (at --threads 2 or more, up to 12 more until the engine has
        /// chosen between the thread pool and one thread for this model; 0: none at all).
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
        /// Also time every node over this many extra runs and print the time per op kind
        /// (tract's optimised ops), slowest first; JSON: an `ops` list.
        #[arg(long, value_name = "RUNS")]
        profile: Option<usize>,
        /// With --profile: a line per kind of op and shape (tract's description of the nodes:
        /// a product's sizes, kernel and epilogue, ...) instead of per kind.
        #[arg(long)]
        by_shape: bool,
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
    /// Export the unrewritten graph (no performance rewrites; reference for tests and benchmarks).
    #[arg(long)]
    no_rewrites: bool,
    /// Precomputed tables of the exact rewrites (memory bought for speed): `auto` keeps a table
    /// only when it is no larger than the constants it replaces and all tables stay within 25 %
    /// of the weights; `all` keeps every one; `none` adds none. The export report lists each.
    #[arg(long, value_parser = ["auto", "all", "none"], value_name = "POLICY", conflicts_with = "no_position_tables")]
    tables: Option<String>,
    /// Same as `--tables none`.
    #[arg(long)]
    no_position_tables: bool,
    /// Compute attention scores larger than this many MiB over chunks of the inputs, with a
    /// running softmax (exact; the scores and the inputs' keys and values never exist whole);
    /// 0 never [default: 32].
    #[arg(long, value_name = "MIB", value_parser = non_negative_mib)]
    max_scores_mib: Option<f64>,
}

#[cfg(feature = "export")]
fn non_negative_mib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e9).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a size in MiB (a number from 0 to 1e9)")),
    }
}

/// Budget knobs of `export`.
#[cfg(feature = "export")]
#[derive(Args, Clone, Debug, Default)]
struct BudgetArgs {
    /// Keep the K most important of the trained latents, ranked by attention mass on the
    /// --calibrate DATA (a stacked .npy or a folder of .npy files).
    #[arg(long, value_name = "K")]
    latents: Option<usize>,
    /// Repetitions of the weight-shared latent block [default: config num_blocks].
    #[arg(long, value_name = "B")]
    blocks: Option<usize>,
}

/// Training settings of `distill` and `tune --recover`.
#[cfg(feature = "export")]
#[derive(Args, Clone, Debug)]
struct Training {
    /// Passes over the calibration data.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Seed of shuffling and augmentation (same seed, same machine: same student).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Softmax temperature of the distillation KL (classifiers).
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Samples per training step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Weight of the latent-feature term (student latents vs the teacher's kept ones; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    feature_weight: f64,
    /// Where to train: auto (CUDA when torch sees a GPU), cpu or cuda.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    train_device: String,
    /// Distillation loss: auto (kl for classifiers, map-kl for a one-channel heat map, mse
    /// otherwise), kl, map-kl (softmax over the map's positions, plus MSE) or mse.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kl", "map-kl", "mse"])]
    loss: String,
}

#[cfg(feature = "export")]
impl Training {
    fn settings(&self) -> perceiver_edge_tune::distill::TrainSettings {
        perceiver_edge_tune::distill::TrainSettings {
            epochs: self.epochs,
            seed: self.seed,
            lr: self.lr,
            temperature: self.temperature,
            batch_size: self.batch_size,
            feature_weight: self.feature_weight,
            device: self.train_device.clone(),
            loss: self.loss.clone(),
            init: None,
        }
    }
}

/// A progress bar following training (step, epoch, loss).
#[cfg(feature = "export")]
fn training_bar(quiet: bool) -> indicatif::ProgressBar {
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed} {msg}").expect("template"),
    );
    bar
}

/// Precision options of `export`.
#[cfg(feature = "export")]
#[derive(Args, Clone, Debug, Default)]
struct Quant {
    /// Numeric precision: f32, f16, int8 (dynamic activations), int8-static (calibrated) or q4.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Calibration inputs for int8-static: a .npy file (stack along axis 0) or a folder
    /// [default: CHECKPOINT's fixture inputs *.in.*.npy, or CHECKPOINT/samples].
    #[arg(long, value_name = "DATA")]
    calibrate: Option<PathBuf>,
    /// Calibration range: minmax, percentile (99.99) or percentile:P.
    #[arg(long, default_value = "minmax", value_name = "METHOD")]
    calibration_method: String,
    /// Keep nodes / weights whose name contains PATTERN (`*` = any run) in f32; repeatable.
    #[arg(long = "keep-f32", value_name = "PATTERN")]
    keep_f32: Vec<String>,
    /// int8 / int8-static: 7-bit weights in the integer products (onnxruntime's reduce_range):
    /// exact byte products at the faster rate on x86 without VNNI, twice the weight rounding.
    #[arg(long)]
    reduce_range: bool,
}

#[cfg(feature = "export")]
impl Quant {
    fn options(&self) -> Result<perceiver_edge_export::QuantOptions> {
        Ok(perceiver_edge_export::QuantOptions {
            precision: self.precision.parse()?,
            keep_f32: self.keep_f32.clone(),
            calibrate: self.calibrate.clone(),
            method: self.calibration_method.parse()?,
            reduce_range: self.reduce_range,
        })
    }
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
            perf: perceiver_edge_export::passes::PerfOptions {
                no_rewrites: self.no_rewrites,
                tables: match (self.no_position_tables, self.tables.as_deref()) {
                    (true, _) => perceiver_edge_export::Tables::None,
                    (false, Some(t)) => t.parse().expect("clap checked the value"),
                    (false, None) => perceiver_edge_export::Tables::Auto,
                },
                max_scores_bytes: self.max_scores_mib.map(|m| (m * 1048576.0) as usize),
                ..Default::default()
            },
            ..Default::default()
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

/// Where the last panic happened and what it said (the hook stays silent: a panic is reported
/// once, on one line, by `main`, or turned into an error where it is caught).
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(msg);
        }
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's own message, first line only (it adds a tip and the usage), exit status 1.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad arguments"));
            std::process::exit(1);
        }
    };
    let gib = cli.max_tensor_gib;
    if !(gib > 0.0 && gib <= 1e6) {
        eprintln!("error: --max-tensor-gib {gib}: expected a size in GiB in (0, 1000000]");
        std::process::exit(1);
    }
    perceiver_edge_runtime::limits::set_max_tensor_bytes((gib * (1u64 << 30) as f64) as u64);
    // Panics are bugs; still, report them on one line like every other error, exit status 1.
    let result = std::panic::catch_unwind(|| dispatch(cli.command));
    let msg = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}").replace('\n', " "),
        Err(_) => {
            let what = LAST_PANIC.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
            if what.contains("failed printing to stdout") {
                // The reader went away (`| head`): stop quietly, as a SIGPIPE would.
                std::process::exit(141);
            }
            format!("internal error: {what}")
        }
    };
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        #[cfg(feature = "export")]
        Command::Export {
            checkpoint,
            output,
            sizes,
            budget,
            quant,
            split: true,
            buckets,
            format,
            external_data,
            ..
        } => {
            if external_data {
                bail!("--external-data applies to single-graph exports; --split parts hold their weights inline");
            }
            if format != "onnx"
                || quant.precision != "f32"
                || quant.calibrate.is_some()
                || quant.reduce_range
                || budget.latents.is_some()
            {
                bail!("--split writes f32 ONNX parts; --format pack, --precision, --reduce-range, --calibrate and --latents apply to single-graph exports");
            }
            refuse_overwriting_checkpoint(&output, &checkpoint, &sizes, None)?;
            let mut opts = sizes.options();
            opts.blocks = budget.blocks;
            let ck = perceiver_edge_export::Checkpoint::open(&checkpoint)?;
            let split = perceiver_edge_export::split::build_split(&ck, &opts, buckets.as_deref())?;
            split.write(&output)?;
            for (file, part) in &split.parts {
                let bytes = part.to_bytes().len();
                println!("wrote {} ({:.2} MiB)", output.join(file).display(), bytes as f64 / 1048576.0);
            }
            let m = &split.manifest;
            let buckets: Vec<String> = m.decoders.iter().filter_map(|d| d.queries.map(|k| k.to_string())).collect();
            println!(
                "wrote {} ({}: block applied {} time(s), {} output positions, query buckets [{}])",
                output.join(perceiver_edge_runtime::split::MANIFEST).display(),
                m.architecture,
                m.blocks,
                m.num_queries,
                buckets.join(", ")
            );
            Ok(())
        }
        #[cfg(feature = "export")]
        Command::Export { checkpoint, output, sizes, format, pack_precision, quant, budget, external_data, .. }
            if format == "pack" =>
        {
            if external_data {
                bail!("--external-data applies to ONNX exports, not to a pack");
            }
            if budget.latents.is_some() || budget.blocks.is_some() {
                bail!("--latents/--blocks apply to ONNX exports, not to a pack");
            }
            if quant.precision != "f32" || quant.calibrate.is_some() || !quant.keep_f32.is_empty() || quant.reduce_range
            {
                bail!(
                    "--precision/--calibrate/--keep-f32/--reduce-range apply to ONNX exports; a pack takes --pack-precision f32|int8"
                );
            }
            refuse_overwriting_checkpoint(&output, &checkpoint, &sizes, None)?;
            let pack = perceiver_edge_export::pack::export_pack(&checkpoint, &sizes.options(), pack_precision)?;
            pack.write(&output)?;
            println!("wrote {} ({} bytes, {:?} weights)", output.display(), pack.bytes.len(), pack_precision);
            let dims: Vec<String> =
                perceiver_edge_export::pack::DIMS.iter().zip(&pack.dims).map(|(k, v)| format!("{k}={v}")).collect();
            println!("dims {}", dims.join(" "));
            Ok(())
        }
        #[cfg(feature = "export")]
        Command::Export { checkpoint, output, sizes, budget, quant, external_data, .. } => {
            refuse_overwriting_checkpoint(&output, &checkpoint, &sizes, quant.calibrate.as_deref())?;
            refuse_overwriting_checkpoint(
                &perceiver_edge_export::Exported::external_data_path(&output),
                &checkpoint,
                &sizes,
                quant.calibrate.as_deref(),
            )?;
            // Buffers the exporter frees (trial graphs, tables) go back to the system at once.
            let _phase = perceiver_edge_runtime::alloc::LoadPhase::begin();
            let mut opts = sizes.options();
            opts.blocks = budget.blocks;
            let mut bar: Option<indicatif::ProgressBar> = None;
            let (exported, choice) = perceiver_edge_tune::export_checkpoint(
                &checkpoint,
                opts,
                budget.latents,
                quant.options()?,
                &mut |done, total| {
                    let b = bar.get_or_insert_with(|| {
                        let b = indicatif::ProgressBar::new(total as u64);
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "calibrating {bar:30} {pos}/{len} inputs {elapsed}",
                            )
                            .expect("valid template"),
                        );
                        b
                    });
                    b.set_position(done as u64);
                },
            )?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            if let Some(c) = &choice {
                println!(
                    "latents kept ({} of {}, by attention mass on {} samples): {:?}",
                    c.kept.len(),
                    c.trained,
                    c.samples,
                    c.kept
                );
            }
            let side = exported.write_with(&output, external_data)?;
            let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
            match side {
                None => println!("wrote {} ({:.2} MiB)", output.display(), size(&output)),
                Some(d) => println!(
                    "wrote {} ({:.2} MiB) and its external data {} ({:.2} MiB)",
                    output.display(),
                    size(&output),
                    d.display(),
                    size(&d)
                ),
            }
            print!("{}", exported.summary);
            Ok(())
        }
        #[cfg(feature = "export")]
        Command::Tune {
            checkpoint,
            target,
            calibrate,
            labels,
            output,
            host_profile,
            latents,
            blocks,
            threads,
            precisions,
            queries,
            image_size,
            seq_len,
            decoder,
            runs,
            warmup,
            min_agreement,
            recover,
            training,
            quiet,
        } => {
            let precisions = match precisions {
                Some(p) if p == ["profile"] => Some(perceiver_edge_tune::Profile::load(&target)?.precisions),
                other => other,
            };
            if runs == 0 || !(0.0..=1.0).contains(&min_agreement) {
                bail!("--runs must be positive and --min-agreement within 0..1");
            }
            let opts = perceiver_edge_tune::TuneOptions {
                checkpoint,
                target,
                host_profile,
                calibrate,
                labels,
                out: output,
                export: perceiver_edge_export::ExportOptions {
                    image_size: image_size.map(|v| (v[0], v[1])),
                    seq_len,
                    decoder,
                    ..Default::default()
                },
                axes: perceiver_edge_tune::Axes { latents, blocks, threads, precisions, queries },
                runs,
                warmup,
                min_agreement,
                progress: !quiet,
                recover: recover.then(|| training.settings()),
            };
            let report = perceiver_edge_tune::tune(&opts)?;
            print!("{}", perceiver_edge_tune::table(&report));
            Ok(())
        }
        #[cfg(feature = "export")]
        Command::Distill {
            checkpoint,
            latents,
            blocks,
            calibrate,
            labels,
            output,
            init,
            training,
            image_size,
            seq_len,
            quiet,
        } => {
            let opts = perceiver_edge_tune::distill::DistillOptions {
                checkpoint,
                out: output.clone(),
                calibrate,
                labels,
                latents,
                blocks,
                export: perceiver_edge_export::ExportOptions {
                    image_size: image_size.map(|v| (v[0], v[1])),
                    seq_len,
                    ..Default::default()
                },
                train: perceiver_edge_tune::distill::TrainSettings { init, ..training.settings() },
            };
            let bar = training_bar(quiet);
            let record = perceiver_edge_tune::distill::distill(&opts, &mut |p| {
                bar.set_length(p.steps);
                bar.set_position(p.step);
                bar.set_message(format!("epoch {} loss {:.4}", p.epoch, p.loss));
            })?;
            bar.finish_and_clear();
            print!("{}", perceiver_edge_tune::distill::summary(&record, &output));
            Ok(())
        }
        Command::Run { model, inputs, outputs, print, device, points, blocks, deadline_ms, threads } => {
            perceiver_edge_runtime::set_threads(threads)?;
            if perceiver_edge_runtime::split::is_split(&model) {
                return run_split(&model, &inputs, &outputs, &points, blocks, deadline_ms);
            }
            if !points.is_empty() || blocks.is_some() || deadline_ms.is_some() {
                bail!(
                    "{}: --points, --blocks and --deadline-ms need a split model folder (export --split)",
                    model.display()
                );
            }
            run(&model, &inputs, &outputs, print, device)
        }
        Command::Bench { model, runs, duration, warmup, threads, rate, inputs, json, device, profile, by_shape } => {
            if by_shape && profile.is_none() {
                bail!("--by-shape: profiles by shape with --profile RUNS, which was not given");
            }
            if profile == Some(0) {
                bail!("--profile 0: expected a number of runs of at least 1");
            }
            if profile.is_some() && (device != Device::Cpu || perceiver_edge_runtime::split::is_split(&model)) {
                bail!("--profile: profiles a single ONNX file on the CPU");
            }
            let opts = bench::BenchOptions::from_flags(runs, duration, warmup, rate, threads)?;
            let inputs = if inputs.is_empty() {
                None
            } else {
                Some(inputs.iter().map(|p| npy::read_npy(p)).collect::<Result<Vec<_>, _>>()?)
            };
            if let Some(n) = inputs.as_deref().map(bench::count_nonfinite).filter(|&n| n > 0) {
                eprintln!("warning: the inputs hold {n} NaN or infinite value(s)");
            }
            if perceiver_edge_runtime::split::is_split(&model) {
                let r = bench::bench_split(&model, inputs, &opts)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print_split_bench(&r);
                }
                return Ok(());
            }
            let report = bench::bench_on(&model, inputs.clone(), &opts, device)?;
            let key = if by_shape { OpKey::Shape } else { OpKey::Kind };
            let ops = profile.map(|runs| bench::profile(&model, inputs, runs, opts.threads, key)).transpose()?;
            if json {
                let mut v = serde_json::to_value(&report)?;
                if let Some(ops) = &ops {
                    v["ops"] = serde_json::to_value(ops)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_bench(&report);
                if let Some(ops) = &ops {
                    println!(
                        "time per op kind{} (per run, {} profiled runs; per-node timing adds overhead):",
                        if by_shape { " and shape" } else { "" },
                        profile.unwrap_or(1)
                    );
                    for o in ops {
                        if by_shape {
                            // The key last: its descriptions differ in length.
                            println!("  {:>5} nodes {:>10.3} ms {:>6.1} %  {}", o.nodes, o.ms, o.share * 100.0, o.op);
                        } else {
                            println!(
                                "  {:<28} {:>5} nodes {:>10.3} ms {:>6.1} %",
                                o.op,
                                o.nodes,
                                o.ms,
                                o.share * 100.0
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Compare { reference, candidate, inputs, labels, json, top } => {
            compare(&reference, &candidate, &inputs, labels.as_deref(), json, top)
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
    let (tensors, mut files) = read_run_inputs(model, inputs, &specs, |i, t| session.check_inputs_one(i, t))?;
    files.push(model.to_path_buf());
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let out_specs = session.outputs().to_vec();
    let (paths, dir) = output_paths(model, outputs, &out_specs, &files)?;
    let results = session.run(tensors)?;
    write_outputs(&results, &paths, dir.as_deref())?;
    for ((t, spec), path) in results.iter().zip(&out_specs).zip(&paths) {
        println!("{} {:?} -> {}", spec.name, t.shape(), path.display());
        if print {
            print_values(t);
        }
        let bad = perceiver_edge_runtime::bench::count_nonfinite(std::slice::from_ref(t));
        if bad > 0 {
            eprintln!("warning: output `{}` holds {bad} NaN or infinite value(s)", spec.name);
        }
    }
    Ok(())
}

/// Reads `run`'s `--input` files for the model inputs `specs`: `NAME=FILE` in any order, or
/// plain files in input order. Each tensor is checked by `check(input index, tensor)`; NaN or
/// infinite values get a warning. Returns the tensors and the files read.
fn read_run_inputs(
    model: &Path,
    inputs: &[String],
    specs: &[perceiver_edge_runtime::IoSpec],
    check: impl Fn(usize, &perceiver_edge_runtime::Tensor) -> perceiver_edge_runtime::Result<()>,
) -> Result<(Vec<perceiver_edge_runtime::Tensor>, Vec<PathBuf>)> {
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
    let (mut tensors, mut files) = (Vec::with_capacity(specs.len()), Vec::with_capacity(specs.len()));
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
        check(i, &t).with_context(|| file.to_string())?;
        let bad = perceiver_edge_runtime::bench::count_nonfinite(std::slice::from_ref(&t));
        if bad > 0 {
            eprintln!("warning: {file}: input `{}` holds {bad} NaN or infinite value(s)", spec.name);
        }
        tensors.push(t);
        files.push(PathBuf::from(file));
    }
    Ok((tensors, files))
}

/// Where `run` writes each output: one `--output` per output, or one folder (`NAME.npy` for
/// outputs with plain file names). Every path is checked before anything runs: none may be one
/// of `inputs`, none given twice. Returns the paths and the folder, if one.
fn output_paths(
    model: &Path,
    outputs: &[PathBuf],
    out_specs: &[perceiver_edge_runtime::IoSpec],
    inputs: &[&Path],
) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
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
    let mut paths = Vec::with_capacity(out_specs.len());
    for (i, spec) in out_specs.iter().enumerate() {
        let path = match &dir {
            Some(d) if perceiver_edge_runtime::fsio::is_plain_file_name(&spec.name) => d.join(format!("{}.npy", spec.name)),
            Some(d) => bail!(
                "{}: output name {:?} is not a plain file name, so it cannot be written into {}; give one --output FILE per output",
                model.display(),
                spec.name,
                d.display()
            ),
            None => outputs[i].clone(),
        };
        perceiver_edge_runtime::fsio::check_not_input(&path, inputs).map_err(anyhow::Error::msg)?;
        if paths.contains(&path) {
            bail!("{}: given for two outputs", path.display());
        }
        paths.push(path);
    }
    Ok((paths, dir))
}

/// Writes `results` to `paths` all or none: each staged under a temporary name, then all
/// renamed into place (creating the output folder `dir` first).
fn write_outputs(results: &[perceiver_edge_runtime::Tensor], paths: &[PathBuf], dir: Option<&Path>) -> Result<()> {
    if let Some(d) = dir {
        std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create folder", d.display()))?;
    }
    let staged = results.iter().zip(paths).map(|(t, p)| npy::stage_npy(p, t)).collect::<Result<Vec<_>, _>>()?;
    for s in staged {
        let p = s.path().to_path_buf();
        s.commit().with_context(|| format!("{}: cannot write", p.display()))?;
    }
    Ok(())
}

/// Refuses an export output that is one of the files the export reads: the checkpoint's
/// config, weights and shards (any `.json` / `.safetensors` in its folder), the decoder
/// declaration, the calibration data.
#[cfg(feature = "export")]
fn refuse_overwriting_checkpoint(
    output: &Path,
    checkpoint: &Path,
    sizes: &Sizes,
    calibrate: Option<&Path>,
) -> Result<()> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(checkpoint)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json" || x == "safetensors"))
                .collect()
        })
        .unwrap_or_default();
    inputs.extend(sizes.decoder.iter().cloned());
    if let Some(c) = calibrate {
        match std::fs::read_dir(c) {
            Ok(rd) => inputs.extend(rd.filter_map(|e| e.ok().map(|e| e.path()))),
            Err(_) => inputs.push(c.to_path_buf()),
        }
    }
    let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    perceiver_edge_runtime::fsio::check_not_input(output, &refs).map_err(anyhow::Error::msg)
}

/// The `--points` query sets of `run` on a split model folder, by index input (the model's
/// order): each argument is FILE (a model with one index input) or NAME=FILE, each file int64
/// `[K]` or `[S, K]` (S sets). Every index input needs sets once any is given, all with the same
/// number of sets, the sets of one input all of one size. The files join `files`.
fn read_point_sets(
    dir: &Path,
    model: &perceiver_edge_runtime::split::Model,
    points: &[String],
    files: &mut Vec<PathBuf>,
) -> Result<Vec<(String, Vec<Vec<i64>>)>> {
    let index = model.index_inputs();
    let names = index.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    let mut sets: Vec<(String, Vec<Vec<i64>>)> = index.iter().map(|(n, _)| (n.clone(), vec![])).collect();
    for arg in points {
        let at = match arg.split_once('=') {
            Some((n, f)) if index.iter().any(|(x, _)| x == n) => Some((n, f)),
            Some((n, _)) if !Path::new(arg).exists() => {
                bail!("--points {arg}: `{n}` is not an index input of {} (it takes {names})", dir.display())
            }
            _ => None,
        };
        let (name, file) = match at {
            Some(named) => named,
            None if index.len() == 1 => (index[0].0.as_str(), arg.as_str()),
            None => bail!(
                "--points {arg}: {} decodes several point sets; give --points NAME=FILE for each of {names}",
                dir.display()
            ),
        };
        let p = Path::new(file);
        let t = npy::read_npy(p)?;
        let v = perceiver_edge_runtime::to_vec::<i64>(&t)
            .with_context(|| format!("{}: points must be int64", p.display()))?;
        let slot = &mut sets.iter_mut().find(|(n, _)| n == name).expect("an index input").1;
        match t.shape() {
            [k] if *k > 0 => slot.push(v),
            [s, k] if *s > 0 && *k > 0 => slot.extend(v.chunks(*k).map(<[i64]>::to_vec)),
            other => bail!("{}: points of shape {other:?}, expected [K] or [S, K] with K >= 1", p.display()),
        }
        files.push(p.to_path_buf());
    }
    if sets.iter().all(|(_, v)| v.is_empty()) {
        return Ok(vec![]);
    }
    if let Some((missing, _)) = sets.iter().find(|(_, v)| v.is_empty()) {
        bail!("--points: `{missing}` is missing (--points {missing}=FILE); {} decodes {names} together", dir.display());
    }
    if sets.iter().any(|(_, v)| v.len() != sets[0].1.len()) {
        let counts: Vec<String> = sets.iter().map(|(n, v)| format!("{n} {}", v.len())).collect();
        bail!("--points: a different number of query sets per index input ({})", counts.join(", "));
    }
    if sets.iter().any(|(_, v)| v.iter().any(|s| s.len() != v[0].len())) {
        bail!("--points: query sets of different sizes; give sets of one size, or run once per size");
    }
    Ok(sets)
}

/// `run` on a split model folder: encode once, apply the block `blocks` times (or within a
/// deadline), decode all positions or each `--points` set.
fn run_split(
    dir: &Path,
    inputs: &[String],
    outputs: &[PathBuf],
    points: &[String],
    blocks: Option<usize>,
    deadline_ms: Option<f64>,
) -> Result<()> {
    use perceiver_edge_runtime::{split::Model, Tensor};
    let mut model = Model::load(dir)?;
    let specs = model.inputs().to_vec();
    let same = |i: usize, t: &Tensor| -> perceiver_edge_runtime::Result<()> {
        let spec = &specs[i];
        if t.datum_type() == spec.dtype && t.shape() == spec.shape.as_slice() {
            return Ok(());
        }
        let name = perceiver_edge_runtime::dtype_name;
        let msg = format!("{} {:?}, expected {} {:?}", name(t.datum_type()), t.shape(), name(spec.dtype), spec.shape);
        Err(perceiver_edge_runtime::Error::Input { name: spec.name.clone(), msg })
    };
    let (tensors, mut files) = read_run_inputs(dir, inputs, &specs, same)?;
    files.extend(std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())));
    let sets = read_point_sets(dir, &model, points, &mut files)?;
    let n_sets = sets.first().map_or(0, |(_, v)| v.len());
    for s in 0..n_sets {
        let pts: Vec<(&str, &[i64])> = sets.iter().map(|(n, v)| (n.as_str(), v[s].as_slice())).collect();
        model.check_points(&pts)?;
    }
    let out_specs = model.outputs().to_vec();
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (paths, dir_out) = output_paths(dir, outputs, &out_specs, &refs)?;
    let t0 = std::time::Instant::now();
    let z = match (blocks, deadline_ms) {
        (Some(0), _) => bail!("--blocks 0: expected at least 1 (as export --blocks)"),
        (Some(b), _) => model.encode_with_blocks(tensors, b)?,
        (None, Some(ms)) => {
            if !(ms > 0.0 && ms.is_finite()) {
                bail!("--deadline-ms {ms}: expected a positive number of milliseconds");
            }
            model.encode_within(tensors, std::time::Duration::from_secs_f64(ms / 1e3))?
        }
        (None, None) => model.encode(tensors)?,
    };
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = std::time::Instant::now();
    let results: Vec<Tensor> = if n_sets == 0 {
        model.decode_all(&z)?
    } else {
        let mut per_set: Vec<Vec<Tensor>> = vec![];
        for s in 0..n_sets {
            let pts: Vec<(&str, &[i64])> = sets.iter().map(|(n, v)| (n.as_str(), v[s].as_slice())).collect();
            per_set.push(model.decode_points(&z, &pts)?);
        }
        if per_set.len() == 1 {
            per_set.pop().expect("one set")
        } else {
            (0..out_specs.len())
                .map(|o| {
                    let parts: Vec<Tensor> = per_set.iter().map(|r| r[o].clone()).collect();
                    Tensor::stack_tensors(
                        0,
                        &parts
                            .iter()
                            .map(|t| t.clone().into_shape(&[&[1][..], t.shape()].concat()).expect("reshape"))
                            .collect::<Vec<_>>(),
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))
                })
                .collect::<Result<_>>()?
        }
    };
    let decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    write_outputs(&results, &paths, dir_out.as_deref())?;
    for ((t, spec), path) in results.iter().zip(&out_specs).zip(&paths) {
        println!("{} {:?} -> {}", spec.name, t.shape(), path.display());
    }
    println!(
        "encoded with {} block application(s) in {encode_ms:.2} ms; decoded {} in {decode_ms:.2} ms",
        z.blocks,
        match sets.as_slice() {
            [] => "every position".to_string(),
            [(_, v)] => format!("{n_sets} set(s) of {} position(s)", v[0].len()),
            many => {
                let each: Vec<String> = many.iter().map(|(n, v)| format!("{} {n}", v[0].len())).collect();
                format!("{n_sets} set(s) of {}", each.join(" + "))
            }
        }
    );
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
    let external = if r.external_data_bytes > 0 {
        format!(" + external data {}", mib(Some(r.external_data_bytes)))
    } else {
        String::new()
    };
    println!(
        "model        {} ({}, file {}{external}, resident weights {})",
        r.model,
        r.precision,
        mib(Some(r.file_bytes)),
        mib(Some(r.resident_weight_bytes))
    );
    println!("load         {:.1} ms (parse + optimise)", r.load_ms);
    println!("runs         {} measured after {} warm-up, {} thread(s)", r.runs, r.warmup, r.threads);
    if r.threads > 1 {
        let share = r.pool_share.map_or(String::new(), |s| format!(" (which had {:.0} % of their cores)", 100.0 * s));
        let here = (r.runs as u64).saturating_sub(r.pool_runs);
        let here = if here > 0 { format!("; {here} on one thread, found faster") } else { String::new() };
        println!("pool         {} of {} runs on the {} threads{share}{here}", r.pool_runs, r.runs, r.threads);
    }
    println!(
        "latency ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  (min {:.3}, mean {:.3}, sd {:.3})",
        l.p50, l.p90, l.p99, l.max, l.min, l.mean, l.stddev
    );
    println!("throughput   {:.1} runs/s", r.throughput_per_s);
    if r.nonfinite_input_values > 0 || r.nonfinite_output_runs > 0 {
        println!(
            "non-finite   {} NaN/Inf input value(s); {} of {} runs gave NaN/Inf outputs",
            r.nonfinite_input_values, r.nonfinite_output_runs, r.runs
        );
    }
    let m = &r.memory;
    println!(
        "memory       peak RSS {} (at load {})  peak heap {}",
        mib(m.peak_rss),
        mib(m.peak_rss_load),
        mib(m.peak_heap)
    );
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

fn print_split_bench(r: &bench::SplitBenchReport) {
    let l = |x: &bench::Latency| format!("p50 {:.3}  p99 {:.3} ms", x.p50, x.p99);
    println!("model        {} (split; {} runs per step, {} thread(s))", r.model, r.runs, r.threads);
    println!("load         {:.1} ms (every part)", r.load_ms);
    println!("encoder      {}", l(&r.encoder_ms));
    if let Some(b) = &r.block_ms {
        println!("block        {}  (one application)", l(b));
    }
    for d in &r.decode_ms {
        let what = d.queries.map_or("every position".to_string(), |k| format!("{k} position(s)"));
        println!("decode       {}  ({what})", l(&d.latency_ms));
    }
    for b in &r.per_block_count_ms {
        println!("end to end   {}  ({} block application(s), full decode)", l(&b.latency_ms), b.blocks);
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

/// `inspect` of a split model folder: the manifest, then each part's file and resident weights.
fn inspect_split(dir: &Path) -> Result<()> {
    let m = perceiver_edge_runtime::split::Manifest::load(dir)?;
    println!("split model    {} ({})", dir.display(), m.architecture);
    println!(
        "depth          block part applied {} time(s){}",
        m.blocks,
        if m.block.is_none() { " (no weight-shared block: the encoder holds every latent layer)" } else { "" }
    );
    let buckets: Vec<String> = m.decoders.iter().filter_map(|d| d.queries.map(|k| k.to_string())).collect();
    println!("queries        {} output positions; buckets [{}]", m.num_queries, buckets.join(", "));
    for p in &m.point_inputs {
        println!(
            "index input    {}: {} positions of {} (min(K, {}) per bucket K)",
            p.name, p.positions, p.output, p.positions
        );
    }
    let files = std::iter::once(&m.encoder).chain(m.block.iter()).chain(m.decoders.iter().map(|d| &d.file));
    for f in files {
        let session = Session::load(&dir.join(f))?;
        println!("-- {f}");
        print_file_and_resident(&dir.join(f), &session);
        print_io(&session);
    }
    Ok(())
}

#[cfg(feature = "export")]
fn inspect(path: &Path, sizes: Option<&Sizes>) -> Result<()> {
    if perceiver_edge_runtime::split::is_split(path) {
        return inspect_split(path);
    }
    if path.is_dir() {
        let opts = sizes.map(Sizes::options).unwrap_or_default();
        let ck = perceiver_edge_export::Checkpoint::open(path)?;
        let exported = perceiver_edge_export::build(&ck, &opts)?;
        print!("{}", exported.summary);
        return Ok(());
    }
    let session = Session::load(path)?;
    print_file_and_resident(path, &session);
    match session.metadata(perceiver_edge_runtime::metadata::SUMMARY) {
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
    if perceiver_edge_runtime::split::is_split(path) {
        return inspect_split(path);
    }
    let session = Session::load(path)?;
    print_file_and_resident(path, &session);
    if let Some(json) = session.metadata(perceiver_edge_runtime::metadata::SUMMARY) {
        println!("summary        {json}");
    }
    print_io(&session);
    Ok(())
}

fn mib(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.2} MiB", bytes as f64 / 1048576.0)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// File size, precision and the weight memory tract keeps after optimisation.
fn print_file_and_resident(path: &Path, session: &Session) {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as usize;
    match session.external_data_bytes() {
        0 => println!("file           {} ({})", path.display(), mib(bytes)),
        ext => println!("file           {} ({}) + external data {}", path.display(), mib(bytes), mib(ext as usize)),
    }
    println!("precision      {}", session.metadata(perceiver_edge_runtime::metadata::PRECISION).unwrap_or("f32"));
    if session.f16_computed_in_f32() {
        println!("compute        f32 (this CPU has no f16 arithmetic: each f16 weight is widened once, at load)");
    }
    let resident = session.resident_weights();
    let total: usize = resident.iter().map(|(_, b)| b).sum();
    let parts: Vec<String> = resident.iter().map(|(k, b)| format!("{k} {}", mib(*b))).collect();
    println!("resident       {} of constants after tract optimisation ({})", mib(total), parts.join(", "));
}

fn compare(
    reference: &Path,
    candidate: &Path,
    inputs: &Path,
    labels: Option<&Path>,
    json: bool,
    top: usize,
) -> Result<()> {
    use perceiver_edge_runtime::{compare, dataset, to_vec};
    let specs = Session::load(reference)?.inputs().to_vec();
    let sets = dataset::load_inputs(inputs, &specs)?;
    let labels: Option<Vec<i64>> = match labels {
        None => None,
        Some(p) => {
            let t = npy::read_npy(p)?;
            let v = to_vec::<i64>(&t)
                .or_else(|| to_vec::<i32>(&t).map(|v| v.into_iter().map(i64::from).collect()))
                .with_context(|| format!("{}: labels must be int64 or int32", p.display()))?;
            Some(v)
        }
    };
    let r = compare::compare(reference, candidate, &sets, labels.as_deref(), true)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{} input set(s)", r.samples);
    for (n, s) in &r.outputs {
        println!(
            "output {n}: max abs {:.3e}, mean abs {:.3e}, cosine {:.6}, max rel {:.3e}",
            s.max_abs, s.mean_abs, s.cosine, s.rel_max
        );
    }
    if let Some((a, n)) = r.top1 {
        println!("top-1 agreement {a}/{n} ({:.2} %)", 100.0 * a as f64 / n as f64);
    }
    if let Some((a, b)) = r.accuracy {
        println!(
            "accuracy reference {:.2} %, candidate {:.2} % ({:+.2} points)",
            100.0 * a,
            100.0 * b,
            100.0 * (b - a)
        );
    }
    if r.layers.is_empty() {
        return Ok(());
    }
    let mut shown: Vec<usize> = (0..r.layers.len()).collect();
    if top > 0 && top < shown.len() {
        shown.sort_by(|&a, &b| r.layers[b].added.total_cmp(&r.layers[a].added));
        shown.truncate(top);
        shown.sort();
        println!(
            "per-layer error ({} of {} shared values with the largest added error, graph order):",
            top,
            r.layers.len()
        );
    } else {
        println!("per-layer error ({} shared values, graph order):", r.layers.len());
    }
    println!(
        "{:<64} {:<22} {:>10} {:>10} {:>10} {:>10}",
        "value", "op (ref -> cand)", "max abs", "cosine", "rel L2", "added"
    );
    let worst = r.layers.iter().enumerate().max_by(|a, b| a.1.added.total_cmp(&b.1.added)).map(|(i, _)| i);
    for i in shown {
        let l = &r.layers[i];
        let op = if l.reference_op == l.candidate_op {
            l.reference_op.clone()
        } else {
            format!("{} -> {}", l.reference_op, l.candidate_op)
        };
        println!(
            "{:<64} {:<22} {:>10.3e} {:>10.6} {:>10.3e} {:>10.3e}{}",
            l.name,
            op,
            l.stats.max_abs,
            l.stats.cosine,
            l.stats.rel_l2,
            l.added,
            if Some(i) == worst { "  <- largest added error" } else { "" }
        );
    }
    Ok(())
}
