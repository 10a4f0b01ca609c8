//! Dynamic u8 quantisation of activations (ONNX `DynamicQuantizeLinear`, which int8 exports put
//! in front of every `MatMulInteger`): a rewrite of the optimised plan.
//!
//! tract-onnx 0.23.9's op finds the range by folding over an ndarray view and rounds each value
//! through a library call (`round_ties_even` without SSE4.1): 31.9 % of language-perceiver
//! int8's run. [`DynamicQuantizeU8`] computes the same thing in plain slices the compiler
//! vectorises: the range `[min(0, x), max(0, x)]`, `scale = (max - min) / 255`, the zero point
//! `round(-min / scale)` clamped to `[0, 255]`, then `clamp(round(x / scale) + zero point)`, each
//! rounding half to even. The rounding adds and subtracts 1.5 x 2^23, which rounds half to even
//! exactly for `|v| < 2^22` (here `|x / scale| <= 255`, or NaN / infinite, which both forms map
//! the same way). Same divisions, same roundings: outputs bit-identical to tract's op
//! (`engine/export/tests/dynamic_quantize.rs`, and unit tests below). Session 14: both loops are
//! compiled for AVX-512 and AVX2 too and chosen at run time, and the quantising loop bounds each
//! value before converting it so that it vectorises at all (it took 109 ms of language-perceiver
//! int8's 741 ms run).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// The name tract-onnx gives its op (its type is private to tract-onnx).
const TRACT_OP: &str = "DynamicQuantizeLinearU8";

/// `DynamicQuantizeLinear` to u8: outputs the quantised tensor, its scale and its zero point.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct DynamicQuantizeU8;

/// 1.5 x 2^23: adding then subtracting it rounds an f32 below 2^22 in magnitude half to even.
const ROUNDER: f32 = 12_582_912.0;

fn round_half_even(v: f32) -> f32 {
    (v + ROUNDER) - ROUNDER
}

