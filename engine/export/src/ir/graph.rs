//! The exporter's graph: a small, ONNX-shaped IR that the model builders emit and the passes
//! transform. Every value carries its fixed shape, so builders, passes and `inspect` never need
//! a separate shape inference.

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};

/// Element type of a graph value or constant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 64-bit signed integer (token ids, indices, shapes).
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean.
    Bool,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The runtime's element type.
    pub fn datum_type(self) -> perceiver_edge_runtime::DatumType {
        use perceiver_edge_runtime::DatumType as D;
        match self {
            DType::F32 => D::F32,
            DType::F16 => D::F16,
            DType::I64 => D::I64,
            DType::I32 => D::I32,
            DType::I8 => D::I8,
            DType::U8 => D::U8,
            DType::Bool => D::Bool,
        }
    }

    /// ONNX `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        use tract_onnx::pb::tensor_proto::DataType as T;
        (match self {
            DType::F32 => T::Float,
            DType::F16 => T::Float16,
            DType::I64 => T::Int64,
            DType::I32 => T::Int32,
            DType::I8 => T::Int8,
            DType::U8 => T::Uint8,
            DType::Bool => T::Bool,
        }) as i32
    }
}

/// A constant tensor: raw little-endian bytes with a type and a shape.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Little-endian element bytes, row-major; shared between copies of a graph (a trial
    /// rewrite on a clone does not copy the weights).
    pub bytes: std::sync::Arc<Vec<u8>>,
}

impl TensorData {
    /// An f32 tensor. Panics if `data` does not fill `shape` (a programming error).
    pub fn f32(shape: &[usize], data: &[f32]) -> TensorData {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "f32 tensor {shape:?}");
        TensorData {
            dtype: DType::F32,
            shape: shape.to_vec(),
            bytes: std::sync::Arc::new(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }

    /// An f32 tensor from its little-endian bytes, for large tables written straight into
    /// them (no `Vec<f32>` next to the bytes). Panics if `bytes` does not fill `shape`.
    pub fn f32_le_bytes(shape: &[usize], bytes: Vec<u8>) -> TensorData {
        assert_eq!(shape.iter().product::<usize>() * 4, bytes.len(), "f32 tensor {shape:?}");
        TensorData { dtype: DType::F32, shape: shape.to_vec(), bytes: std::sync::Arc::new(bytes) }
    }

    /// An f32 tensor of `shape` whose data is not held: stripped from the start (see
    /// [`Graph::strip_constants`]), read back through the graph's source ([`Graph::defer`]).
    pub fn deferred_f32(shape: &[usize]) -> TensorData {
        TensorData { dtype: DType::F32, shape: shape.to_vec(), bytes: Default::default() }
    }

    /// An i64 tensor. Panics if `data` does not fill `shape` (a programming error).
    pub fn i64(shape: &[usize], data: &[i64]) -> TensorData {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "i64 tensor {shape:?}");
        TensorData {
            dtype: DType::I64,
            shape: shape.to_vec(),
            bytes: std::sync::Arc::new(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the data (from the shape: a stripped constant counts what it held).
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// True for an f32 constant whose data [`Graph::strip_constants`] dropped.
    pub fn is_stripped(&self) -> bool {
        self.dtype == DType::F32 && self.bytes.len() != self.byte_len()
    }

    /// The elements as f32 (only for f32 tensors).
    pub fn as_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32)
            .then(|| self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// A named, typed, fixed-shape value flowing through the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Val {
    /// Unique name in the graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Fixed shape.
    pub shape: Vec<usize>,
}

impl Val {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the last axis.
    pub fn last_dim(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
}

/// A node attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    /// Integer.
    Int(i64),
    /// Float.
    Float(f32),
    /// Integer list.
    Ints(Vec<i64>),
    /// String.
    Str(String),
    /// Tensor.
    Tensor(TensorData),
}

/// One operation, ONNX semantics (`op` is an ONNX op type in `domain`).
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Unique node name; its first path segment is the model stage (see [`metadata::stage_of`](crate::metadata::stage_of)).
    pub name: String,
    /// ONNX op type.
    pub op: String,
    /// ONNX domain ("" for the default domain).
    pub domain: String,
    /// Input value names (an empty string is an omitted optional input).
    pub inputs: Vec<String>,
    /// Output values.
    pub outputs: Vec<Val>,
    /// Attributes, in order.
    pub attrs: Vec<(String, Attr)>,
}

/// The exporter's graph.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Graph inputs, in order.
    pub inputs: Vec<Val>,
    /// Graph outputs, in order.
    pub outputs: Vec<Val>,
    /// Nodes in topological order.
    pub nodes: Vec<Node>,
    /// Constants (ONNX initializers), by name, in insertion order.
    pub constants: Vec<(String, TensorData)>,
    /// Key/value metadata written into the ONNX model.
    pub metadata: Vec<(String, String)>,
    /// The first shape error met while building (operands that do not fit, a value over the
    /// size limit): building goes on with a stand-in shape and the caller reports this, so bad
    /// checkpoint weights end in an error naming the place, never a panic.
    pub error: Option<String>,
    /// Named values where a split export may cut the graph (`latents.cross`, `latents.block.K`);
    /// not written to ONNX.
    pub marks: Vec<(String, Val)>,
    /// Where the data of stripped constants is read back from, if anywhere (see
    /// [`Graph::defer`]).
    deferred: Deferred,
    scope: Vec<String>,
    counter: usize,
}

/// Reads back a stripped constant's data from its name and shape (see [`Graph::defer`]).
type Source = dyn Fn(&str, &[usize]) -> Result<TensorData> + Send + Sync;

/// A graph's [`Source`], if it has one.
#[derive(Clone, Default)]
struct Deferred(Option<std::sync::Arc<Source>>);

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Deferred(source)" } else { "Deferred(none)" })
    }
}

