//! f32 products by a constant weight on x86 with AVX2 and FMA or AVX-512: the weight packed once
//! at load, products on micro-kernels of this module's. A rewrite of the decluttered graph, after
//! [`crate::gemm_matmul`].
//!
//! The `gemm` crate packs both operands on every call. On AVX2 its kernels ran the published
//! architectures' Linears 1.44x slower than onnxruntime's MLAS (vision-perceiver-fourier, a 2-core
//! AMD EPYC, session 19); on AVX-512 (Zen 4, session 27) they ran language-perceiver's
//! `[256, 1280] x [1280, 1280]` products at 1.10-1.12x MLAS's time, the per-call packing of a 6.5
//! MB weight being a tenth of a product with only 256 rows. MLAS packs a constant weight once,
//! into panels of 16 columns by 256 values of `k`, and runs tiles of FMA over the activations read
//! in place. This module does the same: [`Packed`] holds the weight as, per block of rows of `k`
//! ([`KC`], or up to 640 where a core has 2 MiB of L2: [`k_block`]), panels of 16 columns
//! (zero-padded); [`Packed::product`] walks blocks of [`MC`] activation rows,
//! then `k` blocks, then [`NC`] columns, and runs a tile per panel, or pair of panels: on AVX2
//! ([`Kernel::Avx2`]) 6 x 16 tiles, 12 accumulators over the block's `k` (two panel loads and six
//! broadcasts per `k`); on AVX-512 ([`Kernel::Avx512`]) 12 x 32 tiles over two panels, 24
//! accumulators (MLAS's AVX-512 tile), the panels prefetched ahead; each `k` block's sums are
//! added to the output. While a pass over [`NC`] columns runs, the panels of the next pass are
//! fetched into L2 (where both fit in it with a block of rows: [`ahead_fits`]), a line per 4
//! values of `k` of each tile: without it the first row tile of each pass waited on the weight
//! from L3 (each Linear's weight is read once a run), and a chain of `[256, 1280] x [1280, 1280]`
//! products ran 1.02-1.05x slower on Emerald Rapids. Activation
//! rows a multiple of 2 KiB apart (`[512, 1024]` latents) are read from a copy with a stride that
//! spreads them over L1's sets. On the hosts measured, lone products ran at about onnxruntime's
//! rate: AVX2 `[516, 1024] x [1024, 1024]` at 0.80-0.85x the crate's time; AVX-512 `[256, 1280] x
//! [1280, 1280]` at 0.88-0.93x the crate's time and `[512, 1024] x [1024, 1024]` at the crate's
//! (figures in `docs/performance.md`).
//!
//! [`rewrite`] gives each [`GemmMatMul`] whose second operand is a constant (rows of activations
//! read in place, a row-major output) a packed copy of it and drops the constant from its inputs;
//! a weight read by several products (a weight-shared latent block) is packed once, and the graph
//! is compacted after each so its plain copy is gone before the next is packed. Results differ
//! from the crate's by the order of the sums only; the tests compare each kernel with a product
//! computed in f64, and the fixtures with the crate's and with transformers.

use crate::gemm_matmul::GemmMatMul;
use std::sync::Arc;
use tract_onnx::prelude::*;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Whether products fetch the next pass's panels into L2 as they run (see [`Packed::next_pass`]).
pub(crate) static READ_AHEAD: crate::Switch = crate::Switch::on();

/// Rows of a tile ([`Kernel::Avx2`]).
#[cfg(target_arch = "x86_64")]
const MR: usize = 6;
/// Rows of a tile ([`Kernel::Avx512`]: 24 accumulators of the 32 registers).
#[cfg(target_arch = "x86_64")]
const MR_512: usize = 12;
/// Columns of a tile and of a panel.
pub(crate) const NR: usize = 16;
/// Values of `k` per block (a panel's block is 16 KiB, in L1 with the tile's rows): the blocks
/// [`Packed::refill`] fills, and a weight's where a core has less than 2 MiB of L2.
pub(crate) const KC: usize = 256;
/// Values of `k` per block at most where a core has 2 MiB of L2 or more (see [`k_block`]).
const KC_LARGE: usize = 640;
/// L2 a core (KiB) from which a weight is packed in the larger blocks of [`block_for`].
const LARGE_L2_KIB: u32 = 2048;
/// Columns per pass over a block of rows (128 KiB of panels, in L2).
#[cfg(target_arch = "x86_64")]
const NC: usize = 128;
/// Activation rows per block (up to 384 KiB of a 256-value `k` block, 960 KiB of a 640-value
/// one; read from L2 by each `NC` columns).
#[cfg(target_arch = "x86_64")]
const MC: usize = 384;

/// The tiles that run the products.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Kernel {
    /// 6 x 16 tiles of 256-bit FMA, one panel at a time (AVX2 and FMA).
    Avx2,
    /// Up to 12 x 32 tiles of 512-bit FMA, two panels at a time (AVX-512F).
    Avx512,
}

