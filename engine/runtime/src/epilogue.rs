//! What follows a Linear, done by the product itself ([`GemmMatMul`] on f32, [`Int8MatMul`] on int8,
//! [`GemmQ4`] on 4-bit weights) on each block of its output as soon as the block is computed: a rewrite of the decluttered
//! graph, after the runtime's products.
//!
//! A trained PerceiverIO checkpoint adds a bias after every Linear, applies GELU after the MLP's
//! first one and adds the residual after the attention's output projection and the MLP's second
//! one. tract runs each as a pass of its own over the whole output, on one thread below its
//! element-wise threshold (a `[512, 1024]` output is 2 MiB: past the L2 cache by the time the
//! next pass reads it). The Fourier encoder's keys and values (the exporter folds the input
//! LayerNorm after the product: a position table added, a factor per row, a bias) were four such
//! passes over `[50176, 261]`. [`rewrite`] takes such a chain into the product, through reshapes
//! that keep the rows whole: each thread finishes the rows and columns it just computed (in the
//! graph's order) while they are in its cache. Each step computes what tract's op computes (the
//! same additions and products, GELU through tract's own `erf` kernel), so outputs are
//! bit-identical; the tests compare the graph with and without the pass.

use crate::gemm_matmul::GemmMatMul;
use crate::int8_matmul::Int8MatMul;
use crate::q4_matmul::GemmQ4;
use std::collections::HashSet;
use tract_linalg::element_wise::ElementWise;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Add, Mul};
use tract_onnx::tract_core::ops::nn::GeluExact;

/// Appended to the name of the node a fused op replaces (its chain's last node).
pub(crate) const SUFFIX: &str = ".epilogue";

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// One step applied to a product's output; an index names an input of the product past its
/// operands (0 is the first one after them).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Step {
    /// Adds input `i`, one value per column (a Linear's bias).
    AddColumns(usize),
    /// Adds input `i`, of the output's shape (a residual).
    Add(usize),
    /// Multiplies by input `i`, one value per row (a LayerNorm's `1 / sigma` folded after the
    /// product: the Fourier encoder's keys and values).
    MulRows(usize),
    /// GELU, `x / 2 (1 + erf(x / sqrt 2))`, as tract's `GeluExact` computes it.
    Gelu,
}

/// The inputs and kernel the steps read, gathered once a run.
pub(crate) struct Finish<'a> {
    pub(crate) steps: &'a [Step],
    pub(crate) inputs: Vec<&'a [f32]>,
    pub(crate) erf: Option<Box<dyn ElementWise<f32>>>,
}

/// Values GELU scales at a time (tract's `GeluExact` takes 1024; `erf` is per value).
const GELU_CHUNK: usize = 256;

impl<'a> Finish<'a> {
    /// The steps of a product of `m x n` with their inputs (those past the product's operands),
    /// each checked to hold as many values as its step reads.
    pub(crate) fn new(steps: &'a [Step], inputs: &'a [TValue], m: usize, n: usize) -> TractResult<Finish<'a>> {
        let inputs = inputs.iter().map(|t| t.try_as_plain_ram()?.as_slice::<f32>()).collect::<TractResult<Vec<_>>>()?;
        for step in steps {
            let (i, want) = match *step {
                Step::AddColumns(i) => (i, n),
                Step::Add(i) => (i, m * n),
                Step::MulRows(i) => (i, m),
                Step::Gelu => continue,
            };
            ensure!(inputs.get(i).is_some_and(|x| x.len() == want), "epilogue input {i} is not of {want} values");
        }
        let erf = if steps.contains(&Step::Gelu) { Some(tract_linalg::routines::Func::Erf.ew_f32()?) } else { None };
        Ok(Finish { steps, inputs, erf })
    }

    /// Applies every step to rows `rows` and columns `cols` of the row-major output `c`, rows `n`
    /// values apart.
    ///
    /// # Safety
    /// `c` holds the output; no one else reads or writes this block meanwhile.
    pub(crate) unsafe fn block(
        &self,
        c: *mut f32,
        n: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let mut scaled = [0f32; GELU_CHUNK];
        for r in rows {
            let at = r * n + cols.start;
            let row = std::slice::from_raw_parts_mut(c.add(at), cols.len());
            for step in self.steps {
                match *step {
                    Step::AddColumns(i) => {
                        row.iter_mut().zip(&self.inputs[i][cols.clone()]).for_each(|(x, b)| *x += b);
                    }
                    Step::Add(i) => row.iter_mut().zip(&self.inputs[i][at..]).for_each(|(x, y)| *x += y),
                    Step::MulRows(i) => {
                        let f = self.inputs[i][r];
                        row.iter_mut().for_each(|x| *x *= f);
                    }
                    Step::Gelu => {
                        let erf = self.erf.as_ref().expect("erf kernel fetched for a GELU step");
                        let c = 2f32.sqrt().recip(); // tract's constant, computed as it does
                        for chunk in row.chunks_mut(GELU_CHUNK) {
                            let s = &mut scaled[..chunk.len()];
                            s.iter_mut().zip(chunk.iter()).for_each(|(s, x)| *s = *x * c);
                            // The kernel fails only for a datum type it lacks; f32's is built in.
                            let _ = erf.run(s);
                            chunk.iter_mut().zip(s.iter()).for_each(|(x, e)| *x = (*x * 0.5) * (*e + 1.0));
                        }
                    }
                }
            }
        }
    }
}

