//! Hold each weight once: optimiser passes for tract's decluttering and code generation.
//!
//! tract 0.23.9 derives a constant matmul operand per consumer: decluttering wires the int8
//! weight-flavour ops onto a weight once per matmul, code generation reshapes a weight per matmul
//! (`MergeConsecutiveSameRoleAxes`) and gives every matmul its own `OptMatMulPack` node, and
//! constant propagation then folds each into its own copy. A PerceiverIO graph applies its
//! weight-shared latent block several times (the vision architectures 8 times), so loading held
//! one copy of the block's weights per application, and peaked while all of them existed.
//!
//! [`optimize`] runs tract's own decluttering and code generation with one pass added:
//! [`ShareConstants`] merges constant nodes of equal value, then nodes whose value follows from
//! constants alone (an axis change, cast or packing of such inputs) that apply the same op to the
//! same inputs. It runs before each round's constant propagation (so what the round before wired
//! per consumer is folded once) and right after the ops are generated (so each weight is packed
//! once and every application's matmul bakes a handle on the same buffer). Before decluttering,
//! [`fold_axis_changes`] applies the axis changes translation left on weights to the weights in
//! place, where constant propagation would fold each into a copy. The arithmetic is
//! unchanged (the same kernels read the same bytes), so outputs are bit-identical; the tests
//! compare the plan with and without the pass.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::pack::OptMatMulPack;
use tract_onnx::tract_core::optim::{Optimizer, OptimizerSession, TypedPass};

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Declutters and optimises `model` like tract's `into_optimized`, holding each constant once
/// (with `pack_once`; without it, exactly tract's decluttering and code generation), and runs
/// `between` on the decluttered model before code generation.
pub fn optimize(
    mut model: TypedModel,
    pack_once: bool,
    between: impl FnOnce(&mut TypedModel) -> TractResult<()>,
) -> TractResult<TypedModel> {
    let mut declutter = Optimizer::declutter();
    let mut codegen = Optimizer::codegen();
    if pack_once {
        // Codegen's passes: PropConst, MergeConsecutiveSameRoleAxes, codegen, declutter, ...
        // After the codegen OpOptim the packing nodes exist and PropConst has not folded them.
        let after_codegen = codegen.passes.len().min(3);
        codegen.add_pass(after_codegen, Box::new(ShareConstants));
        // Before each round's PropConst.
        codegen.add_pass(0, Box::new(ShareConstants));
        declutter.add_pass(0, Box::new(ShareConstants));
        fold_axis_changes(&mut model)?;
    }
    declutter.optimize(&mut model)?;
    between(&mut model)?;
    model.optimize_with_session(&mut codegen.session())?;
    Ok(model)
}

/// Applies each axis change (`AxisOp`: an added or removed unit axis, a reshape, a move) that is
/// the only reader of a constant to that constant in place, and returns how many. tract's
/// translation leaves one on most weights (an int8 or q4 export's products get their weight
/// through an added axis), and decluttering's constant propagation folds each into a copy of the
/// weight (language-perceiver int8: 333 of them on 196 MB of weights) while the change-of-axes
/// pass tries each against the graph first. An added or removed axis or a reshape changes only the
/// shape; a move copies the values once, as folding it would.
pub(crate) fn fold_axis_changes(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::internal::ensure;
    use tract_onnx::tract_core::ops::dummy::Dummy;
    let mut count = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(op) = node.op_as::<AxisOp>().cloned() else { continue };
        let [input] = node.inputs[..] else { continue };
        let source = model.node(input.node);
        let Some(konst) = source.op_as::<Const>() else { continue };
        let only_reader = source.outputs.len() == 1 && source.outputs[0].successors.len() == 1;
        if !only_reader || konst.exotic_fact().is_some() || model.outputs.contains(&input) || node.outputs.len() != 1 {
            continue;
        }
        let want = node.outputs[0].fact.clone();
        let value = konst.val().clone();
        // The shape it will take, checked before the graph changes (a reshape to a symbolic
        // shape is left to decluttering).
        let mut shape: TVec<usize> = value.shape().into();
        let concrete = op.change_shape_array(&mut shape, false).is_ok() && want.shape.as_concrete() == Some(&*shape);
        if !concrete || want.datum_type != value.datum_type() {
            continue;
        }
        // The constant's other holders (its op, its output's fact) let go, so that the value
        // changes in place.
        let source = model.node_mut(input.node);
        let fact = source.outputs[0].fact.without_value();
        source.op = Box::new(Dummy::new());
        source.outputs[0].fact = fact;
        source.outputs[0].successors.clear();
        let mut value = Arc::try_unwrap(value).unwrap_or_else(|shared| shared.as_ref().clone());
        op.change_tensor(&mut value, false)?;
        let value = value.into_arc_tensor();
        let fact = TypedFact::try_from(value.clone())?;
        ensure!(fact.shape == want.shape, "folding {} into its constant gave {fact:?}", model.node(id).name);
        let node = model.node_mut(id);
        node.op = Box::new(Const::new(value)?);
        node.inputs.clear();
        node.outputs[0].fact = fact;
        count += 1;
    }
    if count > 0 {
        model.compact()?;
    }
    Ok(count)
}

