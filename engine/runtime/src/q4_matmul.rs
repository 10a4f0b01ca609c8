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
//! [`crate::f32_packed`]'s kernels run (x86 with AVX2, FMA and F16C), the weight's bytes are
//! reordered once at load into panels of 16 weight rows ([`Panels`]: the same 4 bits a weight),
//! and each block of 256 values of `k` is decoded straight into the kernel's panels, a line of 16
//! values from one 16-byte load, and multiplied on them (a 2-core AMD EPYC with AVX2, one thread:
//! lone `[512, 1024] x [1024, 1024]` 81 -> 93 GFLOP/s; vision-perceiver-fourier q4 5.25 -> 4.74 s a
//! run, where onnxruntime took 4.78 s on the same file; on Zen 4's AVX-512 tiles language-perceiver
//! q4 1.42-1.56 -> 1.33-1.40 s).
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

/// The weight as the op holds it: the layout its kernel decodes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Weight {
    /// tract's Q4_0 tensor (`n` rows of `k`, block after block), a block of rows decoded at a
    /// time for the `gemm` crate's kernels.
    Rows(Arc<Tensor>),
    /// The same blocks reordered at load ([`Panels`]), decoded straight into
    /// [`crate::f32_packed`]'s panels where its kernels run (x86 with AVX2, FMA and F16C).
    Panels(Arc<Panels>),
}

/// Bytes of a Q4_0 block in [`Panels`]: 16 weight rows' blocks.
const PANEL_BLOCK: usize = 16 * BLOCK_BYTES;

/// A Q4_0 weight reordered for the panel decoder: per panel of 16 weight rows (rows past `n`
/// zero), per block of 32 values of `k`, [`PANEL_BLOCK`] bytes: the 16 rows' f16 scales, then 16
/// vectors of 16 bytes, vector `i` holding each row's byte `i` (values `i` and `16 + i` as its low
/// and high nibbles). The bytes of tract's layout, transposed once at load instead of at every
/// block decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Panels {
    n: usize,
    k: usize,
    bytes: Vec<u8>,
}

impl std::hash::Hash for Panels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // A few bytes tell weights apart; equal weights hash alike (`eq` compares them all).
        (self.n, self.k).hash(state);
        self.bytes.iter().take(256).for_each(|b| b.hash(state));
    }
}

impl Panels {
    /// Reorders `blob`, tract's Q4_0 storage of `n` rows of `k` weights.
    fn new(blob: &[u8], n: usize, k: usize) -> Panels {
        let blocks = k / QK;
        let mut bytes = vec![0u8; n.div_ceil(16) * blocks * PANEL_BLOCK];
        for (j, panel) in bytes.chunks_exact_mut(blocks * PANEL_BLOCK).enumerate() {
            for (b, out) in panel.chunks_exact_mut(PANEL_BLOCK).enumerate() {
                for q in 0..16.min(n - 16 * j) {
                    let src = &blob[((16 * j + q) * blocks + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    out[2 * q..2 * q + 2].copy_from_slice(&src[..2]);
                    for (i, &byte) in src[2..].iter().enumerate() {
                        out[32 + 16 * i + q] = byte;
                    }
                }
            }
        }
        Panels { n, k, bytes }
    }
}

/// `C[.., n] = A[.., k] W[n, k]^T` with `W` Q4_0 block-quantised, `A` and `C` contiguous.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GemmQ4 {
    /// The weight: `n` rows of `k`, Q4_0 blocks.
    weight: Weight,
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

/// Decodes `blocks` blocks of a panel of [`Panels`] (`src`, from its first block on) into
/// `lines` (`32 blocks` of them): line `p` holds the 16 rows' values at `p`, as [`decode`] gives
/// them, bit for bit (`nibble - 8` taken on the bytes).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_panel_avx2(src: &[u8], blocks: usize, lines: &mut [[f32; 16]]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= blocks * PANEL_BLOCK && lines.len() >= blocks * QK);
    let (mask, eight) = (_mm_set1_epi8(15), _mm_set1_epi8(8));
    for (b, lines) in lines.chunks_exact_mut(QK).take(blocks).enumerate() {
        let at = src.as_ptr().add(b * PANEL_BLOCK);
        let d = [
            _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)),
            _mm256_cvtph_ps(_mm_loadu_si128(at.add(16) as *const __m128i)),
        ];
        // Each byte `nibble - 8`, then widened with its sign.
        let store = |nibbles: __m128i, line: &mut [f32; 16]| {
            let x = _mm_sub_epi8(nibbles, eight);
            for (h, d) in d.iter().enumerate() {
                let v = _mm256_cvtepi8_epi32(if h == 0 { x } else { _mm_srli_si128::<8>(x) });
                _mm256_storeu_ps(line.as_mut_ptr().add(8 * h), _mm256_mul_ps(_mm256_cvtepi32_ps(v), *d));
            }
        };
        let (low, high) = lines.split_at_mut(QK / 2);
        for i in 0..16 {
            let t = _mm_loadu_si128(at.add(32 + 16 * i) as *const __m128i);
            store(_mm_and_si128(t, mask), &mut low[i]);
            store(_mm_and_si128(_mm_srli_epi16::<4>(t), mask), &mut high[i]);
        }
    }
}

