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
//! A spinner that finds no work for [`SPINS_BEFORE_YIELD`] polls yields its core between polls
//! (`sched_yield`): alone on its core it goes on at once, but where it shares one (with the run
//! itself, or another process) the other thread gets the core instead of waiting out the
//! spinner's time slice.
//!
//! [`Placement`] decides, per session, whether its runs go to the pool at all: a small model's
//! runs may go faster on the calling thread alone, and a short trial of both decides. It also
//! watches the pool's threads' share of their cores ([`Share`]): a busy neighbour (a camera
//! driver, another node of the robot) on one of the pool's cores stalls every split op until the
//! thread it preempted gets its core back, and two threads then ran slower than one (the bench
//! model with a busy loop on the second core, `bench --threads 2`: p50 22.6 ms, p99 124, against
//! 9.0 ms on one thread; docs/performance.md, session 46). When they had under [`SHARE_MIN`] of
//! their time, the session times a few runs on one thread and keeps the faster.

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
///
/// Returns `f`'s output and, where the platform keeps a CPU clock per thread, the share of their
/// cores the pool's threads had during the run.
pub(crate) fn on_pool<R>(f: impl FnOnce() -> R) -> (R, Option<Share>) {
    #[cfg(feature = "threads")]
    if let Some(pool) = crate::thread_pool().filter(|_| ENABLED.get()) {
        if pool.current_thread_index().is_none() {
            let job = std::sync::Mutex::new(Some(Handed(f)));
            let executor = tract_linalg::multithread::Executor::MultiThread(pool.clone());
            let running = AtomicBool::new(true);
            let started = std::sync::atomic::AtomicUsize::new(0);
            let given = Given::default();
            let mut outs = pool.broadcast(|ctx| {
                if ctx.index() != 0 {
                    given.track(|| spin(&running, &started));
                    return None;
                }
                given.track(|| {
                    let _stop = Stop(&running);
                    // Yielding the core after a few rounds: with more threads than cores a
                    // spinner may be waiting for this one's.
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
                    // The worker sees the pool the caller saw (set for the caller's thread alone,
                    // or not).
                    Some(Handed(tract_linalg::multithread::multithread_tract_scope(executor.clone(), f)))
                })
            });
            if let Some(out) = outs.iter_mut().find_map(Option::take) {
                return (out.take(), given.share());
            }
            unreachable!("worker 0 of the pool ran the job");
        }
        // Already on a worker (a run inside a run): the others are spinning or busy.
        return (f(), None);
    }
    (f(), None)
}

/// The share of their cores a pool's threads had during runs: the CPU time each was given while
/// part of it (running it or spinning), and the time each was part of it, summed over the threads.
/// A spinning thread wants its core all the time, so `cpu` falls short of `wall` by the time the
/// system gave their cores to someone else.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Share {
    /// CPU time the threads were given.
    pub cpu: std::time::Duration,
    /// Time they were part of the run.
    pub wall: std::time::Duration,
}

impl Share {
    /// CPU time over wall time (1 with no wall time).
    pub fn ratio(&self) -> f64 {
        if self.wall.is_zero() {
            1.0
        } else {
            self.cpu.as_secs_f64() / self.wall.as_secs_f64()
        }
    }
}

impl std::ops::AddAssign for Share {
    fn add_assign(&mut self, other: Share) {
        self.cpu += other.cpu;
        self.wall += other.wall;
    }
}

/// The calling thread's CPU time, where the platform keeps one per thread (`CLOCK_THREAD_CPUTIME_ID`).
#[cfg(feature = "threads")]
fn thread_cpu() -> Option<std::time::Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a timespec to write.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return Some(std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
        }
    }
    None
}

/// The [`Share`] of one run, added to by each of the pool's threads.
#[cfg(feature = "threads")]
#[derive(Default)]
struct Given {
    cpu_ns: std::sync::atomic::AtomicU64,
    wall_ns: std::sync::atomic::AtomicU64,
    unknown: AtomicBool,
}

