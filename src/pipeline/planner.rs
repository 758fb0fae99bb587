//! The planner stage: read every input row, cut parts, plan and pack them, and hand each part
//! to a [`PartSink`]: in a job, [`JobSink`] sends the part's plan to the writer before its packs
//! go to the device pool, so the writer knows what to expect; `--dry-run` tallies them instead
//! ([`super::dry_run`]), so its figures are the job's own.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::Array;

use tokio::sync::mpsc;

use super::plan::{Duplicates, Origin, Packs, PartBuilder, PartPlan, RowPlan, Segment};
use super::progress::Event;
use super::reuse::{sequence_key, ReusePlanner, RowSize, RowSource, SequenceCounts};
use super::writer::{self, WriterMsg};
use super::JobSpec;
use crate::engine::{DevicePool, Submission};
use crate::error::{Error, Result};
use crate::prepare::Problem;

/// What the pipeline knows of a pack in the device pool: its part and segments.
pub struct PackMeta {
    /// Part index.
    pub part: usize,
    /// The segments, in pack order.
    pub segments: Vec<Segment>,
}

/// What the planner did.
#[derive(Debug, Default)]
pub struct PlannerStats {
    /// Input rows read.
    pub rows: u64,
    /// Parts cut.
    pub parts: usize,
    /// Parts skipped because an earlier run finished them.
    pub resumed: usize,
}

/// Where planned parts go.
pub trait PartSink {
    /// A part's plan and its packs; false stops planning (the job stopped).
    fn take(&mut self, plan: PartPlan, packs: Packs) -> bool;
}

/// A job's sink: the plan to the writer, then the packs to the device pool.
pub struct JobSink<'a> {
    /// Where packs go.
    pub pool: &'a DevicePool<PackMeta>,
    /// Where part plans (and, through the pool's replies, results) go.
    pub writer_tx: mpsc::Sender<WriterMsg>,
}

impl PartSink for JobSink<'_> {
    fn take(&mut self, plan: PartPlan, mut packs: Packs) -> bool {
        if self.writer_tx.blocking_send(WriterMsg::Plan(plan)).is_err() {
            return false;
        }
        let reply = writer::reply(self.writer_tx.clone());
        packs.all(|pack| {
            self.pool.submit(Submission {
                request: pack.request(),
                batch: pack.batch,
                context: Arc::new(PackMeta {
                    part: pack.part,
                    segments: pack.segments,
                }),
                reply: reply.clone(),
            })
        })
    }
}

/// The planner's view of the job.
pub struct Planner<'a, S: PartSink> {
    /// The job.
    pub spec: &'a JobSpec,
    /// Later duplicates of ids (with `--dedupe`).
    pub duplicates: &'a Duplicates,
    /// Rows per distinct sequence, when results are reused.
    pub sequences: Option<SequenceCounts>,
    /// Parts finished by an earlier run.
    pub done: &'a HashSet<usize>,
    /// Set when the job stops.
    pub cancel: &'a AtomicBool,
    /// Where planned parts go.
    pub sink: S,
}

impl<S: PartSink> Planner<'_, S> {
    /// Plan every part.
    pub fn run(mut self) -> Result<PlannerStats> {
        let mut reuse = self.sequences.take().map(|counts| {
            ReusePlanner::new(
                counts,
                row_size(&self.spec.columns),
                self.spec.options.reuse_memory,
            )
        });
        let mut stats = PlannerStats::default();
        let mut part = PartBuilder::new(0, 0);
        let spec = self.spec;
        let inputs = &spec.inputs;
        let rows_per_part = spec.options.rows_per_part.max(1);
        let policy = spec.options.plan.policy(spec.tokenizer);
        for index in 0..inputs.files.len() {
            let input: Arc<str> = Arc::from(inputs.files[index].name());
            let mut record = 0u64;
            for batch in inputs.read(index)? {
                if self.cancel.load(Ordering::SeqCst) {
                    return Ok(stats);
                }
                let rows = inputs.rows(batch?);
                let problems: HashMap<usize, String> = rows.problems.iter().cloned().collect();
                let mut start = 0;
                while start < rows.len() {
                    let take = (rows_per_part - part.len()).min(rows.len() - start);
                    let skipping = self.done.contains(&part.index());
                    if !skipping {
                        part.add_passthrough(rows.passthrough.slice(start, take));
                    }
                    for i in start..start + take {
                        record += 1;
                        stats.rows += 1;
                        if skipping {
                            part.add_skipped();
                            if let (Some(reuse), true) = (&mut reuse, rows.sequences.is_valid(i)) {
                                if let Ok(prepared) = policy.prepare(rows.sequences.value(i)) {
                                    reuse.skip(sequence_key(&prepared));
                                }
                            }
                            continue;
                        }
                        let origin = Origin {
                            id: rows.id(i).map(str::to_string),
                            input: input.clone(),
                            record,
                        };
                        let problem = problems
                            .get(&i)
                            .map(|reason| (Problem::Unreadable, reason.clone()))
                            .or_else(|| {
                                self.duplicates.get(&part.next_position()).map(|first| {
                                    (
                                        Problem::DuplicateId,
                                        format!("duplicate id (first seen at position {first}); --dedupe kept the first"),
                                    )
                                })
                            });
                        let sequence = rows.sequences.is_valid(i).then(|| rows.sequences.value(i));
                        part.add_row(sequence, origin, problem, &policy, reuse.as_mut());
                        self.check_strict(&part)?;
                    }
                    start += take;
                    if part.len() == rows_per_part {
                        let next = PartBuilder::new(part.index() + 1, part.next_position());
                        let full = std::mem::replace(&mut part, next);
                        if !self.flush(full, &mut stats) {
                            return Ok(stats);
                        }
                    }
                }
            }
        }
        if !part.is_empty() {
            self.flush(part, &mut stats);
        }
        Ok(stats)
    }

    /// `--strict`: the first bad record stops the job.
    fn check_strict(&self, part: &PartBuilder) -> Result<()> {
        match part.last_error() {
            Some(error) if self.spec.options.strict => Err(Error::Strict {
                input: error.input.clone(),
                record: error.record,
                id: error.id.clone(),
                reason: error.reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Hand a full part to the sink. False when the job stopped.
    fn flush(&mut self, part: PartBuilder, stats: &mut PlannerStats) -> bool {
        let index = part.index();
        stats.parts = index + 1;
        let progress = &self.spec.progress;
        if self.done.contains(&index) {
            stats.resumed += 1;
            progress(Event::Advanced {
                rows: part.len() as u64,
                residues_per_second: 0.0,
            });
            return true;
        }
        let (plan, packs) = part.finish(&self.spec.options.plan);
        let copied = plan
            .rows
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    RowPlan::Embed {
                        source: RowSource::Copy { .. },
                        ..
                    }
                )
            })
            .count();
        progress(Event::Advanced {
            rows: (plan.errors.len() + copied) as u64,
            residues_per_second: 0.0,
        });
        self.sink.take(plan, packs)
    }
}

/// Bytes of one row's held result, as the writer holds it (f32 vectors).
fn row_size(columns: &crate::output::columns::EmbeddingColumns) -> RowSize {
    let vector = columns.hidden * std::mem::size_of::<f32>();
    let layers = columns.layers.len();
    let p = columns.pooling;
    RowSize {
        pooled: layers * vector * (usize::from(p.mean) + usize::from(p.bos)),
        per_residue: if p.per_residue { layers * vector } else { 0 },
    }
}
