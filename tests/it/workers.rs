//! Several model workers (one per device) on one job: shared queue, work stealing, a failing
//! device leaving the job, out-of-memory retries on another device, and output identical to a
//! one-worker run. The workers are CPU replicas of a fixture model; faults are injected.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use esmbed::engine::{PackEmbedder, Request};
use esmbed::pipeline::JobSummary;
use esmbed::{Device, Embedder, Error, PackedBatch, PooledLayer};

/// A CPU worker that can be slow, die with a driver error after some packs, or run out of
/// memory on one sequence length.
struct Worker {
    inner: Embedder,
    name: String,
    delay: Duration,
    /// Fail with a (non-memory) device error on this pack and every later one.
    die_at: Option<usize>,
    /// Out of memory on any pack holding a sequence of this many tokens.
    oom_on: Option<usize>,
    calls: AtomicUsize,
}

impl Worker {
    fn new(inner: Embedder, name: &str) -> Self {
        Self {
            inner,
            name: name.into(),
            delay: Duration::ZERO,
            die_at: None,
            oom_on: None,
            calls: AtomicUsize::new(0),
        }
    }
}

impl PackEmbedder for Worker {
    fn embed(&self, batch: &PackedBatch, request: Request) -> esmbed::Result<Vec<PooledLayer>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if self.die_at.is_some_and(|n| call >= n) {
            return Err(Error::Device(candle_core::Error::Msg(
                "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")"
                    .into(),
            )));
        }
        if let Some(len) = self.oom_on {
            if (0..batch.len()).any(|i| batch.range(i).len() == len) {
                return Err(Error::OutOfMemory {
                    detail: "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
                });
            }
        }
        self.inner.embed_request(batch, request)
    }

    fn label(&self) -> String {
        self.name.clone()
    }
}

fn model() -> Embedder {
    load_embedder("tiny_h16")
}

