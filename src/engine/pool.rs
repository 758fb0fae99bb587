//! [`DevicePool`]: one worker thread per device, pulling packs from one shared queue.
//!
//! Each worker runs its packs through [`split::run_halving`]: out of memory halves the pack down
//! to single sequences; a sequence that fails alone is offered to the devices that have not tried
//! it (they may have more free memory) and comes back to the submitter as
//! [`PackOutcome::Failed`] once every live device has refused it. Any other error means the device
//! failed: its worker leaves, its pack goes back to the front of the queue for the others, and
//! the pool stops only when no device is left.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

use super::queue::{Next, Task, WorkQueue};
use super::{split, PackEmbedder, Request};
use crate::error::{Error, Result};
use crate::pack::PackedBatch;
use crate::pool::PooledLayer;

/// One device's part in a job, a SQL session or a benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceSummary {
    /// `cuda:0`, `cpu`.
    pub device: String,
    /// Tokens it embedded.
    pub tokens: u64,
    /// Packs it ran.
    pub packs: u64,
    /// Seconds it spent computing.
    pub busy_seconds: f64,
    /// Tokens per second of its busy time.
    pub tokens_per_second: f64,
    /// Why it left, if it failed (its packs were run by the others).
    pub failed: Option<String>,
}

/// Where a pack's results go. Called from a worker thread; `false` means the submitter is gone
/// and nothing more can be delivered: the pool stops.
pub type Reply<C> = Arc<dyn Fn(PackOutcome<C>) -> bool + Send + Sync>;

/// A pack to run, with the submitter's context (shared by the pieces an out-of-memory split
/// makes) and where its results go.
pub struct Submission<C> {
    /// The tokens.
    pub batch: PackedBatch,
    /// What to compute.
    pub request: Request,
    /// The submitter's own description of the pack (which rows, which part).
    pub context: Arc<C>,
    /// Where results go.
    pub reply: Reply<C>,
}

/// The result of (part of) a submitted pack.
pub enum PackOutcome<C> {
    /// Sequences `range` of the submitted pack, embedded as `batch` on device `device`.
    Done {
        /// The submission's context.
        context: Arc<C>,
        /// Which sequences of the submitted pack.
        range: Range<usize>,
        /// Their tokens, packed as they ran.
        batch: PackedBatch,
        /// The pooled outputs of `batch`.
        layers: Vec<PooledLayer>,
        /// Index of the device that ran them.
        device: usize,
    },
    /// Sequence `index` of the submitted pack ran out of memory alone on every live device.
    Failed {
        /// The submission's context.
        context: Arc<C>,
        /// Which sequence of the submitted pack.
        index: usize,
        /// Its tokens.
        batch: PackedBatch,
        /// The last device's error (out of memory).
        error: Error,
    },
}

/// Settings of a pool.
#[derive(Debug, Clone, Default)]
pub struct PoolOptions {
    /// Packs waiting in the queue at most (submitters block beyond); default 2 per device + 2.
    pub capacity: Option<usize>,
    /// Packs each device runs before it takes work (kernels compiled, memory pool filled, the
    /// token budget proven to fit); [`DevicePool::start`] returns once all have.
    pub warm_up: Vec<PackedBatch>,
}

struct Item<C> {
    submission: Submission<C>,
    /// Position of `submission.batch`'s first sequence in the pack first submitted.
    offset: usize,
    /// Why it failed last (a single sequence refused by a device).
    failure: Option<Error>,
}

/// One worker per device behind a shared queue; see the module docs.
pub struct DevicePool<C> {
    queue: Arc<WorkQueue<Item<C>>>,
    stop: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<Result<()>>>>,
    devices: usize,
    stats: Arc<Mutex<Vec<DeviceSummary>>>,
}

impl<C> std::fmt::Debug for DevicePool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePool")
            .field("devices", &self.devices)
            .finish()
    }
}

