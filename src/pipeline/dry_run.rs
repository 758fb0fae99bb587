//! `--dry-run`: a job's plan, without a model on a device. The job's own pre-pass and planner
//! run (the [`super::planner::PartSink`] tallies parts instead of sending them to the devices),
//! so rows, errors, packs and tokens are the job's exactly. Estimated from the plan: the output's
//! size (a part written with made-up vectors, scaled), the peak memory of the longest pack, and,
//! where a throughput is known or measured, the run time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::DType;
use serde::Serialize;

use super::assemble::PartAssembly;
use super::plan::{Pack, Packs, PartPlan, RowPlan, Segment};
use super::planner::{PartSink, Planner};
use super::reuse::{segments_key, ResultCache, RowSource};
use super::JobSpec;
use crate::engine::PackEmbedder;
use crate::error::Result;
use crate::model::memory::{self, MemoryEstimate};
use crate::model::EsmConfig;
use crate::output;
use crate::pack::{packing_efficiency, PackedBatch};

/// What the dry run knows of the model and device, without weights on it.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// Hyper-parameters.
    pub config: EsmConfig,
    /// Compute dtype.
    pub dtype: DType,
    /// Whether it would run on the CPU (whose attention materializes scores).
    pub cpu: bool,
    /// The device's name (`NVIDIA H200`), for the known throughputs.
    pub device_name: Option<String>,
}

/// An error row, as the job would write it.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorExample {
    /// The record's id.
    pub id: Option<String>,
    /// Input file.
    pub input: String,
    /// 1-based record number in it.
    pub record: u64,
    /// Kind of problem.
    pub problem: &'static str,
    /// What is wrong, and what to do.
    pub reason: String,
}

/// Count error row `e` by kind, keeping the first five as examples.
pub(crate) fn count_error(
    by_problem: &mut BTreeMap<&'static str, u64>,
    examples: &mut Vec<ErrorExample>,
    e: &crate::output::ErrorRow,
) {
    *by_problem.entry(e.problem.name()).or_default() += 1;
    if examples.len() < 5 {
        examples.push(ErrorExample {
            id: e.id.clone(),
            input: e.input.clone(),
            record: e.record,
            problem: e.problem.name(),
            reason: e.reason.clone(),
        });
    }
}

/// Throughput the time estimate uses.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Tokens per second (specials included).
    pub tokens_per_second: f64,
    /// Where the figure comes from.
    pub source: String,
}

/// A job's plan and estimates (an embedding job's, or a score job's:
/// [`crate::score::dry_run`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DryRun {
    /// Input rows.
    pub rows: u64,
    /// Rows the output would hold (rows that fail on the device, out of memory even alone,
    /// would move to the errors).
    pub output_rows: u64,
    /// Distinct sequences among them (with reuse on).
    pub distinct: Option<u64>,
    /// Output rows that would copy an identical sequence's result.
    pub reused: u64,
    /// Residues embedded.
    pub residues: u64,
    /// Tokens through the model (specials included).
    pub tokens: u64,
    /// Rows truncated to `--max-length`.
    pub truncated: u64,
    /// Error rows.
    pub errors: u64,
    /// Error rows by kind (the errors file's `problem` column).
    pub errors_by_problem: BTreeMap<&'static str, u64>,
    /// The first error rows, as the errors file would list them.
    pub error_examples: Vec<ErrorExample>,
    /// Parts to run (parts a previous run finished are not counted, with `--resume`).
    pub parts: usize,
    /// Parts a previous run finished.
    pub parts_resumed: usize,
    /// Packs.
    pub packs: u64,
    /// Token budget of a pack.
    pub tokens_per_batch: usize,
    /// Real tokens / budgeted tokens.
    pub packing_efficiency: f64,
    /// Tokens of the fullest pack.
    pub longest_pack_tokens: usize,
    /// Tokens of the longest sequence (or window).
    pub longest_sequence_tokens: usize,
    /// The output's estimated size on disk, in bytes.
    pub output_bytes: u64,
    /// Estimated peak memory of the fullest pack: weights and activations.
    pub memory: MemoryEstimate,
    /// The throughput behind `estimated_seconds`.
    pub throughput: Option<Throughput>,
    /// Estimated model time.
    pub estimated_seconds: Option<f64>,
}

