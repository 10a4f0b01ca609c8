//! Recovery by distillation: a pruned budget (K of the teacher's N latents, B of its blocks)
//! trained to match the full model on the user's calibration data.
//!
//! The student is built by copying the teacher's weights: the K latent rows that
//! [`analysis::latent_importance`] ranks highest on the calibration data (the rows an
//! `export --latents K` keeps), every other weight as is (the latent blocks are weight-shared, so
//! B blocks repeat the same weights fewer times). It is then trained to match the teacher with
//! transformers (the numerical authority for every head) by `python/distill.py`, embedded in
//! this crate and run with the training Python ([`train_python`]): KL on softened logits for
//! classifiers, MSE for regression outputs (heat maps, flow), an optional latent-feature term,
//! augmentation by input kind and an optional task loss with labels. The result is a checkpoint
//! in Hugging Face layout (config.json with the new `num_latents` / `num_blocks`,
//! model.safetensors) that `export` takes like any other, plus `distill.json`, the record of how
//! it was made. Everything is written into a work folder next to OUT and moved into place at the
//! end: on any error no student folder appears.

use crate::calib;
use crate::workdir::WorkDir;
use anyhow::{bail, Context, Result};
use perceiver_edge_export::{analysis, Checkpoint, ExportOptions};
use perceiver_edge_runtime::{npy, Tensor};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The training script (transformers), written next to the work folder's data when it runs.
pub const SCRIPT: &str = include_str!("../python/distill.py");
/// The pinned training environment (`models/requirements-train.txt`), installed into the venv
/// [`train_python`] creates on first use.
pub const REQUIREMENTS: &str = include_str!("../../../models/requirements-train.txt");

/// Heads the student can be built for (transformers classes; a bare `PerceiverModel` needs its
/// `perceiver_edge_decoder.json` with a basic Fourier-query decoder).
pub const HEADS: &[&str] = &[
    "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForSequenceClassification",
    "PerceiverForMaskedLM",
    "PerceiverForOpticalFlow",
    "PerceiverModel",
];

/// How the student is trained.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    /// Passes over the calibration data.
    pub epochs: usize,
    /// Seed of every random choice (shuffling, augmentation).
    pub seed: u64,
    /// Peak learning rate (AdamW; linear warm-up, cosine decay).
    pub lr: f64,
    /// Softmax temperature of the KL term (classifiers).
    pub temperature: f64,
    /// Samples per step.
    pub batch_size: usize,
    /// Weight of the latent-feature term (0: off).
    pub feature_weight: f64,
    /// `auto` (CUDA when torch sees a GPU), `cpu` or `cuda`.
    pub device: String,
    /// Distillation loss: `auto` (`kl` for classifiers, `map-kl` for a one-channel heat map,
    /// `mse` otherwise), `kl`, `map-kl` or `mse` (see python/distill.py).
    pub loss: String,
    /// Start from this student's weights (a folder `distill` wrote for the same budget) instead
    /// of the teacher's kept rows: more training for a student.
    pub init: Option<PathBuf>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            epochs: 30,
            seed: 0,
            lr: 1e-3,
            temperature: 2.0,
            batch_size: 32,
            feature_weight: 0.0,
            device: "auto".into(),
            loss: "auto".into(),
            init: None,
        }
    }
}

impl TrainSettings {
    fn check(&self) -> Result<()> {
        if self.epochs == 0 || self.epochs > 100_000 {
            bail!("--epochs {}: expected 1 to 100000", self.epochs);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {}: expected a positive learning rate", self.lr);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("--temperature {}: expected a positive temperature", self.temperature);
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            bail!("--batch-size {}: expected 1 to 1048576", self.batch_size);
        }
        if !(self.feature_weight.is_finite() && self.feature_weight >= 0.0) {
            bail!("--feature-weight {}: expected a weight >= 0", self.feature_weight);
        }
        if !["auto", "cpu", "cuda"].contains(&self.device.as_str()) {
            bail!("--train-device {}: expected auto, cpu or cuda", self.device);
        }
        if !["auto", "kl", "map-kl", "mse"].contains(&self.loss.as_str()) {
            bail!("--loss {}: expected auto, kl, map-kl or mse", self.loss);
        }
        Ok(())
    }
}

