//! A counting global allocator: heap bytes in use and their peak. A binary opts in with
//! `#[global_allocator] static A: perceiver_edge_runtime::alloc::Counting = Counting;`
//! (the CLI does); without it the figures are `None`.
//!
//! It also turns an allocation the system refuses into a one-line `error:` and exit status 1
//! instead of Rust's abort (SIGABRT): a size that slipped past the checks in [`crate::limits`]
//! still ends like any other bad input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static IN_USE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The system allocator with byte counting.
pub struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            refused(layout.size());
        }
        grow(layout.size() as u64);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            refused(new_size);
        }
        IN_USE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        grow(new_size as u64);
        p
    }
}

/// Reports a refused allocation on one line and exits with status 1. Nothing here allocates:
/// `write!` to the unbuffered stderr formats piece by piece.
#[cold]
fn refused(bytes: usize) -> ! {
    use std::io::Write;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let _ = writeln!(
        std::io::stderr(),
        "error: out of memory: the system refused an allocation of {gib:.2} GiB; a size in the input or the options is too large for this machine"
    );
    std::process::exit(1)
}

fn grow(bytes: u64) {
    ACTIVE.store(true, Ordering::Relaxed);
    let now = IN_USE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Heap bytes in use, if the counting allocator is installed.
pub fn in_use() -> Option<u64> {
    ACTIVE.load(Ordering::Relaxed).then(|| IN_USE.load(Ordering::Relaxed))
}

/// Peak heap bytes in use since start or the last [`reset_peak`].
pub fn peak() -> Option<u64> {
    ACTIVE.load(Ordering::Relaxed).then(|| PEAK.load(Ordering::Relaxed))
}

/// Restarts peak tracking from the current usage.
pub fn reset_peak() {
    PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Hands memory the process freed back to the operating system (glibc keeps freed heap pages
/// mapped): called once a model is loaded, so the resident set after loading is what the
/// session holds, not the loader's peak. A no-op where the C library has no `malloc_trim`.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// While alive, large allocations get their own memory maps (glibc `M_MMAP_THRESHOLD` 256 KiB),
/// so a buffer the loader frees (the file's bytes, the protobuf, unpacked weights) goes back to
/// the system at once instead of staying in the heap as free space that still counts as resident
/// (glibc's own threshold grows to 32 MiB once such buffers are freed, and the loader's peak
/// stayed resident). Dropping it sets the threshold to 32 MiB, the most glibc itself would pick:
/// activations reuse heap memory from run to run. `export` holds one too (its trial graphs and
/// tables come and go). Phases nest: the threshold is restored when the outermost ends. A no-op
/// where the C library is not glibc.
pub struct LoadPhase(());

static PHASES: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

impl LoadPhase {
    /// Starts the load phase.
    pub fn begin() -> LoadPhase {
        let mut n = PHASES.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            set_thresholds(256 << 10, 128 << 10);
        }
        *n += 1;
        LoadPhase(())
    }
}

impl Drop for LoadPhase {
    fn drop(&mut self) {
        let mut n = PHASES.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            set_thresholds(32 << 20, 64 << 20);
        }
    }
}

/// Sets glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` (free memory at the top of the heap
/// above which `free` returns it to the system). Setting the first stops glibc from adjusting
/// the second, which it keeps at twice the first: so both are set, as glibc would. With the
/// default 128 KiB trim threshold, each run gave back the activations it freed and faulted
/// them in again at the next (bench model: 4 % of a run).
fn set_thresholds(mmap: i32, trim: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap, trim);
}
