//! The exporter's intermediate representation, the lowest layer: a small ONNX-shaped [`Graph`]
//! that the model builders emit and the passes rewrite, and its serialisation to ONNX bytes.

pub mod graph;
pub mod onnx;

pub use graph::{broadcast, Attr, DType, Graph, Node, TensorData, Val};
