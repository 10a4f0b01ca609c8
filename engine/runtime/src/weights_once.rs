//! One copy of the weights while a file loads.
//!
//! Reading an ONNX file the obvious way holds the weights three times at its peak: the file's
//! bytes, the decoded protobuf's `raw_data`, then tract's tensors built from the protobuf; and
//! prost copies each `raw_data` twice on the way (into a `Bytes`, then into the `Vec`). Here
//!
//! * [`decode_file`] decodes the protobuf straight from the file through a 1 MiB window
//!   ([`FileBuf`], a `prost::bytes::Buf`), so the file's bytes are never all in memory, and
//!   (with `defer`) leaves the `raw_data` of every initializer of at least 4 KiB in the file:
//!   it decodes the model, graph and initializer messages field by field (prost's own
//!   `merge_field` for every other field), skips those bytes, and marks the initializer as
//!   external data of the model file itself, at the bytes' offset;
//! * the returned [`HandOver`], tract's data resolver for the load, reads each such tensor from
//!   the file (the descriptor opened for decoding) when tract asks for it; tract copies it into
//!   its tensor and drops it, so at any moment a weight lives in the file or in tract, plus one
//!   tensor in flight, and it was copied twice (the kernel's read, tract's copy), not four times.
//!
//! Real external data (a side file) still goes through tract's own memory-mapped reader.
//!
//! [`into_typed`] then translates the parsed graph dropping each weight once every node reading
//! it is translated (tract's own translation holds them all to the end, next to the weights some
//! ops rebuild as they translate).

use prost::bytes::Buf;
use prost::encoding::{decode_key, decode_varint, DecodeContext, WireType};
use prost::{DecodeError, Message};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tract_onnx::data_resolver::{MmapDataResolver, ModelDataResolver};
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use tract_onnx::prelude::{InferenceModel, OutletId, TVec, TractResult, TypedModel};

const WINDOW: usize = 1 << 20;

/// A file read through a fixed window, as a `Buf` prost can decode from.
pub struct FileBuf {
    file: File,
    len: u64,
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
        let mut b = FileBuf { file, len, window: vec![0; WINDOW], pos: 0, filled: 0, remaining, error: None };
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

impl FileBuf {
    /// The file offset of the next byte.
    fn position(&self) -> u64 {
        self.len - self.remaining as u64
    }

