//! Reading and writing `.npy` files as tract tensors (float32/float64/int64/int32/int8/uint8/bool).

use crate::{dtype_name, Error, Result};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::Path;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::ArrayD;

fn npy_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Npy { path: path.display().to_string(), msg: msg.into() }
}

fn try_read<T: ndarray_npy::ReadableElement + Datum>(path: &Path) -> Result<Tensor> {
    let f = File::open(path).map_err(|e| npy_err(path, format!("cannot open: {e}")))?;
    ArrayD::<T>::read_npy(BufReader::new(f))
        .map(Tensor::from)
        .map_err(|e| npy_err(path, format!("not a readable .npy file: {}", e.to_string().replace('\n', " "))))
}

/// The most bytes a `.npy` header may declare (numpy itself refuses headers over 10 000 bytes
/// unless told otherwise).
const MAX_HEADER_BYTES: usize = 65536;

/// What a `.npy` header declares, read and checked before any data is allocated.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyHeader {
    /// numpy dtype string (`<f4`, `|u1`, ...).
    pub descr: String,
    /// Element shape.
    pub shape: Vec<usize>,
    /// Bytes of element data the header declares.
    pub data_bytes: usize,
}

/// Reads and checks the header of `path`: magic, version, header length, dtype, shape; the
/// declared data size must stay under [`crate::limits::max_tensor_bytes`] and equal what the
/// file holds after the header.
pub fn read_header(path: &Path) -> Result<NpyHeader> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| npy_err(path, format!("cannot open: {e}")))?;
    let file_len = f.metadata().map_err(|e| npy_err(path, format!("cannot read: {e}")))?.len();
    let mut pre = [0u8; 12];
    let got = f.read(&mut pre).map_err(|e| npy_err(path, format!("cannot read: {e}")))?;
    if got < 10 || &pre[..6] != b"\x93NUMPY" {
        return Err(npy_err(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (header_len, start) = match pre[6] {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, 10usize),
        2 | 3 if got == 12 => (u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize, 12usize),
        v => return Err(npy_err(path, format!(".npy format version {v} is not supported (1, 2 or 3)"))),
    };
    if header_len > MAX_HEADER_BYTES || (start + header_len) as u64 > file_len {
        return Err(npy_err(
            path,
            format!("header declares {header_len} bytes; the file holds {file_len} bytes (at most {MAX_HEADER_BYTES} accepted)"),
        ));
    }
    let mut text = vec![0u8; header_len];
    f.seek(std::io::SeekFrom::Start(start as u64)).map_err(|e| npy_err(path, format!("cannot read: {e}")))?;
    f.read_exact(&mut text).map_err(|e| npy_err(path, format!("cannot read header: {e}")))?;
    let text = String::from_utf8_lossy(&text);
    let field = |key: &str| -> Option<&str> {
        let at = text.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let bad = |what: &str| npy_err(path, format!("malformed header: {what}"));
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad("no 'descr' string"))?
        .to_string();
    let shape_text = field("shape").and_then(|r| r.strip_prefix('(')).and_then(|r| r.split(')').next());
    let shape: Vec<usize> = shape_text
        .ok_or_else(|| bad("no 'shape' tuple"))?
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("'shape' must be a tuple of non-negative integers"))?;
    let elem: usize = match descr.get(1..).and_then(|d| d.get(1..)).map(str::parse::<usize>) {
        Some(Ok(n)) if matches!(descr.as_bytes()[1], b'f' | b'i' | b'u' | b'b') && [1, 2, 4, 8].contains(&n) => n,
        _ => return Err(npy_err(path, format!("dtype '{descr}' is not supported"))),
    };
    let data_bytes = crate::limits::tensor_bytes(&shape, elem).map_err(|m| npy_err(path, m))?;
    let held = file_len - (start + header_len) as u64;
    if held != data_bytes as u64 {
        return Err(npy_err(
            path,
            format!("the header declares {descr} {shape:?} ({data_bytes} bytes of data); the file holds {held} bytes"),
        ));
    }
    Ok(NpyHeader { descr, shape, data_bytes })
}

/// Reads a `.npy` file into a tensor of the element type stored in the file. The header is
/// checked first ([`read_header`]): nothing is allocated for a size the file does not hold.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let h = read_header(path)?;
    match &h.descr.as_bytes()[1..] {
        b"f4" => try_read::<f32>(path),
        b"f8" => try_read::<f64>(path),
        b"i8" => try_read::<i64>(path),
        b"i4" => try_read::<i32>(path),
        b"i1" => try_read::<i8>(path),
        b"u1" => try_read::<u8>(path),
        b"b1" => try_read::<bool>(path),
        _ => Err(npy_err(
            path,
            format!(
                "dtype '{}' is not supported (expected float32, float64, int64, int32, int8, uint8 or bool)",
                h.descr
            ),
        )),
    }
}

/// Writes a tensor as `.npy` atomically (through [`crate::fsio`]).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    stage_npy(path, t)?.commit().map_err(|e| npy_err(path, format!("cannot write: {e}")))
}

/// Writes a tensor as `.npy` under a temporary name next to `path`, renamed into place by
/// [`crate::fsio::Staged::commit`] (so several outputs appear together or not at all).
pub fn stage_npy(path: &Path, t: &Tensor) -> Result<crate::fsio::Staged> {
    let dt = t.datum_type();
    let view_err = |e: TractError| npy_err(path, format!("cannot write: {e}"));
    let f32_copy;
    let t = if dt == DatumType::F16 {
        f32_copy = t.cast_to::<f32>().map_err(view_err)?.into_owned();
        &f32_copy
    } else {
        t
    };
    let io = |e: ndarray_npy::WriteNpyError| std::io::Error::other(e.to_string());
    let res = crate::fsio::stage_with(path, |w| match t.datum_type() {
        DatumType::F32 => t.to_plain_array_view::<f32>().map_err(std::io::Error::other)?.write_npy(w).map_err(io),
        DatumType::F64 => t.to_plain_array_view::<f64>().map_err(std::io::Error::other)?.write_npy(w).map_err(io),
        DatumType::I64 => t.to_plain_array_view::<i64>().map_err(std::io::Error::other)?.write_npy(w).map_err(io),
        DatumType::I32 => t.to_plain_array_view::<i32>().map_err(std::io::Error::other)?.write_npy(w).map_err(io),
        DatumType::I8 => t.to_plain_array_view::<i8>().map_err(std::io::Error::other)?.write_npy(w).map_err(io),
        DatumType::U8 => t.to_plain_array_view::<u8>().map_err(std::io::Error::other)?.write_npy(w).map_err(io),
        other => Err(std::io::Error::other(format!("cannot write {} tensors", dtype_name(other)))),
    });
    res.map_err(|e| npy_err(path, format!("cannot write: {e}")))
}