/// The kernel this CPU runs, the widest it has.
pub(crate) fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            Some(Kernel::Avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(Kernel::Avx2)
        } else {
            None
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The block of `k` a weight of `k` rows is packed in on this CPU ([`block_for`] its L2).
pub(crate) fn k_block(k: usize) -> usize {
    block_for(k, l2_kib())
}

/// The block of `k` for a core with `l2_kib` of L2: [`KC`], or with 2 MiB or more (Intel's
/// Xeons since Sapphire Rapids among others, measured on Emerald Rapids only; AMD's Zen 3 and 4
/// have 0.5 and 1 MiB) `k` cut into equal blocks of at most [`KC_LARGE`] values, a multiple of 16. Fewer blocks
/// mean fewer passes adding a block's sums to the output; an activation block of [`MC`] rows
/// and a pass's panels (1.3 MiB at most) still fit such an L2. On a 2-core Xeon of family 6
/// model 207 (2 MiB of L2 a core), two sessions of one model packed both ways and alternated in
/// one process: a chain of eight `[256, 1280] x [1280, 1280]` products 0.962x the time in blocks
/// of 640 (0.970 in 512, 0.978 in 384), language-perceiver f32 0.974-0.977x, vision-perceiver-conv
/// f32 0.989x in blocks of 512.
fn block_for(k: usize, l2_kib: u32) -> usize {
    if l2_kib >= LARGE_L2_KIB {
        equal_blocks(k, KC_LARGE)
    } else {
        KC
    }
}

/// The block that cuts `k` into equal blocks of at most `most` values (`most` a multiple of 16),
/// rounded up to a multiple of 16.
fn equal_blocks(k: usize, most: usize) -> usize {
    let blocks = k.div_ceil(most).max(1);
    k.div_ceil(blocks).div_ceil(NR).max(1) * NR
}

/// Whether a pass's panels over blocks of `kc` values of `k`, the next pass's and a block of
/// [`MC`] activation rows fit together in `l2_kib` of L2, so that the next pass can be read ahead
/// (see [`Packed::next_pass`]) without pushing out what this one reads: blocks of 256 need 640
/// KiB (not Zen 3's 512, Zen 4's 1 MiB), blocks of 640 1.6 MiB (Emerald Rapids' 2 MiB).
#[cfg(target_arch = "x86_64")]
fn ahead_fits(kc: usize, l2_kib: u32) -> bool {
    (2 * NC + MC) * kc * std::mem::size_of::<f32>() <= l2_kib as usize * 1024
}

/// KiB of L2 a core as CPUID leaf 0x80000006 reports it (Intel and AMD both do; read once, on
/// the core the first packing runs on), 0 where it is not reported or not x86.
fn l2_kib() -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        static KIB: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        *KIB.get_or_init(|| {
            use std::arch::x86_64::__cpuid;
            // SAFETY: CPUID runs on every x86_64 CPU; the extended leaf is read only where the
            // CPU reports it.
            #[allow(unused_unsafe)]
            unsafe {
                if __cpuid(0x8000_0000).eax >= 0x8000_0006 {
                    __cpuid(0x8000_0006).ecx >> 16
                } else {
                    0
                }
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Whether this CPU runs a kernel of this module's.
pub(crate) fn available() -> bool {
    kernel().is_some()
}

/// Every kernel this CPU runs (tests run the AVX2 one on AVX-512 hosts too).
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn kernels() -> Vec<Kernel> {
    let mut all = vec![];
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        all.push(Kernel::Avx2);
    }
    if is_x86_feature_detected!("avx512f") {
        all.push(Kernel::Avx512);
    }
    all
}

/// One row of a panel: 16 values, one 64-byte cache line (so no 32-byte load of the kernel
/// straddles two lines, as half of them did in an allocation only 16-byte aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; NR]);

/// A weight `W[k, n]` packed for the kernel: per block of `kc` rows, per panel of 16 columns,
/// the block's rows of the panel (zero-padded past `n`).
pub(crate) struct Packed {
    k: usize,
    n: usize,
    kc: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed {{ k: {}, n: {}, kc: {} }}", self.k, self.n, self.kc)
    }
}

impl std::hash::Hash for Packed {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // A few values tell weights apart; equal weights hash alike (`eq` compares them all).
        (self.k, self.n, self.kc).hash(state);
        self.values().iter().take(64).for_each(|v| v.to_bits().hash(state));
    }
}

impl PartialEq for Packed {
    fn eq(&self, other: &Packed) -> bool {
        (self.k, self.n, self.kc) == (other.k, other.n, other.kc)
            && self.values().iter().zip(other.values()).all(|(x, y)| x.to_bits() == y.to_bits())
    }
}

impl Eq for Packed {}

impl Packed {
    /// Packs `w` (`w(row, col)` the weight at row `row` of `k`, column `col` of `n`) in blocks of
    /// `block` values of `k` ([`KC`], or [`k_block`]'s).
    pub(crate) fn new(k: usize, n: usize, block: usize, w: impl Fn(usize, usize) -> f32) -> Packed {
        let panels = n.div_ceil(NR);
        let mut data = vec![Line([0.0; NR]); panels * k];
        let mut at = 0;
        for pc in (0..k).step_by(block) {
            let kc = block.min(k - pc);
            for j in 0..panels {
                for p in pc..pc + kc {
                    for (q, v) in data[at].0.iter_mut().enumerate() {
                        let col = j * NR + q;
                        if col < n {
                            *v = w(p, col);
                        }
                    }
                    at += 1;
                }
            }
        }
        Packed { k, n, kc: block, data }
    }

    /// Packs the `k x n` weight at `w`, `w[row * sk + col * sn]` at (`row`, `col`), as
    /// [`Packed::new`] does, a line at a time: a row-major weight (`sn` 1) by slices, without
    /// filling the buffer with zeros first.
    pub(crate) fn from_strided(k: usize, n: usize, block: usize, w: &[f32], (sk, sn): (isize, isize)) -> Packed {
        if sn != 1 || sk < 0 {
            return Packed::new(k, n, block, |row, col| w[(row as isize * sk + col as isize * sn) as usize]);
        }
        let sk = sk as usize;
        let panels = n.div_ceil(NR);
        let mut data = Vec::with_capacity(panels * k);
        for pc in (0..k).step_by(block) {
            let kc = block.min(k - pc);
            for j in 0..panels {
                let (c0, width) = (j * NR, NR.min(n - j * NR));
                data.extend((pc..pc + kc).map(|p| {
                    let mut line = Line([0.0; NR]);
                    line.0[..width].copy_from_slice(&w[p * sk + c0..p * sk + c0 + width]);
                    line
                }));
            }
        }
        Packed { k, n, kc: block, data }
    }

    /// An empty weight: a buffer for [`Packed::refill_panels`].
    #[cfg(target_arch = "x86_64")]
    pub(crate) const fn empty() -> Packed {
        Packed { k: 0, n: 0, kc: KC, data: Vec::new() }
    }

    /// Packs a `k x n` weight of one block of `k` (`k` at most [`KC`]) into this buffer (its
    /// allocation reused), a panel at a time: `panel(j, lines)` writes panel `j`'s `k` lines, line
    /// `p` the weight's row `p` at columns `16 j..16 j + 16` (zeros past `n`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn refill_panels(&mut self, (k, n): (usize, usize), mut panel: impl FnMut(usize, &mut [[f32; NR]])) {
        assert!(k <= KC, "one block of k");
        self.refill((k, n), |_, j, lines| panel(j, lines));
    }

    /// Packs a `k x n` weight into this buffer (its allocation reused), a panel of a block of
    /// `k` at a time: `panel(p0, j, lines)` writes the lines of panel `j` in the block starting at
    /// row `p0`, line `p` the weight's row `p0 + p` at columns `16 j..16 j + 16` (zeros past `n`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn refill(&mut self, (k, n): (usize, usize), mut panel: impl FnMut(usize, usize, &mut [[f32; NR]])) {
        let panels = n.div_ceil(NR);
        self.data.resize(panels * k, Line([0.0; NR]));
        (self.k, self.n, self.kc) = (k, n, KC);
        let mut rest = &mut self.data[..];
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            for j in 0..panels {
                let (lines, tail) = rest.split_at_mut(kc);
                rest = tail;
                // SAFETY: a `Line` is 16 `f32`s and nothing else (`repr(C)`, 64 bytes, aligned
                // more than an `f32` array needs).
                let lines = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut [f32; NR], kc) };
                panel(p0, j, lines);
            }
        }
    }

    /// The packed values, in order.
    fn values(&self) -> &[f32] {
        // SAFETY: a `Line` is 16 `f32`s and nothing else (`repr(C)`, 64 bytes).
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const f32, self.data.len() * NR) }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<Line>()
    }

    /// `C[r, cols] = scale (A[r, :] W[:, cols])` for rows `r` in `0..rows`: `a` the first row of
    /// `A` (`k` values, rows `lda` apart), `c` column 0 of the first row of `C` (rows `ldc`
    /// apart). `cols.start` is a multiple of 16.
    ///
    /// # Safety
    /// The CPU runs a kernel ([`available`]); `a` and `c` hold the rows and columns given, and no
    /// one else writes `C`'s part meanwhile.
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn product(
        &self,
        (a, lda): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        rows: usize,
        cols: std::ops::Range<usize>,
        scale: f32,
    ) {
        let kernel = kernel().expect("a kernel (checked when packed)");
        self.blocks(kernel, (a, lda), (c, ldc), rows, cols, scale, false, self.reads_ahead())
    }

    /// As [`Packed::product`], unscaled, adding to `C` instead of writing it (a product taken one
    /// block of `k` at a time).
    ///
    /// # Safety
    /// As [`Packed::product`].
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn add_product(
        &self,
        (a, lda): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        rows: usize,
        cols: std::ops::Range<usize>,
    ) {
        let kernel = kernel().expect("a kernel (checked when packed)");
        self.blocks(kernel, (a, lda), (c, ldc), rows, cols, 1.0, true, self.reads_ahead())
    }

    /// Whether products by this weight read the next pass ahead: [`READ_AHEAD`] on, and
    /// [`ahead_fits`] this core's L2.
    #[cfg(target_arch = "x86_64")]
    fn reads_ahead(&self) -> bool {
        READ_AHEAD.get() && ahead_fits(self.kc, l2_kib())
    }

    /// The loops of [`Packed::product`] (`add`: of [`Packed::add_product`]) on `kernel`'s tiles,
    /// the next pass read ahead where `ahead` (see [`Packed::next_pass`]).
    ///
    /// # Safety
    /// As [`Packed::product`], and the CPU runs `kernel`.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn blocks(
        &self,
        kernel: Kernel,
        (a, lda): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        rows: usize,
        cols: std::ops::Range<usize>,
        scale: f32,
        add: bool,
        ahead: bool,
    ) {
        debug_assert!(cols.start.is_multiple_of(NR) && cols.end <= self.n);
        let panels = self.n.div_ceil(NR);
        let width = match kernel {
            Kernel::Avx2 => NR,
            Kernel::Avx512 => 2 * NR,
        };
        // Rows of `A` a multiple of 2 KiB apart fall in at most two of L1's 64 sets (of 8 lines),
        // where a 12-row tile's lines evict each other at every `k`: then each block of rows is
        // read from a copy whose rows are 1 088 bytes apart (vision-perceiver's `[512, 1024]`
        // latents: a lone `[512, 1024] x [1024, 1024]` ran 1.3x slower without it).
        let copy = kernel == Kernel::Avx512 && lda.is_multiple_of(512);
        let data = self.data.as_ptr() as *const f32;
        for ic in (0..rows).step_by(MC) {
            let mc = MC.min(rows - ic);
            for pc in (0..self.k).step_by(self.kc) {
                let kc = self.kc.min(self.k - pc);
                let mut store = Store { first: pc == 0 && !add, last: pc + kc == self.k, scale, ahead: (data, 0) };
                let block = data.add(pc * panels * NR);
                let rows_at = if copy {
                    ROWS.with_borrow_mut(|buf| {
                        let stride = copy_stride(self.kc);
                        buf.resize(MC * stride, 0.0);
                        for r in 0..mc {
                            let from = std::slice::from_raw_parts(a.add((ic + r) * lda + pc), kc);
                            buf[r * stride..r * stride + kc].copy_from_slice(from);
                        }
                        // The buffer is this thread's and outlives the block (no one else
                        // borrows it meanwhile).
                        (buf.as_ptr(), stride)
                    })
                } else {
                    (a.add(ic * lda + pc), lda)
                };
                for jc in cols.clone().step_by(NC) {
                    let jend = (jc + NC).min(cols.end);
                    // The next pass's panels, fetched into L2 a line per 4 `k` of each tile.
                    let next = if ahead { self.next_pass(pc, jc, &cols, ic + mc < rows) } else { None };
                    let (next, lines) = next.unwrap_or((0, 0));
                    let mut fetched = 0;
                    let mut r0 = ic;
                    while r0 < ic + mc {
                        let ar = rows_at.0.add((r0 - ic) * rows_at.1);
                        let lda = rows_at.1;
                        let mut done = 0;
                        for j0 in (jc..jend).step_by(width) {
                            let b = block.add(j0 / NR * kc * NR);
                            let at = (c.add(r0 * ldc + j0), ldc, width.min(jend - j0));
                            let n = (kc / 4).min(lines - fetched);
                            store.ahead = (data.add((next + fetched) * NR), n);
                            fetched += n;
                            done = tile_on(kernel, ic + mc - r0, kc, (ar, lda), b, at, store);
                        }
                        debug_assert!(done > 0, "a tile ran");
                        r0 += done;
                    }
                }
            }
        }
    }

    /// The lines the pass after the one over columns `jc..jc + NC` of the `k` block at `pc`
    /// reads, in the order of [`Packed::product`]'s loops (the next [`NC`] columns of `cols`, else
    /// the next `k` block's first ones, else, where `more_rows`, the first block's first ones for
    /// the next block of rows), as (first line, lines); `None` after the last pass.
    #[cfg(target_arch = "x86_64")]
    fn next_pass(
        &self,
        pc: usize,
        jc: usize,
        cols: &std::ops::Range<usize>,
        more_rows: bool,
    ) -> Option<(usize, usize)> {
        let (pc, jc) = if jc + NC < cols.end {
            (pc, jc + NC)
        } else if pc + self.kc < self.k {
            (pc + self.kc, cols.start)
        } else if more_rows {
            (0, cols.start)
        } else {
            return None;
        };
        let kc = self.kc.min(self.k - pc);
        // Every block before `pc` holds `kc` lines of each panel.
        let first = pc * self.n.div_ceil(NR) + jc / NR * kc;
        Some((first, ((jc + NC).min(cols.end) - jc).div_ceil(NR) * kc))
    }
}

