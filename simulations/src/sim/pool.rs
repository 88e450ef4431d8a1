//! Trainings run ahead of the simulated clock: a device's training starts on a worker thread when the
//! device starts it, and the event loop takes its result when the simulated training completes. In the
//! meantime the loop goes on serving other devices' requests (a population polling for tasks) and the
//! workers train other devices, so the cores that a single training leaves idle are used.
//!
//! A training is a pure function of its inputs (the model, the task, the starting adapter, the tokens
//! and a seed derived from the device and the round), so where and when it runs changes nothing in the
//! result: a run is the same with any number of workers. Workers take the training that is due first on
//! the simulated clock, and at most `limit` trainings are running or finished and not yet taken, which
//! bounds the memory their updates hold.
//!
//! What must never live here: anything a device's session decides, or the coordinator; only the running
//! of trainings whose inputs the event loop fixed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};

use starling_client::train::{train_task, TaskTraining, TrainedUpdate};
use starling_model::engine::Precision;
use starling_model::Llama;
use starling_protocol::message::Task;
use starling_protocol::Manifest;

/// A training's key: the device and the round.
pub(super) type Key = (usize, u64);

/// Everything one training needs, owned, so that it can run on another thread.
pub(super) struct Job {
    /// The task.
    pub(super) task: Task,
    /// Its verified manifest.
    pub(super) manifest: Manifest,
    /// The held adapter's values.
    pub(super) start: Vec<f32>,
    /// The device's training tokens.
    pub(super) tokens: std::sync::Arc<Vec<u32>>,
    /// DP-SGD's sampling rate as the session accounted it.
    pub(super) dp_sampling_rate: Option<f64>,
    /// The training's seed.
    pub(super) seed: u64,
    /// Arithmetic of the frozen-weight products.
    pub(super) precision: Precision,
}

impl Job {
    /// Trains (on whatever thread calls it).
    pub(super) fn run(&self, model: &Llama) -> Result<TrainedUpdate, String> {
        let t = TaskTraining {
            model,
            task: &self.task,
            manifest: &self.manifest,
            start: &self.start,
            tokens: &self.tokens,
            dp_sampling_rate: self.dp_sampling_rate,
            seed: Some(self.seed),
            precision: self.precision,
        };
        train_task(&t, |_, _| true).map_err(|e| e.to_string())
    }
}

#[derive(Default)]
struct Shared {
    /// Waiting trainings by the simulated time they are due (then the order they were started in).
    due: BinaryHeap<Reverse<(u64, u64, Key)>>,
    waiting: HashMap<Key, Job>,
    running: HashSet<Key>,
    /// Running trainings whose device started another since: their results are dropped.
    stale: HashSet<Key>,
    done: HashMap<Key, Result<TrainedUpdate, String>>,
    seq: u64,
    closed: bool,
}

/// The trainings started and not yet taken, and the workers that run them.
pub(super) struct Pool<'m> {
    model: &'m Llama,
    limit: usize,
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl<'m> Pool<'m> {
    /// A pool training on `model`, holding at most `limit` trainings running or finished (at least one).
    pub(super) fn new(model: &'m Llama, limit: usize) -> Self {
        Self {
            model,
            limit: limit.max(1),
            shared: Mutex::new(Shared::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing panics while holding the lock (trainings run outside it), so a poisoned one is still
        // consistent.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `job` for `key`, due at simulated time `due`. A training the same device started earlier
    /// and never had taken (it crashed meanwhile) is dropped.
    pub(super) fn submit(&self, key: Key, due: u64, job: Job) {
        let mut s = self.lock();
        s.waiting.retain(|k, _| k.0 != key.0);
        s.done.retain(|k, _| k.0 != key.0);
        let superseded: Vec<Key> = s.running.iter().filter(|k| k.0 == key.0).copied().collect();
        s.stale.extend(superseded);
        s.seq += 1;
        let seq = s.seq;
        s.due.push(Reverse((due, seq, key)));
        s.waiting.insert(key, job);
        drop(s);
        self.changed.notify_all();
    }

    /// The result of the training started for `key`: taken when a worker has finished it, waited for when
    /// one is running it, trained here when none has begun; `None` if none was started.
    pub(super) fn take(&self, key: Key) -> Option<Result<TrainedUpdate, String>> {
        let mut s = self.lock();
        loop {
            if let Some(r) = s.done.remove(&key) {
                drop(s);
                self.changed.notify_all();
                return Some(r);
            }
            if !s.running.contains(&key) {
                let job = s.waiting.remove(&key)?;
                drop(s);
                return Some(job.run(self.model));
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets the workers go once they finish what they are running.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// A worker: runs the due trainings until the pool is closed.
    pub(super) fn work(&self) {
        let mut s = self.lock();
        loop {
            if s.closed {
                return;
            }
            let room = s.running.len() + s.done.len() < self.limit;
            let next = if room { s.due.pop() } else { None };
            let Some(Reverse((_, _, key))) = next else {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            // Taken (or dropped) since it was queued.
            let Some(job) = s.waiting.remove(&key) else {
                continue;
            };
            s.running.insert(key);
            drop(s);
            // A panic (a bug) becomes the training's error, not a loop waiting forever for its result.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(self.model)))
                    .unwrap_or_else(|_| Err("the training panicked".into()));
            s = self.lock();
            s.running.remove(&key);
            if !s.stale.remove(&key) {
                s.done.insert(key, result);
            }
            self.changed.notify_all();
        }
    }
}

/// Closes the pool when dropped, so that its scoped workers end however the event loop ends.
pub(super) struct CloseOnDrop<'a, 'm>(pub(super) &'a Pool<'m>);

impl Drop for CloseOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.close();
    }
}
