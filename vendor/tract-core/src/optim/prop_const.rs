use tract_data::TooEarly;

use crate::internal::*;
use crate::ops::array::Slice;
use crate::ops::dummy::Dummy;
use crate::ops::konst::Const;
use crate::ops::source::TypedSource;
use crate::optim::{CONST_FOLD_MEM_BUDGET, OptimizerSession};

/// Replaces stateless nodes whose inputs are all constant with the constant they
/// evaluate to, walking forward through single-successor chains so one patch can
/// collapse a whole run.
///
/// [`CONST_FOLD_MEM_BUDGET`] is weighed only against an input that has several
/// successors, so a large weight is not duplicated once per consumer; a
/// sole-consumer input, or any input of a `Slice`, is exempt whatever its size.
/// Every fold, including each step of the walk, must additionally keep its output
/// within the allowance.
#[derive(Clone, Debug, Default)]
pub struct PropConst(usize, Vec<usize>);

impl super::TypedPass for PropConst {
    fn reset(&mut self) -> TractResult<()> {
        self.0 = 0;
        self.1.clear();
        Ok(())
    }
    fn next(
        &mut self,
        _session: &mut OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        // perceiver-edge patch 4: the other readers of a constant a fold has just read come
        // next, so the constant is dropped once the last of them is folded instead of staying
        // until the scan reaches them (an int8 weight is read by its packing and by its sum:
        // packing every weight first held all the raw weights next to all the packed ones).
        while let Some(id) = self.1.pop() {
            if let Some(patch) = self.fold(model, id, false)? {
                return Ok(Some(patch));
            }
        }
        for id in self.0..model.nodes.len() {
            if let Some(patch) = self.fold(model, id, true)? {
                return Ok(Some(patch));
            }
        }
        Ok(None)
    }
}

