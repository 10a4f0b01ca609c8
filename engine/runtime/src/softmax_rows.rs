//! Softmax over one axis, rows or columns split over the threads: a rewrite of the optimised
//! plan.
//!
//! tract 0.23.9 runs a softmax as three kernel calls per row (max, exp-and-sum, scale), each
//! through its aligned-buffer wrapper, on one thread. An attention's rows are short (the bench
//! model's latent self-attention: 1024 rows of 128 per layer), so the calls' overhead dominated
//! and the softmaxes were 12-14 % of the bench model's run, none of it on the second thread.
//! [`SoftmaxRows`] computes each row in one pass over lanes the compiler vectorises (AVX-512,
//! AVX2 + FMA where the CPU has them, chosen at run time; the baseline elsewhere), with `exp`
//! from Cody-Waite range reduction and a degree-6 polynomial (relative error below 2e-7 over
//! the range a softmax feeds it, `x - max(x) <= 0`; on AVX2 + FMA and on AVX-512 written out with
//! intrinsics, [`exp_sum_avx2`] and [`exp_sum_avx512`]), and splits the rows over tract's thread
//! pool. A softmax over an axis that is not the last (scores computed keys x queries, which
//! tract and [`crate::gemm_matmul`] choose when it suits the product) runs in place too, over
//! blocks of up to 64 neighbouring columns, each a vector wide, instead of on a transposed copy
//! (the bench model's f16 graph, computed in f32: two `[4096, 128]` copies, 2.1 ms of 21). The
//! unit tests compare both with a softmax computed in f64.

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

/// ln 2 in two parts for the range reduction (Cody-Waite): `0.693359375 - 2.12194440e-4`.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = 2.121_944_4e-4;

/// `e^r` for `|r| <= ln 2 / 2` is `p(r) r^2 + r + 1` with `p` these coefficients, highest power
/// first (Cephes' `expf`).
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_66, 0.5];

/// `e^x` for `x <= 0` (a softmax's `x - max`): `2^n e^r` with `n = round(x / ln 2)`, `r` reduced
/// in two steps (Cody-Waite) and `e^r` a degree-6 polynomial (Cephes' `expf`); `x` below -87 gives
/// about 1e-38 rather than 0, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI + n * LN2_LO;
    let [c0, c1, c2, c3, c4, c5] = EXP_POLY;
    let p = c0;
    let p = p * r + c1;
    let p = p * r + c2;
    let p = p * r + c3;
    let p = p * r + c4;
    let p = p * r + c5;
    let e = p * r * r + r + 1.0;
    // n + 127 in the exponent field: the rounder's low bits hold n.
    let n_bits = t.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    let scale = f32::from_bits(((n_bits + 127) as u32) << 23);
    e * scale
}

/// The largest of `xs` and `start`, over lanes the compiler vectorises.
#[inline(always)]
pub(crate) fn row_max(xs: &[f32], start: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    // The lanes' largest by halves (no lane is NaN: a comparison with NaN keeps the lane), then
    // `start` and the tail in order.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            lanes[j] = if lanes[j + w] > lanes[j] { lanes[j + w] } else { lanes[j] };
        }
    }
    let mut max = if lanes[0] > start { lanes[0] } else { start };
    for &v in chunks.remainder() {
        max = if v > max { v } else { max };
    }
    max
}

/// Replaces each of `xs` by `e^(x - top)` (`top` at least each of them) and returns their sum.
#[inline(always)]
pub(crate) fn exp_sum(xs: &mut [f32], top: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_neg(c[i] - top);
            sums[i] += c[i];
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_neg(*v - top);
        sum += *v;
    }
    sum
}