/// Options of [`distill`].
#[derive(Clone, Debug)]
pub struct DistillOptions {
    /// Teacher checkpoint directory.
    pub checkpoint: PathBuf,
    /// Student folder to write.
    pub out: PathBuf,
    /// Calibration data (unlabelled inputs of the user's domain; never the held-out set).
    pub calibrate: PathBuf,
    /// Labels for a task loss: int64 class labels (one per sample), or float32 target outputs
    /// shaped like the model's output (a heat map's target distribution, a regression target).
    pub labels: Option<PathBuf>,
    /// Latents kept (default: all).
    pub latents: Option<usize>,
    /// Blocks (default: the teacher's).
    pub blocks: Option<usize>,
    /// Sizes of the model input (`--seq-len`, `--image-size`, ...), as for `export`.
    pub export: ExportOptions,
    /// Training settings.
    pub train: TrainSettings,
}

/// Where training is, for a progress bar.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Optimiser steps done.
    pub step: u64,
    /// Steps in all.
    pub steps: u64,
    /// Current epoch (from 1).
    pub epoch: u64,
    /// Last step's loss.
    pub loss: f64,
}

/// A budget checked against the teacher: the kept latents and the blocks.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Kept latent indices, ascending.
    pub kept: Vec<usize>,
    /// Blocks of the student.
    pub blocks: usize,
}

/// Checks `latents` / `blocks` against the teacher (`n` latents, `trained` blocks): at least one
/// set, each within the teacher's, not the teacher itself.
pub fn check_budget(latents: Option<usize>, blocks: Option<usize>, n: usize, trained: usize) -> Result<(usize, usize)> {
    if latents.is_none() && blocks.is_none() {
        bail!("give --latents K and/or --blocks B: the budget to recover");
    }
    let k = latents.unwrap_or(n);
    let b = blocks.unwrap_or(trained);
    if k == 0 || k > n {
        bail!("--latents {k}: expected 1 to {n} (the teacher has {n} latents)");
    }
    if b == 0 || b > trained {
        bail!("--blocks {b}: expected 1 to {trained} (the teacher has {trained} block(s))");
    }
    if k == n && b == trained {
        bail!("--latents {k} --blocks {b} is the teacher's own size: nothing to recover");
    }
    Ok((k, b))
}

/// Checks that the training script can build a student for `ck`'s head.
pub fn check_head(ck: &Checkpoint) -> Result<()> {
    let arch = ck.architecture()?;
    if !HEADS.contains(&arch) {
        bail!(
            "{}: head {arch} has no recovery (the student can be built for {})",
            ck.dir.join("config.json").display(),
            HEADS.join(", ")
        );
    }
    Ok(())
}

