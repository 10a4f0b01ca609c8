//! The perceiver-edge weight pack (`perceiver-edge export --format pack`): a flat little-endian
//! file of every tensor a microcontroller forward pass needs, which `no_std` firmware includes
//! from flash and reads in place. This crate is the format's single definition: magic, version,
//! the header dims table, precision and tensor-kind codes, the header layout, a validating header
//! parser that never panics and a header writer into a caller's buffer. `no_std`, no
//! dependencies, no allocation; used by the exporter, by firmware build scripts and by firmware.
//!
//! Layout (every section 4-byte aligned):
//!
//! ```text
//! 0    "PEPK"  magic                                    MAGIC
//! 4    u32     version                                  VERSION
//! 8    u32     weight precision: 0 = f32, 1 = int8      Precision
//! 12   u32     number of dims                           NUM_DIMS
//! 16   u32[]   dims, in the order of DIMS               DIMS_OFFSET
//! 116  u32     number of tensors T                      TENSOR_COUNT_OFFSET
//! 120  T x (u32 offset, u32 elements, u32 kind, u32 scale_offset)   TABLE_OFFSET, TensorEntry
//! ..   data, from header_len(T) on
//! ```
//!
//! Tensor `k` holds `elements` values at byte `offset`: f32 (kind 0) or int8 (kind 1). An int8
//! tensor is a row-major matrix with one f32 scale per row (`value = q * scale[row]`); its scales
//! are the `(offset - scale_offset) / 4` f32 values from `scale_offset` up to `offset`. f32
//! tensors have `scale_offset` 0. Which tensor is which is the model's business (the exporter
//! documents the order of its head).
//!
//! ```
//! use perceiver_edge_pack_format::{dim, header_len, write_header, Header, Precision, NUM_DIMS};
//!
//! let mut dims = [0u32; NUM_DIMS];
//! dims[dim::LABELS] = 10;
//! let mut pack = [0u8; header_len(0)];
//! write_header(&mut pack, Precision::F32, &dims, &[]).unwrap();
//! let header = Header::parse(&pack).unwrap();
//! assert_eq!((header.dim("LABELS"), header.tensor_count()), (Some(10), 0));
//! ```

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::fmt;

/// Magic bytes at the start of every pack.
pub const MAGIC: [u8; 4] = *b"PEPK";

/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;

macro_rules! dims {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Number of header dims.
        pub const NUM_DIMS: usize = [$(stringify!($name)),*].len();

        /// Header dim names, in file order.
        pub const DIMS: [&str; NUM_DIMS] = [$(stringify!($name)),*];

        /// Index of each header dim in [`DIMS`](crate::DIMS) and in
        /// [`Header::dims`](crate::Header::dims).
        pub mod dim {
            #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
            #[repr(usize)]
            enum Index {
                $($name,)*
            }
            $(
                $(#[doc = $doc])*
                pub const $name: usize = Index::$name as usize;
            )*
        }
    };
}

dims! {
    /// Image height, pixels.
    H,
    /// Image width, pixels.
    W,
    /// Channels per pixel.
    IN_CH,
    /// Input points, `H * W`.
    M,
    /// Input width: `IN_CH` pixel channels plus the Fourier position features.
    C,
    /// Number of latents.
    N,
    /// Latent width.
    D,
    /// Encoder cross-attention query/key width.
    X_QK,
    /// Encoder cross-attention value width.
    X_V,
    /// Encoder cross-attention heads.
    X_HEADS,
    /// Encoder cross-attention MLP hidden width.
    X_HIDDEN,
    /// Encoder cross-attention query residual (0 or 1).
    X_RESIDUAL,
    /// Self-attention query/key width.
    S_QK,
    /// Self-attention value width.
    S_V,
    /// Self-attention heads.
    S_HEADS,
    /// Self-attention MLP hidden width.
    S_HIDDEN,
    /// Self-attention layers per block (the pack stores this many).
    S_LAYERS,
    /// Blocks: the self-attention layers run this many times with the same weights.
    BLOCKS,
    /// Decoder query width.
    E,
    /// Decoder cross-attention query/key width.
    O_QK,
    /// Decoder cross-attention value width.
    O_V,
    /// Decoder cross-attention heads.
    O_HEADS,
    /// Decoder cross-attention MLP hidden width.
    O_HIDDEN,
    /// Decoder cross-attention query residual (0 or 1).
    O_RESIDUAL,
    /// Output classes (logits).
    LABELS,
}