/// What node `next`, reading the product's running output at its input `slot`, does to it, if
/// the product can take it in: a step (reading the product's extra input `at`, if any) and the
/// outlet it reads besides, or (no step) a reshape that keeps each row whole, with the output's
/// new shape.
fn step(
    model: &TypedModel,
    next: &TypedNode,
    slot: usize,
    op: &Rows,
    at: usize,
) -> Option<(Option<Step>, Option<OutletId>, Vec<usize>)> {
    let out = model.outlet_fact(OutletId::new(next.id, 0)).ok()?;
    let out_shape = out.shape.as_concrete()?.to_vec();
    if out.datum_type != f32::datum_type() {
        return None;
    }
    if let Some(axis) = next.op_as::<AxisOp>() {
        // Reshapes keep the values' order; the rows stay rows when the last axis is n.
        let keeps_rows = out_shape.last() == Some(&op.n) && out_shape.iter().product::<usize>() == op.m * op.n;
        return (!matches!(axis, AxisOp::Move(..)) && keeps_rows && op.n > 0).then_some((None, None, out_shape));
    }
    if out_shape != op.shape {
        return None;
    }
    if let Some(ew) = next.op_as::<ElementWiseOp>() {
        return (ew.0.is::<GeluExact>() && ew.1.is_none()).then_some((Some(Step::Gelu), None, out_shape));
    }
    let bin = next.op_as::<TypedBinOp>()?;
    let (add, mul) = (bin.0.is::<Add>(), bin.0.is::<Mul>());
    if !(add || mul) || bin.1.is_some() || next.inputs.len() != 2 {
        return None;
    }
    let other = next.inputs[1 - slot];
    if other == next.inputs[slot] {
        return None;
    }
    let fact = model.outlet_fact(other).ok()?;
    let shape = fact.shape.as_concrete()?;
    if fact.datum_type != f32::datum_type() || !fact.is_plain() || shape.len() != op.shape.len() {
        return None;
    }
    let (last, rest) = shape.split_last()?;
    let (_, out_rest) = op.shape.split_last()?;
    let step = if add && shape == op.shape.as_slice() {
        Step::Add(at)
    } else if add && crate::column_constant(model, next, slot, &op.shape).is_some() {
        Step::AddColumns(at)
    } else if mul && *last == 1 && rest == out_rest {
        Step::MulRows(at)
    } else {
        return None;
    };
    Some((Some(step), Some(other), out_shape))
}

/// The output of a product that takes an epilogue: `m` rows of `n` values, row-major, of shape
/// `shape`.
pub(crate) struct Rows {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) shape: Vec<usize>,
}

/// A product that finishes each block of its output with [`Step`]s ([`GemmMatMul`] on f32,
/// [`Int8MatMul`] on int8, [`GemmQ4`] on 4-bit weights).
pub(crate) trait Finishes: TypedOp + Clone {
    /// Its output, if row-major (no outer loops, no strides) and no epilogue is planned yet.
    fn rows(&self) -> Option<Rows>;
    /// Takes the steps in, its output now of shape `shape`.
    fn finish_with(&mut self, steps: Vec<Step>, shape: Vec<usize>);
}

