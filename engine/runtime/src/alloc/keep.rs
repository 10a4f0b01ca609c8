//! Run-time buffers of 32 MiB or more kept when freed, for the next ones (Linux, glibc).
//!
//! glibc maps every buffer of 32 MiB or more on its own and unmaps it when freed, so each run
//! faults its large activations in again, a 4 KiB page at a time: optical flow at 368x496 about
//! 540 000 faults a run, and a fault cost 1.6-5 us on the 2-core cloud VMs measured (first touch
//! of a fresh 235 MiB map 98-312 ms, a `memset` of it once touched 9.4 ms). onnxruntime's arena
//! keeps its buffers from run to run. Here such a buffer gets a private map of its own; freed, the
//! map is kept, and the next large buffer takes a kept one, resized with `mremap` (which moves
//! pages, not bytes: only the pages it grows by are new). The smallest kept map at least as large
//! is taken, else the largest.
//!
//! Memory stays bounded by the high-water mark of large buffers in use since the last
//! [`release`]: buffers in use plus maps kept never exceed it, so the peak is the one the process
//! would have reached without keeping anything; kept maps are shrunk or unmapped to make room.
//! The resident set between runs is that peak instead of the buffers still in use.
//! [`release`] (called once a model is loaded) unmaps all kept maps and starts the mark anew.
//! Nothing here allocates: the state is a fixed table behind a mutex, taken only for large
//! buffers.

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Buffers from this size on are kept (glibc maps these on its own whatever its settings).
pub const MIN: usize = 32 << 20;
/// Large buffers in use at once that are tracked; more go to glibc.
const LIVE: usize = 256;
/// Maps kept at once; more are unmapped.
const KEPT: usize = 64;

/// Whether freed large buffers are kept (on by default).
pub static ENABLED: AtomicBool = AtomicBool::new(true);

struct State {
    /// Addresses of the large buffers in use made here (0: a free slot).
    live: [usize; LIVE],
    /// Kept maps as (address, bytes); the first `kept_n` are used.
    kept: [(usize, usize); KEPT],
    kept_n: usize,
    /// Bytes of maps in use, kept, and the most in use at once since the last [`release`].
    in_use: usize,
    kept_bytes: usize,
    high: usize,
}

static STATE: Mutex<State> =
    Mutex::new(State { live: [0; LIVE], kept: [(0, 0); KEPT], kept_n: 0, in_use: 0, kept_bytes: 0, high: 0 });

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn page() -> usize {
    // SAFETY: sysconf takes no pointers.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl State {
    fn track(&mut self, addr: usize) -> bool {
        match self.live.iter_mut().find(|s| **s == 0) {
            Some(slot) => {
                *slot = addr;
                true
            }
            None => false,
        }
    }

    fn untrack(&mut self, addr: usize) -> bool {
        match self.live.iter_mut().find(|s| **s == addr) {
            Some(slot) => {
                *slot = 0;
                true
            }
            None => false,
        }
    }

    /// Takes out the kept map for a buffer of `len` bytes: the smallest at least as large, else
    /// the largest.
    fn take(&mut self, len: usize) -> Option<(usize, usize)> {
        let maps = &self.kept[..self.kept_n];
        let fits = maps.iter().enumerate().filter(|(_, m)| m.1 >= len).min_by_key(|(_, m)| m.1);
        let i = fits.or_else(|| maps.iter().enumerate().max_by_key(|(_, m)| m.1))?.0;
        let map = self.kept[i];
        self.kept_n -= 1;
        self.kept[i] = self.kept[self.kept_n];
        self.kept_bytes -= map.1;
        Some(map)
    }

    /// Counts `len` more bytes in use, then shrinks or unmaps kept maps (largest first) until
    /// in use plus kept is within the high-water mark.
    fn grow(&mut self, len: usize) {
        self.in_use += len;
        self.high = self.high.max(self.in_use);
        while self.in_use + self.kept_bytes > self.high && self.kept_n > 0 {
            let excess = self.in_use + self.kept_bytes - self.high;
            let i = (0..self.kept_n).max_by_key(|&i| self.kept[i].1).expect("a kept map");
            let (addr, bytes) = self.kept[i];
            let keep = bytes.saturating_sub(excess.next_multiple_of(page()));
            if keep >= MIN {
                // SAFETY: the tail of a kept map, page-aligned; nothing refers to it.
                unsafe { libc::munmap((addr + keep) as *mut libc::c_void, bytes - keep) };
                self.kept[i].1 = keep;
                self.kept_bytes -= bytes - keep;
            } else {
                // SAFETY: a kept map; nothing refers to it.
                unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
                self.kept_n -= 1;
                self.kept[i] = self.kept[self.kept_n];
                self.kept_bytes -= bytes;
            }
        }
    }
}

/// A buffer for `layout` (zero-filled where `zeroed`) from a kept map or a new one, if it is large,
/// keeping is on and it is not loading time; null otherwise (the caller asks glibc).
pub fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    if layout.size() < MIN || layout.align() > page() || !ENABLED.load(Ordering::Relaxed) {
        return std::ptr::null_mut();
    }
    let len = layout.size().next_multiple_of(page());
    let mut s = state();
    if !s.live.contains(&0) {
        return std::ptr::null_mut();
    }
    let mut p = libc::MAP_FAILED;
    if let Some((addr, bytes)) = s.take(len) {
        // SAFETY: a kept map, resized (moved if the kernel must): its bytes and pages go along.
        p = unsafe { libc::mremap(addr as *mut libc::c_void, bytes, len, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            // SAFETY: the kept map, which nothing refers to.
            unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
        } else if zeroed {
            // Pages past the old size are new, zero already.
            // SAFETY: the first bytes of the map just made this buffer's.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes.min(len)) };
        }
    }
    if p == libc::MAP_FAILED {
        p = super::huge::anonymous(len);
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
    }
    s.track(p as usize);
    s.grow(len);
    p as *mut u8
}