/// As [`decode_panel_avx2`], a line a register.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_panel_avx512(src: &[u8], blocks: usize, lines: &mut [[f32; 16]]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= blocks * PANEL_BLOCK && lines.len() >= blocks * QK);
    let (mask, eight) = (_mm_set1_epi8(15), _mm_set1_epi8(8));
    for (b, lines) in lines.chunks_exact_mut(QK).take(blocks).enumerate() {
        let at = src.as_ptr().add(b * PANEL_BLOCK);
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i));
        let (low, high) = lines.split_at_mut(QK / 2);
        for i in 0..16 {
            let t = _mm_loadu_si128(at.add(32 + 16 * i) as *const __m128i);
            let (lo, hi) = (_mm_and_si128(t, mask), _mm_and_si128(_mm_srli_epi16::<4>(t), mask));
            for (nibbles, line) in [(lo, &mut low[i]), (hi, &mut high[i])] {
                let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(nibbles, eight)));
                _mm512_storeu_ps(line.as_mut_ptr(), _mm512_mul_ps(v, d));
            }
        }
    }
}

/// Decodes panel blocks as [`decode_panel_avx2`] on the widest vectors the packed kernel uses.
///
/// # Safety
/// [`packed_runs`].
#[cfg(target_arch = "x86_64")]
unsafe fn decode_panel(src: &[u8], blocks: usize, lines: &mut [[f32; 16]]) {
    if crate::f32_packed::kernel() == Some(crate::f32_packed::Kernel::Avx512) {
        decode_panel_avx512(src, blocks, lines)
    } else {
        decode_panel_avx2(src, blocks, lines)
    }
}

/// Whether [`Weight::Panels`] runs here: [`crate::f32_packed`]'s kernels do, and the CPU has AVX2,
/// FMA and F16C for [`decode_panel_avx2`].
fn packed_runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::f32_packed::available()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// Each thread's buffer of decoded weight rows (the `gemm` crate's path).
    static DECODED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's decoded block in panels, and a block of `k` that ends inside a Q4_0 block on
    /// its way there.
    #[cfg(target_arch = "x86_64")]
    static PANELS: RefCell<(Packed, Vec<[f32; 16]>)> = const { RefCell::new((Packed::empty(), Vec::new())) };
}

