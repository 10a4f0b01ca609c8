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
///
/// Also says whether another worker took any of the run's work (`None`: the run was not on the
/// pool).
fn on_pool<R>(f: impl FnOnce() -> R) -> (R, Option<bool>) {
    #[cfg(feature = "threads")]
    if let Some(pool) = crate::thread_pool().filter(|_| ENABLED.get()) {
        if pool.current_thread_index().is_none() {
            let job = std::sync::Mutex::new(Some(Handed(f)));
            let executor = tract_linalg::multithread::Executor::MultiThread(pool.clone());
            let running = AtomicBool::new(true);
            let started = std::sync::atomic::AtomicUsize::new(0);
            let helped = AtomicBool::new(false);
            let mut outs = pool.broadcast(|ctx| {
                if ctx.index() != 0 {
                    spin(&running, &started, &helped);
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
                return (out.take(), Some(helped.load(Ordering::Acquire)));
            }
            unreachable!("worker 0 of the pool ran the job");
        }
        // Already on a worker (a run inside a run): the others are spinning or busy.
        return (f(), None);
    }
    (f(), None)
}

/// Runs in a row that no other worker helped after which a session's runs stay on the calling
/// thread.
const IDLE_RUNS: u8 = 3;

/// Where one session's runs go: to the pool ([`on_pool`]) while other workers take some of their
/// work, to the calling thread on one thread once [`IDLE_RUNS`] runs in a row had none taken. A
/// model too small for any op to split gains nothing from the pool and pays for waking it: the
/// digits model's f32 graph took 0.082 ms a run at two threads against 0.060 at one. Its shapes are
/// fixed, so its ops split the same way at every run; a change of thread count starts over.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    threads: usize,
    idle: u8,
}

impl Placement {
    /// Runs `f` (a whole model run) where this session's runs go.
    pub(crate) fn run<R>(&mut self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "threads")]
        {
            let threads = crate::thread_pool().map_or(1, |p| p.current_num_threads());
            if threads != self.threads {
                *self = Placement { threads, idle: 0 };
            }
            if self.idle >= IDLE_RUNS {
                // As at one thread: an op that would split runs whole here, without waking the pool.
                use tract_linalg::multithread::{multithread_tract_scope, Executor};
                return multithread_tract_scope(Executor::SingleThread, f);
            }
            let (out, helped) = on_pool(f);
            match helped {
                Some(true) => self.idle = 0,
                Some(false) => self.idle += 1,
                None => {}
            }
            out
        }
        #[cfg(not(feature = "threads"))]
        f()
    }

    /// Whether runs now stay on the calling thread.
    #[cfg(test)]
    fn stays_here(&self) -> bool {
        self.idle >= IDLE_RUNS
    }
}

/// How many workers are spinning now (for the tests).
#[cfg(feature = "threads")]
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Takes the pool's pending work, or waits without sleeping, until `running` turns false; sets
/// `helped` when it took some. `started` counts the spinner in first; one taken inside another spinner on this thread (another
/// run's, sharing the pool) returns at once, the outer one keeping the worker busy.
#[cfg(feature = "threads")]
fn spin(running: &AtomicBool, started: &std::sync::atomic::AtomicUsize, helped: &AtomicBool) {
    started.fetch_add(1, Ordering::AcqRel);
    if IN_SPINNER.with(|s| s.replace(true)) {
        return;
    }
    SPINNING.fetch_add(1, Ordering::AcqRel);
    let _count = Decrement;
    while running.load(Ordering::Acquire) {
        if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
            helped.store(true, Ordering::Release);
        } else {
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
            .0
        });
        assert_eq!(sum, 999_999 * 1_000_000 / 2);
        assert!(eventually(|| SPINNING.load(Ordering::Acquire) == 0), "workers still spin after the run");
    }

    #[test]
    fn every_run_is_on_the_same_worker() {
        let _one = one_at_a_time();
        let ids: Vec<_> = multithread_tract_scope(Executor::multithread(3), || {
            (0..50).map(|_| on_pool(|| (rayon::current_thread_index(), std::thread::current().id())).0).collect()
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
                        })
                        .0;
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
                .0
            })
        });
        assert!(caught.is_err(), "the panic did not reach the caller");
        assert!(eventually(|| SPINNING.load(Ordering::Acquire) == 0), "workers still spin after the panic");
    }

    #[test]
    fn runs_here_when_switched_off_or_on_one_thread() {
        let _one = one_at_a_time();
        let here = std::thread::current().id();
        assert_eq!(on_pool(|| std::thread::current().id()), (here, None));
        ENABLED.set(false);
        let id = multithread_tract_scope(Executor::multithread(2), || on_pool(|| std::thread::current().id()).0);
        ENABLED.set(true);
        assert_eq!(id, here);
    }

    /// A run with an op split over the pool: 64 parts of about a millisecond each.
    fn split_run() -> (Option<usize>, u64) {
        let pool = crate::thread_pool().unwrap();
        let sum = pool.install(|| {
            (0..64u64).into_par_iter().map(|x| (0..200_000u64).map(|y| std::hint::black_box(x ^ y)).sum::<u64>()).sum()
        });
        (rayon::current_thread_index(), sum)
    }

    #[test]
    fn runs_that_split_nothing_move_to_the_calling_thread_on_one_thread() {
        let _one = one_at_a_time();
        multithread_tract_scope(Executor::multithread(2), || {
            let mut placement = Placement::default();
            let mut places = vec![];
            for _ in 0..IDLE_RUNS + 3 {
                places.push(placement.run(|| (rayon::current_thread_index(), crate::thread_pool().is_some())));
            }
            let idle = IDLE_RUNS as usize;
            assert!(places[..idle].iter().all(|p| *p == (Some(0), true)), "first runs not on the pool: {places:?}");
            assert!(
                places[idle..].iter().all(|p| *p == (None, false)),
                "later runs not here on one thread: {places:?}"
            );
            assert!(placement.stays_here());
            // Another thread count starts over.
            let first =
                multithread_tract_scope(Executor::multithread(3), || placement.run(rayon::current_thread_index));
            assert_eq!(first, Some(0));
            assert!(!placement.stays_here());
        });
    }

    #[test]
    fn runs_that_split_work_stay_on_the_pool() {
        let _one = one_at_a_time();
        multithread_tract_scope(Executor::multithread(2), || {
            let mut placement = Placement::default();
            let want = (0..64u64).map(|x| (0..200_000u64).map(|y| x ^ y).sum::<u64>()).sum::<u64>();
            for run in 0..3 * IDLE_RUNS {
                let (place, sum) = placement.run(split_run);
                assert_eq!((place, sum), (Some(0), want), "run {run}");
            }
            assert!(!placement.stays_here());
        });
    }
}
