//! 4-bit weight products on the `gemm` crate: a rewrite of the decluttered graph, before tract's
//! code generation.
//!
//! A q4 export's Linear weights are ONNX `MatMulNBits` (block 32), which tract-onnx loads as a
//! Q4_0 block-quantised constant (`[n, k]`, 18 bytes per 32 weights: an f16 scale and 16 bytes of
//! nibbles) read by an f32 `EinSum`. tract 0.23.9 decodes it panel by panel into its AVX2 kernel
//! `fma_mmm_f32_32x3`: on a 2-core Xeon with AVX-512, the bench model's `[4096, 288] x [288, 261]`
//! products ran at 61 GFLOP/s, and the q4 graph took 1.4x onnxruntime's time on the same file.
//! [`GemmQ4`] decodes a block of the weight's rows (at most 1 MiB of f32, so it stays in the
//! core's cache) into a per-thread buffer and multiplies the activations by it with the `gemm`
//! crate, block after block; with several threads each thread takes its own blocks. Where
//! [`crate::f32_packed`]'s kernels run (x86 with AVX2, FMA and F16C), each block of 256 values of
//! `k` is decoded straight into their panels (16 weight rows at a time, their bytes transposed in
//! registers) and multiplied on them (a 2-core AMD EPYC with AVX2, one thread: lone `[512, 1024] x
//! [1024, 1024]` 81 -> 93 GFLOP/s; vision-perceiver-fourier q4 5.25 -> 4.74 s a run, where
//! onnxruntime took 4.78 s on the same file; on Zen 4's AVX-512 tiles language-perceiver q4
//! 1.42-1.56 -> 1.33-1.40 s).
//! The weight stays 4-bit in memory; the decoded values are the ones tract's kernel uses
//! (`(nibble - 8) * scale`, the scale an f16), so results differ from tract's by the order of the
//! sums only. Products with fewer than [`MIN_ROWS`] activation rows (a classification decoder's
//! single query) stay with tract, whose matrix-vector kernel reads the 4-bit weight directly.

use crate::epilogue::{Finish, Finishes, Rows, Step};
#[cfg(target_arch = "x86_64")]
use crate::f32_packed::{Packed, KC};
use crate::gemm_matmul::{matmul, Strides};
use std::cell::RefCell;
use std::sync::Arc;
use tract_linalg::block_quant::{BlockQuant, BlockQuantStorage, Q4_0};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Weights per Q4_0 block, and bytes per block (an f16 scale, then 16 bytes of two nibbles each).
const QK: usize = 32;
const BLOCK_BYTES: usize = 18;

/// Fewer activation rows than this and the product stays with tract.
const MIN_ROWS: usize = 8;

/// Weight rows decoded together before they are written out transposed.
const TILE: usize = 16;

/// Decoded f32 values per block of weight rows, at most (1 MiB).
const SCRATCH: usize = 256 << 10;

/// Which kernel multiplies the decoded weights.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Kernel {
    /// The `gemm` crate's (row-major decoded blocks).
    Crate,
    /// [`crate::f32_packed`]'s, where it runs (AVX2, FMA and F16C): the blocks decoded straight
    /// into its panels.
    Packed,
}

/// `C[.., n] = A[.., k] W[n, k]^T` with `W` Q4_0 block-quantised, `A` and `C` contiguous.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GemmQ4 {
    /// The weight: a tensor with Q4_0 block-quantised storage of `n` rows of `k`.
    weight: Arc<Tensor>,
    m: usize,
    /// Weights per row of the weight.
    k: usize,
    /// Values per row of the activations: `k`, or fewer where the export zero-padded the
    /// activations to a whole number of blocks (the padding is not read, nor the weights it
    /// meets).
    ka: usize,
    n: usize,
    shape: Vec<usize>,
    /// What is applied to each block of the output once computed (bias, residual, GELU),
    /// reading the inputs past the activations; see [`crate::epilogue`].
    epilogue: Vec<Step>,
    /// The kernel the decoded weights are multiplied on (chosen for this CPU at rewrite).
    kernel: Kernel,
}

