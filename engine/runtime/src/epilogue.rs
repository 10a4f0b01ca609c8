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
//! same additions and products, GELU by the arithmetic of tract's own `erf` kernel, see
//! [`Gelu`]), so outputs are bit-identical; the tests compare the graph with and without the pass.

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
    gelu: Option<&'static Gelu>,
}

/// How a GELU step runs on this CPU: the arithmetic of tract's `erf` kernel repeated in
/// registers where it is one of tract's x86_64 kernels, else that kernel through a buffer.
enum Gelu {
    /// tract's `x86_64_avx512_erf_f32_64n`, with the scaling and the rest of GELU around it.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// tract's `x86_64_fma_erf_f32_32n`, likewise.
    #[cfg(target_arch = "x86_64")]
    Fma,
    /// Any other kernel, run on [`GELU_CHUNK`] values at a time.
    Tract(Box<dyn ElementWise<f32>>),
}

/// Values GELU scales at a time where tract's kernel runs it (tract's `GeluExact` takes 1024;
/// `erf` is per value).
const GELU_CHUNK: usize = 1024;

/// A buffer of [`GELU_CHUNK`] values on a 64-byte boundary, so that tract's `erf` kernels read it
/// in place rather than through their own buffer.
#[repr(C, align(64))]
struct Chunk([f32; GELU_CHUNK]);

thread_local! {
    /// Each thread's [`Chunk`] for tract's `erf` kernel (made once, not zeroed for every row).
    static CHUNK: std::cell::RefCell<Chunk> = const { std::cell::RefCell::new(Chunk([0f32; GELU_CHUNK])) };
}

impl Gelu {
    /// The way to run GELU on this CPU, chosen at the first call.
    fn here() -> TractResult<&'static Gelu> {
        static HERE: std::sync::OnceLock<Gelu> = std::sync::OnceLock::new();
        if let Some(gelu) = HERE.get() {
            return Ok(gelu);
        }
        let gelu = Gelu::new()?;
        Ok(HERE.get_or_init(|| gelu))
    }

    /// The way to run tract's `erf` kernel for f32 on this CPU.
    fn new() -> TractResult<Gelu> {
        let erf = tract_linalg::routines::Func::Erf.ew_f32()?;
        Ok(match erf.name() {
            #[cfg(target_arch = "x86_64")]
            "x86_64_avx512_erf_f32_64n" if is_x86_feature_detected!("avx512f") => Gelu::Avx512,
            #[cfg(target_arch = "x86_64")]
            "x86_64_fma_erf_f32_32n" if is_x86_feature_detected!("avx") && is_x86_feature_detected!("fma") => Gelu::Fma,
            _ => Gelu::Tract(erf),
        })
    }

    /// `x / 2 (1 + erf(x / sqrt 2))` over `row` in place, bit for bit as tract's `GeluExact`
    /// computes it. Through tract's kernel that is three passes over chunks of the row; in
    /// registers one. Emerald Rapids, language-perceiver's `[256, 1280]` products with GELU
    /// against the same ones without (`bench --profile`, one thread): 0.52 ms more each with 256
    /// values a chunk, 0.13 in registers.
    fn run(&self, row: &mut [f32]) {
        let c = 2f32.sqrt().recip(); // tract's constant, computed as it does
        match self {
            // SAFETY: chosen only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Gelu::Avx512 => unsafe { gelu_avx512(row, c) },
            #[cfg(target_arch = "x86_64")]
            Gelu::Fma => unsafe { gelu_fma(row, c) },
            Gelu::Tract(erf) => {
                CHUNK.with_borrow_mut(|chunk| {
                    for part in row.chunks_mut(GELU_CHUNK) {
                        let s = &mut chunk.0[..part.len()];
                        s.iter_mut().zip(part.iter()).for_each(|(s, x)| *s = *x * c);
                        // The kernel fails only for a datum type it lacks; f32's is built in.
                        let _ = erf.run(s);
                        part.iter_mut().zip(s.iter()).for_each(|(x, e)| *x = (*x * 0.5) * (*e + 1.0));
                    }
                })
            }
        }
    }
}

