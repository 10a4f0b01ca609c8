//! int8 products in one op: a rewrite of the decluttered graph, before tract's code generation,
//! taken where the CPU has Intel AMX-INT8 tiles (and Linux grants their state), AVX-512 VNNI
//! (AMD Zen 4 and 5, Intel Ice Lake to Emerald Rapids), or AVX2 and no VNNI (AMD Zen 1 to 3, Intel
//! before Ice Lake), where tract's kernel is `avx2_mmm_i32_8x8`. Elsewhere (AVX-VNNI without
//! AVX-512, ARM) tract's own kernels run.
//!
//! An int8 export computes each Linear as `DynamicQuantizeLinear` (u8 activations, a scale and a
//! zero point) -> `MatMulInteger` (by per-column int8 weights) -> `Cast` to f32 -> `Mul` by the
//! activation scale times the weight's column scales. tract 0.23.9 copies the activations to
//! signed bytes, packs them, runs its kernel and then the cast and the multiplication as two more
//! passes. On a 2-core Xeon with AMX its kernel `avx512amx_mmm_i32_16x16` loads two tiles a tile
//! product (language-perceiver int8 1.2x onnxruntime's time on the same file); on AVX2 its
//! `avx2_mmm_i32_8x8` widens every byte and multiplies 16-bit values with `vpmullw`, about 64
//! multiply-adds in 40 instructions (on a 2-core AMD EPYC the int8 bench model took 1.4x
//! onnxruntime's time on the same file, 3.5x its own f32 graph's).
//!
//! [`Int8MatMul`] replaces the whole chain `MatMulInteger -> Cast -> Mul`. Weights are packed
//! once at load for the kernel the CPU has, and the output is computed in 32 x 32 blocks of exact
//! i32 sums:
//! - **AMX**: AMX B tiles (16 rows of 4 consecutive `k` for 16 columns); four accumulator tiles a
//!   block fed by two activation tiles (unsigned, read in place when they fill whole tiles, else
//!   from a zero-padded copy) and two weight tiles per 64 values of `k` (`tdpbusd`: u8 x i8).
//! - **AVX2**: per 16 columns and pair of `k`, the 16 x 2 weights interleaved by column; each
//!   block's activation rows widened once to 16 bits, then 6-row by 16-column tiles of `vpmaddwd`
//!   (a pair of u8 x i8 products summed in i32 per lane: exact, never saturating, where the
//!   `vpmaddubsw` onnxruntime uses on AVX2 can saturate) at 16 multiply-adds an instruction.
//! - **AVX2, 7-bit weights**: where every weight of a product is within -64..=63 (an export with
//!   `--reduce-range`, or onnxruntime's quantiser with `reduce_range`), per 16 columns and four
//!   `k` the weights as bytes, and tiles of `vpmaddubsw` (two byte products added in 16 bits: at
//!   most 255 x 64 x 2 = 32640, so never saturated), `vpmaddwd` by ones and `vpaddd` over the
//!   activations read in place: onnxruntime's instructions, exact here (a Zen 3 core, one thread:
//!   the tile in L1 97 GMAC/s against the 16-bit kernel's 71-80; vision-perceiver-fourier int8 with
//!   7-bit weights 3.40 -> 3.01 s a run).
//! - **AVX-512 VNNI**: the 7-bit layout (per 16 columns, four `k` a lane), any 8-bit weights, and
//!   8-row by 32-column tiles of `vpdpbusd` (four u8 x i8 products added into each i32 lane, never
//!   saturating: exact) over the activations read in place. tract 0.23.9 runs these products by
//!   copying the activations to signed bytes and packing them at every run (language-perceiver
//!   int8 on a 2-core AMD Zen 4: 1.23-1.39x onnxruntime's time on the same file before this
//!   kernel, 0.82x after; `docs/performance.md`).
//!
//! The zero point comes out as `zero point x column sum`, then each sum is converted to f32 and
//! multiplied by its column's factor: the same integers and the same single f32 rounding as
//! tract's three ops, so outputs are bit-identical to them. Threads take whole blocks of columns
//! (or of rows, for narrow products). On the tiles, products of fewer than 32 rows (a
//! classifier's single query) are padded to 32 rows: the tiles' spare work is cheap next to
//! reading the weight, which both paths do once. Loading is faster too: tract's code generation
//! of each int8 product (some 30 nodes) is gone.

use crate::epilogue::{Finish, Finishes, Rows, Step};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Values of `k` per tile product.
const TILE_K: usize = 64;

/// Below this many multiply-adds (a few microseconds on the tiles) a product stays on one
/// thread: handing it to the pool costs more (the digits model's int8 graph ran 0.21 ms on one
/// thread and 0.49 ms on two before this threshold, `tune --precisions profile`).
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 1 << 22;

/// Bytes of one tile (16 rows of 64 bytes).
const TILE_BYTES: usize = 1024;

/// Rows and columns of one output block (2 x 2 tiles of 16 x 16).
const BLOCK: usize = 32;

/// Columns of one AVX2 panel (two per block).
const PANEL: usize = 16;

/// Rows of one AVX2 tile (12 of the 16 ymm registers hold its sums).
#[cfg(target_arch = "x86_64")]
const TILE_ROWS: usize = 6;

/// Rows of one VNNI tile (16 of the 32 zmm registers hold its sums; four tiles a block).
#[cfg(target_arch = "x86_64")]
const VNNI_ROWS: usize = 8;

/// Which code computes a block's sums.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Kernel {
    /// AMX tiles (`tdpbusd`).
    Amx,
    /// AVX2 `vpmaddwd` on 16-bit widened values.
    Avx2,
    /// AVX2 for weights of 7 bits (-64..=63): `vpmaddubsw` on the bytes, exact there.
    Avx2Narrow,
    /// AVX-512 VNNI `vpdpbusd` on the bytes (the 7-bit layout, any weights).
    Vnni,
    /// AVX-VNNI `vpdpbusd` on 256-bit registers (the 7-bit layout and tiles, any weights): Intel
    /// CPUs with AVX-VNNI but no AVX-512 (Alder Lake and later client parts, Alder Lake-N).
    AvxVnni,
    /// Plain Rust over the tile layout: the reference the tests hold the others to.
    #[cfg_attr(not(test), allow(dead_code))]
    Plain,
}

impl Kernel {
    /// Its name in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX",
            Kernel::Avx2 => "AVX2",
            Kernel::Avx2Narrow => "AVX2, 7-bit weights",
            Kernel::Vnni => "AVX-512 VNNI",
            Kernel::AvxVnni => "AVX-VNNI",
            Kernel::Plain => "plain",
        }
    }
}

