//! f32 matrix products on the `gemm` crate: a rewrite of the decluttered graph, before tract's
//! code generation.
//!
//! tract 0.23.9's f32 matmul kernels reach less of an x86 core than onnxruntime's MLAS does
//! (issue #11): on a 2-core Xeon with AVX-512, a lone `[128, 256] x [256, 256]` ran at 44 GFLOP/s
//! in tract and 93 in onnxruntime, `[2048, 512] x [512, 512]` at 58 and 83. The `gemm` crate
//! (the f32 kernels of candle and faer: cache blocking over k, AVX-512 / AVX2 / NEON micro-kernels
//! chosen at run time) ran the same products at 150 and 146 GFLOP/s in the same session.
//!
//! [`rewrite`] replaces each f32 `EinSum` of the decluttered graph that is a (batched) matrix
//! product with [`GemmMatMul`]: one contracted axis `k`, an axis `m` of the first operand and `n`
//! of the second kept in the output, every other output axis an outer loop (a batch axis such as
//! attention heads, or a broadcast one). Operands and output are read and written in place
//! through strides, whatever the axis order (a transposed weight, `Q K^T`), so no axis is moved
//! and nothing is packed ahead of the kernel. Anything else (quantised or f16 products, a
//! contraction over several axes, an axis repeated in one operand) stays with tract. With several
//! threads ([`crate::set_threads`]) the products run in tract's thread pool: outer loops of at
//! least as many iterations as threads are split across them, a single product is split by
//! `gemm` itself. Results differ from tract's by the order of the sums only; the tests compare
//! each with a product computed in f64 and the fixtures with transformers. On x86 with AVX2 and
//! FMA or AVX-512, a product by a constant weight runs on [`crate::f32_packed`]'s kernels instead
//! (the weight packed once at load; the crate packs it at every call).

use crate::epilogue::{Finish, Finishes, Rows, Step};
use crate::f32_packed::Packed;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Whether this pass runs (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// Row and column strides of a matrix inside a tensor, in elements.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Strides {
    pub(crate) row: isize,
    pub(crate) col: isize,
}

impl Strides {
    /// A row-major matrix with rows `row` elements apart.
    pub(crate) fn rows(row: usize) -> Strides {
        Strides { row: row as isize, col: 1 }
    }
}

/// `C = scale A B` for `A` of `m x k`, `B` of `k x n` and `C` of `m x n`, each given by its
/// address and strides, on one thread of the `gemm` crate. The crate's kernels write a
/// column-major output fastest, so a row-major product runs as its transpose,
/// `C^T = B^T A^T` (2048 x 768 x 1280: 116 -> 142 GFLOP/s; 256 x 1280 x 1280, 512 x 128 x 512:
/// 2-7 % in interleaved rounds), unless it has fewer than [`TRANSPOSE_MIN_ROWS`] rows and more
/// columns (a vector times a matrix, where the crate's own vector paths take the product as is).
///
/// # Safety
/// The addresses hold the matrices their strides describe, and no one else writes `C` meanwhile.
pub(crate) unsafe fn matmul(
    sizes: (usize, usize, usize),
    c: (*mut f32, Strides),
    a: (*const f32, Strides),
    b: (*const f32, Strides),
    scale: f32,
) {
    matmul_into(sizes, c, a, b, scale, false)
}

/// [`matmul`], or with `add`, `C += scale A B`.
///
/// # Safety
/// As [`matmul`].
pub(crate) unsafe fn matmul_into(
    (m, k, n): (usize, usize, usize),
    (c, cs): (*mut f32, Strides),
    (a, as_): (*const f32, Strides),
    (b, bs): (*const f32, Strides),
    scale: f32,
    add: bool,
) {
    // The crate takes sizes, then each matrix with its column and row strides.
    let (m, n, (c_cs, c_rs), lhs, rhs) = if m > n || m >= TRANSPOSE_MIN_ROWS {
        (n, m, (cs.row, cs.col), (b, bs.row, bs.col), (a, as_.row, as_.col))
    } else {
        (m, n, (cs.col, cs.row), (a, as_.col, as_.row), (b, bs.col, bs.row))
    };
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_cs,
        c_rs,
        add,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        if add { 1.0f32 } else { 0.0 },
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Products of at least this many rows run transposed (see [`matmul`]).
const TRANSPOSE_MIN_ROWS: usize = 16;

/// An outer loop: its extent and the strides it steps the first operand, the second and the
/// output by.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Loop {
    pub(crate) extent: usize,
    pub(crate) a: isize,
    pub(crate) b: isize,
    pub(crate) c: isize,
}

