//! f16 graphs on CPUs without f16 arithmetic: computed in f32.
//!
//! An f16 export stores its weights and activations as f16. Where the CPU has f16 arithmetic
//! that tract's kernels use (ARMv8.2 FP16) tract runs them natively. Elsewhere (every x86 board,
//! the Cortex-A53/A72 of a Raspberry Pi 3/4) tract converted f16 to f32 and back around every op:
//! the bench model's f16 graph ran 4.0x slower than onnxruntime on the same file (1.7x with this
//! pass, `models/reference/peer_bench.py`), which computes such a graph in f32. This pass does the
//! same before optimising: tract's own
//! `FloatPrecisionTranslator` turns every f16 value into f32 (each f16 weight is cast once, at
//! load). The file keeps its size; the resident weights are f32 (`inspect` shows them). Results
//! are those of the f16 weights computed in f32, so closer to the f32 model than native f16;
//! `engine/export/tests/f16_as_f32.rs` checks both paths against a product computed in f64, and
//! `engine/cli/tests/quantized.rs` the f16 exports of every fixture against transformers.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::transform::ModelTransform;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Whether this CPU has f16 arithmetic that tract's kernels use: ARM's FP16 extension. Not x86's
/// AVX512-FP16: there tract 0.23.9 has f16 matrix kernels but runs exact GELU and broadcast adds
/// value by value through conversions, and the bench model's f16 graph took 476 ms a run
/// natively against 18 ms for onnxruntime on the same file (Xeon with AVX512-FP16, session 13).
pub fn host_has_f16_arithmetic() -> bool {
    #[cfg(target_arch = "x86_64")]
    return false;
    #[cfg(not(target_arch = "x86_64"))]
    tract_linalg::has_fp16()
}

/// Whether `model` holds f16 values (weights or activations).
pub fn has_f16(model: &TypedModel) -> bool {
    model.nodes().iter().any(|n| n.outputs.iter().any(|o| o.fact.datum_type == DatumType::F16))
}

/// Computes `model`'s f16 values in f32 when the switch is on, the model has any, its inputs and
/// outputs are not f16 (their element type is the caller's contract) and this CPU lacks f16
/// arithmetic. Returns whether it did.
pub fn apply(model: &mut TypedModel) -> TractResult<bool> {
    if host_has_f16_arithmetic() {
        return Ok(false);
    }
    widen(model)
}

/// [`apply`] whatever this CPU has: for `--device cuda`, where tract-cuda 0.23.9 ran the bench
/// model's f16 graph in 222 ms a run on an H200 against 3.1 ms for its f32 graph (session 33,
/// `targets/check-gpu.sh`).
pub fn widen(model: &mut TypedModel) -> TractResult<bool> {
    let io_f16 = model
        .input_outlets()?
        .iter()
        .chain(model.output_outlets()?)
        .any(|o| model.outlet_fact(*o).map(|f| f.datum_type == DatumType::F16).unwrap_or(true));
    if !ENABLED.get() || io_f16 || !has_f16(model) {
        return Ok(false);
    }
    FloatPrecisionTranslator::new(DatumType::F16, DatumType::F32).transform(model)?;
    fold_constant_casts(model)?;
    Ok(true)
}

/// Replaces each cast of a constant with the cast constant; returns how many.
///
/// The translator casts each f16 constant to f32 through a `Cast` node, and tract folds a
/// constant only while the result stays within 4 MiB: a larger one (the bench model's
/// `[4096, 258]` Fourier position features, 4.03 MiB in f32) was cast again at every run
/// (2.3 ms of 23).
fn fold_constant_casts(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::internal::*;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::konst::Const;
    let found: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Cast>() && n.inputs.len() == 1 && model.node(n.inputs[0].node).op_is::<Const>())
        .map(|n| n.id)
        .collect();
    for &id in &found {
        let node = model.node(id);
        let value = model.outlet_fact(node.inputs[0])?.konst.clone().context("a constant without a value")?;
        let Some(cast) = node.op.eval_out_of_plan(tvec!(value.into_tvalue()))? else { continue };
        let mut patch = TypedModelPatch::default();
        let wire = patch.add_const(&node.name, cast[0].clone().into_arc_tensor())?;
        patch.shunt_outside(model, OutletId::new(id, 0), wire)?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok(found.len())
}
