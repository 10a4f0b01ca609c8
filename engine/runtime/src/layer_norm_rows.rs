//! LayerNorm over the last axis in one op, rows split over the threads: a rewrite of the
//! decluttered graph, before tract's code generation.
//!
//! tract-onnx expands `LayerNormalization` into a sum over the axis, a product by `1 / n`, a
//! subtraction and an `RmsNorm`: four ops, four passes over the activations, each on one thread
//! below tract's element-wise threshold. PerceiverIO normalises before every attention and MLP
//! (language-perceiver: 57 LayerNorms a run, 34 ms of 925 at one thread, `bench --profile`).
//! [`LayerNormRows`] computes `(x - mean) / sqrt(mean((x - mean)^2) + eps)` per row in two passes
//! over lanes the compiler vectorises (AVX-512, AVX2 + FMA where the CPU has them, chosen at run
//! time), rows split over tract's thread pool. It replaces that chain, and the scale and shift
//! after it (a `Mul` and an `Add` of one constant per column, in a trained checkpoint; tract
//! drops a scale of ones and a shift of zeros): the normalisation differs from tract's by rounding
//! only (the unit tests compare it with a LayerNorm computed in f64), the scale and shift are
//! tract's own arithmetic (bit-identical).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};
use tract_onnx::tract_core::ops::nn::rms_norm::RmsNorm;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

/// Appended to the name of the chain's `RmsNorm` node for the fused op.
pub(crate) const SUFFIX: &str = ".layer_norm";

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Values per lane group: the widest vector (AVX-512) holds 16 f32.
const LANES: usize = 16;

/// The normalised row `xs`, in place.
#[inline(always)]
fn row(xs: &mut [f32], eps: f32) {
    let n = xs.len() as f32;
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    let mean = (lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()) / n;
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] -= mean;
            lanes[i] += c[i] * c[i];
        }
    }
    let mut sq: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v -= mean;
        sq += *v * *v;
    }
    let inv = 1.0 / (sq / n + eps).sqrt();
    for v in xs.iter_mut() {
        *v *= inv;
    }
}

/// A LayerNorm's scale and shift (one value per column each), either absent.
type Affine<'a> = (Option<&'a [f32]>, Option<&'a [f32]>);

#[inline(always)]
fn rows_generic(data: &mut [f32], len: usize, eps: f32, (scale, shift): Affine) {
    for r in data.chunks_exact_mut(len) {
        row(r, eps);
        // As tract's `Mul` then `Add` compute them (no fused multiply-add).
        if let Some(g) = scale {
            r.iter_mut().zip(g).for_each(|(v, g)| *v *= g);
        }
        if let Some(b) = shift {
            r.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(data: &mut [f32], len: usize, eps: f32, affine: Affine) {
    rows_generic(data, len, eps, affine)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(data: &mut [f32], len: usize, eps: f32, affine: Affine) {
    rows_generic(data, len, eps, affine)
}

/// Normalises every row of `len` values of `data` with the widest vectors this CPU has, then
/// scales and shifts it.
fn rows(data: &mut [f32], len: usize, eps: f32, affine: Affine) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { rows_avx512(data, len, eps, affine) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { rows_avx2(data, len, eps, affine) };
        }
    }
    rows_generic(data, len, eps, affine)
}

/// Below this many values a LayerNorm stays on one thread. From the bench model's `[128, 256]`
/// up it is split, as the product that wrote it was (by rows; see `GemmMatMul::blocks`): one
/// thread would read the other's rows out of that core's cache.
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 16 << 10;

/// `(x - mean) / sqrt(var + eps)` over the last axis of an f32 tensor, then (a trained
/// LayerNorm's) times the scale and plus the shift when they are inputs 1 and 2 (or the one).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LayerNormRows {
    /// The epsilon's bits (f32 has no `Hash`).
    eps_bits: u32,
    scale: bool,
    shift: bool,
}

impl LayerNormRows {
    fn eps(&self) -> f32 {
        f32::from_bits(self.eps_bits)
    }

    /// Normalises the rows of `data`, first copied from `src` when there is one (a part per
    /// thread: each copies and normalises its own rows).
    fn run(&self, src: Option<&[f32]>, data: &mut [f32], len: usize, affine: Affine) {
        let eps = self.eps();
        let part = |first: usize, part: &mut [f32]| {
            if let Some(src) = src {
                part.copy_from_slice(&src[first..first + part.len()]);
            }
            rows(part, len, eps, affine)
        };
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            if let Some(pool) = crate::thread_pool() {
                if data.len() >= PARALLEL_MIN {
                    let per = (data.len() / len).div_ceil(pool.current_num_threads()).max(1) * len;
                    pool.install(|| data.par_chunks_mut(per).enumerate().for_each(|(i, p)| part(i * per, p)));
                    return;
                }
            }
        }
        part(0, data)
    }
}