/// `C[.., n] = (A[.., k] - zero point) W[k, n] x factor[n]`: `A` u8, `W` int8, `C` f32.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Int8MatMul {
    /// The weight, packed once (shared by the products that read it).
    packed: Arc<Packed>,
    m: usize,
    k: usize,
    n: usize,
    shape: Vec<usize>,
    /// What is applied to each block of the output once computed (bias, residual, GELU),
    /// reading the inputs past the three of the product; see [`crate::epilogue`].
    epilogue: Vec<Step>,
}

/// A weight `W[k, n]` packed for one kernel.
#[derive(Debug, Hash, PartialEq, Eq)]
struct Packed {
    kernel: Kernel,
    /// AMX and plain: per block of 32 columns, per 64 values of `k`, two B tiles (columns 0..16
    /// and 16..32 of the block), each 16 rows of (4 `k` x 16 columns). AVX2: per panel of 16
    /// columns (two per block), per pair of `k`, two halves of 8 columns, each 8 x (2 `k`). AVX2
    /// for 7-bit weights and VNNI: the same per four values of `k`. Zero-padded.
    bytes: Vec<u8>,
    /// Column sums of `W` (for the zero point).
    col_sums: Vec<i32>,
}

/// Bytes of one block of 32 packed columns of a weight with `k` rows, for `kernel`.
fn block_bytes(kernel: Kernel, k: usize) -> usize {
    match kernel {
        // Two tiles per 64 values of `k`.
        Kernel::Amx | Kernel::Plain => k.div_ceil(TILE_K) * 2 * TILE_BYTES,
        // Two panels, each 2 x 16 bytes per pair of `k`.
        Kernel::Avx2 => 2 * k.div_ceil(2) * 2 * PANEL,
        // Two panels, each 4 x 16 bytes per four values of `k`.
        Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => 2 * k.div_ceil(4) * 4 * PANEL,
    }
}

/// Packs `w` (`w[row * sk + col * sn]` the weight at `row` of `k`, `col` of `n`) for `kernel`,
/// with its column sums.
///
/// Every layout is made of chunks of 16 columns by `g` consecutive rows (`g` 2 for
/// [`Kernel::Avx2`], else 4), column-major within (`g * column + row` in the chunk); the kernels
/// differ only in where each chunk goes ([`chunk_at`]). Filled a chunk at a time, each in one
/// piece (per value, the layout's index arithmetic took 0.40 s of language-perceiver int8's load).
fn pack(kernel: Kernel, k: usize, n: usize, w: &[i8], (sk, sn): (usize, usize)) -> Packed {
    match chunk_rows(kernel) {
        2 => pack_chunks::<2>(kernel, k, n, w, (sk, sn)),
        _ => pack_chunks::<4>(kernel, k, n, w, (sk, sn)),
    }
}

/// [`pack`] with chunks of `G` rows.
fn pack_chunks<const G: usize>(kernel: Kernel, k: usize, n: usize, w: &[i8], (sk, sn): (usize, usize)) -> Packed {
    let mut out = vec![0u8; n.div_ceil(BLOCK) * block_bytes(kernel, k)];
    let mut sums = vec![0i32; n];
    for panel in 0..n.div_ceil(PANEL) {
        let (first, cols) = (panel * PANEL, PANEL.min(n - panel * PANEL));
        let sums = &mut sums[first..first + cols];
        for group in 0..k.div_ceil(G) {
            let at = chunk_at(kernel, k, panel, group);
            let chunk = &mut out[at..at + PANEL * G];
            let row0 = group * G;
            for (i, row) in (row0..(row0 + G).min(k)).enumerate() {
                let src = &w[row * sk + first * sn..];
                for (c, sum) in sums.iter_mut().enumerate() {
                    let v = src[c * sn];
                    chunk[G * c + i] = v as u8;
                    *sum += v as i32;
                }
            }
        }
    }
    Packed { kernel, bytes: out, col_sums: sums }
}

/// Rows of `k` in one chunk of a packed weight (see [`pack`]).
fn chunk_rows(kernel: Kernel) -> usize {
    match kernel {
        Kernel::Avx2 => 2,
        Kernel::Amx | Kernel::Plain | Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => 4,
    }
}

/// Where the chunk of panel `panel` (columns `16 panel..`) and row group `group` (rows
/// `chunk_rows * group..`) starts in a weight of `k` rows packed for `kernel`.
fn chunk_at(kernel: Kernel, k: usize, panel: usize, group: usize) -> usize {
    match kernel {
        // Per block of 32 columns (two panels), per tile of 64 rows (16 groups): two tiles, the
        // panels', each 16 groups of 64 bytes.
        Kernel::Amx | Kernel::Plain => {
            let (pair, half) = (panel / 2, panel % 2);
            let (tile, r) = (group / (TILE_K / 4), group % (TILE_K / 4));
            ((pair * k.div_ceil(TILE_K) + tile) * 2 + half) * TILE_BYTES + r * 64
        }
        Kernel::Avx2 => (panel * k.div_ceil(2) + group) * 2 * PANEL,
        Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => (panel * k.div_ceil(4) + group) * 4 * PANEL,
    }
}

/// A 32 x 32 block of i32 sums, aligned for the tile stores.
#[repr(C, align(64))]
struct Sums([i32; BLOCK * BLOCK]);

/// The tile configuration: palette 1, tiles 0..8 each 16 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn new() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        TileConfig(c)
    }
}

/// Whether the CPU running this process has AMX-INT8 tiles the products can use.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        tract_linalg::x86_64::amx::has_amx_int8() && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel the products run on here: AMX tiles where the CPU has them, else AVX-512 VNNI, else
/// AVX-VNNI, else AVX2; none (tract's kernels) elsewhere.
pub(crate) fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if has_amx() {
            return Some(Kernel::Amx);
        }
        if has_avx512_vnni() {
            return Some(Kernel::Vnni);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("avxvnni") {
            return Some(Kernel::AvxVnni);
        }
        if std::is_x86_feature_detected!("avx2") && !std::is_x86_feature_detected!("avx512vnni") {
            return Some(Kernel::Avx2);
        }
    }
    None
}

/// The sums of one 32 x 32 block on AMX tiles: `a` 32 rows `lda` bytes apart, `b` the block's
/// packed weight tiles, `kb` tile products deep.
///
/// # Safety
/// AMX available and configured ([`TileConfig`]) on this thread; `a` readable for 32 rows of
/// `kb * 64` bytes, `b` for `kb * 2048` bytes; `kb > 0`.
#[cfg(target_arch = "x86_64")]
unsafe fn block_amx(a: *const u8, lda: usize, b: *const u8, kb: usize, c: &mut Sums) {
    let a1 = a.add(16 * lda);
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {lda} * 1]",
        "tileloadd tmm6, [{b} + {s64} * 1]",
        "tileloadd tmm7, [{b} + {s64} * 1 + 1024]",
        "tdpbusd tmm0, tmm4, tmm6",
        "tileloadd tmm5, [{a1} + {lda} * 1]",
        "tdpbusd tmm1, tmm4, tmm7",
        "tdpbusd tmm2, tmm5, tmm6",
        "tdpbusd tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b}, 2048",
        "dec {kb}",
        "jnz 2b",
        "tilestored [{c} + {s128} * 1], tmm0",
        "tilestored [{c} + {s128} * 1 + 64], tmm1",
        "tilestored [{c} + {s128} * 1 + 2048], tmm2",
        "tilestored [{c} + {s128} * 1 + 2112], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a1 => _,
        b = inout(reg) b => _,
        kb = inout(reg) kb => _,
        lda = in(reg) lda,
        s64 = in(reg) 64usize,
        s128 = in(reg) 128usize,
        c = in(reg) c.0.as_mut_ptr(),
        options(nostack),
    );
}

