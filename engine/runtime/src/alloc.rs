//! A counting global allocator: heap bytes in use and their peak. A binary opts in with
//! `#[global_allocator] static A: perceiver_edge_runtime::alloc::Counting = Counting;`
//! (the CLI does); without it the figures are `None`.
//!
//! It also turns an allocation the system refuses into a one-line `error:` and exit status 1
//! instead of Rust's abort (SIGABRT): a size that slipped past the checks in [`crate::limits`]
//! still ends like any other bad input.
//!
//! Large buffers get memory maps of their own: huge pages while loading ([`LoadPhase`]), pages
//! kept from run to run after ([`set_keep_freed`]). A library inside another program (the C API)
//! installs [`Mapped`] instead: the same maps and counts, and a refusal left to Rust's handler.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

static IN_USE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The system allocator with byte counting and large buffers in maps of their own.
pub struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(place(layout, false), layout.size(), 0, true)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(place(layout, true), layout.size(), 0, true)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` are an allocation of this allocator.
        unsafe { free(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` are an allocation of this allocator.
        counted(unsafe { resize(ptr, layout, new_size) }, new_size, layout.size(), true)
    }
}

/// [`Counting`] without its exit: a refused allocation returns null, and Rust's handler aborts
/// as with the system allocator. For a library loaded into another program (the C API), which
/// must not end that program with status 1.
pub struct Mapped;

unsafe impl GlobalAlloc for Mapped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(place(layout, false), layout.size(), 0, false)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(place(layout, true), layout.size(), 0, false)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` are an allocation of this allocator.
        unsafe { free(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` are an allocation of this allocator.
        counted(unsafe { resize(ptr, layout, new_size) }, new_size, layout.size(), false)
    }
}

/// A huge-page map for `layout` while loading, a kept map at run time for a large buffer (zeroed
/// where `zeroed`: a fresh map is zero already, a kept one is zeroed), else the system
/// allocator's buffer; null if refused.
fn place(layout: Layout, zeroed: bool) -> *mut u8 {
    let mut p = huge::map(layout);
    if p.is_null() && !huge::LOADING.load(Ordering::Relaxed) {
        p = keep::alloc(layout, zeroed);
    }
    if p.is_null() {
        // SAFETY: `layout` is the caller's, valid for the system allocator.
        p = unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        };
    }
    p
}

/// Frees a buffer [`place`] or [`resize`] gave (unmaps or keeps a map of ours, else the system
/// allocator frees it) and counts its bytes out.
///
/// # Safety
/// `ptr` and `layout` are such a buffer, not used after.
unsafe fn free(ptr: *mut u8, layout: Layout) {
    // SAFETY: the caller's contract.
    if !unsafe { huge::unmap(ptr, layout.size()) || keep::free(ptr, layout.size()) } {
        unsafe { System.dealloc(ptr, layout) };
    }
    IN_USE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
}

/// Resizes a buffer [`place`] or [`resize`] gave, as `GlobalAlloc::realloc`; null if refused.
///
/// # Safety
/// As `GlobalAlloc::realloc`.
unsafe fn resize(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    match unsafe { huge::remap(ptr, layout, new_size).or_else(|| keep::realloc(ptr, layout, new_size)) } {
        Some(p) => p,
        None => unsafe { System.realloc(ptr, layout, new_size) },
    }
}

/// Counts `bytes` in use at `p` in place of `replaced` bytes (a `realloc`'s old buffer); a null
/// `p` (refused) exits where `exit` ([`refused`]), else is returned as it is.
fn counted(p: *mut u8, bytes: usize, replaced: usize, exit: bool) -> *mut u8 {
    if p.is_null() {
        if exit {
            refused(bytes);
        }
        return p;
    }
    ACTIVE.store(true, Ordering::Relaxed);
    if replaced > 0 {
        IN_USE.fetch_sub(replaced as u64, Ordering::Relaxed);
    }
    let now = IN_USE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Ordering::Relaxed);
    keep::bound(p, bytes);
    p
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

