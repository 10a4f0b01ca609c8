//! Reading and writing `.npy` files as tract tensors (float32/float64/int64/int32/int8/uint8/bool).

use crate::{dtype_name, Error, Result};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::ArrayD;

fn npy_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Npy { path: path.display().to_string(), msg: msg.into() }
}

fn try_read<T: ndarray_npy::ReadableElement + Datum>(path: &Path) -> Option<Tensor> {
    let f = File::open(path).ok()?;
    ArrayD::<T>::read_npy(BufReader::new(f)).ok().map(Tensor::from)
}

/// Reads a `.npy` file into a tensor of the element type stored in the file.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    File::open(path).map_err(|e| npy_err(path, format!("cannot open: {e}")))?;
    try_read::<f32>(path)
        .or_else(|| try_read::<i64>(path))
        .or_else(|| try_read::<f64>(path))
        .or_else(|| try_read::<i32>(path))
        .or_else(|| try_read::<i8>(path))
        .or_else(|| try_read::<u8>(path))
        .or_else(|| try_read::<bool>(path))
        .ok_or_else(|| {
            npy_err(path, "not a readable .npy file (expected a C-order float32, float64, int64, int32, int8, uint8 or bool array)")
        })
}

/// Writes a tensor as `.npy` atomically (through [`crate::fsio::write_atomic_with`]).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
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
    let res = crate::fsio::write_atomic_with(path, |w| match t.datum_type() {
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