/// Recovers one budget: checks it, chooses the latents on the calibration data, trains the
/// student and writes it to `o.out` all-or-nothing. Returns the record (`distill.json`).
pub fn distill(o: &DistillOptions, progress: &mut dyn FnMut(&Progress)) -> Result<serde_json::Value> {
    o.train.check()?;
    let ck = Checkpoint::open(&o.checkpoint)?;
    check_head(&ck)?;
    if perceiver_edge_runtime::fsio::same_file(&o.out, &o.checkpoint) {
        bail!("{}: -o would overwrite the teacher checkpoint; choose another folder", o.out.display());
    }
    if let Some(init) = &o.train.init {
        if perceiver_edge_runtime::fsio::same_file(&o.out, init) {
            bail!("{}: -o would overwrite the --init student; choose another folder", o.out.display());
        }
        if !init.join("model.safetensors").is_file() {
            bail!("--init {}: no model.safetensors (expected a student folder written by distill)", init.display());
        }
    }
    let opts = ExportOptions { latents: None, blocks: None, ..o.export.clone() };
    let full = perceiver_edge_export::build(&ck, &opts)?;
    let n = *full.summary.dims.get("N").context("the model has no latent array")?;
    let trained = full.summary.depth.0;
    let (k, b) = check_budget(o.latents, o.blocks, n, trained)?;
    let mut cal = calib::load(&o.calibrate, o.labels.as_deref(), &full.graph.input_specs())?;
    if o.labels.is_none() {
        cal.labels = None; // a folder's label file: a task loss only when asked for
        cal.labels_source = None;
    }
    cal.check_targets(&full.graph.outputs.first().context("the model has no output")?.shape)?;
    let kept = match &o.train.init {
        // The student to continue already chose its latents: keep them (the feature term and the
        // record refer to them), whatever a ranking on this DATA would pick.
        Some(init) => kept_of_student(init, k, n)?,
        None if k < n => {
            let imp = analysis::latent_importance(&ck, &opts, &cal.samples)?;
            analysis::select_latents(&imp, k)?
        }
        None => (0..n).collect(),
    };
    let work = WorkDir::create(&o.out, "distill")?;
    let record = train_student(
        &o.checkpoint,
        &Budget { kept, blocks: b },
        &cal,
        &work.path,
        &o.train,
        &o.calibrate.display().to_string(),
        progress,
    )?;
    work.finish()?;
    Ok(record)
}

/// The teacher latents the `--init` student `dir` kept (its distill.json), checked against the
/// budget: `k` ascending indices below `n`.
fn kept_of_student(dir: &Path, k: usize, n: usize) -> Result<Vec<usize>> {
    let path = dir.join("distill.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("--init {}: no distill.json (expected a student folder written by distill)", dir.display())
    })?;
    let record: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("--init {}: not JSON", path.display()))?;
    let kept: Option<Vec<usize>> =
        record["kept_latents"].as_array().and_then(|a| a.iter().map(|v| v.as_u64().map(|x| x as usize)).collect());
    match kept {
        Some(kept) if kept.len() == k && kept.windows(2).all(|w| w[0] < w[1]) && kept.iter().all(|&i| i < n) => {
            Ok(kept)
        }
        Some(kept) => bail!(
            "--init {}: not a student of this budget: it kept {} of the teacher's {n} latents, expected {k}",
            dir.display(),
            kept.len()
        ),
        None => bail!("--init {}: `kept_latents` missing or not a list of indices", path.display()),
    }
}

