//! Attention in one op, scores never stored whole: a rewrite of the decluttered graph, after
//! [`crate::gemm_matmul`].
//!
//! A PerceiverIO encoder attends from its latents to every input: vision-perceiver's
//! cross-attention scores are `[512, 50176]`, 98 MiB, written by the `Q K^T` product, read and
//! written by the softmax, read by the `P V` product, three passes through memory that the second
//! thread cannot speed up (vision-perceiver-fourier, `bench --profile` per node: the `P V`
//! product ran slower on two threads than on one). [`Attention`] replaces the chain
//! `GemmMatMul (Q K, scaled) -> Softmax -> GemmMatMul (P V)` when each step is the only reader
//! of the one before. Each task takes a block of query rows (threads take blocks, or parts of the
//! keys, see [`Attention::tasks`]) and walks the keys in chunks of [`STEP`]: the chunk's scores
//! into a small buffer, the softmax kept online (a running maximum and sum per row, earlier sums
//! rescaled when the maximum grows), the chunk's values added into the output by the `gemm`
//! crate. With at most [`CHUNK`] keys (the latent self-attention) there is one chunk: the scores
//! of a block of rows, an exact softmax of each row (the kernel of [`crate::softmax_rows`]), one
//! product; on x86 with [`crate::f32_packed`]'s kernels, when K and V are small enough
//! ([`PACKED_MAX_BYTES`]), both products run on those kernels, K and V packed into panels once
//! per task (see [`Attention::one_chunk_packed`]). Results differ from the unfused chain by rounding only; the unit tests compare both
//! with attention computed in f64, and the fixtures with transformers.

#[cfg(target_arch = "x86_64")]
use crate::f32_packed::{Packed, NR};
use crate::gemm_matmul::{matmul_into, GemmMatMul, Strides};
use crate::softmax_rows::{exp_neg, exp_sum_on, row_max, softmax_in_place, PLAIN};
#[cfg(target_arch = "x86_64")]
use crate::softmax_rows::{AVX2, AVX512};
use std::cell::RefCell;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// The most keys an attention takes in one chunk (an exact softmax of each row).
const CHUNK: usize = 2048;

/// Keys per chunk when there are more than [`CHUNK`]: with [`MAX_ROWS`] rows, 2 MiB of scores,
/// a core's L2 on the hosts measured. Per-node times of vision-perceiver-fourier's
/// `[512, 50176]` cross-attention (`bench --profile`, one thread) fell from 330-415 ms with
/// 512 keys x 128-256 rows to 231-253 ms with 1024-2048 x 512: each chunk's products repack
/// their operands, so larger chunks waste less.
const STEP: usize = 1024;

/// Most query rows per task.
const MAX_ROWS: usize = 512;

/// The most bytes of K and V that a one-chunk attention packs for [`crate::f32_packed`]'s
/// kernels (half a MiB, a Zen 3 core's L2). Per-node times (`bench --profile`, one thread, Zen 4):
/// vision-perceiver-conv's self-attention (512 keys, `d` and `dv` 128: 512 KiB) 572-574 ->
/// 532-536 ms; language-perceiver's cross-attention (2048 keys, `d` 32, `dv` 160: 1.5 MiB)
/// 17.0 -> 18.2-18.8 ms, packed whole before the products, V no longer stays in cache.
const PACKED_MAX_BYTES: usize = 512 << 10;

/// Below this many multiply-adds an attention stays on one thread: the digits model's
/// (`models/digits`, 16 latents) took 0.025 ms a run on one thread and 0.044-0.049 on two
/// (`bench --profile`), its whole run 0.155 against 0.20 ms.
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 1 << 18;

/// An outer loop (heads, a batch): its extent and the strides it steps Q, K, V and the output by.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Outer {
    extent: usize,
    q: isize,
    k: isize,
    v: isize,
    o: isize,
}

/// `O = softmax(scale Q K) V` over the keys, for every outer index, through strides: `Q` is
/// `m x d`, `K` `d x keys`, `V` `keys x dv`, `O` `m x dv`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Attention {
    m: usize,
    d: usize,
    keys: usize,
    dv: usize,
    q: Strides,
    k: Strides,
    v: Strides,
    o: Strides,
    loops: Vec<Outer>,
    lens: (usize, usize, usize),
    shape: Vec<usize>,
    scale_bits: u32,
    /// Whether the one chunk runs on [`crate::f32_packed`]'s kernels ([`Attention::packs`]).
    packed: bool,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each thread's K and V packed for [`crate::f32_packed`]'s kernels.
    static PANELS: RefCell<(Packed, Packed)> = const { RefCell::new((Packed::empty(), Packed::empty())) };
}

