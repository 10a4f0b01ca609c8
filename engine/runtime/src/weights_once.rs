//! One copy of the weights while a file loads.
//!
//! Reading an ONNX file the obvious way holds the weights three times at its peak: the file's
//! bytes, the decoded protobuf's `raw_data`, then tract's tensors built from the protobuf. Here
//!
//! * [`decode_file`] decodes the protobuf straight from the file through a 1 MiB window
//!   ([`FileBuf`], a `prost::bytes::Buf`), so the file's bytes are never all in memory;
//! * [`hand_over`] moves each initializer's `raw_data` out of the protobuf into a
//!   [`HandOver`] data resolver and marks the initializer as external data of the model file
//!   itself, at an offset past the file's end that no real tensor can have. tract then asks the
//!   resolver for each tensor in turn; the resolver gives its bytes away (a move, no copy), tract
//!   copies them into its tensor and drops them, so at any moment a weight lives in the protobuf
//!   or in tract, plus one tensor in flight.
//!
//! Real external data (a side file) still goes through tract's own memory-mapped reader.
//!
//! [`into_typed`] then translates the parsed graph dropping each weight once every node reading
//! it is translated (tract's own translation holds them all to the end, next to the weights some
//! ops rebuild as they translate).

use prost::bytes::Buf;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tract_onnx::data_resolver::{MmapDataResolver, ModelDataResolver};
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{ModelProto, StringStringEntryProto};
use tract_onnx::prelude::TractResult;

const WINDOW: usize = 1 << 20;

/// A file read through a fixed window, as a `Buf` prost can decode from.
pub struct FileBuf {
    file: File,
    window: Vec<u8>,
    pos: usize,
    filled: usize,
    remaining: usize,
    error: Option<std::io::Error>,
}

impl FileBuf {
    fn open(path: &Path) -> std::io::Result<FileBuf> {
        let (file, len) = crate::fsio::open_regular(path)?;
        let remaining = usize::try_from(len).map_err(|_| std::io::Error::other("file too large"))?;
        let mut b = FileBuf { file, window: vec![0; WINDOW], pos: 0, filled: 0, remaining, error: None };
        b.refill();
        Ok(b)
    }

    /// Reads the next window once the current one is used up. A read error (or a file that
    /// shrank) ends the buffer early: prost then reports a truncated message, and
    /// [`decode_file`] reports the stored error instead.
    fn refill(&mut self) {
        if self.pos < self.filled || self.remaining == 0 {
            return;
        }
        let want = self.remaining.min(WINDOW);
        match self.file.read(&mut self.window[..want]) {
            Ok(n) if n > 0 => {
                self.pos = 0;
                self.filled = n;
            }
            Ok(_) => {
                self.error = Some(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank while read"));
                self.remaining = 0;
            }
            Err(e) => {
                self.error = Some(e);
                self.remaining = 0;
            }
        }
    }
}

impl Buf for FileBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.pos..self.filled]
    }

    fn advance(&mut self, cnt: usize) {
        assert!(cnt <= self.filled - self.pos, "advance past the current window");
        self.pos += cnt;
        self.remaining -= cnt;
        self.refill();
    }
}

/// Decodes the ONNX protobuf in `path` without holding the file's bytes.
pub fn decode_file(path: &Path) -> Result<ModelProto, String> {
    use prost::Message;
    let mut buf = FileBuf::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let decoded = ModelProto::decode(&mut buf);
    if let Some(e) = buf.error.take() {
        return Err(format!("cannot read: {e}"));
    }
    decoded.map_err(|e| format!("not a loadable ONNX model: not an ONNX protobuf ({e})"))
}

/// A data resolver that hands over the initializers [`hand_over`] took out of the protobuf, and
/// reads every other external tensor as tract does.
pub struct HandOver {
    model: PathBuf,
    first_key: usize,
    taken: Mutex<HashMap<usize, Vec<u8>>>,
}

impl ModelDataResolver for HandOver {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        if offset >= self.first_key && p == self.model {
            let bytes = self.taken.lock().expect("not poisoned").remove(&offset);
            if let Some(bytes) = bytes {
                *buf = bytes;
                return Ok(());
            }
        }
        MmapDataResolver.read_bytes_from_path(buf, p, offset, length)
    }
}

