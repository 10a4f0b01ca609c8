//! perceiver-edge exporter (host side): reads a trained PerceiverIO checkpoint in Hugging Face
//! layout (`config.json` + `model.safetensors`) and writes one self-contained, fixed-shape ONNX
//! graph that reproduces transformers' forward pass.
//!
//! Data flow: [`Checkpoint`] -> [`spec::build_graph`] (one module per PerceiverIO concept emits
//! nodes into a [`Graph`]) -> [`passes`] -> [`onnx`] bytes.
//!
//! ```no_run
//! use perceiver_edge_export::{export, ExportOptions};
//! let out = export("models/digits".as_ref(), &ExportOptions::default())?;
//! out.write("digits.onnx".as_ref())?;
//! println!("{}", out.summary);
//! # Ok::<(), perceiver_edge_export::Error>(())
//! ```

pub mod blocks;
pub mod checkpoint;
pub mod decoder;
pub mod encoder;
pub mod error;
pub mod graph;
pub mod multimodal;
pub mod onnx;
pub mod pack;
pub mod passes;
pub mod position;
pub mod preprocess;
pub mod spec;
pub mod summary;

pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
pub use graph::Graph;
pub use spec::{ExportOptions, Head};
pub use summary::Summary;

use std::io::Write;
use std::path::Path;

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
        onnx::to_bytes(&self.graph)
    }

    /// Writes the ONNX file atomically: a temporary file in the same folder, then a rename, so
    /// a failure never leaves a partial model behind.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{}.partial", path.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx")));
        let res = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, path));
        res.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::file(path, format!("cannot write: {e}"))
        })
    }
}

/// Builds the graph of an opened checkpoint and runs the default passes.
pub fn build(ck: &Checkpoint, opts: &ExportOptions) -> Result<Exported> {
    let (mut graph, summary) = spec::build_graph(ck, opts)?;
    passes::run_all(&mut graph, &[&passes::Prune])?;
    let json = serde_json::to_string(&summary).expect("summary serialises");
    graph.metadata.push((summary::METADATA_KEY.into(), json));
    Ok(Exported { graph, summary })
}

/// Opens checkpoint directory `dir` and exports it with `opts`.
pub fn export(dir: &Path, opts: &ExportOptions) -> Result<Exported> {
    build(&Checkpoint::open(dir)?, opts)
}
