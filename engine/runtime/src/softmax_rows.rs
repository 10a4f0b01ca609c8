//! Softmax over the last axis, row by row, rows split over the threads: a rewrite of the
//! optimised plan.
//!
//! tract 0.23.9 runs a softmax as three kernel calls per row (max, exp-and-sum, scale), each
//! through its aligned-buffer wrapper, on one thread. An attention's rows are short (the bench
//! model's latent self-attention: 1024 rows of 128 per layer), so the calls' overhead dominated
//! and the softmaxes were 12-14 % of the bench model's run, none of it on the second thread.
//! [`SoftmaxRows`] computes each row in one pass over lanes the compiler vectorises (AVX-512,
//! AVX2 + FMA where the CPU has them, chosen at run time; the baseline elsewhere), with `exp`
//! from Cody-Waite range reduction and a degree-6 polynomial (relative error below 2e-7 over
//! the range a softmax feeds it, `x - max(x) <= 0`), and splits the rows over tract's thread
//! pool. The unit tests compare it with a softmax computed in f64.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Values per lane group: the widest vector (AVX-512) holds 16 f32.
const LANES: usize = 16;

/// 1.5 x 2^23: adding it rounds an f32 below 2^22 in magnitude to an integer, which then sits in
/// the low bits of the sum.
const ROUNDER: f32 = 12_582_912.0;

/// `e^x` for `x <= 0` (a softmax's `x - max`): `2^n e^r` with `n = round(x / ln 2)`, `r` reduced
/// in two steps (Cody-Waite) and `e^r` a degree-6 polynomial (Cephes' `expf`); `x` below -87 gives
/// about 1e-38 rather than 0, NaN stays NaN.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n + 127 in the exponent field: the rounder's low bits hold n.
    let n_bits = t.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let scale = f32::from_bits(((n_bits + 127) as u32) << 23);
    e * scale
}

/// Softmax of one row, in place.
#[inline(always)]
fn row(xs: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    if max == f32::NEG_INFINITY {
        // Every value -inf (a fully masked row): equal weights (tract's kernel gives NaN).
        max = 0.0;
    }
    let mut sums = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_neg(c[i] - max);
            sums[i] += c[i];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_neg(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in xs.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn rows_generic(data: &mut [f32], len: usize) {
    for r in data.chunks_exact_mut(len) {
        row(r);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(data: &mut [f32], len: usize) {
    rows_generic(data, len)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(data: &mut [f32], len: usize) {
    rows_generic(data, len)
}

/// Softmax of every row of `len` values of `data`, with the widest vectors this CPU has.
fn rows(data: &mut [f32], len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { rows_avx512(data, len) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { rows_avx2(data, len) };
        }
    }
    rows_generic(data, len)
}

/// Below this many values a softmax stays on one thread.
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 16 << 10;

/// Softmax over the last axis of an f32 tensor.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct SoftmaxRows;

impl SoftmaxRows {
    fn run(data: &mut [f32], len: usize) {
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            if let Some(pool) = crate::thread_pool() {
                if data.len() >= PARALLEL_MIN {
                    let per = data.len() / len / pool.current_num_threads() + 1;
                    pool.install(|| data.par_chunks_mut(per * len).for_each(|part| rows(part, len)));
                    return;
                }
            }
        }
        rows(data, len)
    }
}

impl Op for SoftmaxRows {
    fn name(&self) -> StaticName {
        "SoftmaxRows".into()
    }

    op_as_typed_op!();
}

impl EvalOp for SoftmaxRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // In place unless another node reads the input too.
        let mut t = inputs.remove(0).into_tensor();
        let len = *t.shape().last().context("SoftmaxRows: a scalar")?;
        if len > 0 {
            Self::run(t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, len);
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for SoftmaxRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replaces every f32 softmax of `model` over its last axis with [`SoftmaxRows`]; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| {
            let Some(op) = n.op_as::<Softmax>() else { return false };
            let Ok(fact) = model.outlet_fact(n.inputs[0]) else { return false };
            fact.datum_type == f32::datum_type()
                && fact.is_plain()
                && op.kind == SoftmaxKind::Softmax
                && op.quant_output_dt.is_none()
                && op.axes.as_slice() == [fact.rank().wrapping_sub(1)]
        })
        .map(|n| n.id)
        .collect();
    for &id in &ids {
        model.node_mut(id).op = Box::new(SoftmaxRows);
    }
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(xs: &[f32]) -> Vec<f64> {
        let max = xs.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = xs.iter().map(|&v| (v as f64 - max).exp()).sum();
        xs.iter().map(|&v| (v as f64 - max).exp() / sum).collect()
    }

    #[test]
    fn exp_is_within_two_ulps_of_f64() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_neg(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 2.5e-7, "exp({x}) = {got}, want {want}");
            x += 0.000_731;
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_neg(f32::NAN).is_nan());
    }

    #[test]
    fn rows_match_an_f64_softmax() {
        for len in [1usize, 3, 16, 17, 128, 261, 4096] {
            let data: Vec<f32> = (0..len * 5).map(|i| ((i * 7919) % 523) as f32 / 20.0 - 13.0).collect();
            let mut got = data.clone();
            rows(&mut got, len);
            let mut generic = data.clone();
            rows_generic(&mut generic, len);
            for (r, xs) in data.chunks(len).enumerate() {
                for (i, want) in reference(xs).into_iter().enumerate() {
                    for g in [got[r * len + i], generic[r * len + i]] {
                        assert!((g as f64 - want).abs() < 1e-7 + 1e-6 * want, "len {len} [{r},{i}]: {g} vs {want}");
                    }
                }
            }
        }
        // A row of equal values, and one with -inf entries (masked).
        let mut v = vec![2.5f32; 40];
        rows(&mut v, 40);
        assert!(v.iter().all(|&p| (p - 0.025).abs() < 1e-8));
        let mut v = vec![0.0, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        rows(&mut v, 4);
        assert!(v[1] < 1e-30 && v[3] < 1e-30 && (v[0] + v[2] - 1.0).abs() < 1e-6);
    }
}