/// `C[.., m, n] = A[.., m, k] B[.., k, n]` for every outer index, through strides.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GemmMatMul {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) a: Strides,
    pub(crate) b: Strides,
    pub(crate) c: Strides,
    pub(crate) loops: Vec<Loop>,
    pub(crate) a_len: usize,
    pub(crate) b_len: usize,
    pub(crate) shape: Vec<usize>,
    /// A constant factor of the product, as f32 bits (an attention's `1 / sqrt(d)` that tract
    /// would otherwise apply in a pass of its own); 1.0 when none.
    pub(crate) scale_bits: u32,
    /// What is applied to each block of the output once computed (bias, residual, GELU), reading
    /// the inputs past the operands; see [`crate::epilogue`].
    pub(crate) epilogue: Vec<Step>,
    /// The second operand, a constant, packed for the runtime's kernels (then not an input); see
    /// [`crate::f32_packed`].
    pub(crate) packed: Option<Arc<Packed>>,
}

fn row_major(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as isize;
    }
    strides
}

/// Merges axes of one role that together walk memory as one axis in every tensor (heads and
/// head size contracted together, an image's rows and columns), until none do.
fn merge_contiguous(v: &mut Vec<Loop>) {
    'again: loop {
        for i in 0..v.len() {
            for j in 0..v.len() {
                let (x, y) = (v[i], v[j]);
                let e = y.extent as isize;
                if i != j && x.a == y.a * e && x.b == y.b * e && x.c == y.c * e {
                    v[i] = Loop { extent: x.extent * y.extent, ..y };
                    v.remove(j);
                    continue 'again;
                }
            }
        }
        return;
    }
}

impl GemmMatMul {
    /// The product `axes` describes over operands of shapes `a` and `b` into `c`, if it is one
    /// this op computes (see the module documentation).
    fn plan(axes: &AxesMapping, a: &[usize], b: &[usize], c: &[usize]) -> Option<GemmMatMul> {
        let (sa, sb, sc) = (row_major(a), row_major(b), row_major(c));
        // (extent, stride in A, stride in B, stride in C) of each output axis that varies.
        let (mut ms, mut ns, mut loops) = (vec![], vec![], vec![]);
        let mut ks = vec![];
        for axis in axes.iter_all_axes() {
            let (ia, ib, ic) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
            if ia.len() > 1 || ib.len() > 1 || ic.len() > 1 {
                return None;
            }
            let (pa, pb, pc) = (ia.first().copied(), ib.first().copied(), ic.first().copied());
            match pc {
                Some(pc) => {
                    let e = c[pc];
                    // An operand with the axis has it at the output's extent, or at 1 (broadcast).
                    let stride = |p: Option<usize>, shape: &[usize], strides: &[isize]| match p {
                        None => Some(0),
                        Some(p) if shape[p] == e => Some(if e == 1 { 0 } else { strides[p] }),
                        Some(p) if shape[p] == 1 => Some(0),
                        Some(_) => None,
                    };
                    let (da, db) = (stride(pa, a, &sa)?, stride(pb, b, &sb)?);
                    if e == 1 {
                        continue;
                    }
                    let l = Loop { extent: e, a: da, b: db, c: sc[pc] };
                    match (da != 0, db != 0) {
                        (true, false) => ms.push(l),
                        (false, true) => ns.push(l),
                        _ => loops.push(l),
                    }
                }
                None => match (pa, pb) {
                    (Some(pa), Some(pb)) if a[pa] == b[pb] => {
                        if a[pa] > 1 {
                            ks.push(Loop { extent: a[pa], a: sa[pa], b: sb[pb], c: 0 });
                        }
                    }
                    // A sum over an axis of one operand only, or of unequal extents.
                    (Some(pa), None) if a[pa] == 1 => {}
                    (None, Some(pb)) if b[pb] == 1 => {}
                    (None, None) => {}
                    _ => return None,
                },
            }
        }
        for v in [&mut ms, &mut ns, &mut ks, &mut loops] {
            merge_contiguous(v);
        }
        let (k, ka, kb) = match ks.as_slice() {
            [] => (1, 0, 0),
            [one] => (one.extent, one.a, one.b),
            _ => return None,
        };
        // The largest A-only axis is m, the largest B-only axis n; the others are outer loops.
        let take_largest = |v: &mut Vec<Loop>| {
            let i = (0..v.len()).max_by_key(|&i| v[i].extent)?;
            Some(v.remove(i))
        };
        let m = take_largest(&mut ms).unwrap_or(Loop { extent: 1, a: 0, b: 0, c: 0 });
        let n = take_largest(&mut ns).unwrap_or(Loop { extent: 1, a: 0, b: 0, c: 0 });
        loops.extend(ms);
        loops.extend(ns);
        Some(GemmMatMul {
            m: m.extent,
            k,
            n: n.extent,
            a: Strides { row: m.a, col: ka },
            b: Strides { row: kb, col: n.b },
            c: Strides { row: m.c, col: n.c },
            loops,
            a_len: a.iter().product(),
            b_len: b.iter().product(),
            shape: c.to_vec(),
            scale_bits: 1f32.to_bits(),
            epilogue: vec![],
            packed: None,
        })
    }

