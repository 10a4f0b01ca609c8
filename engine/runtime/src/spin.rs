//! A run on the thread pool, its other threads kept awake until it ends.
//!
//! With `--threads T > 1` each product, attention and LayerNorm splits its work over tract's rayon
//! pool. Between two such ops (a LayerNorm, a reshape, the next node's bookkeeping: 5-100 us on
//! the bench model) an idle rayon worker spins a few rounds and then sleeps on a futex, and on a
//! virtual machine a sleeping vCPU takes tens of microseconds to wake. The thread that runs the
//! plan also sleeps inside every `install` until its job is done. A scratch program on this 2-core
//! host (a `[128, 256] x [256, 256]` product split in two, 20 us of serial work between products,
//! 40 rounds of 50) took 0.141 ms a step that way against 0.140 on one thread (two threads gained
//! nothing), and 0.092 ms with the whole loop on a pool worker and the other worker kept busy
//! taking work (onnxruntime's thread pool spins the same way between ops by default).
//!
//! [`on_pool`] runs a whole model run on the pool's first worker and, for as long as it lasts, has
//! every other worker poll the pool for work (`rayon::yield_now`) instead of sleeping. Nothing
//! else changes: the same ops split the same work, so outputs are bit-identical
//! (`set_spin(false)` turns it off for comparisons). The price is that the other cores stay busy
//! for the whole run, serial stretches included, as with onnxruntime's default.
//!
//! [`Placement`] decides, per session, whether its runs go to the pool at all: a small model's
//! runs may go faster on the calling thread alone, and a short trial of both decides.

// Without threads every run is the caller's: the pool's side is unused.
#![cfg_attr(not(feature = "threads"), allow(dead_code))]

#[cfg(feature = "threads")]
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether runs keep the pool's threads awake (see [`crate::Switch`]).
pub(crate) static ENABLED: crate::Switch = crate::Switch::on();

/// A value handed to the pool's worker and back while the calling thread waits.
#[cfg(feature = "threads")]
struct Handed<T>(T);

#[cfg(feature = "threads")]
impl<T> Handed<T> {
    fn take(self) -> T {
        self.0
    }
}

// SAFETY: a `Handed` value moves to the pool's first worker inside `ThreadPool::broadcast` (taken
// from a mutex by that worker alone) and its result moves back; the calling thread is blocked in
// `broadcast` meanwhile, so the value (the plan's state with its non-atomically counted tensors) is
// used by one thread at a time, and rayon's latch orders the worker's accesses before the caller's.
#[cfg(feature = "threads")]
unsafe impl<T> Send for Handed<T> {}

/// Stops the spinning workers when dropped (the run ended, or panicked).
#[cfg(feature = "threads")]
struct Stop<'a>(&'a AtomicBool);

#[cfg(feature = "threads")]
impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs `f` (a whole model run) on the first worker of tract's pool with the other workers kept
/// awake, when there is a pool of more than one thread and the switch is on; else runs `f` here.
///
/// Always the same worker: glibc gives each thread that allocates its own heap (arena), and a run
/// allocates its activations on the thread that runs it. Handed to whichever worker was free
/// (`install`), runs alternated between workers and each worker's heap came to hold a run's
/// activations: vision-perceiver-fourier int8 at two threads peaked at 284 MiB RSS against 184 at
/// one.
///
/// A spinning worker must never spin on top of a job of the run (a rayon worker waiting for a
/// job it stole may take other work meanwhile): the run would wait for that job, and the worker
/// for the run's end. The spinners were spawned (`spawn_broadcast`) and a late one was taken
/// that way: a two-thread `bench` hung, its worker spinning inside a product's job. Now the
/// spinners are part of the run's broadcast (none outlives it), the first worker starts the run
/// only once every other worker is in its spinner (so none holds a job of the run beneath it),
/// and a spinner taken inside another run's spinner returns at once.
pub(crate) fn on_pool<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "threads")]
    if let Some(pool) = crate::thread_pool().filter(|_| ENABLED.get()) {
        if pool.current_thread_index().is_none() {
            let job = std::sync::Mutex::new(Some(Handed(f)));
            let executor = tract_linalg::multithread::Executor::MultiThread(pool.clone());
            let running = AtomicBool::new(true);
            let started = std::sync::atomic::AtomicUsize::new(0);
            let mut outs = pool.broadcast(|ctx| {
                if ctx.index() != 0 {
                    spin(&running, &started);
                    return None;
                }
                let _stop = Stop(&running);
                // Yielding the core after a few rounds: with more threads than cores a spinner
                // may be waiting for this one's.
                let mut rounds = 0u32;
                while started.load(Ordering::Acquire) + 1 < ctx.num_threads() {
                    rounds += 1;
                    if rounds < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                let f = job.lock().unwrap_or_else(|e| e.into_inner()).take()?.take();
                // The worker sees the pool the caller saw (set for the caller's thread alone, or not).
                Some(Handed(tract_linalg::multithread::multithread_tract_scope(executor.clone(), f)))
            });
            if let Some(out) = outs.iter_mut().find_map(Option::take) {
                return out.take();
            }
            unreachable!("worker 0 of the pool ran the job");
        }
        // Already on a worker (a run inside a run): the others are spinning or busy.
        return f();
    }
    f()
}

