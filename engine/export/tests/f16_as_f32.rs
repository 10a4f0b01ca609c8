//! The runtime's f16-in-f32 pass (`engine/runtime/src/f16_as_f32.rs`) against tract's f16 plan
//! without it and against the product computed here in f64. One test in its own binary: the
//! switch is process-wide.

use half::f16;
use perceiver_edge_export::ir::{onnx, Attr, DType, Graph, TensorData};
use perceiver_edge_runtime::f16_as_f32::host_has_f16_arithmetic;
use perceiver_edge_runtime::{set_f16_as_f32, tensor, to_vec, Session};
use std::collections::BTreeMap;
use std::sync::Arc;

fn f16_const(g: &mut Graph, what: &str, shape: &[usize], data: &[f16]) -> perceiver_edge_export::ir::Val {
    let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    g.constant(what, TensorData { dtype: DType::F16, shape: shape.to_vec(), bytes: Arc::new(bytes) })
}

#[test]
fn an_f16_graph_runs_in_f32_without_f16_arithmetic() {
    // y = f32((f16(x) @ W + b)^2): an f16 linear layer and an element-wise op on its f16 output,
    // between an f32 input and output, as an f16 export has them. f16 arithmetic rounds the
    // activations to 11 significant bits.
    let (rows, k, cols) = (64, 300, 80);
    let w: Vec<f16> = (0..k * cols).map(|i| f16::from_f32((((i * 7919) % 523) as f32 - 261.0) / 512.0)).collect();
    let b: Vec<f16> = (0..cols).map(|i| f16::from_f32(i as f32 / 40.0)).collect();
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[rows, k]);
    let xh = g.node("Cast", &[&x], vec![("to", Attr::Int(10))], DType::F16, vec![rows, k]);
    let wv = f16_const(&mut g, "w", &[k, cols], &w);
    let bv = f16_const(&mut g, "b", &[cols], &b);
    let p = g.node("MatMul", &[&xh, &wv], vec![], DType::F16, vec![rows, cols]);
    let q = g.node("Add", &[&p, &bv], vec![], DType::F16, vec![rows, cols]);
    let z = g.node("Mul", &[&q, &q], vec![], DType::F16, vec![rows, cols]);
    let y = g.node("Cast", &[&z], vec![("to", Attr::Int(1))], DType::F32, vec![rows, cols]);
    g.output(&y, "y");
    let bytes = onnx::to_bytes(&g);
    // Inputs and weights are small multiples of 2^-9 / 2^-10: exact in f16, so both paths start
    // from the same values and differ only in their arithmetic.
    let xs: Vec<f32> = (0..rows * k).map(|i| (((i * 104729) % 997) as f32 - 498.0) / 1024.0).collect();
    let run = |on: bool| -> (Vec<f32>, bool, BTreeMap<String, (usize, std::time::Duration)>) {
        set_f16_as_f32(on);
        let mut s = Session::from_bytes(&bytes).unwrap();
        let mut ops = BTreeMap::new();
        let y = s
            .run_profiled(vec![tensor(&[rows, k], &xs).unwrap()], &mut ops, perceiver_edge_runtime::OpKey::Kind)
            .unwrap();
        (to_vec::<f32>(&y[0]).unwrap(), s.f16_computed_in_f32(), ops)
    };
    let (without, widened_without, _) = run(false);
    let (with, widened_with, ops_with) = run(true);
    set_f16_as_f32(true);

    // The reference: the product in f64.
    let mut want = vec![0f64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let dot: f64 = (0..k).map(|i| xs[r * k + i] as f64 * w[i * cols + c].to_f64()).sum::<f64>();
            want[r * cols + c] = (dot + b[c].to_f64()).powi(2);
        }
    }
    let max_err = |got: &[f32]| got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(!widened_without, "the pass ran with the switch off");
    // Without the pass: f16 activations, within f16's precision but not better.
    assert!(max_err(&without) < 1e-2 * scale, "f16 path: {} (scale {scale})", max_err(&without));
    assert!(max_err(&without) > 1e-5 * scale, "f16 path: {} (scale {scale})", max_err(&without));
    if host_has_f16_arithmetic() {
        // This CPU computes f16 natively: the pass leaves the graph alone.
        assert!(!widened_with);
        assert_eq!(with, without);
        return;
    }
    assert!(widened_with, "the pass did not run on a CPU without f16 arithmetic");
    // With it: the f16 weights computed in f32, to f32's precision, and no conversion left.
    assert!(max_err(&with) < 1e-6 * scale, "f32 path: {} (scale {scale})", max_err(&with));
    assert!(!ops_with.contains_key("Cast"), "{ops_with:?}");
}