/// Plan `spec` as its job would, without running it. Fails as the job would before model work
/// (an existing output, duplicate ids, an empty input); writes nothing. With `bench`, the
/// throughput is measured on that device: the first part's packs (up to 8, after one to warm
/// up), as the job would run them.
pub fn dry_run(
    spec: &JobSpec,
    model: &ModelFacts,
    bench: Option<&dyn PackEmbedder>,
) -> Result<DryRun> {
    let opts = &spec.options;
    opts.check()?;
    let done = finished_parts(spec)?;
    let policy = opts.plan.policy(spec.tokenizer);
    let scan = super::scan::scan(&spec.inputs, opts.dedupe, &policy, opts.reuse)?;
    if scan.rows == 0 {
        return Err(spec.inputs.no_records());
    }
    let distinct = scan.sequences.as_ref().map(|s| s.len() as u64);
    let mut tally = Tally::new(spec);
    tally.bench = bench.is_some();
    let stats = Planner {
        spec,
        duplicates: &scan.duplicates,
        sequences: scan.sequences,
        done: &done,
        cancel: &AtomicBool::new(false),
        sink: &mut tally,
    }
    .run()?;
    let output_bytes = match tally.sample.take() {
        Some(plan) => estimate_size(spec, plan, &tally, stats.parts - stats.resumed)?,
        None => 0,
    };
    let mut report = DryRun {
        rows: scan.rows,
        output_rows: tally.output_rows,
        distinct,
        reused: tally.reused,
        residues: tally.residues,
        truncated: tally.truncated,
        errors: tally.errors.values().sum(),
        errors_by_problem: tally.errors,
        error_examples: tally.examples,
        parts: stats.parts - stats.resumed,
        parts_resumed: stats.resumed,
        output_bytes,
        ..DryRun::default()
    };
    let outputs = spec.columns.layers.len();
    tally
        .packs
        .report(&mut report, model, opts.plan.tokens_per_batch, outputs);
    if let (Some(device), Some(packs)) = (bench, &tally.first_packs) {
        report.measure(packs, device)?;
    }
    Ok(report)
}

impl DryRun {
    /// Replace the throughput by one measured on `device` running `packs`.
    fn measure(&mut self, packs: &[Pack], device: &dyn PackEmbedder) -> Result<()> {
        let Some((warm, measured)) = packs.split_first() else {
            return Ok(());
        };
        device.embed(&warm.batch, warm.request())?;
        device.synchronize()?;
        let started = Instant::now();
        let mut tokens = 0u64;
        for pack in measured.iter().take(BENCH_PACKS) {
            device.embed(&pack.batch, pack.request())?;
            tokens += pack.batch.total_tokens() as u64;
        }
        device.synchronize()?;
        if tokens == 0 {
            return Ok(());
        }
        let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        self.throughput = Some(Throughput {
            tokens_per_second: rate,
            source: format!(
                "measured on {} over {} packs (--bench)",
                device.label(),
                measured.len().min(8)
            ),
        });
        self.estimated_seconds = Some(self.tokens as f64 / rate);
        Ok(())
    }
}

/// The parts an earlier run finished (with `--resume`), after the job's checks on the output.
fn finished_parts(spec: &JobSpec) -> Result<HashSet<usize>> {
    let opts = &spec.options;
    if spec.remote.is_some() {
        return Ok(HashSet::new());
    }
    let earlier = output::resume_state(&spec.layout, &spec.identity, opts.overwrite, opts.resume)?;
    Ok(earlier
        .map(|m| m.parts.keys().copied().collect())
        .unwrap_or_default())
}

/// The planner's parts, counted.
#[derive(Default)]
struct Tally {
    output_rows: u64,
    reused: u64,
    residues: u64,
    truncated: u64,
    errors: BTreeMap<&'static str, u64>,
    examples: Vec<ErrorExample>,
    packs: PackTally,
    /// Rows whose vectors repeat a row shortly before them in the same part (within a Parquet
    /// page, where the compressor finds them), and the other rows; by rows for pooled vectors,
    /// by residues for per-residue ones (whose rows are larger: fewer fit a page).
    nearby: Copies,
    distant: Copies,
    /// Bytes of one vector.
    vector_bytes: usize,
    /// The first part, for the size estimate.
    sample: Option<PartPlan>,
    /// Whether to keep the first part's packs, for `--bench`.
    bench: bool,
    first_packs: Option<Vec<Pack>>,
}

/// What a dry run counts of the packs it planned (the embed job's and the score job's alike).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PackTally {
    packs: u64,
    tokens: u64,
    longest_pack: usize,
    longest_sequence: usize,
}

impl PackTally {
    /// Count one pack.
    pub(crate) fn add(&mut self, batch: &PackedBatch) {
        self.packs += 1;
        self.tokens += batch.total_tokens() as u64;
        self.longest_pack = self.longest_pack.max(batch.total_tokens());
        let longest = (0..batch.len()).map(|i| batch.range(i).len()).max();
        self.longest_sequence = self.longest_sequence.max(longest.unwrap_or(0));
    }

