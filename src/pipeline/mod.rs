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
//! Stages are blocking tasks on the tokio runtime joined by bounded queues: a slow writer holds
//! the workers back, the workers hold the planner back, and memory stays bounded by a few parts.
//! One worker per device pulls packs from a shared queue ([`schedule`]); the writer puts rows
//! back in input order, so the output does not depend on how many devices ran it.
//! Every input row ends in exactly one place: an output row or an error row.

pub mod assemble;
pub mod plan;
pub mod schedule;

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::Array;
use arrow::datatypes::SchemaRef;
use serde::Serialize;
use tokio::sync::mpsc;

use self::assemble::PartAssembly;
use self::plan::{Duplicates, Origin, Pack, PartBuilder, PartPlan, PlanOptions, Segment};
use self::schedule::{CloseOnDrop, Next, Task, WorkQueue};
use crate::embed::Embedder;
use crate::error::{Error, Result};
use crate::input::Inputs;
use crate::output::columns::{EmbeddingColumns, OutputDType};
use crate::output::remote::RemoteOutput;
use crate::output::{self, combine, Manifest, OutputKind, OutputLayout};
use crate::pack::{packing_efficiency, PackedBatch};
use crate::pool::PooledLayer;
use crate::tokenize::Tokenizer;

/// The model stage's contract: embed one pack. Implemented by [`Embedder`]; tests wrap it to
/// inject failures.
pub trait PackEmbedder: Send + Sync {
    /// Pooled outputs of every requested layer; `residues` forces per-residue outputs.
    fn embed(&self, batch: &PackedBatch, residues: bool) -> Result<Vec<PooledLayer>>;

    /// The device, for summaries and logs (`cuda:1`).
    fn label(&self) -> String {
        "device".into()
    }
}

impl PackEmbedder for Embedder {
    fn embed(&self, batch: &PackedBatch, residues: bool) -> Result<Vec<PooledLayer>> {
        self.embed_packed_with(batch, residues)
    }

    fn label(&self) -> String {
        self.device_label()
    }
}

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
    /// Show a progress bar (on a terminal).
    pub progress: bool,
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

/// One device's part in a job (or a benchmark).
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
    /// Why it left the job, if it failed (its packs were run by the others).
    pub failed: Option<String>,
}

impl JobSummary {
    /// Tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Everything that defines a job's result, for resume checks and the output's metadata.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The inputs.
    pub inputs: Inputs,
    /// The output layout.
    pub layout: OutputLayout,
    /// Embedding columns.
    pub columns: Arc<EmbeddingColumns>,
    /// esmbed's footer metadata (JSON).
    pub metadata: String,
    /// The job identity recorded in the manifest (JSON).
    pub identity: serde_json::Value,
    /// Options.
    pub options: JobOptions,
    /// Policy for unknown characters.
    pub tokenizer: Tokenizer,
    /// Where the output is mirrored, for an output in an object store.
    pub remote: Option<Arc<RemoteOutput>>,
}

/// Which model a job runs, for the output's metadata and resume checks.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    /// The model as the user named it.
    pub name: String,
    /// [`crate::Checkpoint::fingerprint`] of its weights.
    pub fingerprint: String,
}

