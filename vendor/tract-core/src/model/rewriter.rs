use std::any::TypeId;

use crate::internal::*;

type GenRewriteRule<Ctx> =
    Box<dyn Fn(&Ctx, &TypedModel, &TypedNode) -> TractResult<Option<TypedModelPatch>>>;

#[derive(Default)]
#[allow(clippy::type_complexity)]
pub struct Rewriter<Ctx> {
    rules: HashMap<TypeId, Vec<(Cow<'static, str>, GenRewriteRule<Ctx>)>>,
}

impl<Ctx> Rewriter<Ctx> {
    pub fn with_rule_for<O: Op + 'static>(
        mut self,
        name: impl Into<Cow<'static, str>>,
        rule: impl Fn(&Ctx, &TypedModel, &TypedNode, &str, &O) -> TractResult<Option<TypedModelPatch>>
        + 'static,
    ) -> Self {
        self.rules.entry(TypeId::of::<O>()).or_default().push((
            name.into(),
            Box::new(move |c: &Ctx, m: &TypedModel, n: &TypedNode| {
                if let Some(o) = n.op_as::<O>() { rule(c, m, n, &n.name, o) } else { Ok(None) }
            }),
        ));
        self
    }

    pub fn rewrite(&self, ctx: &Ctx, model: &mut TypedModel) -> TractResult<()> {
        loop {
            let mut done_anything = false;
            for n in model.eval_order()? {
                if let Some(rules) = self.rules.get(&(*model.node(n).op).type_id()) {
                    for (name, rule) in rules {
                        if let Some(patch) =
                            (rule)(ctx, model, model.node(n)).with_context(|| {
                                format!(
                                    "Evaluating rewriting rule \"{name}\" on node {}",
                                    model.node(n)
                                )
                            })?
                        {
                            patch.apply(model).with_context(|| {
                                format!(
                                    "Applying patch for rewriting rule \"{name}\" on node {}",
                                    model.node(n)
                                )
                            })?;
                            done_anything = true;
                        }
                    }
                }
            }
            if done_anything {
                // (perceiver-edge patch) A rule that reshapes a constant wires one reshape per
                // consumer; folded as they are, a weight shared by n matmuls is copied n times.
                if merge_equal_const_reshapes(model)? {
                    model.compact()?;
                }
                model.prop_consts()?;
                model.compact()?;
            } else {
                return Ok(());
            }
        }
    }
}

/// (perceiver-edge patch) Points the consumers of equal `AxisOp`s on the same constant at the
/// first of them; returns whether any moved (the others are then dead).
fn merge_equal_const_reshapes(model: &mut TypedModel) -> TractResult<bool> {
    let outputs = model.output_outlets()?.to_vec();
    let mut first: HashMap<(OutletId, String), usize> = HashMap::new();
    let mut rewire = vec![];
    for node in model.nodes() {
        if node.inputs.len() != 1
            || node.outputs.len() != 1
            || !node.op_is::<crate::ops::change_axes::AxisOp>()
            || !model.node(node.inputs[0].node).op_is::<crate::ops::konst::Const>()
            || outputs.contains(&OutletId::new(node.id, 0))
        {
            continue;
        }
        let key = (node.inputs[0], format!("{:?}", node.op));
        match first.get(&key) {
            Some(&keep) if model.node(keep).op == node.op => rewire.push((node.id, keep)),
            Some(_) => (),
            None => {
                first.insert(key, node.id);
            }
        }
    }
    for &(dup, keep) in &rewire {
        for inlet in model.node(dup).outputs[0].successors.clone() {
            model.add_edge(OutletId::new(keep, 0), inlet)?;
        }
    }
    Ok(!rewire.is_empty())
}
