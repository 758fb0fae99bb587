//! `esmbed score`: a job of zero-shot scores over FASTA or Parquet inputs, written like an
//! embedding job (parts staged beside the output, a manifest, the file or dataset made visible at
//! the end, error rows in `OUTPUT.errors.parquet`, `--resume` skipping finished parts).
//!
//! A part's scores run on a [`Runner`] (every device of the pool: masked copies streamed through
//! packs, out-of-memory packs split), then the part is written. Identical sequences of a part are
//! scored once. A sequence that does not fit on any device even alone becomes an error row.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, Int32Array,
    ListArray, RecordBatch, StringArray, UInt32Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Serialize;

use super::{mutant, Mutation, Runner, Strategy};
use crate::error::{Error, Result};
use crate::input::Inputs;
use crate::output::metadata::JobIdentity;
use crate::output::{self, ErrorRow, Manifest, OutputLayout, PartRecord};
use crate::pipeline::progress::{self, Event, Progress};
use crate::prepare::{InputPolicy, Problem};

/// What a score job computes per input row.
#[derive(Debug, Clone)]
pub enum ScoreMode {
    /// Each sequence's pseudo-log-likelihood (and, with `per_residue`, its terms).
    Pll {
        /// Also the per-position terms.
        per_residue: bool,
    },
    /// Each sequence's log-probabilities over the 20 standard amino acids, residue by residue
    /// (one unmasked forward).
    Logits,
    /// Each input row is a mutant of `wt`, in the sequence column; scored by `strategy`.
    Mutants {
        /// The wild-type sequence (residues).
        wt: String,
        /// The number of the first residue in the mutants' positions.
        offset: i64,
        /// How.
        strategy: Strategy,
    },
}

impl ScoreMode {
    /// What the output's metadata records of the mode (a resume must match it).
    pub fn describe(&self) -> String {
        match self {
            ScoreMode::Pll { per_residue } => format!("pll (per residue: {per_residue})"),
            ScoreMode::Logits => "log_probs over ACDEFGHIKLMNPQRSTVWY".into(),
            ScoreMode::Mutants {
                wt,
                offset,
                strategy,
            } => {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(wt.as_bytes());
                format!(
                    "mutants of a wild type of {} residues (sha256 {:x}), offset {offset}, {strategy:?}",
                    wt.len(),
                    digest
                )
            }
        }
    }
}

/// Options of a score job.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Tokens per pack.
    pub tokens_per_batch: usize,
    /// Rows per part (output row group, resume unit).
    pub rows_per_part: usize,
    /// How sequences become tokens (`--long window` is read as truncate: scores do not window).
    pub policy: InputPolicy,
    /// Continue an interrupted job.
    pub resume: bool,
    /// Replace an existing output.
    pub overwrite: bool,
}

/// A score job.
#[derive(Clone)]
pub struct ScoreJob {
    /// The inputs (for mutants: the file of mutants, its sequence column naming them).
    pub inputs: Inputs,
    /// Where the output goes.
    pub layout: OutputLayout,
    /// What is computed.
    pub mode: ScoreMode,
    /// Options.
    pub options: ScoreOptions,
    /// What a resume must match.
    pub identity: JobIdentity,
    /// Footer metadata, as JSON.
    pub metadata: String,
    /// Progress events.
    pub progress: Progress,
}

/// What a score job did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScoreSummary {
    /// Input rows.
    pub rows: u64,
    /// Rows in the output.
    pub scored: u64,
    /// Rows in the errors output.
    pub errors: u64,
    /// Residues scored (masked, for a PLL).
    pub residues: u64,
    /// Rows whose scores were copied from an identical sequence's (in this run).
    pub reused: u64,
    /// Tokens through the model this run (masked copies included), from the devices.
    pub tokens: u64,
    /// Packs run this run.
    pub packs: u64,
    /// Parts written this run.
    pub parts_written: usize,
    /// Parts a previous run finished.
    pub parts_resumed: usize,
    /// Wall time.
    pub seconds: f64,
    /// The output.
    pub output: String,
    /// The errors file, if any row failed.
    pub errors_output: Option<String>,
}

