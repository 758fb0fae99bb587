//! A job: inputs → parts → packs → model → assembled parts → output, every stage concurrent.
//!
//! ```text
//!                                               ┌─> worker cuda:0 ─┐
//!  planner (read, tokenize, sort, pack) ──queue─┼─> worker cuda:1 ─┼──results──┐
//!        │                                      └─> worker …      ─┘           │
//!        └────────────── part plans ───────────────────────────────────────────┴─> writer
//!                                                                     (assemble part, commit,
//!                                                                      manifest)
//! ```
//! The planner ([`planner`]) and the writer ([`writer`]) are blocking tasks on the tokio runtime;
//! the model stage is the [`crate::engine`]'s device pool, one worker per device pulling packs
//! from a shared queue. Bounded queues join them: a slow writer holds the workers back, the
//! workers hold the planner back, and memory stays bounded by a few parts. The writer puts rows
//! back in input order, so the output does not depend on how many devices ran it. Every input
//! row ends in exactly one place: an output row or an error row.
//!
//! Also here: the pre-pass that counts rows and finds duplicate ids ([`scan`]), the job's
//! description ([`spec`]) and its progress events ([`progress`]).

pub mod assemble;
pub mod dry_run;
pub mod memory;
pub mod plan;
pub mod planner;
pub mod progress;
pub mod reuse;
pub mod scan;
pub mod spec;
pub mod writer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use self::plan::PlanOptions;
use self::planner::{JobSink, PackMeta, Planner, PlannerStats};
use self::progress::Event;
use self::scan::Scan;
pub use self::spec::{JobSpec, ModelIdentity};
use self::writer::WriterMsg;
use crate::engine::{DevicePool, DeviceSummary, PackEmbedder, PoolOptions};
use crate::error::{Error, Result};
use crate::output::columns::OutputDType;
use crate::output::{resume_state, Manifest};
use crate::pack::packing_efficiency;

/// Options of a job beyond the model's.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// How rows become packs.
    pub plan: PlanOptions,
    /// Rows per part (sorting window, output row group, resume unit).
    pub rows_per_part: usize,
    /// Stop at the first bad record instead of listing it in the errors.
    pub strict: bool,
    /// Keep the first of duplicate ids and list the others as errors (else duplicates are fatal).
    pub dedupe: bool,
    /// Element type of embedding columns.
    pub output_dtype: OutputDType,
    /// Continue an interrupted job.
    pub resume: bool,
    /// Replace an existing output.
    pub overwrite: bool,
    /// Run a pack of `tokens_per_batch` tokens of the longest sequences on every device first,
    /// so that a budget that does not fit fails at start-up (GPU jobs).
    pub warm_up: bool,
    /// Embed identical sequences once and copy the result to every row of them
    /// ([`reuse`]); the output is the same either way.
    pub reuse: bool,
    /// Most bytes of results held for later rows of the same sequence (beyond it, a repeated
    /// sequence is computed again).
    pub reuse_memory: usize,
}

