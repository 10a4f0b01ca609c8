//! Checks of an ONNX model before tract builds anything from it: every initializer's declared
//! size against the bytes it holds and against [`crate::limits`], element types the engine
//! handles, constant shapes fed to `ConstantOfShape`; then, once typed, every value's size.
//! A graph that fails here would otherwise make tract allocate what the file does not hold,
//! or panic.

use crate::limits;
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;

/// Bytes of one element of ONNX data type `code`, for the types a graph may carry.
fn elem_bytes(code: i32) -> Option<usize> {
    use DataType as T;
    Some(match T::try_from(code).ok()? {
        T::Float | T::Int32 | T::Uint32 => 4,
        T::Uint8 | T::Int8 | T::Bool => 1,
        T::Uint16 | T::Int16 | T::Float16 | T::Bfloat16 => 2,
        T::Int64 | T::Double | T::Uint64 => 8,
        _ => return None,
    })
}

/// Checks one constant tensor (`what` names it in the message).
fn check_tensor(t: &TensorProto, what: &str) -> Result<(), String> {
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
    if t.data_location == Some(1) {
        return Ok(()); // external data: its length is checked where it is read
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
    Ok(())
}

/// The int64 values of constant `name` (an initializer or a `Constant` node), if it is one.
fn const_ints<'a>(proto: &'a ModelProto, name: &str) -> Option<Vec<i64>> {
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

/// Checks a node whose output size is given by a constant shape input.
fn check_shape_node(proto: &ModelProto, n: &NodeProto) -> Result<(), String> {
    let shape_input = match n.op_type.as_str() {
        "ConstantOfShape" => n.input.first(),
        "Expand" | "Reshape" | "Tile" => n.input.get(1),
        _ => None,
    };
    let Some(values) = shape_input.and_then(|i| const_ints(proto, i)) else { return Ok(()) };
    // Reshape's -1 / 0 entries and Tile's repeats only shrink or multiply what exists; a
    // negative entry anywhere else is an error tract reports itself.
    let dims: Vec<usize> = values.iter().map(|&d| d.max(1) as usize).collect();
    limits::tensor_bytes(&dims, 1).map(|_| ()).map_err(|m| format!("node `{}` ({}): {m}", n.name, n.op_type))
}

/// Checks the protobuf before tract parses it.
pub fn check_proto(proto: &ModelProto) -> Result<(), String> {
    let g = proto.graph.as_ref().ok_or("not a loadable ONNX model: the model has no graph")?;
    for t in &g.initializer {
        check_tensor(t, "initializer")?;
    }
    for n in &g.node {
        for a in &n.attribute {
            if let Some(t) = &a.t {
                check_tensor(t, &format!("node `{}` attribute `{}`", n.name, a.name))?;
            }
        }
        check_shape_node(proto, n)?;
    }
    Ok(())
}

/// Checks every value of the typed graph against the ceiling on one tensor, before tract
/// optimises (and so folds constants and allocates).
pub fn check_facts(model: &TypedModel) -> Result<(), String> {
    for node in model.nodes() {
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