impl ScoreJob {
    /// A job over `inputs` into `output`.
    pub fn new(
        inputs: Inputs,
        output: &std::path::Path,
        mode: ScoreMode,
        options: ScoreOptions,
        identity: JobIdentity,
        metadata: String,
    ) -> Self {
        Self {
            inputs,
            layout: OutputLayout::new(output),
            mode,
            options,
            identity,
            metadata,
            progress: progress::silent(),
        }
    }

    fn policy(&self) -> InputPolicy {
        self.options.policy.for_scores()
    }
}

/// Results of distinct sequences kept across parts (at most [`ScoreCache::LIMIT`] bytes), so a
/// sequence repeated anywhere in the job is scored once; one not kept is scored again, with the
/// same numbers.
#[derive(Default)]
pub(super) struct ScoreCache {
    rows: HashMap<u128, Scored>,
    bytes: usize,
}

impl ScoreCache {
    const LIMIT: usize = 1 << 30;

    fn key(tokens: &[u32]) -> u128 {
        crate::pipeline::reuse::segments_key(std::iter::once((0, tokens)))
    }

    fn hold(&mut self, tokens: &[u32], scored: &Scored) {
        let bytes = 64 + tokens.len() * 4 * 21;
        if self.bytes + bytes <= Self::LIMIT {
            self.bytes += bytes;
            self.rows.insert(Self::key(tokens), scored.clone());
        }
    }
}

/// One part's rows as read.
#[derive(Default)]
pub(super) struct PartRows {
    passthrough: Vec<RecordBatch>,
    texts: Vec<Option<String>>,
    origins: Vec<(Option<String>, Arc<str>, u64)>,
    problems: HashMap<usize, String>,
}

/// Run `job` on `runner` until done or `cancel`.
pub fn run(job: &ScoreJob, runner: &dyn Runner, cancel: &AtomicBool) -> Result<ScoreSummary> {
    let started = Instant::now();
    let mut manifest = open_output(job)?;
    let done: HashSet<usize> = manifest.parts.keys().copied().collect();
    let total = count_rows(&job.inputs)?;
    (job.progress)(Event::Started { rows: total });
    let schema = output_schema(job);
    let mut written = 0usize;
    let mut cache = ScoreCache::default();
    let index = for_each_part(job, cancel, |part, index, first| {
        let rows = part.texts.len() as u64;
        if !done.contains(&index) {
            let (batch, errors, record) =
                score_part(job, runner, part, first, &schema, &mut cache)?;
            commit(job, index, &batch, &errors, record, &mut manifest)?;
            written += 1;
        }
        (job.progress)(Event::Advanced {
            rows,
            residues_per_second: 0.0,
        });
        (job.progress)(Event::PartCommitted { index });
        Ok(())
    })?;
    (job.progress)(Event::Finished);
    manifest.total_parts = Some(index);
    let errors_output = crate::pipeline::writer::finalize(&job.layout, &mut manifest)?;
    let mut summary = manifest
        .parts
        .values()
        .fold(ScoreSummary::default(), |mut s, p| {
            s.rows += p.rows;
            s.scored += p.output_rows;
            s.errors += p.error_rows;
            s.residues += p.residues;
            s.reused += p.reused;
            s
        });
    summary.parts_written = written;
    summary.parts_resumed = done.len();
    summary.seconds = started.elapsed().as_secs_f64();
    summary.output = job.layout.target.display().to_string();
    summary.errors_output = errors_output;
    Ok(summary)
}

