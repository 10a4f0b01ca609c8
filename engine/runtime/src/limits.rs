//! Size limits checked before anything is allocated: every size read from a file (a `.npy`
//! header, an ONNX shape, a config value) or given as a flag is turned into bytes with checked
//! arithmetic and compared with a ceiling first.
//!
//! The ceiling on one tensor (an input, an output, a weight, an intermediate activation) is
//! 4 GiB by default; [`set_max_tensor_bytes`] (the CLI's `--max-tensor-gib`) raises or lowers
//! it on purpose. Whole models are compared with the memory the machine has available.

use std::sync::atomic::{AtomicU64, Ordering};

/// The default ceiling on one tensor: 4 GiB.
pub const DEFAULT_MAX_TENSOR_BYTES: u64 = 4 << 30;

/// The most threads `--threads` accepts (far beyond any board; tract spawns one OS thread each).
pub const MAX_THREADS: usize = 256;

/// The most latent layer applications a graph may have (`num_blocks` x
/// `num_self_attends_per_block`; the published checkpoints have 26 to 48).
pub const MAX_LATENT_LAYERS: usize = 4096;

static MAX_TENSOR_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_TENSOR_BYTES);

/// The current ceiling on one tensor, in bytes.
pub fn max_tensor_bytes() -> u64 {
    MAX_TENSOR_BYTES.load(Ordering::Relaxed)
}

/// Sets the ceiling on one tensor, in bytes (process-wide).
pub fn set_max_tensor_bytes(bytes: u64) {
    MAX_TENSOR_BYTES.store(bytes, Ordering::Relaxed);
}

/// A byte count as GiB / MiB / KiB / bytes, for messages.
pub fn human_bytes(bytes: u128) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} bytes")
    }
}

/// Bytes of a tensor of `shape` with `elem_bytes`-byte elements, or an error message (without
/// the subject: the caller names the file, tensor or flag) when the product overflows or the
/// bytes exceed [`max_tensor_bytes`].
pub fn tensor_bytes(shape: &[usize], elem_bytes: usize) -> Result<usize, String> {
    // u128 cannot overflow for any realistic rank; it still saturates, never wraps.
    let bytes = shape.iter().fold(elem_bytes as u128, |acc, &d| acc.saturating_mul(d as u128));
    let max = max_tensor_bytes();
    if bytes > max as u128 {
        return Err(format!(
            "shape {shape:?} needs {}, over the {} limit for one tensor (--max-tensor-gib raises it)",
            human_bytes(bytes),
            human_bytes(max as u128)
        ));
    }
    Ok(bytes as usize)
}

/// Memory this machine can still give a process, in bytes (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An error message when `bytes` of weights cannot fit in this machine's available memory.
pub fn check_fits_memory(bytes: u64) -> Result<(), String> {
    match available_memory() {
        Some(avail) if bytes > avail => Err(format!(
            "{} of weights, more than the {} of memory this machine has available",
            human_bytes(bytes as u128),
            human_bytes(avail as u128)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_without_overflow() {
        assert_eq!(tensor_bytes(&[2, 3], 4), Ok(24));
        assert_eq!(tensor_bytes(&[], 8), Ok(8));
        assert_eq!(tensor_bytes(&[0, usize::MAX], 4), Ok(0));
        let e = tensor_bytes(&[usize::MAX, usize::MAX, 4], 4).unwrap_err();
        assert!(e.contains("over the 4.00 GiB limit"), "{e}");
        let e = tensor_bytes(&[1 << 20, 1 << 10, 2], 4).unwrap_err();
        assert!(e.contains("8.00 GiB"), "{e}");
    }

    #[test]
    fn bytes_read_as_people_say_them() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(13 << 40), "13312.00 GiB");
    }
}