/// Row stride of the copy of a block of `A`'s rows for blocks of `kc` values of `k` (see
/// [`Packed::product`]'s loops): a line more than the block (17 lines for [`KC`]), so 12 rows
/// fall in 12 sets of L1.
#[cfg(target_arch = "x86_64")]
fn copy_stride(kc: usize) -> usize {
    kc.div_ceil(NR) * NR + NR
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's copy of a block of `A`'s rows ([`MC`] by a block of `k`, rows
    /// [`copy_stride`] apart).
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs one of `kernel`'s tiles of up to `rows` rows (as many as its tiles hold) and returns how
/// many it ran: `b` the first panel's block (the next panel `kc` lines on), `w` columns of `C`
/// written; an AVX-512 tile spans two panels when more than 16 columns are written.
///
/// # Safety
/// As [`Packed::product`], on a CPU that runs `kernel`.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_on(
    kernel: Kernel,
    rows: usize,
    kc: usize,
    a: (*const f32, usize),
    b: *const f32,
    at: (*mut f32, usize, usize),
    store: Store,
) -> usize {
    macro_rules! rows_512 {
        ($p:literal) => {
            match rows.min(MR_512) {
                12 => tile_512::<12, $p>(kc, a, b, at, store),
                11 => tile_512::<11, $p>(kc, a, b, at, store),
                10 => tile_512::<10, $p>(kc, a, b, at, store),
                9 => tile_512::<9, $p>(kc, a, b, at, store),
                8 => tile_512::<8, $p>(kc, a, b, at, store),
                7 => tile_512::<7, $p>(kc, a, b, at, store),
                6 => tile_512::<6, $p>(kc, a, b, at, store),
                5 => tile_512::<5, $p>(kc, a, b, at, store),
                4 => tile_512::<4, $p>(kc, a, b, at, store),
                3 => tile_512::<3, $p>(kc, a, b, at, store),
                2 => tile_512::<2, $p>(kc, a, b, at, store),
                _ => tile_512::<1, $p>(kc, a, b, at, store),
            }
        };
    }
    match kernel {
        Kernel::Avx2 => {
            match rows.min(MR) {
                6 => tile::<6>(kc, a, b, at, store),
                5 => tile::<5>(kc, a, b, at, store),
                4 => tile::<4>(kc, a, b, at, store),
                3 => tile::<3>(kc, a, b, at, store),
                2 => tile::<2>(kc, a, b, at, store),
                _ => tile::<1>(kc, a, b, at, store),
            }
            rows.min(MR)
        }
        Kernel::Avx512 => {
            if at.2 > NR {
                rows_512!(2)
            } else {
                rows_512!(1)
            }
            rows.min(MR_512)
        }
    }
}

/// How a tile's sums reach the output.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Store {
    /// The first `k` block: the output is written, not added to.
    first: bool,
    /// Lines of the panels the next pass reads, to fetch into L2 while this tile runs, one per 4
    /// values of `k` (the first line's address, and how many; see [`walk_k`]).
    ahead: (*const f32, usize),
    /// The last `k` block: the whole sum is then scaled.
    last: bool,
    scale: f32,
}