/// Heap bytes in use, if [`Counting`] or [`Mapped`] is installed.
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
    keep::release();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls [`release_freed`] when dropped: the last field of a `Session`, so the pages kept from
/// its large buffers (and free heap memory) go back to the system when it is dropped, not when
/// the next model loads (a C or Python host that frees a model gets its memory back).
pub(crate) struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_freed();
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
            huge::LOADING.store(true, Ordering::Relaxed);
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
            huge::LOADING.store(false, Ordering::Relaxed);
            running_regime();
        }
    }
}

/// The allocator's regime between loads: allocations of 32 MiB and more (the most glibc would
/// pick itself) get their own memory maps (their pages kept when freed: [`set_keep_freed`]),
/// smaller ones come from the heap, and up to 64 MiB of freed memory stays at the top of the
/// heap (`M_TRIM_THRESHOLD`: twice the map threshold, as glibc keeps it; setting the map
/// threshold stops glibc from adjusting it, and at its default of 128 KiB each run gave back the
/// activations it freed and faulted them in again at the next: bench model, p50 12.4 -> 11.9 ms).
/// Taking every allocation from the heap instead (`M_MMAP_MAX` 0) saved vision-perceiver-fourier
/// the page faults of its 98 MiB scores at each run (6 %), but the heap fragmented: peak RSS
/// 523 -> 602 MiB, growing from run to run.
fn running_regime() {
    set_regime(RUN_MAP_THRESHOLD as i32, 65536, 2 * RUN_MAP_THRESHOLD as i32);
}

/// glibc's map threshold between loads (the most it would pick itself): buffers from this size on
/// are the ones [`set_keep_freed`] keeps.
const RUN_MAP_THRESHOLD: usize = 32 << 20;

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

/// Whether freed run-time buffers of 32 MiB or more are kept for the next ones (on by default;
/// off for comparisons: each is then unmapped when freed and the next faults its pages in again).
/// Has effect only with [`Counting`] or [`Mapped`] installed, on Linux with glibc.
pub fn set_keep_freed(on: bool) {
    keep::ENABLED.store(on, Ordering::Relaxed);
    if !on {
        keep::release();
    }
}

/// Bytes of freed large buffers kept for the next ones (see [`set_keep_freed`]).
pub fn kept() -> u64 {
    keep::kept_bytes() as u64
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod keep;

/// Without glibc on Linux every buffer comes from the system allocator.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod keep {
    use std::alloc::Layout;
    use std::sync::atomic::AtomicBool;

    pub static ENABLED: AtomicBool = AtomicBool::new(true);

    pub fn alloc(_: Layout, _: bool) -> *mut u8 {
        std::ptr::null_mut()
    }

    pub unsafe fn free(_: *mut u8, _: usize) -> bool {
        false
    }

    pub unsafe fn realloc(_: *mut u8, _: Layout, _: usize) -> Option<*mut u8> {
        None
    }

    pub fn release() {}

    pub fn bound(_: *mut u8, _: usize) {}

    pub fn kept_bytes() -> usize {
        0
    }
}

/// Whether large buffers allocated while loading get huge pages (on by default; off for
/// comparisons). Has effect only with [`Counting`] or [`Mapped`] installed, on Linux with glibc.
pub fn set_huge_pages(on: bool) {
    huge::ENABLED.store(on, Ordering::Relaxed);
}