/// Moves the `raw_data` of every initializer of at least 4 KiB out of `proto` into a resolver,
/// leaving an external-data reference to `model` (the file the protobuf came from, inside its
/// folder as tract resolves it) at a key offset past the file's `file_len` bytes.
pub fn hand_over(proto: &mut ModelProto, model: &Path, file_len: u64) -> Result<HandOver, String> {
    let canonical = model.canonicalize().map_err(|e| format!("{}: {e}", model.display()))?;
    let name = model.file_name().and_then(|n| n.to_str()).ok_or("the model's file name must be valid UTF-8")?;
    let first_key = usize::try_from(file_len).map_err(|_| "file too large")? + 1;
    let mut taken = HashMap::new();
    if let Some(g) = proto.graph.as_mut() {
        for t in g.initializer.iter_mut().filter(|t| t.raw_data.len() >= 4096) {
            let key = first_key + taken.len();
            let bytes = std::mem::take(&mut t.raw_data);
            let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
            t.external_data = vec![
                entry("location", name.into()),
                entry("offset", key.to_string()),
                entry("length", bytes.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            taken.insert(key, bytes);
        }
    }
    Ok(HandOver { model: canonical, first_key, taken: Mutex::new(taken) })
}

/// Translates a parsed model to a typed one as tract's `into_typed` does, dropping each constant
/// as soon as every node reading it is translated.
///
/// tract translates the whole graph while the parsed model still holds every weight, and some
/// ops build a new weight from theirs as they translate (`MatMulNBits` repacks its 4-bit weight
/// into tract's block format), so the old and the new copy of every such weight were all held at
/// the end. Here a parsed constant read by no node still to translate is dropped from the parsed
/// model and, when nothing in the typed model reads it either (the repacked weight replaced it),
/// from the typed model too: at any moment one weight is held twice.
pub fn into_typed(model: tract_onnx::prelude::InferenceModel) -> TractResult<tract_onnx::prelude::TypedModel> {
    use tract_onnx::tract_core::ops::dummy::Dummy;
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::plan::EvalContext;
    use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid};
    use tract_onnx::tract_hir::internal::*;

    let mut model = model;
    model.analyse(false)?;
    let mut source = model.incorporate()?;
    let _proof_session = source.symbols.proof_cache_session();
    let mut target = TypedModel { symbols: source.symbols.clone(), ..TypedModel::default() };
    let mut mapping: HashMap<OutletId, OutletId> = HashMap::new();
    let keep: Vec<OutletId> = source.input_outlets()?.iter().chain(source.output_outlets()?).copied().collect();
    // Readers still to translate, per node.
    let mut readers: Vec<usize> =
        source.nodes().iter().map(|n| n.outputs.iter().map(|o| o.successors.len()).sum()).collect();
    for id in source.eval_order()? {
        let outlets = translate_node(&source, id, &mut target, &mapping)
            .with_context(|| format!("Translating node {}", source.node(id)))?;
        for (ix, outlet) in outlets.into_iter().enumerate() {
            mapping.insert(OutletId::new(id, ix), outlet);
            if let Some(label) = source.outlet_label(OutletId::new(id, ix)) {
                target.set_outlet_label(outlet, label.to_string())?;
            }
        }
        for input in source.node(id).inputs.clone() {
            readers[input.node] = readers[input.node].saturating_sub(1);
            let node = source.node(input.node);
            let constant = node.outputs.iter().all(|o| o.fact.value.is_concrete());
            let kept = (0..node.outputs.len()).any(|ix| keep.contains(&OutletId::new(input.node, ix)));
            if readers[input.node] > 0 || !constant || kept {
                continue;
            }
            let node = &mut source.nodes_mut()[input.node];
            node.op = Box::new(Dummy::new());
            for o in &mut node.outputs {
                o.fact.value = GenericFactoid::Any;
            }
            for ix in 0..node.outputs.len() {
                let Some(&t) = mapping.get(&OutletId::new(input.node, ix)) else { continue };
                // A node that passes its input through (an identity) maps to the same outlet.
                if mapping.iter().any(|(s, v)| *v == t && s.node != input.node && readers[s.node] > 0) {
                    continue;
                }
                let t = &mut target.nodes_mut()[t.node];
                if t.op_is::<Const>() && t.outputs.iter().all(|o| o.successors.is_empty()) {
                    t.op = Box::new(Dummy::new());
                    for o in &mut t.outputs {
                        o.fact = TypedFact::dt_shape(o.fact.datum_type, o.fact.shape.clone());
                    }
                }
            }
        }
    }
    // As tract does: inputs stay, even unread ones.
    for i in source.input_outlets()?.to_vec() {
        if !mapping.contains_key(&i) {
            let outlets = translate_node(&source, i.node, &mut target, &mapping)?;
            mapping.insert(i, outlets[0]);
        }
    }
    target.inputs = source.input_outlets()?.iter().map(|i| mapping[i]).collect();
    target.outputs = source.output_outlets()?.iter().map(|o| mapping[o]).collect();
    target.properties.clone_from(&source.properties);
    target.compact()?;
    return Ok(target);

    /// tract-hir's translation of one node (`InferenceModelExt::into_typed`).
    fn translate_node(
        source: &InferenceModel,
        id: usize,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
    ) -> TractResult<TVec<OutletId>> {
        let node = source.node(id);
        if !InferenceModel::is_source(&node.op)
            && node.op.state(&EvalContext::out_of_plan())?.is_none()
            && source.node_output_facts(node.id)?.iter().all(|f| f.value.is_concrete())
        {
            return (0..node.outputs.len())
                .map(|ix| {
                    target.add_const(format!("{}.{}", node.name, ix), node.outputs[ix].fact.value.concretize().unwrap())
                })
                .collect();
        }
        let outputs = node.op.to_typed(source, node, target, mapping)?;
        for output in &outputs {
            target.outlet_fact(*output)?.consistent()?;
        }
        Ok(outputs)
    }
}
