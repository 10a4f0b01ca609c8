//! Serialises a [`Graph`] into an ONNX `ModelProto` (protobuf types from `tract_onnx::pb`).

use super::graph::{Attr, Graph, TensorData, Val};
use prost::Message;
use tract_onnx::pb;

/// ONNX opset of the default domain used by every exported graph.
pub const OPSET: i64 = 17;
/// ONNX IR version written (IR 8 goes with opset 17).
pub const IR_VERSION: i64 = 8;

fn tensor_proto(name: &str, t: &TensorData) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: t.dtype.onnx_code(),
        raw_data: t.bytes.to_vec(),
        ..Default::default()
    }
}

fn value_info(v: &Val) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    pb::ValueInfoProto {
        name: v.name.clone(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: v.dtype.onnx_code(),
                shape: Some(pb::TensorShapeProto {
                    dim: v
                        .shape
                        .iter()
                        .map(|&d| Dimension { value: Some(D::DimValue(d as i64)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attribute(name: &str, a: &Attr) -> pb::AttributeProto {
    use pb::attribute_proto::AttributeType as A;
    let mut p = pb::AttributeProto { name: name.to_string(), ..Default::default() };
    match a {
        Attr::Int(i) => {
            p.r#type = A::Int as i32;
            p.i = *i;
        }
        Attr::Float(f) => {
            p.r#type = A::Float as i32;
            p.f = *f;
        }
        Attr::Ints(v) => {
            p.r#type = A::Ints as i32;
            p.ints = v.clone();
        }
        Attr::Str(s) => {
            p.r#type = A::String as i32;
            p.s = s.as_bytes().to_vec();
        }
        Attr::Tensor(t) => {
            p.r#type = A::Tensor as i32;
            p.t = Some(tensor_proto("", t));
        }
    }
    p
}

/// Builds the ONNX model proto of `g`.
pub fn to_model_proto(g: &Graph) -> pb::ModelProto {
    model_proto_with(g, g.constants.iter().map(|(n, t)| tensor_proto(n, t)).collect())
}

/// The largest protobuf message protobuf readers accept (2 GiB - 1): the onnx package,
/// onnxruntime and the ONNX checker refuse a larger single-file model.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;
/// Initializers of at least this many bytes go to the side file in an external-data export
/// (onnx's own `convert_model_to_external_data` default); smaller ones stay inline.
pub const EXTERNAL_MIN_BYTES: usize = 1024;
/// Alignment of each tensor's offset in the side file (a page: the reader may map it).
pub const EXTERNAL_ALIGN: u64 = 4096;

/// An upper bound of the single-file encoding's size: the constants' bytes plus the graph
/// without them, plus 16 bytes of field headers per constant. Computed without encoding (so
/// without copying the weights).
pub fn single_file_bound(g: &Graph) -> u64 {
    let skeleton = model_proto_with(g, g.constants.iter().map(|(n, t)| skeleton_proto(n, t)).collect()).encoded_len();
    let data: u64 = g.constants.iter().map(|(_, t)| t.bytes.len() as u64 + 16).sum();
    skeleton as u64 + data
}

/// Whether the single-file encoding of `g` could pass protobuf's 2 GiB limit.
pub fn needs_external_data(g: &Graph) -> bool {
    single_file_bound(g) > PROTOBUF_LIMIT
}

fn skeleton_proto(name: &str, t: &TensorData) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: t.dtype.onnx_code(),
        ..Default::default()
    }
}

/// Writes `g` with ONNX's standard external data: every initializer of at least
/// [`EXTERNAL_MIN_BYTES`] is stored in `data` at an offset aligned to [`EXTERNAL_ALIGN`] and
/// described in the model (`data_location = EXTERNAL`, `external_data` entries `location`,
/// `offset`, `length`); `location` is the side file's name relative to the model's folder. The
/// weights are streamed from the graph: nothing is copied into the protobuf. Returns the side
/// file's length.
pub fn write_external(
    g: &Graph,
    model: &mut dyn std::io::Write,
    data: &mut dyn std::io::Write,
    location: &str,
) -> std::io::Result<u64> {
    refuse_stripped(g)?;
    let mut offset = 0u64;
    let mut initializers = Vec::with_capacity(g.constants.len());
    let mut external = vec![];
    for (n, t) in &g.constants {
        if t.bytes.len() < EXTERNAL_MIN_BYTES {
            initializers.push(tensor_proto(n, t));
            continue;
        }
        let at = offset.div_ceil(EXTERNAL_ALIGN) * EXTERNAL_ALIGN;
        let entry = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        let mut p = skeleton_proto(n, t);
        p.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        p.external_data = vec![
            entry("location", location.to_string()),
            entry("offset", at.to_string()),
            entry("length", t.bytes.len().to_string()),
        ];
        initializers.push(p);
        external.push((at, &t.bytes));
        offset = at + t.bytes.len() as u64;
    }
    let mut written = 0u64;
    for (at, bytes) in external {
        let pad = (at - written) as usize;
        data.write_all(&vec![0u8; pad])?;
        data.write_all(bytes)?;
        written = at + bytes.len() as u64;
    }
    model.write_all(&model_proto_with(g, initializers).encode_to_vec())?;
    Ok(written)
}

fn model_proto_with(g: &Graph, initializer: Vec<pb::TensorProto>) -> pb::ModelProto {
    let mut domains: Vec<&str> = g.nodes.iter().map(|n| n.domain.as_str()).filter(|d| !d.is_empty()).collect();
    domains.sort();
    domains.dedup();
    let mut opset_import = vec![pb::OperatorSetIdProto { domain: String::new(), version: OPSET }];
    opset_import.extend(domains.iter().map(|d| pb::OperatorSetIdProto { domain: d.to_string(), version: 1 }));
    let graph = pb::GraphProto {
        name: "perceiver_edge".into(),
        node: g
            .nodes
            .iter()
            .map(|n| pb::NodeProto {
                // A node named like its first output is written unnamed: ONNX readers (tract,
                // onnxruntime) name it after that output, and the file saves a copy of the name.
                name: if n.outputs.first().is_some_and(|o| o.name == n.name) { String::new() } else { n.name.clone() },
                op_type: n.op.clone(),
                domain: n.domain.clone(),
                input: n.inputs.clone(),
                output: n.outputs.iter().map(|o| o.name.clone()).collect(),
                attribute: n.attrs.iter().map(|(k, a)| attribute(k, a)).collect(),
                ..Default::default()
            })
            .collect(),
        initializer,
        input: g.inputs.iter().map(value_info).collect(),
        output: g.outputs.iter().map(value_info).collect(),
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import,
        producer_name: "perceiver-edge".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: g
            .metadata
            .iter()
            .map(|(k, v)| pb::StringStringEntryProto { key: k.clone(), value: v.clone() })
            .collect(),
        ..Default::default()
    }
}

/// An error for a graph with a constant whose data was left on disk ([`Graph::defer`]): it
/// would be written empty.
fn refuse_stripped(g: &Graph) -> std::io::Result<()> {
    match g.stripped().next() {
        Some((name, _)) => Err(std::io::Error::other(format!("constant `{name}` was not read back before writing"))),
        None => Ok(()),
    }
}

/// Encodes `g` as ONNX protobuf bytes.
pub fn to_bytes(g: &Graph) -> Vec<u8> {
    debug_assert!(g.stripped().next().is_none(), "a graph with constants left on disk (Graph::restore_all first)");
    to_model_proto(g).encode_to_vec()
}

/// Writes the single-file encoding of `g` to `w`, byte for byte what [`to_bytes`] returns, with
/// each constant's bytes streamed from the graph: no copy of the weights is made (neither a
/// `TensorProto` holding them nor the encoded file in memory). Protobuf encodes fields in tag
/// order, so the model is the concatenation of the fields before the graph, the graph (its
/// fields before the initializers, each initializer, the fields after), and the fields after it.
pub fn write_single(g: &Graph, w: &mut dyn std::io::Write) -> std::io::Result<()> {
    refuse_stripped(g)?;
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let mut model = model_proto_with(g, vec![]);
    let graph = model.graph.take().expect("model_proto_with sets the graph");
    let before_model = pb::ModelProto {
        ir_version: std::mem::take(&mut model.ir_version),
        producer_name: std::mem::take(&mut model.producer_name),
        producer_version: std::mem::take(&mut model.producer_version),
        domain: std::mem::take(&mut model.domain),
        model_version: std::mem::take(&mut model.model_version),
        doc_string: std::mem::take(&mut model.doc_string),
        ..Default::default()
    };
    let after_model = pb::ModelProto {
        opset_import: std::mem::take(&mut model.opset_import),
        metadata_props: std::mem::take(&mut model.metadata_props),
        training_info: std::mem::take(&mut model.training_info),
        functions: std::mem::take(&mut model.functions),
        ..Default::default()
    };
    debug_assert_eq!(model.encoded_len(), 0, "every ModelProto field is written");
    let graph_head = pb::GraphProto { node: graph.node, name: graph.name, ..Default::default() };
    let graph_tail = pb::GraphProto { initializer: vec![], node: vec![], name: String::new(), ..graph };
    // Each initializer: its fields without the data (dims 1, data_type 2, name 8) then raw_data (9).
    let skeletons: Vec<(pb::TensorProto, &[u8])> =
        g.constants.iter().map(|(n, t)| (skeleton_proto(n, t), t.bytes.as_slice())).collect();
    let raw_len = |b: &[u8]| if b.is_empty() { 0 } else { key_len(9) + encoded_len_varint(b.len() as u64) + b.len() };
    let tensor_len = |(p, b): &(pb::TensorProto, &[u8])| p.encoded_len() + raw_len(b);
    let graph_len = graph_head.encoded_len()
        + skeletons
            .iter()
            .map(|t| key_len(5) + encoded_len_varint(tensor_len(t) as u64) + tensor_len(t))
            .sum::<usize>()
        + graph_tail.encoded_len();
    let mut head = before_model.encode_to_vec();
    encode_key(7, WireType::LengthDelimited, &mut head);
    encode_varint(graph_len as u64, &mut head);
    graph_head.encode(&mut head).expect("a Vec grows");
    w.write_all(&head)?;
    for t in &skeletons {
        let mut h = vec![];
        encode_key(5, WireType::LengthDelimited, &mut h);
        encode_varint(tensor_len(t) as u64, &mut h);
        t.0.encode(&mut h).expect("a Vec grows");
        if !t.1.is_empty() {
            encode_key(9, WireType::LengthDelimited, &mut h);
            encode_varint(t.1.len() as u64, &mut h);
        }
        w.write_all(&h)?;
        w.write_all(t.1)?;
    }
    let mut tail = graph_tail.encode_to_vec();
    after_model.encode(&mut tail).expect("a Vec grows");
    w.write_all(&tail)
}