/// Trains the student of `budget` on `cal` with the training Python and writes it into the
/// existing folder `dest` (config.json, model.safetensors, distill.json; the temporary data and
/// script it writes there are removed). `source` names the calibration data in the record.
pub fn train_student(
    teacher: &Path,
    budget: &Budget,
    cal: &calib::Calibration,
    dest: &Path,
    settings: &TrainSettings,
    source: &str,
    progress: &mut dyn FnMut(&Progress),
) -> Result<serde_json::Value> {
    settings.check()?;
    let python = train_python()?;
    let data = dest.join(".calibration.npy");
    let firsts: Vec<&Tensor> = cal.samples.iter().map(|s| &s[0]).collect();
    let stacked = Tensor::stack_tensors(0, &firsts).context("cannot stack the calibration samples")?;
    npy::write_npy(&data, &stacked)?;
    let labels = match (&cal.labels, &cal.targets) {
        (Some(l), _) => {
            let p = dest.join(".labels.npy");
            let t = perceiver_edge_runtime::tensor(&[l.len()], l).context("labels")?;
            npy::write_npy(&p, &t)?;
            Some(p)
        }
        (None, Some(targets)) => {
            let p = dest.join(".labels.npy");
            let t = Tensor::stack_tensors(0, targets).context("cannot stack the target outputs")?;
            npy::write_npy(&p, &t)?;
            Some(p)
        }
        (None, None) => None,
    };
    let script = dest.join(".distill.py");
    std::fs::write(&script, SCRIPT).with_context(|| format!("{}: cannot write", script.display()))?;
    let kept: Vec<String> = budget.kept.iter().map(|k| k.to_string()).collect();
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg("--teacher")
        .arg(teacher)
        .arg("--out")
        .arg(dest)
        .arg("--data")
        .arg(&data)
        .args(["--kept", &kept.join(",")])
        .args(["--blocks", &budget.blocks.to_string()])
        .args(["--epochs", &settings.epochs.to_string()])
        .args(["--seed", &settings.seed.to_string()])
        .args(["--lr", &settings.lr.to_string()])
        .args(["--temperature", &settings.temperature.to_string()])
        .args(["--batch-size", &settings.batch_size.to_string()])
        .args(["--feature-weight", &settings.feature_weight.to_string()])
        .args(["--device", &settings.device])
        .args(["--loss", &settings.loss]);
    if let Some(l) = &labels {
        cmd.arg("--labels").arg(l);
    }
    if let Some(init) = &settings.init {
        cmd.arg("--init").arg(init.join("model.safetensors")); // checked by `distill`
    }
    cmd.env("PYTHONHASHSEED", "0").env("PYTHONDONTWRITEBYTECODE", "1");
    let result = run_training(cmd, &python, progress);
    for p in [Some(data), labels, Some(script)].into_iter().flatten() {
        let _ = std::fs::remove_file(p);
    }
    result?;
    let rec_path = dest.join("distill.json");
    let text = std::fs::read_to_string(&rec_path).with_context(|| format!("{}: cannot read", rec_path.display()))?;
    let mut record: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", rec_path.display()))?;
    record["teacher"] = serde_json::Value::String(teacher.display().to_string());
    record["calibration"] = serde_json::Value::String(source.to_string());
    record["labels"] = cal.labels_source.clone().map_or(serde_json::Value::Null, serde_json::Value::String);
    std::fs::write(&rec_path, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("{}: cannot write", rec_path.display()))?;
    Ok(record)
}

/// Runs the training process, following its JSON progress lines; its error line on failure.
fn run_training(mut cmd: Command, python: &Path, progress: &mut dyn FnMut(&Progress)) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{}: cannot start the training Python", python.display()))?;
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut p = Progress::default();
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        match v["event"].as_str() {
            Some("start") => p.steps = v["steps"].as_u64().unwrap_or(0),
            Some("step") => {
                p.step = v["step"].as_u64().unwrap_or(p.step);
                p.epoch = v["epoch"].as_u64().unwrap_or(p.epoch);
                p.loss = v["loss"].as_f64().unwrap_or(f64::NAN);
            }
            _ => continue,
        }
        progress(&p);
    }
    let status = child.wait().context("training process")?;
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        let line =
            err.lines().rev().find_map(|l| l.strip_prefix("error: ")).map(str::to_string).unwrap_or_else(|| {
                format!("training failed ({status}): {}", err.lines().last().unwrap_or("no message"))
            });
        bail!("{line}");
    }
    Ok(())
}