    /// Put the figures that come from the packs into `report`, `outputs` layers returned per
    /// token: packs, tokens, packing efficiency against `budget`, the longest pack and
    /// sequence, the memory they need, and the time where a throughput is known.
    pub(crate) fn report(
        &self,
        report: &mut DryRun,
        model: &ModelFacts,
        budget: usize,
        outputs: usize,
    ) {
        report.packs = self.packs;
        report.tokens = self.tokens;
        report.tokens_per_batch = budget;
        report.packing_efficiency =
            packing_efficiency(self.tokens as usize, self.packs as usize, budget);
        report.longest_pack_tokens = self.longest_pack;
        report.longest_sequence_tokens = self.longest_sequence;
        report.memory = memory::estimate(
            &model.config,
            model.dtype,
            model.cpu,
            self.longest_pack,
            self.longest_sequence,
            outputs,
        );
        report.throughput = known_throughput(model);
        report.estimated_seconds = report
            .throughput
            .as_ref()
            .map(|t| self.tokens as f64 / t.tokens_per_second);
    }
}

/// Rows and residues.
#[derive(Debug, Default, Clone, Copy)]
struct Copies {
    rows: u64,
    residues: u64,
}

impl PartSink for &mut Tally {
    fn take(&mut self, plan: PartPlan, packs: Packs) -> bool {
        let mut residues = 0;
        for row in &plan.rows {
            if let RowPlan::Embed {
                embedded,
                truncated,
                source,
                ..
            } = *row
            {
                self.output_rows += 1;
                residues += embedded as u64;
                self.truncated += u64::from(truncated);
                self.reused += u64::from(matches!(source, RowSource::Copy { .. }));
            }
        }
        self.residues += residues;
        for e in &plan.errors {
            count_error(&mut self.errors, &mut self.examples, e);
        }
        let keep = self.bench && self.first_packs.is_none();
        let mut first = Vec::new();
        let mut originals = Vec::new();
        for pack in packs {
            let batch = &pack.batch;
            self.packs.add(batch);
            for (i, s) in pack.segments.iter().enumerate() {
                if s.masked.is_none() {
                    originals.push((*s, batch.tokens(i).to_vec()));
                }
            }
            if keep && first.len() <= BENCH_PACKS {
                first.push(pack);
            }
        }
        self.count_nearby(&plan, &row_keys(originals));
        if self.sample.is_none() {
            self.sample = Some(plan);
        }
        if keep {
            self.first_packs = Some(first);
        }
        true
    }
}

impl Tally {
    fn new(spec: &JobSpec) -> Self {
        Self {
            vector_bytes: (spec.columns.hidden * spec.columns.dtype.size()).max(1),
            ..Self::default()
        }
    }

    /// Sort a part's output rows into `nearby` copies and `distant` ones.
    fn count_nearby(&mut self, plan: &PartPlan, keys: &HashMap<u32, u128>) {
        let page = PAGE_BYTES / self.vector_bytes;
        // Per key: the row and the residue offset where it last ended.
        let mut last: HashMap<u128, (usize, u64)> = HashMap::new();
        let mut offset = 0u64;
        let mut kept = 0usize;
        for (index, plan) in plan.rows.iter().enumerate() {
            let RowPlan::Embed {
                embedded, source, ..
            } = *plan
            else {
                continue;
            };
            // Distances count output rows (error rows are not in the file).
            let row = kept;
            kept += 1;
            let key = match source {
                RowSource::Copy { key, .. } => Some(key),
                _ => keys.get(&(index as u32)).copied(),
            };
            let before = key.and_then(|k| last.insert(k, (row, offset + embedded as u64)));
            offset += embedded as u64;
            let (rows, residues) = match before {
                Some((r, end)) => (row - r <= page, offset - end <= page as u64),
                None => (false, false),
            };
            if rows {
                self.nearby.rows += 1;
            } else {
                self.distant.rows += 1;
            }
            if residues {
                self.nearby.residues += embedded as u64;
            } else {
                self.distant.residues += embedded as u64;
            }
        }
    }
}

/// Packs `--bench` times, after one to warm up.
const BENCH_PACKS: usize = 8;

/// Parquet's default data page size: vectors repeated within a page compress away.
const PAGE_BYTES: usize = 1 << 20;

/// The sequence key of each computed row of a part, from its segments (masked copies left out)
/// and their tokens.
fn row_keys(segments: Vec<(Segment, Vec<u32>)>) -> HashMap<u32, u128> {
    // Per row: (window, offset, tokens).
    let mut rows: HashMap<u32, Vec<(u32, usize, Vec<u32>)>> = HashMap::new();
    for (s, tokens) in segments {
        rows.entry(s.row)
            .or_default()
            .push((s.window, s.offset as usize, tokens));
    }
    rows.into_iter()
        .map(|(row, mut windows)| {
            windows.sort_by_key(|w| w.0);
            (row, segments_key(windows.iter().map(|w| (w.1, &w.2[..]))))
        })
        .collect()
}