thread_local! {
    /// Each thread's scores of one chunk, and the running maximum, sum and rescale factor of
    /// each row.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Attention {
    /// The attention of scores `qk`, a softmax over the scores' axis `axis`, then `pv`, whose
    /// first operand is the softmax's output; `None` unless the two products chain as one
    /// attention (the softmax over `qk`'s columns, `pv` contracting them, the same outer loops).
    fn plan(qk: &GemmMatMul, axis: usize, pv: &GemmMatMul) -> Option<Attention> {
        let scores = &qk.shape;
        let stride: usize = scores.get(axis + 1..)?.iter().product();
        let n = qk.n;
        let fits = scores.get(axis) == Some(&n)
            && qk.c.col == stride as isize
            && pv.a_len == scores.iter().product::<usize>()
            && pv.m == qk.m
            && pv.k == n
            && pv.a == qk.c
            && pv.loops.len() == qk.loops.len();
        if !fits || n == 0 || qk.m == 0 || qk.k == 0 {
            return None;
        }
        // Each outer loop of the scores is one of `pv`'s, reading the scores where they were written.
        let mut loops = vec![];
        let mut used = vec![false; pv.loops.len()];
        for l in &qk.loops {
            let j =
                (0..pv.loops.len()).find(|&j| !used[j] && pv.loops[j].extent == l.extent && pv.loops[j].a == l.c)?;
            used[j] = true;
            let p = pv.loops[j];
            loops.push(Outer { extent: l.extent, q: l.a, k: l.b, v: p.b, o: p.c });
        }
        let mut op = Attention {
            m: qk.m,
            d: qk.k,
            keys: n,
            dv: pv.n,
            q: qk.a,
            k: qk.b,
            v: pv.b,
            o: pv.c,
            loops,
            lens: (qk.a_len, qk.b_len, pv.b_len),
            shape: pv.shape.clone(),
            scale_bits: qk.scale_bits,
            packed: false,
        };
        op.packed = op.packs();
        Some(op)
    }

    /// Whether the one chunk is to run on [`crate::f32_packed`]'s kernels: the pass is on and
    /// the CPU has one, there is one chunk, K and V take at most [`PACKED_MAX_BYTES`], and Q's
    /// and O's rows are contiguous.
    fn packs(&self) -> bool {
        crate::f32_packed::ENABLED.get()
            && crate::f32_packed::available()
            && self.keys <= CHUNK
            && (self.d + self.dv) * self.keys * 4 <= PACKED_MAX_BYTES
            && (self.q.col, self.o.col) == (1, 1)
            && self.q.row > 0
            && self.o.row > 0
    }

    /// Values from one row of scores to the next in a task's buffer: the keys, or one cache line
    /// more where rows would be a multiple of 2 KiB apart (then the packed kernels' tiles, twelve
    /// rows at a time, would read them from two of L1's sets, see [`crate::f32_packed`]; the
    /// packed self-attention of vision-perceiver-conv 542-544 -> 532-536 ms).
    fn score_stride(&self, step: usize) -> usize {
        if self.packed && (step * 4).is_multiple_of(2048) {
            step + 16
        } else {
            step
        }
    }

    fn outer(&self) -> usize {
        self.loops.iter().map(|l| l.extent).product()
    }

    /// Element offsets into Q, K, V and O of outer iteration `i`.
    fn offsets(&self, mut i: usize) -> [isize; 4] {
        let mut o = [0isize; 4];
        for l in self.loops.iter().rev() {
            let j = (i % l.extent) as isize;
            i /= l.extent;
            o[0] += j * l.q;
            o[1] += j * l.k;
            o[2] += j * l.v;
            o[3] += j * l.o;
        }
        o
    }

    /// The tasks for `threads` threads: whole outer iterations when there are at least as many
    /// as threads; else, with more keys than one chunk, the keys split among the threads (each
    /// then reads its own part of K and V, not all of them: vision-perceiver-learned's
    /// cross-attention streams 196 MiB of keys and values, and with the rows split its two
    /// threads ran 1.37x faster than one); else the rows split among them. At most [`MAX_ROWS`]
    /// rows each.
    fn tasks(&self, threads: usize) -> Vec<Task> {
        let outer = self.outer();
        let split_keys = outer < threads && self.keys > CHUNK;
        let parts = if outer >= threads || split_keys { 1 } else { threads };
        let per = self.m.div_ceil(parts).clamp(1, MAX_ROWS);
        let key_step = if split_keys { self.keys.div_ceil(threads).div_ceil(STEP) * STEP } else { self.keys };
        let mut tasks = vec![];
        for i in 0..outer {
            for r0 in (0..self.m).step_by(per) {
                let rows = per.min(self.m - r0);
                for k0 in (0..self.keys).step_by(key_step) {
                    let keys = k0..(k0 + key_step).min(self.keys);
                    let part = split_keys.then_some(tasks.len());
                    tasks.push(Task { i, r0, rows, keys, part });
                }
            }
        }
        tasks
    }

    /// Task `t`. Its output rows, unnormalised when it has a `part`, go to that part's slot of
    /// `partials` ([`Attention::slot_rows`]` x dv` values, then the rows' maxima and sums), else
    /// to O.
    ///
    /// # Safety
    /// The addresses hold Q, K, V and O as planned, `partials` a slot for each part, and no one
    /// else writes this task's rows of O or its slot.
    unsafe fn task(&self, (q, k, v, o): (usize, usize, usize, usize), t: &Task, partials: usize) {
        let rows = t.rows;
        let [oq, ok, ov, oo] = self.offsets(t.i);
        let q = (q as *const f32).offset(oq + t.r0 as isize * self.q.row);
        let (k, v) = ((k as *const f32).offset(ok), (v as *const f32).offset(ov));
        let slot = t.part.map(|p| (partials as *mut f32).add(p * self.slot_len()));
        let (o, os) = match slot {
            Some(slot) => (slot, Strides::rows(self.dv)),
            None => ((o as *mut f32).offset(oo + t.r0 as isize * self.o.row), self.o),
        };
        let scale = f32::from_bits(self.scale_bits);
        let step = if self.keys <= CHUNK { self.keys } else { STEP };
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (s, state) = &mut *scratch;
            let stride = self.score_stride(step);
            if s.len() < rows * stride {
                s.resize(rows * stride, 0.0);
            }
            let s = &mut s[..rows * stride];
            #[cfg(target_arch = "x86_64")]
            if self.packed {
                // One chunk (`packs`), so no slot.
                PANELS.with_borrow_mut(|(kp, vp)| self.one_chunk_packed((q, k, v), (o, os), (s, stride), rows, kp, vp));
                return;
            }
            if step == self.keys && slot.is_none() {
                // One chunk: the scores of these rows, an exact softmax, one product.
                matmul_into(
                    (rows, self.d, step),
                    (s.as_mut_ptr(), Strides::rows(step)),
                    (q, self.q),
                    (k, self.k),
                    scale,
                    false,
                );
                softmax_in_place(s, step);
                matmul_into((rows, step, self.dv), (o, os), (s.as_ptr(), Strides::rows(step)), (v, self.v), 1.0, false);
                return;
            }
            state.clear();
            state.resize(3 * rows, 0.0);
            let (max, rest) = state.split_at_mut(rows);
            let (sum, factor) = rest.split_at_mut(rows);
            max.fill(f32::NEG_INFINITY);
            for j0 in t.keys.clone().step_by(step) {
                let w = step.min(t.keys.end - j0);
                let s = &mut s[..rows * w];
                let kj = k.offset(j0 as isize * self.k.col);
                let vj = v.offset(j0 as isize * self.v.row);
                matmul_into(
                    (rows, self.d, w),
                    (s.as_mut_ptr(), Strides::rows(w)),
                    (q, self.q),
                    (kj, self.k),
                    scale,
                    false,
                );
                online(s, w, max, sum, factor);
                let first = j0 == t.keys.start;
                if !first {
                    scale_rows(o, os, rows, self.dv, factor);
                }
                matmul_into((rows, w, self.dv), (o, os), (s.as_ptr(), Strides::rows(w)), (vj, self.v), 1.0, !first);
            }
            match slot {
                Some(slot) => {
                    let n = self.slot_rows();
                    let states = std::slice::from_raw_parts_mut(slot.add(n * self.dv), 2 * n);
                    states[..rows].copy_from_slice(max);
                    states[n..n + rows].copy_from_slice(sum);
                }
                None => {
                    for f in sum.iter_mut() {
                        *f = 1.0 / *f;
                    }
                    scale_rows(o, os, rows, self.dv, sum);
                }
            }
        });
    }

    /// The one chunk on [`crate::f32_packed`]'s kernels: K and V packed into this thread's
    /// panels `kp` and `vp` (the packing costs a fraction of the products: 0.5 % of
    /// vision-perceiver-conv's attention time by sampling), the `rows` rows of scores into `s`
    /// (rows `stride` apart), an exact softmax of each, the product by V into O.
    ///
    /// # Safety
    /// As [`Attention::task`]; `q` and `o` at the task's first row, `k` and `v` at its head's.
    #[cfg(target_arch = "x86_64")]
    unsafe fn one_chunk_packed(
        &self,
        (q, k, v): (*const f32, *const f32, *const f32),
        (o, os): (*mut f32, Strides),
        (s, stride): (&mut [f32], usize),
        rows: usize,
        kp: &mut Packed,
        vp: &mut Packed,
    ) {
        let (keys, dv, ks, vs) = (self.keys, self.dv, self.k, self.v);
        // K (`d x keys`): panel `j`'s line `p` holds value `p` of keys `16 j..16 j + 16`.
        kp.refill((self.d, keys), |p0, j, lines| {
            for c in 0..NR {
                let key = j * NR + c;
                if key < keys {
                    let from = k.offset(key as isize * ks.col + p0 as isize * ks.row);
                    for (p, line) in lines.iter_mut().enumerate() {
                        line[c] = *from.offset(p as isize * ks.row);
                    }
                } else {
                    lines.iter_mut().for_each(|line| line[c] = 0.0);
                }
            }
        });
        // V (`keys x dv`): panel `j`'s line `p` holds columns `16 j..16 j + 16` of key `p`.
        vp.refill((keys, dv), |p0, j, lines| {
            let c0 = j * NR;
            let w = NR.min(dv - c0);
            for (p, line) in lines.iter_mut().enumerate() {
                let from = v.offset((p0 + p) as isize * vs.row + c0 as isize * vs.col);
                if vs.col == 1 {
                    line[..w].copy_from_slice(std::slice::from_raw_parts(from, w));
                } else {
                    for (c, x) in line[..w].iter_mut().enumerate() {
                        *x = *from.offset(c as isize * vs.col);
                    }
                }
                line[w..].fill(0.0);
            }
        });
        let scale = f32::from_bits(self.scale_bits);
        kp.product((q, self.q.row as usize), (s.as_mut_ptr(), stride), rows, 0..keys, scale);
        if stride == keys {
            softmax_in_place(s, keys);
        } else {
            s.chunks_exact_mut(stride).for_each(|row| softmax_in_place(&mut row[..keys], keys));
        }
        vp.product((s.as_ptr(), stride), (o, os.row as usize), rows, 0..dv, 1.0);
    }

    /// Rows in one part's slot of the partial results: a task's most (a decoder's single query
    /// gets a slot of one row, not [`MAX_ROWS`]).
    fn slot_rows(&self) -> usize {
        self.m.clamp(1, MAX_ROWS)
    }

    /// Values in one part's slot of the partial results.
    fn slot_len(&self) -> usize {
        self.slot_rows() * (self.dv + 2)
    }

    /// Joins the parts of each block of rows (tasks in order, a block's parts together) into O:
    /// each part's sums and output weighted by `e^(its max - the overall max)`, then divided by
    /// the total sum.
    ///
    /// # Safety
    /// As [`Attention::task`], every task done.
    #[cfg_attr(not(feature = "threads"), allow(dead_code))]
    unsafe fn join(&self, o: usize, tasks: &[Task], partials: &[f32]) {
        let (dv, n) = (self.dv, self.slot_rows());
        let mut start = 0;
        while start < tasks.len() {
            let t = &tasks[start];
            let end = start + tasks[start..].iter().take_while(|u| (u.i, u.r0) == (t.i, t.r0)).count();
            let [_, _, _, oo] = self.offsets(t.i);
            let o = (o as *mut f32).offset(oo + t.r0 as isize * self.o.row);
            let slots: Vec<&[f32]> =
                (start..end).map(|p| &partials[p * self.slot_len()..(p + 1) * self.slot_len()]).collect();
            let mut acc = vec![0f32; dv];
            for r in 0..t.rows {
                let top = slots.iter().map(|sl| sl[n * dv + r]).fold(f32::NEG_INFINITY, f32::max);
                let top = if top == f32::NEG_INFINITY { 0.0 } else { top };
                acc.fill(0.0);
                let mut total = 0.0;
                for sl in &slots {
                    let w = exp_neg(sl[n * dv + r] - top);
                    total += w * sl[n * dv + n + r];
                    for (a, x) in acc.iter_mut().zip(&sl[r * dv..(r + 1) * dv]) {
                        *a += w * x;
                    }
                }
                let row = o.offset(r as isize * self.o.row);
                for (c, a) in acc.iter().enumerate() {
                    *row.offset(c as isize * self.o.col) = a / total;
                }
            }
            start = end;
        }
    }

    /// Every task, split over tract's thread pool when it has more than one thread.
    fn run(&self, bufs: (usize, usize, usize, usize)) {
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            let work = [self.m, self.keys, self.d + self.dv].iter().fold(self.outer(), |w, &x| w.saturating_mul(x));
            if let Some(pool) = crate::thread_pool().filter(|_| work >= PARALLEL_MIN) {
                let tasks = self.tasks(pool.current_num_threads());
                if tasks.len() > 1 {
                    let parts = tasks.iter().filter(|t| t.part.is_some()).count();
                    let mut partials = vec![0f32; parts * self.slot_len()];
                    let p = partials.as_mut_ptr() as usize;
                    // SAFETY: lengths checked by `eval`; tasks write disjoint rows or slots.
                    pool.install(|| tasks.par_iter().for_each(|t| unsafe { self.task(bufs, t, p) }));
                    if parts > 0 {
                        // SAFETY: every task is done.
                        unsafe { self.join(bufs.3, &tasks, &partials) };
                    }
                    return;
                }
            }
        }
        for t in self.tasks(1) {
            // SAFETY: lengths checked by `eval`; one thread, no parts.
            unsafe { self.task(bufs, &t, 0) };
        }
    }
}

