//! Fuzz smoke (CI, stable, no instrumentation): every committed seed of `fuzz/corpus/<target>/`
//! and a fixed number of deterministic mutations of them (bit flips, byte edits, truncations,
//! insertions, chunk copies, little-endian length-field edits, numbers in text replaced by
//! extreme ones) through each target body. A body that panics fails the test, naming the case
//! and saving it to `target/fuzz-smoke-failures/`; an allocation over 2 GiB aborts the test
//! binary (`perceiver_edge_fuzz_targets::alloc_cap`, as in the fuzzer). Measured: 6.5 s in the
//! release profile on 2 cores (the tests run in parallel).
//!
//! A panic in this repository's code fails the case even where the library caught it and
//! reported a one-line error (`Session` turns a panic inside tract into an error; its rewrites
//! and kernels live in `engine/runtime` and must refuse bad graphs, not panic): a panic hook
//! notes where each panic happened.
//!
//! `FUZZ_SMOKE_CASES=N` overrides the mutations per target (e.g. a longer local run);
//! `FUZZ_SMOKE_TRACE=1` prints each case's name before running it and writes its bytes to
//! `target/fuzz-smoke-failures/<target>/current` (to find the one that aborted).

use perceiver_edge_fuzz_targets::alloc_cap::CappedAlloc;
use perceiver_edge_fuzz_targets::{body, in_this_repository, set_limits, TARGETS};
use std::path::{Path, PathBuf};

/// Refuses single allocations over 2 GiB: the caller aborts the test binary (after the test
/// harness printed which test ran; run one test with `--exact` to narrow it down).
#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

thread_local! {
    /// Where the last panic on this thread happened, if in this repository's code.
    static OURS: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Notes each panic in this repository's code ([`in_this_repository`]) for [`smoke`], and prints
/// it.
fn note_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let Some(at) = info.location() else { return };
            if in_this_repository(at.file()) {
                let at = format!("{}:{}: {}", at.file(), at.line(), info.payload_as_str().unwrap_or("?"));
                eprintln!("panic at {at}");
                OURS.with_borrow_mut(|o| *o = Some(at));
            }
        }))
    });
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed seeds of `target`, sorted by name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "{}: no seeds", dir.display());
    v
}

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING_U32: [u32; 10] = [0, 1, 2, 3, 4, 0x7f, 0xffff, 0x7fff_ffff, 0x8000_0000, u32::MAX];
const INTERESTING_NUMBERS: [&str; 15] = [
    "0",
    "-1",
    "1",
    "2",
    "1000000",
    "4294967296",
    "1e300",
    "-0",
    "null",
    "3.5",
    "99999999999999999999",
    "\"x\"",
    "[]",
    "[0]",
    "1e9",
];

/// One mutation of `s`: `text` inputs also get their numbers replaced.
fn mutate(s: &[u8], rng: &mut Rng, text: bool) -> Vec<u8> {
    let mut v = s.to_vec();
    for _ in 0..1 + rng.below(3) {
        let n = v.len();
        match rng.below(if text { 9 } else { 8 }) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'\n', b'"', b'[', b'9'][rng.below(8)];
            }
            2 => v.truncate(rng.below(n + 1)),
            3 => {
                let at = rng.below(n + 1);
                let k = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..k).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            4 if n > 0 => {
                // Copy a chunk elsewhere (repeats structure: tables, JSON entries).
                let from = rng.below(n);
                let len = 1 + rng.below((n - from).min(64));
                let chunk = v[from..from + len].to_vec();
                let at = rng.below(n + 1);
                v.splice(at..at, chunk);
            }
            5 | 6 if n >= 4 => {
                // A little-endian u32 (pack words, length prefixes, header lengths).
                let at = if rng.below(2) == 0 { rng.below(n / 4) * 4 } else { rng.below(n - 3) };
                let old = u32::from_le_bytes(v[at..at + 4].try_into().unwrap());
                let new = match rng.below(4) {
                    0 => INTERESTING_U32[rng.below(INTERESTING_U32.len())],
                    1 => old.wrapping_add(1),
                    2 => old.wrapping_sub(1),
                    _ => rng.next() as u32,
                };
                v[at..at + 4].copy_from_slice(&new.to_le_bytes());
            }
            7 if n >= 8 => {
                // A little-endian u64 (the safetensors header length).
                let at = rng.below(n - 7);
                let new = [0u64, 1, u64::MAX, 1 << 40, 1 << 32][rng.below(5)];
                v[at..at + 8].copy_from_slice(&new.to_le_bytes());
            }
            8 => {
                // A run of digits in text (config.json, TOML, npy header) -> an extreme number.
                let starts: Vec<usize> =
                    (0..n).filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit())).collect();
                if let Some(&i) = starts.get(rng.below(starts.len())) {
                    let end = (i..n).find(|&j| !v[j].is_ascii_digit()).unwrap_or(n);
                    let with = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())].as_bytes().to_vec();
                    v.splice(i..end, with);
                }
            }
            _ => {}
        }
    }
    v
}