/// Huge pages for the loader's large buffers (Linux, glibc).
///
/// Loading copies every weight a few times (the protobuf's bytes, tract's tensor, the packed
/// panels), and each copy lands in fresh memory the kernel maps in 4 KiB pages, one page fault
/// each: a third of language-perceiver f32's load. While a [`LoadPhase`] is alive, a buffer of
/// 2 MiB or more gets a memory map of its own, aligned to 2 MiB and advised as transparent huge
/// pages (`MADV_HUGEPAGE`), so the kernel maps it 2 MiB at a time. A map is zero when made, so a
/// zeroed buffer is not written twice. Its address is kept in a fixed table (nothing here
/// allocates), and freeing it unmaps it whenever that happens. Run-time buffers get no huge pages:
/// a huge page the kernel must first compact memory for would show up as a slow run (those of
/// 32 MiB or more are kept from run to run instead: [`set_keep_freed`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod huge {
    use std::alloc::Layout;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// The huge page size on x86-64 and on ARM with 4 KiB pages; elsewhere the advice just
    /// covers fewer (or no) whole huge pages.
    const HUGE_PAGE: usize = 2 << 20;
    /// Up to this many maps at once; later buffers go to glibc.
    const SLOTS: usize = 4096;

    pub static LOADING: AtomicBool = AtomicBool::new(false);
    pub static ENABLED: AtomicBool = AtomicBool::new(true);
    static MAPS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    /// One past the highest slot ever used: lookups scan only that far.
    static USED: AtomicUsize = AtomicUsize::new(0);

    /// The system's page size (4 KiB where it does not say).
    pub(super) fn page() -> usize {
        // SAFETY: sysconf takes no pointers.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            p as usize
        } else {
            4096
        }
    }

    /// A new map for `layout` if it is loading time and the buffer is large; null otherwise
    /// (the caller asks glibc).
    pub fn map(layout: Layout) -> *mut u8 {
        if layout.size() < HUGE_PAGE
            || layout.align() > HUGE_PAGE
            || !LOADING.load(Ordering::Relaxed)
            || !ENABLED.load(Ordering::Relaxed)
        {
            return std::ptr::null_mut();
        }
        let Some(len) = layout.size().checked_next_multiple_of(page()) else { return std::ptr::null_mut() };
        let Some(total) = len.checked_add(HUGE_PAGE) else { return std::ptr::null_mut() };
        // SAFETY: an anonymous private map at an address the kernel picks; the parts outside
        // the aligned range are unmapped again, and only page-aligned ranges are passed.
        unsafe {
            let base = anonymous(total);
            if base == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            let base = base as usize;
            let start = base.next_multiple_of(HUGE_PAGE);
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            let tail = base + total - (start + len);
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
            if !remember(start) {
                libc::munmap(start as *mut libc::c_void, len);
                return std::ptr::null_mut();
            }
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            start as *mut u8
        }
    }

    /// A private anonymous read-write map of `len` bytes (`MAP_FAILED` if refused).
    pub(super) fn anonymous(len: usize) -> *mut libc::c_void {
        // SAFETY: the kernel picks the address; no memory is touched.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
    }

    fn remember(addr: usize) -> bool {
        for (i, slot) in MAPS.iter().enumerate() {
            if slot.compare_exchange(0, addr, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                USED.fetch_max(i + 1, Ordering::AcqRel);
                LIVE.fetch_add(1, Ordering::AcqRel);
                return true;
            }
        }
        false
    }

    /// Whether `addr` is one of the maps made here.
    #[cfg(test)]
    pub(super) fn is_map(addr: usize) -> bool {
        MAPS[..USED.load(Ordering::Acquire)].iter().any(|s| s.load(Ordering::Relaxed) == addr)
    }

    /// Takes `addr` out of the table; false if it is not one of the maps made here.
    fn forget(addr: usize) -> bool {
        if LIVE.load(Ordering::Acquire) == 0 {
            return false;
        }
        let used = USED.load(Ordering::Acquire);
        for slot in &MAPS[..used] {
            if slot.load(Ordering::Relaxed) == addr
                && slot.compare_exchange(addr, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            {
                LIVE.fetch_sub(1, Ordering::AcqRel);
                return true;
            }
        }
        false
    }

    /// Unmaps `ptr` if it is one of the maps made here; false for glibc's buffers.
    ///
    /// # Safety
    /// `ptr` with `size` bytes is a live allocation of the global allocator.
    pub unsafe fn unmap(ptr: *mut u8, size: usize) -> bool {
        if size < HUGE_PAGE || !forget(ptr as usize) {
            return false;
        }
        let len = size.next_multiple_of(page());
        // SAFETY: the range is the map made for this buffer.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
        true
    }

    /// Resizes one of the maps made here: `mremap` (which moves pages, not bytes) while it
    /// stays large and needs no more than page alignment (all `mremap` keeps), otherwise a new
    /// buffer (a map while loading, glibc's memory else) that the bytes are copied into; `None`
    /// for glibc's buffers. A null inside `Some` is a refusal: the old buffer is kept, though
    /// in the unlikely case that another thread took its table slot meanwhile it is no longer
    /// known as a map (`Counting` exits on a refusal).
    ///
    /// # Safety
    /// `ptr` with `layout` is a live allocation of the global allocator.
    pub unsafe fn remap(ptr: *mut u8, layout: Layout, new_size: usize) -> Option<*mut u8> {
        if layout.size() < HUGE_PAGE || !forget(ptr as usize) {
            return None;
        }
        let old = layout.size().next_multiple_of(page());
        let new = new_size.checked_next_multiple_of(page());
        if let (true, true, Some(new)) = (new_size >= HUGE_PAGE, layout.align() <= page(), new) {
            // SAFETY: the old range is this buffer's map; the kernel moves it if it must.
            let moved = unsafe { libc::mremap(ptr as *mut libc::c_void, old, new, libc::MREMAP_MAYMOVE) };
            if moved == libc::MAP_FAILED {
                remember(ptr as usize);
                return Some(std::ptr::null_mut());
            }
            if remember(moved as usize) {
                return Some(moved as *mut u8);
            }
            // No slot left (another thread took it): its bytes move into glibc's memory below.
            return Some(unsafe { into_new(moved as *mut u8, new, new_size, layout) });
        }
        Some(unsafe { into_new(ptr, old, new_size, layout) })
    }

    /// Copies the map `ptr` (`len` bytes mapped) into a new buffer of `new_size` bytes and
    /// `layout`'s alignment, and unmaps it; null (the map kept) if no buffer is to be had.
    ///
    /// # Safety
    /// `ptr` is a map of `len` bytes made here, no longer in the table, holding `layout`.
    unsafe fn into_new(ptr: *mut u8, len: usize, new_size: usize, layout: Layout) -> *mut u8 {
        use std::alloc::GlobalAlloc;
        // SAFETY: `layout.align()` is a valid alignment and `new_size` was accepted by the caller.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let mut p = map(new_layout);
        if p.is_null() {
            // SAFETY: a plain allocation of the system allocator.
            p = unsafe { std::alloc::System.alloc(new_layout) };
        }
        if p.is_null() {
            remember(ptr as usize);
            return p;
        }
        // SAFETY: both buffers hold at least the bytes copied, and they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, p, new_size.min(layout.size()));
            libc::munmap(ptr as *mut libc::c_void, len);
        }
        p
    }
}

