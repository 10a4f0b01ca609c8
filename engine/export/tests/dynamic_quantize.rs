//! The runtime's `DynamicQuantizeLinear` (`engine/runtime/src/dynamic_quantize.rs`) against
//! tract-onnx's own op: an int8 export of models/digits and of a bare graph with ties, run with
//! and without the rewrite, gives bit-identical outputs, and the rewrite fires only when on. One
//! test in its own binary: the switch is process-wide.

use perceiver_edge_export::ir::{onnx, DType, Graph, Node, Val};
use perceiver_edge_export::{build, Checkpoint, ExportOptions, Precision, QuantOptions};
use perceiver_edge_runtime::{set_fast_dynamic_quantize, tensor, Session, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

type Ops = BTreeMap<String, (usize, std::time::Duration)>;

fn run(bytes: &[u8], on: bool, inputs: &dyn Fn(&Session) -> Vec<Tensor>) -> (Vec<Tensor>, Ops) {
    set_fast_dynamic_quantize(on);
    let mut s = Session::from_bytes(bytes).unwrap();
    let mut ops = BTreeMap::new();
    let x = inputs(&s);
    (s.run_profiled(x, &mut ops, perceiver_edge_runtime::OpKey::Kind).unwrap(), ops)
}

#[test]
fn runtime_dynamic_quantize_matches_tract_onnx() {
    // models/digits in int8: a DynamicQuantizeLinear before every activation x weight matmul.
    let ck = Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digits")).unwrap();
    let mut g = build(&ck, &ExportOptions::default()).unwrap();
    let q = QuantOptions { precision: Precision::Int8, ..Default::default() };
    g.quantize(&q, &ck.dir, &mut |_, _| {}).unwrap();
    let digits = g.to_bytes();
    let inputs = |s: &Session| -> Vec<Tensor> {
        s.inputs()
            .iter()
            .map(|i| {
                let n: usize = i.shape.iter().product();
                let x: Vec<f32> = (0..n).map(|j| ((j * 37) % 101) as f32 / 50.0 - 1.0).collect();
                tensor(&i.shape, &x).unwrap()
            })
            .collect()
    };
    let (tract, tract_ops) = run(&digits, false, &inputs);
    let (ours, our_ops) = run(&digits, true, &inputs);
    assert!(tract_ops.contains_key("DynamicQuantizeLinearU8") && !tract_ops.contains_key("DynamicQuantizeU8"));
    assert!(our_ops.contains_key("DynamicQuantizeU8") && !our_ops.contains_key("DynamicQuantizeLinearU8"));
    assert_eq!(ours, tract, "digits int8");

    // A bare DynamicQuantizeLinear on values at every half step of the scale (ties) and zeros.
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[4, 300]);
    let outs =
        [("dq_y", DType::U8, vec![4, 300]), ("dq_scale", DType::F32, vec![]), ("dq_zero_point", DType::U8, vec![])]
            .map(|(n, dtype, shape)| Val { name: n.to_string(), dtype, shape });
    g.nodes.push(Node {
        name: "dq".into(),
        op: "DynamicQuantizeLinear".into(),
        domain: String::new(),
        inputs: vec![x.name.clone()],
        outputs: outs.to_vec(),
        attrs: vec![],
    });
    for o in &outs {
        g.output(o, &o.name["dq_".len()..]);
    }
    let bare = onnx::to_bytes(&g);
    let ties = |_: &Session| -> Vec<Tensor> {
        // Range [-255, 255] -> scale 2: x / scale hits every half step.
        let x: Vec<f32> = (0..1200).map(|i| if i % 7 == 0 { 0.0 } else { (i % 511) as f32 - 255.0 }).collect();
        vec![tensor(&[4, 300], &x).unwrap()]
    };
    let (tract, _) = run(&bare, false, &ties);
    let (ours, _) = run(&bare, true, &ties);
    set_fast_dynamic_quantize(true);
    assert_eq!(ours, tract, "bare DynamicQuantizeLinear");
}
