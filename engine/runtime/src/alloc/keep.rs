//! Run-time buffers of 32 MiB or more made of kept pages (Linux, glibc).
//!
//! glibc maps every buffer of 32 MiB or more on its own and unmaps it when freed, so each run
//! faults its large activations in again, a 4 KiB page at a time: optical flow at 368x496 about
//! 450 000 faults a run, and a fault cost 1.6-5 us on the 2-core cloud VMs measured (first touch
//! of a fresh 235 MiB map 98-312 ms, a `memset` of it once touched 9.4 ms). onnxruntime's arena
//! keeps its buffers from run to run. Here the pages of a freed large buffer are kept, as pieces
//! (address ranges each within one memory map), and the next large buffer is made of them: the
//! smallest kept piece that holds it whole (the rest of the piece stays kept), else the largest
//! pieces moved side by side into a new range with `mremap` (which moves pages, not bytes), up to
//! [`PIECES`], new pages only for what they do not cover.
//!
//! Kept pages only fill room the process would have held anyway: every megabyte allocated, when
//! glibc makes a buffer of [`PREDICT_MIN`] or more (its pages not yet resident counted, before it
//! is written), and before a large buffer's pages are kept, the resident set is read, and kept
//! pages are unmapped while it is past the most the process held besides kept pages since the
//! last [`release`] ([`sample`]). Between runs the process holds what the run left room for. (Bounded by the
//! large buffers in use, as in session 48, kept pages stayed resident while smaller buffers grew
//! the heap later in the run: one `run` of vision-perceiver-learned int8 peaked at 264-295 MiB
//! RSS against 241-245 without keeping; the bytes in use, or the heap's high-water mark, missed
//! what glibc's heap holds beyond them.) [`release`] (called once a model is loaded, and when a
//! session is dropped) unmaps every kept piece and starts the mark anew. Nothing here allocates:
//! the state is fixed tables behind a mutex, taken only for large buffers and to unmap.

use super::huge::page;
use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Buffers from this size on are made here: glibc's map threshold at run time.
const MIN: usize = super::RUN_MAP_THRESHOLD;
/// Large buffers in use at once that are tracked; more go to glibc.
const LIVE: usize = 256;
/// Pieces a buffer is made of at most.
const PIECES: usize = 8;
/// Pieces kept at once; past that the smallest are unmapped.
const KEPT: usize = 256;

/// Whether freed large buffers are kept (on by default).
pub static ENABLED: AtomicBool = AtomicBool::new(true);

/// The process's kept bytes, read without the lock on every allocation ([`bound`]).
static KEPT_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Whether a buffer was made here since [`release`]: only then is the resident set sampled.
static SAMPLING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated since the resident set was last read ([`bound`]).
static SINCE: AtomicU64 = AtomicU64::new(0);
/// The resident set is read again once this many bytes were allocated.
const SAMPLE_EVERY: u64 = 1 << 20;
/// The most the process held besides its kept pages (resident set less kept bytes) at the reads
/// since [`release`]: what it would have held without keeping, and what it may hold with them.
static HIGH: AtomicU64 = AtomicU64::new(0);
/// `/proc/self/statm` opened (-1: not yet), and the process it was opened in (a forked child
/// opens its own).
static STATM: AtomicI32 = AtomicI32::new(-1);
static STATM_PID: AtomicI32 = AtomicI32::new(0);

/// An address range, `(address, bytes)`, page-aligned, within one memory map.
type Piece = (usize, usize);

/// A large buffer in use: its address (0: a free slot) and the pieces it is made of, in order.
#[derive(Clone, Copy)]
struct Live {
    addr: usize,
    pieces: [Piece; PIECES],
    n: usize,
}

struct State {
    live: [Live; LIVE],
    kept: [Piece; KEPT],
    kept_n: usize,
    /// Bytes of kept pieces.
    kept_bytes: usize,
}

static STATE: Mutex<State> = Mutex::new(State::new());

/// The process's state, whose kept bytes are published to [`KEPT_BYTES`] when the guard drops.
struct Guard(std::sync::MutexGuard<'static, State>);

impl std::ops::Deref for Guard {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        KEPT_BYTES.store(self.0.kept_bytes, Ordering::Relaxed);
    }
}