/// The written-out `exp_sum`s, one body for both vector widths: `$w` names a module of the
/// width's intrinsics under common names ([`w256`], [`w512`]), `$lanes` its `f32` lanes. Four
/// vectors at a time, each step taken for all four (independent chains side by side: the
/// scheduler's window holds less than one vector's whole chain otherwise), the polynomial in
/// fused multiply-adds in Estrin's order, the constants in registers; a scalar tail.
#[cfg(target_arch = "x86_64")]
macro_rules! exp_sum_written_out {
    ($(#[$doc:meta])* $name:ident, $features:literal, $w:ident, $lanes:literal) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(xs: &mut [f32], top: f32) -> f32 {
            use $w::*;
            let (n, p) = (xs.len(), xs.as_mut_ptr());
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn exp<const V: usize>(x: [F; V], k: &Consts) -> [F; V] {
                let x = x.map(|x| max(k.lo, sub(x, k.top)));
                let t = x.map(|x| fmadd(x, k.log2e, k.rounder));
                let mut r = [zero(); V];
                for v in 0..V {
                    let n = sub(t[v], k.rounder);
                    r[v] = fmadd(n, k.ln2_lo, fnmadd(n, k.ln2_hi, x[v]));
                }
                // (c0 r + c1) r^4 + (c2 r + c3) r^2 + (c4 r + c5), then times r^2, plus r + 1.
                let r2 = r.map(|r| mul(r, r));
                let mut out = [zero(); V];
                for v in 0..V {
                    let a = fmadd(k.c[0], r[v], k.c[1]);
                    let b = fmadd(k.c[2], r[v], k.c[3]);
                    let c = fmadd(k.c[4], r[v], k.c[5]);
                    let q = fmadd(a, mul(r2[v], r2[v]), fmadd(b, r2[v], c));
                    let e = fmadd(q, r2[v], add(r[v], k.one));
                    // n + 127 in the exponent field: the rounder's low bits hold n.
                    let bits = add_i32(as_bits(t[v]), k.bias);
                    out[v] = mul(e, from_bits(shift_left::<23>(bits)));
                }
                out
            }
            struct Consts {
                top: F,
                lo: F,
                log2e: F,
                rounder: F,
                ln2_hi: F,
                ln2_lo: F,
                c: [F; 6],
                one: F,
                bias: I,
            }
            let k = Consts {
                top: splat(top),
                lo: splat(-87.0),
                log2e: splat(std::f32::consts::LOG2_E),
                rounder: splat(ROUNDER),
                ln2_hi: splat(LN2_HI),
                ln2_lo: splat(LN2_LO),
                c: EXP_POLY.map(|v| splat(v)),
                one: splat(1.0),
                bias: splat_i32(127 - ROUNDER.to_bits() as i32),
            };
            let mut acc = [zero(); 4];
            let mut i = 0;
            while i + 4 * $lanes <= n {
                let x = [0, 1, 2, 3].map(|j| load(p.add(i + $lanes * j)));
                let e = exp(x, &k);
                for j in 0..4 {
                    store(p.add(i + $lanes * j), e[j]);
                    acc[j] = add(acc[j], e[j]);
                }
                i += 4 * $lanes;
            }
            while i + $lanes <= n {
                let [e] = exp([load(p.add(i))], &k);
                store(p.add(i), e);
                acc[0] = add(acc[0], e);
                i += $lanes;
            }
            let v = add(add(acc[0], acc[1]), add(acc[2], acc[3]));
            let mut lanes = [0f32; $lanes];
            store(lanes.as_mut_ptr(), v);
            // Halves added pairwise: a row of 128 values ran a chain of 16 dependent additions.
            let mut w = $lanes;
            while w > 1 {
                w /= 2;
                for j in 0..w {
                    lanes[j] += lanes[j + w];
                }
            }
            let mut sum = lanes[0];
            for v in &mut xs[i..] {
                *v = exp_neg(*v - top);
                sum += *v;
            }
            sum
        }
    };
}

/// AVX2 + FMA intrinsics under the names [`exp_sum_written_out`] uses.
#[cfg(target_arch = "x86_64")]
mod w256 {
    pub(super) use std::arch::x86_64::{
        __m256 as F, __m256i as I, _mm256_add_epi32 as add_i32, _mm256_add_ps as add, _mm256_castps_si256 as as_bits,
        _mm256_castsi256_ps as from_bits, _mm256_fmadd_ps as fmadd, _mm256_fnmadd_ps as fnmadd,
        _mm256_loadu_ps as load, _mm256_max_ps as max, _mm256_mul_ps as mul, _mm256_set1_epi32 as splat_i32,
        _mm256_set1_ps as splat, _mm256_setzero_ps as zero, _mm256_slli_epi32 as shift_left, _mm256_storeu_ps as store,
        _mm256_sub_ps as sub,
    };
}

