//! The shared queue between the fronts that submit packs and the device workers (one per device).
//!
//! Workers pull the next pack when they are free, so a fast GPU takes more packs than a slow
//! one and a long pack does not hold the others back (work stealing, not static splitting).
//! Output order does not depend on who ran what: submitters put results back by position.
//!
//! Two kinds of retry go through the queue:
//! - a worker whose device fails (driver error) leaves the pool; its pack goes back to the front
//!   of the queue for the others; the job fails only when no worker is left;
//! - a single sequence that runs out of memory on one device is offered to the devices that have
//!   not tried it yet (they may have more free memory); when every live device has refused it,
//!   it comes back as an [`Next::Orphan`], which the worker hands back to its submitter as failed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// A queued item and the workers that could not run it.
#[derive(Debug)]
pub struct Task<T> {
    /// The work.
    pub item: T,
    /// Workers that ran out of memory on it (they are not offered it again).
    pub refused_by: Vec<usize>,
}

impl<T> Task<T> {
    /// A task no worker has tried.
    pub fn new(item: T) -> Self {
        Self {
            item,
            refused_by: Vec::new(),
        }
    }
}

/// What a worker gets from [`WorkQueue::next`].
#[derive(Debug)]
pub enum Next<T> {
    /// Run it, then call [`WorkQueue::finish`] (or [`WorkQueue::fail_worker`]).
    Work(Task<T>),
    /// Every live worker refused it: report it as failed, then call [`WorkQueue::finish`].
    Orphan(Task<T>),
    /// Nothing left (or the job stops): the worker exits.
    Exit,
}

struct State<T> {
    pending: VecDeque<Task<T>>,
    closed: bool,
    aborted: bool,
    in_flight: usize,
    live: Vec<bool>,
}

impl<T> State<T> {
    fn eligible(&self, task: &Task<T>) -> bool {
        self.live
            .iter()
            .enumerate()
            .any(|(w, &live)| live && !task.refused_by.contains(&w))
    }
}

/// A bounded multi-consumer queue with retry bookkeeping; see the module docs.
pub struct WorkQueue<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    capacity: usize,
}

/// How often a waiting worker looks at the job's cancel flag.
const POLL: Duration = Duration::from_millis(50);

impl<T> WorkQueue<T> {
    /// A queue for `workers` workers holding at most `capacity` waiting items.
    pub fn new(workers: usize, capacity: usize) -> Self {
        Self {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                closed: false,
                aborted: false,
                in_flight: 0,
                live: vec![true; workers],
            }),
            changed: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Add work, waiting while the queue is full. False when the job stopped (nobody will run
    /// it): the producer should stop too.
    pub fn push(&self, item: T, cancel: &AtomicBool) -> bool {
        let mut state = self.state.lock().unwrap();
        loop {
            if state.aborted || cancel.load(Ordering::SeqCst) {
                return false;
            }
            if state.pending.len() < self.capacity {
                state.pending.push_back(Task::new(item));
                self.changed.notify_all();
                return true;
            }
            state = self.changed.wait_timeout(state, POLL).unwrap().0;
        }
    }

    /// No more work will be pushed: workers exit once the queue drains.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.changed.notify_all();
    }

    /// Stop everyone now (a stage failed). Waiting work is dropped.
    pub fn abort(&self) {
        let mut state = self.state.lock().unwrap();
        state.aborted = true;
        state.pending.clear();
        self.changed.notify_all();
    }

    /// The next task for `worker`, waiting for one.
    pub fn next(&self, worker: usize, cancel: &AtomicBool) -> Next<T> {
        let mut state = self.state.lock().unwrap();
        loop {
            if state.aborted || cancel.load(Ordering::SeqCst) {
                return Next::Exit;
            }
            if let Some(i) = state
                .pending
                .iter()
                .position(|t| !t.refused_by.contains(&worker))
            {
                let task = state.pending.remove(i).expect("index in range");
                state.in_flight += 1;
                self.changed.notify_all();
                return Next::Work(task);
            }
            if let Some(i) = state.pending.iter().position(|t| !state.eligible(t)) {
                let task = state.pending.remove(i).expect("index in range");
                state.in_flight += 1;
                self.changed.notify_all();
                return Next::Orphan(task);
            }
            if state.closed && state.pending.is_empty() && state.in_flight == 0 {
                return Next::Exit;
            }
            state = self.changed.wait_timeout(state, POLL).unwrap().0;
        }
    }

    /// The task `next` handed out is done.
    pub fn finish(&self) {
        let mut state = self.state.lock().unwrap();
        state.in_flight -= 1;
        self.changed.notify_all();
    }

    /// `worker` could not run `task` (out of memory on a single sequence): offer it to the live
    /// workers that have not tried it. Gives it back when there is none.
    pub fn refuse(&self, worker: usize, mut task: Task<T>) -> Option<Task<T>> {
        let mut state = self.state.lock().unwrap();
        if !task.refused_by.contains(&worker) {
            task.refused_by.push(worker);
        }
        if state.aborted || !state.eligible(&task) {
            return Some(task);
        }
        state.pending.push_front(task);
        self.changed.notify_all();
        None
    }