/// The walk over a block's `kc` values of `k` that both kernels' tiles take: four at a time, the
/// next four lines of each of `panels` panels (`stride` values apart, from `b`) prefetched into
/// L1 and a line of `ahead` ([`Store::ahead`]) into L2, then the rest one by one; `$step!(o)`
/// multiplies at `k = p + o` and `b` follows `k`.
#[cfg(target_arch = "x86_64")]
macro_rules! walk_k {
    ($kc:expr, $b:ident, $p:ident, $panels:expr, $stride:expr, $step:ident, $ahead:expr) => {
        let (mut ahead, mut left) = $ahead;
        while $p + 4 <= $kc {
            // Past a panel's end: a hint, never a fault.
            for q in 0..$panels {
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>($b.wrapping_add(q * $stride + 4 * NR + line * NR) as *const i8);
                }
            }
            if left > 0 {
                _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
                ahead = ahead.add(NR);
                left -= 1;
            }
            $step!(0);
            $step!(1);
            $step!(2);
            $step!(3);
            $b = $b.add(4 * NR);
            $p += 4;
        }
        while $p < $kc {
            $step!(0);
            $b = $b.add(NR);
            $p += 1;
        }
    };
}

/// One `R x 16` tile over `kc` values of `k`: `a` its first row's values (rows `lda` apart), `b`
/// the panel's block (16 values a `k`), into `c` (rows `ldc` apart; `w` columns of the 16 kept).
///
/// # Safety
/// As [`Packed::product`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    kc: usize,
    (a, lda): (*const f32, usize),
    b: *const f32,
    (c, ldc, w): (*mut f32, usize, usize),
    store: Store,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut b = b;
    let mut p = 0;
    macro_rules! step {
        ($o:expr) => {{
            // Aligned: each row of a panel is a cache line.
            let b0 = _mm256_load_ps(b.add($o * NR));
            let b1 = _mm256_load_ps(b.add($o * NR + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * lda + p + $o));
                acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
            }
        }};
    }
    walk_k!(kc, b, p, 1, 0, step, store.ahead);
    let factor = _mm256_set1_ps(store.scale);
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        let mut sums = [0f32; NR];
        for (h, &sum) in acc.iter().enumerate() {
            let mut v = sum;
            if !store.first {
                let old = if w == NR {
                    _mm256_loadu_ps(row.add(8 * h))
                } else {
                    let mut old = [0f32; 8];
                    for (q, o) in old.iter_mut().enumerate().take(w.saturating_sub(8 * h)) {
                        *o = *row.add(8 * h + q);
                    }
                    _mm256_loadu_ps(old.as_ptr())
                };
                v = _mm256_add_ps(old, v);
            }
            if store.last && store.scale != 1.0 {
                v = _mm256_mul_ps(v, factor);
            }
            if w == NR {
                _mm256_storeu_ps(row.add(8 * h), v);
            } else {
                _mm256_storeu_ps(sums.as_mut_ptr().add(8 * h), v);
            }
        }
        if w < NR {
            std::ptr::copy_nonoverlapping(sums.as_ptr(), row, w);
        }
    }
}