/// The same sums as [`block_amx`] in plain Rust (the reference the tests hold the tiles to).
///
/// # Safety
/// As [`block_amx`], AMX aside.
unsafe fn block_plain(a: *const u8, lda: usize, b: *const u8, kb: usize, c: &mut Sums) {
    for row in 0..BLOCK {
        for col in 0..BLOCK {
            let (half, cc) = (col / 16, col % 16);
            let mut s = 0i32;
            for blk in 0..kb {
                let tile = b.add((blk * 2 + half) * TILE_BYTES);
                for r in 0..16 {
                    for i in 0..4 {
                        let x = *a.add(row * lda + blk * TILE_K + 4 * r + i) as i32;
                        s = s.wrapping_add(x * *tile.add(r * 64 + 4 * cc + i) as i8 as i32);
                    }
                }
            }
            c.0[row * BLOCK + col] = s;
        }
    }
}

/// One AVX2 tile: the sums of `R` rows of `a` (16-bit, `lda` apart, `2 kp` values each) by one
/// packed panel `b` (16 columns, `kp` pairs of `k`), stored to `out` (rows [`BLOCK`] apart).
///
/// # Safety
/// AVX2 available; `a` readable for `R` rows of `2 kp` values, `b` for `kp * 32` bytes, `out`
/// writable for `R` rows of 16.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<const R: usize>(a: *const i16, lda: usize, b: *const u8, kp: usize, out: *mut i32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    for p in 0..kp {
        let w = b.add(p * 2 * PANEL);
        // Columns 0..8 and 8..16, each lane a column's two weights, widened to 16 bits.
        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w as *const __m128i));
        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(PANEL) as *const __m128i));
        for (r, acc) in acc.iter_mut().enumerate() {
            // The row's two activations of this pair, in every lane.
            let x = _mm256_set1_epi32((a.add(r * lda + 2 * p) as *const i32).read_unaligned());
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x, w0));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x, w1));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm256_storeu_si256(out.add(r * BLOCK) as *mut __m256i, acc[0]);
        _mm256_storeu_si256(out.add(r * BLOCK + 8) as *mut __m256i, acc[1]);
    }
}

/// The sums of a block's first `rows` rows on AVX2: `a` those rows widened to 16 bits (`lda`
/// apart, `2 kp` values each, zero-padded), `b` the block's two packed panels.
///
/// # Safety
/// AVX2 available; `a` readable for `rows` rows of `2 kp` values, `b` for `2 * kp * 32` bytes;
/// `rows <= 32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_avx2(a: *const i16, lda: usize, rows: usize, b: *const u8, kp: usize, c: &mut Sums) {
    for half in 0..2 {
        let b = b.add(half * kp * 2 * PANEL);
        let mut r = 0;
        while r < rows {
            let (a, out) = (a.add(r * lda), c.0.as_mut_ptr().add(r * BLOCK + half * PANEL));
            match rows - r {
                1 => tile_avx2::<1>(a, lda, b, kp, out),
                2 => tile_avx2::<2>(a, lda, b, kp, out),
                3 => tile_avx2::<3>(a, lda, b, kp, out),
                4 => tile_avx2::<4>(a, lda, b, kp, out),
                5 => tile_avx2::<5>(a, lda, b, kp, out),
                _ => tile_avx2::<TILE_ROWS>(a, lda, b, kp, out),
            }
            r += TILE_ROWS;
        }
    }
}

/// Tiles over the 7-bit layout (per 16 columns and four values of `k`, each 32-bit lane a column's
/// four weights): `$tile` computes the sums of `R` rows of `a` (bytes, `lda` apart, `4 kq` each) by
/// one packed panel `b` (16 columns, `kq` fours of `k`) into `out` (rows [`BLOCK`] apart), each
/// step adding a lane's four products with `$dot`; `$block` a block's first `rows` rows (at most
/// 32) by its two panels. Both compiled for `$features`.
///
/// # Safety (of the functions)
/// The target features available; `a` readable for `rows` rows of `4 kq` bytes, `b` for
/// `2 * kq * 64` bytes, weights as `$dot` requires.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles_by_fours {
    ($tile:ident, $block:ident, $features:literal, $dot:ident) => {
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const R: usize>(a: *const u8, lda: usize, b: *const u8, kq: usize, out: *mut i32) {
            use std::arch::x86_64::*;
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for q in 0..kq {
                let w = b.add(q * 4 * PANEL);
                // Columns 0..8 and 8..16, each lane a column's four weights.
                let w0 = _mm256_loadu_si256(w as *const __m256i);
                let w1 = _mm256_loadu_si256(w.add(2 * PANEL) as *const __m256i);
                for (r, acc) in acc.iter_mut().enumerate() {
                    // The row's four activations of this step, in every lane.
                    let x = _mm256_set1_epi32((a.add(r * lda + 4 * q) as *const i32).read_unaligned());
                    acc[0] = $dot(acc[0], x, w0);
                    acc[1] = $dot(acc[1], x, w1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm256_storeu_si256(out.add(r * BLOCK) as *mut __m256i, acc[0]);
                _mm256_storeu_si256(out.add(r * BLOCK + 8) as *mut __m256i, acc[1]);
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn $block(a: *const u8, lda: usize, rows: usize, b: *const u8, kq: usize, c: &mut Sums) {
            for half in 0..2 {
                let b = b.add(half * kq * 4 * PANEL);
                let mut r = 0;
                while r < rows {
                    let (a, out) = (a.add(r * lda), c.0.as_mut_ptr().add(r * BLOCK + half * PANEL));
                    match rows - r {
                        1 => $tile::<1>(a, lda, b, kq, out),
                        2 => $tile::<2>(a, lda, b, kq, out),
                        3 => $tile::<3>(a, lda, b, kq, out),
                        4 => $tile::<4>(a, lda, b, kq, out),
                        5 => $tile::<5>(a, lda, b, kq, out),
                        _ => $tile::<TILE_ROWS>(a, lda, b, kq, out),
                    }
                    r += TILE_ROWS;
                }
            }
        }
    };
}

/// `acc` plus each lane's four byte products, for weights of 7 bits: `vpmaddubsw` adds two byte
/// products in 16 bits with saturation; with activations at most 255 and weights within -64..=63
/// the pair is within -32640..=32130, never saturated; `vpmaddwd` by ones adds the pairs in 32.
///
/// # Safety
/// AVX2 available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_narrow(
    acc: std::arch::x86_64::__m256i,
    x: std::arch::x86_64::__m256i,
    w: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)))
}