impl GemmQ4 {
    /// Bytes of the 4-bit weight this op holds and where they are (for the resident-weight count).
    pub(crate) fn weight_held(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Rows(w) => {
                (w.storage_as::<BlockQuantStorage>().map_or(0, |s| s.value().len()), Arc::as_ptr(w) as usize)
            }
            Weight::Panels(p) => (p.bytes.len(), Arc::as_ptr(p) as usize),
        }
    }

    /// Whether the weight is decoded into [`crate::f32_packed`]'s panels.
    #[cfg(target_arch = "x86_64")]
    fn on_panels(&self) -> bool {
        matches!(self.weight, Weight::Panels(_))
    }

    /// Weight rows per block for `parts` blocks at least: blocks of about equal size within
    /// [`SCRATCH`], a multiple of 16 rows.
    fn rows_per_block(&self, parts: usize) -> usize {
        // Decoded at once: all `ka` values of a weight row, or one block of them on the panels.
        #[cfg(target_arch = "x86_64")]
        let per_row = if self.on_panels() { self.ka.min(KC) } else { self.ka };
        #[cfg(not(target_arch = "x86_64"))]
        let per_row = self.ka;
        let most = (SCRATCH / per_row.max(1)).max(16);
        let blocks = self.n.div_ceil(most).max(parts).max(1);
        self.n.div_ceil(blocks).div_ceil(16).max(1) * 16
    }

    /// Rows `rows` and columns `cols` of `C` (columns: weight rows): decode the columns, then
    /// one product. Off the panels `rows` is every row.
    ///
    /// # Safety
    /// `a` holds `m x k` f32s, `c` `m x n`, and no one else writes this block of `c`.
    unsafe fn block(
        &self,
        blob: &[u8],
        (a, c): (usize, usize),
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        finish: &Finish,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.on_panels() {
            self.columns_packed(blob, (a, c), rows.clone(), cols.clone());
            if !finish.steps.is_empty() {
                finish.block(c as *mut f32, self.n, rows, cols);
            }
            return;
        }
        debug_assert!(rows == (0..self.m), "off the panels a block holds every row");
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

    /// Rows `rows` and columns `cols` of `C` on [`crate::f32_packed`]'s kernels, a block of
    /// [`KC`] values of `k` at a time: the block's weights decoded from `blob` (the [`Panels`]'
    /// bytes) straight into the kernel's panels, then their product added to `C`. The
    /// activations' block is read once, as in an f32 product.
    ///
    /// # Safety
    /// As [`GemmQ4::block`]; [`packed_runs`]; `cols.start` is a multiple of 16.
    #[cfg(target_arch = "x86_64")]
    unsafe fn columns_packed(
        &self,
        blob: &[u8],
        (a, c): (usize, usize),
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) {
        let (kb, ka, n, m, w) = (self.k / QK, self.ka, self.n, rows.len(), cols.len());
        let a = (a as *const f32).add(rows.start * ka);
        let cb = (c as *mut f32).add(rows.start * n + cols.start);
        PANELS.with(|cell| {
            let (packed, tile) = &mut *cell.borrow_mut();
            for pc in (0..ka).step_by(KC) {
                let kc = KC.min(ka - pc);
                // Whole Q4_0 blocks: the last may reach past `ka` (activations the export padded).
                let blocks = kc.div_ceil(QK);
                packed.refill_panels((kc, w), |j, lines| {
                    let src = &blob[((cols.start / 16 + j) * kb + pc / QK) * PANEL_BLOCK..][..blocks * PANEL_BLOCK];
                    // SAFETY: the CPU has what the decoder needs; `src` is `blocks` blocks.
                    if kc == blocks * QK {
                        unsafe { decode_panel(src, blocks, lines) };
                    } else {
                        tile.resize(blocks * QK, [0.0; 16]);
                        unsafe { decode_panel(src, blocks, tile) };
                        lines.copy_from_slice(&tile[..kc]);
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

    /// The tasks for `threads` threads, each a part of `C`'s rows and the blocks of columns it
    /// takes in turn, each block decoding at most [`SCRATCH`] weights at once. On the panels a
    /// product of at least [`crate::gemm_matmul::ROWS_EACH`] rows a thread is cut along its rows,
    /// one part a thread (each decodes the whole weight): each thread then reads and writes only
    /// its own rows, which the ops before and after split the same way (see `GemmMatMul::blocks`).
    /// Otherwise along its columns, each decoded once.
    fn tasks(&self, threads: usize) -> Vec<(std::ops::Range<usize>, Vec<std::ops::Range<usize>>)> {
        let columns = |step: usize| (0..self.n).step_by(step).map(move |c| c..(c + step).min(self.n));
        #[cfg(target_arch = "x86_64")]
        if threads > 1 && self.on_panels() && self.m >= crate::gemm_matmul::ROWS_EACH * threads {
            let (step, cols) = (self.m.div_ceil(threads), self.rows_per_block(1));
            return (0..self.m).step_by(step).map(|r| (r..(r + step).min(self.m), columns(cols).collect())).collect();
        }
        columns(self.rows_per_block(threads)).map(|c| (0..self.m, vec![c])).collect()
    }

    /// Runs every task, split over tract's thread pool when it has more than one thread.
    fn run(&self, blob: &[u8], a: &[f32], c: &mut [f32], finish: &Finish) {
        let bufs = (a.as_ptr() as usize, c.as_mut_ptr() as usize);
        // SAFETY (both calls): lengths checked by `eval`; tasks write disjoint parts of `C`.
        let task = |(rows, cols): (std::ops::Range<usize>, Vec<std::ops::Range<usize>>)| {
            for cols in cols {
                unsafe { self.block(blob, bufs, rows.clone(), cols, finish) }
            }
        };
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            if let Some(pool) = crate::thread_pool() {
                let tasks = self.tasks(pool.current_num_threads());
                if tasks.len() > 1 {
                    pool.install(|| tasks.into_par_iter().for_each(task));
                    return;
                }
            }
        }
        self.tasks(1).into_iter().for_each(task);
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
        let (blob, rows): (&[u8], usize) = match &self.weight {
            Weight::Rows(w) => (w.try_storage_as::<BlockQuantStorage>()?.value(), self.n),
            Weight::Panels(p) => (&p.bytes, self.n.div_ceil(16) * 16),
        };
        ensure!(
            a.len() == self.m * self.ka && blob.len() == rows * self.k / QK * BLOCK_BYTES,
            "GemmQ4: {} activations and {} weight bytes, planned for {} and {}",
            a.len(),
            blob.len(),
            self.m * self.ka,
            rows * self.k / QK * BLOCK_BYTES
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
    // Bytes as the shape says (the panels and the kernels index by it).
    let bytes = storage.value().len() == n * (k / QK) * BLOCK_BYTES;
    (m >= MIN_ROWS && k.is_multiple_of(QK) && k > 0 && bytes).then(|| GemmQ4 {
        weight: Weight::Rows(weight),
        m,
        k,
        ka: k,
        n,
        shape: c,
        epilogue: vec![],
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
    let count = found.len();
    // The ops found hold tract's copies of the weights too (kept, they doubled the load's peak
    // RSS with the reordered ones: language-perceiver q4 199 -> 286 MiB).
    drop(found);
    if packed_runs() {
        to_panels(model)?;
    }
    Ok(count)
}

/// Whether models loaded from now on decode every Q4_0 weight into f32 at load on the CPU too, as
/// `--device cuda` always does (see [`decode_weights`]). Off by default; for comparisons.
pub(crate) static DECODE_AT_LOAD: crate::Switch = crate::Switch::off();

/// Replaces every Q4_0 block-quantised constant of `model` by its f32 values (`(nibble - 8) x
/// scale`, what the CPU's products use), so that the products read a plain f32 weight; returns
/// how many. For `--device cuda`: tract-cuda's 4-bit products did not reproduce the CPU's results
/// (2e-2 to 2.7 apart on the q4 fixtures, an H100), its f32 products did (5.8e-6). The weight then
/// takes 8x its 4-bit bytes in the device's memory.
pub(crate) fn decode_weights(model: &mut TypedModel) -> TractResult<usize> {
    let q4: &dyn BlockQuant = &Q4_0;
    let is_q4 = |n: &TypedNode| {
        let c = n.op_as::<Const>()?;
        c.val().storage_as::<BlockQuantStorage>().filter(|s| *s.format() == *q4).map(|_| c.val().clone())
    };
    // One weight at a time, its 4-bit copy dropped once decoded.
    let found: Vec<usize> = model.nodes().iter().filter(|n| is_q4(n).is_some()).map(|n| n.id).collect();
    for &id in &found {
        let weight = is_q4(model.node(id)).context("a Q4_0 constant")?;
        let storage = weight.storage_as::<BlockQuantStorage>().context("a Q4_0 constant")?;
        let decoded = Q4_0.dequant_f32(storage.value())?.into_shape(weight.shape())?.into_arc_tensor();
        let node = model.node_mut(id);
        node.outputs[0].fact = TypedFact::try_from(decoded.clone())?;
        node.op = Box::new(Const::new(decoded)?);
    }
    if !found.is_empty() {
        model.refresh_output_facts()?;
    }
    Ok(found.len())
}

/// Reorders each [`GemmQ4`]'s weight into [`Panels`], one weight at a time (every op reading it
/// given the same copy), so that tract's copy is dropped before the next is reordered.
fn to_panels(model: &mut TypedModel) -> TractResult<()> {
    loop {
        let rows = |n: &TypedNode| match n.op_as::<GemmQ4>().map(|op| &op.weight) {
            Some(Weight::Rows(w)) => Some(w.clone()),
            _ => None,
        };
        let Some(w) = model.nodes().iter().find_map(rows) else { return Ok(()) };
        let ops: Vec<(usize, GemmQ4)> = model
            .nodes()
            .iter()
            .filter_map(|n| {
                let op = n.op_as::<GemmQ4>()?;
                matches!(&op.weight, Weight::Rows(x) if Arc::ptr_eq(x, &w)).then(|| (n.id, op.clone()))
            })
            .collect();
        let (n, k) = (ops[0].1.n, ops[0].1.k);
        let panels = Arc::new(Panels::new(w.try_storage_as::<BlockQuantStorage>()?.value(), n, k));
        drop(w);
        for (id, mut op) in ops {
            op.weight = Weight::Panels(panels.clone());
            model.node_mut(id).op = Box::new(op);
        }
    }
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

    /// `w` in each layout this CPU runs ([`Weight::Panels`] where [`packed_runs`]).
    fn layouts(w: &Arc<Tensor>, n: usize, k: usize) -> Vec<Weight> {
        let mut layouts = vec![Weight::Rows(w.clone())];
        if packed_runs() {
            let blob = w.try_storage_as::<BlockQuantStorage>().unwrap().value();
            layouts.push(Weight::Panels(Arc::new(Panels::new(blob, n, k))));
        } else {
            eprintln!("no AVX2, FMA and F16C here: the packed kernels not run");
        }
        layouts
    }

    /// A panel's blocks decoded into lines: each line the 16 rows' values at one `k`, as
    /// [`decode`] gives them, bit for bit, and zeros past `n`; on each decoder this CPU runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn panel_decode_transposes_decode() {
        let (n, k) = (20, 96);
        let (w, _) = weight(n, k);
        let blob = w.try_storage_as::<BlockQuantStorage>().unwrap().value().clone();
        let mut rows = vec![0f32; n * k];
        decode(&blob, &mut rows);
        let panels = Panels::new(&blob, n, k);
        assert_eq!(panels.bytes.len(), 2 * 3 * PANEL_BLOCK);
        type Decoder = unsafe fn(&[u8], usize, &mut [[f32; 16]]);
        let mut decoders: Vec<(&str, Decoder)> = vec![];
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            decoders.push(("AVX2", decode_panel_avx2));
        }
        if is_x86_feature_detected!("avx512f") {
            decoders.push(("AVX-512", decode_panel_avx512));
        }
        if decoders.is_empty() {
            return eprintln!("no AVX2 or AVX-512 here: panel decoding not run");
        }
        for (name, decoder) in decoders {
            for panel in 0..2 {
                // The last two blocks of the panel's rows.
                let mut lines = vec![[f32::NAN; 16]; 64];
                let src = &panels.bytes[(panel * 3 + 1) * PANEL_BLOCK..];
                unsafe { decoder(src, 2, &mut lines) };
                for (p, line) in lines.iter().enumerate() {
                    for (q, v) in line.iter().enumerate() {
                        let row = 16 * panel + q;
                        if row < n {
                            assert_eq!(v.to_bits(), rows[row * k + 32 + p].to_bits(), "{name}: k {p}, row {row}");
                        } else {
                            assert_eq!(*v, 0.0, "{name}: k {p}, row {row} past n");
                        }
                    }
                }
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
            for weight in layouts(&w, n, k) {
                let op = GemmQ4 { weight, m, k, ka, n, shape: vec![1, m, n], epilogue: vec![] };
                let eval = || op.eval(&EvalContext::out_of_plan(), tvec!(ta.clone().into_tvalue())).unwrap();
                results.push(eval());
                #[cfg(feature = "threads")]
                {
                    // Three threads: the panels' products of at least 96 rows cut along their
                    // rows, the others along their columns; either way each value is summed in
                    // the same order as on one thread.
                    use tract_linalg::multithread::{multithread_tract_scope, Executor};
                    let one = results.last().unwrap()[0].clone();
                    let three = multithread_tract_scope(Executor::multithread(3), eval);
                    let values = |t: &TValue| t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                    assert_eq!(values(&three[0]), values(&one), "{m}x{k}x{n}: three threads, one thread");
                    results.push(three);
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