/// AVX-512F intrinsics under the names [`exp_sum_written_out`] uses.
#[cfg(target_arch = "x86_64")]
mod w512 {
    pub(super) use std::arch::x86_64::{
        __m512 as F, __m512i as I, _mm512_add_epi32 as add_i32, _mm512_add_ps as add, _mm512_castps_si512 as as_bits,
        _mm512_castsi512_ps as from_bits, _mm512_fmadd_ps as fmadd, _mm512_fnmadd_ps as fnmadd,
        _mm512_loadu_ps as load, _mm512_max_ps as max, _mm512_mul_ps as mul, _mm512_set1_epi32 as splat_i32,
        _mm512_set1_ps as splat, _mm512_setzero_ps as zero, _mm512_slli_epi32 as shift_left, _mm512_storeu_ps as store,
        _mm512_sub_ps as sub,
    };
}

#[cfg(target_arch = "x86_64")]
exp_sum_written_out!(
    /// [`exp_sum`] on AVX2 + FMA, eight values a vector ([`exp_sum_written_out`]). The compiler's
    /// vectorisation of [`exp_sum`] could not fuse (Rust does not contract `a * b + c`) and ran
    /// one long chain per vector: a `[512, 512]` softmax (one head of vision-perceiver's latent
    /// self-attention) took 0.24 ms on a 2-core AMD EPYC (Zen 3) where it takes 0.13 ms with this
    /// (a throwaway test), and vision-perceiver-conv's `Attention` ops 745 / 725 ms a run where
    /// they take 712 / 675 ms (`bench --profile 2`, builds alternated). Same range reduction and
    /// coefficients as [`exp_neg`]; the tests hold both to 2.5e-7 of f64.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    exp_sum_avx2,
    "avx2,fma",
    w256,
    8
);

#[cfg(target_arch = "x86_64")]
exp_sum_written_out!(
    /// [`exp_sum`] on AVX-512, sixteen values a vector ([`exp_sum_written_out`]). The compiler's
    /// vectorisation of [`exp_sum`] for AVX-512 has no fused multiply-adds either: on the bench
    /// model (a 2-core AMD EPYC, Zen 4, `bench --profile 300`, one thread, three rounds each way)
    /// its one softmax, `[128, 4096]`, took 0.25-0.27 ms with it and 0.18-0.19 with this, its
    /// `Attention` ops 1.82-1.91 ms and 1.66-1.79. The tests hold it to 2.5e-7 of f64.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    exp_sum_avx512,
    "avx512f",
    w512,
    16
);

/// Which `exp` [`exp_sum_on`] runs: [`exp_sum`] as the compiler vectorises it ([`PLAIN`]),
/// [`exp_sum_avx2`] ([`AVX2`]) or [`exp_sum_avx512`] ([`AVX512`]).
pub(crate) const PLAIN: u8 = 0;
/// See [`PLAIN`].
#[cfg(target_arch = "x86_64")]
pub(crate) const AVX2: u8 = 1;
/// See [`PLAIN`].
#[cfg(target_arch = "x86_64")]
pub(crate) const AVX512: u8 = 2;

/// [`exp_sum`], or the kernel `ISA` names (see [`PLAIN`]).
///
/// # Safety
/// The CPU has the features of the kernel `ISA` names (callers compiled for them and dispatched
/// on them).
#[inline(always)]
pub(crate) unsafe fn exp_sum_on<const ISA: u8>(xs: &mut [f32], top: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match ISA {
        // SAFETY: the caller's promise.
        AVX2 => return exp_sum_avx2(xs, top),
        AVX512 => return exp_sum_avx512(xs, top),
        _ => {}
    }
    exp_sum(xs, top)
}