/// The pass: merges equal constants, then equal constant-valued nodes on the same inputs.
#[derive(Clone, Debug, Default)]
pub struct ShareConstants;

impl TypedPass for ShareConstants {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(&mut self, _: &mut OptimizerSession, _: &TypedModel) -> TractResult<Option<TypedModelPatch>> {
        Ok(None)
    }

    fn run_direct(&mut self, model: &mut TypedModel) -> TractResult<bool> {
        let mut merged = merge(model, |node| {
            let t = node.op_as::<Const>()?.val();
            if !node.inputs.is_empty() || !t.datum_type().is_copy() || !t.is_plain() {
                return None;
            }
            // The bucket key reads a bounded sample of the bytes (the pass runs once per optimiser
            // round, over every weight); `merge` compares bucket members in full.
            let bytes = t.as_bytes();
            let sample = |r: std::ops::Range<usize>| &bytes[r.start.min(bytes.len())..r.end.min(bytes.len())];
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (t.datum_type(), t.shape(), sample(0..256), sample(bytes.len().saturating_sub(256)..bytes.len()))
                .hash(&mut h);
            Some(h.finish())
        })?;
        // A chain (reshape, then pack) merges one link per round: the second link's inputs are
        // equal only once the first is merged.
        loop {
            let constant = constant_valued(model)?;
            let n = merge(model, |node| {
                if node.inputs.is_empty() || !constant.contains(&node.id) {
                    return None;
                }
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (node.inputs.as_slice(), node.op.name()).hash(&mut h);
                Some(h.finish())
            })?;
            if n == 0 {
                break;
            }
            merged += n;
        }
        Ok(merged > 0)
    }
}

/// Nodes whose value follows from constants alone: `Const` nodes, and the ops tract wires onto a
/// weight per consumer (axis changes, casts, packing) all of whose inputs are such nodes. Each of
/// these is a pure function of its inputs.
fn constant_valued(model: &TypedModel) -> TractResult<HashSet<usize>> {
    let mut set = HashSet::new();
    for id in model.eval_order()? {
        let node = &model.nodes()[id];
        let constant = if node.op_is::<Const>() {
            node.inputs.is_empty()
        } else {
            !node.inputs.is_empty()
                && (node.op_is::<AxisOp>() || node.op_is::<Cast>() || node.op_is::<OptMatMulPack>())
                && node.inputs.iter().all(|i| set.contains(&i.node))
        };
        if constant {
            set.insert(id);
        }
    }
    Ok(set)
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
            other.inputs == node.inputs && other.op == node.op
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `y = x + AddAxis(w)` (and `z = x + Rm(AddAxis(w))`-like second readers when `shared`),
    /// `w` a `[3, 8]` constant; with its data's address.
    fn model(shared: bool) -> (TypedModel, usize) {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 3, 8])).unwrap();
        let w = Tensor::from_shape(&[3, 8], &(0..24).map(|i| i as f32 / 7.0).collect::<Vec<_>>()).unwrap();
        let at = w.as_bytes().as_ptr() as usize;
        let w = m.add_const("w", w).unwrap();
        let wide = m.wire_node("w.add", AxisOp::Add(0), &[w]).unwrap()[0];
        let y = m.wire_node("y", tract_onnx::tract_core::ops::math::add(), &[x, wide]).unwrap()[0];
        let mut outputs = vec![y];
        if shared {
            let again = m.wire_node("w.add2", AxisOp::Add(0), &[w]).unwrap()[0];
            outputs.push(m.wire_node("z", tract_onnx::tract_core::ops::math::mul(), &[x, again]).unwrap()[0]);
        }
        m.select_output_outlets(&outputs).unwrap();
        (m, at)
    }

    fn run(m: TypedModel) -> TVec<TValue> {
        let x = Tensor::from_shape(&[1, 3, 8], &(0..24).map(|i| 1.0 - i as f32 / 5.0).collect::<Vec<_>>()).unwrap();
        m.into_runnable().unwrap().run(tvec!(x.into_tvalue())).unwrap()
    }

    #[test]
    fn an_axis_change_folds_into_its_only_constant_in_place() {
        let (mut m, at) = model(false);
        assert_eq!(fold_axis_changes(&mut m).unwrap(), 1);
        assert!(m.nodes().iter().all(|n| !n.op_is::<AxisOp>()));
        let konst = m.nodes().iter().find_map(|n| n.op_as::<Const>()).unwrap().val().clone();
        assert_eq!(konst.shape(), &[1, 3, 8]);
        assert_eq!(konst.as_bytes().as_ptr() as usize, at, "the constant was copied");
        assert_eq!(run(m), run(model(false).0));
    }

    #[test]
    fn a_constant_read_twice_is_left_alone() {
        let (mut m, _) = model(true);
        assert_eq!(fold_axis_changes(&mut m).unwrap(), 0);
        assert_eq!(m.nodes().iter().filter(|n| n.op_is::<AxisOp>()).count(), 2);
        assert_eq!(run(m), run(model(true).0));
    }
}