// AVX2 for 7-bit weights ([`Kernel::Avx2Narrow`]); AVX-VNNI's `vpdpbusd` (four u8 x i8 products
// into each i32 lane, no saturation: exact for any weights) in its VEX form ([`Kernel::AvxVnni`]),
// and in the EVEX form of the same instruction (AVX-512 VNNI with VL), which runs it on AVX-512
// CPUs without AVX-VNNI (the tests there).
#[cfg(target_arch = "x86_64")]
tiles_by_fours!(tile_narrow, block_narrow, "avx2", dot_narrow);
#[cfg(target_arch = "x86_64")]
tiles_by_fours!(tile_avx_vnni, block_avx_vnni, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
#[cfg(target_arch = "x86_64")]
tiles_by_fours!(tile_avx_vnni_evex, block_avx_vnni_evex, "avx2,avx512vnni,avx512vl", _mm256_dpbusd_epi32);

/// Whether the CPU has the AVX-512 instructions [`Kernel::Vnni`] uses.
#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni")
}

/// One VNNI tile: the sums of `R` rows of `a` (bytes, `lda` apart, `4 kq` each) by two packed
/// panels `b0` and `b1` (16 columns each, `kq` fours of `k`), stored to `out` (rows [`BLOCK`]
/// apart, 32 columns). `vpdpbusd` adds four u8 x i8 products into each i32 lane without
/// saturating, so the sums are exact for any weights.
///
/// # Safety
/// AVX-512F and AVX-512 VNNI available; `a` readable for `R` rows of `4 kq` bytes, `b0` and `b1`
/// for `kq * 64` bytes each, `out` writable for `R` rows of 32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<const R: usize>(a: *const u8, lda: usize, b0: *const u8, b1: *const u8, kq: usize, out: *mut i32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    for q in 0..kq {
        // Lane `j` of each: column `j`'s four weights of this step.
        let w0 = _mm512_loadu_si512(b0.add(q * 4 * PANEL) as *const _);
        let w1 = _mm512_loadu_si512(b1.add(q * 4 * PANEL) as *const _);
        for (r, acc) in acc.iter_mut().enumerate() {
            // The row's four activations of this step, in every lane.
            let x = _mm512_set1_epi32((a.add(r * lda + 4 * q) as *const i32).read_unaligned());
            acc[0] = _mm512_dpbusd_epi32(acc[0], x, w0);
            acc[1] = _mm512_dpbusd_epi32(acc[1], x, w1);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_si512(out.add(r * BLOCK) as *mut _, acc[0]);
        _mm512_storeu_si512(out.add(r * BLOCK + PANEL) as *mut _, acc[1]);
    }
}

/// The sums of a block's first `rows` rows on VNNI: `a` those rows (`lda` apart, `4 kq` bytes
/// each), `b` the block's two packed panels.
///
/// # Safety
/// As [`tile_vnni`], for `rows <= 32` rows and `b` readable for `2 * kq * 64` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn block_vnni(a: *const u8, lda: usize, rows: usize, b: *const u8, kq: usize, c: &mut Sums) {
    let b1 = b.add(kq * 4 * PANEL);
    let mut r = 0;
    while r < rows {
        let (a, out) = (a.add(r * lda), c.0.as_mut_ptr().add(r * BLOCK));
        match rows - r {
            1 => tile_vnni::<1>(a, lda, b, b1, kq, out),
            2 => tile_vnni::<2>(a, lda, b, b1, kq, out),
            3 => tile_vnni::<3>(a, lda, b, b1, kq, out),
            4 => tile_vnni::<4>(a, lda, b, b1, kq, out),
            5 => tile_vnni::<5>(a, lda, b, b1, kq, out),
            6 => tile_vnni::<6>(a, lda, b, b1, kq, out),
            7 => tile_vnni::<7>(a, lda, b, b1, kq, out),
            _ => tile_vnni::<VNNI_ROWS>(a, lda, b, b1, kq, out),
        }
        r += VNNI_ROWS;
    }
}

/// Whether [`Kernel::AvxVnni`]'s instruction runs here, in one of its two forms.
#[cfg(all(test, target_arch = "x86_64"))]
fn runs_avx_vnni() -> bool {
    std::is_x86_feature_detected!("avx2")
        && (std::is_x86_feature_detected!("avxvnni")
            || (std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl")))
}

/// Whether every weight has 7 bits (-64..=63), so that [`Kernel::Avx2Narrow`] is exact for it
/// (as onnxruntime's quantiser writes them with `reduce_range`).
fn seven_bits(w: &[i8]) -> bool {
    w.iter().all(|&v| (-64..=63).contains(&v))
}

/// Widens `rows` rows of `a` (`k` bytes each, `lda` apart) to 16 bits into `out` (rows
/// `k.div_ceil(2) * 2` apart, the odd `k`'s last value 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen(a: *const u8, lda: usize, rows: usize, k: usize, out: &mut [i16]) {
    let wide = k.div_ceil(2) * 2;
    for (r, dst) in out.chunks_exact_mut(wide).take(rows).enumerate() {
        let src = std::slice::from_raw_parts(a.add(r * lda), k);
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as i16;
        }
        dst[k..].fill(0);
    }
}

/// Writes `rows` rows of a block's sums, each less its column's `bias` and times its `factor`,
/// to `c` (rows `ldc` apart); as many columns as `bias` has.
///
/// # Safety
/// `c` writable for `rows` rows of `bias.len()` values `ldc` apart; `factor` as long as `bias`.
#[inline(always)]
unsafe fn finish(sums: &Sums, rows: usize, c: *mut f32, ldc: usize, bias: &[i32], factor: &[f32]) {
    let w = bias.len();
    for r in 0..rows {
        let dst = std::slice::from_raw_parts_mut(c.add(r * ldc), w);
        let src = &sums.0[r * BLOCK..r * BLOCK + w];
        for (((d, &s), &b), &f) in dst.iter_mut().zip(src).zip(bias).zip(&factor[..w]) {
            *d = s.wrapping_sub(b) as f32 * f;
        }
    }
}

/// [`finish`] compiled for AVX-512 (every CPU with AMX or [`Kernel::Vnni`] has it).
///
/// # Safety
/// As [`finish`]; AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn finish_avx512(sums: &Sums, rows: usize, c: *mut f32, ldc: usize, bias: &[i32], factor: &[f32]) {
    finish(sums, rows, c, ldc, bias, factor)
}