/// Mutations per target: each takes about 1-10 s in the release profile on an idle 2-core
/// machine (the tests run in parallel; a loaded machine may take several times longer).
fn cases(target: &str) -> usize {
    if let Some(n) = std::env::var("FUZZ_SMOKE_CASES").ok().and_then(|s| s.parse().ok()) {
        return n;
    }
    match target {
        "export_checkpoint" => 4000,
        "npy_inputs" => 5000,
        "onnx_load_run" => 1000,
        "board_profile" => 20_000,
        "pack_reader" => 100_000,
        _ => 1000,
    }
}

fn smoke(target: &str) {
    note_panics();
    set_limits();
    let f = body(target).unwrap();
    let seeds = seeds(target);
    let text = matches!(target, "export_checkpoint" | "npy_inputs" | "board_profile");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let mut failures = vec![];
    let t0 = std::time::Instant::now();
    let n = cases(target);
    let trace = std::env::var_os("FUZZ_SMOKE_TRACE").is_some();
    let mut run = |name: String, data: &[u8]| {
        if trace {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{target}: {name}");
            let dir = root().join("target/fuzz-smoke-failures").join(target);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join("current"), data);
        }
        OURS.with_borrow_mut(|o| *o = None);
        let escaped = std::panic::catch_unwind(|| f(data)).is_err();
        let ours = OURS.with_borrow_mut(|o| o.take());
        if escaped || ours.is_some() {
            let dir = root().join("target/fuzz-smoke-failures").join(target);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(&name), data);
            failures.push(match ours {
                Some(at) => format!("{name} (panic at {at})"),
                None => name,
            });
        }
    };
    for (name, data) in &seeds {
        run(format!("seed-{name}"), data);
    }
    for i in 0..n {
        let (name, seed) = &seeds[rng.below(seeds.len())];
        let data = mutate(seed, &mut rng, text);
        run(format!("mutation-{i}-of-{name}"), &data);
    }
    eprintln!("{target}: {} seeds + {n} mutations in {:.1} s", seeds.len(), t0.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{target}: {} of {} cases panicked (saved under target/fuzz-smoke-failures/{target}/): {failures:?}",
        failures.len(),
        seeds.len() + n
    );
}

#[test]
fn targets_are_listed() {
    for t in TARGETS {
        assert!(root().join("fuzz/fuzz_targets").join(format!("{t}.rs")).is_file(), "{t}");
        assert!(!seeds(t).is_empty());
    }
    assert!(body("nope").is_none());
}

#[test]
fn export_checkpoint() {
    smoke("export_checkpoint");
}

#[test]
fn npy_inputs() {
    smoke("npy_inputs");
}

#[test]
fn onnx_load_run() {
    smoke("onnx_load_run");
}

#[test]
fn board_profile() {
    smoke("board_profile");
}

#[test]
fn pack_reader() {
    smoke("pack_reader");
}