/// The output's size. The first part is written as the writer would write it, with made-up
/// vectors, twice: every row different (the cost of a row whose vectors the compressor has not
/// seen) and every row the same (the cost of a row that repeats one in the same page). Vector
/// columns are scaled by the job's rows of each kind (residues, for per-residue columns), the
/// other columns by rows; then the footer (once per file) and one row group per part.
fn estimate_size(spec: &JobSpec, sample: PartPlan, tally: &Tally, parts: usize) -> Result<u64> {
    let rows = sample
        .rows
        .iter()
        .filter(|r| matches!(r, RowPlan::Embed { .. }))
        .count() as u64;
    let residues: u64 = sample
        .rows
        .iter()
        .map(|r| match r {
            RowPlan::Embed { embedded, .. } => *embedded as u64,
            RowPlan::Error => 0,
        })
        .sum();
    if rows == 0 {
        return Ok(0);
    }
    let unique = write_sample(spec, &sample, Seeds::PerRow, 1, true)?;
    let same = write_sample(spec, &sample, Seeds::Same, 1, true)?;
    // A combined file's row groups carry no page index (see `combine`): measure without.
    let one = write_sample(spec, &sample, Seeds::PerRow, 1, false)?;
    let two = write_sample(spec, &sample, Seeds::PerRow, 2, false)?;
    let vectors: HashSet<String> = spec
        .columns
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let per_residue = |name: &str| {
        spec.columns.fields().iter().any(|f| {
            f.name() == name && matches!(f.data_type(), arrow::datatypes::DataType::List(_))
        })
    };
    let (near, far) = (tally.nearby, tally.distant);
    let mut total = 0.0;
    for (name, &bytes) in &unique.columns {
        let bytes = bytes as f64;
        total += if !vectors.contains(name) {
            bytes * tally.output_rows as f64 / rows as f64
        } else {
            let repeat = same.columns[name] as f64;
            let (of, n, m) = if per_residue(name) {
                (residues, far.residues, near.residues)
            } else {
                (rows, far.rows, near.rows)
            };
            (bytes * n as f64 + repeat * m as f64) / of.max(1) as f64
        };
    }
    let row_group = two.footer.saturating_sub(one.footer);
    let files = match spec.layout.kind {
        output::OutputKind::File => one.footer + row_group * (parts as u64).saturating_sub(1),
        output::OutputKind::Dataset => unique.footer * parts as u64,
    };
    Ok(total as u64 + files)
}

/// How the made-up vectors of a size sample repeat.
#[derive(Debug, Clone, Copy)]
enum Seeds {
    /// Every row its own.
    PerRow,
    /// Every row the same.
    Same,
}

/// A written size sample: bytes per column (all row groups), and the rest of the file.
struct Sample {
    columns: HashMap<String, u64>,
    footer: u64,
}

/// Write `plan` with made-up vectors in `row_groups` row groups, in memory, with or without the
/// page index.
fn write_sample(
    spec: &JobSpec,
    plan: &PartPlan,
    seeds: Seeds,
    row_groups: usize,
    page_index: bool,
) -> Result<Sample> {
    let schema = super::writer::output_schema(spec);
    let keys: HashMap<u32, u128> = match seeds {
        Seeds::PerRow => (0..plan.rows.len() as u32)
            .map(|r| (r, r as u128 + 1))
            .collect(),
        Seeds::Same => (0..plan.rows.len() as u32).map(|r| (r, 1)).collect(),
    };
    let assembly = PartAssembly::synthetic(plan.clone(), spec.columns.clone(), &keys);
    let (batch, _, _) = assembly.finish(&schema, &mut ResultCache::default())?;
    let (columns, footer) = output::written_sizes(&batch, &spec.metadata, row_groups, page_index)?;
    Ok(Sample { columns, footer })
}

/// Throughputs measured with `esmbed bench` (README, "Speed"): device name, layers, hidden,
/// dtype → tokens per second.
const KNOWN: &[(&str, usize, usize, DType, f64)] = &[
    ("H200", 33, 1280, DType::BF16, 338_000.0),
    ("H200", 36, 2560, DType::BF16, 94_500.0),
    ("H200", 48, 5120, DType::BF16, 20_500.0),
];

pub(crate) fn known_throughput(model: &ModelFacts) -> Option<Throughput> {
    let name = model.device_name.as_deref()?;
    let c = &model.config;
    KNOWN
        .iter()
        .find(|k| {
            name.contains(k.0)
                && k.1 == c.num_hidden_layers
                && k.2 == c.hidden_size
                && k.3 == model.dtype
        })
        .map(|k| Throughput {
            tokens_per_second: k.4,
            source: format!(
                "esmbed bench on an {} ({} layers, hidden {}, {:?}; README)",
                k.0, k.1, k.2, k.3
            ),
        })
}