/// [`finish`] compiled for AVX2.
///
/// # Safety
/// As [`finish`]; AVX2 available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn finish_avx2(sums: &Sums, rows: usize, c: *mut f32, ldc: usize, bias: &[i32], factor: &[f32]) {
    finish(sums, rows, c, ldc, bias, factor)
}

/// [`finish`], compiled for the instructions `kernel` implies.
///
/// # Safety
/// As [`finish`]; `kernel` runs here.
unsafe fn finish_with(kernel: Kernel, sums: &Sums, rows: usize, c: *mut f32, ldc: usize, bias: &[i32], factor: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        Kernel::Amx | Kernel::Vnni => return finish_avx512(sums, rows, c, ldc, bias, factor),
        Kernel::Avx2 | Kernel::Avx2Narrow | Kernel::AvxVnni => return finish_avx2(sums, rows, c, ldc, bias, factor),
        Kernel::Plain => {}
    }
    let _ = kernel;
    finish(sums, rows, c, ldc, bias, factor)
}

/// Raw pointers of one run's buffers, shared by its tasks.
#[derive(Clone, Copy)]
struct Bufs {
    a: usize,
    lda: usize,
    c: usize,
}

impl Int8MatMul {
    /// Bytes of the packed weight.
    pub(crate) fn weight_bytes(&self) -> usize {
        self.packed.bytes.len()
    }

    /// The kernel its weight is packed for.
    pub(crate) fn kernel_name(&self) -> &'static str {
        self.packed.kernel.name()
    }

    /// Where the packed weight lives (shared by the products that read it: counted once).
    pub(crate) fn weight_at(&self) -> usize {
        Arc::as_ptr(&self.packed) as usize
    }

    /// Computes output rows `blocks` (blocks of 32) by column blocks `pairs` (of 32) into `bufs.c`:
    /// the sums less each column's `bias`, times its `factor`, then the `finish` steps over the part.
    ///
    /// # Safety
    /// `bufs` valid for the op's shapes (on the tiles and the plain loops, `a` padded to whole
    /// blocks of rows and of 64 `k`); the packed kernel runs here.
    unsafe fn task(
        &self,
        bufs: Bufs,
        blocks: std::ops::Range<usize>,
        pairs: std::ops::Range<usize>,
        (bias, factor): (&[i32], &[f32]),
        finish: &Finish,
    ) {
        let kernel = self.packed.kernel;
        // The packed weight of column block `pair`.
        let weight = |pair: usize| self.packed.bytes.as_ptr().add(pair * block_bytes(kernel, self.k));
        let mut sums = Sums([0; BLOCK * BLOCK]);
        let (a, c) = (bufs.a as *const u8, bufs.c as *mut f32);
        let write = |sums: &Sums, block: usize, pair: usize| {
            let cols = pair * BLOCK..((pair + 1) * BLOCK).min(self.n);
            let rows = BLOCK.min(self.m - block * BLOCK);
            let at = c.add(block * BLOCK * self.n + cols.start);
            finish_with(kernel, sums, rows, at, self.n, &bias[cols.clone()], &factor[cols]);
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // Per block of rows, widened once, by every block of columns.
                let (kp, lda) = (self.k.div_ceil(2), self.k.div_ceil(2) * 2);
                let mut wide = vec![0i16; BLOCK * lda];
                for block in blocks.clone() {
                    let rows = BLOCK.min(self.m - block * BLOCK);
                    widen(a.add(block * BLOCK * bufs.lda), bufs.lda, rows, self.k, &mut wide);
                    for pair in pairs.clone() {
                        block_avx2(wide.as_ptr(), lda, rows, weight(pair), kp, &mut sums);
                        write(&sums, block, pair);
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => {
                // The bytes read in place (or from the zero-padded copy to whole fours of `k`).
                let kq = self.k.div_ceil(4);
                let block_sums = match kernel {
                    Kernel::Vnni => block_vnni,
                    Kernel::AvxVnni if std::is_x86_feature_detected!("avxvnni") => block_avx_vnni,
                    Kernel::AvxVnni => block_avx_vnni_evex,
                    _ => block_narrow,
                };
                for block in blocks.clone() {
                    let rows = BLOCK.min(self.m - block * BLOCK);
                    let a = a.add(block * BLOCK * bufs.lda);
                    for pair in pairs.clone() {
                        block_sums(a, bufs.lda, rows, weight(pair), kq, &mut sums);
                        write(&sums, block, pair);
                    }
                }
            }
            _ => {
                let kb = self.k.div_ceil(TILE_K);
                #[cfg(target_arch = "x86_64")]
                if kernel == Kernel::Amx {
                    let cfg = TileConfig::new();
                    std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
                }
                for pair in pairs.clone() {
                    let b = weight(pair);
                    for block in blocks.clone() {
                        let a = a.add(block * BLOCK * bufs.lda);
                        #[cfg(target_arch = "x86_64")]
                        if kernel == Kernel::Amx {
                            block_amx(a, bufs.lda, b, kb, &mut sums);
                            write(&sums, block, pair);
                            continue;
                        }
                        block_plain(a, bufs.lda, b, kb, &mut sums);
                        write(&sums, block, pair);
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if kernel == Kernel::Amx {
                    std::arch::asm!("tilerelease", options(nostack, nomem));
                }
            }
        }
        // The steps over the task's whole part, in rows as long as it has (per 32 x 32 block they
        // took longer than the product: vision-perceiver-conv int8, `bench --profile`).
        if !finish.steps.is_empty() && !blocks.is_empty() && !pairs.is_empty() {
            let rows = blocks.start * BLOCK..(blocks.end * BLOCK).min(self.m);
            finish.block(c, self.n, rows, pairs.start * BLOCK..(pairs.end * BLOCK).min(self.n));
        }
    }

    /// The product of `a` (`m x k` u8) into `c` on the packed kernel, split over tract's thread
    /// pool when it has more than one thread.
    fn run(&self, a: &[u8], zp: u8, factor: &[f32], c: &mut [f32], finish: &Finish) {
        let (blocks, pairs) = (self.m.div_ceil(BLOCK), self.n.div_ceil(BLOCK));
        // The tiles read whole blocks of rows and of 64 `k`: activations read in place when they
        // fill them, else from a zero-padded copy. AVX2 widens each block's rows as it goes.
        let lda = match self.packed.kernel {
            Kernel::Avx2 => self.k,
            Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => self.k.div_ceil(4) * 4,
            _ => self.k.div_ceil(TILE_K) * TILE_K,
        };
        let padded;
        let in_place = match self.packed.kernel {
            Kernel::Avx2 => true,
            Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => lda == self.k,
            _ => lda == self.k && self.m.is_multiple_of(BLOCK),
        };
        let a = if in_place {
            a
        } else {
            let mut p = vec![0u8; blocks * BLOCK * lda];
            for (row, src) in p.chunks_exact_mut(lda).zip(a.chunks_exact(self.k)) {
                row[..self.k].copy_from_slice(src);
            }
            padded = p;
            &padded
        };
        let bufs = Bufs { a: a.as_ptr() as usize, lda, c: c.as_mut_ptr() as usize };
        // The zero point's share of each column's sums.
        let bias: Vec<i32> = self.packed.col_sums.iter().map(|&s| (zp as i32).wrapping_mul(s)).collect();
        let bias = &bias[..];
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            let work = self.m.saturating_mul(self.k).saturating_mul(self.n);
            if let Some(pool) = crate::thread_pool().filter(|_| work >= PARALLEL_MIN) {
                let threads = pool.current_num_threads();
                let parts = 2 * threads;
                // Along the rows when each thread gets a block of them: the threads then keep
                // their own rows from op to op (see `GemmMatMul::blocks`).
                let by_cols = blocks < threads && (pairs >= parts || pairs >= blocks);
                let (side, per) =
                    if by_cols { (pairs, pairs.div_ceil(parts)) } else { (blocks, blocks.div_ceil(parts)) };
                if side > 1 {
                    let tasks: Vec<usize> = (0..side).step_by(per).collect();
                    // SAFETY: lengths checked by `eval`; tasks write disjoint output elements.
                    pool.install(|| {
                        tasks.into_par_iter().for_each(|s| {
                            let part = s..(s + per).min(side);
                            unsafe {
                                if by_cols {
                                    self.task(bufs, 0..blocks, part, (bias, factor), finish)
                                } else {
                                    self.task(bufs, part, 0..pairs, (bias, factor), finish)
                                }
                            }
                        })
                    });
                    return;
                }
            }
        }
        // SAFETY: lengths checked by `eval`.
        unsafe { self.task(bufs, 0..blocks, 0..pairs, (bias, factor), finish) };
    }

    /// Evaluates on the packed kernel.
    fn eval_inputs(&self, inputs: &[TValue]) -> TractResult<TVec<TValue>> {
        let a = inputs[0].try_as_plain_ram()?.as_slice::<u8>()?;
        let zp = inputs[1].try_as_plain_ram()?.as_slice::<u8>()?;
        let factor = inputs[2].try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(
            a.len() == self.m * self.k && zp.len() == 1 && factor.len() == self.n,
            "Int8MatMul: {} activations, {} zero points, {} factors; planned for {}, 1, {}",
            a.len(),
            zp.len(),
            factor.len(),
            self.m * self.k,
            self.n
        );
        let finish = Finish::new(&self.epilogue, &inputs[3..], self.m, self.n)?;
        let mut out = unsafe { Tensor::uninitialized_dt(f32::datum_type(), &self.shape)? };
        if self.m * self.n > 0 {
            self.run(a, zp[0], factor, out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, &finish);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl Op for Int8MatMul {
    fn name(&self) -> StaticName {
        if self.epilogue.is_empty() { "Int8MatMul" } else { "Int8MatMul+epilogue" }.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let then = if self.epilogue.is_empty() { String::new() } else { format!(", then {:?}", self.epilogue) };
        Ok(vec![format!("m {} k {} n {} on {}{then}", self.m, self.k, self.n, self.packed.kernel.name())])
    }

    op_as_typed_op!();
}

impl EvalOp for Int8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.eval_inputs(&inputs)
    }
}

impl Finishes for Int8MatMul {
    fn rows(&self) -> Option<Rows> {
        self.epilogue.is_empty().then(|| Rows { m: self.m, n: self.n, shape: self.shape.clone() })
    }

    fn finish_with(&mut self, steps: Vec<Step>, shape: Vec<usize>) {
        (self.epilogue, self.shape) = (steps, shape);
    }
}

impl TypedOp for Int8MatMul {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.shape)))
    }

    as_op!();
}