/// Decodes Q4_0 `blocks` (whole rows of the weight) into `out`, 32 values per block.
#[inline(always)]
fn decode_generic(blocks: &[u8], out: &mut [f32]) {
    for (q, o) in blocks.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_bits(u16::from_le_bytes([q[0], q[1]])).to_f32();
        let (lo, hi) = o.split_at_mut(QK / 2);
        for ((&b, l), h) in q[2..].iter().zip(lo).zip(hi) {
            *l = ((b & 15) as i32 - 8) as f32 * d;
            *h = ((b >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn decode_avx512(blocks: &[u8], out: &mut [f32]) {
    decode_generic(blocks, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_avx2(blocks: &[u8], out: &mut [f32]) {
    decode_generic(blocks, out)
}

/// Decodes Q4_0 `blocks` into `out` with the widest vectors this CPU has.
fn decode(blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { decode_avx512(blocks, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            // SAFETY: as above.
            return unsafe { decode_avx2(blocks, out) };
        }
    }
    decode_generic(blocks, out)
}

/// Decodes `blocks` Q4_0 blocks of 16 weight rows (`rows[q]` row `q`'s first block) into
/// `lines` (`32 blocks` of them): line `p` holds the 16 rows' values at `p`, as [`decode`] gives
/// them.
///
/// # Safety
/// The CPU has AVX2 and F16C; each of `rows` is readable for `blocks` blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn decode_panel_avx2(rows: [*const u8; 16], blocks: usize, lines: &mut [[f32; 16]]) {
    use std::arch::x86_64::*;
    let zero = _mm_setzero_si128();
    for (b, lines) in lines.chunks_exact_mut(QK).take(blocks).enumerate() {
        let at = b * BLOCK_BYTES;
        // Each row's scale, then its 16 bytes of nibbles.
        let mut scales = [0u16; 16];
        let mut x = [zero; 16];
        for q in 0..16 {
            scales[q] = (rows[q].add(at) as *const u16).read_unaligned();
            x[q] = _mm_loadu_si128(rows[q].add(at + 2) as *const __m128i);
        }
        let d = [
            _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr() as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(8) as *const __m128i)),
        ];
        // Transposed: t[i] holds byte i of each row, in row order (unpacking 8, 16, 32 and 64
        // bits at a time; after each stage a vector covers twice the rows and half the bytes).
        let mut a = [zero; 16];
        for i in 0..8 {
            a[2 * i] = _mm_unpacklo_epi8(x[2 * i], x[2 * i + 1]);
            a[2 * i + 1] = _mm_unpackhi_epi8(x[2 * i], x[2 * i + 1]);
        }
        let mut c = [zero; 16];
        for j in 0..4 {
            for h in 0..2 {
                let (lo, hi) = (a[4 * j + h], a[4 * j + 2 + h]);
                c[4 * j + 2 * h] = _mm_unpacklo_epi16(lo, hi);
                c[4 * j + 2 * h + 1] = _mm_unpackhi_epi16(lo, hi);
            }
        }
        let mut e = [zero; 16];
        for o in 0..2 {
            for g in 0..4 {
                let (lo, hi) = (c[8 * o + g], c[8 * o + 4 + g]);
                e[8 * o + 2 * g] = _mm_unpacklo_epi32(lo, hi);
                e[8 * o + 2 * g + 1] = _mm_unpackhi_epi32(lo, hi);
            }
        }
        let mut t = [zero; 16];
        for i in 0..8 {
            t[2 * i] = _mm_unpacklo_epi64(e[i], e[8 + i]);
            t[2 * i + 1] = _mm_unpackhi_epi64(e[i], e[8 + i]);
        }
        // Byte i: its low nibbles are value i, its high ones value 16 + i.
        let (mask, eight) = (_mm_set1_epi8(15), _mm256_set1_epi32(8));
        let store = |nibbles: __m128i, line: &mut [f32; 16]| {
            for (h, d) in d.iter().enumerate() {
                let v = _mm256_cvtepu8_epi32(if h == 0 { nibbles } else { _mm_srli_si128::<8>(nibbles) });
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, eight)), *d);
                _mm256_storeu_ps(line.as_mut_ptr().add(8 * h), v);
            }
        };
        let (low, high) = lines.split_at_mut(QK / 2);
        for i in 0..16 {
            store(_mm_and_si128(t[i], mask), &mut low[i]);
            store(_mm_and_si128(_mm_srli_epi16::<4>(t[i]), mask), &mut high[i]);
        }
    }
}

