//! Checks of an ONNX model before tract builds anything from it: every initializer's declared
//! size against the bytes it holds (or, for external data, against its side file, confined to
//! the model's folder) and against [`crate::limits`], element types the engine
//! handles, constant shapes fed to `ConstantOfShape`; then, once typed, every value's size.
//! A graph that fails here would otherwise make tract allocate what the file does not hold,
//! or panic.

use crate::limits;
use std::path::{Component, Path};
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;

/// Bytes of one element of ONNX data type `code`, for the types a graph may carry.
pub(crate) fn elem_bytes(code: i32) -> Option<usize> {
    use DataType as T;
    Some(match T::try_from(code).ok()? {
        T::Float | T::Int32 | T::Uint32 => 4,
        T::Uint8 | T::Int8 | T::Bool => 1,
        T::Uint16 | T::Int16 | T::Float16 | T::Bfloat16 => 2,
        T::Int64 | T::Double | T::Uint64 => 8,
        _ => return None,
    })
}

/// Checks an external-data tensor of `bytes` declared bytes: its `location` is a relative path
/// confined to the model's folder `dir` (no absolute path, no `..`, no symlink out of it), the
/// side file exists, and `offset` + `length` lie within it with `length` equal to the declared
/// size. Returns the length.
fn check_external(t: &TensorProto, name: &str, bytes: usize, dir: Option<&Path>) -> Result<u64, String> {
    let entry = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.as_str());
    let location = entry("location").ok_or_else(|| format!("{name} is external data without a `location`"))?;
    if !t.raw_data.is_empty() {
        return Err(format!("{name} holds both inline data and an external location `{location}`"));
    }
    let dir = dir.ok_or_else(|| {
        format!("{name} keeps its data in the external file `{location}`; load the model from its file so its folder is known")
    })?;
    let file = dir.join(location);
    let shown = file.display();
    let confined = !location.is_empty()
        && Path::new(location).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !confined {
        return Err(format!(
            "{name}: external data location `{location}` must be a relative path inside the model's folder {}",
            dir.display()
        ));
    }
    let meta = std::fs::metadata(&file).map_err(|e| format!("{name}: external data file {shown}: {e}"))?;
    let (root, real) = (dir.canonicalize(), file.canonicalize());
    match (root, real) {
        (Ok(root), Ok(real)) if real.starts_with(&root) && meta.is_file() => {}
        (Ok(_), Ok(real)) if !meta.is_file() => {
            return Err(format!("{name}: external data file {shown} ({}) is not a file", real.display()))
        }
        (Ok(root), Ok(real)) => {
            return Err(format!(
                "{name}: external data file {shown} resolves to {}, outside the model's folder {}",
                real.display(),
                root.display()
            ))
        }
        (Err(e), _) | (_, Err(e)) => return Err(format!("{name}: external data file {shown}: {e}")),
    }
    let number = |k: &str| -> Result<Option<u64>, String> {
        entry(k)
            .map(|v| v.parse::<u64>().map_err(|_| format!("{name}: external data `{k}` is `{v}`, not a byte count")))
            .transpose()
    };
    let offset = number("offset")?.unwrap_or(0);
    let file_len = meta.len();
    let length = match number("length")? {
        Some(l) => l,
        None => file_len.saturating_sub(offset),
    };
    if length != bytes as u64 {
        return Err(format!("{name} declares {bytes} bytes but its external data in {shown} has length {length}"));
    }
    match offset.checked_add(length) {
        Some(end) if end <= file_len => Ok(length),
        _ => Err(format!(
            "{name}: external data file {shown} holds {file_len} bytes, shorter than offset {offset} + length {length}"
        )),
    }
}

