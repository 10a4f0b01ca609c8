//! The checks of the pack reader, without `unsafe` and without the pack itself: where each
//! tensor lies and whether the header dims make a model the forward pass can run. `pack.rs`
//! builds its zero-copy slices from these results; the host fuzz target
//! (`engine/fuzz-targets`, `pack_reader`) includes this file and runs it on arbitrary packs.

use perceiver_edge_pack_format::{dim, Header, Kind, NUM_DIMS};

/// A tensor located in the pack: byte ranges checked against the pack's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// Element type.
    pub kind: Kind,
    /// Byte offset of the data (4-byte aligned).
    pub offset: usize,
    /// Number of elements.
    pub elements: usize,
    /// Byte offset of the int8 per-row scales (4-byte aligned; 0 for f32).
    pub scale_offset: usize,
    /// Number of f32 scales (0 for f32).
    pub scales: usize,
}

/// Tensor `k` of a pack of `pack_len` bytes whose header is `header`, which must hold `len`
/// elements; an int8 tensor must have `rows` scales (one per output row; `None`: an int8 tensor
/// is refused, the caller needs f32). Every byte range is re-checked here (the unsafe slices in
/// `pack.rs` rely on it), so a header parsed from another buffer cannot lead out of bounds.
pub fn locate(
    header: &Header<'_>,
    pack_len: usize,
    k: usize,
    len: usize,
    rows: Option<usize>,
) -> Result<Located, &'static str> {
    let e = header.entry(k).ok_or("pack has too few tensors")?;
    let elements = e.elements as usize;
    if elements != len {
        return Err("pack tensor has an unexpected size");
    }
    let (offset, scale_offset, scales) = (e.offset as usize, e.scale_offset as usize, e.scale_count());
    let end = offset.checked_add(e.data_len()).ok_or("pack tensor outside the pack")?;
    if !offset.is_multiple_of(4) || offset < header.byte_len() || end > pack_len {
        return Err("pack tensor outside the pack");
    }
    match (e.kind, rows) {
        (Kind::F32, _) => {}
        (Kind::Int8, None) => return Err("expected an f32 tensor, the pack has int8"),
        (Kind::Int8, Some(rows)) => {
            let scales_end = scales.checked_mul(4).and_then(|n| n.checked_add(scale_offset));
            if !scale_offset.is_multiple_of(4)
                || scale_offset < header.byte_len()
                || scales_end.is_none_or(|s| s > offset)
            {
                return Err("pack tensor scales outside the pack");
            }
            if scales != rows {
                return Err("int8 pack tensor has a scale count other than its rows");
            }
        }
    }
    Ok(Located { kind: e.kind, offset, elements, scale_offset, scales })
}

/// Checks the header dims the forward pass divides by or derives sizes from: heads non-zero
/// and dividing their attention widths, `M = H * W`, `C >= IN_CH`, residual flags 0 or 1.
pub fn check_dims(dims: &[u32; NUM_DIMS]) -> Result<(), &'static str> {
    let d = |i: usize| dims[i] as usize;
    let heads_ok = |heads: usize, qk: usize, v: usize| heads > 0 && qk.is_multiple_of(heads) && v.is_multiple_of(heads);
    if !heads_ok(d(dim::X_HEADS), d(dim::X_QK), d(dim::X_V))
        || !heads_ok(d(dim::S_HEADS), d(dim::S_QK), d(dim::S_V))
        || !heads_ok(d(dim::O_HEADS), d(dim::O_QK), d(dim::O_V))
    {
        return Err("pack dims: attention heads must be non-zero and divide their qk and v widths");
    }
    if d(dim::H).checked_mul(d(dim::W)) != Some(d(dim::M)) {
        return Err("pack dims: M is not H * W");
    }
    if d(dim::C) < d(dim::IN_CH) {
        return Err("pack dims: C is smaller than IN_CH");
    }
    if d(dim::X_RESIDUAL) > 1 || d(dim::O_RESIDUAL) > 1 {
        return Err("pack dims: residual flags must be 0 or 1");
    }
    Ok(())
}