impl JobSpec {
    /// Describe a job: `inputs` embedded by `embedder` into `output`.
    pub fn new(
        inputs: Inputs,
        output: &std::path::Path,
        embedder: &Embedder,
        model: ModelIdentity,
        options: JobOptions,
    ) -> Self {
        let config = embedder.model().config();
        let pooling = embedder.pooling();
        let columns = Arc::new(EmbeddingColumns {
            layers: embedder.layers().to_vec(),
            last_layer: config.num_hidden_layers,
            pooling,
            hidden: config.hidden_size,
            dtype: options.output_dtype,
        });
        let unknown = format!("{:?}", embedder.tokenizer().unknown).to_lowercase();
        let metadata = serde_json::json!({
            "esmbed_version": env!("CARGO_PKG_VERSION"),
            "model": model.name,
            "model_fingerprint": model.fingerprint,
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "layers": columns.layers,
            "primary_layer": columns.primary_layer(),
            "pooling": {
                "embedding": "mean over residues (BOS/EOS excluded)",
                "bos": pooling.bos,
                "per_residue": pooling.per_residue,
            },
            "compute_dtype": format!("{:?}", embedder.model().dtype()).to_lowercase(),
            "output_dtype": options.output_dtype,
            "max_length": options.plan.max_length,
            "long": options.plan.long,
            "unknown": unknown,
        });
        // Everything that shapes the result; the token budget and part count do not (packing
        // does not change a sequence's numbers), so a resumed job may lower --tokens-per-batch.
        let identity = serde_json::json!({
            "inputs": inputs.files.iter().map(|f| {
                serde_json::json!({"path": f.name(), "size": f.size()})
            }).collect::<Vec<_>>(),
            "seq_column": inputs.options.seq_column,
            "id_column": inputs.options.id_column,
            "model_fingerprint": metadata["model_fingerprint"],
            "layers": metadata["layers"],
            "pooling": metadata["pooling"],
            "compute_dtype": metadata["compute_dtype"],
            "output_dtype": metadata["output_dtype"],
            "max_length": options.plan.max_length,
            "long": options.plan.long,
            "unknown": unknown,
            "rows_per_part": options.rows_per_part,
            "dedupe": options.dedupe,
        });
        Self {
            layout: OutputLayout::new(output),
            inputs,
            columns,
            metadata: metadata.to_string(),
            identity,
            tokenizer: *embedder.tokenizer(),
            options,
            remote: None,
        }
    }

    /// Write the output to an object store (see [`RemoteOutput`]): the job writes the remote
    /// output's local mirror, and every committed file is uploaded.
    pub fn with_remote_output(mut self, remote: RemoteOutput) -> Self {
        self.layout = remote.local.clone();
        self.remote = Some(Arc::new(remote));
        self
    }
}

enum WriterMsg {
    Plan(PartPlan),
    Done {
        part: usize,
        segments: Vec<Segment>,
        batch: PackedBatch,
        pooled: Vec<PooledLayer>,
    },
    Failed {
        part: usize,
        segment: Segment,
        reason: String,
    },
}

#[derive(Default)]
struct PlannerStats {
    rows: u64,
    parts: usize,
    resumed: usize,
}

/// What flows through the queue: a pack, and why it failed last (a single sequence that ran out
/// of memory on a device, offered to the others).
struct Job {
    pack: Pack,
    failure: Option<String>,
}