/// Timed runs of each kind (on the pool, on one thread) a session compares before it chooses,
/// each kind's after an untimed one (the first run on a thread allocates its buffers, the first on
/// the pool after a pause wakes its workers).
const TRIALS: usize = 5;

/// Runs a session's trial takes at most: the first on the pool (untimed), [`TRIALS`] timed ones
/// there, then one untimed and [`TRIALS`] timed on one thread.
pub(crate) const TRIAL_RUNS: usize = 2 * TRIALS + 2;

/// Runs after which a session that chose one thread tries the pool again: a trial is a moment of
/// a shared host, whose other cores may have been busy then (a robot node runs for hours). A
/// session where one thread is really faster pays its trial's pool runs once in this many runs:
/// under 1 % of its time.
const RETRY_AFTER: usize = 1024;

/// A first run at least this long keeps the session on the pool without a trial: waking the pool
/// costs tens of microseconds a run, nothing beside such a run.
const LONG_RUN: std::time::Duration = std::time::Duration::from_millis(20);

/// Where one session's runs go when it has a pool of more than one thread: on the pool
/// ([`on_pool`]), or on the calling thread as at one thread. Small models gain less from
/// splitting their ops than waking the pool costs: the digits model's f32 graph took 0.082 ms a
/// run at two threads against 0.060 at one, the shapes model's int8 graph 0.58-0.63 against
/// 0.49-0.53 (`bench --runs 2000`). So a session whose first run (on the pool) was short times
/// [`TRIALS`] more runs in a row on the pool, then as many on one thread, and keeps the pool
/// unless one thread's best run was shorter than the pool's best by a twentieth or more (the user
/// asked for the threads; a close call is the host's noise). In a row, not alternated: a pool run
/// right after a run without it pays for waking its workers, which runs back to back do not
/// (alternated, the shapes model's f32 graph chose one thread at 0.66 ms where the pool runs it in
/// 0.44). Pool first and best runs, not one thread first and medians (session 34): a pool woken
/// after six runs without it stayed slow for several runs, 0.6 to 6 ms where it settles at 0.65
/// (four 256 x 256 products, one thread 1.2 ms), and the medians chose one thread in 44 of 140
/// sessions (`bench --threads 2 --runs 30 --warmup 1`); this way 15 of 140. Noise only adds time,
/// so each kind's best run is the closest to its cost. Those left on one thread by a busy moment
/// try again after [`RETRY_AFTER`] runs. Its shapes are fixed,
/// so every later run does the same work; a change of thread count starts over. Outputs are the
/// same bits either way (products and row-wise ops split without changing any sum's order) except
/// where one head's attention over more than [`crate::attention`]'s chunk of keys splits its keys
/// over the threads: there the trial's runs differ by rounding, as two thread counts do.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    threads: usize,
    runs: usize,
    pool: Vec<std::time::Duration>,
    here: Vec<std::time::Duration>,
    /// Whether runs go to the pool, once chosen.
    chosen: Option<bool>,
}