fn state() -> Guard {
    Guard(STATE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Unmaps a piece nothing refers to.
fn unmap((addr, bytes): Piece) {
    // SAFETY: the range is a piece of a map made here, which no buffer uses.
    unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
}

impl State {
    const fn new() -> State {
        State {
            live: [Live { addr: 0, pieces: [(0, 0); PIECES], n: 0 }; LIVE],
            kept: [(0, 0); KEPT],
            kept_n: 0,
            kept_bytes: 0,
        }
    }

    fn remove_kept(&mut self, i: usize) -> Piece {
        let piece = self.kept[i];
        self.kept_n -= 1;
        self.kept[i] = self.kept[self.kept_n];
        self.kept_bytes -= piece.1;
        piece
    }

    /// Keeps a piece; with the table full, the smallest piece (this one or a kept one) is unmapped.
    fn keep(&mut self, piece: Piece) {
        if self.kept_n == KEPT {
            let i = (0..KEPT).min_by_key(|&i| self.kept[i].1).expect("a kept piece");
            if self.kept[i].1 >= piece.1 {
                return unmap(piece);
            }
            unmap(self.remove_kept(i));
        }
        self.kept[self.kept_n] = piece;
        self.kept_n += 1;
        self.kept_bytes += piece.1;
    }

    /// A buffer of `len` bytes made of kept pages and, where they do not cover it, new ones: its
    /// pieces, how many, and the bytes at its start that were kept pages; `None` if no map is to
    /// be had.
    fn make(&mut self, len: usize) -> Option<([Piece; PIECES], usize, usize)> {
        let mut pieces = [(0, 0); PIECES];
        let whole = (0..self.kept_n).filter(|&i| self.kept[i].1 >= len).min_by_key(|&i| self.kept[i].1);
        if let Some(i) = whole {
            let (addr, bytes) = self.remove_kept(i);
            if bytes > len {
                self.keep((addr + len, bytes - len));
            }
            pieces[0] = (addr, len);
            return Some((pieces, 1, len));
        }
        let base = super::huge::anonymous(len);
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base as usize;
        let (mut at, mut n) = (0, 0);
        while at < len && n < PIECES - 1 && self.kept_n > 0 {
            let i = (0..self.kept_n).max_by_key(|&i| self.kept[i].1).expect("a kept piece");
            let (addr, bytes) = self.remove_kept(i);
            let take = bytes.min(len - at);
            // SAFETY: the first `take` bytes of a kept piece (one map) moved over new pages of
            // this buffer's range, which nothing else uses.
            let moved = unsafe {
                libc::mremap(
                    addr as *mut libc::c_void,
                    take,
                    take,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    (base + at) as *mut libc::c_void,
                )
            };
            if moved == libc::MAP_FAILED {
                self.keep((addr, bytes));
                break;
            }
            if bytes > take {
                self.keep((addr + take, bytes - take));
            }
            pieces[n] = (base + at, take);
            n += 1;
            at += take;
        }
        if at < len {
            pieces[n] = (base + at, len - at);
            n += 1;
        }
        Some((pieces, n, at))
    }

    /// Unmaps at least `bytes` of kept pages (all of them if fewer are kept): the smallest pieces
    /// whole, then the end of the one that covers what is left.
    fn trim(&mut self, bytes: usize) {
        let mut left = bytes.checked_next_multiple_of(page()).unwrap_or(usize::MAX);
        while left > 0 && self.kept_n > 0 {
            let i = (0..self.kept_n).min_by_key(|&i| self.kept[i].1).expect("a kept piece");
            let (addr, len) = self.remove_kept(i);
            if len > left {
                unmap((addr + len - left, left));
                self.keep((addr, len - left));
                return;
            }
            unmap((addr, len));
            left -= len;
        }
    }

    fn find(&self, addr: usize) -> Option<usize> {
        self.live.iter().position(|l| l.addr == addr)
    }
}

/// A buffer for `layout` (zero-filled where `zeroed`) of kept pages and new ones, if it is large
/// and keeping is on; null otherwise (the caller asks glibc).
pub fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    if layout.size() < MIN || layout.align() > page() || !ENABLED.load(Ordering::Relaxed) {
        return std::ptr::null_mut();
    }
    let len = layout.size().next_multiple_of(page());
    let mut s = state();
    let Some(slot) = s.find(0) else { return std::ptr::null_mut() };
    let Some((pieces, n, reused)) = s.make(len) else { return std::ptr::null_mut() };
    let addr = pieces[0].0;
    if zeroed {
        // New pages are zero already.
        // SAFETY: the buffer's first `reused` bytes, kept pages nothing else uses.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0, reused) };
    }
    s.live[slot] = Live { addr, pieces, n };
    SAMPLING.store(true, Ordering::Relaxed);
    addr as *mut u8
}

/// Keeps the pages of `ptr` (or unmaps them, keeping off) if it is one of the buffers made here;
/// false for others.
///
/// # Safety
/// `ptr` with `size` bytes is a live allocation of the global allocator.
pub unsafe fn free(ptr: *mut u8, size: usize) -> bool {
    if size < MIN {
        return false;
    }
    let mut s = state();
    let Some(slot) = s.find(ptr as usize) else { return false };
    // Its pages in use are part of the resident set now: a read before keeping them.
    sample(&mut s, 0);
    let live = std::mem::replace(&mut s.live[slot], Live { addr: 0, pieces: [(0, 0); PIECES], n: 0 });
    let on = ENABLED.load(Ordering::Relaxed);
    for &piece in &live.pieces[..live.n] {
        if on {
            s.keep(piece);
        } else {
            unmap(piece);
        }
    }
    true
}

/// Resizes `ptr` if it is one of the buffers made here (`None` for others): a buffer of one piece
/// with `mremap` while it stays large and needs no more than page alignment, else into a new
/// buffer (null inside `Some` if refused, the old buffer kept).
///
/// # Safety
/// `ptr` with `layout` is a live allocation of the global allocator.
pub unsafe fn realloc(ptr: *mut u8, layout: Layout, new_size: usize) -> Option<*mut u8> {
    if layout.size() < MIN {
        return None;
    }
    {
        let mut s = state();
        let slot = s.find(ptr as usize)?;
        let old = layout.size().next_multiple_of(page());
        if s.live[slot].n == 1 && new_size >= MIN && layout.align() <= page() {
            // A size past the last page is refused here: the buffer is this module's, not glibc's.
            let Some(new) = new_size.checked_next_multiple_of(page()) else { return Some(std::ptr::null_mut()) };
            // SAFETY: the buffer's one map; the kernel moves it if it must.
            let p = unsafe { libc::mremap(ptr as *mut libc::c_void, old, new, libc::MREMAP_MAYMOVE) };
            if p == libc::MAP_FAILED {
                return Some(std::ptr::null_mut());
            }
            s.live[slot].addr = p as usize;
            s.live[slot].pieces[0] = (p as usize, new);
            return Some(p as *mut u8);
        }
    }
    // SAFETY: `layout.align()` is a valid alignment and `new_size` was accepted by the caller.
    let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
    let mut p = alloc(new_layout, false);
    if p.is_null() {
        // SAFETY: a plain allocation of the system allocator.
        p = unsafe { std::alloc::GlobalAlloc::alloc(&std::alloc::System, new_layout) };
    }
    if !p.is_null() {
        // SAFETY: both buffers hold the bytes copied and do not overlap; then the old one is freed.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, p, new_size.min(layout.size()));
            free(ptr, layout.size());
        }
    }
    Some(p)
}

