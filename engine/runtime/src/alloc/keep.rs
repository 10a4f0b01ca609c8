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
//! Pages are never dropped to make a buffer, so buffers in use plus pages kept never exceed the
//! high-water mark of large buffers in use since the last [`release`]: the peak is the one the
//! process would have reached without keeping anything, and the resident set between runs is that
//! peak instead of the buffers still in use. [`release`] (called once a model is loaded) unmaps
//! every kept piece and starts the mark anew. Nothing here allocates: the state is fixed tables
//! behind a mutex, taken only for large buffers.

use super::huge::page;
use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Bytes of buffers in use, of kept pieces, and the most in use at once since [`release`].
    in_use: usize,
    kept_bytes: usize,
    high: usize,
}

static STATE: Mutex<State> = Mutex::new(State::new());

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
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
            in_use: 0,
            kept_bytes: 0,
            high: 0,
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

    /// Counts `len` more bytes in use, then unmaps kept pieces (smallest first) until in use
    /// plus kept is within the high-water mark.
    fn count(&mut self, len: usize) {
        self.in_use += len;
        self.high = self.high.max(self.in_use);
        while self.in_use + self.kept_bytes > self.high && self.kept_n > 0 {
            let i = (0..self.kept_n).min_by_key(|&i| self.kept[i].1).expect("a kept piece");
            unmap(self.remove_kept(i));
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
    s.count(len);
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
    let live = std::mem::replace(&mut s.live[slot], Live { addr: 0, pieces: [(0, 0); PIECES], n: 0 });
    s.in_use -= size.next_multiple_of(page());
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
            s.in_use -= old;
            s.count(new);
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

/// Unmaps every kept piece and starts the high-water mark from the buffers in use.
pub fn release() {
    let mut s = state();
    while s.kept_n > 0 {
        let last = s.kept_n - 1;
        unmap(s.remove_kept(last));
    }
    s.high = s.in_use;
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
    /// index plus one, after `high` MiB were in use at once.
    fn with_kept(sizes: &[usize], high: usize) -> State {
        let mut s = State::new();
        s.high = high * MIB;
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
        s.count(len * MIB);
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
    fn buffers_are_made_of_kept_pages_within_the_high_water_mark() {
        let mut s = with_kept(&[40, 64, 100], 204);
        // The smallest piece that holds it, the rest of that piece kept.
        let (a, la) = make(&mut s, 50);
        assert_eq!((a, la.n), (vec![2; 50], 1), "the 64 MiB map's pages");
        assert_eq!((s.in_use / MIB, kept_sizes(&s)), (50, vec![14, 40, 100]));
        // None holds it: the largest pieces side by side, in one range.
        let (b, lb) = make(&mut s, 150);
        let want: Vec<u8> = [vec![3; 100], vec![1; 40], vec![2; 10]].concat();
        assert_eq!((b, lb.n), (want, 3), "the 100, 40 and 14 MiB pieces' pages");
        let at: Vec<usize> = lb.pieces[..3].iter().map(|p| (p.0 - lb.addr) / MIB).collect();
        assert_eq!(at, [0, 100, 140], "side by side");
        assert_eq!((s.in_use / MIB, kept_sizes(&s), s.high / MIB), (200, vec![4], 204));
        // Past the kept pages: new ones (zero), a new high-water mark, nothing kept beside.
        let (c, lc) = make(&mut s, 60);
        assert_eq!((c, lc.n), ([vec![2; 4], vec![0; 56]].concat(), 2));
        assert_eq!((s.in_use / MIB, kept_sizes(&s), s.high / MIB), (260, vec![], 260));
        release_all(s, &[la, lb, lc]);
    }

    #[test]
    fn a_full_table_unmaps_the_smallest_piece() {
        let mut s = with_kept(&vec![1; KEPT], KEPT);
        s.keep(with_kept(&[2], 2).remove_kept(0));
        assert_eq!((s.kept_n, s.kept_bytes / MIB), (KEPT, KEPT + 1), "a 1 MiB piece unmapped for the 2 MiB one");
        let small = with_kept(&[1], 1).remove_kept(0);
        s.keep(small);
        assert_eq!((s.kept_n, s.kept_bytes / MIB), (KEPT, KEPT + 1), "no smaller piece: this one unmapped");
        release_all(s, &[]);
    }
}