impl PropConst {
    /// The patch folding node `id` (and the single-successor chain after it), if it folds.
    /// `scan`: the node comes from the scan, whose position follows it.
    fn fold(
        &mut self,
        model: &TypedModel,
        id: usize,
        scan: bool,
    ) -> TractResult<Option<TypedModelPatch>> {
        let start = &model.nodes[id];
        let node = start;
        {
            if node.op_is::<Const>() && node.outputs[0].fact.konst.is_none() {
                if scan {
                    self.0 = node.id;
                }
                let mut patch = TypedModelPatch::default();
                let wire =
                    patch.add_const(&node.name, node.op_as::<Const>().unwrap().val().clone())?;
                patch.shunt_outside(model, node.id.into(), wire)?;
                return Ok(Some(patch));
            }
            let inputs = model.node_input_facts(node.id)?;
            if !node.op_is::<Const>()
                && !node.op_is::<Dummy>()
                && !node.op_is::<TypedSource>()
                && inputs.iter().zip(&node.inputs).all(|(fact, outlet)| {
                    fact.konst.is_some()
                        && (model.node(outlet.node).outputs[outlet.slot].successors.len() == 1
                            || node.op_is::<Slice>()
                            || (fact.datum_type.is_number()
                                && fact
                                    .mem_size()
                                    .as_i64()
                                    .is_some_and(|m| m as u64 <= CONST_FOLD_MEM_BUDGET)))
                })
            {
                let inputs =
                    inputs.iter().map(|f| f.konst.clone().unwrap().into_tvalue()).collect();
                let input_mem: u64 = model
                    .node_input_facts(node.id)?
                    .iter()
                    .map(|f| f.mem_size().as_i64().unwrap_or(i64::MAX) as u64)
                    .sum();
                match node.op.eval_out_of_plan(inputs) {
                    Ok(None) => (),
                    Ok(Some(res)) => {
                        if scan {
                            self.0 = node.id;
                        }
                        let allowance = input_mem.max(CONST_FOLD_MEM_BUDGET);
                        let mem = |res: &TVec<TValue>| -> u64 {
                            res.iter().map(|t| (t.datum_type().size_of() * t.volume()) as u64).sum()
                        };
                        // perceiver-edge patch 3: the walk goes on through results over the
                        // allowance (held only while walking, at most 4x it: a widening cast)
                        // and folds up to the last node whose result is within it, so
                        // `sum(cast(weight as i32))` becomes a constant even when the widened
                        // weight alone would be too large.
                        let mut fold = (mem(&res) <= allowance).then_some((node, res.clone()));
                        let (mut node, mut res) = (node, res);
                        loop {
                            let Some(succ) = model.single_succ(node.id)? else {
                                break;
                            };
                            if succ.inputs.len() > 1 {
                                break;
                            }
                            let Ok(Some(succ_res)) = succ.op.eval_out_of_plan(std::mem::take(&mut res)) else {
                                break;
                            };
                            if mem(&succ_res) > 4 * allowance {
                                break;
                            }
                            if mem(&succ_res) <= allowance {
                                fold = Some((succ, succ_res.clone()));
                            }
                            res = succ_res;
                            node = succ;
                        }
                        let Some((node, res)) = fold else {
                            return Ok(None);
                        };
                        let mut patch = TypedModelPatch::default();
                        for (ix, output) in res.into_iter().enumerate() {
                            let exotic_fact =
                                model.outlet_fact(OutletId::new(node.id, ix))?.exotic_fact.clone();

                            let name = if ix > 0 {
                                format!("{}.{ix}", node.name)
                            } else {
                                node.name.clone()
                            };
                            let wire = patch.wire_node(
                                name,
                                Const::new_with_opt_exotic_fact(
                                    output.into_arc_tensor(),
                                    exotic_fact,
                                )?,
                                &[],
                            )?[0];
                            patch.shunt_outside(model, (node.id, ix).into(), wire)?;
                        }
                        if scan {
                            self.0 = node.id;
                        }
                        for outlet in &start.inputs {
                            for inlet in &model.outlet_successors(*outlet)[..] {
                                if inlet.node != start.id && !self.1.contains(&inlet.node) {
                                    self.1.push(inlet.node);
                                }
                            }
                        }
                        return Ok(Some(patch));
                    }
                    Err(e) => {
                        if !e.root_cause().is::<TooEarly>() {
                            Err(e).with_context(|| {
                                format!("Eager eval {node} during optimisation")
                            })?;
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::math;

    fn const_i64(model: &mut TypedModel, name: &str, shape: [usize; 2]) -> TractResult<OutletId> {
        let len = shape[0] * shape[1];
        let t = Tensor::from_shape(&shape, &(0..len as i64).collect::<Vec<_>>())?;
        model.add_const(name, t)
    }

    /// Sides are derived from the budget rather than fixed, so changing
    /// [`CONST_FOLD_MEM_BUDGET`] cannot silently move a case to the other side of
    /// the guard.
    fn side_for(bytes: u64) -> usize {
        (bytes / std::mem::size_of::<i64>() as u64).isqrt() as usize
    }

    /// Two consumers of one constant, both foldable. The constant is well over the
    /// element count the guard used to allow but inside the memory budget, so the
    /// graph must collapse entirely: once both consumers are constant the shared
    /// input is dead and nothing has been duplicated.
    #[test]
    fn fold_through_shared_const_inside_mem_budget() -> TractResult<()> {
        let mut model = TypedModel::default();
        let side = side_for(CONST_FOLD_MEM_BUDGET / 16);
        let shared = const_i64(&mut model, "shared", [side, side])?;
        let one = model.add_const("one", tensor2(&[[1i64]]))?;
        let two = model.add_const("two", tensor2(&[[2i64]]))?;
        let a = model.wire_node("a", math::mul(), &[shared, two])?[0];
        let b = model.wire_node("b", math::add(), &[shared, one])?[0];
        let sum = model.wire_node("sum", math::add(), &[a, b])?[0];
        model.select_output_outlets(&[sum])?;

        let decluttered = model.into_decluttered()?;
        let live: Vec<&str> = decluttered
            .nodes
            .iter()
            .filter(|n| !n.op_is::<Const>() && !n.op_is::<Dummy>())
            .map(|n| n.name.as_str())
            .collect();
        assert!(live.is_empty(), "expected a fully folded graph, got {live:?}");
        Ok(())
    }

    /// The same shape of graph with a constant over the budget keeps its consumers,
    /// so a large weight is not turned into one copy per consumer.
    #[test]
    fn keep_shared_const_over_mem_budget() -> TractResult<()> {
        let mut model = TypedModel::default();
        let side = side_for(CONST_FOLD_MEM_BUDGET * 2);
        let shared = const_i64(&mut model, "shared", [side, side])?;
        let one = model.add_const("one", tensor2(&[[1i64]]))?;
        let two = model.add_const("two", tensor2(&[[2i64]]))?;
        let a = model.wire_node("a", math::mul(), &[shared, two])?[0];
        let b = model.wire_node("b", math::add(), &[shared, one])?[0];
        model.select_output_outlets(&[a, b])?;

        let decluttered = model.into_decluttered()?;
        assert!(
            decluttered.nodes.iter().any(|n| !n.op_is::<Const>() && !n.op_is::<Dummy>()),
            "a shared constant over the memory budget must not be folded per consumer"
        );
        Ok(())
    }
}

