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
/// the system at once instead of staying in the heap as free space that still counts as resident.
/// Dropping it switches to the running regime (`running_regime`), in which activations reuse
/// heap memory from run to run. `export` holds one too (its trial graphs and tables come and go).
/// Phases nest: the running regime starts when the outermost ends. A no-op where the C library is
/// not glibc.
pub struct LoadPhase(());

static PHASES: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

impl LoadPhase {
    /// Starts the load phase.
    pub fn begin() -> LoadPhase {
        let mut n = PHASES.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            // glibc's defaults for the map count and trim threshold; a low map threshold.
            set_regime(256 << 10, 65536, 128 << 10);
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
            running_regime();
        }
    }
}

/// The allocator's regime between loads: allocations of 32 MiB and more (the most glibc would
/// pick itself) get their own memory maps, smaller ones come from the heap, and up to 64 MiB of
/// freed memory stays at the top of the heap (`M_TRIM_THRESHOLD`: twice the map threshold, as
/// glibc keeps it; setting the map threshold stops glibc from adjusting it, and at its default of
/// 128 KiB each run gave back the activations it freed and faulted them in again at the next:
/// bench model, p50 12.4 -> 11.9 ms). Taking every allocation from the heap instead (`M_MMAP_MAX`
/// 0) saved vision-perceiver-fourier the page faults of its 98 MiB scores at each run (6 %), but
/// the heap fragmented: peak RSS 523 -> 602 MiB, growing from run to run.
fn running_regime() {
    set_regime(32 << 20, 65536, 64 << 20);
}

/// Sets glibc's `M_MMAP_THRESHOLD`, `M_MMAP_MAX` and `M_TRIM_THRESHOLD` (free memory at the top
/// of the heap above which `free` returns it to the system).
fn set_regime(mmap_threshold: i32, mmap_max: i32, trim: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
        libc::mallopt(libc::M_MMAP_MAX, mmap_max);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap_threshold, mmap_max, trim);
}
