//! perceiver-edge exporter (host side): reads a trained PerceiverIO checkpoint in Hugging Face
//! layout (`config.json` + `model.safetensors`) and writes one self-contained, fixed-shape ONNX
//! graph that reproduces transformers' forward pass.
//!
//! Layers, low to high; each module uses only those below it:
//!
//! - [`error`], [`options`] (what the user asks), [`checkpoint`] (what the user has);
//! - [`ir`]: the [`Graph`] and its ONNX serialisation;
//! - [`model`]: the PerceiverIO concepts (blocks, encoder, decoder, preprocessors, positions,
//!   budget knobs) emitting nodes into a graph; [`summary`] describes a built graph;
//! - [`heads`]: one file per transformers head family, and the dispatch [`heads::build_graph`];
//! - [`passes`]: exact rewrites, their tables, and quantisation ([`passes::quant`]);
//! - this file: [`build`] / [`export`] (options -> checkpoint -> heads -> model -> ir -> passes
//!   -> bytes); above it, [`analysis`] (latent importance, runs whole models) and [`pack`] (the
//!   microcontroller weight pack).
//!
//! ```no_run
//! use perceiver_edge_export::{export, ExportOptions};
//! let out = export("models/digits".as_ref(), &ExportOptions::default())?;
//! out.write("digits.onnx".as_ref())?;
//! println!("{}", out.summary);
//! # Ok::<(), perceiver_edge_export::Error>(())
//! ```

pub mod analysis;
pub mod checkpoint;
pub mod error;
pub mod heads;
pub mod ir;
pub mod model;
pub mod options;
pub mod pack;
pub mod passes;
pub mod split;
pub mod summary;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use heads::Head;
pub use ir::Graph;
pub use options::{ExportOptions, Tables};
pub use passes::quant::{calibrate, KeepF32};
/// Metadata keys (shared with the runtime, which reads them).
pub use perceiver_edge_runtime::metadata;
pub use perceiver_edge_runtime::precision::Precision;
pub use summary::Summary;

use std::path::{Path, PathBuf};

/// An exported model: the final graph and its summary.
pub struct Exported {
    /// The graph after all passes.
    pub graph: Graph,
    /// Architecture, cost and memory.
    pub summary: Summary,
}

impl Exported {
    /// ONNX protobuf bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        ir::onnx::to_bytes(&self.graph)
    }

    /// Writes the ONNX file atomically ([`perceiver_edge_runtime::fsio::write_atomic`]), so a
    /// failure never leaves a partial model behind. A graph that would pass protobuf's 2 GiB
    /// limit is written with external data (see [`Exported::write_with`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        self.write_with(path, false).map(|_| ())
    }

    /// The side file an external-data export of `path` writes: `path` with `.data` appended
    /// (`model.onnx` -> `model.onnx.data`), in the same folder.
    pub fn external_data_path(path: &Path) -> PathBuf {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "model.onnx".into());
        name.push(".data");
        path.with_file_name(name)
    }

    /// Writes the ONNX file; with `external_data`, or when the single file would pass
    /// protobuf's 2 GiB limit ([`ir::onnx::needs_external_data`]), the weights go to ONNX's
    /// standard external data in one side file next to it ([`Exported::external_data_path`];
    /// see [`ir::onnx::write_external`]). Both files are staged and then committed together
    /// ([`perceiver_edge_runtime::fsio::stage_with`]): on failure neither is written. Returns
    /// the side file's path when one was written.
    pub fn write_with(&self, path: &Path, external_data: bool) -> Result<Option<PathBuf>> {
        use perceiver_edge_runtime::fsio;
        if !external_data && !ir::onnx::needs_external_data(&self.graph) {
            // Streamed from the graph: the weights are not copied into a protobuf first.
            fsio::write_atomic_with(path, |w| ir::onnx::write_single(&self.graph, w))
                .map_err(|e| Error::write(path, e))?;
            return Ok(None);
        }
        let data_path = Self::external_data_path(path);
        let location = data_path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid(format!("{}: the output name must be valid UTF-8", path.display())))?
            .to_string();
        let mut model_bytes = vec![];
        let data = fsio::stage_with(&data_path, |w| {
            ir::onnx::write_external(&self.graph, &mut model_bytes, w, &location).map(|_| ())
        })
        .map_err(|e| Error::write(&data_path, e))?;
        let model = fsio::stage_with(path, |w| w.write_all(&model_bytes)).map_err(|e| Error::write(path, e))?;
        // The data first: a model file never points at a side file that is not there yet.
        data.commit().map_err(|e| Error::write(&data_path, e))?;
        model.commit().map_err(|e| Error::write(path, e))?;
        Ok(Some(data_path))
    }
}

