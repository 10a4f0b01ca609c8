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
use tract_onnx::prelude::{InferenceModel, OutletId, TVec, TractResult, TypedModel};

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
///
/// A 4-bit product repeating an earlier one (same op, same constant inputs, same activation
/// shape: a weight-shared block applied several times) repeats that one's translated nodes
/// ([`Recording`]) instead of repacking the weight, so its parsed copy is dropped after the first
/// reader, not the last (with [`REPEATS_ONCE`]).
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
    let order = source.eval_order()?;
    let (leaders, followers) = if REPEATS_ONCE.get() { repeats(&source, &order) } else { Default::default() };
    let mut recorded: HashMap<usize, Recording> = HashMap::new();
    for &id in &order {
        let recording = leaders.get(&id).and_then(|leader| recorded.get(leader));
        let replayed = recording.is_some();
        let outlets = match recording {
            Some(r) => r.replay(&source, id, &mut target, &mapping),
            None => {
                let before = target.nodes().len();
                let outlets = translate_node(&source, id, &mut target, &mapping);
                if let Ok(outlets) = &outlets {
                    let count = followers.get(&id).copied().unwrap_or(0);
                    let recording =
                        (count > 0).then(|| Recording::of(&source, id, &target, &mapping, before, outlets)).flatten();
                    if let Some(r) = recording {
                        recorded.insert(id, r);
                        // Its repeats will not read its constants: count their reads off now,
                        // so the constants go with this node's own read, counted off below.
                        for input in source.node(id).inputs.iter().skip(1) {
                            readers[input.node] = readers[input.node].saturating_sub(count);
                        }
                    }
                }
                outlets
            }
        }
        .with_context(|| format!("Translating node {}", source.node(id)))?;
        for (ix, outlet) in outlets.into_iter().enumerate() {
            mapping.insert(OutletId::new(id, ix), outlet);
            if let Some(label) = source.outlet_label(OutletId::new(id, ix)) {
                target.set_outlet_label(outlet, label.to_string())?;
            }
        }
        // A replayed node's constant inputs were counted when its leader was recorded.
        for input in source.node(id).inputs.clone().into_iter().take(if replayed { 1 } else { usize::MAX }) {
            readers[input.node] = readers[input.node].saturating_sub(1);
            release(&mut source, &mut target, &mapping, &readers, &keep, input.node);
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

    /// Drops the parsed constant `node` once no node still to translate reads it, and its typed
    /// copy once nothing in the typed model reads that.
    fn release(
        source: &mut InferenceModel,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
        readers: &[usize],
        keep: &[OutletId],
        id: usize,
    ) {
        let node = source.node(id);
        let constant = node.outputs.iter().all(|o| o.fact.value.is_concrete());
        let kept = (0..node.outputs.len()).any(|ix| keep.contains(&OutletId::new(id, ix)));
        if readers[id] > 0 || !constant || kept {
            return;
        }
        let node = &mut source.nodes_mut()[id];
        node.op = Box::new(Dummy::new());
        for o in &mut node.outputs {
            o.fact.value = GenericFactoid::Any;
        }
        for ix in 0..node.outputs.len() {
            let Some(&t) = mapping.get(&OutletId::new(id, ix)) else { continue };
            // A node that passes its input through (an identity) maps to the same outlet.
            if mapping.iter().any(|(s, v)| *v == t && s.node != id && readers[s.node] > 0) {
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

/// Whether [`into_typed`] translates a repeated 4-bit product by repeating its first reader's
/// nodes (see [`crate::set_repeats_once`]).
pub(crate) static REPEATS_ONCE: crate::Switch = crate::Switch::on();

/// The 4-bit products (`MatMulNBits`) that repeat an earlier one in `order`: the same op (its
/// sizes and inputs' roles), the same constant inputs and an activation of the same type and
/// shape. Returns each repeat's leader (the first of its kind) and each leader's number of
/// repeats.
fn repeats(source: &InferenceModel, order: &[usize]) -> (HashMap<usize, usize>, HashMap<usize, usize>) {
    use tract_onnx::tract_hir::infer::Factoid;
    let mut first: HashMap<String, usize> = HashMap::new();
    let (mut leaders, mut followers) = (HashMap::new(), HashMap::new());
    for &id in order {
        let node = source.node(id);
        if node.op.name() != "MatMulNBits" || node.inputs.len() < 2 {
            continue;
        }
        let fact = |o: &OutletId| source.outlet_fact(*o).ok();
        let constant = |o: &OutletId| fact(o).is_some_and(|f| f.value.is_concrete());
        let (activation, weights) = (&node.inputs[0], &node.inputs[1..]);
        if constant(activation) || !weights.iter().all(constant) {
            continue;
        }
        let Some(a) = fact(activation) else { continue };
        let leader = *first.entry(format!("{:?} {:?} {:?}", node.op, weights, a)).or_insert(id);
        if leader != id {
            leaders.insert(id, leader);
            *followers.entry(leader).or_default() += 1;
        }
    }
    (leaders, followers)
}

/// The typed nodes one node's translation added, to be repeated for a node that would translate
/// to the same (see [`repeats`]): its activation inputs are substituted, the constants it built
/// are shared, every other node is wired again under the new node's name.
struct Recording {
    /// The typed nodes the translation added, in order.
    nodes: std::ops::Range<usize>,
    /// The leader's activation input (its first), as typed.
    activation: OutletId,
    /// The leader's outputs, as typed.
    outputs: Vec<OutletId>,
    /// The leader's name, the prefix of the nodes it added.
    name: String,
}

impl Recording {
    /// The nodes `id`'s translation added to `target` (from `first` on, giving `outputs`), if
    /// each reads only nodes among them, the activation or constants, and each output is one of
    /// theirs or a constant.
    fn of(
        source: &InferenceModel,
        id: usize,
        target: &TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
        first: usize,
        outputs: &[OutletId],
    ) -> Option<Recording> {
        use tract_onnx::tract_core::ops::konst::Const;
        let node = source.node(id);
        let activation = *mapping.get(&node.inputs[0])?;
        let nodes = first..target.nodes().len();
        let known = |o: &OutletId| nodes.contains(&o.node) || *o == activation || target.node(o.node).op_is::<Const>();
        let reads_known = nodes.clone().all(|n| target.node(n).inputs.iter().all(known));
        let gives_known = outputs.iter().all(|o| nodes.contains(&o.node) || target.node(o.node).op_is::<Const>());
        (reads_known && gives_known).then(|| Recording {
            nodes,
            activation,
            outputs: outputs.to_vec(),
            name: node.name.clone(),
        })
    }

    /// Wires the recorded nodes again for `id`, whose activation is typed in `mapping`.
    fn replay(
        &self,
        source: &InferenceModel,
        id: usize,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
    ) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::konst::Const;
        use tract_onnx::tract_hir::internal::*;
        let node = source.node(id);
        let activation = *mapping.get(&node.inputs[0]).context("a repeated product's input is not translated")?;
        // What the translation depends on: the activation's type and shape, and its value where
        // constant (`wire_node` folds constant inputs). Other properties (`uniform`, ...) may
        // differ between two activations without changing what is wired.
        let same = |a: &TypedFact, b: &TypedFact| a.datum_type == b.datum_type && a.shape == b.shape;
        let (mine, first) = (target.outlet_fact(activation)?, target.outlet_fact(self.activation)?);
        if !same(mine, first) || mine.konst != first.konst {
            bail!("a repeated product's input differs from its first reader's");
        }
        let mut wired: HashMap<usize, TVec<OutletId>> = HashMap::new();
        let remap = |o: &OutletId, wired: &HashMap<usize, TVec<OutletId>>| -> OutletId {
            match wired.get(&o.node) {
                Some(outs) => outs[o.slot],
                None if *o == self.activation => activation,
                None => *o,
            }
        };
        for n in self.nodes.clone() {
            let old = target.node(n);
            if old.op_is::<Const>() {
                continue;
            }
            let inputs: TVec<OutletId> = old.inputs.iter().map(|o| remap(o, &wired)).collect();
            let name = match old.name.strip_prefix(&self.name) {
                Some(rest) => format!("{}{rest}", node.name),
                None => format!("{}.{}", node.name, old.name),
            };
            let op = old.op.clone();
            let name = target.unique_name(name).into_owned();
            let outs = target.wire_node(name, op, &inputs)?;
            if outs.len() != target.node(n).outputs.len() {
                bail!("a repeated product's node {} wired differently", target.node(n).name);
            }
            for (slot, o) in outs.iter().enumerate() {
                if !same(target.outlet_fact(*o)?, target.outlet_fact(OutletId::new(n, slot))?) {
                    bail!("a repeated product's node {} typed differently", target.node(n).name);
                }
            }
            wired.insert(n, outs);
        }
        Ok(self.outputs.iter().map(|o| remap(o, &wired)).collect())
    }
}
