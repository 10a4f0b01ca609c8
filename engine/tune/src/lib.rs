//! `perceiver-edge tune`: fits a PerceiverIO checkpoint to a board. It explores candidate budgets
//! (kept latents, repetitions of the shared latent block, matmul threads, precisions and, for
//! heads with many outputs, the number of output positions decoded), exports each one,
//! measures it on this machine (p99 latency and peak heap through the runtime's `bench`), measures
//! its fidelity against the full model on held-out calibration samples, predicts its latency and
//! memory on the board with the [`cost`] model, marks the Pareto-optimal candidates and picks one:
//!
//! * a candidate **fits** when its p99 latency is within the board's deadline and its memory
//!   within the board's budget (judged on the board prediction when the board is not this
//!   machine's architecture, on the measurement otherwise);
//! * the **chosen** one is the fastest fitting candidate whose top-1 agreement with the full model
//!   is at least `min_agreement`, where candidates within [`SPEED_TIE`] of the fastest count as
//!   equally fast and the most faithful of them wins (a budget that costs fidelity must pay in
//!   speed); if none is that faithful, the most faithful fitting one. It
//!   decodes the largest query count on the axis (every output by default): fewer positions
//!   answer a smaller question, so those candidates are measured and reported, and chosen from
//!   only when the user asks for that count (`--queries K`).
//!
//! Latents are chosen by [`perceiver_edge_export::analysis::latent_importance`] on the
//! even-numbered calibration samples; fidelity is measured on the odd-numbered ones.

pub mod calib;
pub mod cost;
pub mod distill;
pub mod plot;
pub mod profile;
mod workdir;

use anyhow::{bail, Context, Result};
use perceiver_edge_export::{analysis, split};
use perceiver_edge_export::{Checkpoint, ExportOptions, Head, Precision, QuantOptions, Tables};
use perceiver_edge_runtime::compare::{fidelity, Fidelity};
use perceiver_edge_runtime::precision::PrecisionChoice;
use perceiver_edge_runtime::{bench, to_vec, Session, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};
use workdir::WorkDir;

pub use profile::Profile;

/// One point of the search space.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Latents kept (of the trained N).
    pub latents: usize,
    /// Repetitions of the shared latent block.
    pub blocks: usize,
    /// Matmul threads.
    pub threads: usize,
    /// Numeric precision (`f32`, `f16`, `int8`, `int8-static`, `q4`; the quantisation passes),
    /// `int8-7bit` / `int8-static-7bit` with 7-bit integer-product weights (`--reduce-range`).
    pub precision: PrecisionChoice,
    /// Output positions decoded per inference, chosen at run time by an `output_indices` input
    /// (`export --decode-subset K`); `None`: every output.
    pub queries: Option<usize>,
}

/// Candidate values along each axis, before combination.
#[derive(Clone, Debug, Default)]
pub struct Axes {
    /// Latent counts (default: N, 3N/4, N/2, N/4, N/8).
    pub latents: Option<Vec<usize>>,
    /// Block counts (default: the trained count, halved down to 1).
    pub blocks: Option<Vec<usize>>,
    /// Thread counts (default: 1 and the board's threads, capped at this host's cores).
    pub threads: Option<Vec<usize>>,
    /// Precisions (default: f32 only; the board's list is `profile.precisions`).
    pub precisions: Option<Vec<String>>,
    /// Output positions decoded (default, for heads that decode chosen positions: every output
    /// plus [`DEFAULT_QUERIES`] below it; other heads: every output).
    pub queries: Option<Vec<usize>>,
}

/// Query counts tried besides every output, for heads that decode chosen positions.
pub const DEFAULT_QUERIES: [usize; 2] = [1024, 64];