/// Builds the graph of an opened checkpoint and runs the default passes. For a graph that will
/// be stored below f32 with `--tables auto` ([`passes::PerfOptions::stored_weight_bytes`]), the
/// tables `auto` keeps in f32 are kept only where they pay at the stored precision
/// ([`passes::tables::pay_at_stored_precision`]): the passes run without them and with them,
/// each on a graph built with its weights on disk (see [`build_deferred`]), and the graph that
/// wins is kept.
pub fn build(ck: &Checkpoint, opts: &ExportOptions) -> Result<Exported> {
    let mut exported = build_deferred(ck, opts)?;
    exported.graph.restore_all()?;
    Ok(exported)
}

/// [`build`], leaving on disk the weights no pass read ([`ir::Graph::defer`]) for a graph that
/// will be stored below f32 with `--tables auto`: it is built with its weight matrices on disk
/// ([`heads::build_graph_deferred`]), the passes read back what they look up
/// (`passes_reading_back`), and [`Exported::quantize`] reads back each of the others when it
/// converts it, so such an export never holds every f32 weight at once (language-perceiver's
/// int8 export: 794 -> 231 MiB peak RSS; the bench model's f16: 41 -> 31). Call
/// [`Exported::quantize`] before writing.
pub fn build_deferred(ck: &Checkpoint, opts: &ExportOptions) -> Result<Exported> {
    let stored = opts
        .perf
        .stored_weight_bytes
        .filter(|&b| b < 4.0 && opts.perf.tables == options::Tables::Auto && !opts.perf.no_rewrites);
    let (mut graph, mut summary, decisions) = match stored {
        None => {
            let (mut graph, summary) = heads::build_graph(ck, opts)?;
            let decisions = passes::run_default(&mut graph, &opts.perf)?;
            (graph, summary, decisions)
        }
        Some(bytes) => {
            let (mut lazy, summary) = heads::build_graph_deferred(ck, opts)?;
            read_back_what_rewrites_read(&mut lazy)?;
            let off = passes::tables::off_at_stored_precision(&opts.perf);
            // One trial graph at a time: the one without tables is run again if it wins.
            let without = passes::tables::StoredCost::of(&passes_reading_back(&mut lazy, &off)?.0, bytes);
            let (with_graph, with_decisions) = passes_reading_back(&mut lazy, &opts.perf)?;
            let with = passes::tables::StoredCost::of(&with_graph, bytes);
            let pay = passes::tables::pay_at_stored_precision(without, with);
            let (graph, mut decisions) = if pay {
                (with_graph, with_decisions)
            } else {
                drop(with_graph);
                passes_reading_back(&mut lazy, &off)?
            };
            let why = passes::tables::stored_reason(without, with);
            for d in decisions.iter_mut().filter(|d| d.reason.starts_with("auto")) {
                if d.kept {
                    d.reason = format!("{}; {why}", d.reason);
                } else if !pay {
                    d.reason = format!("auto: {why}; --tables all keeps them");
                }
            }
            (graph, summary, decisions)
        }
    };
    if let Some(e) = graph.error.take() {
        return Err(Error::invalid(format!("{}: after the rewrites: {e}", ck.dir.display())));
    }
    summary.after_passes(&graph);
    summary.table_decisions = decisions;
    let json = serde_json::to_string(&summary).expect("summary serialises");
    graph.metadata.push((metadata::SUMMARY.into(), json));
    Ok(Exported { graph, summary })
}