/// One `R x 16 P` tile on AVX-512 over `kc` values of `k`: `P` panels (`b` the first one's
/// block, the next `kc` lines on), as [`tile`] otherwise; partial widths by masked loads and
/// stores.
///
/// # Safety
/// As [`Packed::product`], on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_512<const R: usize, const P: usize>(
    kc: usize,
    (a, lda): (*const f32, usize),
    b: *const f32,
    (c, ldc, w): (*mut f32, usize, usize),
    store: Store,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let panel = kc * NR;
    let mut b = b;
    let mut p = 0;
    macro_rules! step {
        ($o:expr) => {{
            // Aligned: each row of a panel is a cache line.
            let mut bv = [_mm512_setzero_ps(); P];
            for (q, v) in bv.iter_mut().enumerate() {
                *v = _mm512_load_ps(b.add(q * panel + $o * NR));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r * lda + p + $o));
                for (acc, &v) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(x, v, *acc);
                }
            }
        }};
    }
    walk_k!(kc, b, p, P, panel, step, store.ahead);
    let factor = _mm512_set1_ps(store.scale);
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        for (q, &sum) in acc.iter().enumerate() {
            let kept = w.saturating_sub(q * NR).min(NR);
            let mask: __mmask16 = if kept == NR { !0 } else { (1u16 << kept) - 1 };
            let at = row.add(q * NR);
            let mut v = sum;
            if !store.first {
                v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), v);
            }
            if store.last && store.scale != 1.0 {
                v = _mm512_mul_ps(v, factor);
            }
            _mm512_mask_storeu_ps(at, mask, v);
        }
    }
}