impl JobOptions {
    /// Refuse combinations that have no meaning, before any work.
    pub fn check(&self) -> Result<()> {
        if self.plan.pll && self.plan.long == plan::LongPolicy::Window {
            return Err(Error::InvalidOption(
                "--pll scores whole sequences, and --long window embeds a long one in windows: \
                 use --long truncate (the PLL of its first --max-length residues) or --long error"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Default for [`JobOptions::rows_per_part`]: 50,000 rows (hundreds of packs per part, so
    /// packs are >99 % full); 2,000 with per-residue outputs, whose rows are large; 1,000 with
    /// the PLL, whose rows are L forwards each.
    pub fn default_rows_per_part(pll: bool, per_residue: bool) -> usize {
        match () {
            _ if pll => 1_000,
            _ if per_residue => 2_000,
            _ => 50_000,
        }
    }

    /// Default for [`JobOptions::reuse_memory`]: 1 GiB, the pooled results of ~200,000 distinct
    /// repeated sequences of the 650M model at a time.
    pub const DEFAULT_REUSE_MEMORY: usize = 1 << 30;
}

/// What a finished job did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobSummary {
    /// Input rows.
    pub rows: u64,
    /// Rows in the output.
    pub embedded: u64,
    /// Rows in the errors output.
    pub errors: u64,
    /// Rows truncated to `--max-length`.
    pub truncated: u64,
    /// Distinct sequences among the rows that can be embedded (with reuse on).
    pub distinct: Option<u64>,
    /// Output rows whose result was copied from an identical sequence's.
    pub reused: u64,
    /// Residues embedded.
    pub residues: u64,
    /// Tokens through the model (specials included), this run.
    pub tokens: u64,
    /// Packs run, this run.
    pub packs: u64,
    /// Real tokens / budgeted tokens over this run's packs.
    pub packing_efficiency: f64,
    /// Parts written this run / skipped because a previous run finished them.
    pub parts_written: usize,
    /// Parts skipped (resume).
    pub parts_resumed: usize,
    /// Wall time.
    pub seconds: f64,
    /// Time the devices spent computing, averaged over devices (busy % = this / `seconds`).
    pub model_busy_seconds: f64,
    /// Per device: its share of the work, busy time, and whether it failed.
    pub devices: Vec<DeviceSummary>,
    /// The output.
    pub output: String,
    /// The errors file, if any row failed.
    pub errors_output: Option<String>,
}

impl JobSummary {
    /// Tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Run a job to completion (or interruption through `cancel`).
///
/// `devices` holds one embedder per device (replicas of one model: see
/// [`crate::Model::replicate_to`]); they share the packs, and the result does not depend on their
/// number. A device that fails leaves the job and its pack goes to the others; the job fails
/// only when none is left.
pub async fn run(
    spec: JobSpec,
    devices: Vec<Arc<dyn PackEmbedder>>,
    cancel: Arc<AtomicBool>,
) -> Result<JobSummary> {
    let started = Instant::now();
    let (manifest, scan) = blocking({
        let (spec, devices) = (spec.clone(), devices.clone());
        move || open_output(&spec, &devices)
    })
    .await?;
    let pool = Arc::new(
        blocking({
            let (spec, cancel) = (spec.clone(), cancel.clone());
            move || start_pool(&spec, devices, cancel)
        })
        .await?,
    );
    (spec.progress)(Event::Started { rows: scan.rows });
    let distinct = scan.sequences.as_ref().map(|s| s.len() as u64);
    let manifest = Arc::new(Mutex::new(manifest));
    let stages = run_stages(&spec, &pool, &manifest, scan, &cancel).await;
    (spec.progress)(Event::Finished);
    let (planner, devices, parts_written) = match stages {
        Ok(stats) => stats,
        Err(e) => {
            // Nothing finished: leave nothing behind, so that a corrected rerun starts clean.
            if manifest.lock().unwrap().parts.is_empty() {
                let _ = spec.layout.clear();
            }
            return Err(e);
        }
    };
    let mut manifest = Arc::try_unwrap(manifest)
        .expect("stages are done")
        .into_inner()
        .unwrap();
    if cancel.load(Ordering::SeqCst) {
        return Err(Error::Interrupted {
            done: manifest.parts.len(),
            total: planner.parts,
        });
    }
    manifest.total_parts = Some(planner.parts);
    let (errors_output, manifest) = blocking({
        let spec = spec.clone();
        move || finish_output(&spec, manifest)
    })
    .await?;
    let mut summary = summarize(&spec, &manifest, &devices, errors_output);
    debug_assert_eq!(summary.rows, planner.rows);
    summary.parts_written = parts_written;
    summary.parts_resumed = planner.resumed;
    summary.distinct = distinct;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Run blocking work (file system, object store, devices) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("a job stage panicked: {e}")))?
}

/// Before any model work: the output's state (what is there, what an earlier run finished),
/// then the pre-pass over the inputs; the staging directory and manifest are written last.
fn open_output(spec: &JobSpec, devices: &[Arc<dyn PackEmbedder>]) -> Result<(Manifest, Scan)> {
    let (layout, opts) = (&spec.layout, &spec.options);
    opts.check()?;
    if let Some(remote) = &spec.remote {
        remote.start(opts.overwrite, opts.resume)?;
    }
    let earlier = resume_state(layout, &spec.identity, opts.overwrite, opts.resume)?;
    if opts.overwrite {
        layout.clear()?;
    }
    let manifest = earlier.unwrap_or_else(|| Manifest::new(spec.identity.clone()));
    let policy = opts.plan.policy(spec.tokenizer);
    let scan = scan::scan(&spec.inputs, opts.dedupe, &policy, opts.reuse)?;
    if scan.rows == 0 {
        return Err(spec.inputs.no_records());
    }
    if let Some((tokens, at)) = &scan.longest {
        check_longest_fits(*tokens, at, devices)?;
    }
    layout.prepare()?;
    manifest.save(&layout.manifest_path())?;
    Ok((manifest, scan))
}

/// The longest model input must fit alone on some device (a pack of one sequence is the least
/// the pool can run): say so before any model work, with the fix, not hours in.
fn check_longest_fits(tokens: usize, at: &str, devices: &[Arc<dyn PackEmbedder>]) -> Result<()> {
    let fits: Vec<_> = devices
        .iter()
        .map(|d| (d.label(), d.memory_for(tokens)))
        .collect();
    if fits
        .iter()
        .any(|(_, f)| f.is_none_or(|(needed, free)| needed <= free))
    {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (label, (needed, free)) = fits
        .iter()
        .map(|(l, f)| (l, f.expect("every device answered")))
        .max_by_key(|(_, (_, free))| *free)
        .expect("at least one device");
    Err(Error::OutOfMemory {
        detail: format!(
            "the longest sequence ({tokens} tokens, {at}) needs about {:.1} GiB for its \
             activations, and {label} has {:.1} GiB free: lower --max-length, use --long window \
             (windows of --max-length residues), use a smaller model, or a device with more memory",
            gib(needed),
            gib(free)
        ),
    })
}

fn start_pool(
    spec: &JobSpec,
    devices: Vec<Arc<dyn PackEmbedder>>,
    cancel: Arc<AtomicBool>,
) -> Result<DevicePool<PackMeta>> {
    let plan = &spec.options.plan;
    let warm_up = if spec.options.warm_up {
        vec![crate::embed::warm_up_pack(
            plan.tokens_per_batch,
            plan.max_length,
        )]
    } else {
        Vec::new()
    };
    let started = Instant::now();
    let pool = DevicePool::start(
        devices,
        PoolOptions {
            warm_up,
            ..PoolOptions::default()
        },
        cancel,
    )?;
    if spec.options.warm_up {
        tracing::info!(
            "warm-up pack of {} tokens fits on every device ({:.1}s)",
            plan.tokens_per_batch,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(pool)
}

/// The planner and the writer, with the device pool between them, until all are done. The
/// root cause is reported: a stage that fails sets `cancel`, which stops the others quietly.
async fn run_stages(
    spec: &JobSpec,
    pool: &Arc<DevicePool<PackMeta>>,
    manifest: &Arc<Mutex<Manifest>>,
    scan: Scan,
    cancel: &Arc<AtomicBool>,
) -> Result<(PlannerStats, Vec<DeviceSummary>, usize)> {
    let (writer_tx, writer_rx) = mpsc::channel::<WriterMsg>(64 * pool.devices());
    let done: HashSet<usize> = manifest.lock().unwrap().parts.keys().copied().collect();
    let planner = {
        let (spec, pool, cancel) = (spec.clone(), pool.clone(), cancel.clone());
        blocking(move || {
            // The pool's queue closes when planning ends, whatever the outcome.
            let _close = pool.close_on_drop();
            Planner {
                spec: &spec,
                duplicates: &scan.duplicates,
                sequences: scan.sequences,
                done: &done,
                cancel: &cancel,
                sink: JobSink {
                    pool: &pool,
                    writer_tx,
                },
            }
            .run()
        })
    };
    let model = {
        let pool = pool.clone();
        blocking(move || pool.join())
    };
    let writer = {
        let (spec, manifest, cancel) = (spec.clone(), manifest.clone(), cancel.clone());
        blocking(move || writer::write_parts(&spec, writer_rx, &manifest, &cancel))
    };
    let (planned, modelled, written) = tokio::join!(planner, model, writer);
    Ok((planned?, modelled?, written?))
}

/// After the stages: an object-store output fetches the parts it combines; then the output is
/// made visible and, in a store, uploaded.
fn finish_output(spec: &JobSpec, mut manifest: Manifest) -> Result<(Option<String>, Manifest)> {
    if let Some(remote) = &spec.remote {
        remote.fetch_parts(&manifest)?;
    }
    let errors = writer::finalize(&spec.layout, &mut manifest)?;
    match &spec.remote {
        Some(remote) => {
            remote.finish(errors.is_some())?;
            Ok((errors.map(|_| remote.errors_url()), manifest))
        }
        None => Ok((errors, manifest)),
    }
}

/// The summary of a finished job: rows from the manifest (every run's parts), tokens and packs
/// from this run's devices.
fn summarize(
    spec: &JobSpec,
    manifest: &Manifest,
    devices: &[DeviceSummary],
    errors_output: Option<String>,
) -> JobSummary {
    let totals = manifest
        .parts
        .values()
        .fold(JobSummary::default(), |mut s, p| {
            s.rows += p.rows;
            s.embedded += p.output_rows;
            s.errors += p.error_rows;
            s.residues += p.residues;
            s.truncated += p.truncated;
            s.reused += p.reused;
            s
        });
    let tokens: u64 = devices.iter().map(|d| d.tokens).sum();
    let packs: u64 = devices.iter().map(|d| d.packs).sum();
    let busy: f64 = devices.iter().map(|d| d.busy_seconds).sum();
    let budget = spec.options.plan.tokens_per_batch;
    JobSummary {
        tokens,
        packs,
        packing_efficiency: packing_efficiency(tokens as usize, packs as usize, budget),
        model_busy_seconds: busy / devices.len().max(1) as f64,
        devices: devices.to_vec(),
        output: match &spec.remote {
            Some(remote) => remote.output_url(),
            None => spec.layout.target.display().to_string(),
        },
        errors_output,
        ..totals
    }
}