/// The chain of steps reading node `id`'s output (a product of output `rows`) alone, not yet
/// `taken` by another chain: the steps, the outlets they read, and the chain's last node.
fn chain(
    model: &TypedModel,
    id: usize,
    mut rows: Rows,
    taken: &mut HashSet<usize>,
) -> (Vec<Step>, Vec<OutletId>, usize, Vec<usize>) {
    let (mut steps, mut extra, mut last) = (vec![], vec![], id);
    while let Some(inlet) = crate::only_reader(model, last) {
        let next = model.node(inlet.node);
        if taken.contains(&next.id) {
            break;
        }
        let Some((step, input, shape)) = step(model, next, inlet.slot, &rows, extra.len()) else { break };
        taken.insert(next.id);
        extra.extend(input);
        steps.extend(step);
        rows.shape = shape;
        last = next.id;
    }
    (steps, extra, last, rows.shape)
}

/// A product with the chain that reads it taken in.
struct Planned {
    op: Box<dyn TypedOp>,
    /// How many steps.
    steps: usize,
    /// The outlets the steps read.
    extra: Vec<OutletId>,
    /// The chain's last node, whose output the op replaces.
    last: usize,
}

/// `op` at node `id` with the chain that reads it taken in; none if nothing follows it that it
/// can take.
fn plan<T: Finishes>(model: &TypedModel, id: usize, op: &T, taken: &mut HashSet<usize>) -> Option<Planned> {
    let (steps, extra, last, shape) = chain(model, id, op.rows()?, taken);
    if last == id {
        return None;
    }
    let (mut op, count) = (op.clone(), steps.len());
    op.finish_with(steps, shape);
    Some(Planned { op: Box::new(op), steps: count, extra, last })
}