impl<C: Send + Sync + 'static> DevicePool<C> {
    /// Start one worker per device (replicas of one model, e.g. from
    /// [`crate::Model::replicate_to`]) and wait for their warm-up. `stop` ends the pool early
    /// (a cancelled job); the pool sets it when no device is left.
    pub fn start(
        devices: Vec<Arc<dyn PackEmbedder>>,
        options: PoolOptions,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        if devices.is_empty() {
            return Err(Error::NoDevice("no device to run the model on".into()));
        }
        let n = devices.len();
        let capacity = options.capacity.unwrap_or(2 * n + 2);
        let queue = Arc::new(WorkQueue::new(n, capacity));
        let stats = Arc::new(Mutex::new(
            devices
                .iter()
                .map(|d| DeviceSummary {
                    device: d.label(),
                    ..DeviceSummary::default()
                })
                .collect(),
        ));
        let warm_up = Arc::new(options.warm_up);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut workers = Vec::with_capacity(n);
        for (index, device) in devices.into_iter().enumerate() {
            let worker = Worker {
                index,
                device,
                queue: queue.clone(),
                stop: stop.clone(),
                stats: stats.clone(),
            };
            let (warm_up, ready) = (warm_up.clone(), ready_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("esmbed-{}", worker.device.label()))
                .spawn(move || {
                    let warmed = worker.warm_up(&warm_up);
                    let ok = warmed.is_ok();
                    let _ = ready.send(warmed);
                    if ok {
                        worker.run()
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| Error::internal(format!("cannot start a device thread: {e}")));
            match handle {
                Ok(h) => workers.push(h),
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        let pool = Self {
            queue,
            stop,
            workers: Mutex::new(workers),
            devices: n,
            stats,
        };
        for warmed in ready_rx.iter().take(n) {
            if let Err(e) = warmed {
                pool.stop.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(pool)
    }

    /// Queue a pack, waiting while the queue is full. False when the pool stopped (cancelled, or
    /// no device left): the submitter should stop too.
    pub fn submit(&self, submission: Submission<C>) -> bool {
        let item = Item {
            submission,
            offset: 0,
            failure: None,
        };
        self.queue.push(item, &self.stop)
    }

    /// No more packs will be submitted: workers exit once the queue drains.
    pub fn close(&self) {
        self.queue.close();
    }

    /// A guard that closes the queue when dropped, so that a submitter's early return (an
    /// error) still lets the workers drain and exit.
    pub fn close_on_drop(&self) -> impl Drop + '_ {
        super::queue::CloseOnDrop(&*self.queue)
    }

    /// Number of devices.
    pub fn devices(&self) -> usize {
        self.devices
    }

    /// Per-device work so far.
    pub fn device_stats(&self) -> Vec<DeviceSummary> {
        self.stats.lock().unwrap().clone()
    }

    /// Wait for the workers (they exit once the queue is closed, see [`DevicePool::close`], and
    /// drained) and return each device's summary; the error is the one that left no device to
    /// run the work.
    pub fn join(&self) -> Result<Vec<DeviceSummary>> {
        let mut failure = None;
        let workers = std::mem::take(&mut *self.workers.lock().unwrap());
        for handle in workers {
            if let Err(e) = handle.join().expect("device workers do not panic") {
                failure = Some(e);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(self.device_stats()),
        }
    }
}

impl<C> Drop for DevicePool<C> {
    fn drop(&mut self) {
        self.queue.close();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap());
        for handle in workers {
            let _ = handle.join();
        }
    }
}

struct Worker<C> {
    index: usize,
    device: Arc<dyn PackEmbedder>,
    queue: Arc<WorkQueue<Item<C>>>,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Vec<DeviceSummary>>>,
}

impl<C> Worker<C> {
    fn warm_up(&self, packs: &[PackedBatch]) -> Result<()> {
        for batch in packs {
            match self.device.embed(batch, Request::Configured {
                    residues: false,
                    log_probs: false,
                }) {
                Ok(_) => {}
                Err(e) if e.is_out_of_memory() => {
                    return Err(Error::OutOfMemory {
                        detail: format!(
                            "a warm-up pack of {} tokens does not fit on {} ({e}); lower --tokens-per-batch",
                            batch.total_tokens(),
                            self.device.label()
                        ),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        self.device.synchronize()
    }

    /// Take packs until the queue drains (or the pool stops); see the module docs.
    fn run(&self) -> Result<()> {
        loop {
            let task = match self.queue.next(self.index, &self.stop) {
                Next::Exit => break,
                Next::Orphan(task) => {
                    let item = task.item;
                    let error = item
                        .failure
                        .unwrap_or_else(|| Error::internal("an orphaned pack without a failure"));
                    let outcome = PackOutcome::Failed {
                        context: item.submission.context.clone(),
                        index: item.offset,
                        batch: item.submission.batch,
                        error,
                    };
                    self.deliver(&item.submission.reply, outcome);
                    self.queue.finish();
                    continue;
                }
                Next::Work(task) => task,
            };
            if !self.run_task(task)? {
                break;
            }
        }
        // Busy time is only complete once the device has finished what was queued on it.
        self.device.synchronize()
    }

    /// Run one task. `Ok(false)`: this device failed and left the pool; `Err`: it was the last.
    fn run_task(&self, task: Task<Item<C>>) -> Result<bool> {
        let item = &task.item;
        let sub = &item.submission;
        let started = Instant::now();
        let result = split::run_halving(
            &sub.batch,
            &mut |b| self.device.embed(b, sub.request),
            &mut |b| {
                tracing::warn!(
                    "{}: out of memory on a pack of {} sequences ({} tokens): splitting it and retrying",
                    self.device.label(),
                    b.len(),
                    b.total_tokens()
                )
            },
        );
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => return self.leave(task, e),
        };
        self.account(&sub.batch, started.elapsed().as_secs_f64());
        for o in outcomes {
            let outcome = match o.result {
                Ok(layers) => PackOutcome::Done {
                    context: sub.context.clone(),
                    range: item.offset + o.range.start..item.offset + o.range.end,
                    batch: o.batch,
                    layers,
                    device: self.index,
                },
                Err(error) => match self.refuse(&task, o.range.start, o.batch, error) {
                    None => continue, // another device will try it
                    Some(failed) => failed,
                },
            };
            self.deliver(&sub.reply, outcome);
        }
        self.queue.finish();
        Ok(true)
    }

    /// A single sequence ran out of memory here: offer it to the devices that have not tried it,
    /// or give it back as failed when there is none.
    fn refuse(
        &self,
        task: &Task<Item<C>>,
        start: usize,
        batch: PackedBatch,
        error: Error,
    ) -> Option<PackOutcome<C>> {
        let sub = &task.item.submission;
        let retry = Task {
            item: Item {
                submission: Submission {
                    batch,
                    request: sub.request,
                    context: sub.context.clone(),
                    reply: sub.reply.clone(),
                },
                offset: task.item.offset + start,
                failure: Some(error),
            },
            refused_by: task.refused_by.clone(),
        };
        self.queue.refuse(self.index, retry).map(|back| {
            let item = back.item;
            PackOutcome::Failed {
                context: item.submission.context,
                index: item.offset,
                batch: item.submission.batch,
                error: item.failure.expect("a refused task carries its failure"),
            }
        })
    }

    /// The device failed: leave the pool, its task goes to the others.
    fn leave(&self, task: Task<Item<C>>, error: Error) -> Result<bool> {
        let label = self.device.label();
        self.stats.lock().unwrap()[self.index].failed = Some(error.to_string());
        if self.queue.fail_worker(self.index, task) {
            tracing::error!(
                "{label} failed and leaves; its packs go to the other devices: {error}"
            );
            return Ok(false);
        }
        self.stop.store(true, Ordering::SeqCst);
        Err(error)
    }

    fn account(&self, batch: &PackedBatch, seconds: f64) {
        let mut stats = self.stats.lock().unwrap();
        let s = &mut stats[self.index];
        s.tokens += batch.total_tokens() as u64;
        s.packs += 1;
        s.busy_seconds += seconds;
        s.tokens_per_second = s.tokens as f64 / s.busy_seconds.max(1e-9);
    }

    fn deliver(&self, reply: &Reply<C>, outcome: PackOutcome<C>) {
        if !reply(outcome) {
            self.queue.abort(); // the submitter stopped: nothing more can be delivered
        }
    }
}
