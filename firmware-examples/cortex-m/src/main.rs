//! Cortex-M4F / M7 firmware: runs the `digits` PerceiverIO classifier from a flat weight pack in
//! flash on every bundled test image and compares each result with the host engine's logits
//! (tract, computed before the build). Output over semihosting; exit status 0 only if every
//! class matches and every logit is within tolerance.

#![no_std]
#![no_main]

mod forward;
mod pack;
mod reader;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use forward::{Model, Workspace};
use pack::dims::*;

use cortex_m as _;

#[repr(C, align(4))]
struct Aligned<T: ?Sized>(T);

static TEST_INPUTS: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/test_inputs.bin")));
static EXPECTED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/expected.bin")));

static mut WORKSPACE: Workspace = Workspace::ZERO;

/// Logit tolerance: |firmware - host| <= ABS + REL * |host|. f32 weights differ from tract only
/// in summation order; int8 weights carry their quantisation error.
const TOL: (f32, f32) = if PACK_INT8 { (0.25, 0.05) } else { (1e-4, 1e-4) };

fn f32s(b: &'static [u8]) -> &'static [f32] {
    // SAFETY: 4-byte aligned (Aligned) little-endian f32 data written by build.rs.
    unsafe { core::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

#[entry]
fn main() -> ! {
    // SAFETY: the only reference to WORKSPACE, taken once before anything else runs.
    let ws = unsafe { &mut *core::ptr::addr_of_mut!(WORKSPACE) };
    let model = Model::load();
    let inputs = f32s(&TEST_INPUTS.0);
    let expected = f32s(&EXPECTED.0);
    hprintln!(
        "perceiver-cortex-m: pack {} bytes ({} weights), N x D = {} x {}, M x C = {} x {}, {} test images",
        pack::size(),
        if PACK_INT8 { "int8" } else { "f32" },
        N,
        D,
        M,
        C,
        TESTS
    );
    let mut pixels = [0f32; IN_CH * M];
    let mut logits = [0f32; LABELS];
    let (mut class_mismatch, mut out_of_tol) = (0usize, 0usize);
    let mut max_abs = 0f32;
    for t in 0..TESTS {
        let grey = &inputs[t * M..(t + 1) * M];
        for c in 0..IN_CH {
            pixels[c * M..(c + 1) * M].copy_from_slice(grey);
        }
        model.forward(ws, &pixels, &mut logits);
        let want = &expected[t * LABELS..(t + 1) * LABELS];
        let mut worst = 0f32;
        for (a, b) in logits.iter().zip(want) {
            let d = (a - b).abs();
            worst = worst.max(d);
            if d > TOL.0 + TOL.1 * b.abs() {
                out_of_tol += 1;
            }
        }
        max_abs = max_abs.max(worst);
        let (got, host) = (argmax(&logits), argmax(want));
        if got != host {
            class_mismatch += 1;
        }
        if t < 5 || got != host {
            hprintln!("image {}: class {} (host {}), max |logit diff| {:e}", t, got, host, worst);
        }
    }
    hprintln!(
        "result: {} images, class agreement {}/{}, max |logit - host| {:e}, logits out of tolerance {}",
        TESTS,
        TESTS - class_mismatch,
        TESTS,
        max_abs,
        out_of_tol
    );
    let ok = class_mismatch == 0 && out_of_tol == 0;
    hprintln!("{}", if ok { "PASS" } else { "FAIL" });
    debug::exit(if ok { debug::EXIT_SUCCESS } else { debug::EXIT_FAILURE });
    loop {}
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("panic: {}", info);
    debug::exit(debug::EXIT_FAILURE);
    loop {}
}