/// Reads back into a graph built with its weights on disk the weights the rewrites are known
/// to look up, so [`passes_reading_back`] usually runs the passes once: those read before the
/// first softmax (the table rewrites work on the inputs' side of the encoder's
/// cross-attention) and the inputs of values no graph input reaches (the rewrites evaluate
/// constant queries, a decoder's among them).
fn read_back_what_rewrites_read(lazy: &mut ir::Graph) -> Result<()> {
    let first_softmax = lazy.nodes.iter().position(|n| n.op == "Softmax").unwrap_or(lazy.nodes.len());
    let constant = passes::quant::input_independent(lazy);
    let read: std::collections::BTreeSet<String> = lazy.nodes[..first_softmax]
        .iter()
        .chain(lazy.nodes.iter().filter(|n| n.outputs.iter().any(|o| constant.contains(&o.name))))
        .flat_map(|n| n.inputs.iter().cloned())
        .collect();
    for name in &read {
        lazy.restore(name)?;
    }
    Ok(())
}

/// The default passes run on a copy of `lazy`, a graph built with its weights on disk
/// ([`heads::build_graph_deferred`]): the weights a pass looks up are read back into `lazy`
/// and the passes run again on a fresh copy, until they look up none it lacks. Passes see only
/// data through [`ir::Graph::constant_data`], so the result is what they give on the whole
/// graph, with the weights none of them read still on disk. Should a pass carry a stripped
/// constant into one of its own (a name or shape the checkpoint does not hold), every weight is
/// read back first.
fn passes_reading_back(
    lazy: &mut ir::Graph,
    perf: &passes::PerfOptions,
) -> Result<(ir::Graph, Vec<summary::TableDecision>)> {
    loop {
        let on_disk: std::collections::HashMap<String, Vec<usize>> =
            lazy.stripped().map(|(n, t)| (n.to_string(), t.shape.clone())).collect();
        let mut g = lazy.clone();
        let mark = ir::Graph::stripped_reads();
        let decisions = passes::run_default(&mut g, perf)?;
        let read = ir::Graph::take_stripped_reads_since(mark);
        let carried = g.stripped().any(|(n, t)| on_disk.get(n) != Some(&t.shape));
        if read.is_empty() && !carried {
            return Ok((g, decisions));
        }
        drop(g);
        if carried {
            lazy.restore_all()?;
        } else {
            for name in &read {
                lazy.restore(name)?;
            }
        }
        if lazy.stripped().count() == on_disk.len() {
            // Nothing more to read back: the passes looked up a constant the checkpoint does not give.
            return Err(Error::invalid(format!(
                "a rewrite looked up constant `{}`, which could not be read back",
                read.first().map_or("?", String::as_str)
            )));
        }
    }
}

/// `opts` adjusted for a graph that will be stored at `precision`: int8 / q4 graphs skip
/// `few_query_attention` (see [`passes::PerfOptions::quantised`]); with `--tables auto`, graphs
/// stored below f32 keep the table rewrites only where they pay at that precision (decided on
/// the built graph, see [`build`]).
pub fn options_for_precision(opts: &ExportOptions, precision: Precision) -> ExportOptions {
    let mut o = opts.clone();
    o.perf.quantised = precision.is_integer();
    o.perf.stored_weight_bytes = (precision.weight_bytes() < 4.0).then(|| precision.weight_bytes());
    o
}

/// Opens checkpoint directory `dir` and exports it with `opts`.
pub fn export(dir: &Path, opts: &ExportOptions) -> Result<Exported> {
    build(&Checkpoint::open(dir)?, opts)
}

/// Precision options of `export` (`--precision`, `--keep-f32`, `--calibrate`).
#[derive(Clone, Debug)]
pub struct QuantOptions {
    /// Target precision.
    pub precision: Precision,
    /// Name patterns of nodes / weights kept in f32 (see [`KeepF32`]).
    pub keep_f32: Vec<String>,
    /// Calibration data for int8-static (default: the checkpoint folder's fixture inputs
    /// `*.in.*.npy`, or its `samples/` folder).
    pub calibrate: Option<PathBuf>,
    /// How calibration ranges are chosen.
    pub method: calibrate::Method,
    /// int8 and int8-static: the integer products' weights in 7 bits (-63..=63) instead of 8, as
    /// onnxruntime's quantiser's `reduce_range`: on x86 CPUs without VNNI both runtimes then
    /// multiply bytes exactly at the faster rate, at twice the weight rounding step.
    pub reduce_range: bool,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            precision: Precision::F32,
            keep_f32: vec![],
            calibrate: None,
            method: calibrate::Method::MinMax,
            reduce_range: false,
        }
    }
}