impl Op for LayerNormRows {
    fn name(&self) -> StaticName {
        "LayerNormRows".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let affine = match (self.scale, self.shift) {
            (true, true) => ", scaled and shifted",
            (true, false) => ", scaled",
            (false, true) => ", shifted",
            (false, false) => "",
        };
        Ok(vec![format!("eps {}{affine}", self.eps())])
    }

    op_as_typed_op!();
}

impl EvalOp for LayerNormRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs.remove(0);
        let len = *input.shape().last().context("LayerNormRows: a scalar")?;
        if len == 0 {
            return Ok(tvec!(input));
        }
        let mut params = inputs.iter().map(|t| {
            let v = t.try_as_plain_ram()?.as_slice::<f32>()?;
            ensure!(v.len() == len, "LayerNormRows: a scale or shift of {} values for rows of {len}", v.len());
            Ok(v)
        });
        let scale = if self.scale { Some(params.next().context("LayerNormRows: no scale")??) } else { None };
        let shift = if self.shift { Some(params.next().context("LayerNormRows: no shift")??) } else { None };
        let affine = (scale, shift);
        // In place unless another node reads the input too; then into a new tensor, the copy
        // split over the threads with the normalisation.
        if input.is_exclusive() {
            let mut t = input.into_tensor();
            self.run(None, t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, len, affine);
            return Ok(tvec!(t.into_tvalue()));
        }
        let src = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut t = unsafe { Tensor::uninitialized_dt(f32::datum_type(), input.shape())? };
        self.run(Some(src), t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, len, affine);
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for LayerNormRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// The node making outlet `o`, if `o` is its only output and `reader` its only reader.
fn sole_producer(model: &TypedModel, o: OutletId, reader: usize) -> Option<&TypedNode> {
    let node = model.node(o.node);
    let out = &node.outputs[o.slot];
    (node.outputs.len() == 1 && out.successors.len() == 1 && out.successors[0].node == reader).then_some(node)
}

/// The input `x` and epsilon of the LayerNorm chain ending at `RmsNorm` node `node`:
/// `rms_norm(x - sum(x) * (1 / n))` over the last axis of an f32 `x`.
fn chain(model: &TypedModel, node: &TypedNode) -> Option<(OutletId, f32)> {
    let rms = node.op_as::<RmsNorm>()?;
    let d = sole_producer(model, node.inputs[0], node.id)?;
    let sub = d.op_as::<TypedBinOp>()?;
    if !sub.0.is::<Sub>() || d.inputs.len() != 2 {
        return None;
    }
    let (x, mean) = (d.inputs[0], d.inputs[1]);
    let fact = model.outlet_fact(x).ok()?;
    let shape = fact.shape.as_concrete()?;
    let last = shape.len().checked_sub(1)?;
    let n = shape[last];
    if fact.datum_type != f32::datum_type() || !fact.is_plain() || rms.axis != last || n == 0 {
        return None;
    }
    let m = sole_producer(model, mean, d.id)?;
    let mul = m.op_as::<TypedBinOp>()?;
    if !mul.0.is::<Mul>() || m.inputs.len() != 2 {
        return None;
    }
    let (sum, recip) = (m.inputs[0], m.inputs[1]);
    let recip = model.node(recip.node).op_as::<Const>()?.val();
    let r = (recip.len() == 1).then(|| recip.cast_to_scalar::<f32>().ok())??;
    if (r - 1.0 / n as f32).abs() > f32::EPSILON * r {
        return None;
    }
    let s = sole_producer(model, sum, m.id)?;
    let reduce = s.op_as::<Reduce>()?;
    if reduce.reducer != Reducer::Sum || reduce.axes.as_slice() != [last] || s.inputs[0] != x {
        return None;
    }
    let eps = rms.eps.cast_to_scalar::<f32>().ok()?;
    Some((x, eps))
}