/// Run a job to completion (or interruption through `cancel`).
///
/// `workers` holds one embedder per device (replicas of one model: see
/// [`crate::Esm2::replicate_to`]); they share the packs, and the result does not depend on their
/// number. A device that fails leaves the job and its pack goes to the others; the job fails
/// only when none is left.
pub async fn run(
    spec: JobSpec,
    workers: Vec<Arc<dyn PackEmbedder>>,
    cancel: Arc<AtomicBool>,
) -> Result<JobSummary> {
    if workers.is_empty() {
        return Err(Error::InvalidOption(
            "a job needs at least one device".into(),
        ));
    }
    let started = Instant::now();
    let layout = spec.layout.clone();
    let opts = &spec.options;
    if let Some(remote) = spec.remote.clone() {
        let (overwrite, resume) = (opts.overwrite, opts.resume);
        tokio::task::spawn_blocking(move || remote.start(overwrite, resume))
            .await
            .expect("remote start does not panic")?;
    }

    // Existing output and earlier progress.
    if opts.overwrite {
        layout.clear()?;
    } else if layout.finished_output_exists() {
        if opts.resume {
            return Err(Error::OutputExists {
                path: layout.target.display().to_string(),
                hint: "the job it belongs to is complete: nothing to resume (pass --overwrite to redo it)".into(),
            });
        }
        return Err(Error::OutputExists {
            path: layout.target.display().to_string(),
            hint: "pass --overwrite to replace it, or choose another -o".into(),
        });
    } else if layout.progress_exists() && !opts.resume {
        return Err(Error::OutputExists {
            path: layout.target.display().to_string(),
            hint: format!(
                "an interrupted job left progress in {}; continue it with --resume, or start over with --overwrite",
                layout.staging.display()
            ),
        });
    }
    let manifest = match Manifest::load(&layout.manifest_path())? {
        Some(m) if opts.resume => {
            if m.job != spec.identity {
                return Err(Error::InvalidOption(format!(
                    "--resume: this command differs from the interrupted job ({}); rerun it with the same \
                     inputs, model and output options, or pass --overwrite to start over",
                    describe_difference(&m.job, &spec.identity)
                )));
            }
            m
        }
        _ => Manifest::new(spec.identity.clone()),
    };
    // Pre-pass: count rows and find duplicate ids before any model work (and before anything
    // is written).
    let scan_inputs = spec.inputs.clone();
    let dedupe = opts.dedupe;
    let (total_rows, duplicates) =
        tokio::task::spawn_blocking(move || scan_ids(&scan_inputs, dedupe))
            .await
            .expect("id scan does not panic")?;
    if total_rows == 0 {
        return Err(Error::Input(crate::input::InputError::Format {
            input: spec
                .inputs
                .files
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", "),
            reason: "no records: the input is empty".into(),
        }));
    }
    layout.prepare()?;
    manifest.save(&layout.manifest_path())?;

    let progress = progress_bar(total_rows, opts.progress);
    let manifest = Arc::new(Mutex::new(manifest));
    // Enough packs waiting that no device starves while the planner sorts the next part.
    let queue = Arc::new(WorkQueue::<Job>::new(workers.len(), 2 * workers.len() + 2));
    let (writer_tx, writer_rx) = mpsc::channel::<WriterMsg>(64 * workers.len());

    let planner = {
        let spec = spec.clone();
        let cancel = cancel.clone();
        let writer_tx = writer_tx.clone();
        let done: HashSet<usize> = manifest.lock().unwrap().parts.keys().copied().collect();
        let progress = progress.clone();
        let queue = queue.clone();
        tokio::task::spawn_blocking(move || {
            let _close = CloseOnDrop(&*queue);
            plan_parts(
                &spec,
                &duplicates,
                &done,
                &cancel,
                &queue,
                &writer_tx,
                &progress,
            )
        })
    };
    let model = {
        let handles: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(index, embedder)| {
                let cancel = cancel.clone();
                let writer_tx = writer_tx.clone();
                let queue = queue.clone();
                tokio::task::spawn_blocking(move || {
                    run_worker(index, embedder.as_ref(), &queue, &writer_tx, &cancel)
                })
            })
            .collect();
        async move {
            let mut devices = Vec::with_capacity(handles.len());
            let mut failure = None;
            for handle in handles {
                match handle.await.expect("model workers do not panic") {
                    Ok(stats) => devices.push(stats),
                    Err(e) => failure = Some(e),
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(devices),
            }
        }
    };
    drop(writer_tx);
    let writer = {
        let spec = spec.clone();
        let cancel = cancel.clone();
        let manifest = manifest.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            write_parts(&spec, writer_rx, &manifest, &cancel, &progress)
        })
    };

    let (planned, modelled, written) = tokio::join!(planner, model, writer);
    let planned = planned.expect("planner does not panic");
    let written = written.expect("writer does not panic");
    progress.finish_and_clear();
    // Report the root cause: a stage that fails sets `cancel`, which stops the others quietly.
    let stages = planned.and_then(|p| Ok((p, modelled?, written?)));
    let (planner_stats, devices, parts_written) = match stages {
        Ok(stats) => stats,
        Err(e) => {
            // Nothing finished: leave nothing behind, so that a corrected rerun starts clean.
            if manifest.lock().unwrap().parts.is_empty() {
                let _ = layout.clear();
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
            total: planner_stats.parts,
        });
    }
    manifest.total_parts = Some(planner_stats.parts);
    let (errors_output, manifest) = {
        let (layout, remote) = (layout.clone(), spec.remote.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(remote) = &remote {
                remote.fetch_parts(&manifest)?;
            }
            let errors = finalize(&layout, &mut manifest)?;
            if let Some(remote) = &remote {
                remote.finish(errors.is_some())?;
            }
            Ok::<_, Error>((errors, manifest))
        })
        .await
        .expect("finalize does not panic")?
    };
    let errors_output = match (&spec.remote, errors_output) {
        (Some(remote), Some(_)) => Some(remote.errors_url()),
        (_, errors) => errors,
    };

    let totals = manifest
        .parts
        .values()
        .fold(JobSummary::default(), |mut s, p| {
            s.rows += p.rows;
            s.embedded += p.output_rows;
            s.errors += p.error_rows;
            s.residues += p.residues;
            s.truncated += p.truncated;
            s
        });
    debug_assert_eq!(totals.rows, planner_stats.rows);
    let tokens: u64 = devices.iter().map(|d| d.tokens).sum();
    let packs: u64 = devices.iter().map(|d| d.packs).sum();
    let busy: f64 = devices.iter().map(|d| d.busy_seconds).sum();
    Ok(JobSummary {
        tokens,
        packs,
        packing_efficiency: packing_efficiency(
            tokens as usize,
            packs as usize,
            opts.plan.tokens_per_batch,
        ),
        parts_written,
        parts_resumed: planner_stats.resumed,
        seconds: started.elapsed().as_secs_f64(),
        model_busy_seconds: busy / devices.len().max(1) as f64,
        devices,
        output: match &spec.remote {
            Some(remote) => remote.output_url(),
            None => layout.target.display().to_string(),
        },
        errors_output,
        ..totals
    })
}