/// Index of header dim `name` in [`DIMS`].
pub fn dim_index(name: &str) -> Option<usize> {
    DIMS.iter().position(|d| *d == name)
}

/// Byte offset of the magic.
pub const MAGIC_OFFSET: usize = 0;
/// Byte offset of the version (u32).
pub const VERSION_OFFSET: usize = 4;
/// Byte offset of the weight precision code (u32, [`Precision`]).
pub const PRECISION_OFFSET: usize = 8;
/// Byte offset of the number of dims (u32, [`NUM_DIMS`]).
pub const NUM_DIMS_OFFSET: usize = 12;
/// Byte offset of the dims (u32 each, in [`DIMS`] order).
pub const DIMS_OFFSET: usize = 16;
/// Byte offset of the number of tensors (u32).
pub const TENSOR_COUNT_OFFSET: usize = DIMS_OFFSET + 4 * NUM_DIMS;
/// Byte offset of the tensor table ([`TensorEntry`] records).
pub const TABLE_OFFSET: usize = TENSOR_COUNT_OFFSET + 4;
/// Bytes of one tensor-table record: u32 offset, elements, kind, scale_offset.
pub const ENTRY_BYTES: usize = 16;

/// Header length in bytes of a pack of `tensors` tensors, i.e. where its data may start
/// (saturates at `usize::MAX`).
pub const fn header_len(tensors: usize) -> usize {
    TABLE_OFFSET.saturating_add(tensors.saturating_mul(ENTRY_BYTES))
}

/// Weight precision of a pack (the header word at [`PRECISION_OFFSET`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Precision {
    /// Every tensor f32.
    F32 = 0,
    /// Linear weights int8 with one f32 scale per output row; the rest f32.
    Int8 = 1,
}

impl Precision {
    /// The header code.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The precision of header code `code`.
    pub const fn from_code(code: u32) -> Option<Precision> {
        match code {
            0 => Some(Precision::F32),
            1 => Some(Precision::Int8),
            _ => None,
        }
    }
}

/// Element type of one tensor (the `kind` word of its [`TensorEntry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Little-endian f32 values.
    F32 = 0,
    /// int8 values with per-row f32 scales at `scale_offset`.
    Int8 = 1,
}

impl Kind {
    /// The table code.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The kind of table code `code`.
    pub const fn from_code(code: u32) -> Option<Kind> {
        match code {
            0 => Some(Kind::F32),
            1 => Some(Kind::Int8),
            _ => None,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Kind::F32 => 4,
            Kind::Int8 => 1,
        }
    }
}

/// One record of the tensor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// Byte offset of the data in the pack.
    pub offset: u32,
    /// Number of elements.
    pub elements: u32,
    /// Element type.
    pub kind: Kind,
    /// Byte offset of the per-row f32 scales (int8), 0 for f32.
    pub scale_offset: u32,
}

