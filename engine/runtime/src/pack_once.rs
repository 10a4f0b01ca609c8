//! Pack each weight once: an optimiser pass for tract's code generation.
//!
//! tract 0.23.9 packs a constant matmul operand per consumer: code generation gives every matmul
//! its own `OptMatMulPack` node, and constant propagation then folds each into its own packed
//! copy. A PerceiverIO graph applies its weight-shared latent block several times (the vision
//! architectures 8 times), so the plan held one packed copy of the block's weights per
//! application, and loading peaked while all of them existed.
//!
//! [`optimize`] runs tract's own code generation with one pass added right after the ops are
//! generated and before constants are folded: [`SamePacking`] merges constant nodes of equal
//! value and then `OptMatMulPack` nodes that pack the same outlet the same way, so each weight is
//! packed once and every application's matmul bakes a handle on the same buffer. The arithmetic is
//! unchanged (the same kernels read the same packed bytes), so outputs are bit-identical; the
//! tests compare the plan with and without the pass.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::pack::OptMatMulPack;
use tract_onnx::tract_core::optim::{Optimizer, OptimizerSession, TypedPass};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether [`optimize`] is asked to pack once (see [`crate::set_pack_once`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Sets what [`enabled`] answers.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Declutters and optimises `model` like tract's `into_optimized`, packing each constant matmul
/// operand once (with `pack_once`; without it, exactly tract's code generation).
pub fn optimize(mut model: TypedModel, pack_once: bool) -> TractResult<TypedModel> {
    model.declutter()?;
    let mut optimizer = Optimizer::codegen();
    if pack_once {
        // After PropConst, MergeConsecutiveSameRoleAxes and the codegen OpOptim: the packing
        // nodes exist, and the next round's PropConst has not folded them yet.
        let at = optimizer.passes.len().min(3);
        optimizer.add_pass(at, Box::new(SamePacking));
    }
    model.optimize_with_session(&mut optimizer.session())?;
    Ok(model)
}

/// The pass: merges equal constants, then equal packings of one outlet.
#[derive(Clone, Debug, Default)]
pub struct SamePacking;

impl TypedPass for SamePacking {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(&mut self, _: &mut OptimizerSession, _: &TypedModel) -> TractResult<Option<TypedModelPatch>> {
        Ok(None)
    }

    fn run_direct(&mut self, model: &mut TypedModel) -> TractResult<bool> {
        let consts = merge(model, |node| {
            let t = node.op_as::<Const>()?.val();
            if !node.inputs.is_empty() || !t.datum_type().is_copy() || !t.is_plain() {
                return None;
            }
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (t.datum_type(), t.shape(), t.as_bytes()).hash(&mut h);
            Some(h.finish())
        })?;
        let packs = merge(model, |node| {
            let op = node.op_as::<OptMatMulPack>()?;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (node.inputs.as_slice(), op).hash(&mut h);
            Some(h.finish())
        })?;
        Ok(consts + packs > 0)
    }
}

/// Rewires the consumers of every node that `key` puts in the same bucket as an earlier, equal
/// node (same op, same inputs) onto that earlier node; returns how many nodes were bypassed
/// (dead now; the optimiser's compaction removes them).
fn merge(model: &mut TypedModel, key: impl Fn(&TypedNode) -> Option<u64>) -> TractResult<usize> {
    let outputs: Vec<OutletId> = model.output_outlets()?.to_vec();
    let mut first: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut rewire: Vec<(usize, usize)> = vec![];
    for node in model.nodes() {
        if node.outputs.len() != 1 || outputs.contains(&OutletId::new(node.id, 0)) {
            continue;
        }
        if node.outputs[0].successors.is_empty() {
            continue;
        }
        let Some(k) = key(node) else { continue };
        let seen = first.entry(k).or_default();
        // Equal ops on the same inputs, checked in full: a hash collision must never merge
        // different weights.
        let same = seen.iter().copied().find(|&o| {
            let other = &model.nodes()[o];
            other.inputs == node.inputs && equal_ops(other, node)
        });
        match same {
            Some(o) => rewire.push((node.id, o)),
            None => seen.push(node.id),
        }
    }
    for &(dup, keep) in &rewire {
        let successors = model.nodes()[dup].outputs[0].successors.clone();
        for inlet in successors {
            model.add_edge(OutletId::new(keep, 0), inlet)?;
        }
    }
    Ok(rewire.len())
}

/// Two `Const` ops with equal tensors, or two `OptMatMulPack` ops with equal packers and axes.
fn equal_ops(a: &TypedNode, b: &TypedNode) -> bool {
    if let (Some(x), Some(y)) = (a.op_as::<Const>(), b.op_as::<Const>()) {
        return x == y;
    }
    matches!((a.op_as::<OptMatMulPack>(), b.op_as::<OptMatMulPack>()), (Some(x), Some(y)) if x == y)
}