    /// The same product transposed, `C^T = B^T A^T`: operands swapped, rows and columns swapped.
    pub(crate) fn transposed(&self) -> GemmMatMul {
        let t = |s: Strides| Strides { row: s.col, col: s.row };
        GemmMatMul {
            m: self.n,
            n: self.m,
            a: t(self.b),
            b: t(self.a),
            c: t(self.c),
            loops: self.loops.iter().map(|l| Loop { a: l.b, b: l.a, ..*l }).collect(),
            a_len: self.b_len,
            b_len: self.a_len,
            ..self.clone()
        }
    }

    /// Element offsets into A, B and C of outer iteration `i`.
    fn offsets(&self, mut i: usize) -> (isize, isize, isize) {
        let (mut oa, mut ob, mut oc) = (0, 0, 0);
        for l in self.loops.iter().rev() {
            let j = (i % l.extent) as isize;
            i /= l.extent;
            oa += j * l.a;
            ob += j * l.b;
            oc += j * l.c;
        }
        (oa, ob, oc)
    }

    /// Rows `rows` and columns `cols` of one product, at offsets `o` of the buffers at addresses
    /// `a`, `b`, `c`.
    ///
    /// # Safety
    /// The addresses hold `a_len`, `b_len` and the output's number of f32s, and `c` is written by
    /// no one else within this block of the product.
    unsafe fn product(
        &self,
        (a, b, c): (usize, usize, usize),
        o: (isize, isize, isize),
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        finish: &Finish,
    ) {
        let (r, q) = (rows.start as isize, cols.start as isize);
        let a = (a as *const f32).offset(o.0 + r * self.a.row);
        let scale = f32::from_bits(self.scale_bits);
        match &self.packed {
            // Into column 0 of the block's first row (`f32_packed::rewrite` packs only row-major
            // outputs); there is no second operand to address.
            #[cfg(target_arch = "x86_64")]
            Some(p) => {
                let c0 = (c as *mut f32).offset(o.2 + r * self.c.row);
                p.product((a, self.a.row as usize), (c0, self.c.row as usize), rows.len(), cols.clone(), scale);
            }
            _ if self.k > 0 => {
                let b = (b as *const f32).offset(o.1 + q * self.b.col);
                let cb = (c as *mut f32).offset(o.2 + r * self.c.row + q * self.c.col);
                matmul((rows.len(), self.k, cols.len()), (cb, self.c), (a, self.a), (b, self.b), scale);
            }
            _ => {}
        }
        if !finish.steps.is_empty() {
            // An epilogue is only planned on a row-major output without outer loops.
            finish.block(c as *mut f32, self.n, rows, cols);
        }
    }