/// Cut the inputs into parts of `rows_per_part` rows and hand each to `f` with its index and
/// the global position of its first row; the number of parts.
pub(super) fn for_each_part(
    job: &ScoreJob,
    cancel: &AtomicBool,
    mut f: impl FnMut(PartRows, usize, u64) -> Result<()>,
) -> Result<usize> {
    let rows_per_part = job.options.rows_per_part.max(1);
    let (mut index, mut position) = (0usize, 0u64);
    let mut part = PartRows::default();
    for file in 0..job.inputs.files.len() {
        let input: Arc<str> = Arc::from(job.inputs.files[file].name());
        let mut record = 0u64;
        for batch in job.inputs.read(file)? {
            if cancel.load(Ordering::SeqCst) {
                return Err(Error::Interrupted {
                    done: index,
                    total: index,
                });
            }
            let rows = job.inputs.rows(batch?);
            let problems: HashMap<usize, String> = rows.problems.iter().cloned().collect();
            let mut start = 0;
            while start < rows.len() {
                let take = (rows_per_part - part.texts.len()).min(rows.len() - start);
                part.passthrough.push(rows.passthrough.slice(start, take));
                for i in start..start + take {
                    record += 1;
                    if let Some(p) = problems.get(&i) {
                        part.problems.insert(part.texts.len(), p.clone());
                    }
                    let text = rows.sequences.is_valid(i).then(|| rows.sequences.value(i));
                    part.texts.push(text.map(str::to_string));
                    let id = rows.id(i).map(str::to_string);
                    part.origins.push((id, input.clone(), record));
                }
                start += take;
                if part.texts.len() == rows_per_part {
                    f(std::mem::take(&mut part), index, position)?;
                    position += rows_per_part as u64;
                    index += 1;
                }
            }
        }
    }
    if !part.texts.is_empty() {
        f(part, index, position)?;
        index += 1;
    }
    Ok(index)
}

/// The output's state, as for an embedding job: refuse to replace it without `--overwrite`,
/// continue with `--resume` only the same job.
fn open_output(job: &ScoreJob) -> Result<Manifest> {
    let (layout, opts) = (&job.layout, &job.options);
    let earlier = output::resume_state(layout, &job.identity, opts.overwrite, opts.resume)?;
    if opts.overwrite {
        layout.clear()?;
    }
    let manifest = earlier.unwrap_or_else(|| Manifest::new(job.identity.clone()));
    layout.prepare()?;
    manifest.save(&layout.manifest_path())?;
    Ok(manifest)
}

pub(super) fn count_rows(inputs: &Inputs) -> Result<u64> {
    let mut rows = 0;
    for file in 0..inputs.files.len() {
        for batch in inputs.read(file)? {
            rows += batch?.batch.num_rows() as u64;
        }
    }
    if rows == 0 {
        return Err(inputs.no_records());
    }
    Ok(rows)
}

/// The columns a score job writes after the input's.
fn score_fields(mode: &ScoreMode) -> Vec<Field> {
    let floats = |name: &str| {
        Field::new(
            name,
            DataType::List(Arc::new(Field::new_list_field(DataType::Float32, false))),
            false,
        )
    };
    match mode {
        ScoreMode::Pll { per_residue } => {
            let mut f = vec![
                Field::new("length", DataType::Int32, false),
                Field::new("truncated", DataType::Boolean, false),
                Field::new("pll", DataType::Float64, false),
                Field::new("pseudo_perplexity", DataType::Float64, false),
            ];
            if *per_residue {
                f.push(floats("pll_per_residue"));
            }
            f
        }
        ScoreMode::Logits => vec![
            Field::new("length", DataType::Int32, false),
            Field::new("truncated", DataType::Boolean, false),
            Field::new(
                "log_probs",
                DataType::List(Arc::new(Field::new_list_field(
                    DataType::FixedSizeList(
                        Arc::new(Field::new_list_field(DataType::Float32, false)),
                        20,
                    ),
                    false,
                ))),
                false,
            ),
        ],
        ScoreMode::Mutants { .. } => vec![
            Field::new("mutant", DataType::Utf8, false),
            Field::new("esm_score", DataType::Float64, false),
        ],
    }
}

pub(super) fn output_schema(job: &ScoreJob) -> SchemaRef {
    let mut fields: Vec<Field> = job
        .inputs
        .passthrough_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(score_fields(&job.mode));
    let metadata = [(output::METADATA_KEY.to_string(), job.metadata.clone())].into();
    Arc::new(Schema::new(fields).with_metadata(metadata))
}