/// Softmax of one row, in place.
///
/// # Safety
/// As [`exp_sum_on`].
#[inline(always)]
unsafe fn row<const ISA: u8>(xs: &mut [f32]) {
    let mut max = row_max(xs, f32::NEG_INFINITY);
    if max == f32::NEG_INFINITY {
        // Every value -inf (a fully masked row): equal weights (tract's kernel gives NaN).
        max = 0.0;
    }
    let inv = 1.0 / exp_sum_on::<ISA>(xs, max);
    for v in xs.iter_mut() {
        *v *= inv;
    }
}

/// Softmax of each row of `len` values of `data`, in place, with the widest vectors this CPU has.
pub(crate) fn softmax_in_place(data: &mut [f32], len: usize) {
    let rows = data.len() / len.max(1);
    // SAFETY: the rows lie within `data`.
    unsafe { pieces(data.as_mut_ptr(), len, 1, &[Piece::Rows { start: 0, rows }]) }
}

/// Columns per block of a softmax over a strided axis.
const BLOCK: usize = 64;

/// Softmax down each of the columns `cols` of a `[len, inner]` matrix whose rows start `inner`
/// values apart at `data`, in place; at most [`BLOCK`] columns.
///
/// # Safety
/// `data` holds the `len x inner` matrix and no one else touches these columns meanwhile.
#[inline(always)]
unsafe fn columns(data: *mut f32, len: usize, inner: usize, cols: std::ops::Range<usize>) {
    let w = cols.len();
    let at = |r: usize| std::slice::from_raw_parts_mut(data.add(r * inner + cols.start), w);
    let mut max = [f32::NEG_INFINITY; BLOCK];
    for r in 0..len {
        for (m, &v) in max[..w].iter_mut().zip(at(r).iter()) {
            *m = if v > *m { v } else { *m };
        }
    }
    for m in &mut max[..w] {
        if *m == f32::NEG_INFINITY {
            *m = 0.0;
        }
    }
    let mut sum = [0f32; BLOCK];
    for r in 0..len {
        for ((v, m), s) in at(r).iter_mut().zip(&max[..w]).zip(&mut sum[..w]) {
            *v = exp_neg(*v - m);
            *s += *v;
        }
    }
    for s in &mut sum[..w] {
        *s = 1.0 / *s;
    }
    for r in 0..len {
        for (v, s) in at(r).iter_mut().zip(&sum[..w]) {
            *v *= s;
        }
    }
}

/// One piece of a softmax's work: whole rows (`inner == 1`), or one block of columns.
#[derive(Clone, Copy)]
enum Piece {
    /// `rows` rows of `len` values from value `start`.
    Rows { start: usize, rows: usize },
    /// Columns `cols` of the `[len, inner]` matrix from value `start`.
    Columns { start: usize, cols: (usize, usize) },
}