/// Where int8-static draws calibration inputs when no `--calibrate` is given.
fn default_calibration(checkpoint: &Path) -> Option<PathBuf> {
    let has_fixture_inputs = std::fs::read_dir(checkpoint).ok()?.filter_map(|e| e.ok()).any(|e| {
        let n = e.file_name();
        let n = n.to_string_lossy();
        n.contains(".in.") && n.ends_with(".npy")
    });
    if has_fixture_inputs {
        return Some(checkpoint.to_path_buf());
    }
    let samples = checkpoint.join("samples");
    samples.is_dir().then_some(samples)
}

impl Exported {
    /// Rewrites the graph to `q.precision` (a no-op for f32) and updates the summary.
    /// `checkpoint` is where default calibration inputs are looked for; `progress(done, total)`
    /// is called during calibration.
    pub fn quantize(
        &mut self,
        q: &QuantOptions,
        checkpoint: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        if q.precision == Precision::F32 && !q.keep_f32.is_empty() {
            return Err(Error::invalid("--keep-f32 needs a reduced --precision (f16, int8, int8-static or q4)"));
        }
        if q.precision != Precision::Int8Static && q.calibrate.is_some() {
            return Err(Error::invalid("--calibrate applies to --precision int8-static only"));
        }
        if q.reduce_range && !matches!(q.precision, Precision::Int8 | Precision::Int8Static) {
            return Err(Error::invalid(format!(
                "--reduce-range (7-bit int8 weights) applies to --precision int8 or int8-static, not {}",
                q.precision
            )));
        }
        let keep = KeepF32::new(&q.keep_f32);
        // The int8, q4 and f16 passes read each deferred weight back as they convert it
        // ([`build_deferred`]); int8-static runs the graph to calibrate, so it reads them all.
        if !matches!(q.precision, Precision::Int8 | Precision::Q4 | Precision::F16) {
            self.graph.restore_all()?;
        }
        let ranges = if q.precision == Precision::Int8Static {
            let data = q.calibrate.clone().or_else(|| default_calibration(checkpoint)).ok_or_else(|| {
                Error::invalid("int8-static needs calibration inputs: give --calibrate DATA (.npy file or folder)")
            })?;
            keep.check_all_used(
                self.graph
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .chain(self.graph.constants.iter().map(|(n, _)| n.as_str())),
            )?;
            let inputs = calibrate::load(&self.graph, &data)?;
            let values = passes::quant::int8_activation_inputs(&self.graph, &keep);
            Some(calibrate::ranges(&self.graph, &values, &inputs, q.method, progress)?)
        } else {
            None
        };
        let Some(pass) = passes::quant::pass_for(q.precision, &keep, ranges, q.reduce_range)? else {
            return self.graph.restore_all();
        };
        let primary: std::collections::HashSet<String> =
            self.graph.nodes.iter().flat_map(|n| n.outputs.iter().map(|o| o.name.clone())).collect();
        pass.run(&mut self.graph)?;
        self.graph.restore_all()?;
        passes::quant::compact_names(&mut self.graph, &primary);
        for (k, v) in self.graph.metadata.iter_mut() {
            if k == metadata::PASSES {
                v.push(',');
                v.push_str(pass.name());
            }
        }
        self.summary.weight_bytes = summary::cost(&self.graph).weight_bytes;
        let json = serde_json::to_string(&self.summary).expect("summary serialises");
        for (k, v) in self.graph.metadata.iter_mut() {
            if k == metadata::SUMMARY {
                *v = json.clone();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The passes run on a graph built with its weights on disk, reading back what they look
    /// up, give the graph they give on the whole graph, byte for byte, with and without tables,
    /// and leave most weights on disk.
    #[test]
    fn passes_reading_back_give_the_whole_graphs_result() {
        let ck = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits")).unwrap();
        let held = |g: &ir::Graph| g.constants.iter().map(|(_, t)| t.bytes.len()).sum::<usize>();
        let record = ir::Graph::stripped_reads();
        for p in [Precision::F16, Precision::Int8, Precision::Q4] {
            let opts = options_for_precision(&ExportOptions::default(), p);
            let (mut lazy, _) = heads::build_graph_deferred(&ck, &opts).unwrap();
            let whole_held = held(&heads::build_graph(&ck, &opts).unwrap().0);
            assert!(held(&lazy) * 4 < whole_held, "{p}: the build leaves most weights on disk");
            for perf in [opts.perf, passes::tables::off_at_stored_precision(&opts.perf)] {
                let mut whole = heads::build_graph(&ck, &opts).unwrap().0;
                passes::run_default(&mut whole, &perf).unwrap();
                let (mut g, _) = passes_reading_back(&mut lazy, &perf).unwrap();
                assert!(held(&g) < held(&whole), "{p}: weights no pass reads stay on disk");
                g.restore_all().unwrap();
                assert_eq!(ir::onnx::to_bytes(&g), ir::onnx::to_bytes(&whole), "{p} tables {:?}", perf.tables);
            }
            // f16 runs `few_query_attention`, which reads the decoder's key and value weights:
            // read back, the others stay on disk.
            assert!(held(&lazy) * 2 < whole_held, "{p}: the passes read back few weights");
        }
        assert_eq!(ir::Graph::stripped_reads(), record, "the lookups are forgotten once read back");
    }

    /// One value's shape looked up alone is the whole map's, for every value of a built graph.
    #[test]
    fn value_shape_agrees_with_value_shapes() {
        let ck = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits")).unwrap();
        let g = build(&ck, &ExportOptions::default()).unwrap().graph;
        let all = g.value_shapes();
        assert!(all.len() > 100);
        for (name, shape) in &all {
            assert_eq!(g.value_shape(name), Some(*shape), "{name}");
        }
        assert_eq!(g.value_shape("no such value"), None);
    }

    /// `build_deferred` then `quantize` (the weights the table trial dropped read back one at a
    /// time) writes the graph the passes give on the whole graph: the path before deferral
    /// (`stored_weight_bytes` off runs the same passes, tables kept, on every weight).
    #[test]
    fn deferred_weights_read_back_give_the_whole_graphs_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits");
        let ck = Checkpoint::open(&dir).unwrap();
        let bytes = |mut e: Exported| {
            e.graph.metadata.retain(|(k, _)| k != metadata::SUMMARY);
            ir::onnx::to_bytes(&e.graph)
        };
        for p in [Precision::Int8, Precision::Q4, Precision::F16] {
            let opts = options_for_precision(&ExportOptions::default(), p);
            let q = QuantOptions { precision: p, ..Default::default() };
            let mut deferred = build_deferred(&ck, &opts).unwrap();
            let stripped = deferred.graph.stripped().count();
            assert!(stripped > 0, "{p}: the tables pay here, so weights stay on disk until quantised");
            deferred.quantize(&q, &dir, &mut |_, _| {}).unwrap();
            assert_eq!(deferred.graph.stripped().count(), 0, "{p}: all read back");
            let mut whole = opts.clone();
            whole.perf.stored_weight_bytes = None;
            let mut whole = build(&ck, &whole).unwrap();
            whole.quantize(&q, &dir, &mut |_, _| {}).unwrap();
            assert_eq!(bytes(deferred), bytes(whole), "{p}");
        }
    }

    /// A checkpoint changed between `build_deferred` and `quantize` ends in an error naming the
    /// file, not a panic or a graph with missing weights.
    #[test]
    fn a_checkpoint_changed_before_read_back_is_an_error() {
        let dir = std::env::temp_dir().join(format!("pe-deferred-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let digits = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(digits.join(f), dir.join(f)).unwrap();
        }
        let ck = Checkpoint::open(&dir).unwrap();
        let opts = options_for_precision(&ExportOptions::default(), Precision::Int8);
        let mut e = build_deferred(&ck, &opts).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"short").unwrap();
        let q = QuantOptions { precision: Precision::Int8, ..Default::default() };
        let err = e.quantize(&q, &dir, &mut |_, _| {}).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("model.safetensors") && err.contains("changed since it was opened"), "{err}");
    }
}
