//! The writer stage: assemble parts as results arrive, commit each when it and every earlier
//! part are complete (part file, then the manifest that lists it), and at the end make the
//! output visible. Parts commit in input order because a row may copy the result of an
//! identical sequence in an earlier part ([`super::reuse`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use tokio::sync::mpsc;

use super::assemble::PartAssembly;
use super::plan::{PartPlan, Segment};
use super::planner::PackMeta;
use super::progress::Event;
use super::reuse::ResultCache;
use super::JobSpec;
use crate::engine::pool::Reply;
use crate::engine::PackOutcome;
use crate::error::{Error, Result};
use crate::output::{self, combine, Manifest, OutputKind, OutputLayout};
use crate::pack::PackedBatch;
use crate::pool::PooledLayer;

/// What reaches the writer.
pub enum WriterMsg {
    /// A part's plan, before any of its results.
    Plan(PartPlan),
    /// Segments of a part, embedded.
    Done {
        /// Part index.
        part: usize,
        /// The segments, in pack order.
        segments: Vec<Segment>,
        /// Their tokens.
        batch: PackedBatch,
        /// Their outputs.
        pooled: Vec<PooledLayer>,
    },
    /// A segment that could not be embedded: its row becomes an error row.
    Failed {
        /// Part index.
        part: usize,
        /// The segment.
        segment: Segment,
        /// Why.
        reason: String,
    },
}

/// The device pool's replies for a job: results become writer messages. `false` (the writer
/// is gone) stops the pool.
pub fn reply(writer_tx: mpsc::Sender<WriterMsg>) -> Reply<PackMeta> {
    Arc::new(move |outcome| {
        let msg = match outcome {
            PackOutcome::Done {
                context,
                range,
                batch,
                layers,
                ..
            } => WriterMsg::Done {
                part: context.part,
                segments: context.segments[range].to_vec(),
                batch,
                pooled: layers,
            },
            PackOutcome::Failed {
                context,
                index,
                batch,
                ..
            } => WriterMsg::Failed {
                part: context.part,
                segment: context.segments[index],
                reason: format!(
                    "out of memory embedding this sequence alone ({} tokens): lower --max-length, \
                     use --long window, or run on a device with more memory",
                    batch.total_tokens()
                ),
            },
        };
        writer_tx.blocking_send(msg).is_ok()
    })
}

/// Assemble and commit parts until every sender is gone (or the job stops). Returns the number
/// of parts written.
pub fn write_parts(
    spec: &JobSpec,
    mut rx: mpsc::Receiver<WriterMsg>,
    manifest: &Mutex<Manifest>,
    cancel: &AtomicBool,
) -> Result<usize> {
    let schema = output_schema(spec);
    let mut parts: HashMap<usize, PartAssembly> = HashMap::new();
    // Planned parts not yet committed, in input order.
    let mut order: VecDeque<usize> = VecDeque::new();
    let mut cache = ResultCache::default();
    let mut written = 0;
    let started = Instant::now();
    let mut residues_done = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let (rows, residues) = match msg {
            WriterMsg::Plan(plan) => {
                let index = plan.index;
                order.push_back(index);
                parts.insert(index, PartAssembly::new(plan, spec.columns.clone()));
                (0, 0)
            }
            WriterMsg::Done {
                part,
                segments,
                batch,
                pooled,
            } => {
                let assembly = parts.get_mut(&part).expect("plan precedes results");
                assembly.add(&segments, &batch, &pooled);
                finished_rows(&segments, &batch, spec.options.plan.pll)
            }
            WriterMsg::Failed {
                part,
                segment,
                reason,
            } => {
                let assembly = parts.get_mut(&part).expect("plan precedes results");
                assembly.fail(segment, reason);
                (usize::from(segment.window == 0), 0)
            }
        };
        if rows > 0 {
            residues_done += residues as u64;
            (spec.progress)(Event::Advanced {
                rows: rows as u64,
                residues_per_second: residues_done as f64
                    / started.elapsed().as_secs_f64().max(1e-9),
            });
        }
        while let Some(&next) = order.front() {
            if !parts.get(&next).is_some_and(PartAssembly::is_complete) {
                break;
            }
            order.pop_front();
            let assembly = parts.remove(&next).expect("present");
            if let Err(e) = commit_part(spec, &schema, next, assembly, &mut cache, manifest) {
                cancel.store(true, Ordering::SeqCst);
                return Err(e);
            }
            written += 1;
            (spec.progress)(Event::PartCommitted { index: next });
        }
    }
    Ok(written)
}

/// For the progress bar: rows and residues that a pack's results finish. A row counts once,
/// with its first window or, with `--pll`, its last masked copy (its other copies and itself
/// came in the same pack or earlier, give or take the order in which devices return packs).
fn finished_rows(segments: &[Segment], batch: &PackedBatch, pll: bool) -> (usize, usize) {
    let counts = batch.residue_counts();
    let finished = segments
        .iter()
        .zip(&counts)
        .filter(|(s, &n)| match s.masked {
            None => s.window == 0 && !pll,
            Some(m) => m.position as usize == n,
        });
    finished.fold((0, 0), |(rows, residues), (_, &n)| (rows + 1, residues + n))
}

/// The schema of the job's part files. esmbed's metadata goes in the Arrow schema (pyarrow and
/// Polars show it) and the footer.
pub fn output_schema(spec: &JobSpec) -> SchemaRef {
    Arc::new(
        spec.columns
            .schema(&spec.inputs.passthrough_schema())
            .as_ref()
            .clone()
            .with_metadata([(output::METADATA_KEY.to_string(), spec.metadata.clone())].into()),
    )
}

fn commit_part(
    spec: &JobSpec,
    schema: &SchemaRef,
    index: usize,
    assembly: PartAssembly,
    cache: &mut ResultCache,
    manifest: &Mutex<Manifest>,
) -> Result<()> {
    let layout = &spec.layout;
    let (batch, errors, record) = assembly.finish(schema, cache)?;
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
pub fn finalize(layout: &OutputLayout, manifest: &mut Manifest) -> Result<Option<String>> {
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
        }
        OutputKind::Dataset => {
            manifest.complete = true;
            manifest.save(&layout.manifest_path())?;
        }
    }
    std::fs::remove_dir_all(&layout.staging).map_err(|e| Error::io(&layout.staging, e))?;
    Ok(errors_output)
}
