//! The plan's evaluation order, as tract chose it before the runtime fused ops.
//!
//! tract orders a plan with a heuristic that counts upstream nodes, not bytes, and otherwise
//! takes the ready node of lowest id. On the quantised vision-perceiver-fourier graph it runs the
//! encoder's chunked cross-attention chunk by chunk; once the epilogues (`epilogue.rs`) or the
//! LayerNorm's scale and shift (`layer_norm_rows.rs`) are taken into ops, the same heuristic ran
//! every chunk up to its exponentiated scores before any chunk's product with the values, all 13
//! chunks alive at once (peak heap 131.6 -> 262 MiB). [`reference`] records tract's order of the
//! graph before those passes, by node name; [`plan`] orders the final graph after it: a node whose
//! name (or, for a fused op, the name of the chain node it is named after) is in the reference
//! takes that place, any other node the place of its latest input, and ready nodes run in place order.
//! The ops and their inputs are unchanged: outputs are identical.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::plan::SimplePlan;
use tract_onnx::tract_core::runtime::RunOptions;

/// Whether plans follow the order recorded before the fusing passes (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// The names of `model`'s nodes in tract's memory-minded evaluation order.
pub(crate) fn reference(model: &TypedModel) -> TractResult<Vec<String>> {
    Ok(model.eval_order_opt_ram()?.into_iter().map(|n| model.node(n).name.clone()).collect())
}

/// Suffixes of the fused ops' names after a node of the chain each replaced.
const FUSED: [&str; 2] = [crate::epilogue::SUFFIX, crate::layer_norm_rows::SUFFIX];

/// The evaluation order of `model` after `reference` (see the module note): every node the
/// outputs need, inputs before readers, constants left to tract.
pub(crate) fn follow(model: &TypedModel, reference: &[String]) -> TractResult<Vec<usize>> {
    let place: HashMap<&str, usize> = reference.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let anchor = |name: &str| {
        place.get(name).copied().or_else(|| FUSED.iter().find_map(|s| place.get(name.strip_suffix(s)?).copied()))
    };
    let needed = model.eval_order()?;
    let mut key = vec![0usize; model.nodes().len()];
    let mut is_needed = vec![false; model.nodes().len()];
    for &n in &needed {
        let node = model.node(n);
        let latest = node.inputs.iter().map(|i| key[i.node]).max().unwrap_or(0);
        key[n] = anchor(&node.name).unwrap_or(latest).max(latest);
        is_needed[n] = true;
    }
    // Kahn's algorithm over the needed nodes, the ready node of lowest key first.
    let mut waiting = vec![0usize; model.nodes().len()];
    let mut readers: Vec<Vec<usize>> = vec![vec![]; model.nodes().len()];
    for &n in &needed {
        for i in &model.node(n).inputs {
            if is_needed[i.node] && !readers[i.node].contains(&n) {
                readers[i.node].push(n);
                waiting[n] += 1;
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> =
        needed.iter().filter(|&&n| waiting[n] == 0).map(|&n| Reverse((key[n], n))).collect();
    let mut order = Vec::with_capacity(needed.len());
    while let Some(Reverse((_, n))) = ready.pop() {
        order.push(n);
        for &r in &readers[n] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(Reverse((key[r], r)));
            }
        }
    }
    ensure!(order.len() == needed.len(), "the graph has a cycle");
    Ok(order.into_iter().filter(|&n| !model.node(n).op_is::<Const>()).collect())
}

/// The runnable plan of `model`, in the order [`follow`] gives (tract's own order when the switch
/// is off or there is no reference).
pub(crate) fn plan(model: TypedModel, reference: Option<&[String]>) -> TractResult<Arc<TypedRunnableModel>> {
    let Some(reference) = reference.filter(|_| ENABLED.get()) else { return model.into_runnable() };
    let order = follow(&model, reference)?;
    // Each node after the one before it: tract's plain order then is this one. The builder taking
    // extra dependencies is deprecated in tract 0.23 but the only one that does; it scans them
    // per node (quadratic in nodes: no load-time change measured on the published graphs,
    // language-perceiver f32 load 1985-3038 -> 1750-1990 ms, `bench --runs 1 --warmup 0`).
    let deps: Vec<(usize, usize)> = order.windows(2).map(|w| (w[1], w[0])).collect();
    let outputs = model.output_outlets()?.to_vec();
    #[allow(deprecated)]
    let plan = SimplePlan::build_with_outputs_and_deps(
        model,
        &outputs,
        &deps,
        &RunOptions { skip_order_opt_ram: true, ..Default::default() },
    )?;
    Ok(Arc::new(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math::{add, mul};

    /// Two branches from one input, each two ops, joined: `a1 a2` and `b1 b2`, then `join`.
    fn model() -> TypedModel {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4])).unwrap();
        let c = m.add_const("c", tensor1(&[2f32; 4])).unwrap();
        let a1 = m.wire_node("a1", mul(), &[x, c]).unwrap()[0];
        let b1 = m.wire_node("b1", add(), &[x, c]).unwrap()[0];
        let a2 = m.wire_node("a2", mul(), &[a1, c]).unwrap()[0];
        let b2 = m.wire_node("b2.epilogue", add(), &[b1, c]).unwrap()[0];
        let j = m.wire_node("join", add(), &[a2, b2]).unwrap()[0];
        m.select_output_outlets(&[j]).unwrap();
        m
    }

    fn names(m: &TypedModel, order: &[usize]) -> Vec<String> {
        order.iter().map(|&n| m.node(n).name.clone()).collect()
    }

    #[test]
    fn follows_the_reference_and_places_a_fused_op_where_its_node_was() {
        let m = model();
        // The reference interleaves the branches; `b2` was fused into `b2.epilogue` since.
        let reference: Vec<String> = ["x", "c", "b1", "a1", "b2", "a2", "join"].map(String::from).to_vec();
        let order = follow(&m, &reference).unwrap();
        assert_eq!(names(&m, &order), ["x", "b1", "a1", "b2.epilogue", "a2", "join"]);
        // Another reference, another order: the reference decides, not node ids.
        let reference: Vec<String> = ["x", "a1", "a2", "b1", "b2", "join"].map(String::from).to_vec();
        assert_eq!(names(&m, &follow(&m, &reference).unwrap()), ["x", "a1", "a2", "b1", "b2.epilogue", "join"]);
        // The plan runs in that order.
        let plan = plan(m, Some(&reference)).unwrap();
        assert_eq!(names(plan.model(), plan.order_without_consts()), ["x", "a1", "a2", "b1", "b2.epilogue", "join"]);
    }

    #[test]
    fn unknown_nodes_follow_their_inputs_and_readers_wait_for_them() {
        let m = model();
        // Nothing but the join is known: every other node goes as early as its inputs allow,
        // and never before them.
        let order = follow(&m, &["join".to_string()]).unwrap();
        let at = |n: &str| names(&m, &order).iter().position(|x| x == n).unwrap();
        assert_eq!(order.len(), 6);
        assert!(at("x") < at("a1") && at("a1") < at("a2") && at("x") < at("b1") && at("b1") < at("b2.epilogue"));
        assert_eq!(at("join"), 5);
    }
}