/// tract's `erf` polynomial (Abramowitz and Stegun 7.1.26): its coefficients, as tract writes them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::excessive_precision)]
const ERF_A: [f32; 6] = [0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638];

/// GELU over `row` with the arithmetic of tract's `x86_64_avx512_erf_f32_64n` (Horner by FMA from
/// `a6`, then `* |x| + 1` as a product and a sum, four squares, `1 - 1 / y`, the sign put back),
/// 16 values at a time, the tail masked.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(row: &mut [f32], c: f32) {
    use std::arch::x86_64::*;
    let [a1, a2, a3, a4, a5, a6] = ERF_A.map(|a| _mm512_set1_ps(a));
    let (one, half, c) = (_mm512_set1_ps(1.0), _mm512_set1_ps(0.5), _mm512_set1_ps(c));
    let sign_bit = _mm512_set1_epi32(i32::MIN);
    let p = row.as_mut_ptr();
    let mut i = 0;
    while i < row.len() {
        let left = row.len() - i;
        let mask: __mmask16 = if left >= 16 { !0 } else { (1u16 << left) - 1 };
        let x = _mm512_maskz_loadu_ps(mask, p.add(i));
        let s = _mm512_castps_si512(_mm512_mul_ps(x, c));
        let sign = _mm512_and_si512(s, sign_bit);
        let abs = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, s));
        let mut y = a6;
        for a in [a5, a4, a3, a2, a1] {
            y = _mm512_fmadd_ps(y, abs, a);
        }
        let y = _mm512_add_ps(_mm512_mul_ps(y, abs), one);
        let y = _mm512_mul_ps(y, y);
        let y = _mm512_mul_ps(y, y);
        let y = _mm512_mul_ps(y, y);
        let y = _mm512_mul_ps(y, y);
        let e = _mm512_sub_ps(one, _mm512_div_ps(one, y));
        let e = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e), sign));
        let g = _mm512_mul_ps(_mm512_mul_ps(x, half), _mm512_add_ps(e, one));
        _mm512_mask_storeu_ps(p.add(i), mask, g);
        i += 16;
    }
}