impl Placement {
    /// Runs `f` (a whole model run) where this session's runs go.
    pub(crate) fn run<R>(&mut self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            let threads = crate::thread_pool().map_or(1, |p| p.current_num_threads());
            if threads != self.threads {
                *self = Placement { threads, ..Placement::default() };
            }
            if threads == 1 {
                return f();
            }
            let pool = self.next_on_pool();
            // Timed during the trial only.
            let start = self.chosen.is_none().then(std::time::Instant::now);
            let out = if pool {
                on_pool(f)
            } else {
                // As at one thread: no op splits, and the pool is not woken.
                multithread_tract_scope(Executor::SingleThread, f)
            };
            self.record(pool, start.map_or_else(Default::default, |s| s.elapsed()));
            out
        }
        #[cfg(not(feature = "threads"))]
        f()
    }

    /// Whether runs now go where they will stay: at one thread always; with more, once the trial
    /// at the current thread count has chosen (after at most [`TRIAL_RUNS`] runs).
    pub(crate) fn settled(&self) -> bool {
        #[cfg(feature = "threads")]
        {
            let threads = crate::thread_pool().map_or(1, |p| p.current_num_threads());
            threads == 1 || (threads == self.threads && self.chosen.is_some())
        }
        #[cfg(not(feature = "threads"))]
        true
    }

    /// Whether the next run goes to the pool: the first one and the trial's runs there do, then
    /// the trial's runs on one thread.
    fn next_on_pool(&self) -> bool {
        self.chosen.unwrap_or(self.runs <= TRIALS)
    }

    /// Counts a run that took `took` (timed during the trial), on the pool or not; chooses once
    /// the trial is complete, and starts another [`RETRY_AFTER`] runs after choosing one thread.
    fn record(&mut self, pool: bool, took: std::time::Duration) {
        if self.chosen.is_none() {
            if self.runs == 0 {
                if took >= LONG_RUN {
                    self.chosen = Some(true);
                }
            } else if self.runs == TRIALS + 1 {
                // The first on one thread: untimed (the pool's first is run 0).
            } else if pool {
                self.pool.push(took);
            } else {
                self.here.push(took);
            }
            if self.pool.len() >= TRIALS && self.here.len() >= TRIALS {
                let best = |v: &[std::time::Duration]| v.iter().min().copied().unwrap_or_default();
                let (pool, here) = (best(&self.pool), best(&self.here));
                self.chosen = Some(here * 20 > pool * 19);
            }
        }
        self.runs += 1;
        if self.chosen == Some(false) && self.runs >= RETRY_AFTER {
            *self = Placement { threads: self.threads, ..Placement::default() };
        }
    }
}

/// How many workers are spinning now (for the tests).
#[cfg(feature = "threads")]
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Takes the pool's pending work, or waits without sleeping, until `running` turns false.
/// `started` counts the spinner in first; one taken inside another spinner on this thread (another
/// run's, sharing the pool) returns at once, the outer one keeping the worker busy.
#[cfg(feature = "threads")]
fn spin(running: &AtomicBool, started: &std::sync::atomic::AtomicUsize) {
    started.fetch_add(1, Ordering::AcqRel);
    if IN_SPINNER.with(|s| s.replace(true)) {
        return;
    }
    SPINNING.fetch_add(1, Ordering::AcqRel);
    let _count = Decrement;
    while running.load(Ordering::Acquire) {
        if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
            std::hint::spin_loop();
        }
    }
}

#[cfg(feature = "threads")]
thread_local! {
    /// Whether this thread is inside a spinner.
    static IN_SPINNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts a spinning worker out, and its thread out of its spinner, however its loop ends.
#[cfg(feature = "threads")]
struct Decrement;

#[cfg(feature = "threads")]
impl Drop for Decrement {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
        IN_SPINNER.with(|s| s.set(false));
    }
}