/// Whether [`Kernel::Packed`] runs here: [`crate::f32_packed`]'s kernel does, and the CPU has
/// AVX2 and F16C for [`decode_panel_avx2`].
fn packed_runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::f32_packed::available() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// Each thread's buffer of decoded weight rows (the `gemm` crate's path).
    static DECODED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's decoded block in panels, and a partial panel's rows on their way there.
    #[cfg(target_arch = "x86_64")]
    static PANELS: RefCell<(Packed, Vec<f32>)> = const { RefCell::new((Packed::empty(), Vec::new())) };
}

/// Bytes of a Q4_0 weight's storage.
pub(crate) fn weight_bytes(w: &Tensor) -> usize {
    w.storage_as::<BlockQuantStorage>().map_or(0, |s| s.value().len())
}

impl GemmQ4 {
    /// The 4-bit weight this op holds (for the resident-weight count).
    pub(crate) fn weight(&self) -> &Arc<Tensor> {
        &self.weight
    }

    /// Weight rows per block for `parts` blocks at least: blocks of about equal size within
    /// [`SCRATCH`], a multiple of 16 rows.
    fn rows_per_block(&self, parts: usize) -> usize {
        // Decoded at once: all `ka` values of a weight row, or one block of them on the panels.
        #[cfg(target_arch = "x86_64")]
        let per_row = if self.kernel == Kernel::Packed { self.ka.min(KC) } else { self.ka };
        #[cfg(not(target_arch = "x86_64"))]
        let per_row = self.ka;
        let most = (SCRATCH / per_row.max(1)).max(16);
        let blocks = self.n.div_ceil(most).max(parts).max(1);
        self.n.div_ceil(blocks).div_ceil(16).max(1) * 16
    }