/// Without glibc on Linux every buffer comes from the system allocator.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod huge {
    use std::alloc::Layout;
    use std::sync::atomic::AtomicBool;

    pub static LOADING: AtomicBool = AtomicBool::new(false);
    pub static ENABLED: AtomicBool = AtomicBool::new(true);

    pub fn map(_: Layout) -> *mut u8 {
        std::ptr::null_mut()
    }

    pub unsafe fn unmap(_: *mut u8, _: usize) -> bool {
        false
    }

    pub unsafe fn remap(_: *mut u8, _: Layout, _: usize) -> Option<*mut u8> {
        None
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping of /proc/self/smaps that holds `addr`, if any.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else { continue };
            let Some((start, end)) = range.split_once('-') else { continue };
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
                continue;
            };
            if (start..end).contains(&addr) {
                return lines.find_map(|l| l.strip_prefix("VmFlags:").map(str::to_string));
            }
        }
        None
    }

    /// Whether the mapping holding `addr` is advised as huge pages.
    fn advised(addr: usize) -> bool {
        vm_flags(addr).is_some_and(|f| f.split_whitespace().any(|f| f == "hg"))
    }

    /// Whether this system shows the advice at all: a kernel without transparent huge pages
    /// refuses it, and an emulator (qemu's user mode, which runs the aarch64 tests) drops it.
    fn advice_shows() -> bool {
        // SAFETY: a private anonymous map, advised, looked up, and unmapped.
        unsafe {
            let len = 4 << 20;
            let p = huge::anonymous(len);
            assert_ne!(p, libc::MAP_FAILED);
            let shows = libc::madvise(p, len, libc::MADV_HUGEPAGE) == 0 && advised(p as usize);
            libc::munmap(p, len);
            shows
        }
    }

    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_large_buffer_made_while_loading_is_an_advised_map_that_keeps_its_bytes() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let _phase = LoadPhase::begin();
        let size = 3 << 20;
        let layout = Layout::from_size_align(size, 64).unwrap();
        // SAFETY: each call passes back what the previous one returned, with its layout.
        unsafe {
            let p = Counting.alloc_zeroed(layout);
            assert_eq!(p as usize % (2 << 20), 0, "aligned to a huge page");
            let bytes = std::slice::from_raw_parts_mut(p, size);
            assert!(bytes.iter().all(|&b| b == 0));
            assert!(huge::is_map(p as usize), "a map of its own");
            let shows = advice_shows();
            assert!(advised(p as usize) || !shows, "advised as huge pages");
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // Grown: moved by the kernel if it must, bytes kept.
            let q = Counting.realloc(p, layout, 5 << 20);
            let grown = std::slice::from_raw_parts(q, 5 << 20);
            assert!(grown[..size].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            // Shrunk below the threshold: into glibc's memory, the map gone.
            let small = Counting.realloc(q, Layout::from_size_align(5 << 20, 64).unwrap(), 1 << 20);
            assert!(!huge::is_map(q as usize), "the map is unmapped");
            let kept = std::slice::from_raw_parts(small, 1 << 20);
            assert!(kept.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            Counting.dealloc(small, Layout::from_size_align(1 << 20, 64).unwrap());

            // An alignment past a page: grown into a new map, not `mremap`'s page alignment.
            let wide = Layout::from_size_align(3 << 20, 1 << 20).unwrap();
            let w = Counting.alloc(wide);
            std::ptr::write_bytes(w, 7, 3 << 20);
            let w2 = Counting.realloc(w, wide, 5 << 20);
            assert_eq!(w2 as usize % (1 << 20), 0, "alignment kept");
            assert!(std::slice::from_raw_parts(w2, 3 << 20).iter().all(|&b| b == 7));
            Counting.dealloc(w2, Layout::from_size_align(5 << 20, 1 << 20).unwrap());

            let r = Counting.alloc(layout);
            assert!(huge::is_map(r as usize) && (advised(r as usize) || !shows));
            Counting.dealloc(r, layout);
            assert!(!huge::is_map(r as usize) && !advised(r as usize), "freeing unmaps it");
        }
    }

    #[test]
    fn switched_off_large_buffers_come_from_glibc() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let _phase = LoadPhase::begin();
        set_huge_pages(false);
        let layout = Layout::from_size_align(3 << 20, 64).unwrap();
        // SAFETY: the buffer is freed with its layout.
        unsafe {
            let p = Counting.alloc_zeroed(layout);
            set_huge_pages(true);
            assert!(std::slice::from_raw_parts(p, 3 << 20).iter().all(|&b| b == 0));
            assert!(!huge::is_map(p as usize), "not one of the maps");
            Counting.dealloc(p, layout);
        }
    }
}