#[cfg(all(test, feature = "threads"))]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::time::{Duration, Instant};
    use tract_linalg::multithread::{multithread_tract_scope, Executor};

    /// Held by each test: one of them turns the switch off, and the others count spinners.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to 10 s for `cond`.
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn runs_on_a_worker_with_the_others_spinning_until_it_ends() {
        let _one = one_at_a_time();
        let sum = multithread_tract_scope(Executor::multithread(3), || {
            on_pool(|| {
                // On a worker of the pool, the two others spinning meanwhile.
                assert!(rayon::current_thread_index().is_some(), "the run is not on the pool");
                assert!(eventually(|| SPINNING.load(Ordering::Acquire) >= 2), "the other workers do not spin");
                // Work split over the pool is still taken by the spinning workers.
                let pool = crate::thread_pool().unwrap();
                pool.install(|| (0..1_000_000u64).into_par_iter().sum::<u64>())
            })
        });
        assert_eq!(sum, 999_999 * 1_000_000 / 2);
        assert!(eventually(|| SPINNING.load(Ordering::Acquire) == 0), "workers still spin after the run");
    }

    #[test]
    fn every_run_is_on_the_same_worker() {
        let _one = one_at_a_time();
        let ids: Vec<_> = multithread_tract_scope(Executor::multithread(3), || {
            (0..50).map(|_| on_pool(|| (rayon::current_thread_index(), std::thread::current().id()))).collect()
        });
        assert_eq!(ids[0].0, Some(0), "the run is not on the first worker");
        assert!(ids.iter().all(|id| *id == ids[0]), "runs moved between workers: {ids:?}");
    }

    /// Runs `n` runs of `on_pool` on a pool of two, each splitting work over the pool, from
    /// `callers` threads at once; false if they have not all ended within 60 s (a deadlock).
    fn runs_end(callers: usize, n: usize) -> bool {
        let executor = Executor::multithread(2);
        let (done, ended) = std::sync::mpsc::channel();
        for _ in 0..callers {
            let (executor, done) = (executor.clone(), done.clone());
            std::thread::spawn(move || {
                multithread_tract_scope(executor, || {
                    for i in 0..n as u64 {
                        let pool = crate::thread_pool().unwrap();
                        // Four split ops with serial work between them, as in a model run.
                        let sum = on_pool(|| {
                            (0..4u64)
                                .map(|op| {
                                    let serial = (0..2000u64).fold(op, |a, x| std::hint::black_box(a ^ x));
                                    let split = pool.install(|| {
                                        (0..64u64)
                                            .into_par_iter()
                                            .map(|x| (0..500u64).map(|y| std::hint::black_box(x * y * i)).sum::<u64>())
                                            .sum::<u64>()
                                    });
                                    std::hint::black_box(serial);
                                    split
                                })
                                .sum::<u64>()
                        });
                        assert_eq!(
                            sum,
                            4 * (0..64u64).map(|x| (0..500u64).map(|y| x * y * i).sum::<u64>()).sum::<u64>()
                        );
                    }
                });
                let _ = done.send(());
            });
        }
        (0..callers).all(|_| ended.recv_timeout(Duration::from_secs(60)).is_ok())
    }

    #[test]
    fn many_runs_end_one_caller_or_two() {
        let _one = one_at_a_time();
        assert!(runs_end(1, 3000), "3000 runs from one thread did not end within 60 s");
        assert!(runs_end(2, 1000), "1000 runs from each of two threads sharing the pool did not end within 60 s");
    }

    #[test]
    fn a_panicking_run_stops_the_spinning_too() {
        let _one = one_at_a_time();
        let caught = std::panic::catch_unwind(|| {
            multithread_tract_scope(Executor::multithread(2), || {
                on_pool(|| {
                    assert!(eventually(|| SPINNING.load(Ordering::Acquire) >= 1));
                    panic!("inside the run")
                })
            })
        });
        assert!(caught.is_err(), "the panic did not reach the caller");
        assert!(eventually(|| SPINNING.load(Ordering::Acquire) == 0), "workers still spin after the panic");
    }

    #[test]
    fn runs_here_when_switched_off_or_on_one_thread() {
        let _one = one_at_a_time();
        let here = std::thread::current().id();
        assert_eq!(on_pool(|| std::thread::current().id()), here);
        ENABLED.set(false);
        let id = multithread_tract_scope(Executor::multithread(2), || on_pool(|| std::thread::current().id()));
        ENABLED.set(true);
        assert_eq!(id, here);
    }

    /// Feeds `placement` runs of the given durations (us) in the order it asks for them, and
    /// returns where each went.
    fn trial(placement: &mut Placement, pool_us: u64, here_us: u64, runs: usize) -> Vec<bool> {
        (0..runs)
            .map(|_| {
                let pool = placement.next_on_pool();
                placement.record(pool, Duration::from_micros(if pool { pool_us } else { here_us }));
                pool
            })
            .collect()
    }

    #[test]
    fn a_short_session_keeps_the_faster_place_after_its_trial() {
        let (t, f) = (true, false);
        // Six runs on the pool (the first untimed), then six on one thread (the first untimed).
        let trial_runs = [t, t, t, t, t, t, f, f, f, f, f, f];
        assert_eq!(trial_runs.len(), TRIAL_RUNS);
        let mut faster_here = Placement::default();
        let places = trial(&mut faster_here, 2000, 1890, 14);
        assert_eq!(places[..TRIAL_RUNS], trial_runs);
        assert_eq!(places[TRIAL_RUNS..], [f, f], "one thread faster by a twentieth");
        let mut close = Placement::default();
        assert_eq!(trial(&mut close, 2000, 1910, 14)[TRIAL_RUNS..], [t, t], "one thread faster by less: the pool");
        let mut faster_on_pool = Placement::default();
        assert_eq!(trial(&mut faster_on_pool, 1000, 2000, 14)[TRIAL_RUNS..], [t, t], "pool faster");
        // Runs taking `pool_ms` (the first untimed) then `here_ms` (the first untimed), in the
        // trial's order; where the session chose.
        let replay = |pool_ms: [u64; TRIALS + 1], here_ms: [u64; TRIALS + 1]| {
            let mut p = Placement::default();
            for (pool, ms) in pool_ms.map(|ms| (t, ms)).into_iter().chain(here_ms.map(|ms| (f, ms))) {
                assert_eq!(p.next_on_pool(), pool);
                p.record(pool, Duration::from_millis(ms));
            }
            p.chosen
        };
        // Slow runs do not decide, however many (the untimed ones not at all): each kind's best
        // run does. Here a pool slow in four of its five timed runs, as one woken after a pause.
        assert_eq!(replay([15, 9, 9, 1, 9, 9], [15, 2, 2, 2, 2, 2]), Some(true));
        // One thread's best faster by a twentieth: one thread, however slow its other runs.
        assert_eq!(replay([1, 2, 2, 2, 2, 2], [1, 1, 9, 9, 9, 9]), Some(false));
        // One thread's choice is tried again after RETRY_AFTER runs (now the pool is faster);
        // the pool's is kept.
        let mut retried = Placement::default();
        let places = trial(&mut retried, 2000, 1890, RETRY_AFTER);
        assert!(places[TRIAL_RUNS..].iter().all(|p| !p) && retried.chosen.is_none(), "a new trial");
        assert_eq!(trial(&mut retried, 1000, 1890, TRIAL_RUNS + 2)[TRIAL_RUNS..], [t, t]);
        assert!(trial(&mut retried, 1000, 1890, 2 * RETRY_AFTER).iter().all(|p| *p), "kept");
        // A long first run keeps the pool at once.
        let mut long = Placement::default();
        assert_eq!(trial(&mut long, 25_000, 1000, 4), [t, t, t, t]);
    }

    #[test]
    fn runs_go_where_the_session_chose() {
        let _one = one_at_a_time();
        let place = || (rayon::current_thread_index(), crate::thread_pool().is_some());
        multithread_tract_scope(Executor::multithread(2), || {
            let mut placement = Placement::default();
            assert!(!placement.settled(), "two threads: a trial first");
            assert_eq!(placement.run(place), (Some(0), true), "the first run is on the pool");
            // Each run then goes where the trial or the choice says; settled once chosen, within
            // TRIAL_RUNS runs.
            for _ in 0..2 * TRIALS + 4 {
                assert_eq!(placement.settled(), placement.chosen.is_some());
                let want = if placement.next_on_pool() { (Some(0), true) } else { (None, false) };
                assert_eq!(placement.run(place), want);
                assert!(placement.settled() || placement.runs < TRIAL_RUNS, "{} runs", placement.runs);
            }
            assert!(placement.chosen.is_some() && placement.settled(), "no choice after the trial");
            // Another thread count is not settled until its own trial.
            assert!(!multithread_tract_scope(Executor::multithread(3), || placement.settled()));
            // Another thread count starts over, on the pool.
            let first = multithread_tract_scope(Executor::multithread(3), || placement.run(place));
            assert_eq!(first, (Some(0), true));
            assert_eq!((placement.runs, placement.chosen), (1, None));
        });
        // One thread: here, nothing to choose.
        let mut placement = Placement::default();
        assert!(placement.settled());
        assert_eq!(placement.run(place), (None, false));
        assert_eq!(placement.runs, 0);
    }
}