/// Multiplies row `r` of the `rows` rows of `dv` values at `o` (strides `os`) by `factor[r]`.
///
/// # Safety
/// As [`Attention::task`].
unsafe fn scale_rows(o: *mut f32, os: Strides, rows: usize, dv: usize, factor: &[f32]) {
    for (r, &f) in factor.iter().enumerate().take(rows) {
        let row = o.offset(r as isize * os.row);
        if os.col == 1 {
            for x in std::slice::from_raw_parts_mut(row, dv) {
                *x *= f;
            }
        } else {
            for c in 0..dv {
                *row.offset(c as isize * os.col) *= f;
            }
        }
    }
}

/// One task of an attention (see [`Attention::tasks`]).
#[derive(Clone, Debug)]
struct Task {
    i: usize,
    r0: usize,
    rows: usize,
    keys: std::ops::Range<usize>,
    part: Option<usize>,
}

/// One chunk of an online softmax: `s` holds `rows` rows of `w` scores; each row's running
/// maximum `max` and sum `sum` take them in, the scores become `e^(s - max)`, and `factor` gets
/// what earlier sums (and the output) are to be multiplied by.
fn online(s: &mut [f32], w: usize, max: &mut [f32], sum: &mut [f32], factor: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { online_avx512(s, w, max, sum, factor) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { online_avx2(s, w, max, sum, factor) };
        }
    }
    // SAFETY: the plain kernel needs no feature.
    unsafe { online_generic::<PLAIN>(s, w, max, sum, factor) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn online_avx512(s: &mut [f32], w: usize, max: &mut [f32], sum: &mut [f32], factor: &mut [f32]) {
    // SAFETY: called only where the CPU has AVX-512F (`online`).
    online_generic::<AVX512>(s, w, max, sum, factor)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn online_avx2(s: &mut [f32], w: usize, max: &mut [f32], sum: &mut [f32], factor: &mut [f32]) {
    // SAFETY: called only where the CPU has AVX2 and FMA (`online`).
    online_generic::<AVX2>(s, w, max, sum, factor)
}

/// The online softmax of a chunk of scores (`ISA`: see [`exp_sum_on`]).
///
/// # Safety
/// As [`exp_sum_on`].
#[inline(always)]
unsafe fn online_generic<const ISA: u8>(s: &mut [f32], w: usize, max: &mut [f32], sum: &mut [f32], factor: &mut [f32]) {
    for (r, row) in s.chunks_exact_mut(w).enumerate() {
        let m = row_max(row, max[r]);
        // A row of -inf so far (never from finite inputs): weights as if the maximum were 0.
        let top = if m == f32::NEG_INFINITY { 0.0 } else { m };
        let add = exp_sum_on::<ISA>(row, top);
        let f = if max[r] == f32::NEG_INFINITY { 0.0 } else { exp_neg(max[r] - top) };
        sum[r] = sum[r] * f + add;
        factor[r] = f;
        max[r] = m;
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "m {} d {} keys {} dv {}, {} outer, scale {}{}",
            self.m,
            self.d,
            self.keys,
            self.dv,
            self.outer(),
            f32::from_bits(self.scale_bits),
            if self.packed { ", packed" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let q = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let k = inputs[1].try_as_plain_ram()?.as_slice::<f32>()?;
        let v = inputs[2].try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(
            (q.len(), k.len(), v.len()) == self.lens,
            "Attention: operands of {}, {} and {} values, planned for {:?}",
            q.len(),
            k.len(),
            v.len(),
            self.lens
        );
        if self.d == 0 || self.dv == 0 || self.m == 0 {
            return Ok(tvec!(Tensor::zero::<f32>(&self.shape)?.into_tvalue()));
        }
        let mut out = unsafe { Tensor::uninitialized_dt(f32::datum_type(), &self.shape)? };
        let o = out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?.as_mut_ptr() as usize;
        self.run((q.as_ptr() as usize, k.as_ptr() as usize, v.as_ptr() as usize, o));
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.shape)))
    }

    as_op!();
}