    /// `worker`'s device failed on `task`: the worker leaves the pool and the task goes back to
    /// the front of the queue. False when no worker is left (the job cannot go on).
    pub fn fail_worker(&self, worker: usize, task: Task<T>) -> bool {
        let mut state = self.state.lock().unwrap();
        state.live[worker] = false;
        state.in_flight -= 1;
        state.pending.push_front(task);
        let any_left = state.live.iter().any(|&l| l);
        if !any_left {
            state.aborted = true;
            state.pending.clear();
        }
        self.changed.notify_all();
        any_left
    }
}

/// Closes the queue when the producer returns, whatever the path (early return, error, panic).
pub struct CloseOnDrop<'a, T>(pub &'a WorkQueue<T>);

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn never() -> AtomicBool {
        AtomicBool::new(false)
    }

    #[test]
    fn every_item_is_taken_once_by_competing_workers() {
        let queue = Arc::new(WorkQueue::new(3, 2));
        let taken = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            for w in 0..3 {
                let (queue, taken) = (queue.clone(), taken.clone());
                s.spawn(move || {
                    let cancel = never();
                    while let Next::Work(t) = queue.next(w, &cancel) {
                        taken.lock().unwrap().push(t.item);
                        std::thread::sleep(Duration::from_micros(100 * (w as u64 + 1)));
                        queue.finish();
                    }
                });
            }
            let cancel = never();
            let _close = CloseOnDrop(&*queue);
            for i in 0..200 {
                assert!(queue.push(i, &cancel));
            }
        });
        let mut taken = taken.lock().unwrap().clone();
        taken.sort();
        assert_eq!(taken, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_workers_task_goes_to_another() {
        let queue = WorkQueue::new(2, 4);
        let cancel = never();
        assert!(queue.push("a", &cancel));
        queue.close();
        let Next::Work(task) = queue.next(0, &cancel) else {
            panic!("work expected")
        };
        assert!(queue.fail_worker(0, task));
        // Worker 0 is gone; worker 1 gets the task back.
        let Next::Work(task) = queue.next(1, &cancel) else {
            panic!("work expected")
        };
        assert_eq!(task.item, "a");
        queue.finish();
        assert!(matches!(queue.next(1, &cancel), Next::Exit));
    }

    #[test]
    fn the_last_worker_failing_stops_the_queue() {
        let queue = WorkQueue::new(1, 4);
        let cancel = never();
        assert!(queue.push(1, &cancel));
        let Next::Work(task) = queue.next(0, &cancel) else {
            panic!("work expected")
        };
        assert!(!queue.fail_worker(0, task));
        assert!(
            !queue.push(2, &cancel),
            "producers stop once nobody can run work"
        );
    }

    #[test]
    fn refused_work_visits_every_live_worker_then_becomes_an_orphan() {
        let queue = WorkQueue::new(3, 4);
        let cancel = never();
        assert!(queue.push(7, &cancel));
        queue.close();
        let Next::Work(t) = queue.next(0, &cancel) else {
            panic!()
        };
        assert!(queue.refuse(0, t).is_none());
        queue.finish();
        // Worker 0 does not see it again; worker 2 does.
        let Next::Work(t) = queue.next(2, &cancel) else {
            panic!()
        };
        assert!(queue.refuse(2, t).is_none());
        queue.finish();
        let Next::Work(t) = queue.next(1, &cancel) else {
            panic!()
        };
        let back = queue.refuse(1, t).expect("nobody left to try");
        assert_eq!(back.refused_by, vec![0, 2, 1]);
        queue.finish();
        assert!(matches!(queue.next(0, &cancel), Next::Exit));
    }

    #[test]
    fn a_refused_task_whose_last_candidate_died_is_an_orphan() {
        let queue = WorkQueue::new(2, 4);
        let cancel = never();
        assert!(queue.push("long", &cancel));
        assert!(queue.push("other", &cancel));
        queue.close();
        let Next::Work(t) = queue.next(0, &cancel) else {
            panic!()
        };
        assert!(queue.refuse(0, t).is_none()); // offered to worker 1
        queue.finish();
        let Next::Work(t) = queue.next(1, &cancel) else {
            panic!()
        };
        assert_eq!(t.item, "long");
        assert!(queue.fail_worker(1, t)); // worker 1 dies holding it
        let Next::Work(t) = queue.next(0, &cancel) else {
            panic!()
        };
        assert_eq!(t.item, "other");
        queue.finish();
        let Next::Orphan(t) = queue.next(0, &cancel) else {
            panic!("only worker 0 is left, and it refused the task")
        };
        assert_eq!(t.item, "long");
        queue.finish();
        assert!(matches!(queue.next(0, &cancel), Next::Exit));
    }

    #[test]
    fn cancel_wakes_waiting_workers() {
        let queue = WorkQueue::<u8>::new(1, 1);
        let cancel = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                cancel.store(true, Ordering::SeqCst);
            });
            assert!(matches!(queue.next(0, &cancel), Next::Exit));
        });
    }
}