fn describe_difference(a: &serde_json::Value, b: &serde_json::Value) -> String {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let keys: Vec<&String> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            format!(
                "differs in: {}",
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        _ => "different job".into(),
    }
}

fn progress_bar(total: u64, enabled: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:40}] {human_pos}/{human_len} sequences  {per_sec}  ETA {eta}  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Count all rows, and find duplicate ids (`position → first position` of later duplicates).
/// Without `dedupe`, the first duplicate is an error naming both records. Ids are kept as 128-bit
/// hashes: 10 million ids cost ~300 MB, not their text.
fn scan_ids(inputs: &Inputs, dedupe: bool) -> Result<(u64, Duplicates)> {
    let mut seen: HashMap<u128, u64> = HashMap::new();
    let mut duplicates = Duplicates::new();
    let hashers = (std::hash::RandomState::new(), std::hash::RandomState::new());
    let has_ids = inputs.has_ids();
    let mut position = 0u64;
    let mut file_starts: Vec<u64> = Vec::new();
    // (input, record) of a global position.
    let locate = |starts: &[u64], position: u64| {
        let file = starts.partition_point(|&s| s <= position) - 1;
        format!(
            "{} record {}",
            inputs.files[file].name(),
            position - starts[file] + 1
        )
    };
    for index in 0..inputs.files.len() {
        file_starts.push(position);
        for batch in inputs.read(index)? {
            let rows = inputs.rows(batch?);
            for i in 0..rows.len() {
                if let Some(id) = rows.id(i).filter(|_| has_ids) {
                    let key = hash128(&hashers, id);
                    match seen.get(&key) {
                        Some(&first) if !dedupe => {
                            return Err(Error::DuplicateId {
                                id: id.to_string(),
                                first: locate(&file_starts, first),
                                second: locate(&file_starts, position),
                            });
                        }
                        Some(&first) => {
                            duplicates.insert(position, first);
                        }
                        None => {
                            seen.insert(key, position);
                        }
                    }
                }
                position += 1;
            }
        }
    }
    Ok((position, duplicates))
}

fn hash128(hashers: &(std::hash::RandomState, std::hash::RandomState), id: &str) -> u128 {
    ((hashers.0.hash_one(id) as u128) << 64) | hashers.1.hash_one(id) as u128
}