    /// Skips `n` bytes (at most `remaining`) without reading those past the window.
    fn skip(&mut self, n: usize) {
        let in_window = (self.filled - self.pos).min(n);
        self.pos += in_window;
        self.remaining -= in_window;
        let rest = n - in_window;
        if rest > 0 {
            // The window is used up: the file's position is the next byte's.
            if let Err(e) = self.file.seek(SeekFrom::Current(rest as i64)) {
                self.error = Some(e);
                self.remaining = 0;
                return;
            }
            self.remaining -= rest;
        }
        self.refill();
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

/// Decodes the ONNX protobuf in `path` without holding the file's bytes. With `defer`, the
/// `raw_data` of each initializer of 4 KiB or more stays in the file: the initializer becomes
/// external data of the file itself (`location` its name, `offset` and `length` the bytes' place),
/// and the returned [`HandOver`] reads it when tract asks. Only for a file inside the folder
/// tract is given as the model's, which is where tract resolves `location`.
pub fn decode_file(path: &Path, defer: bool) -> Result<(ModelProto, Option<HandOver>), String> {
    let mut buf = FileBuf::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let defer = defer && cfg!(unix);
    let decoded = if defer {
        let name = path.file_name().and_then(|n| n.to_str()).ok_or("the model's file name must be valid UTF-8")?;
        decode_deferring(&mut buf, name)
    } else {
        ModelProto::decode(&mut buf).map(|m| (m, HashSet::new())).map_err(text)
    };
    if let Some(e) = buf.error.take() {
        return Err(format!("cannot read: {e}"));
    }
    let (model, ranges) = decoded.map_err(|e| format!("not a loadable ONNX model: not an ONNX protobuf ({e})"))?;
    if !defer {
        return Ok((model, None));
    }
    let canonical = path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((model, Some(HandOver { model: canonical, file: buf.file, ranges })))
}

/// Initializer `raw_data` from this size on stays in the file.
const DEFER_FROM: usize = 4096;

/// Decodes a `ModelProto` as prost does, but the model's graph and the graph's initializers
/// field by field, leaving large initializer `raw_data` in the file. (prost's recursion limit
/// counts from the fields decoded here: two levels more than from the top, as prost's
/// `enter_recursion` is not public; harmless for the stack.) Returns the (offset, length)
/// of each range left there.
fn decode_deferring(buf: &mut FileBuf, name: &str) -> Result<(ModelProto, HashSet<(u64, usize)>), String> {
    let ctx = DecodeContext::default();
    let mut model = ModelProto::default();
    let mut ranges = HashSet::new();
    while buf.has_remaining() {
        let (tag, wire) = decode_key(buf).map_err(text)?;
        if tag != 7 || wire != WireType::LengthDelimited {
            model.merge_field(tag, wire, buf, ctx.clone()).map_err(text)?;
            continue;
        }
        // ModelProto.graph
        let graph = model.graph.get_or_insert_with(GraphProto::default);
        let end = message_end(buf)?;
        while buf.remaining() > end {
            let (tag, wire) = decode_key(buf).map_err(text)?;
            if tag != 5 || wire != WireType::LengthDelimited {
                graph.merge_field(tag, wire, buf, ctx.clone()).map_err(text)?;
            } else {
                // GraphProto.initializer
                let (t, range) = decode_initializer(buf, name, &ctx)?;
                graph.initializer.push(t);
                ranges.extend(range);
            }
            within(buf, end)?;
        }
    }
    Ok((model, ranges))
}

/// One initializer (a length-delimited `TensorProto`), its large `raw_data` left in the file.
fn decode_initializer(
    buf: &mut FileBuf,
    name: &str,
    ctx: &DecodeContext,
) -> Result<(TensorProto, Option<(u64, usize)>), String> {
    let mut t = TensorProto::default();
    let mut range = None;
    let end = message_end(buf)?;
    while buf.remaining() > end {
        let (tag, wire) = decode_key(buf).map_err(text)?;
        if tag != 9 || wire != WireType::LengthDelimited {
            t.merge_field(tag, wire, buf, ctx.clone()).map_err(text)?;
        } else {
            // TensorProto.raw_data: the last one counts, as in prost.
            let len = length(buf, end)?;
            if len >= DEFER_FROM {
                range = Some((buf.position(), len));
                t.raw_data.clear();
                buf.skip(len);
            } else {
                range = None;
                t.raw_data = buf.copy_to_bytes(len).to_vec();
            }
        }
        within(buf, end)?;
    }
    let Some((offset, len)) = range else { return Ok((t, None)) };
    // Left in the file: data that only tract reads, exactly the size its shape declares.
    // Otherwise the bytes are read in, so that the model's checks see them as from memory: an
    // initializer with its own say on where its data is, int64 values (shapes, which the checks
    // read before tract does), and a size that does not match (refused as inline data is).
    let declared = crate::guard::elem_bytes(t.data_type).and_then(|size| {
        let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
        crate::limits::tensor_bytes(&dims, size).ok()
    });
    let int64 = t.data_type == tract_onnx::pb::tensor_proto::DataType::Int64 as i32;
    if !t.external_data.is_empty() || t.data_location.is_some() || int64 || declared != Some(len) {
        match read_at(&buf.file, offset, len) {
            Ok(bytes) => t.raw_data = bytes,
            Err(e) => {
                buf.error = Some(e);
                return Err("cannot read".into());
            }
        }
        return Ok((t, None));
    }
    let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
    t.external_data =
        vec![entry("location", name.into()), entry("offset", offset.to_string()), entry("length", len.to_string())];
    t.data_location = Some(DataLocation::External as i32);
    Ok((t, Some((offset, len))))
}

/// Reads a length prefix that must fit in the file and before `end` (as `remaining`), as prost
/// checks (its varint may itself have run past `end`).
fn length(buf: &mut FileBuf, end: usize) -> Result<usize, String> {
    let len = decode_varint(buf).map_err(text)?;
    let len = match usize::try_from(len) {
        Ok(len) if len <= buf.remaining() => len,
        _ => return Err("buffer underflow".into()),
    };
    if buf.remaining() < end || len > buf.remaining() - end {
        return Err("delimited length exceeded".into());
    }
    Ok(len)
}

/// Reads the length prefix of a nested message and returns where it ends (as `remaining`).
fn message_end(buf: &mut FileBuf) -> Result<usize, String> {
    let len = length(buf, 0)?;
    Ok(buf.remaining() - len)
}

/// A field that ran past its message's end is malformed (prost: "delimited length exceeded").
fn within(buf: &FileBuf, end: usize) -> Result<(), String> {
    if buf.remaining() < end {
        return Err("delimited length exceeded".into());
    }
    Ok(())
}

fn text(e: DecodeError) -> String {
    e.to_string()
}

/// Reads `len` bytes at `offset` without moving the file's cursor. Zeroed memory of this size is
/// a fresh memory map: nothing passes over it before the read.
#[cfg(unix)]
fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(bytes)
}

/// [`decode_file`] leaves nothing in the file where reading at an offset needs a cursor.
#[cfg(not(unix))]
fn read_at(_: &File, _: u64, _: usize) -> std::io::Result<Vec<u8>> {
    Err(std::io::Error::other("reading at an offset needs a unix system"))
}

/// The data resolver of a load: reads the initializers [`decode_file`] left in the model file
/// from the descriptor it decoded, and every other external tensor as tract does.
pub struct HandOver {
    model: PathBuf,
    file: File,
    ranges: HashSet<(u64, usize)>,
}

impl HandOver {
    /// The bytes left in the file (counted as external data by the model's checks).
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|&(_, len)| len as u64).sum()
    }
}