/// Computes `pieces` of a softmax over `len` values `inner` apart in `data`.
///
/// # Safety
/// The pieces lie within `data` and touch disjoint values; as [`exp_sum_on`] for `ISA`.
#[inline(always)]
unsafe fn pieces_generic<const ISA: u8>(data: *mut f32, len: usize, inner: usize, pieces: &[Piece]) {
    for p in pieces {
        match *p {
            Piece::Rows { start, rows } => {
                for r in std::slice::from_raw_parts_mut(data.add(start), rows * len).chunks_exact_mut(len) {
                    row::<ISA>(r);
                }
            }
            Piece::Columns { start, cols } => columns(data.add(start), len, inner, cols.0..cols.1),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pieces_avx512(data: *mut f32, len: usize, inner: usize, pieces: &[Piece]) {
    pieces_generic::<AVX512>(data, len, inner, pieces)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pieces_avx2(data: *mut f32, len: usize, inner: usize, pieces: &[Piece]) {
    pieces_generic::<AVX2>(data, len, inner, pieces)
}

/// Computes `pieces` with the widest vectors this CPU has.
///
/// # Safety
/// As [`pieces_generic`].
unsafe fn pieces(data: *mut f32, len: usize, inner: usize, pieces: &[Piece]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return pieces_avx512(data, len, inner, pieces);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return pieces_avx2(data, len, inner, pieces);
        }
    }
    pieces_generic::<PLAIN>(data, len, inner, pieces)
}

/// The softmax over `len` values `inner` apart of every one of `data`'s `[len, inner]` blocks, in
/// `parts` pieces of about equal work.
fn split(data_len: usize, len: usize, inner: usize, parts: usize) -> Vec<Vec<Piece>> {
    let mut all = vec![];
    if inner == 1 {
        let rows = data_len / len;
        let per = rows.div_ceil(parts.max(1)).max(1);
        for first in (0..rows).step_by(per) {
            all.push(vec![Piece::Rows { start: first * len, rows: per.min(rows - first) }]);
        }
        return all;
    }
    let mut columns = vec![];
    for start in (0..data_len).step_by(len * inner) {
        for c in (0..inner).step_by(BLOCK) {
            columns.push(Piece::Columns { start, cols: (c, (c + BLOCK).min(inner)) });
        }
    }
    let per = columns.len().div_ceil(parts.max(1)).max(1);
    columns.chunks(per).map(|c| c.to_vec()).collect()
}

/// Below this many values a softmax stays on one thread.
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 16 << 10;

/// Softmax over one axis of an f32 tensor.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct SoftmaxRows {
    /// The axis.
    axis: usize,
}

impl SoftmaxRows {
    /// The softmax over `len` values `inner` apart in every block of `data`.
    fn run(data: &mut [f32], len: usize, inner: usize) {
        let ptr = data.as_mut_ptr() as usize;
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            if let Some(pool) = crate::thread_pool() {
                if data.len() >= PARALLEL_MIN {
                    let parts = split(data.len(), len, inner, pool.current_num_threads());
                    // SAFETY: the pieces cover disjoint values of `data`.
                    pool.install(|| parts.par_iter().for_each(|p| unsafe { pieces(ptr as *mut f32, len, inner, p) }));
                    return;
                }
            }
        }
        for p in split(data.len(), len, inner, 1) {
            // SAFETY: as above.
            unsafe { pieces(ptr as *mut f32, len, inner, &p) };
        }
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
        let len = *t.shape().get(self.axis).context("SoftmaxRows: axis out of range")?;
        let inner: usize = t.shape()[self.axis + 1..].iter().product();
        if len * inner > 0 {
            Self::run(t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, len, inner);
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

/// Replaces every f32 softmax of `model` over one axis with [`SoftmaxRows`]; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, usize)> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let op = n.op_as::<Softmax>()?;
            let fact = model.outlet_fact(n.inputs[0]).ok()?;
            let &[axis] = op.axes.as_slice() else { return None };
            (fact.datum_type == f32::datum_type()
                && fact.is_plain()
                && op.kind == SoftmaxKind::Softmax
                && op.quant_output_dt.is_none()
                && axis < fact.rank())
            .then_some((n.id, axis))
        })
        .collect();
    for &(id, axis) in &found {
        model.node_mut(id).op = Box::new(SoftmaxRows { axis });
    }
    Ok(found.len())
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

    /// The written-out `exp`s (AVX2 + FMA, AVX-512) against f64 over the range a softmax feeds
    /// them, at every length (the vector loop, the single vectors, the scalar tail), and on -inf
    /// and NaN; each where the CPU has it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn written_out_exp_sums_are_within_two_ulps_of_f64() {
        type ExpSum = unsafe fn(&mut [f32], f32) -> f32;
        let mut kernels: Vec<(&str, ExpSum)> = vec![];
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            kernels.push(("AVX2", exp_sum_avx2));
        }
        if is_x86_feature_detected!("avx512f") {
            kernels.push(("AVX-512", exp_sum_avx512));
        }
        eprintln!("exp kernels on this CPU: {:?}", kernels.iter().map(|k| k.0).collect::<Vec<_>>());
        for (name, exp_sum_k) in kernels {
            let xs: Vec<f32> = (0..120_000).map(|i| -87.0 + i as f32 * 0.000_731).filter(|&x| x <= 0.0).collect();
            for top in [0.0f32, 2.5] {
                let mut got: Vec<f32> = xs.iter().map(|x| x + top).collect();
                let sum = unsafe { exp_sum_k(&mut got, top) };
                let mut want_sum = 0.0f64;
                for (x, g) in xs.iter().zip(&got) {
                    let want = (*x as f64).exp();
                    want_sum += want;
                    assert!(((*g as f64 - want) / want).abs() < 2.5e-7, "{name}: exp({x}) = {g}, want {want}");
                }
                assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-5, "{name}: sum {sum} vs {want_sum}");
            }
            for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 80, 100] {
                let data: Vec<f32> = (0..len).map(|i| ((i * 7919) % 523) as f32 / -20.0).collect();
                let (mut a, mut b) = (data.clone(), data.clone());
                let (sa, sb) = (unsafe { exp_sum_k(&mut a, 0.0) }, exp_sum(&mut b, 0.0));
                assert!((sa - sb).abs() <= 1e-6 * sb.max(1.0), "{name} len {len}: {sa} vs {sb}");
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 4e-7 * y, "{name} len {len}: {x} vs {y}");
                }
            }
            let mut v = [0.0f32; 16];
            v[1..4].copy_from_slice(&[f32::NEG_INFINITY, f32::NAN, -1.0]);
            let sum = unsafe { exp_sum_k(&mut v, 0.0) };
            assert_eq!(v[0], 1.0, "{name}");
            assert!(v[1] < 1e-37 && v[2].is_nan() && sum.is_nan(), "{name}: {v:?}");
        }
    }

    /// Softmax over `len` values `inner` apart, for every block of `data`, as [`SoftmaxRows`]
    /// computes it with the widest vectors (`wide`) or the baseline.
    fn softmax(data: &[f32], len: usize, inner: usize, wide: bool) -> Vec<f32> {
        let mut v = data.to_vec();
        for p in split(v.len(), len, inner, 3) {
            let ptr = v.as_mut_ptr();
            unsafe {
                if wide {
                    pieces(ptr, len, inner, &p)
                } else {
                    pieces_generic::<PLAIN>(ptr, len, inner, &p)
                }
            }
        }
        v
    }

    fn rows(data: &mut [f32], len: usize) {
        let got = softmax(data, len, 1, true);
        data.copy_from_slice(&got);
    }

    #[test]
    fn strided_axes_match_an_f64_softmax() {
        for (outer, len, inner) in [(1usize, 4096usize, 128usize), (2, 7, 70), (3, 33, 1), (1, 1, 5), (2, 100, 130)] {
            let n = outer * len * inner;
            let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 523) as f32 / 20.0 - 13.0).collect();
            for wide in [true, false] {
                let got = softmax(&data, len, inner, wide);
                for o in 0..outer {
                    for c in 0..inner {
                        let at = |r: usize| o * len * inner + r * inner + c;
                        let xs: Vec<f32> = (0..len).map(|r| data[at(r)]).collect();
                        for (r, want) in reference(&xs).into_iter().enumerate() {
                            let g = got[at(r)] as f64;
                            assert!(
                                (g - want).abs() < 1e-7 + 1e-6 * want,
                                "[{o},{r},{c}] of {len}x{inner}: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        // A fully masked column: equal weights.
        let got = softmax(&[f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 1.0], 2, 2, true);
        assert!((got[0] - 0.5).abs() < 1e-7 && (got[2] - 0.5).abs() < 1e-7);
    }

    /// `row_max` gives the largest value wherever it sits (in any lane, in the tail), or `start`
    /// where that is larger. A softmax does not show a wrong maximum unless `exp` overflows.
    #[test]
    fn row_max_finds_the_largest_anywhere() {
        for len in 1..=70 {
            for at in 0..len {
                let mut xs: Vec<f32> = (0..len).map(|i| -((i * 7 % 13) as f32)).collect();
                xs[at] = 5.0;
                assert_eq!(row_max(&xs, f32::NEG_INFINITY), 5.0, "{len} values, the largest at {at}");
                assert_eq!(row_max(&xs, 6.0), 6.0, "{len} values, a larger start");
            }
        }
    }

    #[test]
    fn rows_match_an_f64_softmax() {
        for len in [1usize, 3, 16, 17, 128, 261, 4096] {
            let data: Vec<f32> = (0..len * 5).map(|i| ((i * 7919) % 523) as f32 / 20.0 - 13.0).collect();
            let got = softmax(&data, len, 1, true);
            let generic = softmax(&data, len, 1, false);
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
