//! `esmbed score --dry-run`: the score job's own part loop and scoring code on a `Planned`
//! runner that runs nothing, so the plan's rows, errors, tokens and packs are the job's.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;

use super::job::{count_rows, for_each_part, output_schema, score_part, ScoreCache, ScoreJob};
use super::Runner;
use crate::engine::LogProbsAt;
use crate::error::{Error, Result};
use crate::model::esm2::query_positions;
use crate::output;
use crate::pack::PackedBatch;
use crate::pipeline::dry_run::{count_error, DryRun, ModelFacts, PackTally};
use crate::tokenize::{MASK, VOCAB_SIZE};

/// A runner that runs nothing, for `--dry-run`: it counts the packs and tokens the job would
/// run and answers with made-up log-probabilities of the right shape.
#[derive(Default)]
struct Planned {
    packs: Cell<PackTally>,
    state: Cell<u64>,
}

impl Runner for Planned {
    fn run_packs(
        &self,
        packs: &mut dyn Iterator<Item = PackedBatch>,
        at: LogProbsAt,
        take: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<()> {
        for (i, batch) in packs.enumerate() {
            let mut packs = self.packs.get();
            packs.add(&batch);
            self.packs.set(packs);
            let rows = query_positions(&batch, at, MASK).len();
            let mut state = self.state.get() | 1;
            let values = (0..rows * VOCAB_SIZE)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    -((state >> 40) as f32 / (1u64 << 21) as f32)
                })
                .collect();
            self.state.set(state);
            take(i, values);
        }
        Ok(())
    }
}

/// Plan `job` without a model on a device: every figure of [`DryRun`], from the job's own part
/// loop and scoring code run on a `Planned` runner. Fails where the job would fail before
/// model work; writes nothing.
pub fn dry_run(job: &ScoreJob, model: &ModelFacts) -> Result<DryRun> {
    let opts = &job.options;
    let earlier = output::resume_state(&job.layout, &job.identity, opts.overwrite, opts.resume)?;
    let done: HashSet<usize> = earlier
        .map(|m| m.parts.keys().copied().collect())
        .unwrap_or_default();
    let rows = count_rows(&job.inputs)?;
    let schema = output_schema(job);
    let planned = Planned::default();
    let mut cache = ScoreCache::default();
    let mut tally = DryRun {
        rows,
        ..DryRun::default()
    };
    // The output as the job would leave it, with made-up scores: its part files written and
    // combined as the job writes and combines them, in a scratch directory removed after.
    let scratch = std::env::temp_dir().join(format!("esmbed-dry-run-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
    let mut part_paths = Vec::new();
    let parts = for_each_part(job, &AtomicBool::new(false), |part, index, first| {
        if done.contains(&index) {
            tally.parts_resumed += 1;
            return Ok(());
        }
        let (batch, errors, record) = score_part(job, &planned, part, first, &schema, &mut cache)?;
        tally.output_rows += record.output_rows;
        tally.reused += record.reused;
        tally.residues += record.residues;
        tally.truncated += record.truncated;
        for e in &errors {
            count_error(&mut tally.errors_by_problem, &mut tally.error_examples, e);
        }
        let path = scratch.join(format!("part-{index:05}.parquet"));
        output::write_parquet(&path, &batch, Some(&job.metadata))?;
        part_paths.push(path);
        Ok(())
    });
    if parts.is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let parts = parts?;
    tally.parts = parts - tally.parts_resumed;
    tally.errors = tally.errors_by_problem.values().sum();
    tally.distinct = Some(tally.output_rows - tally.reused);
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    tally.output_bytes = match job.layout.kind {
        output::OutputKind::File if !part_paths.is_empty() => {
            let target = scratch.join("combined.parquet");
            output::combine::concat_parts(&part_paths, &target)?;
            size(&target)
        }
        output::OutputKind::File => 0,
        output::OutputKind::Dataset => part_paths.iter().map(|p| size(p)).sum(),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    planned
        .packs
        .get()
        .report(&mut tally, model, opts.tokens_per_batch, 1);
    Ok(tally)
}