    /// Inputs before the epilogue's: the two operands, or the first alone when the second is
    /// packed.
    fn operands(&self) -> usize {
        if self.packed.is_some() {
            1
        } else {
            2
        }
    }

    fn outer(&self) -> usize {
        self.loops.iter().map(|l| l.extent).product()
    }

    /// The blocks of work for `threads` threads: each outer product whole when there are at
    /// least as many as threads, else each cut into two blocks a thread (of whole 16-row or
    /// 16-column panels; one a thread below 128 rows or columns a block), as (outer index, rows,
    /// columns). A product by a packed weight is cut along its rows from [`ROWS_EACH`] rows a
    /// thread: each thread then reads and writes only its own rows, which the ops before and after
    /// (LayerNorm, quantisation, the next product) split the same way, so they stay in the cache of
    /// the core that wrote them (cut along the columns, every row was half in the other core's:
    /// the bench model at two threads, `bench --profile`, ran its LayerNorms slower than one thread
    /// did). Other products are cut along their longer side: each block packs the operand it
    /// shares with the others whole, so the shorter side's operand is the one shared. Two blocks a
    /// thread let a thread that a busy neighbour slowed take less of the work: on this 2-core
    /// host, interleaved rounds of `[512, 1024] x [1024, 1024]`, `[256, 1280] x [1280, 1280]` and
    /// `[512, 128] x [128, 512]` (a scratch program, 3 runs of 30 rounds) ran faster in 7 of 9
    /// medians and 7 of 9 90th percentiles with four blocks than with two, by 1-5 %.
    #[cfg(feature = "threads")]
    fn blocks(&self, threads: usize) -> Vec<(usize, std::ops::Range<usize>, std::ops::Range<usize>)> {
        let outer = self.outer();
        if outer >= threads {
            return (0..outer).map(|i| (i, 0..self.m, 0..self.n)).collect();
        }
        let by_rows = self.m >= self.n || (self.packed.is_some() && self.m >= ROWS_EACH * threads);
        let side = if by_rows { self.m } else { self.n };
        let parts = if side >= 2 * threads * 128 { 2 * threads } else { threads };
        let step = side.div_ceil(parts).div_ceil(16) * 16;
        let mut blocks = vec![];
        for i in 0..outer {
            for start in (0..side).step_by(step.max(1)) {
                let part = start..(start + step).min(side);
                blocks.push(if by_rows { (i, part, 0..self.n) } else { (i, 0..self.m, part) });
            }
        }
        blocks
    }

    /// Runs every product, split over tract's thread pool when it has more than one thread.
    fn run(&self, a: &[f32], b: &[f32], c: &mut [f32], finish: &Finish) {
        let bufs = (a.as_ptr() as usize, b.as_ptr() as usize, c.as_mut_ptr() as usize);
        #[cfg(feature = "threads")]
        {
            use rayon::prelude::*;
            if let Some(pool) = crate::thread_pool() {
                let work = [self.n, self.k, self.outer()].iter().fold(self.m, |w, &x| w.saturating_mul(x));
                if work >= PARALLEL_MIN {
                    let threads = pool.current_num_threads();
                    let blocks = self.blocks(threads);
                    pool.install(|| {
                        // SAFETY: lengths checked by `eval`; blocks write disjoint output elements.
                        blocks.into_par_iter().for_each(|(i, rows, cols)| unsafe {
                            self.product(bufs, self.offsets(i), rows, cols, finish)
                        })
                    });
                    return;
                }
            }
        }
        for i in 0..self.outer() {
            // SAFETY: lengths checked by `eval`.
            unsafe { self.product(bufs, self.offsets(i), 0..self.m, 0..self.n, finish) };
        }
    }
}