/// The attention ending at the softmax node `node`, as (the `P V` node, the op, its inputs).
fn candidate(model: &TypedModel, node: &TypedNode) -> Option<(usize, Attention, [OutletId; 3])> {
    let sm = node.op_as::<Softmax>()?;
    let &[axis] = sm.axes.as_slice() else { return None };
    if sm.kind != SoftmaxKind::Softmax || sm.quant_output_dt.is_some() {
        return None;
    }
    let scores = model.node(node.inputs[0].node);
    let qk = scores.op_as::<GemmMatMul>().filter(|g| g.epilogue.is_empty())?;
    let pv_at = crate::only_reader(model, node.id)?;
    (crate::only_reader(model, scores.id)?.node == node.id && pv_at.slot == 0).then_some(())?;
    let pv_node = model.node(pv_at.node);
    // A factor `P V` took in (a constant multiplying the attention's output) is not the op's.
    let pv = pv_node.op_as::<GemmMatMul>().filter(|g| g.epilogue.is_empty() && g.scale_bits == 1f32.to_bits())?;
    let (q, k) = (scores.inputs[0], scores.inputs[1]);
    // Scores computed keys x queries (the softmax down the columns) are read as their transpose.
    match Attention::plan(qk, axis, pv) {
        Some(op) => Some((pv_node.id, op, [q, k, pv_node.inputs[1]])),
        None => Some((pv_node.id, Attention::plan(&qk.transposed(), axis, pv)?, [k, q, pv_node.inputs[1]])),
    }
}

