//! A small fixed pool of worker threads for the inference path: one job at a time, run by every
//! thread at once (the caller's thread is worker 0), each taking its own share of the work.
//!
//! Why not rayon: decoding one token dispatches a few hundred short jobs (tens of microseconds
//! each); waking sleeping threads for each would cost as much as the work. Workers here spin on
//! an atomic counter between jobs, as llama.cpp's do, and only sleep on a condition variable after
//! [`SPIN`] of idleness, so a pool left alone costs no CPU. Nothing here knows what the jobs do.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// One job: a function of the worker index.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

/// State shared by the caller and the workers.
struct Shared {
    /// Bumped once per job (and once at shutdown); workers run a job when it changes.
    generation: AtomicU64,
    /// The current job; valid while `remaining > 0`.
    job: AtomicPtr<Job<'static>>,
    /// Workers that have not finished the current job.
    remaining: AtomicUsize,
    /// Set when a worker's share panicked.
    panicked: AtomicBool,
    /// Set to end the workers.
    stop: AtomicBool,
    /// Workers asleep on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A fixed set of threads that run one job at a time together.
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises callers: the pool runs one job at a time.
    busy: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads)
    }
}

impl Pool {
    /// A pool of `threads` threads in all (the caller's included; at least one).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .filter_map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("starling-infer-{index}"))
                    .spawn(move || worker(&shared, index))
                    .ok()
            })
            .collect::<Vec<_>>();
        // If the OS refused a thread, run with the ones we have.
        let threads = workers.len() + 1;
        Self {
            threads,
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The process-wide pool: `STARLING_THREADS` threads if set, else one per available core.
    pub fn global() -> Arc<Pool> {
        static GLOBAL: OnceLock<Arc<Pool>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let n = std::env::var("STARLING_THREADS")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
                Arc::new(Pool::new(n))
            })
            .clone()
    }

    /// Number of threads (the caller's included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every worker index `i` in `0..threads()` at once and returns when all are
    /// done. A panic in any share is re-raised here.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job { f };
        let s = &*self.shared;
        // SAFETY of the lifetime extension: workers read the job only between the generation bump
        // below and their decrement of `remaining`, and this function does not return (nor unwind)
        // before `remaining` is zero, so the job outlives every use.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        s.job.store(ptr, Ordering::Release);
        s.remaining.store(self.threads - 1, Ordering::Release);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        while s.remaining.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        s.job.store(std::ptr::null_mut(), Ordering::Release);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::AcqRel) {
            panic!("a worker of the inference pool panicked");
        }
    }

    /// The range of `0..n` that worker `i` of this pool takes (contiguous, as equal as possible).
    pub fn share(&self, i: usize, n: usize) -> std::ops::Range<usize> {
        split(i, self.threads, n)
    }
}

/// Part `i` of `parts` nearly equal contiguous parts of `0..n`.
pub fn split(i: usize, parts: usize, n: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    (i * n / parts)..((i + 1) * n / parts)
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, index: usize) {
    // The generation the pool was created with: a job posted before this thread got to run is
    // still seen as new.
    let mut seen = 0;
    loop {
        // Spin for new work, then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.generation.load(Ordering::SeqCst) == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
        seen = s.generation.load(Ordering::Acquire);
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        let job = s.job.load(Ordering::Acquire);
        if !job.is_null() {
            // SAFETY: the caller keeps the job alive until `remaining` reaches zero (see `run`).
            let f = unsafe { (*job).f };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index))).is_err() {
                s.panicked.store(true, Ordering::Release);
            }
            s.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_job_and_shares_cover_the_range() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> =
                    (0..pool.threads()).map(|_| AtomicUsize::new(0)).collect();
                let covered = AtomicUsize::new(0);
                pool.run(&|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                    covered.fetch_add(pool.share(i, 1000).len(), Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                assert_eq!(covered.load(Ordering::Relaxed), 1000);
            }
        }
    }

    #[test]
    fn sleeping_workers_wake_and_a_panic_reaches_the_caller() {
        let pool = Pool::new(2);
        std::thread::sleep(SPIN * 3); // the worker is asleep now
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|i| assert_eq!(i, 0, "share {i} fails"));
        }));
        assert!(r.is_err());
        // The pool still works after a failed job.
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }
}