/// Takes into each product ([`Finishes`]) whose output is row-major the chain of bias adds,
/// residual adds, factors per row, GELUs and row-keeping reshapes that reads it alone; returns
/// how many steps were taken in.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    // Nodes a chain took (two products added together: the first one's chain takes the add).
    let mut taken = HashSet::new();
    let mut found = vec![];
    for id in model.eval_order()? {
        let node = model.node(id);
        let planned = if let Some(op) = node.op_as::<GemmMatMul>() {
            plan(model, id, op, &mut taken)
        } else if let Some(op) = node.op_as::<Int8MatMul>() {
            plan(model, id, op, &mut taken)
        } else if let Some(op) = node.op_as::<GemmQ4>() {
            plan(model, id, op, &mut taken)
        } else {
            None
        };
        found.extend(planned.map(|p| (id, p)));
    }
    let steps = found.iter().map(|f| f.1.steps).sum();
    // A chain's input may be the end of a chain replaced before it (a residual).
    let mut subs = crate::Substitutions::default();
    for (id, Planned { op, extra, last, .. }) in found {
        let name = format!("{}{SUFFIX}", model.node(last).name);
        let inputs: Vec<OutletId> = model.node(id).inputs.iter().chain(&extra).copied().collect();
        subs.substitute(model, OutletId::new(last, 0), name, op, &inputs)?;
    }
    model.compact()?;
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::nn::gelu_exact::gelu_exact;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104729) % 1009) as f32 / 250.0 - 2.0).collect()
    }

    fn konst(model: &mut TypedModel, name: &str, shape: &[usize], seed: usize) -> OutletId {
        let t = Tensor::from_shape(shape, &values(shape.iter().product(), seed)).unwrap();
        model.add_const(name, t).unwrap()
    }

    fn linear(model: &mut TypedModel, name: &str, x: OutletId, k: usize, n: usize, seed: usize) -> OutletId {
        let w = konst(model, &format!("{name}.w"), &[k, n], seed);
        let axes: AxesMapping = "bmk,kn->bmn".parse().unwrap();
        model.wire_node(name, EinSum::new(axes, f32::datum_type()), &[x, w]).unwrap()[0]
    }

    fn add(model: &mut TypedModel, name: &str, a: OutletId, b: OutletId) -> OutletId {
        model.wire_node(name, TypedBinOp(Box::new(Add), None), &[a, b]).unwrap()[0]
    }

    /// An MLP block as a trained checkpoint has it: `x + W2 gelu(W1 x + b1) + b2`, and beside
    /// it two products added together then biased (a split projection), one product read twice
    /// (left alone), a bias that broadcasts the output larger (left alone), and the Fourier
    /// encoder's keys (reshaped, a table, a factor per row, a bias).
    fn model(m: usize, d: usize, h: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, m, d])).unwrap();
        let y = linear(&mut model, "dense1", x, d, h, 1);
        let b1 = konst(&mut model, "b1", &[1, 1, h], 2);
        let y = add(&mut model, "bias1", y, b1);
        let y = model.wire_node("gelu", gelu_exact(), &[y]).unwrap()[0];
        let y = linear(&mut model, "dense2", y, h, d, 3);
        let b2 = konst(&mut model, "b2", &[1, 1, d], 4);
        let y = add(&mut model, "bias2", b2, y);
        let y = add(&mut model, "residual", y, x);
        let p = linear(&mut model, "split.a", x, d, d, 5);
        let q = linear(&mut model, "split.b", y, d, d, 6);
        let s = add(&mut model, "split.sum", p, q);
        let b3 = konst(&mut model, "b3", &[1, 1, d], 7);
        let s = add(&mut model, "split.bias", s, b3);
        let twice = linear(&mut model, "twice", s, d, d, 8);
        let u = add(&mut model, "twice.a", twice, s);
        let u = add(&mut model, "twice.b", u, twice);
        let wide = linear(&mut model, "wide", u, d, d, 9);
        let b4 = konst(&mut model, "b4", &[2, 1, d], 10);
        let z = add(&mut model, "wide.bias", wide, b4);
        // The Fourier encoder's keys: a product reshaped, plus a table, times a factor per row,
        // plus a bias.
        let e = linear(&mut model, "enc", x, d, d, 12);
        let e = model.wire_node("enc.reshape", AxisOp::Rm(0), &[e]).unwrap()[0];
        let table = konst(&mut model, "table", &[m, d], 13);
        let e = add(&mut model, "enc.table", table, e);
        let r = konst(&mut model, "r", &[m, 1], 14);
        let e = model.wire_node("enc.rows", TypedBinOp(Box::new(Mul), None), &[e, r]).unwrap()[0];
        let b5 = konst(&mut model, "b5", &[1, d], 15);
        let e = add(&mut model, "enc.bias", e, b5);
        model.select_output_outlets(&[y, z, e]).unwrap();
        model
    }

    fn run(model: &TypedModel, x: &Tensor) -> Vec<Vec<u32>> {
        let out = model.clone().into_runnable().unwrap().run(tvec!(x.clone().into_tvalue())).unwrap();
        out.iter()
            .map(|t| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().iter().map(|v| v.to_bits()).collect())
            .collect()
    }

    /// With and without the pass, after the products' rewrite: identical bits, at one thread and
    /// at three (blocks of rows or of columns each finishing their own part).
    fn check(m: usize, d: usize, h: usize) {
        let mut plain = model(m, d, h);
        assert_eq!(crate::gemm_matmul::rewrite(&mut plain).unwrap(), 7, "products");
        let mut fused = plain.clone();
        // bias1 + gelu, bias2 + residual, split.sum + split.bias, the encoder's three; twice and
        // wide.bias left.
        assert_eq!(rewrite(&mut fused).unwrap(), 9, "steps taken in");
        let kinds =
            |m: &TypedModel| m.nodes().iter().filter(|n| n.op_is::<TypedBinOp>() || n.op_is::<ElementWiseOp>()).count();
        assert_eq!((kinds(&plain), kinds(&fused)), (12, 3), "element-wise nodes before and after");
        let x = Tensor::from_shape(&[1, m, d], &values(m * d, 11)).unwrap();
        let want = run(&plain, &x);
        assert!(run(&fused, &x) == want, "one thread, {m} x {d} x {h}");
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            let got = multithread_tract_scope(Executor::multithread(3), || run(&fused, &x));
            let plain3 = multithread_tract_scope(Executor::multithread(3), || run(&plain, &x));
            assert!(got == plain3, "three threads, {m} x {d} x {h}");
        }
    }

    #[test]
    fn fused_steps_match_the_ops_bit_for_bit() {
        check(5, 16, 24);
        // Large enough to split over threads: by rows (m > n) and by columns (n > m).
        check(300, 96, 64);
        check(40, 64, 1200);
    }
}