/// GELU over `row` with the arithmetic of tract's `x86_64_fma_erf_f32_32n` (Horner by FMA from
/// `a6` down to `* |x| + 1`, four squares, `1 - 1 / y`, its magnitude with the sign put back),
/// 8 values at a time, the tail through a copy.
///
/// # Safety
/// The CPU has AVX and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn gelu_fma(row: &mut [f32], c: f32) {
    use std::arch::x86_64::*;
    let [a1, a2, a3, a4, a5, a6] = ERF_A.map(|a| _mm256_set1_ps(a));
    let (one, half, c) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5), _mm256_set1_ps(c));
    let abs_mask = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
    let sign_mask = _mm256_set1_ps(f32::from_bits(0x8000_0000));
    let eight = |x: __m256| {
        let s = _mm256_mul_ps(x, c);
        let (abs, sign) = (_mm256_and_ps(s, abs_mask), _mm256_and_ps(s, sign_mask));
        let mut y = a6;
        for a in [a5, a4, a3, a2, a1, one] {
            y = _mm256_fmadd_ps(y, abs, a);
        }
        let y = _mm256_mul_ps(y, y);
        let y = _mm256_mul_ps(y, y);
        let y = _mm256_mul_ps(y, y);
        let y = _mm256_mul_ps(y, y);
        let e = _mm256_sub_ps(one, _mm256_div_ps(one, y));
        let e = _mm256_or_ps(_mm256_and_ps(e, abs_mask), sign);
        _mm256_mul_ps(_mm256_mul_ps(x, half), _mm256_add_ps(e, one))
    };
    let mut parts = row.chunks_exact_mut(8);
    for part in &mut parts {
        _mm256_storeu_ps(part.as_mut_ptr(), eight(_mm256_loadu_ps(part.as_ptr())));
    }
    let tail = parts.into_remainder();
    if !tail.is_empty() {
        let mut v = [0f32; 8];
        v[..tail.len()].copy_from_slice(tail);
        _mm256_storeu_ps(v.as_mut_ptr(), eight(_mm256_loadu_ps(v.as_ptr())));
        tail.copy_from_slice(&v[..tail.len()]);
    }
}

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
        let gelu = if steps.contains(&Step::Gelu) { Some(Gelu::here()?) } else { None };
        Ok(Finish { steps, inputs, gelu })
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
                        let gelu = self.gelu.expect("GELU's kernel chosen for a GELU step");
                        gelu.run(row);
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

    /// Values GELU meets and its edges: a sweep of -30..30 (past where `erf` saturates), tiny
    /// and huge magnitudes, subnormals, signed zeros, infinities and NaN; an odd count, so every
    /// kernel's tail runs.
    fn gelu_inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (0..6001).map(|i| (i as f32 - 3000.0) / 100.0).collect();
        for e in -45..39 {
            let v = 1.7f32 * 10f32.powi(e);
            x.extend([v, -v]);
        }
        x.extend([0.0, -0.0, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1e-42, -1e-42, f32::MAX, f32::MIN]);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.1, 0.2, 0.3, 0.4]);
        x
    }

    /// GELU over `x` by tract's `erf` kernel `erf` as its `GeluExact` computes it, as bits.
    fn gelu_by_tract(x: &[f32], erf: &dyn ElementWise<f32>) -> Vec<u32> {
        let c = 2f32.sqrt().recip();
        let mut s: Vec<f32> = x.iter().map(|x| x * c).collect();
        erf.run(&mut s).unwrap();
        x.iter().zip(&s).map(|(x, e)| ((x * 0.5) * (e + 1.0)).to_bits()).collect()
    }

    /// Each way [`Gelu`] runs that this CPU has gives the bits of the tract kernel it repeats,
    /// over every length from 1 to 40 and the whole of [`gelu_inputs`] at several offsets; the
    /// way chosen gives the bits of tract's `GeluExact` op.
    #[test]
    fn gelu_matches_tract_bit_for_bit() {
        use tract_linalg::routines::{declared, Func, RoutineFactory};
        let x = gelu_inputs();
        let tract_kernel = |name: &str| {
            declared().filter(|r| r.func == Func::Erf).find_map(|r| match r.factory {
                RoutineFactory::F32(f) if f().name() == name => Some(f()),
                _ => None,
            })
        };
        let mut ways: Vec<(Gelu, Box<dyn ElementWise<f32>>)> = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                ways.push((Gelu::Avx512, tract_kernel("x86_64_avx512_erf_f32_64n").unwrap()));
            }
            if is_x86_feature_detected!("avx") && is_x86_feature_detected!("fma") {
                ways.push((Gelu::Fma, tract_kernel("x86_64_fma_erf_f32_32n").unwrap()));
            }
        }
        let best = Func::Erf.ew_f32().unwrap();
        ways.push((Gelu::Tract(Func::Erf.ew_f32().unwrap()), best));
        for (way, erf) in &ways {
            let want = gelu_by_tract(&x, erf.as_ref());
            for start in [0, 1, 5, 16] {
                let mut got = x[start..].to_vec();
                way.run(&mut got);
                let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert!(got == want[start..], "{}: other bits from offset {start}", erf.name());
            }
            for len in 1..=40 {
                let mut got = x[3000..3000 + len].to_vec();
                way.run(&mut got);
                assert!(got.iter().map(|v| v.to_bits()).eq(want[3000..3000 + len].iter().copied()), "{len} values");
            }
        }
        let mut model = TypedModel::default();
        let source = model.add_source("x", f32::fact([x.len()])).unwrap();
        let y = model.wire_node("gelu", gelu_exact(), &[source]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let by_op = run(&model, &Tensor::from_shape(&[x.len()], &x).unwrap()).remove(0);
        let mut got = x.clone();
        Gelu::here().unwrap().run(&mut got);
        assert!(got.iter().map(|v| v.to_bits()).eq(by_op), "the way chosen against GeluExact");
    }

    #[test]
    fn fused_steps_match_the_ops_bit_for_bit() {
        check(5, 16, 24);
        // Large enough to split over threads: by rows (m > n) and by columns (n > m).
        check(300, 96, 64);
        check(40, 64, 1200);
    }
}