impl TensorEntry {
    /// The record as stored in the table.
    pub fn to_bytes(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        for (i, v) in [self.offset, self.elements, self.kind.code(), self.scale_offset].into_iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Bytes of data (`elements` times the element size, saturating).
    pub fn data_len(&self) -> usize {
        (self.elements as usize).saturating_mul(self.kind.size())
    }

    /// Number of per-row scales: `(offset - scale_offset) / 4` for int8, 0 for f32.
    pub fn scale_count(&self) -> usize {
        match self.kind {
            Kind::F32 => 0,
            Kind::Int8 => (self.offset.saturating_sub(self.scale_offset) / 4) as usize,
        }
    }
}

/// Why a pack header was rejected (or could not be written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Shorter than its header needs: `needed` bytes (`usize::MAX` on overflow), `len` present.
    Truncated {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    BadMagic,
    /// A version other than [`VERSION`].
    UnsupportedVersion(u32),
    /// A precision code other than those of [`Precision`].
    UnknownPrecision(u32),
    /// A dims count other than [`NUM_DIMS`].
    DimCount(u32),
    /// A tensor kind code other than those of [`Kind`].
    UnknownKind {
        /// Tensor index.
        tensor: usize,
        /// The code found.
        code: u32,
    },
    /// An int8 tensor in an f32 pack.
    KindMismatch {
        /// Tensor index.
        tensor: usize,
    },
    /// Data offset not 4-byte aligned.
    Misaligned {
        /// Tensor index.
        tensor: usize,
    },
    /// Data not within the pack after the header (or its end overflows).
    OutOfBounds {
        /// Tensor index.
        tensor: usize,
    },
    /// Bad `scale_offset`: for int8, unaligned, inside the header, not before the data, or a
    /// scale count that does not divide the elements; for f32, not 0.
    BadScales {
        /// Tensor index.
        tensor: usize,
    },
    /// Writer: more tensors than a u32 counts.
    TooManyTensors,
    /// Writer: the buffer is shorter than the header.
    BufferTooSmall {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes in the buffer.
        len: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated { needed, len } => write!(f, "truncated pack: header needs {needed} bytes, have {len}"),
            Error::BadMagic => write!(f, "not a perceiver-edge pack (bad magic)"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported pack version {v} (expected {VERSION})"),
            Error::UnknownPrecision(c) => write!(f, "unknown pack precision code {c}"),
            Error::DimCount(n) => write!(f, "pack has {n} header dims, expected {NUM_DIMS}"),
            Error::UnknownKind { tensor, code } => write!(f, "tensor {tensor}: unknown kind code {code}"),
            Error::KindMismatch { tensor } => write!(f, "tensor {tensor}: int8 tensor in an f32 pack"),
            Error::Misaligned { tensor } => write!(f, "tensor {tensor}: data offset not 4-byte aligned"),
            Error::OutOfBounds { tensor } => write!(f, "tensor {tensor}: data outside the pack"),
            Error::BadScales { tensor } => write!(f, "tensor {tensor}: bad scale offset"),
            Error::TooManyTensors => write!(f, "too many tensors for a pack"),
            Error::BufferTooSmall { needed, len } => {
                write!(f, "header buffer too small: needs {needed} bytes, have {len}")
            }
        }
    }
}

impl core::error::Error for Error {}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    let w = b.get(i..i.checked_add(4)?)?;
    Some(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

/// A parsed, validated pack header. Every tensor entry was checked by [`Header::parse`]: known
/// kind, 4-byte aligned offset, data inside the pack after the header, int8 scales 4-byte
/// aligned between the header and the data, a scale count that divides the elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// Weight precision.
    pub precision: Precision,
    /// Dims, in [`DIMS`] order (index with the [`dim`] constants).
    pub dims: [u32; NUM_DIMS],
    table: &'a [u8],
}

impl<'a> Header<'a> {
    /// Parses and validates the header of `pack` (the whole file: offsets are checked against
    /// its length).
    pub fn parse(pack: &'a [u8]) -> Result<Header<'a>, Error> {
        let len = pack.len();
        let word = |i: usize| u32_at(pack, i).ok_or(Error::Truncated { needed: i + 4, len });
        match pack.get(..MAGIC.len()) {
            Some(m) if m == MAGIC => {}
            Some(_) => return Err(Error::BadMagic),
            None if MAGIC.starts_with(pack) => return Err(Error::Truncated { needed: TABLE_OFFSET, len }),
            None => return Err(Error::BadMagic),
        }
        let version = word(VERSION_OFFSET)?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        let code = word(PRECISION_OFFSET)?;
        let precision = Precision::from_code(code).ok_or(Error::UnknownPrecision(code))?;
        let ndims = word(NUM_DIMS_OFFSET)?;
        if ndims as usize != NUM_DIMS {
            return Err(Error::DimCount(ndims));
        }
        let mut dims = [0u32; NUM_DIMS];
        for (i, d) in dims.iter_mut().enumerate() {
            *d = word(DIMS_OFFSET + 4 * i)?;
        }
        let count = word(TENSOR_COUNT_OFFSET)? as usize;
        let header = count.checked_mul(ENTRY_BYTES).and_then(|t| t.checked_add(TABLE_OFFSET));
        let table = header
            .and_then(|end| pack.get(TABLE_OFFSET..end))
            .ok_or(Error::Truncated { needed: header.unwrap_or(usize::MAX), len })?;
        let h = Header { precision, dims, table };
        for tensor in 0..count {
            h.check(tensor, len)?;
        }
        Ok(h)
    }

    fn raw(&self, k: usize) -> Option<[u32; 4]> {
        let at = k.checked_mul(ENTRY_BYTES)?;
        let mut r = [0u32; 4];
        for (i, v) in r.iter_mut().enumerate() {
            *v = u32_at(self.table, at + 4 * i)?;
        }
        Some(r)
    }

    fn check(&self, tensor: usize, len: usize) -> Result<(), Error> {
        let [offset, elements, code, scale_offset] = self.raw(tensor).ok_or(Error::OutOfBounds { tensor })?;
        let kind = Kind::from_code(code).ok_or(Error::UnknownKind { tensor, code })?;
        if kind == Kind::Int8 && self.precision == Precision::F32 {
            return Err(Error::KindMismatch { tensor });
        }
        let (offset, elements, scales) = (offset as usize, elements as usize, scale_offset as usize);
        if offset % 4 != 0 {
            return Err(Error::Misaligned { tensor });
        }
        let end = elements.checked_mul(kind.size()).and_then(|n| n.checked_add(offset));
        if offset < self.byte_len() || end.is_none_or(|e| e > len) {
            return Err(Error::OutOfBounds { tensor });
        }
        let scales_ok = match kind {
            Kind::F32 => scales == 0,
            Kind::Int8 => {
                scales % 4 == 0
                    && scales >= self.byte_len()
                    && scales < offset
                    && elements % ((offset - scales) / 4) == 0
            }
        };
        if !scales_ok {
            return Err(Error::BadScales { tensor });
        }
        Ok(())
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.table.len() / ENTRY_BYTES
    }

    /// Header length in bytes (where the data may start): [`header_len`] of the tensor count.
    pub fn byte_len(&self) -> usize {
        TABLE_OFFSET + self.table.len()
    }

    /// Value of header dim `name` (see [`DIMS`]).
    pub fn dim(&self, name: &str) -> Option<u32> {
        dim_index(name).map(|i| self.dims[i])
    }

    /// Tensor `k` (None past the end).
    pub fn entry(&self, k: usize) -> Option<TensorEntry> {
        let [offset, elements, kind, scale_offset] = self.raw(k)?;
        Some(TensorEntry { offset, elements, kind: Kind::from_code(kind)?, scale_offset })
    }

    /// The tensors, in table order.
    pub fn entries(&self) -> impl Iterator<Item = TensorEntry> + 'a {
        let h = *self;
        (0..h.tensor_count()).filter_map(move |k| h.entry(k))
    }
}

/// Writes the header of a pack (magic through the tensor table, [`header_len`]`(entries.len())`
/// bytes) at the start of `buf` and returns its length. The caller lays the data out after it.
pub fn write_header(
    buf: &mut [u8],
    precision: Precision,
    dims: &[u32; NUM_DIMS],
    entries: &[TensorEntry],
) -> Result<usize, Error> {
    let count = u32::try_from(entries.len()).map_err(|_| Error::TooManyTensors)?;
    let needed = header_len(entries.len());
    let len = buf.len();
    let out = buf.get_mut(..needed).ok_or(Error::BufferTooSmall { needed, len })?;
    out[MAGIC_OFFSET..MAGIC_OFFSET + 4].copy_from_slice(&MAGIC);
    let words = [(VERSION_OFFSET, VERSION), (PRECISION_OFFSET, precision.code()), (NUM_DIMS_OFFSET, NUM_DIMS as u32)];
    for (at, v) in words.into_iter().chain(dims.iter().enumerate().map(|(i, &d)| (DIMS_OFFSET + 4 * i, d))) {
        out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    out[TENSOR_COUNT_OFFSET..TABLE_OFFSET].copy_from_slice(&count.to_le_bytes());
    for (rec, e) in out[TABLE_OFFSET..].chunks_exact_mut(ENTRY_BYTES).zip(entries) {
        rec.copy_from_slice(&e.to_bytes());
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// An int8 pack: an f32 tensor of 3, an int8 [2, 3] matrix with 2 scales, an f32 tensor of
    /// 2 that ends the file.
    fn sample() -> Vec<u8> {
        let dims = core::array::from_fn(|i| i as u32 + 1);
        let h = header_len(3);
        let entries = [
            TensorEntry { offset: h as u32, elements: 3, kind: Kind::F32, scale_offset: 0 },
            TensorEntry { offset: (h + 12 + 8) as u32, elements: 6, kind: Kind::Int8, scale_offset: (h + 12) as u32 },
            TensorEntry { offset: (h + 12 + 8 + 8) as u32, elements: 2, kind: Kind::F32, scale_offset: 0 },
        ];
        let mut b = vec![0u8; h + 12 + 8 + 8 + 8];
        assert_eq!(write_header(&mut b, Precision::Int8, &dims, &entries), Ok(h));
        b
    }

    fn set(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn entry_word(k: usize, i: usize) -> usize {
        TABLE_OFFSET + ENTRY_BYTES * k + 4 * i
    }

    #[test]
    fn dims_table_and_layout() {
        assert_eq!(NUM_DIMS, 25);
        assert_eq!(
            (DIMS[dim::H], DIMS[dim::C], DIMS[dim::S_LAYERS], DIMS[dim::LABELS]),
            ("H", "C", "S_LAYERS", "LABELS")
        );
        assert_eq!(dim::LABELS, NUM_DIMS - 1);
        for (i, name) in DIMS.iter().enumerate() {
            assert_eq!(dim_index(name), Some(i));
        }
        assert_eq!(dim_index("nope"), None);
        assert_eq!((TENSOR_COUNT_OFFSET, TABLE_OFFSET, header_len(2)), (116, 120, 152));
        assert_eq!(header_len(usize::MAX), usize::MAX);
        assert_eq!(Precision::from_code(Precision::Int8.code()), Some(Precision::Int8));
        assert_eq!(Kind::from_code(2), None);
    }

    #[test]
    fn parses_what_it_writes() {
        let b = sample();
        assert_eq!(&b[..4], b"PEPK");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.precision, Precision::Int8);
        assert_eq!((h.dims[dim::H], h.dim("W"), h.dim("x")), (1, Some(2), None));
        assert_eq!((h.tensor_count(), h.byte_len()), (3, header_len(3)));
        let e: Vec<_> = h.entries().collect();
        assert_eq!(e.len(), 3);
        assert_eq!((e[1].kind, e[1].elements, e[1].scale_count(), e[1].data_len()), (Kind::Int8, 6, 2, 6));
        assert_eq!((e[2].scale_count(), e[2].data_len()), (0, 8));
        assert_eq!(h.entry(3), None);
        assert_eq!(
            TensorEntry { offset: 1, elements: 2, kind: Kind::Int8, scale_offset: 3 }.to_bytes()[8..12],
            [1, 0, 0, 0]
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = sample();
        for n in 0..b.len() {
            assert!(Header::parse(&b[..n]).is_err(), "{n} bytes");
        }
        assert_eq!(Header::parse(&b[..10]), Err(Error::Truncated { needed: 12, len: 10 }));
        assert_eq!(Header::parse(&b[..2]), Err(Error::Truncated { needed: TABLE_OFFSET, len: 2 }));
        assert_eq!(Header::parse(&b[..130]).unwrap_err(), Error::Truncated { needed: header_len(3), len: 130 });
        assert_eq!(Header::parse(&b[..b.len() - 1]).unwrap_err(), Error::OutOfBounds { tensor: 2 });
    }

    #[test]
    fn corrupted_headers_are_errors() {
        let b = sample();
        let bad = |at: usize, v: u32| {
            let mut c = b.clone();
            set(&mut c, at, v);
            Header::parse(&c).map(|_| ())
        };
        let mut c = b.clone();
        c[0] = b'X';
        assert_eq!(Header::parse(&c).unwrap_err(), Error::BadMagic);
        assert_eq!(Header::parse(b"PX").unwrap_err(), Error::BadMagic);
        assert_eq!(bad(VERSION_OFFSET, 2), Err(Error::UnsupportedVersion(2)));
        assert_eq!(bad(PRECISION_OFFSET, 7), Err(Error::UnknownPrecision(7)));
        assert_eq!(bad(PRECISION_OFFSET, 0), Err(Error::KindMismatch { tensor: 1 }));
        assert_eq!(bad(NUM_DIMS_OFFSET, 24), Err(Error::DimCount(24)));
        assert_eq!(
            bad(TENSOR_COUNT_OFFSET, u32::MAX),
            Err(Error::Truncated { needed: header_len(u32::MAX as usize), len: b.len() })
        );
        // A longer table runs over tensor 0's data.
        assert_eq!(bad(TENSOR_COUNT_OFFSET, 4), Err(Error::OutOfBounds { tensor: 0 }));
        assert_eq!(bad(entry_word(0, 2), 2), Err(Error::UnknownKind { tensor: 0, code: 2 }));
        assert_eq!(bad(entry_word(0, 0), header_len(3) as u32 + 2), Err(Error::Misaligned { tensor: 0 }));
        assert_eq!(bad(entry_word(0, 0), 16), Err(Error::OutOfBounds { tensor: 0 }));
        assert_eq!(bad(entry_word(0, 0), u32::MAX - 3), Err(Error::OutOfBounds { tensor: 0 }));
        assert_eq!(bad(entry_word(0, 1), u32::MAX), Err(Error::OutOfBounds { tensor: 0 }));
        assert_eq!(bad(entry_word(0, 3), 4), Err(Error::BadScales { tensor: 0 }));
        let scales = header_len(3) as u32 + 12;
        assert_eq!(bad(entry_word(1, 3), 0), Err(Error::BadScales { tensor: 1 }));
        assert_eq!(bad(entry_word(1, 3), scales + 1), Err(Error::BadScales { tensor: 1 }));
        assert_eq!(bad(entry_word(1, 3), scales + 8), Err(Error::BadScales { tensor: 1 }));
        // 5 elements do not split into 2 rows.
        assert_eq!(bad(entry_word(1, 1), 5), Err(Error::BadScales { tensor: 1 }));
        // The scale count is implicit: one scale for 6 elements reads as one row of 6.
        assert_eq!(bad(entry_word(1, 3), scales + 4), Ok(()));
    }

    #[test]
    fn random_corruption_never_panics() {
        let b = sample();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut c = b.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % (header_len(3) / 4) * 4;
                let v = match next() % 4 {
                    0 => next() as u32,
                    1 => (next() % 256) as u32,
                    2 => u32::MAX - (next() % 8) as u32,
                    _ => u32::from_le_bytes(c[at..at + 4].try_into().unwrap()) ^ (1 << (next() % 32)),
                };
                set(&mut c, at, v);
            }
            let n = if next() % 4 == 0 { (next() as usize) % c.len() } else { c.len() };
            if let Ok(h) = Header::parse(&c[..n]) {
                for e in h.entries() {
                    let end = e.offset as usize + e.data_len();
                    assert!(e.offset as usize >= h.byte_len() && end <= n && e.offset % 4 == 0);
                    if e.kind == Kind::Int8 {
                        assert!(e.scale_count() > 0 && e.scale_offset as usize >= h.byte_len());
                    }
                }
            }
        }
    }

    #[test]
    fn writer_checks_the_buffer() {
        let mut small = [0u8; 130];
        let e = TensorEntry { offset: 0, elements: 0, kind: Kind::F32, scale_offset: 0 };
        assert_eq!(
            write_header(&mut small, Precision::F32, &[0; NUM_DIMS], &[e; 2]),
            Err(Error::BufferTooSmall { needed: 152, len: 130 })
        );
        let mut exact = [0u8; 120];
        assert_eq!(write_header(&mut exact, Precision::F32, &[0; NUM_DIMS], &[]), Ok(120));
        assert_eq!(Header::parse(&exact).unwrap().tensor_count(), 0);
    }
}