/// Below this many multiply-adds a product stays on one thread.
#[cfg(feature = "threads")]
const PARALLEL_MIN: usize = 1 << 18;

/// Rows a thread from which a product by a packed weight is split along its rows.
#[cfg(any(feature = "threads", target_arch = "x86_64"))]
pub(crate) const ROWS_EACH: usize = 32;

impl Op for GemmMatMul {
    fn name(&self) -> StaticName {
        // Told apart in `bench --profile`: the time of the steps taken in counts with the product.
        match (self.packed.is_some(), self.epilogue.is_empty()) {
            (false, true) => "GemmMatMul",
            (false, false) => "GemmMatMul+epilogue",
            (true, true) => "PackedMatMul",
            (true, false) => "PackedMatMul+epilogue",
        }
        .into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let scale = f32::from_bits(self.scale_bits);
        let scale = if scale == 1.0 { String::new() } else { format!(", times {scale}") };
        let then = if self.epilogue.is_empty() { String::new() } else { format!(", then {:?}", self.epilogue) };
        Ok(vec![format!("m {} k {} n {}, {} outer{scale}{then}", self.m, self.k, self.n, self.outer())])
    }

    op_as_typed_op!();
}

impl EvalOp for GemmMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let a = inputs[0].try_as_plain_ram()?.as_slice::<f32>()?;
        let operands = self.operands();
        ensure!(a.len() == self.a_len, "GemmMatMul: first operand of {} values, planned for {}", a.len(), self.a_len);
        // A packed second operand is the op's own (its sizes fixed when packed), not an input.
        let b = match self.packed {
            None => {
                let b = inputs[1].try_as_plain_ram()?.as_slice::<f32>()?;
                ensure!(
                    b.len() == self.b_len,
                    "GemmMatMul: second operand of {} values, planned for {}",
                    b.len(),
                    self.b_len
                );
                b
            }
            Some(_) => &[],
        };
        let finish = Finish::new(&self.epilogue, &inputs[operands..], self.m, self.n)?;
        // Every output element is written by exactly one product (read_dst off), unless there
        // is nothing to sum.
        let mut out = match self.k {
            0 => Tensor::zero::<f32>(&self.shape)?,
            _ => unsafe { Tensor::uninitialized_dt(f32::datum_type(), &self.shape)? },
        };
        if self.m * self.n > 0 {
            self.run(a, b, out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, &finish);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl Finishes for GemmMatMul {
    fn rows(&self) -> Option<Rows> {
        let row_major = self.loops.is_empty() && self.c == Strides::rows(self.n);
        (row_major && self.epilogue.is_empty()).then(|| Rows { m: self.m, n: self.n, shape: self.shape.clone() })
    }

    fn finish_with(&mut self, steps: Vec<Step>, shape: Vec<usize>) {
        (self.epilogue, self.shape) = (steps, shape);
    }
}

impl TypedOp for GemmMatMul {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.shape)))
    }

    as_op!();
}

/// The op replacing node `node` of `model`, if it is an f32 matrix product [`GemmMatMul`] runs.
fn candidate(model: &TypedModel, node: &TypedNode) -> Option<GemmMatMul> {
    let op = node.op_as::<EinSum>()?;
    if op.q_params.is_some() || op.operating_dt != f32::datum_type() || node.inputs.len() != 2 {
        return None;
    }
    let fact = |o: OutletId| -> Option<Vec<usize>> {
        let f = model.outlet_fact(o).ok()?;
        (f.datum_type == f32::datum_type() && f.is_plain()).then_some(())?;
        Some(f.shape.as_concrete()?.to_vec())
    };
    let (a, b, c) = (fact(node.inputs[0])?, fact(node.inputs[1])?, fact(OutletId::new(node.id, 0))?);
    GemmMatMul::plan(&op.axes, &a, &b, &c)
}