/// Unmaps every kept piece and starts the high-water mark anew from the resident set.
pub fn release() {
    let mut s = state();
    while s.kept_n > 0 {
        let last = s.kept_n - 1;
        unmap(s.remove_kept(last));
    }
    HIGH.store(resident().unwrap_or(0), Ordering::Relaxed);
    SAMPLING.store(false, Ordering::Relaxed);
    SINCE.store(0, Ordering::Relaxed);
}

/// Buffers from this size on (and under [`MIN`]) are checked for pages not yet resident when
/// made, while pages are kept ([`bound`]).
const PREDICT_MIN: usize = 256 << 10;

/// Counts an allocation of `bytes` at `ptr` (once a buffer was made here since [`release`]): a
/// buffer of [`PREDICT_MIN`] or more but under [`MIN`] (glibc's, or a huge-page map while
/// loading), with pages kept, is checked for pages its first writes will bring in (`mincore`),
/// and the resident set is read with them counted ([`sample`]), before they are touched; past
/// [`SAMPLE_EVERY`] bytes since the last read, it is read anyway. Called after every allocation.
pub fn bound(ptr: *mut u8, bytes: usize) {
    if !SAMPLING.load(Ordering::Relaxed) {
        return;
    }
    if (PREDICT_MIN..MIN).contains(&bytes) && KEPT_BYTES.load(Ordering::Relaxed) > 0 {
        SINCE.store(0, Ordering::Relaxed);
        // Counted before the lock is taken: `mincore` needs none.
        let coming = untouched(ptr as usize, bytes);
        return sample(&mut state(), coming);
    }
    if SINCE.fetch_add(bytes as u64, Ordering::Relaxed) + (bytes as u64) >= SAMPLE_EVERY {
        SINCE.store(0, Ordering::Relaxed);
        sample(&mut state(), 0);
    }
}