    /// Columns `cols` of `C` (weight rows): decode them, then one product.
    ///
    /// # Safety
    /// `a` holds `m x k` f32s, `c` `m x n`, and no one else writes columns `cols` of `c`.
    unsafe fn columns(&self, blob: &[u8], a: usize, c: usize, cols: std::ops::Range<usize>, finish: &Finish) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Packed {
            self.columns_packed(blob, a, c, cols.clone());
            if !finish.steps.is_empty() {
                finish.block(c as *mut f32, self.n, 0..self.m, cols);
            }
            return;
        }
        let (k, ka, n, m, w) = (self.k, self.ka, self.n, self.m, cols.len());
        let row_bytes = k / QK * BLOCK_BYTES;
        DECODED.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < w * ka + TILE * k {
                buf.resize(w * ka + TILE * k, 0.0);
            }
            let (decoded, tile) = buf[..w * ka + TILE * k].split_at_mut(w * ka);
            // `B[kk, j]` (row `j` of the weight) at `b + kk w + j`: the layout the crate's
            // kernels take fastest (row-major, as an f32 weight is stored). Rows are decoded
            // [`TILE`] at a time, then written out a cache line per `kk`.
            for j0 in (0..w).step_by(TILE) {
                let t = TILE.min(w - j0);
                let r = cols.start + j0;
                decode(&blob[r * row_bytes..(r + t) * row_bytes], &mut tile[..t * k]);
                for kk in 0..ka {
                    let out = &mut decoded[kk * w + j0..kk * w + j0 + t];
                    for (jj, o) in out.iter_mut().enumerate() {
                        *o = tile[jj * k + kk];
                    }
                }
            }
            let (a, cb) = (a as *const f32, (c as *mut f32).add(cols.start));
            // `C[m, w] = A[m, ka] B[ka, w]`, C's rows `n` apart.
            matmul(
                (m, ka, w),
                (cb, Strides::rows(n)),
                (a, Strides::rows(ka)),
                (decoded.as_ptr(), Strides::rows(w)),
                1.0,
            );
            if !finish.steps.is_empty() {
                finish.block(c as *mut f32, n, 0..m, cols);
            }
        });
    }

    /// Columns `cols` of `C` on [`crate::f32_packed`]'s kernel, a block of [`KC`] values of `k`
    /// at a time: the block's weights decoded straight into the kernel's panels, then their
    /// product added to `C`. The activations' block is read once, as in an f32 product.
    ///
    /// # Safety
    /// As [`GemmQ4::columns`]; the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn columns_packed(&self, blob: &[u8], a: usize, c: usize, cols: std::ops::Range<usize>) {
        let (k, ka, n, m, w) = (self.k, self.ka, self.n, self.m, cols.len());
        let row_bytes = k / QK * BLOCK_BYTES;
        let (a, cb) = (a as *const f32, (c as *mut f32).add(cols.start));
        PANELS.with(|cell| {
            let (packed, tile) = &mut *cell.borrow_mut();
            for pc in (0..ka).step_by(KC) {
                let kc = KC.min(ka - pc);
                // Whole Q4_0 blocks: the last may reach past `ka` (activations the export padded).
                let blocks = kc.div_ceil(QK);
                packed.refill_panels((kc, w), |j, lines| {
                    let first = cols.start + 16 * j;
                    let width = 16.min(cols.end - first);
                    let src =
                        |q: usize| &blob[(first + q) * row_bytes + pc / QK * BLOCK_BYTES..][..blocks * BLOCK_BYTES];
                    if width == 16 && kc == blocks * QK {
                        // SAFETY: the CPU has what the kernel needs; `src` is `blocks` blocks.
                        unsafe { decode_panel_avx2(std::array::from_fn(|q| src(q).as_ptr()), blocks, lines) };
                        return;
                    }
                    // A partial panel or block: each row decoded, then transposed.
                    let len = blocks * QK;
                    tile.resize(width * len, 0.0);
                    for (q, out) in tile.chunks_exact_mut(len).enumerate() {
                        decode(src(q), out);
                    }
                    for (p, line) in lines.iter_mut().enumerate() {
                        for (q, v) in line.iter_mut().enumerate() {
                            *v = if q < width { tile[q * len + p] } else { 0.0 };
                        }
                    }
                });
                if pc == 0 {
                    packed.product((a, ka), (cb, n), m, 0..w, 1.0);
                } else {
                    packed.add_product((a.add(pc), ka), (cb, n), m, 0..w);
                }
            }
        });
    }

    /// Runs every block of columns, split over tract's thread pool when it has more than one
    /// thread.
    fn run(&self, blob: &[u8], a: &[f32], c: &mut [f32], finish: &Finish) {
        let (pa, pc) = (a.as_ptr() as usize, c.as_mut_ptr() as usize);
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            if let Some(pool) = crate::thread_pool() {
                let step = self.rows_per_block(pool.current_num_threads());
                let blocks: Vec<usize> = (0..self.n).step_by(step).collect();
                if blocks.len() > 1 {
                    // SAFETY: lengths checked by `eval`; blocks write disjoint columns.
                    pool.install(|| {
                        blocks
                            .into_par_iter()
                            .for_each(|s| unsafe { self.columns(blob, pa, pc, s..(s + step).min(self.n), finish) })
                    });
                    return;
                }
            }
        }
        let step = self.rows_per_block(1);
        for s in (0..self.n).step_by(step) {
            // SAFETY: lengths checked by `eval`.
            unsafe { self.columns(blob, pa, pc, s..(s + step).min(self.n), finish) };
        }
    }
}

