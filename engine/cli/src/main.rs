//! `perceiver-edge`: export a PerceiverIO checkpoint to ONNX, run it with tract, inspect either.

use anyhow::{bail, Context, Result};
#[cfg(feature = "export")]
use clap::Args;
use clap::{Parser, Subcommand};
use perceiver_edge_runtime::{npy, Session};
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
        /// Output format: `onnx`, or `pack` (flat weight pack for no_std firmware; image
        /// Fourier classifiers, batch 1; see firmware-examples/cortex-m).
        #[arg(long, default_value = "onnx", value_parser = ["onnx", "pack"])]
        format: String,
        /// Weight precision of a pack: `f32`, or `int8` (Linear weights, per-row scales).
        #[arg(long, default_value = "f32")]
        pack_precision: perceiver_edge_export::pack::Precision,
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
        Command::Export { checkpoint, output, sizes, format, pack_precision } if format == "pack" => {
            let pack = perceiver_edge_export::pack::export_pack(&checkpoint, &sizes.options(), pack_precision)?;
            pack.write(&output)?;
            println!("wrote {} ({} bytes, {:?} weights)", output.display(), pack.bytes.len(), pack_precision);
            let dims: Vec<String> =
                perceiver_edge_export::pack::DIMS.iter().zip(&pack.dims).map(|(k, v)| format!("{k}={v}")).collect();
            println!("dims {}", dims.join(" "));
            Ok(())
        }
        #[cfg(feature = "export")]
        Command::Export { checkpoint, output, sizes, .. } => {
            let exported = perceiver_edge_export::export(&checkpoint, &sizes.options())?;
            exported.write(&output)?;
            let bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            println!("wrote {} ({:.2} MiB)", output.display(), bytes as f64 / 1048576.0);
            print!("{}", exported.summary);
            Ok(())
        }
        Command::Run { model, inputs, outputs, print } => run(&model, &inputs, &outputs, print),
        #[cfg(feature = "export")]
        Command::Inspect { path, sizes } => inspect(&path, Some(&sizes)),
        #[cfg(not(feature = "export"))]
        Command::Inspect { path } => inspect(&path),
    }
}

fn run(model: &Path, inputs: &[String], outputs: &[PathBuf], print: bool) -> Result<()> {
    let mut session = Session::load(model)?;
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