/// A row's outcome.
#[derive(Clone)]
enum Scored {
    Pll(f64, Vec<f32>),
    Logits(Vec<f32>),
    Mutant(f64),
}

/// Score one part: its output batch, error rows and manifest record.
pub(super) fn score_part(
    job: &ScoreJob,
    runner: &dyn Runner,
    part: PartRows,
    first: u64,
    schema: &SchemaRef,
    cache: &mut ScoreCache,
) -> Result<(RecordBatch, Vec<ErrorRow>, PartRecord)> {
    let n = part.texts.len();
    let mut reused = 0u64;
    let mut errors: Vec<ErrorRow> = Vec::new();
    let mut fail = |row: usize, problem: Problem, reason: String| {
        let (id, input, record) = &part.origins[row];
        errors.push(ErrorRow {
            id: id.clone(),
            position: first + row as u64,
            input: input.to_string(),
            record: *record,
            problem,
            reason,
        });
    };
    let mut results: Vec<Option<Scored>> = (0..n).map(|_| None).collect();
    let mut lengths = vec![(0usize, false); n];
    match &job.mode {
        ScoreMode::Mutants {
            wt,
            offset,
            strategy,
        } => {
            let wt_tokens = job
                .policy()
                .prepare(wt)
                .map_err(|e| Error::InvalidOption(format!("--wt: {}", e.reason)))?
                .segments
                .remove(0)
                .1;
            let residues = mutant::residues_of(&wt_tokens);
            let mut sets: Vec<(usize, Vec<Mutation>)> = Vec::new();
            for row in 0..n {
                match (&part.texts[row], part.problems.get(&row)) {
                    (_, Some(p)) => fail(row, Problem::Unreadable, p.clone()),
                    (None, _) => fail(row, Problem::BadMutant, "mutant is null".into()),
                    (Some(text), _) => match mutant::parse(text, &residues, *offset) {
                        Ok(m) => sets.push((row, m)),
                        Err(e) => fail(row, Problem::BadMutant, e.to_string()),
                    },
                }
            }
            let mutants: Vec<Vec<Mutation>> = sets.iter().map(|s| s.1.clone()).collect();
            let scores = super::mutant_scores(
                runner,
                &wt_tokens,
                &mutants,
                *strategy,
                job.options.tokens_per_batch,
            )?;
            for ((row, _), score) in sets.iter().zip(scores) {
                results[*row] = Some(Scored::Mutant(score));
            }
        }
        mode => {
            // Distinct sequences of the part, each with its rows.
            let policy = job.policy();
            let mut distinct: HashMap<Vec<u32>, usize> = HashMap::new();
            let mut tokens: Vec<Vec<u32>> = Vec::new();
            let mut of_row: Vec<(usize, usize)> = Vec::new();
            for (row, length) in lengths.iter_mut().enumerate() {
                let prepared = match (&part.texts[row], part.problems.get(&row)) {
                    (_, Some(p)) => {
                        fail(row, Problem::Unreadable, p.clone());
                        continue;
                    }
                    (None, _) => {
                        fail(row, Problem::NullSequence, "sequence is null".into());
                        continue;
                    }
                    (Some(text), _) => match policy.prepare(text) {
                        Ok(p) => p,
                        Err(e) => {
                            fail(row, e.problem, e.reason);
                            continue;
                        }
                    },
                };
                *length = (prepared.length, prepared.truncated);
                let t = prepared.segments.into_iter().next().expect("one segment").1;
                let next = tokens.len();
                let index = *distinct.entry(t.clone()).or_insert(next);
                if index == next {
                    tokens.push(t);
                }
                of_row.push((row, index));
            }
            let mut outcomes: Vec<Option<std::result::Result<Scored, String>>> = tokens
                .iter()
                .map(|t| cache.rows.get(&ScoreCache::key(t)).cloned().map(Ok))
                .collect();
            let missing: Vec<usize> = (0..tokens.len())
                .filter(|&i| outcomes[i].is_none())
                .collect();
            let to_score: Vec<Vec<u32>> = missing.iter().map(|&i| tokens[i].clone()).collect();
            let scored = score_sequences(runner, mode, &to_score, job.options.tokens_per_batch)?;
            for (&i, result) in missing.iter().zip(scored) {
                if let Ok(s) = &result {
                    cache.hold(&tokens[i], s);
                }
                outcomes[i] = Some(result);
            }
            // A row copies when its sequence was scored in an earlier part or an earlier row.
            let mut first_use = vec![true; tokens.len()];
            let copied: Vec<bool> = of_row
                .iter()
                .map(|&(_, index)| {
                    let here = missing.binary_search(&index).is_ok() && first_use[index];
                    first_use[index] = false;
                    !here
                })
                .collect();
            let outcomes: Vec<_> = outcomes.into_iter().map(|o| o.expect("scored")).collect();
            for ((row, index), copied) in of_row.into_iter().zip(copied) {
                match &outcomes[index] {
                    Ok(scored) => {
                        results[row] = Some(scored.clone());
                        reused += u64::from(copied);
                    }
                    Err(reason) => fail(row, Problem::OutOfMemory, reason.clone()),
                }
            }
        }
    }
    let (batch, errors, mut record) = assemble(job, part, results, lengths, errors, first, schema)?;
    record.reused = reused;
    Ok((batch, errors, record))
}