impl Op for GemmQ4 {
    fn name(&self) -> StaticName {
        if self.epilogue.is_empty() { "GemmQ4" } else { "GemmQ4+epilogue" }.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let then = if self.epilogue.is_empty() { String::new() } else { format!(", then {:?}", self.epilogue) };
        Ok(vec![format!("m {} k {} (of {}) n {}{then}", self.m, self.ka, self.k, self.n)])
    }

    op_as_typed_op!();
}

impl EvalOp for GemmQ4 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let a = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let blob = self.weight.try_storage_as::<BlockQuantStorage>()?.value();
        ensure!(
            a.len() == self.m * self.ka && blob.len() == self.n * self.k / QK * BLOCK_BYTES,
            "GemmQ4: {} activations and {} weight bytes, planned for {} and {}",
            a.len(),
            blob.len(),
            self.m * self.ka,
            self.n * self.k / QK * BLOCK_BYTES
        );
        let finish = Finish::new(&self.epilogue, &inputs[1..], self.m, self.n)?;
        let mut out = unsafe { Tensor::uninitialized_dt(f32::datum_type(), &self.shape)? };
        if self.m * self.n > 0 {
            self.run(blob, a, out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, &finish);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl Finishes for GemmQ4 {
    fn rows(&self) -> Option<Rows> {
        self.epilogue.is_empty().then(|| Rows { m: self.m, n: self.n, shape: self.shape.clone() })
    }

    fn finish_with(&mut self, steps: Vec<Step>, shape: Vec<usize>) {
        (self.epilogue, self.shape) = (steps, shape);
    }
}

impl TypedOp for GemmQ4 {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.shape)))
    }

    as_op!();
}

/// The op replacing node `node` of `model`, if it is a product of contiguous f32 activations
/// `[.., k..]` by a Q4_0 weight `[.., n, k..]` over their trailing axes (one or several, such as
/// heads and head size), with the activations' other axes kept in order (axes of extent 1 aside).
fn candidate(model: &TypedModel, node: &TypedNode) -> Option<GemmQ4> {
    let op = node.op_as::<EinSum>()?;
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return None;
    }
    let weight = model.node(node.inputs[1].node).op_as::<Const>()?.val().clone();
    let storage = weight.storage_as::<BlockQuantStorage>()?;
    let q4: &dyn BlockQuant = &Q4_0;
    if *storage.format() != *q4 {
        return None;
    }
    let a = model.outlet_fact(node.inputs[0]).ok()?;
    let c = model.outlet_fact(OutletId::new(node.id, 0)).ok()?;
    if a.datum_type != f32::datum_type() || !a.is_plain() || c.datum_type != f32::datum_type() {
        return None;
    }
    let (a, c, w) = (a.shape.as_concrete()?.to_vec(), c.shape.as_concrete()?.to_vec(), weight.shape().to_vec());
    // (position in A, position in W) of each contracted axis; (A, C) of each kept A axis; the
    // positions of W's and C's axis n.
    let (mut contracted, mut kept, mut n_axis) = (vec![], vec![], None);
    for axis in op.axes.iter_all_axes() {
        let (ia, iw, ic) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
        match (ia.as_slice(), iw.as_slice(), ic.as_slice()) {
            ([p], [q], []) if a[*p] == w[*q] => contracted.push((*p, *q)),
            ([p], [], [r]) if a[*p] == c[*r] => kept.push((*p, *r)),
            ([], [q], [r]) if w[*q] == c[*r] && n_axis.is_none() => n_axis = Some((*q, *r)),
            // An axis of extent 1 wherever it is.
            (ps, qs, rs)
                if ps.iter().all(|&p| a[p] == 1) && qs.iter().all(|&q| w[q] == 1) && rs.iter().all(|&r| c[r] == 1) => {}
            _ => return None,
        }
    }
    let (wn, cn) = n_axis?;
    contracted.sort();
    kept.sort();
    let nc = contracted.len();
    // Contracted axes: the trailing axes of A and of W, in the same order; n just before them in
    // W, last in C; A's kept axes in the same order in C (so A is `[m, k]` and C `[m, n]`).
    let trailing = contracted.iter().enumerate().all(|(i, &(p, q))| p == a.len() - nc + i && q == w.len() - nc + i);
    let kept_in_order = kept.windows(2).all(|x| x[0].1 < x[1].1);
    let units_elsewhere =
        |shape: &[usize], used: &[usize]| (0..shape.len()).all(|i| used.contains(&i) || shape[i] == 1);
    let a_used: Vec<usize> = contracted.iter().map(|x| x.0).chain(kept.iter().map(|x| x.0)).collect();
    let w_used: Vec<usize> = contracted.iter().map(|x| x.1).chain([wn]).collect();
    let c_used: Vec<usize> = kept.iter().map(|x| x.1).chain([cn]).collect();
    if nc == 0
        || !trailing
        || wn + nc + 1 != w.len()
        || cn + 1 != c.len()
        || !kept_in_order
        || !units_elsewhere(&a, &a_used)
        || !units_elsewhere(&w, &w_used)
        || !units_elsewhere(&c, &c_used)
    {
        return None;
    }
    let k: usize = contracted.iter().map(|&(p, _)| a[p]).product();
    let m: usize = kept.iter().map(|&(p, _)| a[p]).product();
    let n = w[wn];
    (m >= MIN_ROWS && k.is_multiple_of(QK) && k > 0).then(|| GemmQ4 {
        weight,
        m,
        k,
        ka: k,
        n,
        shape: c,
        epilogue: vec![],
        kernel: if packed_runs() { Kernel::Packed } else { Kernel::Crate },
    })
}