/// Bytes of the pages of `[addr, addr + bytes)` that are not resident (0 if `mincore` fails).
fn untouched(addr: usize, bytes: usize) -> u64 {
    let page = page();
    let start = addr / page * page;
    let pages = (addr + bytes).div_ceil(page) - start / page;
    let mut vec = [0u8; 4096];
    let mut missing = 0u64;
    for first in (0..pages).step_by(vec.len()) {
        let n = vec.len().min(pages - first);
        // SAFETY: a range of this process's mapped pages (a live buffer's), `n` bytes of `vec`.
        let r = unsafe { libc::mincore((start + first * page) as *mut libc::c_void, n * page, vec.as_mut_ptr()) };
        if r != 0 {
            return 0;
        }
        missing += vec[..n].iter().filter(|&&b| b & 1 == 0).count() as u64;
    }
    missing * page as u64
}

/// Reads the resident set, adds `coming` bytes about to be brought in (a new buffer's pages),
/// raises [`HIGH`] to what the process then holds besides its kept pages, and unmaps kept pages
/// (the smallest pieces first) past it: the process never holds more than it would have without
/// keeping, give or take what was allocated and touched since the last read. Where the resident
/// set cannot be read, nothing is kept.
fn sample(s: &mut State, coming: u64) {
    if s.kept_n == 0 && !SAMPLING.load(Ordering::Relaxed) {
        return;
    }
    let Some(rss) = resident() else { return s.trim(usize::MAX) };
    let rss = rss + coming;
    let kept = s.kept_bytes as u64;
    let besides = rss.saturating_sub(kept);
    let high = HIGH.fetch_max(besides, Ordering::Relaxed).max(besides);
    if rss > high {
        s.trim((rss - high) as usize);
    }
}

/// The resident set in bytes (`/proc/self/statm`, its second field), without allocating. Called
/// with the state's lock held, so one thread at a time opens the file.
fn resident() -> Option<u64> {
    // SAFETY: getpid takes no pointers.
    let pid = unsafe { libc::getpid() };
    let mut fd = STATM.load(Ordering::Relaxed);
    if fd < 0 || STATM_PID.load(Ordering::Relaxed) != pid {
        if fd >= 0 {
            // SAFETY: this process's copy of the parent's descriptor, used only here.
            unsafe { libc::close(fd) };
        }
        // SAFETY: a NUL-terminated path; the descriptor is kept for the process's life.
        fd = unsafe { libc::open(c"/proc/self/statm".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        STATM.store(fd, Ordering::Relaxed);
        STATM_PID.store(pid, Ordering::Relaxed);
        if fd < 0 {
            return None;
        }
    }
    let mut buf = [0u8; 128];
    // SAFETY: reads at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n <= 0 {
        return None;
    }
    let text = std::str::from_utf8(&buf[..n as usize]).ok()?;
    let pages: u64 = text.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page() as u64)
}

