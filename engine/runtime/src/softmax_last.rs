//! Softmax over a contiguous axis: a rewrite of the optimised plan.
//!
//! tract 0.23.9 may compute attention scores transposed (keys x queries) when that suits its
//! matmul kernels and then runs the softmax over the leading, strided axis. For a cross-attention
//! over many inputs that reduction walks memory with a stride of a whole row at every step:
//! vision-perceiver-learned's `[50176, 512]` scores took 7.2 s of a 15.7 s run. This pass moves
//! such an axis last, runs the softmax there and moves it back (two copies of the scores, tens of
//! ms), and the contiguous softmax runs tract's vectorised kernel. Results differ from the strided
//! path by rounding only (vision-perceiver-learned's logits by 1.3e-6, and closer to transformers:
//! 1.4e-6 against 2.1e-6); `engine/export/tests/softmax_last.rs` compares both with a softmax
//! computed in f64. An f32 softmax is taken in place by [`crate::softmax_rows`] before this
//! pass runs; this one handles the others (f16 where the CPU computes it natively) and f32 when
//! that kernel is switched off.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::nn::Softmax;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Softmaxes over one axis that is not the last, with more than this many elements behind it.
const MIN_STRIDE: usize = 64;

/// Rewrites every softmax of `model` over a strided axis (see the module documentation).
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    loop {
        let next = model.nodes().iter().find_map(|n| {
            let op = n.op_as::<Softmax>()?;
            let shape = model.outlet_fact(n.inputs[0]).ok()?.shape.as_concrete()?.to_vec();
            let &[axis] = op.axes.as_slice() else { return None };
            let last = shape.len().checked_sub(1)?;
            // An axis past the rank (a hostile graph's; `guard::check_facts` refuses it first).
            let behind: usize = shape.get(axis.checked_add(1)?..)?.iter().product();
            (axis < last && behind >= MIN_STRIDE).then(|| (n.id, n.name.clone(), n.inputs[0], op.clone(), axis, last))
        });
        let Some((id, name, input, op, axis, last)) = next else { return Ok(done) };
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(model, input)?;
        let moved = patch.wire_node(format!("{name}.axis_last"), AxisOp::Move(axis, last), &[tap])?;
        let soft = patch.wire_node(format!("{name}.on_last"), Softmax { axes: tvec![last], ..op }, &moved)?;
        let back = patch.wire_node(format!("{name}.axis_back"), AxisOp::Move(last, axis), &soft)?;
        patch.shunt_outside(model, OutletId::new(id, 0), back[0])?;
        patch.apply(model)?;
        model.compact()?;
        done += 1;
    }
}