/// The packed form of `op` (reading constant `b` as its second operand), if the kernel runs it:
/// one product whose first operand's rows and output's rows are contiguous, the same weight for
/// every outer index.
fn packable(op: &GemmMatMul, b: &Tensor) -> bool {
    op.packed.is_none()
        && op.k > 0
        && op.a.col == 1
        && op.c.col == 1
        && op.loops.iter().all(|l| l.b == 0)
        && b.datum_type() == f32::datum_type()
        && b.len() == op.b_len
        && b.try_as_plain_ram().is_ok()
}

/// Gives every [`GemmMatMul`] of `model` whose second operand is a constant the kernel runs a
/// packed copy of it, in place of the constant input, when this CPU runs the kernel ([`available`]);
/// returns how many. A weight read by several products is packed once, and the graph is compacted
/// after each weight so that its plain copy is dropped before the next is packed.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    let mut count = 0;
    loop {
        let found: Vec<(usize, GemmMatMul, Arc<Tensor>)> = model
            .nodes()
            .iter()
            .filter_map(|node| {
                let op = node.op_as::<GemmMatMul>()?;
                let b = model.outlet_fact(*node.inputs.get(1)?).ok()?.konst.clone()?;
                packable(op, &b).then(|| (node.id, op.clone(), b))
            })
            .collect();
        let Some(first) = found.first() else { break };
        let at = Arc::as_ptr(&first.2);
        let mut packed: Vec<(crate::gemm_matmul::Strides, usize, usize, Arc<Packed>)> = vec![];
        let mut subs = crate::Substitutions::default();
        for (id, op, b) in found.iter().filter(|f| Arc::as_ptr(&f.2) == at) {
            let key = (op.b, op.k, op.n);
            let shared = match packed.iter().find(|p| (p.0, p.1, p.2) == key) {
                Some(p) => p.3.clone(),
                None => {
                    let w = b.try_as_plain_ram()?.as_slice::<f32>()?;
                    let p = Arc::new(Packed::from_strided(op.k, op.n, k_block(op.k), w, (op.b.row, op.b.col)));
                    packed.push((op.b, op.k, op.n, p.clone()));
                    p
                }
            };
            let node = model.node(*id);
            let inputs: Vec<OutletId> =
                node.inputs.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, o)| *o).collect();
            let name = format!("{}.packed", node.name);
            let op = GemmMatMul { packed: Some(shared), ..op.clone() };
            subs.substitute(model, OutletId::new(*id, 0), name, op, &inputs)?;
            count += 1;
        }
        drop(found);
        model.compact()?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `A W` in f64, `A` `m x k` rows `lda` apart, `W` `k x n`.
    #[cfg(target_arch = "x86_64")]
    fn reference(a: &[f32], lda: usize, w: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * lda + p] as f64 * w[p * n + j] as f64;
                }
            }
        }
        c
    }

    /// The kernel on `m x k x n` (every tile shape, `k` over several blocks, partial panels),
    /// columns `cols` only, against the definition.
    #[cfg(target_arch = "x86_64")]
    fn check((m, k, n): (usize, usize, usize), cols: std::ops::Range<usize>, scale: f32) {
        for kernel in kernels() {
            check_on(kernel, (m, k, n), cols.clone(), scale);
        }
    }

    /// [`check`] on one kernel.
    #[cfg(target_arch = "x86_64")]
    fn check_on(kernel: Kernel, (m, k, n): (usize, usize, usize), cols: std::ops::Range<usize>, scale: f32) {
        let lda = k + 3;
        let a: Vec<f32> = (0..m * lda).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0).collect();
        // The blocks of `k` of every CPU, whichever this one packs in.
        let mut blocks = vec![KC, equal_blocks(k, KC_LARGE)];
        blocks.dedup();
        for block in blocks {
            check_packed(kernel, (m, k, n), block, cols.clone(), scale, (&a, lda), &w);
        }
    }

    /// [`check_on`] for a weight packed in blocks of `block` values of `k`.
    #[cfg(target_arch = "x86_64")]
    fn check_packed(
        kernel: Kernel,
        (m, k, n): (usize, usize, usize),
        block: usize,
        cols: std::ops::Range<usize>,
        scale: f32,
        (a, lda): (&[f32], usize),
        w: &[f32],
    ) {
        let packed = Packed::new(k, n, block, |row, col| w[row * n + col]);
        let ldc = n + 5;
        let mut c = vec![f32::NAN; m * ldc];
        unsafe { packed.blocks(kernel, (a.as_ptr(), lda), (c.as_mut_ptr(), ldc), m, cols.clone(), scale, false, true) };
        let want = reference(a, lda, w, (m, k, n));
        // Added to what the output holds: twice the (scaled) product, in the columns given.
        let mut twice = c.clone();
        if scale == 1.0 {
            unsafe {
                packed.blocks(kernel, (a.as_ptr(), lda), (twice.as_mut_ptr(), ldc), m, cols.clone(), 1.0, true, true)
            };
        }
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if cols.contains(&j) {
                    let want = want[i * n + j] * scale as f64;
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{kernel:?} {m}x{k}x{n} in blocks of {block} [{i}, {j}]: {got} vs {want}"
                    );
                    if scale == 1.0 {
                        let got = twice[i * ldc + j] as f64;
                        assert!(
                            (got - 2.0 * want).abs() <= 2e-5 * (1.0 + want.abs()),
                            "{kernel:?} {m}x{k}x{n} [{i}, {j}] added: {got} vs {}",
                            2.0 * want
                        );
                    }
                } else {
                    assert!(got.is_nan(), "{kernel:?} {m}x{k}x{n} [{i}, {j}] written outside columns {cols:?}");
                    assert!(
                        twice[i * ldc + j].is_nan(),
                        "{kernel:?} {m}x{k}x{n} [{i}, {j}] added outside columns {cols:?}"
                    );
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn matches_the_definition() {
        check((1, 1, 1), 0..1, 1.0);
        check((7, 5, 17), 0..17, 1.0);
        check((13, 300, 40), 0..40, 1.0); // two k blocks, a partial panel
        check((400, 70, 150), 0..150, 1.0); // two row blocks (16 rows in the second), two column passes
        check((389, 600, 20), 0..20, 1.0); // three k blocks per row block, the last tile of 5 rows
        check((6, 513, 32), 16..32, 0.125); // three k blocks, scaled, from a later panel
        check((11, 9, 150), 128..150, -2.0); // the last partial pass only
        check((5, 4, 16), 0..16, 1.0);
        check((25, 260, 150), 16..150, 1.0); // 12-row tiles and 13 rows left, odd pairs of panels
        check((12, 8, 40), 0..40, 0.5); // a pair of panels, then one partial panel
        check((400, 1021, 40), 0..40, 1.0); // rows 1 024 values apart: read from a copy (AVX-512)
        check((30, 1300, 40), 0..40, 1.0); // three blocks of 448 where a core's L2 is large
    }

    #[test]
    fn blocks_of_k_are_equal_multiples_of_16() {
        let cases = [(1280, 640), (1024, 512), (768, 384), (256, 256), (322, 336), (1, 16), (2048, 512), (641, 336)];
        for (k, want) in cases {
            assert_eq!(equal_blocks(k, KC_LARGE), want, "k = {k}");
        }
        // Zen 3, Zen 4, Emerald Rapids (and no leaf reported).
        for (l2, k, want) in [(512, 1280, 256), (1024, 1280, 256), (2048, 1280, 640), (2048, 1024, 512), (0, 768, 256)]
        {
            assert_eq!(block_for(k, l2), want, "k = {k}, {l2} KiB of L2");
        }
        // In blocks of 448: block 1 starts at row 448 of panel 0, after both panels of block 0.
        let p = Packed::new(1300, 20, 448, |row, col| (row * 100 + col) as f32);
        assert_eq!(p.values()[2 * 448 * 16], 44800.0, "block 1, panel 0, row 448");
        assert_eq!(p.values()[2 * 2 * 448 * 16 + 16], 89700.0, "block 2, panel 0, row 897");
    }

    /// The lines [`Packed::next_pass`] names hold the next pass's weights: the first, the weight
    /// at its first row and column; the last, at its last row and last panel's first column.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_next_pass_is_read_ahead() {
        // Where: Zen 3, Zen 4, Emerald Rapids in its blocks of 640 (and no leaf).
        for (kc, l2, want) in
            [(256, 512, false), (256, 1024, true), (640, 2048, true), (640, 1024, false), (256, 0, false)]
        {
            assert_eq!(ahead_fits(kc, l2), want, "blocks of {kc}, {l2} KiB of L2");
        }
        // 19 panels, `k` in blocks of 448, 448 and 404.
        let p = Packed::new(1300, 300, 448, |row, col| (row * 1000 + col) as f32);
        let line = |i: usize| p.values()[i * NR];
        let cases = [
            // (pc, jc, cols, more rows) -> the next pass's first row and column, last row and
            // last panel's column, lines.
            ((0, 0, 0..300, false), Some(((0, 128), (447, 240), 8 * 448))),
            ((0, 256, 0..300, false), Some(((448, 0), (895, 112), 8 * 448))),
            ((448, 128, 0..300, false), Some(((448, 256), (895, 288), 3 * 448))),
            ((448, 256, 0..300, false), Some(((896, 0), (1299, 112), 8 * 404))),
            ((448, 144, 16..300, false), Some(((448, 272), (895, 288), 2 * 448))),
            ((896, 256, 0..300, true), Some(((0, 0), (447, 112), 8 * 448))),
            ((896, 256, 0..300, false), None),
        ];
        for ((pc, jc, cols, more_rows), want) in cases {
            let got = p.next_pass(pc, jc, &cols, more_rows);
            assert_eq!(got.is_some(), want.is_some(), "after ({pc}, {jc})");
            if let (Some((first, lines)), Some(((r0, c0), (r1, c1), n))) = (got, want) {
                assert_eq!(lines, n, "lines after ({pc}, {jc})");
                assert!(first + lines <= p.data.len(), "within the weight after ({pc}, {jc})");
                assert_eq!(line(first), (r0 * 1000 + c0) as f32, "first line after ({pc}, {jc})");
                assert_eq!(line(first + lines - 1), (r1 * 1000 + c1) as f32, "last line after ({pc}, {jc})");
            }
        }
    }

    /// Products reading the next pass's panels ahead are bit for bit those without, on shapes
    /// of several passes, `k` blocks and row blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reading_ahead_changes_no_result() {
        let run = |kernel: Kernel, (m, k, n): (usize, usize, usize), ahead: bool| -> Vec<f32> {
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 7) % 23) as f32 / 11.0 - 1.0).collect();
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 29) as f32 / 14.0 - 1.0).collect();
            let p = Packed::new(k, n, KC, |r, c| w[r * n + c]);
            let mut c = vec![f32::NAN; m * n];
            unsafe { p.blocks(kernel, (a.as_ptr(), k), (c.as_mut_ptr(), n), m, 16..n, 1.0, false, ahead) };
            c
        };
        for kernel in kernels() {
            for shape in [(400, 1300, 300), (25, 900, 150), (13, 40, 20)] {
                let (on, off) = (run(kernel, shape, true), run(kernel, shape, false));
                assert!(on.iter().zip(&off).all(|(x, y)| x.to_bits() == y.to_bits()), "{kernel:?} {shape:?}");
                assert!(
                    on[..16].iter().all(|x| x.is_nan()) && !on[16].is_nan(),
                    "{kernel:?} {shape:?}: columns 16.. only"
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn refill_panels_packs_as_new() {
        let mut p = Packed::empty();
        for (k, n) in [(256, 40), (100, 20), (5, 3)] {
            let w = |row: usize, col: usize| (row * 1000 + col) as f32 + 0.5;
            p.refill_panels((k, n), |j, lines| {
                for (row, line) in lines.iter_mut().enumerate() {
                    for (q, v) in line.iter_mut().enumerate() {
                        *v = if j * 16 + q < n { w(row, j * 16 + q) } else { 0.0 };
                    }
                }
            });
            assert!(p == Packed::new(k, n, KC, w), "{k} x {n}");
        }
    }

    /// [`Packed::refill`] over several blocks of `k` (the last partial) packs as [`Packed::new`],
    /// into a buffer that held a larger weight before.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn refill_packs_blocks_as_new() {
        let mut p = Packed::empty();
        for (k, n) in [(700, 50), (600, 40), (256, 16), (3, 1)] {
            let w = |row: usize, col: usize| (row * 1000 + col) as f32 + 0.5;
            p.refill((k, n), |p0, j, lines| {
                assert!(lines.len() <= KC && p0.is_multiple_of(KC));
                for (row, line) in lines.iter_mut().enumerate() {
                    for (q, v) in line.iter_mut().enumerate() {
                        *v = if j * 16 + q < n { w(p0 + row, j * 16 + q) } else { 0.0 };
                    }
                }
            });
            assert!(p == Packed::new(k, n, KC, w), "{k} x {n}");
        }
    }

    /// [`Packed::from_strided`] against [`Packed::new`] on the same values: row-major (by
    /// slices, padded rows, partial panels, several blocks of `k`) and column-major.
    #[test]
    fn from_strided_packs_as_new() {
        for (k, n, sk) in [(1, 1, 1), (300, 20, 20), (700, 50, 53), (256, 16, 16), (5, 33, 40)] {
            let w: Vec<f32> = (0..k * sk).map(|i| i as f32 * 0.25 - 7.0).collect();
            for block in [KC, equal_blocks(k, KC_LARGE)] {
                let want = Packed::new(k, n, block, |row, col| w[row * sk + col]);
                let got = Packed::from_strided(k, n, block, &w, (sk as isize, 1));
                assert!(got == want, "{k} x {n}, rows {sk} apart, blocks of {block}");
                let t: Vec<f32> = (0..n * k).map(|i| w[(i % k) * sk + i / k]).collect();
                let got = Packed::from_strided(k, n, block, &t, (1, k as isize));
                assert!(got == want, "{k} x {n} column-major, blocks of {block}");
            }
        }
    }

    #[test]
    fn packs_by_blocks_of_k_and_panels() {
        // k = 300: block 0 holds rows 0..256 of each panel, block 1 rows 256..300.
        let p = Packed::new(300, 20, KC, |row, col| (row * 100 + col) as f32);
        assert_eq!(p.values().len(), 2 * 16 * 300);
        assert_eq!(p.values().as_ptr() as usize % 64, 0, "panel rows on cache lines");
        assert_eq!(p.values()[16], 100.0, "block 0, panel 0, row 1, column 0");
        assert_eq!(p.values()[256 * 16 + 3], 3.0 + 16.0, "block 0, panel 1, row 0, column 19");
        assert_eq!(p.values()[256 * 16 + 4], 0.0, "padding past n");
        assert_eq!(p.values()[2 * 256 * 16], 25600.0, "block 1, panel 0, row 256");
    }
}