/// The tensor `o` reshapes, through any chain of reshapes (which keep the order of the values in
/// memory: [`GemmMatMul`] reads the same values at the same offsets either way).
fn before_reshapes(model: &TypedModel, mut o: OutletId) -> OutletId {
    while let Some(op) = model.node(o.node).op_as::<AxisOp>() {
        let input = model.node(o.node).inputs[0];
        if matches!(op, AxisOp::Move(..)) || model.outlet_fact(input).map_or(true, |f| !f.is_plain()) {
            break;
        }
        o = input;
    }
    o
}

/// The `Mul` node that is the only reader of node `id`'s output, and the constant factor it
/// applies, if it multiplies that output (of shape `shape`) by a single constant.
fn scaled_by(model: &TypedModel, id: usize, shape: &[usize]) -> Option<(usize, f32)> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::ops::math::Mul;
    let succ = &model.node(id).outputs[0].successors;
    let [only] = succ.as_slice() else { return None };
    let mul = model.node(only.node);
    let op = mul.op_as::<TypedBinOp>()?;
    if !op.0.is::<Mul>() || mul.inputs.len() != 2 || op.1.is_some() {
        return None;
    }
    let other = mul.inputs[1 - only.slot];
    let k = model.node(other.node).op_as::<Const>()?.val();
    let out = model.outlet_fact(OutletId::new(mul.id, 0)).ok()?;
    if k.len() != 1 || k.datum_type() != f32::datum_type() || out.shape.as_concrete()? != shape {
        return None;
    }
    Some((mul.id, k.cast_to_scalar::<f32>().ok()?))
}