impl ModelDataResolver for HandOver {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        if let Some(len) = length.filter(|&len| p == self.model && self.ranges.contains(&(offset as u64, len))) {
            *buf = read_at(&self.file, offset as u64, len)?;
            return Ok(());
        }
        MmapDataResolver.read_bytes_from_path(buf, p, offset, length)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::encoding::{encode_key, encode_varint};
    use tract_onnx::pb::{AttributeProto, NodeProto, OperatorSetIdProto};

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn tensor(name: &str, n_bytes: usize, seed: u8) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: vec![(n_bytes / 4) as i64],
            data_type: 1,
            raw_data: bytes(n_bytes, seed),
            ..Default::default()
        }
    }

    fn length_delimited(tag: u32, body: &[u8], out: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    /// A model with every case the deferring decoder tells apart: large and small initializers,
    /// one whose `raw_data` appears twice (the last counts), one that names its own data
    /// location, a large tensor in a `Constant` node's attribute (left inline), and fields
    /// around the graph.
    fn model_bytes() -> Vec<u8> {
        let mut own_location = tensor("own", 4096, 3);
        own_location.data_location = Some(DataLocation::Default as i32);
        let constant = NodeProto {
            op_type: "Constant".into(),
            output: vec!["c".into()],
            attribute: vec![AttributeProto {
                name: "value".into(),
                t: Some(tensor("c", 10000, 4)),
                ..Default::default()
            }],
            ..Default::default()
        };
        // int64 values (a shape the checks read) and a size its shape does not declare stay inline.
        let int64 = TensorProto { data_type: 7, dims: vec![512], ..tensor("int64", 4096, 7) };
        let wrong_size = TensorProto { dims: vec![10], ..tensor("wrong size", 8192, 8) };
        let graph = GraphProto {
            name: "g".into(),
            node: vec![constant],
            initializer: vec![tensor("big", 8192, 1), tensor("small", 16, 2), own_location, int64, wrong_size],
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(graph),
            ..Default::default()
        };
        let mut out = model.encode_to_vec();
        // A second graph message merges into the first: one initializer given large then small
        // `raw_data`, and one given small then large.
        let twice = |first: usize, second: usize| {
            let mut t = TensorProto { dims: vec![(second / 4) as i64], ..tensor("twice", first, 5) }.encode_to_vec();
            let mut later = Vec::new();
            length_delimited(9, &bytes(second, 6), &mut later);
            t.extend(later);
            t
        };
        let mut g2 = Vec::new();
        length_delimited(5, &twice(8192, 16), &mut g2);
        length_delimited(5, &twice(16, 6000), &mut g2);
        length_delimited(7, &g2, &mut out);
        // ModelProto.producer_name after the graph.
        length_delimited(2, b"test", &mut out);
        out
    }

    /// Reads the deferred initializers' bytes back into the protobuf, undoing the deferral.
    fn restore(model: &mut ModelProto, handed: &HandOver) {
        let Some(g) = model.graph.as_mut() else { return };
        for t in &mut g.initializer {
            let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).and_then(|e| e.value.parse().ok());
            let (Some(offset), Some(len)) = (entry("offset"), entry("length")) else { continue };
            if handed.ranges.contains(&(offset, len as usize)) {
                t.raw_data = read_at(&handed.file, offset, len as usize).unwrap();
                t.external_data.clear();
                t.data_location = None;
            }
        }
    }

    fn decode_both(dir: &Path, data: &[u8]) -> (Result<ModelProto, String>, Result<ModelProto, String>) {
        let path = dir.join("m.onnx");
        std::fs::write(&path, data).unwrap();
        let theirs = ModelProto::decode(data).map_err(|e| e.to_string());
        let ours = decode_file(&path, true).map(|(mut m, handed)| {
            restore(&mut m, handed.as_ref().unwrap());
            m
        });
        (theirs, ours)
    }

    #[test]
    fn deferring_decodes_as_prost_and_leaves_only_large_initializers_in_the_file() {
        let dir = std::env::temp_dir().join(format!("pe-defer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = model_bytes();
        let path = dir.join("m.onnx");
        std::fs::write(&path, &data).unwrap();
        let (model, handed) = decode_file(&path, true).unwrap();
        let handed = handed.unwrap();
        let g = model.graph.as_ref().unwrap();
        let left: Vec<&str> = g.initializer.iter().filter(|t| !t.external_data.is_empty()).map(|t| &*t.name).collect();
        // "own" names its own data location, "int64" and "wrong size" stay inline, the first
        // "twice" ends small.
        assert_eq!(left, ["big", "twice"]);
        for t in &g.initializer[2..5] {
            assert!(t.raw_data.len() >= 4096, "{} read in", t.name);
        }
        assert_eq!(handed.bytes(), 8192 + 6000);
        // The bytes left in the file are the initializer's own.
        let big = &g.initializer[0];
        let offset: u64 = big.external_data.iter().find(|e| e.key == "offset").unwrap().value.parse().unwrap();
        assert_eq!(read_at(&handed.file, offset, 8192).unwrap(), bytes(8192, 1));
        assert_eq!(g.node[0].attribute[0].t.as_ref().unwrap().raw_data.len(), 10000);

        let (theirs, ours) = decode_both(&dir, &data);
        assert_eq!(ours.unwrap(), theirs.unwrap());

        // An initializer whose last field (its name) runs 2 bytes past the length the graph
        // gives it, the graph going on after the name: prost refuses it, and so must this.
        let body =
            TensorProto { name: "abc".into(), dims: vec![1], data_type: 1, ..Default::default() }.encode_to_vec();
        let mut graph = Vec::new();
        encode_key(5, WireType::LengthDelimited, &mut graph);
        encode_varint(body.len() as u64 - 2, &mut graph);
        graph.extend_from_slice(&body);
        length_delimited(2, b"graph name", &mut graph);
        let mut overrun = Vec::new();
        length_delimited(7, &graph, &mut overrun);
        let (theirs, ours) = decode_both(&dir, &overrun);
        assert!(theirs.is_err() && ours.is_err(), "{ours:?}");

        // An initializer whose last byte is a `raw_data` key: its length is read from past the
        // initializer's end (the graph's name field after it).
        let mut body =
            TensorProto { name: "k".into(), dims: vec![1], data_type: 1, ..Default::default() }.encode_to_vec();
        body.push(9 << 3 | 2);
        let mut graph = Vec::new();
        length_delimited(5, &body, &mut graph);
        length_delimited(2, b"graph name", &mut graph);
        let mut past = Vec::new();
        length_delimited(7, &graph, &mut past);
        let (theirs, ours) = decode_both(&dir, &past);
        assert!(theirs.is_err() && ours.is_err(), "{ours:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn deferring_accepts_and_refuses_what_prost_does() {
        let dir = std::env::temp_dir().join(format!("pe-defer-mut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = model_bytes();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..4000 {
            let mut d = data.clone();
            for _ in 0..1 + next(3) {
                match next(5) {
                    0 => {
                        let i = next(d.len());
                        d[i] ^= 1 << next(8);
                    }
                    // Lengths one longer or shorter.
                    4 => {
                        let i = next(d.len());
                        d[i] = if next(2) == 0 { d[i].wrapping_add(1) } else { d[i].wrapping_sub(1) };
                    }
                    1 => d.truncate(next(d.len())),
                    2 => {
                        let i = next(d.len());
                        d[i] = [0x00, 0x7f, 0x80, 0xff][next(4)];
                    }
                    _ => {
                        let (a, b) = (next(d.len()), next(d.len()));
                        let piece = d[a.min(b)..a.max(b)].to_vec();
                        let at = next(d.len());
                        d.splice(at..at, piece);
                    }
                }
                if d.is_empty() {
                    break;
                }
            }
            let (theirs, ours) = decode_both(&dir, &d);
            match (theirs, ours) {
                (Ok(t), Ok(o)) => {
                    assert_eq!(o, t);
                    accepted += 1;
                }
                (Err(_), Err(_)) => refused += 1,
                (t, o) => panic!("prost: {:?}, deferring: {:?}", t.map(|_| ()), o.map(|_| ())),
            }
        }
        assert!(accepted > 100 && refused > 100, "{accepted} accepted, {refused} refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