/// Replaces every LayerNorm chain of the decluttered `model` (see [`chain`]) with
/// [`LayerNormRows`]; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, OutletId, f32)> =
        model.nodes().iter().filter_map(|n| chain(model, n).map(|(x, eps)| (n.id, x, eps))).collect();
    let mut subs = crate::Substitutions::default();
    for &(id, x, eps) in &found {
        let (mut last, mut inputs) = (id, vec![x]);
        let scale = affine_step(model, &mut last, &mut inputs, true);
        let shift = affine_step(model, &mut last, &mut inputs, false);
        let name = format!("{}{SUFFIX}", model.node(id).name);
        let op = LayerNormRows { eps_bits: eps.to_bits(), scale, shift };
        subs.substitute(model, OutletId::new(last, 0), name, op, &inputs)?;
    }
    model.compact()?;
    Ok(found.len())
}

/// Whether the only reader of node `last` multiplies (`mul`) or adds its output by a constant of
/// one value per column (a trained LayerNorm's scale or shift); if so, it becomes `last` and the
/// constant is pushed on `inputs`.
fn affine_step(model: &TypedModel, last: &mut usize, inputs: &mut Vec<OutletId>, mul: bool) -> bool {
    let Some(reader) = crate::only_reader(model, *last) else { return false };
    let next = model.node(reader.node);
    let Some(bin) = next.op_as::<TypedBinOp>() else { return false };
    if !(if mul { bin.0.is::<Mul>() } else { bin.0.is::<Add>() }) || bin.1.is_some() || next.inputs.len() != 2 {
        return false;
    }
    let (Ok(x), Ok(out)) = (model.outlet_fact(OutletId::new(*last, 0)), model.outlet_fact(OutletId::new(next.id, 0)))
    else {
        return false;
    };
    let Some(xs) = x.shape.as_concrete() else { return false };
    let Some(other) = crate::column_constant(model, next, reader.slot, xs) else { return false };
    if out.shape != x.shape || out.datum_type != f32::datum_type() {
        return false;
    }
    *last = next.id;
    inputs.push(other);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(xs: &[f32], eps: f64) -> Vec<f64> {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        xs.iter().map(|&v| (v as f64 - mean) / (var + eps).sqrt()).collect()
    }

    #[test]
    fn rows_match_an_f64_layer_norm() {
        for len in [1usize, 3, 16, 17, 256, 261, 1280] {
            let data: Vec<f32> = (0..len * 5).map(|i| ((i * 7919) % 523) as f32 / 20.0 - 3.0).collect();
            let mut got = data.clone();
            rows(&mut got, len, 1e-5, (None, None));
            let mut generic = data.clone();
            rows_generic(&mut generic, len, 1e-5, (None, None));
            for (r, xs) in data.chunks(len).enumerate() {
                for (i, want) in reference(xs, 1e-5).into_iter().enumerate() {
                    for g in [got[r * len + i], generic[r * len + i]] {
                        assert!(
                            (g as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                            "len {len} [{r},{i}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// An input another node reads too is left as it is, and normalised into a new tensor with the
    /// same values as in place, at one and three threads.
    #[test]
    fn shared_input_is_copied_not_changed() {
        let (n, len) = (300usize, 261usize);
        let data: Vec<f32> = (0..n * len).map(|i| ((i * 37) % 101) as f32 / 10.0 - 4.0).collect();
        let op = LayerNormRows { eps_bits: 1e-5f32.to_bits(), scale: false, shift: false };
        let input = Tensor::from_shape(&[n, len], &data).unwrap().into_tvalue();
        let values = |t: &TValue| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let eval = |v: TValue| op.eval(&EvalContext::out_of_plan(), tvec!(v)).unwrap().remove(0);
        let in_place = values(&eval(Tensor::from_shape(&[n, len], &data).unwrap().into_tvalue()));
        let mut results = vec![values(&eval(input.clone()))];
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            results.push(multithread_tract_scope(Executor::multithread(3), || values(&eval(input.clone()))));
        }
        assert_eq!(values(&input), data, "the shared input changed");
        for got in results {
            assert_eq!(got, in_place);
        }
        assert_ne!(in_place, data);
    }

    /// tract-onnx's expansion of a LayerNorm whose mean is taken over axis `mean_axis` of an
    /// `[rows, len]` input (1 for a true LayerNorm).
    fn expansion(rows: usize, len: usize, mean_axis: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([rows, len])).unwrap();
        let y = wire_expansion(&mut model, x, mean_axis, "");
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    /// Wires that expansion over `x` (node names prefixed by `at`); returns its output.
    fn wire_expansion(model: &mut TypedModel, x: OutletId, mean_axis: usize, at: &str) -> OutletId {
        let shape = model.outlet_fact(x).unwrap().shape.as_concrete().unwrap().to_vec();
        let s = model.wire_node(format!("{at}sum"), Reduce::new(tvec![mean_axis], Reducer::Sum), &[x]).unwrap()[0];
        let n = shape[mean_axis] as f32;
        let r = model.add_const(format!("{at}recip"), Tensor::from_shape(&[1, 1], &[1.0 / n]).unwrap()).unwrap();
        let m = model.wire_node(format!("{at}mean"), TypedBinOp(Box::new(Mul), None), &[s, r]).unwrap()[0];
        let d = model.wire_node(format!("{at}d"), TypedBinOp(Box::new(Sub), None), &[x, m]).unwrap()[0];
        let eps = tensor0(1e-5f32).into_arc_tensor();
        model.wire_node(format!("{at}rms"), RmsNorm { axis: 1, eps }, &[d]).unwrap()[0]
    }

    /// Three trained LayerNorms in a row, each reading the one before: all three rewritten (each
    /// reads the op that replaced the one before; the graph failed to load before), against
    /// tract's expansion, at one and three threads.
    #[test]
    fn layer_norms_in_a_row() {
        let (rows_n, len) = (40usize, 96usize);
        let mut model = TypedModel::default();
        let mut y = model.add_source("x", f32::fact([rows_n, len])).unwrap();
        for i in 0..3 {
            y = wire_expansion(&mut model, y, 1, &format!("ln{i}."));
            let gamma: Vec<f32> = (0..len).map(|j| 1.0 + ((j * 13 + i) % 17) as f32 / 40.0).collect();
            let beta: Vec<f32> = (0..len).map(|j| ((j * 7 + i) % 11) as f32 / 30.0 - 0.2).collect();
            let g = model.add_const(format!("g{i}"), Tensor::from_shape(&[1, len], &gamma).unwrap()).unwrap();
            let b = model.add_const(format!("b{i}"), Tensor::from_shape(&[1, len], &beta).unwrap()).unwrap();
            y = model.wire_node(format!("scale{i}"), TypedBinOp(Box::new(Mul), None), &[y, g]).unwrap()[0];
            y = model.wire_node(format!("shift{i}"), TypedBinOp(Box::new(Add), None), &[y, b]).unwrap()[0];
        }
        model.select_output_outlets(&[y]).unwrap();
        let data: Vec<f32> = (0..rows_n * len).map(|i| ((i * 37) % 101) as f32 / 10.0 - 4.0).collect();
        let input = Tensor::from_shape(&[rows_n, len], &data).unwrap();
        let run = |m: &TypedModel| -> Vec<f32> {
            let out = m.clone().into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let plain = run(&model);
        let mut fused = model.clone();
        assert_eq!(rewrite(&mut fused).unwrap(), 3);
        assert_eq!(fused.nodes().iter().filter(|n| n.op_is::<LayerNormRows>()).count(), 3);
        crate::assert_like_tract(&plain, || run(&fused));
    }

    /// tract's own expansion of `LayerNormalization` (as tract-onnx wires it, decluttered),
    /// against the rewrite of it, at one and three threads.
    #[test]
    fn replaces_tracts_expansion() {
        let (rows_n, len) = (300usize, 261usize);
        let model = expansion(rows_n, len, 1);
        let data: Vec<f32> = (0..rows_n * len).map(|i| ((i * 37) % 101) as f32 / 10.0 - 4.0).collect();
        let input = Tensor::from_shape(&[rows_n, len], &data).unwrap();
        let run = |m: &TypedModel| {
            m.clone().into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap()[0].clone().into_tensor()
        };
        let plain = run(&model);
        let mut rewritten = model.clone();
        assert_eq!(rewrite(&mut rewritten).unwrap(), 1);
        assert!(rewritten.nodes().iter().any(|n| n.op_is::<LayerNormRows>()));
        let mut results = vec![run(&rewritten)];
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            results.push(multithread_tract_scope(Executor::multithread(3), || run(&rewritten)));
        }
        let p = plain.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for got in results {
            let g = got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap();
            for (i, (a, b)) in p.iter().zip(g).enumerate() {
                assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "[{i}]: {b} vs tract {a}");
            }
        }
        // A sum over another axis is not a LayerNorm of the last: left alone.
        let mut other = expansion(rows_n, len, 0);
        assert_eq!(rewrite(&mut other).unwrap(), 0);
    }

    /// A trained LayerNorm's scale and shift (tract's `Mul` and `Add` after the expansion) taken
    /// in: the same bits as the rewrite without them followed by tract's ops, at one and three
    /// threads; with both, the scale only and the shift only.
    #[test]
    fn takes_a_trained_scale_and_shift_in() {
        let (rows_n, len) = (300usize, 261usize);
        let data: Vec<f32> = (0..rows_n * len).map(|i| ((i * 37) % 101) as f32 / 10.0 - 4.0).collect();
        let input = Tensor::from_shape(&[rows_n, len], &data).unwrap();
        let gamma: Vec<f32> = (0..len).map(|i| 1.0 + ((i * 13) % 17) as f32 / 40.0).collect();
        let beta: Vec<f32> = (0..len).map(|i| ((i * 7) % 11) as f32 / 30.0 - 0.2).collect();
        // The expansion, rewritten first when `early`, then the scale and shift wired after it.
        let build = |scale: bool, shift: bool, early: bool| {
            let mut model = expansion(rows_n, len, 1);
            if early {
                rewrite(&mut model).unwrap();
            }
            let mut y = model.output_outlets().unwrap()[0];
            for (on, values, op) in [
                (scale, &gamma, Box::new(Mul) as Box<dyn tract_onnx::tract_core::ops::binary::BinMiniOp>),
                (shift, &beta, Box::new(Add)),
            ] {
                if on {
                    let c = model
                        .add_const(format!("c{}", values[0]), Tensor::from_shape(&[1, len], values).unwrap())
                        .unwrap();
                    y = model.wire_node(format!("op{}", values[0]), TypedBinOp(op, None), &[y, c]).unwrap()[0];
                }
            }
            model.select_output_outlets(&[y]).unwrap();
            model
        };
        let run = |m: &TypedModel| -> Vec<u32> {
            let out = m.clone().into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        for (scale, shift) in [(true, true), (true, false), (false, true)] {
            let plain = build(scale, shift, true);
            let mut fused = build(scale, shift, false);
            assert_eq!(rewrite(&mut fused).unwrap(), 1);
            let ln = fused.nodes().iter().find_map(|n| n.op_as::<LayerNormRows>()).unwrap();
            assert_eq!((ln.scale, ln.shift), (scale, shift));
            assert!(!fused.nodes().iter().any(|n| n.op_is::<TypedBinOp>()), "the scale and shift taken in");
            assert!(run(&fused) == run(&plain), "one thread, scale {scale} shift {shift}");
            #[cfg(feature = "threads")]
            {
                use tract_linalg::multithread::{multithread_tract_scope, Executor};
                let (a, b) = multithread_tract_scope(Executor::multithread(3), || (run(&fused), run(&plain)));
                assert!(a == b, "three threads, scale {scale} shift {shift}");
            }
        }
    }
}