/// Bytes of kept pieces.
pub fn kept_bytes() -> usize {
    state().kept_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A state (not the process's) holding kept maps of these sizes (MiB), each filled with its
    /// index plus one.
    fn with_kept(sizes: &[usize]) -> State {
        let mut s = State::new();
        for (i, &b) in sizes.iter().enumerate() {
            let p = super::super::huge::anonymous(b * MIB);
            assert_ne!(p, libc::MAP_FAILED);
            // SAFETY: the map just made.
            unsafe { std::ptr::write_bytes(p as *mut u8, i as u8 + 1, b * MIB) };
            s.keep((p as usize, b * MIB));
        }
        s
    }

    fn kept_sizes(s: &State) -> Vec<usize> {
        let mut v: Vec<usize> = s.kept[..s.kept_n].iter().map(|m| m.1 / MIB).collect();
        v.sort();
        v
    }

    /// Makes a buffer of `len` MiB as `alloc` does: its bytes, one per MiB, and its pieces.
    fn make(s: &mut State, len: usize) -> (Vec<u8>, Live) {
        let (pieces, n, _) = s.make(len * MIB).expect("a buffer");
        let live = Live { addr: pieces[0].0, pieces, n };
        // SAFETY: the buffer just made, `len` MiB.
        let bytes = (0..len).map(|m| unsafe { *((live.addr + m * MIB) as *const u8) }).collect();
        (bytes, live)
    }

    fn release_all(mut s: State, live: &[Live]) {
        for l in live {
            l.pieces[..l.n].iter().for_each(|&p| unmap(p));
        }
        while s.kept_n > 0 {
            let p = s.remove_kept(0);
            unmap(p);
        }
    }

    #[test]
    fn buffers_are_made_of_kept_pages() {
        let mut s = with_kept(&[40, 64, 100]);
        // The smallest piece that holds it, the rest of that piece kept.
        let (a, la) = make(&mut s, 50);
        assert_eq!((a, la.n), (vec![2; 50], 1), "the 64 MiB map's pages");
        assert_eq!(kept_sizes(&s), vec![14, 40, 100]);
        // None holds it: the largest pieces side by side, in one range.
        let (b, lb) = make(&mut s, 150);
        let want: Vec<u8> = [vec![3; 100], vec![1; 40], vec![2; 10]].concat();
        assert_eq!((b, lb.n), (want, 3), "the 100, 40 and 14 MiB pieces' pages");
        let at: Vec<usize> = lb.pieces[..3].iter().map(|p| (p.0 - lb.addr) / MIB).collect();
        assert_eq!(at, [0, 100, 140], "side by side");
        assert_eq!(kept_sizes(&s), vec![4]);
        // Past the kept pages: new ones (zero).
        let (c, lc) = make(&mut s, 60);
        assert_eq!((c, lc.n), ([vec![2; 4], vec![0; 56]].concat(), 2));
        assert_eq!(kept_sizes(&s), Vec::<usize>::new());
        release_all(s, &[la, lb, lc]);
    }

    #[test]
    fn trimming_unmaps_the_smallest_pieces_then_the_end_of_one() {
        let mut s = with_kept(&[40, 64, 100]);
        s.trim(50 * MIB);
        assert_eq!((kept_sizes(&s), s.kept_bytes / MIB), (vec![54, 100], 154), "40 whole, 10 off the 64");
        // The head of the cut piece still holds its bytes: a buffer made of it.
        let (a, la) = make(&mut s, 54);
        assert_eq!(a, vec![2; 54]);
        s.trim(1);
        assert_eq!(s.kept_bytes, 100 * MIB - page(), "a byte: one page off the end of the 100 MiB piece");
        s.trim(usize::MAX);
        assert_eq!((s.kept_n, s.kept_bytes), (0, 0), "more than kept (all there is): all");
        release_all(s, &[la]);
    }

    #[test]
    fn the_resident_set_is_this_processs_even_after_a_fork() {
        let _lock = state();
        let from_file = || -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * page() as u64
        };
        let near = |a: u64, b: u64| a.abs_diff(b) <= 16 << 20;
        let (got, want) = (resident().expect("statm"), from_file());
        assert!(near(got, want), "{got} vs {want}");
        // A forked child finds its parent's descriptor: the pid differs, so it opens its own.
        // SAFETY: getpid takes no pointers.
        let pid = unsafe { libc::getpid() };
        STATM_PID.store(pid + 1, Ordering::Relaxed);
        let (got, want) = (resident().expect("statm"), from_file());
        assert!(near(got, want), "{got} vs {want}");
        assert_eq!(STATM_PID.load(Ordering::Relaxed), pid);
    }

    #[test]
    fn untouched_counts_the_pages_not_yet_brought_in() {
        let page = page();
        let p = super::super::huge::anonymous(8 * page) as usize;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        for i in [0, 3, 7] {
            // SAFETY: a page of the map just made.
            unsafe { *((p + i * page) as *mut u8) = 1 };
        }
        assert_eq!(untouched(p, 8 * page), 5 * page as u64);
        // A range inside pages: every page it touches counts (pages 3 and 4, the 4th not in).
        assert_eq!(untouched(p + 3 * page + 100, page), page as u64);
        unmap((p, 8 * page));
    }

    #[test]
    fn a_full_table_unmaps_the_smallest_piece() {
        let mut s = with_kept(&vec![1; KEPT]);
        s.keep(with_kept(&[2]).remove_kept(0));
        assert_eq!((s.kept_n, s.kept_bytes / MIB), (KEPT, KEPT + 1), "a 1 MiB piece unmapped for the 2 MiB one");
        let small = with_kept(&[1]).remove_kept(0);
        s.keep(small);
        assert_eq!((s.kept_n, s.kept_bytes / MIB), (KEPT, KEPT + 1), "no smaller piece: this one unmapped");
        release_all(s, &[]);
    }
}