/// The tensor `o` zero-pads at the end of its last axis, and the padded axis's length there, if
/// `o` is such a padding.
fn unpadded(model: &TypedModel, o: OutletId) -> Option<(OutletId, usize)> {
    let node = model.node(o.node);
    let pad = node.op_as::<Pad>()?;
    let PadMode::Constant(value) = &pad.mode else { return None };
    let (last, lead) = pad.pads.split_last()?;
    let zero = value.len() == 1 && value.cast_to_scalar::<f32>().ok()? == 0.0;
    if !zero || last.0 != 0 || lead.iter().any(|&p| p != (0, 0)) {
        return None;
    }
    let input = node.inputs[0];
    let fact = model.outlet_fact(input).ok()?;
    (fact.datum_type == f32::datum_type() && fact.is_plain())
        .then_some(())
        .and_then(|_| Some((input, fact.shape.as_concrete()?.last().copied()?)))
}

/// Replaces every product of `model` by a Q4_0 weight that [`GemmQ4`] computes; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, GemmQ4)> = model.nodes().iter().filter_map(|n| Some((n.id, candidate(model, n)?))).collect();
    let mut subs = crate::Substitutions::default();
    for (id, op) in &found {
        let node = model.node(*id);
        let (name, mut input) = (node.name.clone(), node.inputs[0]);
        let mut op = op.clone();
        // Activations zero-padded over the contracted axis (a single one) are read unpadded.
        if let Some((unpadded, ka)) = unpadded(model, input) {
            if ka < op.k && model.outlet_fact(input)?.shape.as_concrete().and_then(|s| s.last().copied()) == Some(op.k)
            {
                (input, op.ka) = (unpadded, ka);
            }
        }
        subs.substitute(model, OutletId::new(*id, 0), format!("{name}.q4"), op, &[input])?;
    }
    model.compact()?;
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_0 weight of `n` rows of `k` (tract's own quantiser) and its values as tract decodes
    /// them.
    fn weight(n: usize, k: usize) -> (Arc<Tensor>, Vec<f32>) {
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 211) as f32 / 53.0 - 2.0).collect();
        let blob = Q4_0.quant_f32(&values).unwrap();
        let decoded = Q4_0.dequant_f32(&blob).unwrap();
        let decoded = decoded.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let storage = BlockQuantStorage::new(Box::new(Q4_0), n, k, Arc::new(blob)).unwrap();
        (Arc::new(storage.into_tensor_with_shape(f32::datum_type(), &[1, n, k])), decoded)
    }

    #[test]
    fn decode_matches_tracts_dequantisation() {
        let (w, want) = weight(3, 96);
        let blob = w.try_storage_as::<BlockQuantStorage>().unwrap().value().clone();
        for wide in [true, false] {
            let mut got = vec![0f32; want.len()];
            if wide {
                decode(&blob, &mut got)
            } else {
                decode_generic(&blob, &mut got)
            }
            assert_eq!(got, want);
        }
    }

    /// The kernels this CPU runs.
    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Crate];
        if packed_runs() {
            kernels.push(Kernel::Packed);
        } else {
            eprintln!("no AVX2, FMA and F16C here: the packed kernel not run");
        }
        kernels
    }

    /// Whether the CPU has F16C (the panel decoder's scales).
    fn has_f16c() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// 16 rows decoded into panel lines: each line the rows' values at one `k`, as [`decode`]
    /// gives them, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panel_decode_transposes_decode() {
        if !(is_x86_feature_detected!("avx2") && has_f16c()) {
            return eprintln!("no AVX2 and F16C here: panel decoding not run");
        }
        let (w, _) = weight(16, 96);
        let blob = w.try_storage_as::<BlockQuantStorage>().unwrap().value().clone();
        let row_bytes = 96 / QK * BLOCK_BYTES;
        let mut rows = vec![0f32; 16 * 96];
        decode(&blob, &mut rows);
        // The last two blocks of each row.
        let mut lines = vec![[f32::NAN; 16]; 64];
        let starts = std::array::from_fn(|q| blob[q * row_bytes + BLOCK_BYTES..].as_ptr());
        unsafe { decode_panel_avx2(starts, 2, &mut lines) };
        for (p, line) in lines.iter().enumerate() {
            for (q, v) in line.iter().enumerate() {
                assert_eq!(v.to_bits(), rows[q * 96 + 32 + p].to_bits(), "k {p}, row {q}");
            }
        }
    }

    #[test]
    fn products_match_f64() {
        // Narrow and wide, with several blocks of columns and a partial last block.
        // `ka < k`: activations whose zero padding to a whole block is not read.
        for (m, k, ka, n) in
            [(8usize, 64usize, 64usize, 16usize), (130, 288, 261, 261), (20, 1024, 1024, 300), (300, 32, 30, 40)]
        {
            let (w, dec) = weight(n, k);
            let a: Vec<f32> = (0..m * ka).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
            let ta = Tensor::from_shape(&[1, m, ka], &a).unwrap();
            let mut results = vec![];
            for kernel in kernels() {
                let op = GemmQ4 { weight: w.clone(), m, k, ka, n, shape: vec![1, m, n], epilogue: vec![], kernel };
                let eval = || op.eval(&EvalContext::out_of_plan(), tvec!(ta.clone().into_tvalue())).unwrap();
                results.push(eval());
                #[cfg(feature = "threads")]
                {
                    use tract_linalg::multithread::{multithread_tract_scope, Executor};
                    results.push(multithread_tract_scope(Executor::multithread(3), eval));
                }
            }
            for got in results {
                let got = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..ka).map(|kk| a[i * ka + kk] as f64 * dec[j * k + kk] as f64).sum();
                        let g = got[i * n + j] as f64;
                        assert!((g - want).abs() < 1e-4 * (1.0 + want.abs()), "{m}x{k}x{n} [{i},{j}]: {g} vs {want}");
                    }
                }
            }
        }
    }
}