/// A chain `MatMulInteger -> Cast -> Mul` that [`Int8MatMul`] computes.
struct Found {
    /// The `Mul` node, whose output the op replaces.
    mul: usize,
    /// Activations, zero point, factors.
    inputs: [OutletId; 3],
    weight: Arc<Tensor>,
    /// Positions of `k` and of `n` in the weight.
    axes: (usize, usize),
    m: usize,
    k: usize,
    n: usize,
    shape: Vec<usize>,
}

/// The chain `MatMulInteger -> Cast -> Mul` starting at node `node` of `model`, if [`Int8MatMul`]
/// computes it.
fn candidate(model: &TypedModel, node: &TypedNode) -> Option<Found> {
    let op = node.op_as::<EinSum>()?;
    if op.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 {
        return None;
    }
    let fact = |o: OutletId| model.outlet_fact(o).ok();
    // Inputs: A, W, bias, A's zero point, A's scale, W's zero point, W's scale, C's zero point,
    // C's scale: all but A, W and A's zero point constants 0 or 1.
    let scalar = |i: usize, want: f32| {
        let k = fact(node.inputs[i])?.konst.clone()?;
        (k.len() == 1 && k.cast_to_scalar::<f32>().ok()? == want).then_some(())
    };
    for (i, want) in [(2, 0.0), (4, 1.0), (5, 0.0), (6, 1.0), (7, 0.0), (8, 1.0)] {
        scalar(i, want)?;
    }
    let (af, wf, zf) = (fact(node.inputs[0])?, fact(node.inputs[1])?, fact(node.inputs[3])?);
    let weight = wf.konst.clone()?;
    if af.datum_type != u8::datum_type()
        || !af.is_plain()
        || weight.datum_type() != i8::datum_type()
        || weight.try_as_plain_ram().is_err()
        || zf.datum_type != u8::datum_type()
        || zf.shape.volume() != 1.to_dim()
    {
        return None;
    }
    let a = af.shape.as_concrete()?.to_vec();
    let w = weight.shape().to_vec();
    let c = fact(OutletId::new(node.id, 0))?.shape.as_concrete()?.to_vec();
    // One contracted axis, last in A; A's other axes kept in order; W's other axis last in C.
    let (mut contracted, mut kept, mut n_axis) = (None, vec![], None);
    for axis in op.axes.iter_all_axes() {
        if axis.inputs[2..].iter().any(|i| !i.is_empty()) {
            return None;
        }
        let (ia, iw, ic) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
        match (ia.as_slice(), iw.as_slice(), ic.as_slice()) {
            ([p], [q], []) if a[*p] == w[*q] && contracted.is_none() => contracted = Some((*p, *q)),
            ([p], [], [r]) if a[*p] == c[*r] => kept.push((*p, *r)),
            ([], [q], [r]) if w[*q] == c[*r] && n_axis.is_none() => n_axis = Some((*q, *r)),
            (ps, qs, rs)
                if ps.iter().all(|&p| a[p] == 1) && qs.iter().all(|&q| w[q] == 1) && rs.iter().all(|&r| c[r] == 1) => {}
            _ => return None,
        }
    }
    let ((ka, kw), (nw, nc)) = (contracted?, n_axis?);
    kept.sort();
    if ka + 1 != a.len() || nc + 1 != c.len() || !kept.windows(2).all(|x| x[0].1 < x[1].1) {
        return None;
    }
    let (k, n) = (a[ka], w[nw]);
    let m: usize = kept.iter().map(|&(p, _)| a[p]).product();
    if m == 0
        || k == 0
        || a.iter().product::<usize>() != m * k
        || c.iter().product::<usize>() != m * n
        || !padding_fits(m, k, n)
    {
        return None;
    }
    // `Cast` to f32, then `Mul` by factors `[.., n]` (ones elsewhere), shapes kept.
    let cast_at = crate::only_reader(model, node.id)?.node;
    let cast = model.node(cast_at).op_as::<Cast>()?;
    let mul_at = crate::only_reader(model, cast_at)?.node;
    let mul_node = model.node(mul_at);
    let mul = mul_node.op_as::<TypedBinOp>()?;
    if cast.to != f32::datum_type() || mul.0.name() != "Mul" || mul.1.is_some() || mul_node.inputs.len() != 2 {
        return None;
    }
    let other = mul_node.inputs.iter().find(|i| i.node != cast_at).copied()?;
    let (of, out) = (fact(other)?, fact(OutletId::new(mul_at, 0))?);
    let os = of.shape.as_concrete()?;
    if of.datum_type != f32::datum_type()
        || !of.is_plain()
        || os.last() != Some(&n)
        || os.iter().product::<usize>() != n
        || out.datum_type != f32::datum_type()
        || out.shape.as_concrete()? != c.as_slice()
    {
        return None;
    }
    Some(Found {
        mul: mul_at,
        inputs: [node.inputs[0], node.inputs[3], other],
        weight,
        axes: (kw, nw),
        m,
        k,
        n,
        shape: c,
    })
}