/// The planner stage: read every input row, cut parts, plan and pack them.
fn plan_parts(
    spec: &JobSpec,
    duplicates: &Duplicates,
    done: &HashSet<usize>,
    cancel: &AtomicBool,
    queue: &WorkQueue<Job>,
    writer_tx: &mpsc::Sender<WriterMsg>,
    progress: &indicatif::ProgressBar,
) -> Result<PlannerStats> {
    let inputs = &spec.inputs;
    let rows_per_part = spec.options.rows_per_part.max(1);
    let mut stats = PlannerStats::default();
    let mut part = PartBuilder::new(0, 0);
    let skip = |index: usize| done.contains(&index);

    let flush = |part: PartBuilder, stats: &mut PlannerStats| -> Result<bool> {
        let index = part.index();
        stats.parts = index + 1;
        if skip(index) {
            stats.resumed += 1;
            progress.inc(part.len() as u64);
            return Ok(true);
        }
        let (plan, packs) = part.finish(&spec.options.plan);
        progress.inc(plan.errors.len() as u64);
        if writer_tx.blocking_send(WriterMsg::Plan(plan)).is_err() {
            return Ok(false);
        }
        for pack in packs {
            if !queue.push(
                Job {
                    pack,
                    failure: None,
                },
                cancel,
            ) {
                return Ok(false);
            }
        }
        Ok(true)
    };

    for index in 0..inputs.files.len() {
        let input: Arc<str> = Arc::from(inputs.files[index].name());
        let mut record = 0u64;
        for batch in inputs.read(index)? {
            if cancel.load(Ordering::SeqCst) {
                return Ok(stats);
            }
            let rows = inputs.rows(batch?);
            let problems: HashMap<usize, String> = rows.problems.iter().cloned().collect();
            let mut start = 0;
            while start < rows.len() {
                let take = (rows_per_part - part.len()).min(rows.len() - start);
                let skipping = skip(part.index());
                if !skipping {
                    part.add_passthrough(rows.passthrough.slice(start, take));
                }
                for i in start..start + take {
                    record += 1;
                    stats.rows += 1;
                    if skipping {
                        part.add_skipped();
                        continue;
                    }
                    let position = part.next_position();
                    let origin = Origin {
                        id: rows.id(i).map(str::to_string),
                        input: input.clone(),
                        record,
                    };
                    let problem = problems.get(&i).cloned().or_else(|| {
                        duplicates.get(&position).map(|first| {
                            format!(
                                "duplicate id (first seen at position {first}); --dedupe kept the first"
                            )
                        })
                    });
                    let sequence = rows.sequences.is_valid(i).then(|| rows.sequences.value(i));
                    part.add_row(
                        sequence,
                        origin,
                        problem,
                        &spec.tokenizer,
                        &spec.options.plan,
                    );
                    if spec.options.strict {
                        if let Some(error) = part.last_error() {
                            return Err(Error::Strict {
                                input: error.input.clone(),
                                record: error.record,
                                id: error.id.clone(),
                                reason: error.reason.clone(),
                            });
                        }
                    }
                }
                start += take;
                if part.len() == rows_per_part {
                    let next = PartBuilder::new(part.index() + 1, part.next_position());
                    let full = std::mem::replace(&mut part, next);
                    if !flush(full, &mut stats)? {
                        return Ok(stats);
                    }
                }
            }
        }
    }
    if !part.is_empty() {
        flush(part, &mut stats)?;
    }
    Ok(stats)
}