/// PLL or log-probabilities of `tokens`; a sequence that fits on no device even alone is an
/// `Err` with the reason (the others are scored without it).
fn score_sequences(
    runner: &dyn Runner,
    mode: &ScoreMode,
    tokens: &[Vec<u32>],
    budget: usize,
) -> Result<Vec<std::result::Result<Scored, String>>> {
    let all = |tokens: &[Vec<u32>]| -> Result<Vec<Scored>> {
        Ok(match mode {
            ScoreMode::Logits => super::residue_log_probs(runner, tokens, budget)?
                .into_iter()
                .map(|lp| Scored::Logits(super::standard_columns(&lp)))
                .collect(),
            _ => super::pseudo_log_likelihoods(runner, tokens, budget)?
                .into_iter()
                .map(|p| Scored::Pll(p.pll, p.per_position))
                .collect(),
        })
    };
    match all(tokens) {
        Ok(scored) => Ok(scored.into_iter().map(Ok).collect()),
        // Find the sequences that do not fit alone; score the rest one by one.
        Err(Error::OutOfMemory { .. }) => tokens
            .iter()
            .map(|t| match all(std::slice::from_ref(t)) {
                Ok(mut s) => Ok(Ok(s.remove(0))),
                Err(Error::OutOfMemory { detail }) => Ok(Err(format!(
                    "out of memory scoring this sequence alone ({} tokens per copy): lower \
                     --max-length or use a device with more memory ({detail})",
                    t.len()
                ))),
                Err(e) => Err(e),
            })
            .collect(),
        Err(e) => Err(e),
    }
}