/// The Python that trains students: `PERCEIVER_EDGE_TRAIN_PYTHON` when set (it must import
/// torch and transformers), otherwise the venv at `PERCEIVER_EDGE_TRAIN_VENV` (default
/// `$XDG_CACHE_HOME/perceiver-edge/train-venv`, else `~/.cache/perceiver-edge/train-venv`),
/// created on first use with `python3 -m venv` and the pinned [`REQUIREMENTS`].
pub fn train_python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PERCEIVER_EDGE_TRAIN_PYTHON") {
        let p = PathBuf::from(p);
        let ok = Command::new(&p)
            .args(["-c", "import torch, transformers, safetensors, numpy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "PERCEIVER_EDGE_TRAIN_PYTHON={}: cannot import torch, transformers, safetensors and numpy \
                 (install models/requirements-train.txt into it)",
                p.display()
            );
        }
        return Ok(p);
    }
    let venv = default_venv().context("no training Python: set PERCEIVER_EDGE_TRAIN_PYTHON (or HOME for the venv)")?;
    let python = venv.join("bin/python");
    let ready = venv.join(".perceiver-edge-ready");
    if python.is_file() && ready.is_file() && std::fs::read_to_string(&ready).is_ok_and(|r| r == REQUIREMENTS) {
        return Ok(python);
    }
    eprintln!(
        "creating the training environment {} (once: torch + transformers, models/requirements-train.txt)",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::create_dir_all(&venv).with_context(|| format!("{}: cannot create", venv.display()))?;
    let quiet = |c: &mut Command, what: &str| -> Result<()> {
        let out = c.output().with_context(|| format!("{what}: cannot start"))?;
        if !out.status.success() {
            let e = String::from_utf8_lossy(&out.stderr);
            bail!("{what} failed: {}", e.lines().last().unwrap_or(""));
        }
        Ok(())
    };
    quiet(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
    let req = venv.join("requirements-train.txt");
    std::fs::write(&req, REQUIREMENTS).with_context(|| format!("{}: cannot write", req.display()))?;
    quiet(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"]).arg(&req),
        "pip install -r requirements-train.txt",
    )?;
    std::fs::write(&ready, REQUIREMENTS).with_context(|| format!("{}: cannot write", ready.display()))?;
    Ok(python)
}

/// The default training venv (see [`train_python`]).
pub fn default_venv() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("PERCEIVER_EDGE_TRAIN_VENV") {
        return Some(PathBuf::from(v));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("perceiver-edge/train-venv"))
}

/// What `perceiver-edge distill` prints: the budget, the losses and the agreement with the
/// teacher before and after recovery (on the calibration inputs), and the files written.
pub fn summary(record: &serde_json::Value, out: &Path) -> String {
    let f = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{:.2} %", 100.0 * x));
    let losses = record["epoch_losses"].as_array().cloned().unwrap_or_default();
    let loss = |i: usize| losses.get(i).and_then(|v| v.as_f64()).map_or("-".into(), |x| format!("{x:.4}"));
    let a = &record["agreement_with_teacher"];
    format!(
        "student K{} B{} of teacher K{} B{} ({}); kept latents {}\n\
         trained {} epochs on {} calibration samples ({}, seed {}): loss {} -> {}\n\
         top-1 agreement with the teacher on the calibration inputs: {} {} -> recovered {}\n\
         wrote {} (config.json, model.safetensors, distill.json)\n",
        record["latents"],
        record["blocks"],
        record["teacher_latents"],
        record["teacher_blocks"],
        record["head"].as_str().unwrap_or("?"),
        record["kept_latents"],
        record["epochs"],
        record["calibration_samples"],
        record["device"].as_str().unwrap_or("?"),
        record["seed"],
        loss(0),
        loss(losses.len().saturating_sub(1)),
        if a["init"].is_null() { "pruned" } else { "--init student" },
        if a["init"].is_null() { f(&a["pruned"]) } else { f(&a["init"]) },
        f(&a["recovered"]),
        out.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_checked_against_the_teacher() {
        assert_eq!(check_budget(Some(8), None, 16, 1).unwrap(), (8, 1));
        assert_eq!(check_budget(None, Some(2), 16, 4).unwrap(), (16, 2));
        let e = |l, b| check_budget(l, b, 16, 2).unwrap_err().to_string();
        assert!(e(Some(0), None).contains("--latents 0: expected 1 to 16"));
        assert!(e(Some(17), None).contains("--latents 17: expected 1 to 16"));
        assert!(e(None, Some(3)).contains("--blocks 3: expected 1 to 2"));
        assert!(e(None, Some(0)).contains("--blocks 0"));
        assert!(e(None, None).contains("--latents K and/or --blocks B"));
        assert!(e(Some(16), Some(2)).contains("nothing to recover"));
    }

    #[test]
    fn the_script_knows_the_same_heads() {
        for h in HEADS {
            assert!(SCRIPT.contains(&format!("\"{h}\"")), "{h} missing from python/distill.py");
        }
        assert!(REQUIREMENTS.contains("transformers==") && REQUIREMENTS.contains("torch=="));
    }
}