#[cfg(feature = "threads")]
impl Given {
    /// Runs `f`, adding this thread's CPU and wall time in it.
    fn track<R>(&self, f: impl FnOnce() -> R) -> R {
        let (cpu, wall) = (thread_cpu(), std::time::Instant::now());
        let out = f();
        match (cpu, thread_cpu()) {
            (Some(before), Some(after)) => {
                let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                self.cpu_ns.fetch_add(ns(after.saturating_sub(before)), Ordering::Relaxed);
                self.wall_ns.fetch_add(ns(wall.elapsed()), Ordering::Relaxed);
            }
            _ => self.unknown.store(true, Ordering::Relaxed),
        }
        out
    }

    /// The run's share, once every thread is done; `None` where a thread had no CPU clock.
    fn share(&self) -> Option<Share> {
        let d = |a: &std::sync::atomic::AtomicU64| std::time::Duration::from_nanos(a.load(Ordering::Relaxed));
        (!self.unknown.load(Ordering::Relaxed)).then(|| Share { cpu: d(&self.cpu_ns), wall: d(&self.wall_ns) })
    }
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

/// Time after which a session on one thread tries the pool again, when [`RETRY_AFTER`] runs take
/// longer (a model of seconds a run).
const RETRY_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// A first run at least this long keeps the session on the pool without a trial: waking the pool
/// costs tens of microseconds a run, nothing beside such a run.
const LONG_RUN: std::time::Duration = std::time::Duration::from_millis(20);

/// The share of their cores ([`Share::ratio`], over [`CHECK_SPAN`] of pool runs) under which a
/// session's pool threads are taken to have a busy neighbour, and the session times one thread
/// against them. On this 2-core host (`bench --threads 2` on the bench model, the pool forced, a
/// share printed per run): alone, medians 0.93-0.97 (a tenth of runs under 0.89; the published
/// architectures' runs 0.89-0.99); beside a loop busy 3 ms in 10 on the second core 0.82-0.86,
/// the pool then as fast as one thread (p50 8.3-10.6 ms against 9.2); busy 3 in 6, 0.74-0.78
/// (11.0-13.3 ms); busy all the time, 0.50-0.54 (12.3-13.2 ms).
pub(crate) const SHARE_MIN: f64 = 0.8;

/// Wall time of the pool runs whose [`Share`] is summed before it is checked against
/// [`SHARE_MIN`] (one run when runs are longer): a short run's share moves with a single
/// preemption (0.56 in one of 342 runs of the bench model alone).
const CHECK_SPAN: std::time::Duration = std::time::Duration::from_millis(100);

/// The pool's run times a check keeps (the latest), for a probe to compare with.
const SPAN_TIMES: usize = 32;

/// Timed runs on one thread of a probe of a model whose runs are long (at least [`LONG_RUN`]; no
/// untimed one first): such runs time the thread well, and each costs as much as a run.
const LONG_PROBES: usize = 2;

/// Where a session's runs went at more than one thread (counted from its load; see
/// [`crate::Session::pool_use`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolUse {
    /// Runs on the thread pool.
    pub pool_runs: u64,
    /// Runs on the calling thread alone (the trial found one thread faster, or the pool's
    /// threads were short of CPU and one thread was faster then).
    pub one_thread_runs: u64,
    /// The pool's threads' share of their cores over its runs, where the platform keeps a CPU
    /// clock per thread.
    pub share: Option<Share>,
}

impl PoolUse {
    /// The runs since `earlier` (a count taken before from the same session).
    pub fn since(&self, earlier: &PoolUse) -> PoolUse {
        let share = match (self.share, earlier.share) {
            (Some(now), Some(then)) if now.wall > then.wall => {
                Some(Share { cpu: now.cpu.saturating_sub(then.cpu), wall: now.wall - then.wall })
            }
            (Some(now), None) => Some(now),
            _ => None,
        };
        PoolUse {
            pool_runs: self.pool_runs.saturating_sub(earlier.pool_runs),
            one_thread_runs: self.one_thread_runs.saturating_sub(earlier.one_thread_runs),
            share,
        }
    }