/// Checks one constant tensor (`what` names it in the message); external data is looked for in
/// `dir`. Returns the bytes it keeps in an external file (0 for inline data).
fn check_tensor(t: &TensorProto, what: &str, dir: Option<&Path>) -> Result<u64, String> {
    let name = format!("{what} `{}`", t.name);
    let size = elem_bytes(t.data_type).ok_or_else(|| match DataType::try_from(t.data_type) {
        Ok(DataType::String) => format!("{name} is a string tensor; perceiver-edge runs numeric graphs only"),
        _ => format!("{name} has ONNX data type {}, which perceiver-edge does not run", t.data_type),
    })?;
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("{name} has a negative dimension {d}")))
        .collect::<Result<_, _>>()?;
    let bytes = limits::tensor_bytes(&dims, size).map_err(|m| format!("{name}: {m}"))?;
    if t.data_location == Some(DataLocation::External as i32) {
        return check_external(t, &name, bytes, dir);
    }
    let numel = bytes / size;
    let held = if !t.raw_data.is_empty() {
        if t.raw_data.len() != bytes {
            return Err(format!(
                "{name} declares shape {dims:?} ({bytes} bytes) but holds {} bytes of data",
                t.raw_data.len()
            ));
        }
        numel
    } else {
        t.float_data.len() + t.int32_data.len() + t.int64_data.len() + t.double_data.len() + t.uint64_data.len()
    };
    if held != numel && !(numel == 0 && held == 0) {
        return Err(format!("{name} declares shape {dims:?} ({numel} elements) but holds {held}"));
    }
    Ok(0)
}

/// The int64 values of constant `name` (an initializer or a `Constant` node), if it is one.
fn const_ints(proto: &ModelProto, name: &str) -> Option<Vec<i64>> {
    let g = proto.graph.as_ref()?;
    let t = g.initializer.iter().find(|t| t.name == name).or_else(|| {
        g.node
            .iter()
            .find(|n| n.op_type == "Constant" && n.output.iter().any(|o| o == name))
            .and_then(|n| n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()))
    })?;
    if t.data_type != DataType::Int64 as i32 {
        return None;
    }
    if !t.raw_data.is_empty() {
        return Some(t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect());
    }
    Some(t.int64_data.clone())
}

/// Bytes of one element of value `name` where the graph declares its type (an initializer or a
/// graph input).
fn value_elem_bytes(proto: &ModelProto, name: &str) -> Option<usize> {
    let g = proto.graph.as_ref()?;
    if let Some(t) = g.initializer.iter().find(|t| t.name == name) {
        return elem_bytes(t.data_type);
    }
    let input = g.input.iter().find(|i| i.name == name)?;
    let tract_onnx::pb::type_proto::Value::TensorType(t) = input.r#type.as_ref()?.value.as_ref()?;
    elem_bytes(t.elem_type)
}

/// A node's name for an error: its name, or its first output's where it has none.
fn label(n: &NodeProto) -> &str {
    if n.name.is_empty() {
        n.output.first().map_or("", String::as_str)
    } else {
        &n.name
    }
}

/// Checks a node whose output size is given by a constant shape input, in bytes of its element
/// type where that is known: tract 0.23.9 folds a `ConstantOfShape` of a constant shape while it
/// types the graph, before [`check_facts`] sees it (a `[2, 2^30]` f32 one took 8 GiB and 39 s
/// before the refusal, found by fuzzing).
fn check_shape_node(proto: &ModelProto, n: &NodeProto) -> Result<(), String> {
    let (shape_input, elem) = match n.op_type.as_str() {
        // The `value` attribute's type, float32 without one.
        "ConstantOfShape" => {
            let value = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
            (n.input.first(), value.map_or(Some(4), |t| elem_bytes(t.data_type)))
        }
        "Expand" | "Tile" => (n.input.get(1), n.input.first().and_then(|i| value_elem_bytes(proto, i))),
        "Reshape" => (n.input.get(1), None),
        _ => (None, None),
    };
    let Some(values) = shape_input.and_then(|i| const_ints(proto, i)) else { return Ok(()) };
    // Reshape's -1 / 0 entries and Tile's repeats only shrink or multiply what exists; a
    // negative entry anywhere else is an error tract reports itself.
    let dims: Vec<usize> = values.iter().map(|&d| d.max(1) as usize).collect();
    limits::tensor_bytes(&dims, elem.unwrap_or(1))
        .map(|_| ())
        .map_err(|m| format!("node `{}` ({}): {m}", label(n), n.op_type))
}