/// The part's output batch from its rows' results.
fn assemble(
    job: &ScoreJob,
    part: PartRows,
    results: Vec<Option<Scored>>,
    lengths: Vec<(usize, bool)>,
    mut errors: Vec<ErrorRow>,
    first: u64,
    schema: &SchemaRef,
) -> Result<(RecordBatch, Vec<ErrorRow>, PartRecord)> {
    let keep: Vec<u32> = (0..results.len() as u32)
        .filter(|&r| results[r as usize].is_some())
        .collect();
    let arrow_err = |e: arrow::error::ArrowError| Error::internal(format!("score output: {e}"));
    let passthrough_schema = job.inputs.passthrough_schema();
    let all = arrow::compute::concat_batches(&passthrough_schema, &part.passthrough)
        .map_err(arrow_err)?;
    let indices = UInt32Array::from(keep.clone());
    let mut columns: Vec<ArrayRef> = all
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &indices, None))
        .collect::<std::result::Result<_, _>>()
        .map_err(arrow_err)?;
    let kept: Vec<&Scored> = keep
        .iter()
        .map(|&r| results[r as usize].as_ref().expect("kept"))
        .collect();
    let mut residues = 0u64;
    match &job.mode {
        ScoreMode::Mutants { .. } => {
            let names: Vec<&str> = keep
                .iter()
                .map(|&r| part.texts[r as usize].as_deref().unwrap_or_default())
                .collect();
            columns.push(Arc::new(StringArray::from(names)));
            let scores: Vec<f64> = kept
                .iter()
                .map(|s| match s {
                    Scored::Mutant(v) => *v,
                    _ => unreachable!("mutant rows"),
                })
                .collect();
            columns.push(Arc::new(Float64Array::from(scores)));
        }
        mode => {
            let l: Vec<i32> = keep.iter().map(|&r| lengths[r as usize].0 as i32).collect();
            let t: Vec<bool> = keep.iter().map(|&r| lengths[r as usize].1).collect();
            columns.push(Arc::new(Int32Array::from(l)));
            columns.push(Arc::new(BooleanArray::from(t)));
            match mode {
                ScoreMode::Pll { per_residue } => {
                    let mut plls = Vec::new();
                    let mut perplexities = Vec::new();
                    let mut terms: Vec<Vec<f32>> = Vec::new();
                    for s in &kept {
                        let Scored::Pll(pll, per) = s else {
                            unreachable!("PLL rows")
                        };
                        residues += per.len() as u64;
                        plls.push(*pll);
                        perplexities.push(super::pseudo_perplexity(*pll, per.len()));
                        terms.push(per.clone());
                    }
                    columns.push(Arc::new(Float64Array::from(plls)));
                    columns.push(Arc::new(Float64Array::from(perplexities)));
                    if *per_residue {
                        columns.push(float_lists(&terms, 1)?);
                    }
                }
                _ => {
                    let rows: Vec<Vec<f32>> = kept
                        .iter()
                        .map(|s| match s {
                            Scored::Logits(v) => v.clone(),
                            _ => unreachable!("logits rows"),
                        })
                        .collect();
                    residues += rows.iter().map(|r| r.len() as u64 / 20).sum::<u64>();
                    columns.push(float_lists(&rows, 20)?);
                }
            }
        }
    }
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(arrow_err)?;
    errors.sort_by_key(|e| e.position);
    let record = PartRecord {
        first_position: first,
        rows: results.len() as u64,
        output_rows: batch.num_rows() as u64,
        error_rows: errors.len() as u64,
        residues,
        reused: 0,
        truncated: lengths.iter().filter(|l| l.1).count() as u64,
    };
    Ok((batch, errors, record))
}

/// `List<Float32>` (`width` 1) or `List<FixedSizeList<Float32>[width]>` rows.
fn float_lists(rows: &[Vec<f32>], width: usize) -> Result<ArrayRef> {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    let lengths = rows.iter().map(|r| r.len() / width);
    let offsets = OffsetBuffer::from_lengths(lengths);
    let arrow_err = |e: arrow::error::ArrowError| Error::internal(format!("score output: {e}"));
    let item = Arc::new(Field::new_list_field(DataType::Float32, false));
    let values: ArrayRef = if width == 1 {
        Arc::new(Float32Array::from(values))
    } else {
        Arc::new(
            FixedSizeListArray::try_new(
                item.clone(),
                width as i32,
                Arc::new(Float32Array::from(values)),
                None,
            )
            .map_err(arrow_err)?,
        )
    };
    let field = Arc::new(Field::new_list_field(values.data_type().clone(), false));
    Ok(Arc::new(
        ListArray::try_new(field, offsets, values, None).map_err(arrow_err)?,
    ))
}

/// Write a part (errors first), then the manifest that lists it.
fn commit(
    job: &ScoreJob,
    index: usize,
    batch: &RecordBatch,
    errors: &[ErrorRow],
    record: PartRecord,
    manifest: &mut Manifest,
) -> Result<()> {
    let layout = &job.layout;
    if !errors.is_empty() {
        output::write_parquet(
            &layout.part_errors_path(index),
            &output::errors_batch(errors),
            None,
        )?;
    }
    output::write_parquet(&layout.part_path(index), batch, Some(&job.metadata))?;
    manifest.parts.insert(index, record);
    manifest.save(&layout.manifest_path())
}