/// 150 sequences of 20..=169 residues; row `i` has `22 + i` tokens.
fn input(dir: &std::path::Path) -> std::path::PathBuf {
    let residues = b"ACDEFGHIKLMNPQRSTVWY";
    let mut text = String::new();
    for i in 0..150usize {
        let seq: String = (0..20 + i)
            .map(|j| residues[(i * 11 + j * 7) % 20] as char)
            .collect();
        text.push_str(&format!(">p{i}\n{seq}\n"));
    }
    let path = dir.join("in.fasta");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(
    dir: &std::path::Path,
    name: &str,
    workers: Vec<Arc<dyn PackEmbedder>>,
) -> esmbed::Result<JobSummary> {
    run_job(&input(dir), &dir.join(name), &model(), workers, 800, 40)
}

fn one_worker_output(dir: &std::path::Path) -> arrow::array::RecordBatch {
    let summary = run(
        dir,
        "one.parquet",
        vec![Arc::new(Worker::new(model(), "cpu#0"))],
    )
    .unwrap();
    assert_eq!((summary.embedded, summary.errors), (150, 0));
    read_parquet(&dir.join("one.parquet"))
}

fn assert_same_output(a: &arrow::array::RecordBatch, b: &arrow::array::RecordBatch) {
    assert_eq!(
        strings(a, "id"),
        strings(b, "id"),
        "same rows, in input order"
    );
    assert_eq!(
        vectors(a, "embedding"),
        vectors(b, "embedding"),
        "bitwise-identical embeddings"
    );
}

#[test]
fn several_workers_share_the_packs_and_give_the_one_worker_output() {
    let dir = scratch("workers_share");
    let expected = one_worker_output(&dir);
    let base = model();
    let workers: Vec<Arc<dyn PackEmbedder>> = (0..3)
        .map(|k| {
            let mut w = Worker::new(base.replicate(&Device::Cpu).unwrap(), &format!("cpu#{k}"));
            // Unequal speeds: a static split would leave the fast worker idle.
            w.delay = Duration::from_millis(2 + 40 * k as u64);
            Arc::new(w) as Arc<dyn PackEmbedder>
        })
        .collect();
    let summary = run(&dir, "three.parquet", workers).unwrap();
    assert_eq!((summary.embedded, summary.errors), (150, 0));
    assert_eq!(summary.devices.len(), 3);
    let packs: Vec<u64> = summary.devices.iter().map(|d| d.packs).collect();
    assert_eq!(packs.iter().sum::<u64>(), summary.packs);
    assert!(
        packs[0] > packs[2],
        "the fastest worker takes more packs: {packs:?}"
    );
    assert!(summary.devices.iter().all(|d| d.failed.is_none()));
    assert_same_output(&expected, &read_parquet(&dir.join("three.parquet")));
}

#[test]
fn a_failing_device_leaves_the_job_and_its_packs_run_elsewhere() {
    let dir = scratch("workers_fail");
    let expected = one_worker_output(&dir);
    let mut dying = Worker::new(model(), "cpu#1");
    dying.die_at = Some(2);
    dying.delay = Duration::from_millis(5);
    let mut healthy = Worker::new(model(), "cpu#0");
    healthy.delay = Duration::from_millis(5);
    let summary = run(
        &dir,
        "failover.parquet",
        vec![Arc::new(healthy), Arc::new(dying)],
    )
    .unwrap();
    assert_eq!(
        (summary.rows, summary.embedded, summary.errors),
        (150, 150, 0)
    );
    let failed = summary.devices[1]
        .failed
        .as_deref()
        .expect("cpu#1 is reported as failed");
    assert!(failed.contains("ILLEGAL_ADDRESS"), "{failed}");
    assert_eq!(
        summary.devices[1].packs, 2,
        "it finished two packs before failing"
    );
    assert!(summary.devices[0].failed.is_none());
    assert_same_output(&expected, &read_parquet(&dir.join("failover.parquet")));
}

#[test]
fn the_job_fails_when_no_device_is_left() {
    let dir = scratch("workers_all_fail");
    let workers: Vec<Arc<dyn PackEmbedder>> = (0..2)
        .map(|k| {
            let mut w = Worker::new(model(), &format!("cpu#{k}"));
            w.die_at = Some(1 + k);
            Arc::new(w) as Arc<dyn PackEmbedder>
        })
        .collect();
    let error = run(&dir, "none_left.parquet", workers).unwrap_err();
    assert!(error.to_string().contains("ILLEGAL_ADDRESS"), "{error}");
    assert!(!dir.join("none_left.parquet").exists());
}

#[test]
fn a_sequence_too_large_for_one_device_runs_on_another() {
    let dir = scratch("workers_oom");
    let expected = one_worker_output(&dir);
    // Row 57 has 79 tokens: worker 0 runs out of memory on it even alone, worker 1 does not.
    let mut small = Worker::new(model(), "cpu#0");
    small.oom_on = Some(79);
    let mut large = Worker::new(model(), "cpu#1");
    large.delay = Duration::from_millis(20);
    let summary = run(
        &dir,
        "moved.parquet",
        vec![Arc::new(small), Arc::new(large)],
    )
    .unwrap();
    assert_eq!((summary.embedded, summary.errors), (150, 0));
    let got = read_parquet(&dir.join("moved.parquet"));
    assert_eq!(strings(&expected, "id"), strings(&got, "id"));
    // Packs that were split differ from the one-worker packs only by float rounding.
    for (x, y) in vectors(&expected, "embedding")
        .iter()
        .zip(&vectors(&got, "embedding"))
    {
        assert!(relative_error(y, x) <= 1e-6);
    }

    // When every device refuses it, the sequence is an error row naming the cause.
    let mut a = Worker::new(model(), "cpu#0");
    a.oom_on = Some(79);
    let mut b = Worker::new(model(), "cpu#1");
    b.oom_on = Some(79);
    let summary = run(&dir, "refused.parquet", vec![Arc::new(a), Arc::new(b)]).unwrap();
    assert_eq!((summary.embedded, summary.errors), (149, 1));
    let errors = read_parquet(&dir.join("refused.errors.parquet"));
    assert_eq!(strings(&errors, "id"), [Some("p57".to_string())]);
}