/// Replaces every attention chain of the decluttered `model` (after [`crate::gemm_matmul`]'s
/// rewrite) with [`Attention`]; returns how many.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    // A product can end one attention and hold the scores of the next (a softmax of an
    // attention's output, then a product): each node goes to the first attention that takes it.
    let mut taken = std::collections::HashSet::new();
    let found: Vec<(usize, Attention, [OutletId; 3])> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let found = candidate(model, n)?;
            // The scores, the softmax, the product with the values.
            let nodes = [n.inputs[0].node, n.id, found.0];
            nodes.iter().all(|id| !taken.contains(id)).then(|| taken.extend(nodes)).map(|_| found)
        })
        .collect();
    let mut subs = crate::Substitutions::default();
    for (id, op, inputs) in &found {
        let name = format!("{}.attention", model.node(*id).name);
        subs.substitute(model, OutletId::new(*id, 0), name, op.clone(), inputs)?;
    }
    model.compact()?;
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::math::Mul;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * seed + 7) % 101) as f32 / 25.0 - 2.0).collect()
    }

    /// An attention over `heads` heads as an exporter writes it: scores (`scores`, einsum
    /// notation over Q and K), a factor, a softmax over the keys (axis `axis` of the scores),
    /// the product with V (`out`); run by tract, then rewritten (products on the `gemm` crate,
    /// then fused), each compared with attention computed in f64, at one and three threads; the
    /// fused op as planned and with its one chunk on the `gemm` crate (not packed). `packed`:
    /// whether the plan is to pack, where the CPU has [`crate::f32_packed`]'s kernels.
    #[allow(clippy::too_many_arguments)]
    fn check(
        scores: &str,
        axis: usize,
        out: &str,
        q: &[usize],
        k: &[usize],
        v: &[usize],
        (queries, keys): (usize, usize),
        packed: bool,
    ) {
        let mut model = TypedModel::default();
        let [sq, sk, sv] = [("q", q), ("k", k), ("v", v)].map(|(n, s)| model.add_source(n, f32::fact(s)).unwrap());
        let s =
            model.wire_node("scores", EinSum::new(scores.parse().unwrap(), f32::datum_type()), &[sq, sk]).unwrap()[0];
        let rank = model.outlet_fact(s).unwrap().rank();
        let f = model.add_const("factor", Tensor::from_shape(&vec![1; rank], &[0.3f32]).unwrap()).unwrap();
        let s = model.wire_node("scaled", TypedBinOp(Box::new(Mul), None), &[s, f]).unwrap()[0];
        let p = model.wire_node("probs", Softmax::new(tvec![axis], None, SoftmaxKind::Softmax), &[s]).unwrap()[0];
        let o = model.wire_node("out", EinSum::new(out.parse().unwrap(), f32::datum_type()), &[p, sv]).unwrap()[0];
        model.select_output_outlets(&[o]).unwrap();
        // Keys (K's rows, d its last axis) drift with their index, so that a row's largest score
        // moves from chunk to chunk, up for some rows and down for others.
        let d = k[k.len() - 1];
        let mut kv = values(k.iter().product(), 53);
        for (i, x) in kv.iter_mut().enumerate() {
            *x += 3.0 * ((i / d) % keys) as f32 / keys as f32;
        }
        let inputs = [
            Tensor::from_shape(q, &values(q.iter().product(), 37)).unwrap(),
            Tensor::from_shape(k, &kv).unwrap(),
            Tensor::from_shape(v, &values(v.iter().product(), 29)).unwrap(),
        ];
        let run = |m: &TypedModel| {
            let plan = m.clone().into_runnable().unwrap();
            let out = plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect()).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        // The reference: scores and product in f64 by tract's einsum, the softmax in f64 here.
        let reference = {
            let mut m = TypedModel::default();
            let [a, b, _] = [("q", q), ("k", k), ("v", v)].map(|(n, s)| m.add_source(n, f64::fact(s)).unwrap());
            let s = m.wire_node("scores", EinSum::new(scores.parse().unwrap(), f64::datum_type()), &[a, b]).unwrap()[0];
            let f = m.add_const("factor", Tensor::from_shape(&vec![1; rank], &[0.3f64]).unwrap()).unwrap();
            let s = m.wire_node("scaled", TypedBinOp(Box::new(Mul), None), &[s, f]).unwrap()[0];
            // Softmax in f64 as exp(x - max) / sum.
            let shape = m.outlet_fact(s).unwrap().shape.as_concrete().unwrap().to_vec();
            m.select_output_outlets(&[s]).unwrap();
            let st = m
                .into_runnable()
                .unwrap()
                .run(inputs.iter().map(|t| t.cast_to::<f64>().unwrap().into_owned().into_tvalue()).collect())
                .unwrap();
            let mut sc = st[0].clone().into_tensor().into_plain_array::<f64>().unwrap();
            for mut lane in sc.lanes_mut(tract_ndarray::Axis(axis)) {
                let max = lane.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lane.mapv_inplace(|x| (x - max).exp());
                let sum: f64 = lane.sum();
                lane.mapv_inplace(|x| x / sum);
            }
            let probs = Tensor::from(sc.into_shape_with_order(shape).unwrap());
            let e = EinSum::new(out.parse().unwrap(), f64::datum_type());
            let o = e
                .eval(
                    &EvalContext::out_of_plan(),
                    tvec!(probs.into_tvalue(), inputs[2].cast_to::<f64>().unwrap().into_owned().into_tvalue()),
                )
                .unwrap();
            o[0].try_as_plain_ram().unwrap().as_slice::<f64>().unwrap().to_vec()
        };
        let mut rewritten = model.clone();
        crate::gemm_matmul::rewrite(&mut rewritten).unwrap();
        assert_eq!(rewrite(&mut rewritten).unwrap(), 1, "{scores} {out}");
        let op = rewritten.nodes().iter().find_map(|n| n.op_as::<Attention>()).expect("fused").clone();
        assert_eq!((op.m, op.keys), (queries, keys), "{scores}");
        assert_eq!(op.packed, packed && crate::f32_packed::available(), "{scores}");
        assert!(!rewritten.nodes().iter().any(|n| n.op_is::<Softmax>()), "{scores}: the softmax is taken in");
        let mut unpacked = rewritten.clone();
        for node in unpacked.nodes_mut() {
            if let Some(op) = node.op_as::<Attention>() {
                node.op = Box::new(Attention { packed: false, ..op.clone() });
            }
        }
        let mut results = vec![("tract", run(&model)), ("fused", run(&rewritten)), ("fused, gemm", run(&unpacked))];
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            for (what, m) in [("fused, 3 threads", &rewritten), ("fused, gemm, 3 threads", &unpacked)] {
                results.push((what, multithread_tract_scope(Executor::multithread(3), || run(m))));
            }
        }
        for (what, got) in results {
            assert_eq!(got.len(), reference.len());
            for (i, (g, w)) in got.iter().zip(&reference).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "{scores} {what} [{i}]: {g} vs {w}");
            }
        }
    }

    #[test]
    fn heads_in_one_chunk_match_f64() {
        // Latent self-attention: per head, scores queries x keys.
        // Large enough to be split over the threads (by heads).
        check("hmd,hnd->hmn", 2, "hmn,hne->hme", &[3, 37, 16], &[3, 290, 16], &[3, 290, 8], (37, 290), true);
    }

    #[test]
    fn rows_of_512_scores_match_f64() {
        // Scores rows 2 KiB long (stored a line further apart when packed), values of 40 (a
        // partial panel), queries in tiles of 12 and a remainder.
        check("hmd,hnd->hmn", 2, "hmn,hne->hme", &[2, 29, 20], &[2, 512, 20], &[2, 512, 40], (29, 512), true);
    }

    #[test]
    fn large_keys_and_values_are_not_packed() {
        // K and V over `PACKED_MAX_BYTES`: the one chunk on the `gemm` crate.
        check("hmd,hnd->hmn", 2, "hmn,hne->hme", &[2, 9, 64], &[2, 1500, 64], &[2, 1500, 40], (9, 1500), false);
    }

    #[test]
    fn many_keys_in_chunks_match_f64() {
        // A cross-attention over more keys than one chunk holds (the last chunk partial), rows
        // split over threads.
        check("md,nd->mn", 1, "mn,ne->me", &[40, 8], &[CHUNK + 452, 8], &[CHUNK + 452, 6], (40, CHUNK + 452), false);
    }

    #[test]
    fn scores_keys_by_queries_match_f64() {
        // Scores computed keys x queries, the softmax down the columns (vision-perceiver-learned's
        // cross-attention).
        check("md,nd->nm", 0, "nm,ne->me", &[24, 8], &[CHUNK + 100, 8], &[CHUNK + 100, 5], (24, CHUNK + 100), false);
    }

    /// Three attentions in a row, each one's queries the output of the one before (keys and values
    /// shared): all three fused (each reads the op that replaced the one before; the graph failed to
    /// load before), against tract's unfused ops, at one and three threads.
    #[test]
    fn attentions_in_a_row() {
        let (h, m, n, d) = (2usize, 12usize, 40usize, 8usize);
        let mut model = TypedModel::default();
        let mut x = model.add_source("q", f32::fact([h, m, d])).unwrap();
        let k = model.add_source("k", f32::fact([h, n, d])).unwrap();
        let v = model.add_source("v", f32::fact([h, n, d])).unwrap();
        for i in 0..3 {
            let e = |eq: &str| EinSum::new(eq.parse().unwrap(), f32::datum_type());
            let s = model.wire_node(format!("scores{i}"), e("hmd,hnd->hmn"), &[x, k]).unwrap()[0];
            let f = model.add_const(format!("factor{i}"), Tensor::from_shape(&[1, 1, 1], &[0.3f32]).unwrap()).unwrap();
            let s = model.wire_node(format!("scaled{i}"), TypedBinOp(Box::new(Mul), None), &[s, f]).unwrap()[0];
            let p = model.wire_node(format!("probs{i}"), Softmax::new(tvec![2], None, SoftmaxKind::Softmax), &[s]);
            x = model.wire_node(format!("out{i}"), e("hmn,hne->hme"), &[p.unwrap()[0], v]).unwrap()[0];
        }
        model.select_output_outlets(&[x]).unwrap();
        let inputs: Vec<Tensor> = [(m, 37), (n, 53), (n, 29)]
            .iter()
            .map(|&(rows, seed)| Tensor::from_shape(&[h, rows, d], &values(h * rows * d, seed)).unwrap())
            .collect();
        let run = |m: &TypedModel| {
            let plan = m.clone().into_runnable().unwrap();
            let out = plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect()).unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let plain = run(&model);
        let mut fused = model.clone();
        crate::gemm_matmul::rewrite(&mut fused).unwrap();
        assert_eq!(rewrite(&mut fused).unwrap(), 3);
        assert_eq!(fused.nodes().iter().filter(|n| n.op_is::<Attention>()).count(), 3);
        crate::assert_like_tract(&plain, || run(&fused));
    }

    /// An attention of `[6, 8]` queries over 9 keys with values of 5, then `after` wired on its
    /// output; rewritten, it must fuse `fused` attentions and give tract's outputs.
    fn check_after(after: impl Fn(&mut TypedModel, OutletId) -> OutletId, fused: usize) {
        let mut model = TypedModel::default();
        let q = model.add_source("q", f32::fact([6, 8])).unwrap();
        let k = model.add_source("k", f32::fact([9, 8])).unwrap();
        let v = model.add_source("v", f32::fact([9, 5])).unwrap();
        let e = |eq: &str| EinSum::new(eq.parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", e("md,nd->mn"), &[q, k]).unwrap()[0];
        let p = model.wire_node("probs", Softmax::new(tvec![1], None, SoftmaxKind::Softmax), &[s]).unwrap()[0];
        let o = model.wire_node("out", e("mn,ne->me"), &[p, v]).unwrap()[0];
        let o = after(&mut model, o);
        model.select_output_outlets(&[o]).unwrap();
        let inputs: Vec<Tensor> = [([6, 8], 37), ([9, 8], 53), ([9, 5], 29)]
            .iter()
            .map(|(shape, seed)| Tensor::from_shape(shape, &values(shape[0] * shape[1], *seed)).unwrap())
            .collect();
        let run = |m: &TypedModel| {
            let out = m.clone().into_runnable().unwrap().run(inputs.iter().map(|t| t.clone().into_tvalue()).collect());
            out.unwrap()[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let plain = run(&model);
        let mut rewritten = model.clone();
        crate::gemm_matmul::rewrite(&mut rewritten).unwrap();
        assert_eq!(rewrite(&mut rewritten).unwrap(), fused);
        crate::assert_like_tract(&plain, || run(&rewritten));
    }

    /// A constant multiplying the attention's output, which the `P V` product takes in: the
    /// attention is left unfused, and the output keeps the factor (it was dropped before).
    #[test]
    fn keeps_a_factor_on_the_output() {
        check_after(
            |model, o| {
                let f = model.add_const("factor", Tensor::from_shape(&[1, 1], &[1.7f32]).unwrap()).unwrap();
                model.wire_node("scaled", TypedBinOp(Box::new(Mul), None), &[o, f]).unwrap()[0]
            },
            0,
        );
    }

    /// An attention's output, a softmax of it, then a product: the second chain looks like an
    /// attention whose scores are the first's output. The first is fused, the second left to
    /// tract (each node goes to one op; the graph failed to load before), against tract.
    #[test]
    fn an_output_is_not_also_the_next_scores() {
        check_after(
            |model, o| {
                let p = model.wire_node("probs2", Softmax::new(tvec![1], None, SoftmaxKind::Softmax), &[o]).unwrap()[0];
                let w = model.add_const("w", Tensor::from_shape(&[5, 3], &values(15, 41)).unwrap()).unwrap();
                let e = EinSum::new("mn,ne->me".parse().unwrap(), f32::datum_type());
                model.wire_node("out2", e, &[p, w]).unwrap()[0]
            },
            1,
        );
    }

    #[test]
    fn leaves_a_softmax_read_twice() {
        let mut model = TypedModel::default();
        let q = model.add_source("q", f32::fact([4, 8])).unwrap();
        let k = model.add_source("k", f32::fact([6, 8])).unwrap();
        let v = model.add_source("v", f32::fact([6, 3])).unwrap();
        let s = model
            .wire_node("scores", EinSum::new("md,nd->mn".parse().unwrap(), f32::datum_type()), &[q, k])
            .unwrap()[0];
        let p = model.wire_node("probs", Softmax::new(tvec![1], None, SoftmaxKind::Softmax), &[s]).unwrap()[0];
        let o =
            model.wire_node("out", EinSum::new("mn,ne->me".parse().unwrap(), f32::datum_type()), &[p, v]).unwrap()[0];
        model.select_output_outlets(&[o, p]).unwrap();
        crate::gemm_matmul::rewrite(&mut model).unwrap();
        assert_eq!(rewrite(&mut model).unwrap(), 0, "the probabilities are an output too");
    }
}