/// A model worker: run packs from the queue on one device until the queue drains.
///
/// Out of memory splits a pack down to single sequences ([`embed_splitting`]); a sequence that
/// fails alone is offered to the other devices, and becomes an error row once every live device
/// has refused it. Any other error means the device failed: the worker leaves, its pack goes
/// back to the queue, and the job fails only if it was the last worker.
fn run_worker(
    index: usize,
    embedder: &dyn PackEmbedder,
    queue: &WorkQueue<Job>,
    writer_tx: &mpsc::Sender<WriterMsg>,
    cancel: &AtomicBool,
) -> Result<DeviceSummary> {
    let mut stats = DeviceSummary {
        device: embedder.label(),
        ..DeviceSummary::default()
    };
    let send = |msg: WriterMsg| {
        let sent = writer_tx.blocking_send(msg).is_ok();
        if !sent {
            queue.abort(); // the writer stopped: nothing more can be committed
        }
        sent
    };
    loop {
        let task = match queue.next(index, cancel) {
            Next::Exit => break,
            Next::Orphan(task) => {
                let pack = task.item.pack;
                let reason = task.item.failure.unwrap_or_default();
                for segment in pack.segments {
                    send(WriterMsg::Failed {
                        part: pack.part,
                        segment,
                        reason: reason.clone(),
                    });
                }
                queue.finish();
                continue;
            }
            Next::Work(task) => task,
        };
        let pack = &task.item.pack;
        let started = Instant::now();
        let result = embed_splitting(embedder, &pack.segments, &pack.batch, pack.needs_residues);
        let elapsed = started.elapsed();
        let pieces = match result {
            Ok(pieces) => pieces,
            Err(e) => {
                stats.failed = Some(e.to_string());
                if queue.fail_worker(index, task) {
                    tracing::error!(
                        "{} failed and leaves the job; its packs go to the other devices: {e}",
                        stats.device
                    );
                    break;
                }
                cancel.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        stats.busy_seconds += elapsed.as_secs_f64();
        stats.tokens += pack.batch.total_tokens() as u64;
        stats.packs += 1;
        let part = pack.part;
        let mut open = true;
        for piece in pieces {
            let msg = match piece {
                Piece::Done(segments, batch, pooled) => WriterMsg::Done {
                    part,
                    segments,
                    batch,
                    pooled,
                },
                Piece::Failed(segment, batch, reason) => {
                    let retry = Task {
                        item: Job {
                            pack: Pack {
                                part,
                                segments: vec![segment],
                                batch,
                                needs_residues: pack.needs_residues,
                            },
                            failure: Some(reason),
                        },
                        refused_by: task.refused_by.clone(),
                    };
                    match queue.refuse(index, retry) {
                        None => continue, // another device will try it
                        Some(back) => WriterMsg::Failed {
                            part,
                            segment,
                            reason: back.item.failure.unwrap_or_default(),
                        },
                    }
                }
            };
            if !send(msg) {
                open = false;
                break;
            }
        }
        queue.finish();
        if !open {
            break;
        }
    }
    stats.tokens_per_second = stats.tokens as f64 / stats.busy_seconds.max(1e-9);
    Ok(stats)
}

/// The outcome of a (sub-)pack.
pub enum Piece {
    /// Embedded.
    Done(Vec<Segment>, PackedBatch, Vec<PooledLayer>),
    /// One sequence (and its tokens) that could not be embedded even alone, and why.
    Failed(Segment, PackedBatch, String),
}

/// Embed a pack; if the device runs out of memory, split it in halves and retry each, down to
/// one sequence, which then fails alone ([`crate::retry::run_halving`]). Other errors are
/// returned (the device failed).
pub fn embed_splitting(
    embedder: &dyn PackEmbedder,
    segments: &[Segment],
    batch: &PackedBatch,
    residues: bool,
) -> Result<Vec<Piece>> {
    let outcomes = crate::retry::run_halving(
        batch,
        &mut |b| embedder.embed(b, residues),
        &mut |b| {
            tracing::warn!(
                "{}: out of memory on a pack of {} sequences ({} tokens): splitting it and retrying",
                embedder.label(),
                b.len(),
                b.total_tokens()
            )
        },
    )?;
    Ok(outcomes
        .into_iter()
        .map(|o| match o.result {
            Ok(pooled) => Piece::Done(segments[o.range].to_vec(), o.batch, pooled),
            Err(_) => {
                let reason = format!(
                    "out of memory embedding this sequence alone ({} tokens): lower --max-length, \
                     use --long window, or run on a device with more memory",
                    o.batch.total_tokens()
                );
                Piece::Failed(segments[o.range.start], o.batch, reason)
            }
        })
        .collect())
}

/// The writer stage: assemble parts as results arrive, commit each when complete.
fn write_parts(
    spec: &JobSpec,
    mut rx: mpsc::Receiver<WriterMsg>,
    manifest: &Mutex<Manifest>,
    cancel: &AtomicBool,
    progress: &indicatif::ProgressBar,
) -> Result<usize> {
    // esmbed's metadata goes in the Arrow schema (pyarrow and Polars show it) and the footer.
    let schema: SchemaRef = Arc::new(
        spec.columns
            .schema(&spec.inputs.passthrough_schema())
            .as_ref()
            .clone()
            .with_metadata([(output::METADATA_KEY.to_string(), spec.metadata.clone())].into()),
    );
    let mut parts: HashMap<usize, PartAssembly> = HashMap::new();
    let mut written = 0;
    let delay = std::env::var("ESMBED_TEST_PART_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let started = Instant::now();
    let mut residues_done = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let index = match msg {
            WriterMsg::Plan(plan) => {
                let index = plan.index;
                parts.insert(index, PartAssembly::new(plan, spec.columns.clone()));
                index
            }
            WriterMsg::Done {
                part,
                segments,
                batch,
                pooled,
            } => {
                let assembly = parts.get_mut(&part).expect("plan precedes results");
                residues_done += batch.residue_counts().iter().sum::<usize>() as u64;
                progress.inc(segments.iter().filter(|s| s.window == 0).count() as u64);
                progress.set_message(format!(
                    "{:.0} residues/s",
                    residues_done as f64 / started.elapsed().as_secs_f64().max(1e-9)
                ));
                assembly.add(&segments, &batch, &pooled);
                part
            }
            WriterMsg::Failed {
                part,
                segment,
                reason,
            } => {
                let assembly = parts.get_mut(&part).expect("plan precedes results");
                if segment.window == 0 {
                    progress.inc(1);
                }
                assembly.fail(segment, reason);
                part
            }
        };
        if parts.get(&index).is_some_and(PartAssembly::is_complete) {
            let assembly = parts.remove(&index).expect("present");
            let result = commit_part(spec, &schema, index, assembly, manifest);
            if let Err(e) = result {
                cancel.store(true, Ordering::SeqCst);
                return Err(e);
            }
            written += 1;
            if let Some(ms) = delay {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
    }
    Ok(written)
}

fn commit_part(
    spec: &JobSpec,
    schema: &SchemaRef,
    index: usize,
    assembly: PartAssembly,
    manifest: &Mutex<Manifest>,
) -> Result<()> {
    let layout = &spec.layout;
    let (batch, errors, record) = assembly.finish(schema)?;
    // Errors first: a committed part file implies its errors are committed too.
    if !errors.is_empty() {
        output::write_parquet(
            &layout.part_errors_path(index),
            &output::errors_batch(&errors),
            None,
        )?;
    }
    output::write_parquet(&layout.part_path(index), &batch, Some(&spec.metadata))?;
    // In an object store: the part (and its errors) first, the manifest that lists it last.
    if let Some(remote) = &spec.remote {
        if !errors.is_empty() {
            remote.upload(&layout.part_errors_path(index))?;
        }
        remote.upload(&layout.part_path(index))?;
    }
    let mut manifest = manifest.lock().unwrap();
    manifest.parts.insert(index, record);
    manifest.save(&layout.manifest_path())?;
    if let Some(remote) = &spec.remote {
        remote.upload(&layout.manifest_path())?;
    }
    Ok(())
}

/// Make the output visible: combine parts into the file (or mark the dataset complete) and
/// collect the errors beside it. Returns the errors file, if any row failed.
fn finalize(layout: &OutputLayout, manifest: &mut Manifest) -> Result<Option<String>> {
    let total = manifest.total_parts.unwrap_or(0);
    let error_parts: Vec<_> = (0..total)
        .filter(|i| manifest.parts.get(i).is_some_and(|p| p.error_rows > 0))
        .map(|i| layout.part_errors_path(i))
        .collect();
    let errors_output = if error_parts.is_empty() {
        match std::fs::remove_file(&layout.errors) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(&layout.errors, e))
            }
            _ => None,
        }
    } else {
        combine::concat_errors(&error_parts, &layout.errors)?;
        Some(layout.errors.display().to_string())
    };
    match layout.kind {
        OutputKind::File => {
            let parts: Vec<_> = (0..total).map(|i| layout.part_path(i)).collect();
            combine::concat_parts(&parts, &layout.target)?;
            std::fs::remove_dir_all(&layout.staging).map_err(|e| Error::io(&layout.staging, e))?;
        }
        OutputKind::Dataset => {
            manifest.complete = true;
            manifest.save(&layout.manifest_path())?;
            std::fs::remove_dir_all(&layout.staging).map_err(|e| Error::io(&layout.staging, e))?;
        }
    }
    Ok(errors_output)
}