    /// The pool's threads' share of their cores ([`Share::ratio`]) over its runs; `None` without
    /// pool runs or a CPU clock per thread.
    pub fn pool_share(&self) -> Option<f64> {
        self.share.filter(|_| self.pool_runs > 0).map(|s| s.ratio())
    }
}

/// What a session does with its next runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    /// Times runs on the pool, then on one thread ([`TRIALS`]), and keeps the faster by each
    /// kind's best run.
    #[default]
    Trial,
    /// Times `timed` runs on one thread (after an untimed one, if `untimed`) against the pool's
    /// latest ones, whose threads were short of CPU, and keeps the faster by medians: the pool's
    /// best run is then a lucky one.
    Probe { untimed: bool, timed: usize },
    /// Runs go to the pool (`true`) or stay on the calling thread.
    Chosen(bool),
}

/// The pool runs since the last check of their share.
#[derive(Debug, Default)]
struct Span {
    times: std::collections::VecDeque<std::time::Duration>,
    share: Share,
}

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
/// try again after [`RETRY_AFTER`] runs or [`RETRY_TIME`]. A session on the pool whose threads
/// had under [`SHARE_MIN`] of their cores over the latest [`CHECK_SPAN`] of runs probes one
/// thread against them ([`Phase::Probe`]). Its shapes are fixed,
/// so every later run does the same work; a change of thread count starts over. Outputs are the
/// same bits either way (products and row-wise ops split without changing any sum's order) except
/// where one head's attention over more than [`crate::attention`]'s chunk of keys splits its keys
/// over the threads: there the trial's runs differ by rounding, as two thread counts do.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    threads: usize,
    /// Runs since the trial began.
    runs: usize,
    /// The run count at which the latest trial or probe began.
    began: usize,
    pool: Vec<std::time::Duration>,
    here: Vec<std::time::Duration>,
    phase: Phase,
    /// The pool's runs since their share was last checked, while the pool is chosen.
    span: Span,
    /// Probes in a row that kept the pool (its threads short of CPU but faster than one thread).
    kept: u32,
    /// Pool run time left before the share is checked again: [`CHECK_SPAN`] (or the pool's
    /// median run, when longer) times 2 to the power `kept` after such a probe (at most
    /// [`RETRY_TIME`], or 64 runs), so that a pool that stays faster pays ever fewer probes, and
    /// one that became slower is found within seconds.
    quiet: std::time::Duration,
    /// When the session chose one thread.
    since: Option<std::time::Instant>,
    /// Where its runs went, from the session's load (kept when a trial starts over).
    used: PoolUse,
}

impl Placement {
    /// Runs `f` (a whole model run) where this session's runs go.
    pub(crate) fn run<R>(&mut self, f: impl FnOnce() -> R) -> R {
        #[cfg(feature = "threads")]
        {
            use tract_linalg::multithread::{multithread_tract_scope, Executor};
            let threads = crate::thread_pool().map_or(1, |p| p.current_num_threads());
            if threads != self.threads {
                *self = Placement { threads, used: self.used, ..Placement::default() };
            }
            if threads == 1 {
                return f();
            }
            let pool = self.next_on_pool();
            let start = std::time::Instant::now();
            let (out, share) = if pool {
                on_pool(f)
            } else {
                // As at one thread: no op splits, and the pool is not woken.
                (multithread_tract_scope(Executor::SingleThread, f), None)
            };
            self.record(pool, start.elapsed(), share);
            out
        }
        #[cfg(not(feature = "threads"))]
        f()
    }

    /// Where the session's runs went at more than one thread.
    pub(crate) fn used(&self) -> PoolUse {
        self.used
    }

    /// Whether runs now go where they will stay: at one thread always; with more, once the trial
    /// (or a probe) at the current thread count has chosen (a trial within [`TRIAL_RUNS`] runs).
    pub(crate) fn settled(&self) -> bool {
        #[cfg(feature = "threads")]
        {
            let threads = crate::thread_pool().map_or(1, |p| p.current_num_threads());
            threads == 1 || (threads == self.threads && matches!(self.phase, Phase::Chosen(_)))
        }
        #[cfg(not(feature = "threads"))]
        true
    }