/// Whether padding to whole tiles (AVX2's panels are within them) keeps the packed weight and the activations' copy within twice
/// their size (plus 64 KiB): a weight of one column or one row would otherwise take 32 or 64
/// times its bytes. Such products stay with tract.
fn padding_fits(m: usize, k: usize, n: usize) -> bool {
    let fits = |padded: Option<usize>, plain: usize| {
        padded.is_some_and(|p| p <= plain.saturating_mul(2).saturating_add(1 << 16))
    };
    let k_pad = k.div_ceil(TILE_K).checked_mul(TILE_K);
    let weight = k_pad.and_then(|kp| kp.checked_mul(n.div_ceil(BLOCK) * BLOCK));
    let activations = k_pad.and_then(|kp| kp.checked_mul(m.div_ceil(BLOCK) * BLOCK));
    fits(weight, k.saturating_mul(n)) && fits(activations, m.saturating_mul(k))
}

/// Replaces every int8 product chain of `model` that [`Int8MatMul`] computes, when one of its
/// kernels runs here ([`kernel`]); returns how many. A weight read by several products is packed
/// once, and the graph is compacted after each weight so that its plain copy is dropped before the
/// next is packed.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let Some(kernel) = kernel() else {
        return Ok(0);
    };
    let mut count = 0;
    let mut left = usize::MAX;
    loop {
        let found: Vec<Found> = model.nodes().iter().filter_map(|n| candidate(model, n)).collect();
        // Each round replaces at least one chain; should one stay in place, the rest stay with
        // tract rather than loop forever.
        if found.len() >= left {
            break;
        }
        left = found.len();
        let Some(first) = found.first() else { break };
        let at = Arc::as_ptr(&first.weight);
        let mut packed: Vec<((usize, usize), Arc<Packed>)> = vec![];
        let mut subs = crate::Substitutions::default();
        for f in found.iter().filter(|f| Arc::as_ptr(&f.weight) == at) {
            if !packed.iter().any(|p| p.0 == f.axes) {
                let w = f.weight.try_as_plain_ram()?.as_slice::<i8>()?;
                let shape = f.weight.shape();
                let stride = |axis: usize| shape[axis + 1..].iter().product::<usize>();
                let (sk, sn) = (stride(f.axes.0), stride(f.axes.1));
                let kernel = if kernel == Kernel::Avx2 && seven_bits(w) { Kernel::Avx2Narrow } else { kernel };
                packed.push((f.axes, Arc::new(pack(kernel, f.k, f.n, w, (sk, sn)))));
            }
            let packed = packed.iter().find(|p| p.0 == f.axes).map(|p| p.1.clone()).unwrap();
            let op = Int8MatMul { packed, m: f.m, k: f.k, n: f.n, shape: f.shape.clone(), epilogue: vec![] };
            let name = model.node(f.mul).name.clone();
            subs.substitute(model, OutletId::new(f.mul, 0), format!("{name}.int8"), op, &f.inputs)?;
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

    /// Deterministic pseudo-random bytes.
    fn bytes(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed * 40503)) >> 7) as u8).collect()
    }

    /// `((a - zp) w) x factor` in i64 then f32, as `MatMulInteger -> Cast -> Mul` define it.
    fn reference(a: &[u8], w: &[i8], zp: u8, factor: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: i64 = (0..k).map(|p| (a[i * k + p] as i64 - zp as i64) * w[p * n + j] as i64).sum();
                out[i * n + j] = i32::try_from(s).unwrap() as f32 * factor[j];
            }
        }
        out
    }

    /// Whole blocks and partial ones in every dimension, `k` below, at and over one tile; the
    /// last three large enough to be split over three threads (by rows twice, then by columns:
    /// two blocks of rows for three threads).
    const SHAPES: [(usize, usize, usize); 7] =
        [(32, 64, 32), (16, 261, 40), (70, 128, 33), (33, 1000, 96), (128, 300, 256), (300, 1000, 40), (40, 1024, 256)];

    /// Each shape of [`SHAPES`] on `kernel`, then the extremes: activations 255 with zero point 0
    /// by weights -128 (the largest products, every pair sum at its bound), and 0 by 127; for
    /// [`Kernel::Avx2Narrow`] weights within -64..=63, the extremes -64 and 63.
    fn check(kernel: Kernel) {
        let narrow = kernel == Kernel::Avx2Narrow;
        let cases = SHAPES.iter().enumerate().map(|(t, &(m, k, n))| {
            let a = bytes(m * k, t);
            let w: Vec<i8> =
                bytes(k * n, t + 7).into_iter().map(|b| if narrow { b as i8 >> 1 } else { b as i8 }).collect();
            ((m, k, n), a, w, 100 + t as u8)
        });
        let (m, k, n) = (40, 2049, 48);
        let (low, high) = if narrow { (-64, 63) } else { (-128, 127) };
        let extremes =
            [(255u8, low, 0u8), (0, high, 255)].map(|(a, w, zp)| ((m, k, n), vec![a; m * k], vec![w; k * n], zp));
        for ((m, k, n), a, w, zp) in cases.chain(extremes) {
            let factor: Vec<f32> = (0..n).map(|j| 1e-4 * (1 + j % 5) as f32).collect();
            let packed = Arc::new(pack(kernel, k, n, &w, (n, 1)));
            let op = Int8MatMul { packed, m, k, n, shape: vec![1, m, n], epilogue: vec![] };
            let inputs = [
                Tensor::from_shape(&[1, m, k], &a).unwrap().into_tvalue(),
                tensor0(zp).into_tvalue(),
                Tensor::from_shape(&[1, 1, n], &factor).unwrap().into_tvalue(),
            ];
            let want = reference(&a, &w, zp, &factor, (m, k, n));
            let got = op.eval_inputs(&inputs).unwrap();
            assert_eq!(
                got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
                want,
                "m {m} k {k} n {n}, {kernel:?}"
            );
            // Into NaNs, so that an element no task writes cannot pass.
            let run = || {
                let mut c = vec![f32::NAN; m * n];
                op.run(&a, zp, &factor, &mut c, &Finish::new(&[], &[], m, n).unwrap());
                c
            };
            assert_eq!(run(), want, "m {m} k {k} n {n}, {kernel:?}, into NaNs");
            // Three threads: tasks by blocks of rows where each thread gets one, else of columns.
            #[cfg(feature = "threads")]
            {
                use tract_linalg::multithread::{multithread_tract_scope, Executor};
                let got = multithread_tract_scope(Executor::multithread(3), run);
                assert_eq!(got, want, "m {m} k {k} n {n}, {kernel:?}, 3 threads");
            }
        }
    }

    /// The layouts' definition, a value at a time (the packing before session 39): [`pack`] must
    /// give the same bytes.
    fn pack_by_value(kernel: Kernel, k: usize, n: usize, w: impl Fn(usize, usize) -> i8) -> Packed {
        let (kb, kp, kq) = (k.div_ceil(TILE_K), k.div_ceil(2), k.div_ceil(4));
        let mut out = vec![0u8; n.div_ceil(BLOCK) * block_bytes(kernel, k)];
        let mut sums = vec![0i32; n];
        for (col, sum) in sums.iter_mut().enumerate() {
            for row in 0..k {
                let v = w(row, col);
                *sum += v as i32;
                let at = match kernel {
                    Kernel::Amx | Kernel::Plain => {
                        let (pair, half, c) = (col / BLOCK, (col % BLOCK) / 16, col % 16);
                        let (b, r, i) = (row / TILE_K, (row % TILE_K) / 4, row % 4);
                        ((pair * kb + b) * 2 + half) * TILE_BYTES + r * 64 + 4 * c + i
                    }
                    Kernel::Avx2 => {
                        let (panel, half, c) = (col / PANEL, (col % PANEL) / 8, col % 8);
                        (panel * kp + row / 2) * 2 * PANEL + half * PANEL + 2 * c + row % 2
                    }
                    Kernel::Avx2Narrow | Kernel::Vnni | Kernel::AvxVnni => {
                        let (panel, half, c) = (col / PANEL, (col % PANEL) / 8, col % 8);
                        (panel * kq + row / 4) * 4 * PANEL + half * 2 * PANEL + 4 * c + row % 4
                    }
                };
                out[at] = v as u8;
            }
        }
        Packed { kernel, bytes: out, col_sums: sums }
    }

    #[test]
    fn packing_matches_the_layouts_definition() {
        let kernels = [Kernel::Amx, Kernel::Plain, Kernel::Avx2, Kernel::Avx2Narrow, Kernel::Vnni, Kernel::AvxVnni];
        for (k, n) in [(1, 1), (3, 17), (64, 32), (65, 33), (130, 47), (261, 40)] {
            let w: Vec<i8> = bytes(k * n, k + n).into_iter().map(|b| b as i8).collect();
            for kernel in kernels {
                // Rows contiguous, and columns contiguous.
                for (sk, sn) in [(n, 1), (1, k)] {
                    let at = |r: usize, c: usize| w[r * sk + c * sn];
                    assert_eq!(
                        pack(kernel, k, n, &w, (sk, sn)),
                        pack_by_value(kernel, k, n, at),
                        "{kernel:?} k {k} n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn padding_is_bounded() {
        // The published architectures' products, a single-query decoder, the bench model's.
        for (m, k, n) in [(256, 1280, 1280), (2048, 768, 256), (1, 1024, 1000), (128, 261, 256), (16, 261, 40)] {
            assert!(padding_fits(m, k, n), "{m} x {k} x {n}");
        }
        // One column, one row of `k`, one long activation row: left to tract.
        for (m, k, n) in [(64, 100_000, 1), (100_000, 1, 64), (1, 100_000, 64), (1 << 40, 1 << 40, 1 << 40)] {
            assert!(!padding_fits(m, k, n), "{m} x {k} x {n}");
        }
    }

    #[test]
    fn plain_blocks_match_the_definition() {
        check(Kernel::Plain);
    }

    #[test]
    fn tiles_match_the_definition() {
        if !has_amx() {
            eprintln!("no AMX-INT8 here: tile kernel not run");
            return;
        }
        check(Kernel::Amx);
    }

    #[test]
    fn avx2_matches_the_definition() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return check(Kernel::Avx2);
        }
        eprintln!("no AVX2 here: its kernel not run");
    }

    #[test]
    fn avx2_narrow_matches_the_definition() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return check(Kernel::Avx2Narrow);
        }
        eprintln!("no AVX2 here: its kernel not run");
    }

    #[test]
    fn vnni_matches_the_definition() {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_vnni() {
            return check(Kernel::Vnni);
        }
        eprintln!("no AVX-512 VNNI here: its kernel not run");
    }

    /// AVX-VNNI's tiles, in the VEX form where the CPU has AVX-VNNI, else in the EVEX form of the
    /// same instruction (AVX-512 VNNI with VL): the same code but for the instruction's encoding.
    #[test]
    fn avx_vnni_matches_the_definition() {
        #[cfg(target_arch = "x86_64")]
        if runs_avx_vnni() {
            let form = if std::is_x86_feature_detected!("avxvnni") { "VEX" } else { "EVEX" };
            eprintln!("AVX-VNNI tiles in the {form} form");
            return check(Kernel::AvxVnni);
        }
        eprintln!("no AVX-VNNI or AVX-512 VNNI with VL here: its kernel not run");
    }

    #[test]
    fn narrow_only_for_seven_bit_weights() {
        assert!(seven_bits(&[-64, 0, 63]));
        assert!(!seven_bits(&[-65, 0]));
        assert!(!seven_bits(&[0, 64]));
        assert!(!seven_bits(&[-128, 127]));
    }
}
