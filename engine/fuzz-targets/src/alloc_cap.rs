//! A global allocator for fuzzing that refuses absurd single allocations: the system allocator,
//! except that a request over [`CAP`] bytes prints a line naming it and returns null, so the
//! caller aborts ("memory allocation of N bytes failed") and the fuzzer records a crash. It
//! stands in for libFuzzer's `-malloc_limit_mb`, which needs a sanitizer's malloc hooks and so
//! does nothing in the `--sanitizer none` builds of scripts/fuzz.sh; the smoke test uses it too.

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation allowed: 2 GiB (`-malloc_limit_mb=2048`).
pub const CAP: usize = 2 << 30;

/// The capped allocator; install it with `#[global_allocator]`.
pub struct CappedAlloc;

fn refuse(size: usize) -> *mut u8 {
    // Straight to stderr: the test harness captures `eprintln!`, and the abort that follows
    // would lose it.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "fuzz: refused an allocation of {size} bytes (over the {CAP}-byte cap)");
    std::ptr::null_mut()
}

// SAFETY: every call is forwarded unchanged to `System`, or refused with null (allowed).
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP {
            return refuse(l.size());
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > CAP {
            return refuse(l.size());
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        if size > CAP {
            return refuse(size);
        }
        unsafe { System.realloc(p, l, size) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}