/// Keeps (or unmaps) `ptr` if it is one of the buffers made here; false for others.
///
/// # Safety
/// `ptr` with `size` bytes is a live allocation of the global allocator.
pub unsafe fn free(ptr: *mut u8, size: usize) -> bool {
    if size < MIN {
        return false;
    }
    let mut s = state();
    if !s.untrack(ptr as usize) {
        return false;
    }
    let len = size.next_multiple_of(page());
    s.in_use -= len;
    if ENABLED.load(Ordering::Relaxed) && s.kept_n < KEPT {
        let n = s.kept_n;
        s.kept[n] = (ptr as usize, len);
        s.kept_n += 1;
        s.kept_bytes += len;
    } else {
        // SAFETY: the buffer's own map, freed by the caller.
        unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
    }
    true
}

/// Resizes `ptr` if it is one of the buffers made here (`None` for others): with `mremap` while it
/// stays large and needs no more than page alignment, else into a buffer of glibc's (null inside
/// `Some` if refused, the old buffer kept).
///
/// # Safety
/// `ptr` with `layout` is a live allocation of the global allocator.
pub unsafe fn realloc(ptr: *mut u8, layout: Layout, new_size: usize) -> Option<*mut u8> {
    if layout.size() < MIN || !state().live.contains(&(ptr as usize)) {
        return None;
    }
    let old = layout.size().next_multiple_of(page());
    if new_size >= MIN && layout.align() <= page() {
        let new = new_size.checked_next_multiple_of(page())?;
        // SAFETY: the buffer's own map; the kernel moves it if it must.
        let p = unsafe { libc::mremap(ptr as *mut libc::c_void, old, new, libc::MREMAP_MAYMOVE) };
        if p == libc::MAP_FAILED {
            return Some(std::ptr::null_mut());
        }
        let mut s = state();
        s.untrack(ptr as usize);
        s.track(p as usize);
        s.in_use -= old;
        s.grow(new);
        return Some(p as *mut u8);
    }
    // SAFETY: `layout.align()` is a valid alignment and `new_size` was accepted by the caller.
    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    // SAFETY: a plain allocation of the system allocator.
    let p = unsafe { std::alloc::GlobalAlloc::alloc(&std::alloc::System, new_layout) };
    if !p.is_null() {
        // SAFETY: both buffers hold the bytes copied and do not overlap; then the old one is freed.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, p, new_size.min(layout.size()));
            free(ptr, layout.size());
        }
    }
    Some(p)
}

/// Unmaps every kept map and starts the high-water mark from the buffers in use.
pub fn release() {
    let mut s = state();
    for i in 0..s.kept_n {
        let (addr, bytes) = s.kept[i];
        // SAFETY: a kept map; nothing refers to it.
        unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
    }
    s.kept_n = 0;
    s.kept_bytes = 0;
    s.high = s.in_use;
}

/// Bytes of kept maps.
pub fn kept_bytes() -> usize {
    state().kept_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A state (not the process's) holding kept maps of these sizes (MiB), after `high` MiB were
    /// in use at once.
    fn with_kept(sizes: &[usize], high: usize) -> State {
        let mut s =
            State { live: [0; LIVE], kept: [(0, 0); KEPT], kept_n: 0, in_use: 0, kept_bytes: 0, high: high * MIB };
        for &b in sizes {
            let p = super::super::huge::anonymous(b * MIB);
            assert_ne!(p, libc::MAP_FAILED);
            s.kept[s.kept_n] = (p as usize, b * MIB);
            s.kept_n += 1;
            s.kept_bytes += b * MIB;
        }
        s
    }

    fn kept_sizes(s: &State) -> Vec<usize> {
        let mut v: Vec<usize> = s.kept[..s.kept_n].iter().map(|m| m.1 / MIB).collect();
        v.sort();
        v
    }

    /// Takes a map out for `len` MiB as `alloc` does (the map then the caller's: unmapped here).
    fn take_and_use(s: &mut State, len: usize) -> usize {
        let (addr, bytes) = s.take(len * MIB).expect("a kept map");
        // SAFETY: the map just taken out; nothing refers to it.
        unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
        s.grow(len * MIB);
        bytes / MIB
    }

    #[test]
    fn takes_the_smallest_map_that_fits_else_the_largest_within_the_high_water_mark() {
        let mut s = with_kept(&[40, 64, 100], 204);
        assert_eq!(take_and_use(&mut s, 50), 64, "the smallest that fits");
        assert_eq!((s.in_use / MIB, kept_sizes(&s)), (50, vec![40, 100]), "in use plus kept: 190 of 204");
        assert_eq!(take_and_use(&mut s, 120), 100, "none fits: the largest");
        // 170 in use and 40 kept is over 204: the kept map shrunk by 6.
        assert_eq!((s.in_use / MIB, kept_sizes(&s), s.high / MIB), (170, vec![34], 204));
        s.grow(100 * MIB);
        // A new high-water mark: nothing may be kept beside what is in use.
        assert_eq!((s.in_use / MIB, kept_sizes(&s), s.high / MIB, s.kept_bytes), (270, vec![], 270, 0));
        assert!(s.take(MIB).is_none());
    }
}