/// All candidates: every combination of the axes' values, most expensive first, checked against
/// the trained latent count `n` and the output positions `positions` the head can decode a
/// subset of (`None`: its outputs are decoded at once, no query axis).
pub fn candidates(
    axes: &Axes,
    n: usize,
    trained_blocks: usize,
    board_threads: usize,
    host_cores: usize,
    positions: Option<usize>,
) -> Result<Vec<Candidate>> {
    let dedup = |mut v: Vec<usize>| {
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.dedup();
        v
    };
    let latents = dedup(
        axes.latents
            .clone()
            .unwrap_or_else(|| [n, 3 * n / 4, n / 2, n / 4, n / 8].into_iter().filter(|&k| k >= 1).collect()),
    );
    let blocks = dedup(axes.blocks.clone().unwrap_or_else(|| {
        std::iter::successors(Some(trained_blocks.max(1)), |&b| (b > 1).then_some(b / 2)).collect()
    }));
    let mut threads = dedup(axes.threads.clone().unwrap_or_else(|| vec![1, board_threads.min(host_cores).max(1)]));
    threads.reverse();
    if let Some(k) = latents.iter().find(|&&k| k == 0 || k > n) {
        bail!("latent candidate {k} must be in 1..={n} (the trained latents)");
    }
    if blocks.contains(&0) || threads.contains(&0) {
        bail!("block and thread candidates must be at least 1");
    }
    let max_layers = perceiver_edge_runtime::limits::MAX_LATENT_LAYERS;
    if let Some(b) = blocks.iter().find(|&&b| b > max_layers) {
        bail!("--blocks {b}: expected at most {max_layers}");
    }
    let max_threads = perceiver_edge_runtime::limits::MAX_THREADS;
    if let Some(t) = threads.iter().find(|&&t| t > max_threads) {
        bail!("--threads {t}: expected 1 to {max_threads}");
    }
    let mut precisions: Vec<PrecisionChoice> = vec![];
    for p in axes.precisions.clone().unwrap_or_else(|| vec!["f32".into()]) {
        let p: PrecisionChoice = p.parse()?;
        if !precisions.contains(&p) {
            precisions.push(p);
        }
    }
    let queries: Vec<Option<usize>> = match (positions, &axes.queries) {
        (None, Some(_)) => bail!("--queries: this model decodes its outputs at once (no output positions to choose)"),
        (None, None) => vec![None],
        (Some(o), None) => {
            std::iter::once(None).chain(DEFAULT_QUERIES.iter().filter(|&&k| k < o).map(|&k| Some(k))).collect()
        }
        (Some(o), Some(q)) => {
            if let Some(k) = q.iter().find(|&&k| k == 0 || k > o) {
                bail!("--queries {k}: expected 1..={o} (the model's output positions)");
            }
            dedup(q.clone()).into_iter().map(|k| (k < o).then_some(k)).collect()
        }
    };
    let mut out = vec![];
    for &latents in &latents {
        for &blocks in &blocks {
            for &precision in &precisions {
                for &queries in &queries {
                    for &threads in &threads {
                        out.push(Candidate { latents, blocks, threads, precision, queries });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Pareto flags of points `(latency, memory, fidelity)`: lower latency and memory and higher
/// fidelity are better; a point is Pareto-optimal when no other point is at least as good on all
/// three and better on one.
pub fn pareto(points: &[(f64, f64, f64)]) -> Vec<bool> {
    points
        .iter()
        .map(|&(l, m, f)| {
            !points.iter().any(|&(l2, m2, f2)| l2 <= l && m2 <= m && f2 >= f && (l2 < l || m2 < m || f2 > f))
        })
        .collect()
}

/// The host a tuning run measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Host {
    /// CPU architecture (`x86_64`, `aarch64`, ...).
    pub arch: String,
    /// Cores available.
    pub cores: usize,
}

/// Where the calibration data came from and how it was split.
#[derive(Clone, Debug, Serialize)]
pub struct CalibrationUse {
    /// The data path.
    pub source: String,
    /// Samples that chose the latents.
    pub selection: usize,
    /// Samples that measured fidelity.
    pub validation: usize,
}

/// A measured candidate.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// The budget.
    pub candidate: Candidate,
    /// Measured p50 latency on this host, ms.
    pub p50_ms: f64,
    /// Measured p99 latency on this host, ms.
    pub p99_ms: f64,
    /// Measured peak heap of the loaded model while running (weights + activations; heap in
    /// use before loading it excluded), bytes; peak RSS where no counting allocator is installed.
    pub memory_bytes: u64,
    /// Measured speed-up of this candidate's threads over the same candidate at 1 thread
    /// (1-thread p50 / this p50); `None` for 1 thread or when no 1-thread twin was measured.
    pub measured_speedup: Option<f64>,
    /// Cost-model prediction for this host (compare with the measurement); with more than one
    /// thread it uses `measured_speedup` where there is one.
    pub predicted_host: cost::Predicted,
    /// Cost-model prediction for the board.
    pub predicted_board: cost::Predicted,
    /// FLOPs per inference.
    pub flops: u64,
    /// The same FLOPs by the arithmetic of their products (`predicted_board` counts f16 and int8
    /// products at the board's peak ratio to f32).
    pub products: perceiver_edge_export::summary::ProductFlops,
    /// Fidelity against the full model on the validation samples.
    pub fidelity: Fidelity,
    /// Within the board's deadline and memory budget.
    pub fits: bool,
    /// Pareto-optimal among all candidates (on [`Measured::effective`] fidelity).
    pub pareto: bool,
    /// With `--recover`: fidelity of the recovered student of this budget (same shape, so the
    /// same latency and memory), measured like `fidelity`; `None` when not recovered.
    pub recovered: Option<Fidelity>,
}

impl Measured {
    /// Short label, e.g. `K16 B1 T1`.
    pub fn label(&self) -> String {
        let c = self.candidate;
        let p = if c.precision == Precision::F32.into() { String::new() } else { format!(" {}", c.precision) };
        let q = c.queries.map_or(String::new(), |k| format!(" Q{k}"));
        format!("K{} B{} T{}{p}{q}", c.latents, c.blocks, c.threads)
    }

    /// Whether the recovered student agrees with the full model more than the pruned model does
    /// (on the validation samples); it then stands for this budget. A recovery that made a
    /// nearly lossless budget worse is reported but not used.
    pub fn recovery_helped(&self) -> bool {
        self.recovered.as_ref().is_some_and(|r| r.top1_agreement > self.fidelity.top1_agreement)
    }

    /// The fidelity of the model this candidate stands for: the recovered student's when it
    /// helped ([`Measured::recovery_helped`]), else the pruned model's.
    pub fn effective(&self) -> &Fidelity {
        match &self.recovered {
            Some(r) if self.recovery_helped() => r,
            _ => &self.fidelity,
        }
    }
}

/// Latencies within this share of the fastest faithful candidate's count as equally fast in
/// [`choose`], so that the more faithful wins: a budget that loses fidelity must be faster by more
/// than a measurement's spread. (On AVX-512 VNNI, int8 with 7-bit weights runs as fast as with
/// 8-bit ones, 468 against 495 ms on language-perceiver, at twice the error; on AVX2 without VNNI
/// it is 10-16 % faster and still chosen.)
pub const SPEED_TIE: f64 = 0.05;

/// Picks, among the candidates that decode the largest query count on the axis, the fastest
/// fitting one with top-1 agreement >= `min_agreement` (latency as judged: `lat[i]`; those
/// within [`SPEED_TIE`] of the fastest are equally fast and the most faithful of them wins), else
/// the most faithful fitting one (then the fastest); `None` if none fits.
pub fn choose(cands: &[Measured], lat: &[f64], min_agreement: f64) -> Option<usize> {
    let needed = needed_queries(cands);
    let fitting: Vec<usize> =
        (0..cands.len()).filter(|&i| cands[i].fits && cands[i].candidate.queries == needed).collect();
    let key = |i: usize| (lat[i], cands[i].candidate.threads, i);
    // The more faithful (top-1 agreement, then mean cosine), then the faster.
    let most_faithful = |a: &usize, b: &usize| {
        let (fa, fb) = (cands[*a].effective(), cands[*b].effective());
        fa.top1_agreement
            .total_cmp(&fb.top1_agreement)
            .then(fa.mean_cosine.total_cmp(&fb.mean_cosine))
            .then(key(*b).partial_cmp(&key(*a)).expect("finite"))
    };
    let faithful: Vec<usize> =
        fitting.iter().copied().filter(|&i| cands[i].effective().top1_agreement >= min_agreement).collect();
    match faithful.iter().copied().min_by(|&a, &b| key(a).partial_cmp(&key(b)).expect("finite")) {
        Some(fastest) => {
            let bound = lat[fastest] * (1.0 + SPEED_TIE);
            faithful.into_iter().filter(|&i| lat[i] <= bound).max_by(most_faithful)
        }
        None => fitting.into_iter().max_by(most_faithful),
    }
}

/// The query count the chosen candidate must decode: every output when that is on the axis,
/// else the largest count asked for.
fn needed_queries(cands: &[Measured]) -> Option<usize> {
    let q = cands.iter().map(|m| m.candidate.queries);
    if q.clone().any(|k| k.is_none()) {
        None
    } else {
        q.max().flatten()
    }
}

/// Options of [`tune`].
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Checkpoint directory.
    pub checkpoint: PathBuf,
    /// Board profile.
    pub target: PathBuf,
    /// Host profile (for scaling predictions); default: `x86-64-host.toml` next to the target
    /// if this host is x86-64 and the file exists.
    pub host_profile: Option<PathBuf>,
    /// Calibration data.
    pub calibrate: PathBuf,
    /// Labels (int64, one per sample).
    pub labels: Option<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Shape options of every export (image size, sequence length, decoder declaration; the
    /// budget fields are set per candidate).
    pub export: ExportOptions,
    /// Candidate axes.
    pub axes: Axes,
    /// Measured runs per candidate.
    pub runs: usize,
    /// Warm-up runs per candidate.
    pub warmup: usize,
    /// Required top-1 agreement with the full model.
    pub min_agreement: f64,
    /// Show a progress bar.
    pub progress: bool,
    /// Recover the pruned candidates whose top-1 agreement is below `min_agreement` by
    /// distillation ([`distill`]), with these settings; `None`: measure pruned models only.
    pub recover: Option<distill::TrainSettings>,
}

/// A student trained by `tune --recover`.
#[derive(Clone, Debug, Serialize)]
pub struct Student {
    /// Latents kept.
    pub latents: usize,
    /// Blocks.
    pub blocks: usize,
    /// Its checkpoint folder under OUT.
    pub folder: String,
    /// Its `distill.json`.
    pub record: serde_json::Value,
}

/// Everything `tune` found; written as `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Checkpoint.
    pub checkpoint: String,
    /// The board.
    pub target: Profile,
    /// Host architecture and cores.
    pub host: Host,
    /// Whether fit was judged on predictions (board differs from host) or measurements.
    pub judged_on: String,
    /// Host micro-benchmark.
    pub host_rates: cost::HostRates,
    /// Calibration source, selection and validation sample counts.
    pub calibration: CalibrationUse,
    /// Importance of each trained latent (selection samples).
    pub latent_importance: Vec<f64>,
    /// Latent indices, most important first.
    pub latent_order: Vec<usize>,
    /// Required top-1 agreement.
    pub min_agreement: f64,
    /// Precisions considered.
    pub precisions: Vec<String>,
    /// All candidates.
    pub candidates: Vec<Measured>,
    /// Index of the chosen candidate, if any fits.
    pub chosen: Option<usize>,
    /// Kept latent indices of the chosen candidate.
    pub chosen_latents: Option<Vec<usize>>,
    /// True when the chosen model is a recovered student (its checkpoint is under `students/`).
    pub chosen_recovered: bool,
    /// Students trained by `--recover`.
    pub students: Vec<Student>,
    /// Files written.
    pub files: Vec<String>,
    /// Table policy used for every candidate, chosen from the board's memory
    /// ([`tables_for_board`]), and why.
    pub tables: String,
}

/// `sample` (the model's data input) with an `output_indices` tensor for the positions `rows`,
/// in the order `session` takes its inputs.
fn with_indices(session: &Session, sample: &[Tensor], rows: Option<&[usize]>) -> Result<Vec<Tensor>> {
    let Some(rows) = rows else { return Ok(sample.to_vec()) };
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let idx = perceiver_edge_runtime::tensor(&[idx.len()], &idx).context("output_indices tensor")?;
    let mut data = sample.iter();
    session
        .inputs()
        .iter()
        .map(|spec| {
            if spec.name == "output_indices" {
                Ok(idx.clone())
            } else {
                data.next().cloned().with_context(|| format!("no calibration data for input `{}`", spec.name))
            }
        })
        .collect()
}

fn first_output(
    session: &mut Session,
    samples: &[Vec<perceiver_edge_runtime::Tensor>],
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut outs = vec![];
    let mut row = 1;
    for s in samples {
        let y = session.run(s.clone())?.remove(0);
        row = *y.shape().last().unwrap_or(&1);
        outs.push(to_vec::<f32>(&y).context("the model's first output is not f32")?);
    }
    Ok((outs, row))
}

/// The table policy for a board with `budget_bytes` of memory, from the summary of the `auto`
/// export: `all` when the model with every table (the auto model plus the skipped tables'
/// bytes, an upper bound) and twice its largest activation fit the budget; `auto` when only the
/// auto model does; `none` when even that does not (tables are the first memory given up).
/// Returns the policy and why, for the report.
pub fn tables_for_board(auto: &perceiver_edge_export::Summary, budget_bytes: f64) -> (Tables, String) {
    let act = 2.0 * auto.largest_activation.1 as f64;
    let with_auto = auto.weight_bytes as f64 + act;
    let skipped: usize = auto.table_decisions.iter().filter(|d| !d.kept).map(|d| d.bytes).sum();
    let with_all = with_auto + skipped as f64;
    let mib = |b: f64| b / 1048576.0;
    if with_auto > budget_bytes {
        (
            Tables::None,
            format!(
                "none: with its tables the model needs {:.1} MiB, over the board's {:.0} MiB",
                mib(with_auto),
                mib(budget_bytes)
            ),
        )
    } else if skipped > 0 && with_all <= budget_bytes {
        (Tables::All, format!("all: every table fits ({:.1} MiB of {:.0} MiB)", mib(with_all), mib(budget_bytes)))
    } else {
        (Tables::Auto, format!("auto: {:.1} MiB of {:.0} MiB", mib(with_auto), mib(budget_bytes)))
    }
}

/// Runs the search; see the crate documentation.
pub fn tune(o: &TuneOptions) -> Result<Report> {
    let board = Profile::load(&o.target)?;
    let host_arch = std::env::consts::ARCH.to_string();
    let host_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let host_profile_path = o.host_profile.clone().or_else(|| {
        let p = o.target.parent()?.join("x86-64-host.toml");
        (host_arch == "x86_64" && p.is_file()).then_some(p)
    });
    let host_profile = host_profile_path.as_deref().map(Profile::load).transpose()?;
    let judge_measured = board.arch.replace('-', "_") == host_arch;
    let ck = Checkpoint::open(&o.checkpoint)?;
    if o.recover.is_some() {
        distill::check_head(&ck)?;
    }
    let auto = perceiver_edge_export::build(&ck, &o.export)?;
    let (tables, tables_reason) = tables_for_board(&auto.summary, board.memory_mb * 1048576.0);
    let mut base = ExportOptions { latents: None, blocks: None, decode_subset: None, ..o.export.clone() };
    base.perf.tables = tables;
    let full = if tables == Tables::Auto { auto } else { perceiver_edge_export::build(&ck, &base)? };
    let n = *full.summary.dims.get("N").context("model has no latent array")?;
    let trained_blocks = full.summary.depth.0;
    let cal = calib::load(&o.calibrate, o.labels.as_deref(), &full.graph.input_specs())?;
    cal.check_targets(&full.graph.outputs.first().context("the model has no output")?.shape)?;
    let (select, validate) = cal.split();
    let positions = split::choosable_positions(Head::of(&ck)?, &full.summary);
    let cands = candidates(&o.axes, n, trained_blocks, board.threads, host_cores, positions)?;
    // Everything is written into a work folder next to OUT and moved into OUT at the end: a
    // failure leaves OUT as it was.
    let work = WorkDir::create(&o.out, "tune")?;

    let bar =
        if o.progress { indicatif::ProgressBar::new(cands.len() as u64 + 2) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}").expect("template"));
    bar.set_message("host micro-benchmark");
    let max_threads = cands.iter().map(|c| c.threads).max().unwrap_or(1).min(host_cores);
    let rates = cost::measure_host(host_profile.as_ref(), max_threads)?;
    bar.inc(1);
    bar.set_message("latent importance");
    let importance = analysis::latent_importance(&ck, &base, &select.samples)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
    bar.inc(1);

    let mut reference = Session::from_bytes(&full.to_bytes())?;
    let (ref_out, row) = first_output(&mut reference, &validate.samples)?;
    drop(reference);
    let dir = work.path.join("candidates");
    std::fs::create_dir(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut measured = vec![];
    let mut files_of = vec![];
    let mut features = vec![];
    type Built = ((usize, usize, PrecisionChoice, Option<usize>), PathBuf, Fidelity, cost::Features, Vec<Tensor>);
    let mut last: Option<Built> = None;
    for c in &cands {
        bar.set_message(format!("K{} B{} T{} {}", c.latents, c.blocks, c.threads, c.precision));
        let key = (c.latents, c.blocks, c.precision, c.queries);
        let (path, fid, feat, bench_inputs) = match &last {
            Some((k, p, f, ft, b)) if *k == key => (p.clone(), f.clone(), ft.clone(), b.clone()),
            _ => {
                let keep = analysis::select_latents(&importance, c.latents)?;
                let opts = ExportOptions {
                    latents: (c.latents < n).then_some(keep),
                    blocks: (c.blocks != trained_blocks).then_some(c.blocks),
                    decode_subset: c.queries,
                    grid_subset: c.queries.is_some(),
                    ..base.clone()
                };
                let e = export_at((&ck, &o.checkpoint), &opts, c.precision, &o.calibrate)?;
                let q = c.queries.map_or(String::new(), |k| format!("-q{k}"));
                let path = dir.join(format!("k{}-b{}-{}{q}.onnx", c.latents, c.blocks, c.precision));
                e.write(&path)?;
                let mut s = Session::load(&path)?;
                // A subset decodes evenly spaced positions; the reference is the full model there.
                let rows: Option<Vec<usize>> =
                    c.queries.zip(positions).map(|(k, all)| (0..k).map(|i| i * all / k).collect());
                let samples: Vec<Vec<Tensor>> =
                    validate.samples.iter().map(|x| with_indices(&s, x, rows.as_deref())).collect::<Result<_>>()?;
                let (out, _) = first_output(&mut s, &samples)?;
                let fid = match &rows {
                    Some(rows) => {
                        let at = |y: &Vec<f32>| rows.iter().flat_map(|&r| y[r * row..(r + 1) * row].to_vec()).collect();
                        let reference: Vec<Vec<f32>> = ref_out.iter().map(at).collect();
                        fidelity(&reference, &out, row, None)
                    }
                    None => fidelity(&ref_out, &out, row, validate.labels.as_deref()),
                };
                let feat = cost::Features::of(&e.graph, &e.summary);
                let bench_inputs = samples[0].clone();
                last = Some((key, path.clone(), fid.clone(), feat.clone(), bench_inputs.clone()));
                (path, fid, feat, bench_inputs)
            }
        };
        // The heap this process already holds (calibration data, graphs) is not the model's.
        let before = perceiver_edge_runtime::alloc::in_use().unwrap_or(0);
        let r = bench::bench(
            &path,
            Some(bench_inputs.clone()),
            &bench::BenchOptions { runs: o.runs, duration: None, warmup: o.warmup, rate_hz: None, threads: c.threads },
        )?;
        let memory_bytes = match r.memory.peak_heap {
            Some(p) => p.saturating_sub(before),
            None => r.memory.peak_rss.unwrap_or(0),
        };
        measured.push(Measured {
            candidate: *c,
            p50_ms: r.latency_ms.p50,
            p99_ms: r.latency_ms.p99,
            memory_bytes,
            measured_speedup: None,
            predicted_host: rates.predict(&feat, c.threads, None),
            predicted_board: rates.predict(&feat, c.threads, Some(&board)),
            flops: feat.flops,
            products: feat.products,
            fidelity: fid,
            fits: false,
            pareto: false,
            recovered: None,
        });
        files_of.push(path);
        features.push(feat);
        bar.inc(1);
    }
    perceiver_edge_runtime::set_threads(1)?;
    // Where a candidate was also measured at 1 thread, its own speed-up replaces the
    // micro-benchmark's in the predictions (a model whose threads measured slower is predicted
    // slower, on the host and on the board).
    let single: Vec<Option<f64>> = measured
        .iter()
        .map(|m| {
            let same = |x: &&Measured| {
                let (a, b) = (x.candidate, m.candidate);
                (a.latents, a.blocks, a.precision, a.queries, a.threads)
                    == (b.latents, b.blocks, b.precision, b.queries, 1)
            };
            measured.iter().find(same).map(|x| x.p50_ms)
        })
        .collect();
    for ((m, one), feat) in measured.iter_mut().zip(single).zip(&features) {
        if let Some(one) = one.filter(|_| m.candidate.threads > 1 && m.p50_ms > 0.0) {
            let speedup = one / m.p50_ms;
            m.measured_speedup = Some(speedup);
            m.predicted_host = rates.predict_measured(feat, m.candidate.threads, None, speedup);
            m.predicted_board = rates.predict_measured(feat, m.candidate.threads, Some(&board), speedup);
        }
    }

    let budget_bytes = board.memory_mb * 1048576.0;
    let judged: Vec<(f64, f64)> = measured
        .iter()
        .map(|m| {
            if judge_measured {
                (m.p99_ms, m.memory_bytes as f64)
            } else {
                (m.predicted_board.latency_ms, m.predicted_board.memory_bytes)
            }
        })
        .collect();
    // Pareto-optimal within each query count (a smaller count answers a smaller question).
    let flags: Vec<bool> = measured
        .iter()
        .map(|m| {
            let group: Vec<&Measured> =
                measured.iter().filter(|x| x.candidate.queries == m.candidate.queries).collect();
            let pts: Vec<(f64, f64, f64)> =
                group.iter().map(|x| (x.p99_ms, x.memory_bytes as f64, x.fidelity.top1_agreement)).collect();
            let i = group.iter().position(|x| std::ptr::eq(*x, m)).expect("in its own group");
            pareto(&pts)[i]
        })
        .collect();
    for ((m, p), (l, mem)) in measured.iter_mut().zip(flags).zip(&judged) {
        m.pareto = p;
        m.fits = *l <= board.deadline_ms && *mem <= budget_bytes;
    }
    let mut students = vec![];
    if let Some(settings) = &o.recover {
        // Every pruned candidate that loses accuracy (a superset of the Pareto ones: pruned-only
        // agreement is not monotone in the budget, so a dominated budget can win once recovered),
        // one student per (latents, blocks) budget, trained on the selection half and measured on
        // the validation half like every candidate.
        let mut budgets: Vec<(usize, usize)> = vec![];
        for m in &measured {
            let c = m.candidate;
            let pruned = c.latents < n || c.blocks < trained_blocks;
            if pruned && m.fidelity.top1_agreement < o.min_agreement && !budgets.contains(&(c.latents, c.blocks)) {
                budgets.push((c.latents, c.blocks));
            }
        }
        let sdir = work.path.join("students");
        if !budgets.is_empty() {
            std::fs::create_dir(&sdir).with_context(|| format!("{}: cannot create", sdir.display()))?;
        }
        for (k, b) in budgets {
            let name = format!("k{k}-b{b}");
            let dest = sdir.join(&name);
            std::fs::create_dir(&dest).with_context(|| format!("{}: cannot create", dest.display()))?;
            let budget = distill::Budget { kept: analysis::select_latents(&importance, k)?, blocks: b };
            bar.set_message(format!("recovering K{k} B{b}"));
            let record =
                distill::train_student(&o.checkpoint, &budget, &select, &dest, settings, &select.source, &mut |p| {
                    bar.set_message(format!("recovering K{k} B{b}: step {}/{} loss {:.4}", p.step, p.steps, p.loss))
                })?;
            let sck = Checkpoint::open(&dest)?;
            let mut built: Vec<(PrecisionChoice, PathBuf, Fidelity)> = vec![];
            for i in 0..measured.len() {
                let c = measured[i].candidate;
                if (c.latents, c.blocks) != (k, b) {
                    continue;
                }
                let (path, fid) = match built.iter().find(|x| x.0 == c.precision) {
                    Some((_, p, f)) => (p.clone(), f.clone()),
                    None => {
                        let e = export_at((&sck, &dest), &base, c.precision, &o.calibrate)?;
                        let path = dir.join(format!("recovered-k{k}-b{b}-{}.onnx", c.precision));
                        e.write(&path)?;
                        let mut s = Session::load(&path)?;
                        let (out, _) = first_output(&mut s, &validate.samples)?;
                        let fid = fidelity(&ref_out, &out, row, validate.labels.as_deref());
                        built.push((c.precision, path.clone(), fid.clone()));
                        (path, fid)
                    }
                };
                measured[i].recovered = Some(fid);
                if measured[i].recovery_helped() {
                    files_of[i] = path;
                }
            }
            students.push(Student {
                latents: k,
                blocks: b,
                folder: o.out.join("students").join(&name).display().to_string(),
                record,
            });
        }
    }
    // Pareto flags on the fidelity each candidate now stands for (recovered where recovered).
    let flags = pareto(
        &measured.iter().map(|m| (m.p99_ms, m.memory_bytes as f64, m.effective().top1_agreement)).collect::<Vec<_>>(),
    );
    for (m, p) in measured.iter_mut().zip(flags) {
        m.pareto = p;
    }
    bar.finish_and_clear();
    let lat: Vec<f64> = judged.iter().map(|j| j.0).collect();
    let chosen = choose(&measured, &lat, o.min_agreement);
    let mut files = vec![];
    let chosen_recovered = chosen.is_some_and(|i| measured[i].recovery_helped());
    let chosen_latents = match chosen {
        Some(i) => {
            let model = work.path.join("model.onnx");
            std::fs::rename(&files_of[i], &model).with_context(|| format!("{}: cannot write", model.display()))?;
            files.push(o.out.join("model.onnx").display().to_string());
            Some(analysis::select_latents(&importance, measured[i].candidate.latents)?)
        }
        None => None,
    };
    let title = format!("{} on {} (measured here; deadline from profile)", o.checkpoint.display(), board.name);
    let svg_path = work.path.join("tradeoff.svg");
    std::fs::write(&svg_path, plot::svg(&measured, chosen, board.deadline_ms, &title))
        .with_context(|| format!("{}: cannot write", svg_path.display()))?;
    files.push(o.out.join("tradeoff.svg").display().to_string());
    let acc_path = work.path.join("accuracy.svg");
    let acc_title = format!("{}: accuracy against compute", o.checkpoint.display());
    std::fs::write(&acc_path, plot::accuracy_svg(&measured, &acc_title))
        .with_context(|| format!("{}: cannot write", acc_path.display()))?;
    files.push(o.out.join("accuracy.svg").display().to_string());
    for st in &students {
        files.push(st.folder.clone());
    }
    let json_path = work.path.join("report.json");
    files.push(o.out.join("report.json").display().to_string());
    let report = Report {
        checkpoint: o.checkpoint.display().to_string(),
        target: board.clone(),
        host: Host { arch: host_arch, cores: host_cores },
        judged_on: if judge_measured { "measured".into() } else { "predicted for the board".into() },
        host_rates: rates,
        calibration: CalibrationUse {
            source: cal.source.clone(),
            selection: select.samples.len(),
            validation: validate.samples.len(),
        },
        latent_importance: importance,
        latent_order: order,
        min_agreement: o.min_agreement,
        precisions: {
            let mut p: Vec<String> = vec![];
            for c in &cands {
                if !p.contains(&c.precision.name()) {
                    p.push(c.precision.name());
                }
            }
            p
        },
        candidates: measured,
        chosen,
        chosen_latents,
        chosen_recovered,
        students,
        files,
        tables: tables_reason,
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("{}: cannot write", json_path.display()))?;
    work.finish()?;
    Ok(report)
}

/// The Pareto table and the choice, as printed by `perceiver-edge tune`.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mib = |b: f64| b / 1048576.0;
    let _ = writeln!(
        s,
        "board {} ({}, {} cores; deadline {} ms, memory {} MiB); host {} x{}; fit judged on {}",
        r.target.name,
        r.target.arch,
        r.target.cores,
        r.target.deadline_ms,
        r.target.memory_mb,
        r.host.arch,
        r.host.cores,
        r.judged_on
    );
    if r.judged_on != "measured" && r.precisions.iter().any(|p| p != "f32") {
        let _ = writeln!(
            s,
            "precisions: not measured on the board; f16 and int8 products are predicted at {}x and {}x \
             f32's rate (the board's instruction set: its peak, an upper bound), their fidelity measured on \
             this {} host's kernels (x86 computes f16 in f32, an fp16 ARM board accumulates in f16): check \
             the chosen file there with `perceiver-edge bench` and `compare`",
            r.target.peak_ratio_f16, r.target.peak_ratio_int8, r.host.arch
        );
    }
    let _ = writeln!(s, "tables {}", r.tables);
    let _ = writeln!(
        s,
        "host rates: {:.2} GFLOP/s per thread ({:.0} % of the host profile's peak per core, {:.0} % carried to \
         boards), {:.2} us per node, {:.1} GB/s copy; thread speed-up measured {}",
        r.host_rates.gflops_per_thread,
        100.0 * r.host_rates.gflops_per_thread / r.host_rates.host_peak_gflops_per_core,
        100.0 * r.host_rates.efficiency(),
        r.host_rates.us_per_node,
        r.host_rates.bandwidth_gbs,
        r.host_rates
            .thread_speedup
            .iter()
            .enumerate()
            .map(|(i, s)| format!("T{} {s:.2}x", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let w = r.candidates.iter().map(|m| m.label().len()).max().unwrap_or(0).max(13);
    let _ = writeln!(
        s,
        "{:<w$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>7} {:>7} {:>7} {:>6} {:>4}",
        "candidate",
        "MFLOPs",
        "p50 ms",
        "p99 ms",
        "pred ms",
        "board ms",
        "heap MiB",
        "pred MiB",
        "top-1 %",
        "cos min",
        "acc %",
        "rec %",
        "rec acc",
        "pareto",
        "fits"
    );
    for (i, m) in r.candidates.iter().enumerate() {
        let f = &m.fidelity;
        let _ = writeln!(
            s,
            "{:<w$} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.2} {:>9.2} {:>7.2} {:>8.5} {:>7} {:>7} {:>7} {:>6} {:>4}{}",
            m.label(),
            m.flops as f64 / 1e6,
            m.p50_ms,
            m.p99_ms,
            m.predicted_host.latency_ms,
            m.predicted_board.latency_ms,
            mib(m.memory_bytes as f64),
            mib(m.predicted_host.memory_bytes),
            100.0 * f.top1_agreement,
            f.min_cosine,
            f.accuracy.map_or("-".into(), |a| format!("{:.2}", 100.0 * a)),
            m.recovered.as_ref().map_or("-".into(), |r| format!("{:.2}", 100.0 * r.top1_agreement)),
            m.recovered.as_ref().and_then(|r| r.accuracy).map_or("-".into(), |a| format!("{:.2}", 100.0 * a)),
            if m.pareto { "*" } else { "" },
            if m.fits { "yes" } else { "no" },
            if Some(i) == r.chosen { "  <- chosen" } else { "" }
        );
    }
    match r.chosen {
        Some(i) => {
            let _ = writeln!(
                s,
                "chosen {}{} (top-1 agreement >= {:.1} % required); latents kept {:?}",
                r.candidates[i].label(),
                if r.chosen_recovered { ", recovered by distillation" } else { "" },
                100.0 * r.min_agreement,
                r.chosen_latents.as_deref().unwrap_or(&[])
            );
        }
        None => {
            let _ = writeln!(s, "no candidate fits the board's deadline and memory budget: no model written");
        }
    }
    for f in &r.files {
        let _ = writeln!(s, "wrote {f}");
    }
    s
}

/// Loads calibration data for `ck` exported with `opts` (for `export --latents K --calibrate`).
pub fn calibration_for(ck: &Checkpoint, opts: &ExportOptions, data: &Path) -> Result<calib::Calibration> {
    let g = perceiver_edge_export::build(ck, opts)?;
    calib::load(data, None, &g.graph.input_specs())
}

/// Latents an export budget kept, chosen by [`analysis::latent_importance`].
#[derive(Clone, Debug)]
pub struct LatentChoice {
    /// Kept latent indices, ascending.
    pub kept: Vec<usize>,
    /// Trained latents.
    pub trained: usize,
    /// Calibration samples the choice was made on.
    pub samples: usize,
}

/// A candidate's graph: checkpoint `ck` (read from folder `dir`) exported with `opts` at `choice`
/// (the precision's rewrite options, the build, then its quantisation pass; int8-static
/// calibrated on `calibrate`).
fn export_at(
    (ck, dir): (&Checkpoint, &Path),
    opts: &ExportOptions,
    choice: PrecisionChoice,
    calibrate: &Path,
) -> Result<perceiver_edge_export::Exported> {
    let PrecisionChoice { precision, reduce_range } = choice;
    let mut e =
        perceiver_edge_export::build_deferred(ck, &perceiver_edge_export::options_for_precision(opts, precision))?;
    let q = QuantOptions {
        precision,
        reduce_range,
        calibrate: (precision == Precision::Int8Static).then(|| calibrate.to_path_buf()),
        ..Default::default()
    };
    e.quantize(&q, dir, &mut |_, _| {})?;
    Ok(e)
}

/// The `export` pipeline shared by the CLI and the Python package: precision-dependent rewrite
/// options, `latents` kept by importance on the calibration data (one `q.calibrate` serves the
/// latent ranking and, for int8-static only, the activation scales), build, then quantise.
/// `progress(done, total)` follows int8-static calibration.
pub fn export_checkpoint(
    checkpoint: &Path,
    mut opts: ExportOptions,
    latents: Option<usize>,
    mut q: QuantOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(perceiver_edge_export::Exported, Option<LatentChoice>)> {
    let data = q.calibrate.clone();
    if latents.is_some() && q.precision != Precision::Int8Static {
        q.calibrate = None;
    }
    let ck = Checkpoint::open(checkpoint)?;
    // Precomputed position tables stay f32 at run time next to quantised weights; a
    // reduced-precision export keeps them only where they pay at its precision (tables.rs).
    opts = perceiver_edge_export::options_for_precision(&opts, q.precision);
    let mut choice = None;
    match (latents, &data) {
        (Some(k), Some(data)) => {
            let cal = calibration_for(&ck, &opts, data)?;
            let imp = analysis::latent_importance(&ck, &opts, &cal.samples)?;
            let kept = analysis::select_latents(&imp, k)?;
            choice = Some(LatentChoice { kept: kept.clone(), trained: imp.len(), samples: cal.samples.len() });
            opts.latents = Some(kept);
        }
        (Some(_), None) => bail!("--latents K chooses latents on calibration data: give --calibrate DATA"),
        (None, _) => {}
    }
    let mut exported = perceiver_edge_export::build_deferred(&ck, &opts)?;
    exported.quantize(&q, checkpoint, progress)?;
    Ok((exported, choice))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_board_memory() {
        use perceiver_edge_export::summary::TableDecision;
        let ck =
            Checkpoint::open(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits")).unwrap();
        let mut s = perceiver_edge_export::build(&ck, &ExportOptions::default()).unwrap().summary;
        let need = (s.weight_bytes + 2 * s.largest_activation.1) as f64;
        assert_eq!(tables_for_board(&s, need * 0.9).0, Tables::None);
        assert_eq!(tables_for_board(&s, need * 1.1).0, Tables::Auto, "nothing skipped: auto is all");
        s.table_decisions.push(TableDecision { pass: "x".into(), bytes: 1 << 20, ..Default::default() });
        assert_eq!(tables_for_board(&s, need + 1.5 * 1048576.0).0, Tables::All);
        assert_eq!(tables_for_board(&s, need + 0.5 * 1048576.0).0, Tables::Auto);
    }

    #[test]
    fn candidate_grid() {
        let c = candidates(&Axes::default(), 16, 1, 4, 2, None).unwrap();
        let lat: Vec<usize> = c.iter().map(|c| c.latents).collect();
        assert_eq!(lat, vec![16, 16, 12, 12, 8, 8, 4, 4, 2, 2]);
        assert!(c.iter().all(|c| c.blocks == 1));
        assert_eq!(c[0].threads, 1);
        assert_eq!(c[1].threads, 2, "board threads capped at the host's cores");
        let c = candidates(&Axes::default(), 4, 8, 1, 8, None).unwrap();
        let blocks: Vec<usize> = c.iter().filter(|c| c.latents == 4).map(|c| c.blocks).collect();
        assert_eq!(blocks, vec![8, 4, 2, 1]);
        assert_eq!(c.iter().map(|c| c.latents).max(), Some(4));
        assert!(c.iter().all(|c| c.latents >= 1 && c.threads == 1));
        let axes = Axes {
            latents: Some(vec![3, 8, 3]),
            blocks: Some(vec![2]),
            threads: Some(vec![1]),
            precisions: Some(vec!["f32".into(), "int8".into(), "f32".into(), "int8-7bit".into()]),
            queries: None,
        };
        let c = candidates(&axes, 8, 1, 4, 4, None).unwrap();
        assert_eq!(c.len(), 6);
        let names: Vec<String> = c.iter().map(|c| c.precision.name()).collect();
        assert_eq!(names[..3], ["f32", "int8", "int8-7bit"]);
        assert_eq!((c[1].precision.reduce_range, c[2].precision.reduce_range, c[3].latents), (false, true, 3));
        let bad = Axes { precisions: Some(vec!["f8".into()]), ..Default::default() };
        assert!(candidates(&bad, 8, 1, 1, 1, None).unwrap_err().to_string().contains("unknown precision \"f8\""));
        assert!(candidates(&Axes { latents: Some(vec![9]), ..Default::default() }, 8, 1, 1, 1, None).is_err());
        assert!(candidates(&Axes { blocks: Some(vec![0]), ..Default::default() }, 8, 1, 1, 1, None).is_err());
        // Query axis: every output, then the default counts below it, for heads that choose.
        let q = |c: Vec<Candidate>| c.iter().map(|c| c.queries).collect::<Vec<_>>();
        let one = Axes { latents: Some(vec![8]), threads: Some(vec![1]), ..Default::default() };
        assert_eq!(q(candidates(&one, 8, 1, 1, 1, Some(256)).unwrap()), vec![None, Some(64)]);
        assert_eq!(q(candidates(&one, 8, 1, 1, 1, Some(182528)).unwrap()), vec![None, Some(1024), Some(64)]);
        assert_eq!(q(candidates(&one, 8, 1, 1, 1, None).unwrap()), vec![None]);
        let asked = Axes { queries: Some(vec![16, 256, 16]), ..one.clone() };
        assert_eq!(q(candidates(&asked, 8, 1, 1, 1, Some(256)).unwrap()), vec![None, Some(16)], "256 of 256 is all");
        let e = candidates(&Axes { queries: Some(vec![300]), ..one.clone() }, 8, 1, 1, 1, Some(256)).unwrap_err();
        assert!(e.to_string().contains("--queries 300: expected 1..=256"), "{e}");
        let e = candidates(&Axes { queries: Some(vec![4]), ..one }, 8, 1, 1, 1, None).unwrap_err();
        assert!(e.to_string().contains("decodes its outputs at once"), "{e}");
    }

    #[test]
    fn pareto_front() {
        // (latency, memory, fidelity)
        let pts = [(1.0, 1.0, 0.9), (2.0, 2.0, 1.0), (2.0, 2.0, 0.9), (1.0, 1.0, 0.9), (0.5, 3.0, 0.5)];
        assert_eq!(pareto(&pts), vec![true, true, false, true, true]);
    }

    fn m(latents: usize, threads: usize, top1: f64, fits: bool) -> Measured {
        let p = cost::Predicted { latency_ms: 0.0, memory_bytes: 0.0 };
        Measured {
            candidate: Candidate { latents, blocks: 1, threads, precision: Precision::F32.into(), queries: None },
            p50_ms: 0.0,
            p99_ms: 0.0,
            memory_bytes: 0,
            measured_speedup: None,
            predicted_host: p,
            predicted_board: p,
            flops: 0,
            products: Default::default(),
            fidelity: Fidelity { top1_agreement: top1, mean_cosine: top1, ..Default::default() },
            fits,
            pareto: false,
            recovered: None,
        }
    }

    #[test]
    fn a_recovery_that_did_not_help_is_not_used() {
        let mut better = m(8, 1, 0.8, true);
        better.recovered = Some(Fidelity { top1_agreement: 0.95, ..Default::default() });
        assert!(better.recovery_helped());
        assert_eq!(better.effective().top1_agreement, 0.95);
        let mut worse = m(48, 1, 0.989, true);
        worse.recovered = Some(Fidelity { top1_agreement: 0.981, ..Default::default() });
        assert!(!worse.recovery_helped());
        assert_eq!(worse.effective().top1_agreement, 0.989);
        // The choice goes by what each budget stands for: the pruned 48 here, the student for 8.
        assert_eq!(choose(&[worse.clone(), better.clone()], &[2.0, 1.0], 0.985), Some(0));
        assert_eq!(choose(&[worse, better], &[2.0, 1.0], 0.95), Some(1));
    }

    #[test]
    fn choice_is_the_fastest_faithful_fitting_candidate() {
        let c = [m(16, 1, 1.0, true), m(8, 1, 0.995, true), m(4, 1, 0.9, true), m(2, 1, 0.5, false)];
        let lat = [4.0, 2.0, 1.0, 0.5];
        assert_eq!(choose(&c, &lat, 0.99), Some(1));
        assert_eq!(choose(&c, &lat, 1.0), Some(0));
        // None faithful enough: the most faithful that fits.
        let c2 = [m(4, 1, 0.9, true), m(2, 1, 0.8, true), m(1, 1, 0.99, false)];
        assert_eq!(choose(&c2, &[2.0, 1.0, 0.5], 0.95), Some(0));
        // Nothing fits.
        assert_eq!(choose(&[m(4, 1, 1.0, false)], &[1.0], 0.9), None);
        // Latency tie: fewer threads.
        let c3 = [m(4, 2, 1.0, true), m(4, 1, 1.0, true)];
        assert_eq!(choose(&c3, &[1.0, 1.0], 0.9), Some(1));
        // Within SPEED_TIE of the fastest: the more faithful (as 7-bit int8 weights against 8-bit
        // ones where both run equally fast); the faster only when it pays by more.
        let c5 = [m(4, 1, 0.995, true), m(4, 1, 1.0, true)];
        assert_eq!(choose(&c5, &[1.0, 1.04], 0.99), Some(1));
        assert_eq!(choose(&c5, &[1.0, 1.06], 0.99), Some(0));
        // Equal agreement: the higher mean cosine, then the faster.
        let (mut a, mut b) = (m(4, 2, 1.0, true), m(4, 1, 1.0, true));
        (a.fidelity.mean_cosine, b.fidelity.mean_cosine) = (0.999, 0.998);
        assert_eq!(choose(&[a.clone(), b.clone()], &[1.02, 1.0], 0.99), Some(0));
        b.fidelity.mean_cosine = 0.999;
        assert_eq!(choose(&[a, b], &[1.02, 1.0], 0.99), Some(1));
        // A candidate decoding fewer positions is not chosen while every output is on the axis.
        let mut sub = m(4, 1, 1.0, true);
        sub.candidate.queries = Some(64);
        let c4 = [m(8, 1, 1.0, true), sub.clone()];
        assert_eq!(choose(&c4, &[2.0, 1.0], 0.9), Some(0));
        // Asked for 64 and 16 positions only: the choice decodes 64.
        let mut sub16 = sub.clone();
        sub16.candidate.queries = Some(16);
        assert_eq!(choose(&[sub16, sub], &[0.5, 1.0], 0.9), Some(1));
    }
}