thread_local! {
    /// The names of the stripped constants looked up on this thread, in order (see
    /// [`Graph::strip_constants`]).
    static STRIPPED_READS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Broadcast two shapes numpy-style; `None` when they do not broadcast.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            (da == db || da == 1 || db == 1).then_some(da.max(db))
        })
        .collect()
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Pushes a node-name scope: nodes are named `scope/.../op_N` (the first segment is the stage).
    pub fn push_scope(&mut self, name: &str) {
        self.scope.push(name.to_string());
    }

    /// Pops the innermost node-name scope.
    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    /// Records a shape error at the current scope (the first one is kept; see [`Graph::error`]).
    pub fn fail(&mut self, msg: impl Into<String>) {
        if self.error.is_none() {
            let at = self.scope.join("/");
            let msg = msg.into();
            self.error = Some(if at.is_empty() { msg } else { format!("{at}: {msg}") });
        }
    }

    /// Checks a value's size against [`perceiver_edge_runtime::limits`]; records an error if over.
    fn check_size(&mut self, name: &str, dtype: DType, shape: &[usize]) {
        if let Err(m) = perceiver_edge_runtime::limits::tensor_bytes(shape, dtype.size()) {
            self.fail(format!("value `{name}`: {m}"));
        }
    }

    fn fresh(&mut self, what: &str) -> String {
        self.counter += 1;
        let mut name = self.scope.join("/");
        if !name.is_empty() {
            name.push('/');
        }
        name.push_str(what);
        name.push('_');
        name.push_str(&self.counter.to_string());
        name
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> Val {
        self.check_size(name, dtype, shape);
        let v = Val { name: name.to_string(), dtype, shape: shape.to_vec() };
        self.inputs.push(v.clone());
        v
    }

    /// Declares the valid value range of integer input `name` (token ids, indices); the runtime
    /// rejects out-of-range values before running (stored as `perceiver_edge.range.NAME`).
    pub fn input_range(&mut self, name: &str, lo: i64, hi: i64) {
        self.metadata.push((perceiver_edge_runtime::metadata::range_key(name), format!("{lo} {hi}")));
    }

    /// Declares `v` as a graph output named `name` (through an `Identity` node of that name).
    pub fn output(&mut self, v: &Val, name: &str) {
        let node_name = self.fresh("Identity");
        let out = Val { name: name.to_string(), ..v.clone() };
        self.nodes.push(Node {
            name: node_name,
            op: "Identity".into(),
            domain: String::new(),
            inputs: vec![v.name.clone()],
            outputs: vec![out.clone()],
            attrs: vec![],
        });
        self.outputs.push(out);
    }

    /// Adds a constant under the current scope and returns it as a value.
    pub fn constant(&mut self, what: &str, data: TensorData) -> Val {
        let name = self.fresh(what);
        let v = Val { name: name.clone(), dtype: data.dtype, shape: data.shape.clone() };
        self.constants.push((name, data));
        v
    }

    /// An f32 constant.
    pub fn const_f32(&mut self, what: &str, shape: &[usize], data: &[f32]) -> Val {
        self.constant(what, TensorData::f32(shape, data))
    }

    /// An f32 scalar constant.
    pub fn scalar(&mut self, v: f32) -> Val {
        self.const_f32("scalar", &[], &[v])
    }

    /// An i64 constant.
    pub fn const_i64(&mut self, what: &str, data: &[i64]) -> Val {
        self.constant(what, TensorData::i64(&[data.len()], data))
    }

    /// Looks up a constant by value name (`None` for one whose data
    /// [`Graph::strip_constants`] dropped: such a read is counted, see
    /// [`Graph::stripped_reads`]).
    pub fn constant_data(&self, name: &str) -> Option<&TensorData> {
        let t = self.constants.iter().find(|(n, _)| n == name).map(|(_, t)| t)?;
        if t.is_stripped() {
            STRIPPED_READS.with(|r| r.borrow_mut().push(name.to_string()));
            return None;
        }
        Some(t)
    }

    /// Drops the data of the f32 constants `strip` selects, keeping their names and shapes: a
    /// graph to measure sizes on (what a rewrite adds and removes) without holding every weight.
    /// Whoever rewrites it must check [`Graph::stripped_reads`] did not move.
    pub fn strip_constants(&mut self, strip: impl Fn(&str) -> bool) {
        for (n, t) in &mut self.constants {
            if t.dtype == DType::F32 && !t.is_empty() && strip(n) {
                t.bytes = Default::default();
            }
        }
    }

    /// How many times this thread looked up a stripped constant's data.
    pub fn stripped_reads() -> usize {
        STRIPPED_READS.with(|r| r.borrow().len())
    }

    /// The stripped constants this thread looked up after its `mark`-th such lookup
    /// ([`Graph::stripped_reads`] taken before), each once; they are forgotten, so the record
    /// does not grow from export to export in a long-lived process.
    pub fn take_stripped_reads_since(mark: usize) -> Vec<String> {
        let mut names: Vec<String> = STRIPPED_READS.with(|r| {
            let mut r = r.borrow_mut();
            let from = mark.min(r.len());
            r.drain(from..).collect()
        });
        names.sort();
        names.dedup();
        names
    }

    /// Makes the stripped constants deferred: [`Graph::restore`] reads their data back from
    /// `source` (name and shape -> data) when a pass needs it, so a graph can be rewritten and
    /// quantised without ever holding every f32 weight. Whoever holds such a graph calls
    /// [`Graph::restore_all`] before anything reads every constant (writing, running).
    pub fn defer(&mut self, source: impl Fn(&str, &[usize]) -> Result<TensorData> + Send + Sync + 'static) {
        self.deferred = Deferred(Some(std::sync::Arc::new(source)));
    }

    /// Reads back the data of constant `name` if it is stripped and the graph has a source
    /// (see [`Graph::defer`]); checks it has the constant's type and shape.
    pub fn restore(&mut self, name: &str) -> Result<()> {
        let Some(source) = self.deferred.0.clone() else { return Ok(()) };
        let Some((_, t)) = self.constants.iter_mut().find(|(n, t)| n == name && t.is_stripped()) else {
            return Ok(());
        };
        let data = source(name, &t.shape)?;
        if data.dtype != t.dtype || data.shape != t.shape || data.bytes.len() != t.byte_len() {
            return Err(Error::tensor(
                name,
                format!("read back as {:?} {:?}, expected {:?} {:?}", data.dtype, data.shape, t.dtype, t.shape),
            ));
        }
        *t = data;
        Ok(())
    }

    /// The constants whose data [`Graph::strip_constants`] dropped, by name.
    pub fn stripped(&self) -> impl Iterator<Item = (&str, &TensorData)> {
        self.constants.iter().filter(|(_, t)| t.is_stripped()).map(|(n, t)| (n.as_str(), t))
    }

    /// [`Graph::restore`] for every stripped constant: afterwards a graph with a source holds all
    /// its data (one without keeps its stripped constants stripped).
    pub fn restore_all(&mut self) -> Result<()> {
        let stripped: Vec<String> = self.stripped().map(|(n, _)| n.to_string()).collect();
        for name in stripped {
            self.restore(&name)?;
        }
        Ok(())
    }

    /// Adds a node with one output of the given type and shape.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&Val],
        attrs: Vec<(&str, Attr)>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Val {
        let name = self.fresh(op);
        self.check_size(&name, dtype, &shape);
        let out = Val { name: name.clone(), dtype, shape };
        self.nodes.push(Node {
            name,
            op: op.to_string(),
            domain: String::new(),
            inputs: inputs.iter().map(|v| v.name.clone()).collect(),
            outputs: vec![out.clone()],
            attrs: attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        });
        out
    }

    /// A shape-preserving unary op (`Erf`, `Relu`, `Sin`, ...).
    pub fn unary(&mut self, op: &str, x: &Val) -> Val {
        self.node(op, &[x], vec![], x.dtype, x.shape.clone())
    }

    /// A broadcasting binary op (`Add`, `Sub`, `Mul`, `Div`, ...).
    pub fn binary(&mut self, op: &str, a: &Val, b: &Val) -> Val {
        let shape = broadcast(&a.shape, &b.shape).unwrap_or_else(|| {
            self.fail(format!("{op} of shapes {:?} and {:?}: widths disagree", a.shape, b.shape));
            a.shape.clone()
        });
        self.node(op, &[a, b], vec![], a.dtype, shape)
    }

    /// `a + b`.
    pub fn add(&mut self, a: &Val, b: &Val) -> Val {
        self.binary("Add", a, b)
    }

    /// `a * b`.
    pub fn mul(&mut self, a: &Val, b: &Val) -> Val {
        self.binary("Mul", a, b)
    }

    /// `x * s` for a scalar `s`.
    pub fn mul_scalar(&mut self, x: &Val, s: f32) -> Val {
        let c = self.scalar(s);
        self.mul(x, &c)
    }

    /// Matrix product with numpy broadcasting of the leading axes.
    pub fn matmul(&mut self, a: &Val, b: &Val) -> Val {
        let (ra, rb) = (a.shape.len(), b.shape.len());
        let lead = (ra >= 2 && rb >= 2).then(|| broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2])).flatten();
        let shape = match lead {
            Some(mut shape) if a.shape[ra - 1] == b.shape[rb - 2] => {
                shape.push(a.shape[ra - 2]);
                shape.push(b.shape[rb - 1]);
                shape
            }
            _ => {
                self.fail(format!("MatMul of shapes {:?} and {:?}: widths disagree", a.shape, b.shape));
                let mut shape = a.shape.clone();
                if let (Some(l), Some(&n)) = (shape.last_mut(), b.shape.last()) {
                    *l = n;
                }
                shape
            }
        };
        self.node("MatMul", &[a, b], vec![], a.dtype, shape)
    }

    /// Reshape to a fixed shape.
    pub fn reshape(&mut self, x: &Val, shape: &[usize]) -> Val {
        if x.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
            != shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
        {
            self.fail(format!("Reshape of shape {:?} to {shape:?}: sizes differ", x.shape));
        }
        if x.shape == shape {
            return x.clone();
        }
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let c = self.const_i64("shape", &s);
        self.node("Reshape", &[x, &c], vec![], x.dtype, shape.to_vec())
    }

    /// Axis permutation.
    pub fn transpose(&mut self, x: &Val, perm: &[usize]) -> Val {
        let shape = match perm.iter().map(|&p| x.shape.get(p).copied()).collect::<Option<Vec<usize>>>() {
            Some(s) if perm.len() == x.shape.len() => s,
            _ => {
                self.fail(format!("Transpose of shape {:?} by {perm:?}: ranks differ", x.shape));
                x.shape.clone()
            }
        };
        let perm = perm.iter().map(|&p| p as i64).collect();
        self.node("Transpose", &[x], vec![("perm", Attr::Ints(perm))], x.dtype, shape)
    }

    /// Concatenation along `axis` (non-negative).
    pub fn concat(&mut self, xs: &[&Val], axis: usize) -> Val {
        let mut shape = xs[0].shape.clone();
        let fits = |x: &&Val| {
            x.shape.len() == shape.len()
                && axis < shape.len()
                && x.shape.iter().zip(&shape).enumerate().all(|(i, (a, b))| i == axis || a == b)
        };
        if xs.iter().all(fits) {
            shape[axis] = xs.iter().map(|x| x.shape[axis]).sum();
        } else {
            let shapes: Vec<&Vec<usize>> = xs.iter().map(|x| &x.shape).collect();
            self.fail(format!("Concat of shapes {shapes:?} on axis {axis}: other axes differ"));
        }
        self.node("Concat", xs, vec![("axis", Attr::Int(axis as i64))], xs[0].dtype, shape)
    }

    /// Broadcasts `x` to `shape` (ONNX `Expand`); a no-op when already of that shape.
    pub fn expand(&mut self, x: &Val, shape: &[usize]) -> Val {
        if x.shape == shape {
            return x.clone();
        }
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let c = self.const_i64("shape", &s);
        let out = broadcast(&x.shape, shape).unwrap_or_else(|| {
            self.fail(format!("Expand of shape {:?} to {shape:?}: widths disagree", x.shape));
            shape.to_vec()
        });
        self.node("Expand", &[x, &c], vec![], x.dtype, out)
    }

    /// Gathers rows of `data` along `axis` with integer `indices`.
    pub fn gather(&mut self, data: &Val, indices: &Val, axis: usize) -> Val {
        if axis >= data.shape.len() {
            self.fail(format!("Gather on axis {axis} of shape {:?}", data.shape));
            return data.clone();
        }
        let mut shape = data.shape[..axis].to_vec();
        shape.extend_from_slice(&indices.shape);
        shape.extend_from_slice(&data.shape[axis + 1..]);
        self.node("Gather", &[data, indices], vec![("axis", Attr::Int(axis as i64))], data.dtype, shape)
    }

    /// Softmax over the last axis.
    pub fn softmax(&mut self, x: &Val) -> Val {
        self.node("Softmax", &[x], vec![("axis", Attr::Int(-1))], x.dtype, x.shape.clone())
    }

    /// Type conversion.
    pub fn cast(&mut self, x: &Val, to: DType) -> Val {
        let code = to.onnx_code() as i64;
        self.node("Cast", &[x], vec![("to", Attr::Int(code))], to, x.shape.clone())
    }

    /// The graph's inputs as runtime specs (what the runtime's dataset reader checks against).
    pub fn input_specs(&self) -> Vec<perceiver_edge_runtime::IoSpec> {
        let spec = |v: &Val| perceiver_edge_runtime::IoSpec {
            name: v.name.clone(),
            dtype: v.dtype.datum_type(),
            shape: v.shape.clone(),
        };
        self.inputs.iter().map(spec).collect()
    }

    /// Removes nodes and constants that no graph output depends on.
    pub fn prune(&mut self) {
        let mut live: HashSet<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| live.contains(&o.name)) {
                keep[i] = true;
                live.extend(n.inputs.iter().cloned());
            }
        }
        let mut k = keep.into_iter();
        self.nodes.retain(|_| k.next().unwrap_or(false));
        self.constants.retain(|(n, _)| live.contains(n));
    }

    /// The shape of one named value, as [`Graph::value_shapes`] gives it, without building the
    /// whole map (a pass looking up one value per match would otherwise take time quadratic in
    /// the graph: a 26-layer graph's export spent 80 % of its time hashing).
    pub fn value_shape(&self, name: &str) -> Option<&[usize]> {
        let node_output = self.nodes.iter().rev().flat_map(|n| n.outputs.iter().rev()).find(|o| o.name == name);
        node_output
            .map(|o| o.shape.as_slice())
            .or_else(|| self.constants.iter().rev().find(|(n, _)| n == name).map(|(_, t)| t.shape.as_slice()))
            .or_else(|| self.inputs.iter().rev().find(|v| v.name == name).map(|v| v.shape.as_slice()))
    }

    /// Shapes of every named value (inputs, constants, node outputs).
    pub fn value_shapes(&self) -> HashMap<&str, &[usize]> {
        let mut m: HashMap<&str, &[usize]> = HashMap::new();
        for v in &self.inputs {
            m.insert(&v.name, &v.shape);
        }
        for (n, t) in &self.constants {
            m.insert(n, &t.shape);
        }
        for n in &self.nodes {
            for o in &n.outputs {
                m.insert(&o.name, &o.shape);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stripped_constant_keeps_its_shape_and_counts_a_lookup() {
        let mut g = Graph::new();
        let w = g.const_f32("w", &[2, 3], &[1.0; 6]);
        let b = g.const_f32("b", &[3], &[0.0; 3]);
        g.strip_constants(|n| n == w.name);
        let t = &g.constants.iter().find(|(n, _)| *n == w.name).unwrap().1;
        assert!(t.is_stripped() && t.bytes.is_empty());
        assert_eq!((t.len(), t.byte_len()), (6, 24));
        let reads = Graph::stripped_reads();
        assert!(g.constant_data(&w.name).is_none());
        assert_eq!(Graph::stripped_reads(), reads + 1);
        assert_eq!(g.constant_data(&b.name).and_then(|t| t.as_f32()), Some(vec![0.0; 3]));
        assert_eq!(Graph::stripped_reads(), reads + 1);
    }

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(broadcast(&[1, 4, 1, 8], &[2, 1, 3, 8]), Some(vec![2, 4, 3, 8]));
        assert_eq!(broadcast(&[3, 5], &[5]), Some(vec![3, 5]));
        assert_eq!(broadcast(&[], &[2, 2]), Some(vec![2, 2]));
        assert_eq!(broadcast(&[3, 5], &[4]), None);
    }

    #[test]
    fn shape_errors_are_recorded_not_panics() {
        let mut g = Graph::new();
        g.push_scope("encoder");
        let x = g.input("x", DType::F32, &[2, 3]);
        let w = g.const_f32("w", &[4, 5], &[0.0; 20]);
        let y = g.matmul(&x, &w);
        assert_eq!(y.shape, vec![2, 5], "a stand-in shape keeps building going");
        let _ = g.add(&x, &w);
        let e = g.error.clone().unwrap();
        assert!(e.starts_with("encoder: MatMul of shapes [2, 3] and [4, 5]"), "the first error is kept: {e}");
        let mut g = Graph::new();
        g.input("huge", DType::F32, &[1 << 20, 1 << 20]);
        assert!(g.error.unwrap().contains("over the 4.00 GiB limit"));
    }

    #[test]
    fn prune_drops_dead_nodes_and_constants() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2, 3]);
        let w = g.const_f32("w", &[3, 4], &[0.0; 12]);
        let dead = g.const_f32("dead", &[3, 4], &[0.0; 12]);
        let y = g.matmul(&x, &w);
        let _unused = g.matmul(&x, &dead);
        g.output(&y, "y");
        g.prune();
        assert_eq!(g.nodes.len(), 2, "MatMul + Identity remain");
        assert_eq!(g.constants.len(), 1);
        assert_eq!(g.outputs[0].shape, vec![2, 4]);
    }
}