    /// Whether the next run goes to the pool: the first one and the trial's runs there do, then
    /// the trial's runs on one thread; a probe's runs do not.
    fn next_on_pool(&self) -> bool {
        match self.phase {
            Phase::Trial => self.runs <= TRIALS,
            Phase::Probe { .. } => false,
            Phase::Chosen(pool) => pool,
        }
    }

    /// Counts a run that took `took`, on the pool or not, its threads given `share` of their
    /// cores (on the pool, where known); chooses once a trial or probe is complete, probes when
    /// the pool's threads are short of CPU, and tries the pool again [`RETRY_AFTER`] runs or
    /// [`RETRY_TIME`] after choosing one thread.
    fn record(&mut self, pool: bool, took: std::time::Duration, share: Option<Share>) {
        if pool {
            self.used.pool_runs += 1;
            if let Some(s) = share {
                *self.used.share.get_or_insert_with(Share::default) += s;
            }
        } else {
            self.used.one_thread_runs += 1;
        }
        match self.phase {
            Phase::Trial => {
                if self.runs == 0 {
                    if took >= LONG_RUN {
                        self.choose(true);
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
                    self.choose(here * 20 > pool * 19);
                }
            }
            Phase::Probe { untimed: true, timed } => self.phase = Phase::Probe { untimed: false, timed },
            Phase::Probe { untimed: false, timed } => {
                self.here.push(took);
                if self.here.len() >= timed {
                    let (pool, here) = (median(&self.pool), median(&self.here));
                    self.choose(here * 20 > pool * 19);
                    if self.phase == Phase::Chosen(true) {
                        // Kept though short of CPU: no new probe for a while, counted in spans
                        // (or runs, when longer).
                        self.kept += 1;
                        let unit = CHECK_SPAN.max(pool);
                        let longest = RETRY_TIME.max(unit.saturating_mul(64));
                        self.quiet = unit.saturating_mul(2u32.saturating_pow(self.kept.min(16))).min(longest);
                    }
                }
            }
            Phase::Chosen(_) => {}
        }
        if let (Phase::Chosen(true), true, Some(share)) = (self.phase, pool, share) {
            self.check(took, share);
        }
        self.runs += 1;
        let retry = self.since.is_some_and(|t| t.elapsed() >= RETRY_TIME) || self.runs - self.began >= RETRY_AFTER;
        if self.phase == Phase::Chosen(false) && retry {
            *self = Placement { threads: self.threads, used: self.used, ..Placement::default() };
        }
    }

    /// Where runs go from now on.
    fn choose(&mut self, pool: bool) {
        self.phase = Phase::Chosen(pool);
        self.span = Span::default();
        self.since = (!pool).then(std::time::Instant::now);
    }

    /// Adds a pool run to the span (once the quiet time after a probe is over); once it covers
    /// [`CHECK_SPAN`], starts a probe if the threads had under [`SHARE_MIN`] of their cores, and
    /// a new span.
    fn check(&mut self, took: std::time::Duration, share: Share) {
        if !self.quiet.is_zero() {
            self.quiet = self.quiet.saturating_sub(took);
            return;
        }
        let span = &mut self.span;
        if span.times.len() == SPAN_TIMES {
            span.times.pop_front();
        }
        span.times.push_back(took);
        span.share += share;
        if span.share.wall < CHECK_SPAN * self.threads as u32 {
            return;
        }
        // A new span, in the same buffer (no allocation from run to run).
        let share = std::mem::take(&mut self.span.share);
        if share.ratio() >= SHARE_MIN {
            self.kept = 0;
            self.span.times.clear();
        } else {
            self.pool.clear();
            self.pool.extend(self.span.times.drain(..));
            self.here.clear();
            let long = median(&self.pool) >= LONG_RUN;
            self.began = self.runs + 1;
            self.phase = Phase::Probe { untimed: !long, timed: if long { LONG_PROBES } else { TRIALS } };
        }
    }
}

/// The median of `times` (the upper one of an even count; zero when empty).
fn median(times: &[std::time::Duration]) -> std::time::Duration {
    let mut v = times.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// How many workers are spinning now (for the tests).
#[cfg(feature = "threads")]
static SPINNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Polls for work a spinner makes without finding any before it yields its core between polls
/// (tens of microseconds; between two split ops of the bench model the run does 5-100 us of
/// serial work). With a busy loop on the second core and two threads forced onto the pool, the
/// bench model's p50 fell from 19.7-20.6 ms to 12.3-13.2 ms (`bench --threads 2`, three runs of
/// each); with nothing else running no change beyond the host's noise (p50 4.8-7.7 ms either way,
/// six alternated runs of each).
#[cfg(feature = "threads")]
const SPINS_BEFORE_YIELD: u32 = 100;

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
    let mut idle = 0u32;
    while running.load(Ordering::Acquire) {
        if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
            idle = 0;
        } else if idle < SPINS_BEFORE_YIELD {
            idle += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
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

    /// Feeds `placement` runs of the given durations (us) in the order it asks for them, and
    /// returns where each went.
    fn trial(placement: &mut Placement, pool_us: u64, here_us: u64, runs: usize) -> Vec<bool> {
        (0..runs)
            .map(|_| {
                let pool = placement.next_on_pool();
                placement.record(pool, Duration::from_micros(if pool { pool_us } else { here_us }), None);
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
                p.record(pool, Duration::from_millis(ms), None);
            }
            p.phase
        };
        // Slow runs do not decide, however many (the untimed ones not at all): each kind's best
        // run does. Here a pool slow in four of its five timed runs, as one woken after a pause.
        assert_eq!(replay([15, 9, 9, 1, 9, 9], [15, 2, 2, 2, 2, 2]), Phase::Chosen(true));
        // One thread's best faster by a twentieth: one thread, however slow its other runs.
        assert_eq!(replay([1, 2, 2, 2, 2, 2], [1, 1, 9, 9, 9, 9]), Phase::Chosen(false));
        // One thread's choice is tried again after RETRY_AFTER runs (now the pool is faster);
        // the pool's is kept.
        let mut retried = Placement::default();
        let places = trial(&mut retried, 2000, 1890, RETRY_AFTER);
        assert!(places[TRIAL_RUNS..].iter().all(|p| !p) && retried.phase == Phase::Trial, "a new trial");
        assert_eq!(trial(&mut retried, 1000, 1890, TRIAL_RUNS + 2)[TRIAL_RUNS..], [t, t]);
        assert!(trial(&mut retried, 1000, 1890, 2 * RETRY_AFTER).iter().all(|p| *p), "kept");
        // A long first run keeps the pool at once.
        let mut long = Placement::default();
        assert_eq!(trial(&mut long, 25_000, 1000, 4), [t, t, t, t]);
    }

    /// A pool run's share of the cores: `ratio` of `wall`, on two threads.
    fn given(took: Duration, ratio: f64) -> Option<Share> {
        Some(Share { cpu: (2 * took).mul_f64(ratio), wall: 2 * took })
    }

    /// A session of two threads that chose the pool (its trial: pool 1 ms, one thread 2 ms).
    fn on_the_pool() -> Placement {
        let mut p = Placement { threads: 2, ..Placement::default() };
        trial(&mut p, 1000, 2000, TRIAL_RUNS);
        assert_eq!(p.phase, Phase::Chosen(true));
        p
    }

    /// Feeds up to `n` pool runs of `ms` each, their threads given `ratio` of their cores, while
    /// the session puts its runs on the pool; the phase after each.
    fn pool_runs(p: &mut Placement, ms: u64, ratio: f64, n: usize) -> Vec<Phase> {
        (0..n)
            .map_while(|_| {
                p.next_on_pool().then(|| {
                    p.record(true, Duration::from_millis(ms), given(Duration::from_millis(ms), ratio));
                    p.phase
                })
            })
            .collect()
    }

    /// Feeds `n` runs on one thread of `ms` each.
    fn one_thread_runs(p: &mut Placement, ms: u64, n: usize) {
        for _ in 0..n {
            assert!(!p.next_on_pool());
            p.record(false, Duration::from_millis(ms), None);
        }
    }

    #[test]
    fn a_pool_short_of_cpu_probes_one_thread_and_keeps_the_faster() {
        // Given most of their cores, the pool stays, however slow its runs.
        let mut p = on_the_pool();
        assert!(pool_runs(&mut p, 5, SHARE_MIN + 0.05, 200).iter().all(|ph| *ph == Phase::Chosen(true)));
        // Short of CPU: a probe once the span covers CHECK_SPAN (100 ms: 20 runs of 5 ms), an
        // untimed run on one thread then TRIALS timed ones.
        let mut p = on_the_pool();
        let phases = pool_runs(&mut p, 5, SHARE_MIN - 0.05, 20);
        assert!(phases[..19].iter().all(|ph| *ph == Phase::Chosen(true)), "{phases:?}");
        assert_eq!(phases[19], Phase::Probe { untimed: true, timed: TRIALS });
        assert!(!multithread_tract_scope(Executor::multithread(2), || p.settled()), "a probe is not settled");
        one_thread_runs(&mut p, 4, 1 + TRIALS);
        assert_eq!(p.phase, Phase::Chosen(false), "one thread faster than the pool's median");
        // The same with one thread slower: the pool stays, and is probed again after twice
        // CHECK_SPAN of its runs (40 of 5 ms) and a span (20), then after four times (80 + 20),
        // then eight (160 + 20); back to twice once its threads had their cores.
        let mut p = on_the_pool();
        pool_runs(&mut p, 5, 0.5, 20);
        for quiet in [40, 80, 160] {
            one_thread_runs(&mut p, 6, 1 + TRIALS);
            assert_eq!(p.phase, Phase::Chosen(true));
            let phases = pool_runs(&mut p, 5, 0.5, 1000);
            assert_eq!(phases.len(), quiet + 20, "probed again after {} runs, not {quiet} + 20", phases.len());
        }
        one_thread_runs(&mut p, 6, 1 + TRIALS);
        pool_runs(&mut p, 5, 0.5, 320);
        pool_runs(&mut p, 5, 0.9, 20);
        assert_eq!(pool_runs(&mut p, 5, 0.5, 1000).len(), 20, "a span short of CPU right after one that was not");
        one_thread_runs(&mut p, 6, 1 + TRIALS);
        assert_eq!(pool_runs(&mut p, 5, 0.5, 1000).len(), 40 + 20);
        // The pool's median decides, not its best run: pool runs mostly 10 ms, one 1 ms.
        let mut p = on_the_pool();
        pool_runs(&mut p, 1, 0.5, 1);
        pool_runs(&mut p, 10, 0.5, 10);
        assert!(matches!(p.phase, Phase::Probe { .. }));
        one_thread_runs(&mut p, 8, 1 + TRIALS);
        assert_eq!(p.phase, Phase::Chosen(false), "one thread (8 ms) faster than the pool's median (10 ms)");
        // Without a CPU clock nothing is checked.
        let mut p = on_the_pool();
        for _ in 0..200 {
            p.record(true, Duration::from_millis(5), None);
        }
        assert_eq!(p.phase, Phase::Chosen(true));
    }

    #[test]
    fn a_long_run_short_of_cpu_is_probed_at_once_with_fewer_runs() {
        // A first run of 3 s keeps the pool (LONG_RUN) and covers CHECK_SPAN alone.
        let mut p = Placement { threads: 2, ..Placement::default() };
        assert_eq!(pool_runs(&mut p, 3000, 0.5, 1), [Phase::Probe { untimed: false, timed: LONG_PROBES }]);
        one_thread_runs(&mut p, 2500, LONG_PROBES);
        assert_eq!(p.phase, Phase::Chosen(false));
        // One thread slower: the pool stays, checked again after two runs, then four, counted
        // in runs (not in CHECK_SPAN, which would probe after every run).
        let mut p = Placement { threads: 2, ..Placement::default() };
        pool_runs(&mut p, 3000, 0.5, 1);
        for quiet in [2, 4] {
            one_thread_runs(&mut p, 3500, LONG_PROBES);
            assert_eq!(p.phase, Phase::Chosen(true));
            assert_eq!(pool_runs(&mut p, 3000, 0.5, 100).len(), quiet + 1);
        }
        // Given its cores, it stays.
        let mut p = Placement { threads: 2, ..Placement::default() };
        assert_eq!(pool_runs(&mut p, 3000, 0.95, 3), [Phase::Chosen(true); 3]);
    }

    #[test]
    fn one_thread_tries_the_pool_again_after_a_while() {
        let mut p = on_the_pool();
        pool_runs(&mut p, 5, 0.5, 20);
        one_thread_runs(&mut p, 4, 1 + TRIALS);
        assert_eq!(p.phase, Phase::Chosen(false));
        // RETRY_AFTER runs after the probe began: a new trial.
        one_thread_runs(&mut p, 4, RETRY_AFTER - 1 - TRIALS - 1);
        assert_eq!(p.phase, Phase::Chosen(false));
        one_thread_runs(&mut p, 4, 1);
        assert_eq!((p.phase, p.runs), (Phase::Trial, 0));
        // Or RETRY_TIME after choosing, however few runs.
        let mut p = on_the_pool();
        pool_runs(&mut p, 5, 0.5, 20);
        one_thread_runs(&mut p, 4, 1 + TRIALS);
        p.since = std::time::Instant::now().checked_sub(RETRY_TIME);
        one_thread_runs(&mut p, 4, 1);
        assert_eq!(p.phase, Phase::Trial);
        // The runs are counted throughout: the trial's 12, 20 on the pool, 6 + 1 on one thread.
        let used = p.used();
        assert_eq!(
            (used.pool_runs, used.one_thread_runs),
            (TRIALS as u64 + 1 + 20, TRIALS as u64 + 1 + 1 + TRIALS as u64 + 1)
        );
        assert_eq!(used.share, Some(Share { cpu: Duration::from_millis(100), wall: Duration::from_millis(200) }));
    }

    #[cfg(unix)]
    #[test]
    fn busy_threads_on_every_core_take_the_pools_share() {
        let _one = one_at_a_time();
        // Twice as many busy threads as cores: the pool's threads get at most a third of theirs.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..2 * cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let (_, share) = multithread_tract_scope(Executor::multithread(2), || {
            on_pool(|| {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(300) {
                    std::hint::black_box(0);
                }
            })
        });
        stop.store(true, Ordering::Relaxed);
        busy.into_iter().for_each(|b| b.join().unwrap());
        let share = share.expect("a CPU clock per thread");
        assert!(share.wall >= Duration::from_millis(2 * 300), "{share:?}");
        assert!(share.ratio() < SHARE_MIN, "pool threads among busy ones had {:.2} of their cores", share.ratio());
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
                assert_eq!(placement.settled(), matches!(placement.phase, Phase::Chosen(_)));
                let want = if placement.next_on_pool() { (Some(0), true) } else { (None, false) };
                assert_eq!(placement.run(place), want);
                assert!(placement.settled() || placement.runs < TRIAL_RUNS, "{} runs", placement.runs);
            }
            assert!(matches!(placement.phase, Phase::Chosen(_)) && placement.settled(), "no choice after the trial");
            // Another thread count is not settled until its own trial.
            assert!(!multithread_tract_scope(Executor::multithread(3), || placement.settled()));
            // Another thread count starts over, on the pool.
            let first = multithread_tract_scope(Executor::multithread(3), || placement.run(place));
            assert_eq!(first, (Some(0), true));
            assert_eq!((placement.runs, placement.phase), (1, Phase::Trial));
        });
        // One thread: here, nothing to choose.
        let mut placement = Placement::default();
        assert!(placement.settled());
        assert_eq!(placement.run(place), (None, false));
        assert_eq!(placement.runs, 0);
    }
}
