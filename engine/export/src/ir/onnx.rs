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
        raw_data: t.bytes.clone(),
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
        initializer: g.constants.iter().map(|(n, t)| tensor_proto(n, t)).collect(),
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

/// Encodes `g` as ONNX protobuf bytes.
pub fn to_bytes(g: &Graph) -> Vec<u8> {
    to_model_proto(g).encode_to_vec()
}