/// Checks attributes tract turns into allocations when it types the graph: a Transpose `perm`
/// must be a permutation of `0..n` (tract sizes its axis bookkeeping by the largest entry), and
/// no integer list is absurdly long.
/// tract 0.23.9 resolves LayerNormalization / RMSNormalization's axis -1 on a rank-0 input as
/// `(-1 + 0) as usize` and its shape inference then loops ~2^64 times (found by fuzzing). The
/// rank of a computed value is not known before inference, but a scalar initializer, constant
/// or graph input is: refuse those (a normalisation needs an axis to normalise over).
fn check_normalized_rank(g: &tract_onnx::pb::GraphProto, n: &NodeProto) -> Result<(), String> {
    if !matches!(n.op_type.as_str(), "LayerNormalization" | "RMSNormalization") {
        return Ok(());
    }
    let Some(x) = n.input.first() else { return Ok(()) };
    let from_constant = g.node.iter().filter(|c| c.op_type == "Constant" && c.output.first() == Some(x));
    let scalar = g.initializer.iter().any(|t| &t.name == x && t.dims.is_empty())
        || from_constant.flat_map(|c| c.attribute.iter()).any(|a| a.t.as_ref().is_some_and(|t| t.dims.is_empty()))
        || g.input.iter().any(|i| {
            &i.name == x
                && matches!(&i.r#type, Some(t) if matches!(&t.value, Some(tract_onnx::pb::type_proto::Value::TensorType(tt)) if tt.shape.as_ref().is_some_and(|s| s.dim.is_empty())))
        });
    if scalar {
        return Err(format!(
            "node `{}` ({}): input `{x}` is a scalar; it normalises over an axis of a tensor",
            label(n),
            n.op_type
        ));
    }
    Ok(())
}

fn check_attributes(n: &NodeProto) -> Result<(), String> {
    const MAX_RANK: usize = 64;
    for a in &n.attribute {
        if a.ints.len() > 1 << 16 {
            return Err(format!(
                "node `{}` ({}): attribute `{}` holds {} integers",
                label(n),
                n.op_type,
                a.name,
                a.ints.len()
            ));
        }
    }
    // tract loops over axis ranges it derives from these: keep them within any real rank.
    for a in n.attribute.iter().filter(|a| a.name == "axis" || a.name == "axes") {
        let vals = if a.name == "axis" { std::slice::from_ref(&a.i) } else { &a.ints[..] };
        if let Some(v) = vals.iter().find(|v| !(-(MAX_RANK as i64)..MAX_RANK as i64).contains(v)) {
            return Err(format!(
                "node `{}` ({}): {} {v} is outside -{MAX_RANK}..{MAX_RANK}",
                label(n),
                n.op_type,
                a.name
            ));
        }
    }
    // tract 0.23.9 resolves these ops' negative axis as `(axis + rank) as usize` without a range
    // check: an axis below -rank wraps to ~2^64 and its shape inference loops that many times.
    // The rank is not known before inference, so only -1 (the last axis, what every exporter
    // writes) is taken among the negative ones; a non-negative axis is checked by tract.
    if matches!(n.op_type.as_str(), "LayerNormalization" | "RMSNormalization") {
        if let Some(a) = n.attribute.iter().find(|a| a.name == "axis") {
            if a.i < -1 {
                return Err(format!(
                    "node `{}` ({}): axis {} is not supported: use -1 or the axis counted from 0",
                    label(n),
                    n.op_type,
                    a.i
                ));
            }
        }
    }
    if n.op_type == "Transpose" {
        if let Some(perm) = n.attribute.iter().find(|a| a.name == "perm") {
            let len = perm.ints.len();
            let mut seen = vec![false; len];
            let ok = len <= MAX_RANK
                && perm.ints.iter().all(|&p| match usize::try_from(p) {
                    Ok(p) if p < len && !seen[p] => {
                        seen[p] = true;
                        true
                    }
                    _ => false,
                });
            if !ok {
                return Err(format!(
                    "node `{}` (Transpose): perm {:?} is not a permutation of 0..{len}",
                    label(n),
                    perm.ints
                ));
            }
        }
    }
    Ok(())
}

/// Checks the protobuf before tract parses it; external data is looked for in the model's
/// folder `dir` (`None`: a model from memory, which must hold all its data). Returns the bytes
/// its tensors keep in external files.
pub fn check_proto(proto: &ModelProto, dir: Option<&Path>) -> Result<u64, String> {
    let g = proto.graph.as_ref().ok_or("not a loadable ONNX model: the model has no graph")?;
    let mut external = 0u64;
    for t in &g.initializer {
        external += check_tensor(t, "initializer", dir)?;
    }
    let mut known: std::collections::HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
    known.extend(g.initializer.iter().map(|t| t.name.as_str()));
    known.extend(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
    for n in &g.node {
        if let Some(i) = n.input.iter().find(|i| !i.is_empty() && !known.contains(i.as_str())) {
            return Err(format!(
                "node `{}` ({}) reads `{i}`, which no node, initializer or graph input produces",
                label(n),
                n.op_type
            ));
        }
    }
    if let Some(o) = g.output.iter().find(|o| !known.contains(o.name.as_str())) {
        return Err(format!("graph output `{}` is produced by no node, initializer or graph input", o.name));
    }
    for n in &g.node {
        for a in &n.attribute {
            if let Some(t) = &a.t {
                external += check_tensor(t, &format!("node `{}` attribute `{}`", label(n), a.name), dir)?;
            }
        }
        check_shape_node(proto, n)?;
        check_attributes(n)?;
        check_normalized_rank(g, n)?;
    }
    Ok(external)
}

/// Checks that a product (tract's `EinSum`) reads each axis at one extent in every input (or 1).
/// tract 0.23.9 does not check a 4-bit weight's (a `MatMulNBits`): activations padded to 655392
/// values a row against a weight of 32 rows ran its kernel past the weight's end (a segfault,
/// found by fuzzing).
fn check_product_extents(model: &TypedModel, node: &TypedNode) -> Result<(), String> {
    use tract_onnx::tract_core::ops::{einsum::EinSum, konst::Const};
    let Some(op) = node.op_as::<EinSum>() else { return Ok(()) };
    // A block-quantised constant's fact does not carry its logical shape: read the tensor's.
    let shapes: Vec<Option<Vec<usize>>> = node
        .inputs
        .iter()
        .map(|i| match model.node(i.node).op_as::<Const>() {
            Some(k) => Some(k.val().shape().to_vec()),
            None => model.outlet_fact(*i).ok()?.shape.as_concrete().map(<[usize]>::to_vec),
        })
        .collect();
    for axis in op.axes.iter_all_axes() {
        let mut seen: Option<(usize, usize)> = None;
        for (slot, positions) in axis.inputs.iter().enumerate() {
            let Some(Some(shape)) = shapes.get(slot) else { continue };
            for &p in positions {
                let d = shape.get(p).copied().unwrap_or(1);
                match seen {
                    _ if d == 1 => {}
                    None => seen = Some((slot, d)),
                    Some((s0, d0)) if d0 != d => {
                        return Err(format!(
                        "node `{}` (product): input {s0} has {d0} values along an axis that input {slot} has {d} along",
                        node.name
                    ))
                    }
                    Some(_) => {}
                }
            }
        }
    }
    Ok(())
}

/// Checks every value of the typed graph against the ceiling on one tensor, before tract
/// optimises (and so folds constants and allocates), and every softmax's axis against its
/// input's rank (tract 0.23.9 takes an ONNX axis below -rank as `(axis + rank) as usize`, ~2^64,
/// and runs such a softmax anyway, where onnxruntime refuses the model).
pub fn check_facts(model: &TypedModel) -> Result<(), String> {
    for node in model.nodes() {
        check_product_extents(model, node)?;
        if let Some(sm) = node.op_as::<tract_onnx::tract_core::ops::nn::Softmax>() {
            let rank = model.outlet_fact(node.inputs[0]).map_err(|e| e.to_string())?.rank();
            if sm.axes.iter().any(|&a| a >= rank) {
                return Err(format!(
                    "node `{}` (Softmax): axis out of range for its rank-{rank} input (expected -{rank}..{rank})",
                    node.name
                ));
            }
        }
        for (ix, out) in node.outputs.iter().enumerate() {
            let Some(shape) = out.fact.shape.as_concrete() else { continue };
            let size = out.fact.datum_type.size_of();
            limits::tensor_bytes(shape, size).map_err(|m| {
                let which = if node.outputs.len() > 1 { format!(" output {ix}") } else { String::new() };
                format!("node `{}`{which}: {m}", node.name)
            })?;
        }
    }
    Ok(())
}