/// `(min(0, xs), max(0, xs))`, ignoring NaN, as tract-onnx's fold does.
#[inline(always)]
fn range_generic(xs: &[f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    let (mut min, mut max) = (0f32, 0f32);
    for &v in lo.iter().chain(rest) {
        min = if v < min { v } else { min };
    }
    for &v in hi.iter().chain(rest) {
        max = if v > max { v } else { max };
    }
    (min, max)
}

/// Scale and zero point of `xs`, as ONNX defines them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512(xs: &[f32]) -> (f32, f32) {
    range_generic(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn range_avx2(xs: &[f32]) -> (f32, f32) {
    range_generic(xs)
}

/// The range of `xs` (and 0) with the widest vectors this CPU has.
fn range(xs: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { range_avx512(xs) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { range_avx2(xs) };
        }
    }
    range_generic(xs)
}

/// From this many values the range and the quantisation are split over the threads (as the
/// LayerNorm or product before them is: each thread's rows stay in its core's cache).
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 16 << 10;

/// Values per thread when `xs` is split over tract's thread pool, if it is.
#[cfg(feature = "threads")]
fn split(len: usize) -> Option<(std::sync::Arc<rayon::ThreadPool>, usize)> {
    let pool = crate::thread_pool().filter(|_| len >= PARALLEL_MIN)?;
    let per = len.div_ceil(pool.current_num_threads()).div_ceil(16) * 16;
    Some((pool, per))
}

/// [`range`], split over the threads from [`PARALLEL_MIN`] values: the smallest of the parts'
/// minima and the largest of their maxima, which is the whole's.
fn range_split(xs: &[f32]) -> (f32, f32) {
    #[cfg(feature = "threads")]
    if let Some((pool, per)) = split(xs.len()) {
        use rayon::prelude::*;
        let join =
            |a: (f32, f32), b: (f32, f32)| (if b.0 < a.0 { b.0 } else { a.0 }, if b.1 > a.1 { b.1 } else { a.1 });
        return pool.install(|| xs.par_chunks(per).map(range).reduce(|| (0.0, 0.0), join));
    }
    range(xs)
}

/// [`quantize`], split over the threads from [`PARALLEL_MIN`] values.
fn quantize_split(scale: f32, zero_point: u8, xs: &[f32], ys: &mut [u8]) {
    #[cfg(feature = "threads")]
    if let Some((pool, per)) = split(xs.len()) {
        use rayon::prelude::*;
        pool.install(|| {
            xs.par_chunks(per).zip(ys.par_chunks_mut(per)).for_each(|(x, y)| quantize(scale, zero_point, x, y))
        });
        return;
    }
    quantize(scale, zero_point, xs, ys)
}

fn scale_and_zero_point(xs: &[f32]) -> (f32, u8) {
    let (min, max) = range_split(xs);
    let scale = (max - min) / 255.0;
    let zero_point = (-min / scale).round_ties_even().clamp(0.0, 255.0);
    (scale, zero_point as u8)
}

/// Quantises `xs` into `ys`.
/// `clamp(round(x / scale) + zero point, 0, 255)` for each value, in lanes of 16.
///
/// `x / scale` lies within +-255 for every value the range was taken from, NaN aside (a NaN input,
/// or 0 / 0 when all values are 0), which a saturating `as i32` maps to 0: so does this, and
/// bounding the value first lets the conversion skip saturation, which is what lets the loop
/// vectorise (327680 values: 1.08 -> 0.16 ms with AVX-512, a scratch program).
#[inline(always)]
fn quantize_generic(scale: f32, zero_point: u8, xs: &[f32], ys: &mut [u8]) {
    let zp = zero_point as i32;
    let one = |x: f32| -> u8 {
        let v = round_half_even(x / scale);
        let v = if v.is_nan() { 0.0 } else { v.clamp(-512.0, 512.0) };
        // SAFETY: `v` is finite and within i32's range.
        (unsafe { v.to_int_unchecked::<i32>() } + zp).clamp(0, 255) as u8
    };
    let (mut xc, mut yc) = (xs.chunks_exact(16), ys.chunks_exact_mut(16));
    for (x, y) in (&mut xc).zip(&mut yc) {
        for i in 0..16 {
            y[i] = one(x[i]);
        }
    }
    for (x, y) in xc.remainder().iter().zip(yc.into_remainder()) {
        *y = one(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(scale: f32, zero_point: u8, xs: &[f32], ys: &mut [u8]) {
    quantize_generic(scale, zero_point, xs, ys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(scale: f32, zero_point: u8, xs: &[f32], ys: &mut [u8]) {
    quantize_generic(scale, zero_point, xs, ys)
}

/// Quantises `xs` into `ys` with the widest vectors this CPU has (the same arithmetic on each).
fn quantize(scale: f32, zero_point: u8, xs: &[f32], ys: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { quantize_avx512(scale, zero_point, xs, ys) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { quantize_avx2(scale, zero_point, xs, ys) };
        }
    }
    quantize_generic(scale, zero_point, xs, ys)
}

impl Op for DynamicQuantizeU8 {
    fn name(&self) -> StaticName {
        "DynamicQuantizeU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DynamicQuantizeU8 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs[0].cast_to::<f32>()?;
        let xs = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let (scale, zero_point) = scale_and_zero_point(xs);
        let mut dst = unsafe { Tensor::uninitialized_dt(u8::datum_type(), input.shape())? };
        quantize_split(scale, zero_point, xs, dst.try_as_plain_ram_mut()?.as_slice_mut::<u8>()?);
        Ok(tvec!(dst.into_tvalue(), tensor0(scale).into_tvalue(), tensor0(zero_point).into_tvalue()))
    }
}

impl TypedOp for DynamicQuantizeU8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        // The input's shape only: a value the input fact carries is f32, not the output's.
        Ok(tvec!(u8::fact(inputs[0].shape.clone()), f32::fact([0usize; 0]), u8::fact([0usize; 0])))
    }

    as_op!();
}

/// Replaces every tract-onnx `DynamicQuantizeLinearU8` of `model` with [`DynamicQuantizeU8`];
/// returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> = model.nodes().iter().filter(|n| n.op().name() == TRACT_OP).map(|n| n.id).collect();
    for &id in &ids {
        let node = model.node_mut(id);
        node.op = Box::new(DynamicQuantizeU8);
    }
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tract-onnx 0.23.9's arithmetic, as written there (`max` then `min`: unlike `clamp`, a NaN
    /// zero point becomes 0).
    #[allow(clippy::manual_clamp)]
    fn reference(xs: &[f32]) -> (Vec<u8>, f32, u8) {
        let (min, max) = xs.iter().fold((0f32, 0f32), |(lo, hi), &v| {
            if v < lo {
                (v, hi)
            } else if v > hi {
                (lo, v)
            } else {
                (lo, hi)
            }
        });
        let scale = (max - min) / 255.0;
        let zp = (-min / scale).round_ties_even().max(0.0).min(255.0) as u8;
        let q = xs.iter().map(|x| (((x / scale).round_ties_even() as i32) + zp as i32).clamp(0, 255) as u8).collect();
        (q, scale, zp)
    }

    fn check(xs: &[f32]) {
        let (scale, zp) = scale_and_zero_point(xs);
        let mut ys = vec![0u8; xs.len()];
        quantize(scale, zp, xs, &mut ys);
        let (q, s, z) = reference(xs);
        assert_eq!((scale.to_bits(), zp), (s.to_bits(), z), "scale / zero point of {xs:?}");
        assert_eq!(ys, q);
        // The baseline path too (the vectorised ones above where the CPU has them).
        assert_eq!(range_generic(xs).0.to_bits(), range(xs).0.to_bits());
        let mut plain = vec![0u8; xs.len()];
        quantize_generic(scale, zp, xs, &mut plain);
        assert_eq!(plain, q);
    }

    #[test]
    fn matches_tract_onnx_bit_for_bit() {
        // Ties at every half step, both signs, one-sided ranges, zeros, non-finite values.
        let ties: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.5).collect();
        check(&ties);
        check(&ties[600..]);
        check(&ties[..601]);
        check(&[0.0; 37]);
        check(&[-0.0, 0.0, 1.0]);
        check(&[1.0, f32::NAN, -2.0, 3.5]);
        check(&[1.0, f32::INFINITY, -2.0]);
        let mut seed = 1u64;
        let random: Vec<f32> = (0..100_003)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.3) * 7.0
            })
            .collect();
        check(&random);
        // Split over three threads: the minimum in the last part, the maximum in the first.
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            let mut big: Vec<f32> = (0..PARALLEL_MIN + 1001).map(|i| random[i % random.len()]).collect();
            let n = big.len();
            (big[n - 5], big[7]) = (-31.25, 40.5);
            let (scale, zp) = multithread_tract_scope(Executor::multithread(3), || scale_and_zero_point(&big));
            let mut ys = vec![0u8; n];
            multithread_tract_scope(Executor::multithread(3), || quantize_split(scale, zp, &big, &mut ys));
            let (q, s, z) = reference(&big);
            assert_eq!((scale.to_bits(), zp), (s.to_bits(), z), "split range");
            assert_eq!(ys, q, "split quantisation");
        }
    }
}
