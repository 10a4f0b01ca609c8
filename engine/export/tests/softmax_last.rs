//! A softmax over a strided axis three ways: the runtime's kernel in place
//! (`engine/runtime/src/softmax_rows.rs`, the default), the softmax-on-the-last-axis rewrite
//! (`softmax_last.rs`, for what that kernel does not take) and tract's plan without either, each
//! against a softmax computed here. One test in its own binary: the switches are process-wide.

use perceiver_edge_export::ir::{onnx, Attr, DType, Graph};
use perceiver_edge_runtime::{set_softmax_last, set_softmax_rows, tensor, to_vec, Session, Tensor};
use std::collections::BTreeMap;

#[test]
fn a_softmax_over_a_strided_axis_runs_on_a_contiguous_copy() {
    // Softmax over axis 0 of [rows, cols]: each column is normalised, read with a stride of a row.
    let (rows, cols) = (300, 96);
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[rows, cols]);
    let y = g.node("Softmax", &[&x], vec![("axis", Attr::Int(0))], DType::F32, vec![rows, cols]);
    g.output(&y, "y");
    let bytes = onnx::to_bytes(&g);
    let xs: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 523) as f32 / 40.0 - 6.0).collect();
    let input = || vec![tensor(&[rows, cols], &xs).unwrap()];
    let run = |rows: bool, last: bool| -> (Vec<Tensor>, BTreeMap<String, (usize, std::time::Duration)>) {
        set_softmax_rows(rows);
        set_softmax_last(last);
        let mut s = Session::from_bytes(&bytes).unwrap();
        let mut ops = BTreeMap::new();
        (s.run_profiled(input(), &mut ops, perceiver_edge_runtime::OpKey::Kind).unwrap(), ops)
    };
    let (without, ops_without) = run(false, false);
    let (with, ops_with) = run(false, true);
    let (kernel, ops_kernel) = run(true, true);
    set_softmax_rows(true);
    set_softmax_last(true);

    // The copy rewrite fired (the axis moves there and back) only with its switch on and the
    // kernel off; the kernel took the softmax in place.
    assert!(!ops_without.contains_key("MoveAxis"), "{ops_without:?}");
    assert_eq!(ops_with.get("MoveAxis").map(|e| e.0), Some(2), "{ops_with:?}");
    assert!(!ops_kernel.contains_key("MoveAxis") && ops_kernel.contains_key("SoftmaxRows"), "{ops_kernel:?}");
    // All agree with the softmax computed here (f64), and with each other to rounding.
    let (a, b, k) =
        (to_vec::<f32>(&with[0]).unwrap(), to_vec::<f32>(&without[0]).unwrap(), to_vec::<f32>(&kernel[0]).unwrap());
    for c in 0..cols {
        let col: Vec<f64> = (0..rows).map(|r| xs[r * cols + c] as f64).collect();
        let max = col.iter().cloned().fold(f64::MIN, f64::max);
        let sum: f64 = col.iter().map(|v| (v - max).exp()).sum();
        for r in 0..rows {
            let want = (col[r] - max).exp() / sum;
            for got in [a[r * cols + c], b[r * cols + c], k[r * cols + c]] {
                assert!((got as f64 - want).abs() < 1e-6 + 1e-5 * want, "[{r},{c}]: {got} vs {want}");
            }
        }
    }
}