/// Replaces every f32 matrix product of the decluttered `model` that [`GemmMatMul`] computes;
/// returns how many. An operand that is a reshape of another tensor is read from that tensor
/// (tract makes a copy to reshape a tensor another node also reads). A product whose only reader
/// multiplies it by a constant (an attention's `1 / sqrt(d)`) takes the factor in: the crate
/// scales each sum as it stores it, as tract's code generation fuses such a factor into its own
/// kernels (language-perceiver: 28 passes over the scores, 5.9 ms a run, gone).
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    let found: Vec<(usize, GemmMatMul)> =
        model.nodes().iter().filter_map(|n| Some((n.id, candidate(model, n)?))).collect();
    let mut subs = crate::Substitutions::default();
    for (id, op) in &found {
        let node = model.node(*id);
        let name = format!("{}.gemm", node.name);
        let inputs: Vec<OutletId> = node.inputs.iter().map(|&i| before_reshapes(model, i)).collect();
        let mut op = op.clone();
        let mut replaced = OutletId::new(*id, 0);
        if let Some((mul, factor)) = scaled_by(model, *id, &op.shape) {
            op.scale_bits = factor.to_bits();
            replaced = OutletId::new(mul, 0);
        }
        subs.substitute(model, replaced, name, op, &inputs)?;
    }
    model.compact()?;
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `C` of `spec` (einsum notation) computed in f64, and by [`GemmMatMul`].
    fn check(spec: &str, a_shape: &[usize], b_shape: &[usize]) {
        let axes: AxesMapping = spec.parse().unwrap();
        let a: Vec<f32> = (0..a_shape.iter().product()).map(|i: usize| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let b: Vec<f32> = (0..b_shape.iter().product()).map(|i: usize| ((i * 53) % 97) as f32 / 48.0 - 1.0).collect();
        let ta = Tensor::from_shape(a_shape, &a).unwrap();
        let tb = Tensor::from_shape(b_shape, &b).unwrap();
        let want = EinSum::new(axes.clone(), f64::datum_type())
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(
                    ta.cast_to::<f64>().unwrap().into_owned().into_tvalue(),
                    tb.cast_to::<f64>().unwrap().into_owned().into_tvalue()
                ),
            )
            .unwrap();
        let want = &want[0];
        let op = GemmMatMul::plan(&axes, a_shape, b_shape, want.shape()).expect(spec);
        let eval =
            || op.eval(&EvalContext::out_of_plan(), tvec!(ta.clone().into_tvalue(), tb.clone().into_tvalue())).unwrap();
        let mut results = vec![eval()];
        #[cfg(feature = "threads")]
        {
            // Three threads: products split in uneven blocks, or outer loops spread.
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            results.push(multithread_tract_scope(Executor::multithread(3), eval));
        }
        for got in results {
            assert_eq!(got[0].shape(), want.shape(), "{spec}");
            let g = got[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap();
            let w = want.try_as_plain_ram().unwrap().as_slice::<f64>().unwrap();
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{spec} [{i}]: {g} vs {w}");
            }
        }
    }

    #[test]
    fn matches_an_f64_einsum_in_every_layout() {
        check("mk,kn->mn", &[37, 19], &[19, 23]);
        check("mk,nk->mn", &[37, 19], &[23, 19]); // a transposed weight
        check("km,kn->nm", &[19, 37], &[19, 23]); // transposed operand and output
        check("bmk,kn->bmn", &[3, 17, 8], &[8, 5]); // a Linear over a batch
        check("bhmk,bhnk->bhmn", &[2, 3, 9, 4], &[2, 3, 11, 4]); // Q K^T per head
        check("bhmn,bhnk->bhmk", &[2, 3, 9, 11], &[2, 3, 11, 4]); // probs V
        check("hmk,kn->mhn", &[3, 7, 5], &[5, 6]); // an outer axis of A only, output moved
        check("bmk,bkn->bmn", &[1, 7, 5], &[4, 5, 6]); // A broadcast over the batch
        check("mk,k->m", &[7, 5], &[5]); // matrix-vector
        check("k,kn->n", &[5], &[5, 6]);
        check("mak,kn->mn", &[7, 1, 5], &[5, 6]); // a summed axis of extent 1
        check("m,n->mn", &[7], &[6]); // no k: an outer product
        check("bmhd,hdn->bmn", &[2, 7, 3, 4], &[3, 4, 6]); // heads and head size contracted together
        check("mk,kxy->mxy", &[7, 3], &[3, 5, 4]); // n over two axes (an image's rows and columns)
        check("mk,kn->mn", &[150, 70], &[70, 40]); // large enough to be split over threads: along m
        check("mk,nk->nm", &[40, 70], &[150, 70]); // along n, output transposed
        check("bmk,kn->bmn", &[2, 100, 64], &[64, 50]); // fewer outer products than threads
        check("mk,kn->mn", &[800, 20], &[20, 30]); // two blocks a thread, the last one short
        let merged = GemmMatMul::plan(&"mk,kxy->mxy".parse().unwrap(), &[7, 3], &[3, 5, 4], &[7, 5, 4]).unwrap();
        assert_eq!((merged.n, merged.loops.len()), (20, 0));
    }

    #[test]
    fn leaves_other_contractions_to_tract() {
        let plan =
            |spec: &str, a: &[usize], b: &[usize], c: &[usize]| GemmMatMul::plan(&spec.parse().unwrap(), a, b, c);
        assert!(plan("mkj,jkn->mn", &[3, 4, 5], &[5, 4, 6], &[3, 6]).is_none(), "two contracted axes, apart");
        assert!(plan("mk,kn->m", &[3, 4], &[4, 6], &[3]).is_none(), "a sum over n");
        assert!(plan("mm,mn->mn", &[3, 3], &[3, 6], &[3, 6]).is_none(), "a diagonal");
        assert!(plan("bmk,bkn->bmn", &[2, 3, 4], &[3, 4, 5], &[3, 3, 5]).is_none(), "unequal batch");
    }

    /// A product by a packed weight is split along its rows from 32 rows a thread (the bench
    /// model's `[128, 256] x [256, 256]` at two threads), the same product by an input along its
    /// longer side; split either way, at one, two and three threads, its outputs are the same bits
    /// and agree with an f64 product.
    #[cfg(feature = "threads")]
    #[test]
    fn a_product_by_a_packed_weight_splits_along_its_rows() {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        let (m, k, n) = (128, 256, 256);
        let plain = GemmMatMul::plan(&"mk,kn->mn".parse().unwrap(), &[m, k], &[k, n], &[m, n]).unwrap();
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0).collect();
        let rows = |blocks: &[(usize, std::ops::Range<usize>, std::ops::Range<usize>)]| {
            blocks.iter().map(|b| (b.1.clone(), b.2.clone())).collect::<Vec<_>>()
        };
        assert_eq!(rows(&plain.blocks(2)), vec![(0..128, 0..128), (0..128, 128..256)], "by an input: columns");
        if !crate::f32_packed::available() {
            return;
        }
        let packed = GemmMatMul {
            packed: Some(Arc::new(Packed::new(k, n, crate::f32_packed::k_block(k), |r, c| w[r * n + c]))),
            ..plain.clone()
        };
        assert_eq!(rows(&packed.blocks(2)), vec![(0..64, 0..256), (64..128, 0..256)], "by a packed weight: rows");
        assert_eq!(rows(&packed.blocks(3))[0], (0..48, 0..256));
        assert_eq!(rows(&packed.blocks(5))[0], (0..128, 0..64), "under 32 rows a thread: columns");
        let ta = Tensor::from_shape(&[m, k], &a).unwrap();
        let tw = Tensor::from_shape(&[k, n], &w).unwrap();
        let run = |op: &GemmMatMul, inputs: TVec<TValue>| {
            let out = op.eval(&EvalContext::out_of_plan(), inputs).unwrap().remove(0);
            out.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let by_packed = || run(&packed, tvec!(ta.clone().into_tvalue()));
        let by_input = || run(&plain, tvec!(ta.clone().into_tvalue(), tw.clone().into_tvalue()));
        let one = by_packed();
        for threads in [2, 3] {
            let (p, i) = multithread_tract_scope(Executor::multithread(threads), || (by_packed(), by_input()));
            assert!(p == one, "packed weight, {threads} threads: other bits than one thread's");
            for (j, (got, plain)) in p.iter().zip(&i).enumerate() {
                let want: f64 = (0..k).map(|x| a[j / n * k + x] as f64 * w[x * n + j % n] as f64).sum();
                assert!((*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "[{j}] {got} vs {want}");
                assert!((*plain as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "[{j}] by input {plain} vs {want}");
            }
        }
    }

    /// A product then a constant factor (an attention's scores), as tract computes them and as
    /// the rewrite does, with the factor taken into the product.
    #[test]
    fn takes_a_constant_factor_in() {
        use tract_onnx::tract_core::ops::binary::TypedBinOp;
        use tract_onnx::tract_core::ops::math::Mul;
        let mut model = TypedModel::default();
        let a = model.add_source("a", f32::fact([2, 37, 16])).unwrap();
        let b = model.add_source("b", f32::fact([2, 16, 29])).unwrap();
        let axes: AxesMapping = "hmk,hkn->hmn".parse().unwrap();
        let c = model.wire_node("scores", EinSum::new(axes, f32::datum_type()), &[a, b]).unwrap()[0];
        let k = model.add_const("scale", Tensor::from_shape(&[1, 1, 1], &[0.125f32]).unwrap()).unwrap();
        let y = model.wire_node("scaled", TypedBinOp(Box::new(Mul), None), &[k, c]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let ta = Tensor::from_shape(&[2, 37, 16], &(0..2 * 37 * 16).map(|i| (i % 13) as f32 - 6.0).collect::<Vec<_>>())
            .unwrap();
        let tb = Tensor::from_shape(&[2, 16, 29], &(0..2 * 16 * 29).map(|i| (i % 7) as f32 / 3.0).collect::<Vec<_>>())
            .unwrap();
        let run = |m: &TypedModel| {
            let out = m
                .clone()
                .into_runnable()
                .unwrap()
                .run(tvec!(ta.clone().into_tvalue(), tb.clone().into_tvalue()))
                .unwrap();
            out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
        };
        let want = run(&model);
        let mut rewritten = model.clone();
        assert_eq!(rewrite(&mut rewritten).unwrap(), 1);
        assert!(!rewritten.nodes().iter().any(|n| n.op_is::<TypedBinOp>()), "the factor is taken in");
        let got = run(&rewritten);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "[{i}]: {g} vs {w}");
        }
    }
}
