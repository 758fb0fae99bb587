//! The writer side of a part: results arrive pack by pack, in length order; when the last one is
//! in, the part's rows are emitted in input order as one record batch, with its error rows.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int32Array, RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;

use super::plan::{MaskedResidue, PartPlan, RowPlan, Segment};
use super::reuse::{HeldRow, ResultCache, RowSource};
use crate::error::{Error, Result};
use crate::output::columns::EmbeddingColumns;
use crate::output::{ErrorRow, PartRecord};
use crate::pack::PackedBatch;
use crate::pool::PooledLayer;
use crate::prepare::WindowSums;
use crate::tokenize::VOCAB_SIZE;

/// The windows of one long row: per layer, their per-residue sums and the first window's BOS.
struct Windows {
    sums: Vec<WindowSums>,
    bos: Vec<Option<Vec<f32>>>,
}

/// The fate of a part's rows once every result is in.
#[derive(Default)]
struct Settled {
    /// Output rows (row numbers within the part), with their `length` and `truncated` values.
    keep: Vec<u32>,
    lengths: Vec<i32>,
    truncated: Vec<bool>,
    /// Residues embedded.
    residues: u64,
    /// Output rows copied from an identical sequence's result.
    reused: u64,
    /// Error rows, by position.
    errors: Vec<ErrorRow>,
}

/// A part being assembled.
pub struct PartAssembly {
    plan: PartPlan,
    columns: Arc<EmbeddingColumns>,
    remaining: usize,
    /// Per layer: `[rows × H]` means and BOS vectors (unused rows stay zero).
    mean: Vec<Vec<f32>>,
    bos: Vec<Vec<f32>>,
    /// Per layer, per row: residue vectors.
    residues: Vec<Vec<Option<Vec<f32>>>>,
    windows: HashMap<u32, Windows>,
    failed: HashMap<u32, String>,
    /// Per row (`--pll`): the log-probability of each residue with it masked, in residue order.
    pll_terms: HashMap<u32, Vec<f32>>,
    /// Per row (`--pll`): the pseudo-log-likelihood, once the part is complete.
    pll: Vec<f64>,
}

impl PartAssembly {
    /// Start assembling `plan`.
    pub fn new(plan: PartPlan, columns: Arc<EmbeddingColumns>) -> Self {
        let rows = plan.rows.len();
        let h = columns.hidden;
        let layers = columns.layers.len();
        let p = columns.pooling;
        Self {
            remaining: plan.segments,
            mean: vec![
                if p.mean {
                    vec![0.0; rows * h]
                } else {
                    Vec::new()
                };
                layers
            ],
            bos: vec![
                if p.bos {
                    vec![0.0; rows * h]
                } else {
                    Vec::new()
                };
                layers
            ],
            residues: vec![
                if p.per_residue {
                    vec![None; rows]
                } else {
                    Vec::new()
                };
                layers
            ],
            windows: HashMap::new(),
            failed: HashMap::new(),
            pll_terms: HashMap::new(),
            pll: if columns.pll {
                vec![0.0; rows]
            } else {
                Vec::new()
            },
            plan,
            columns,
        }
    }

    /// `plan` assembled with made-up vectors (deterministic, spread like embeddings), as if every
    /// row were computed: the part file a job would write, for `--dry-run`'s size estimate.
    /// Rows with the same key (`keys`, by row) get the same vectors, as rows of the same
    /// sequence do in a job.
    pub fn synthetic(
        mut plan: PartPlan,
        columns: Arc<EmbeddingColumns>,
        keys: &HashMap<u32, u128>,
    ) -> Self {
        let mut seeds = Vec::with_capacity(plan.rows.len());
        for (row, plan) in plan.rows.iter_mut().enumerate() {
            let key = match plan {
                RowPlan::Embed {
                    source: RowSource::Copy { key, .. },
                    ..
                } => Some(*key),
                _ => keys.get(&(row as u32)).copied(),
            };
            // splitmix64 of the key: xorshift needs a well-mixed, non-zero state.
            let mut z = key.map_or(row as u64, |k| (k as u64) ^ (k >> 64) as u64);
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            seeds.push((z ^ (z >> 31)) | 1);
            if let RowPlan::Embed { source, .. } = plan {
                *source = RowSource::Compute { keep: None };
            }
        }
        let mut part = Self::new(plan, columns);
        // A sum of four uniforms: roughly normal, with the spread of exponents and mantissas
        // that real embeddings have (what the compressor sees).
        let value = |state: &mut u64| {
            let mut sum = 0.0f32;
            for _ in 0..4 {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                sum += (*state >> 40) as f32 / (1u64 << 24) as f32;
            }
            sum - 2.0
        };
        let h = part.columns.hidden;
        for (row, &seed) in seeds.iter().enumerate() {
            let RowPlan::Embed { embedded, .. } = part.plan.rows[row] else {
                continue;
            };
            let mut state = seed;
            for l in 0..part.columns.layers.len() {
                for v in part.mean[l].iter_mut().skip(row * h).take(h) {
                    *v = value(&mut state);
                }
                for v in part.bos[l].iter_mut().skip(row * h).take(h) {
                    *v = value(&mut state);
                }
                if let Some(slot) = part.residues[l].get_mut(row) {
                    *slot = Some((0..embedded * h).map(|_| value(&mut state)).collect());
                }
            }
            if let Some(pll) = part.pll.get_mut(row) {
                *pll = -(embedded as f64) * (2.0 + value(&mut state) as f64).abs();
            }
        }
        part.remaining = 0;
        part
    }

    /// Segments still expected.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Whether every segment is in.
    pub fn is_complete(&self) -> bool {
        self.remaining == 0
    }

    /// Take the results of one pack: its layers and, for a pack of masked copies (`--pll`), a
    /// trailing entry of log-probabilities at its masks ([`crate::engine::Request::Configured`]).
    pub fn add(&mut self, segments: &[Segment], batch: &PackedBatch, pooled: &[PooledLayer]) {
        let (layers, log_probs) = match pooled.split_last() {
            Some((last, layers)) if last.log_probs.is_some() => (layers, last.log_probs.as_deref()),
            _ => (pooled, None),
        };
        let counts = batch.residue_counts();
        let mut residue_offset = 0;
        let mut mask = 0;
        for (i, segment) in segments.iter().enumerate() {
            if let Some(masked) = segment.masked {
                let log_probs = log_probs.expect("packs of masked copies carry log-probabilities");
                let row = &log_probs[mask * VOCAB_SIZE..(mask + 1) * VOCAB_SIZE];
                self.add_pll_term(segment.row, masked, row[masked.token as usize]);
                mask += 1;
                continue;
            }
            self.add_segment(segment, i, residue_offset, counts[i], layers);
            residue_offset += counts[i];
        }
        self.remaining -= segments.len();
    }

    /// One term of row `row`'s pseudo-log-likelihood.
    fn add_pll_term(&mut self, row: u32, masked: MaskedResidue, log_prob: f32) {
        let embedded = match self.plan.rows[row as usize] {
            RowPlan::Embed { embedded, .. } => embedded,
            RowPlan::Error => unreachable!("error rows have no segments"),
        };
        let terms = self
            .pll_terms
            .entry(row)
            .or_insert_with(|| vec![0.0; embedded]);
        terms[masked.position as usize - 1] = log_prob;
    }

    /// Segment `i` of a pack (not a masked copy): its layers' outputs, its residue vectors
    /// at `residue_offset` (`n` of them) in the pack's per-residue outputs.
    fn add_segment(
        &mut self,
        segment: &Segment,
        i: usize,
        residue_offset: usize,
        n: usize,
        pooled: &[PooledLayer],
    ) {
        let h = self.columns.hidden;
        let row = segment.row as usize;
        let (windows, length) = match self.plan.rows[row] {
            RowPlan::Embed {
                windows, length, ..
            } => (windows, length),
            RowPlan::Error => unreachable!("error rows have no segments"),
        };
        for (l, layer) in pooled.iter().enumerate() {
            let residues = layer
                .residues
                .as_ref()
                .map(|r| &r[residue_offset * h..(residue_offset + n) * h]);
            let bos = layer.bos.as_ref().map(|b| &b[i * h..(i + 1) * h]);
            if windows > 1 {
                let layers = pooled.len();
                let entry = self.windows.entry(segment.row).or_insert_with(|| Windows {
                    sums: vec![WindowSums::new(length, h); layers],
                    bos: vec![None; layers],
                });
                let residues = residues.expect("windowed packs carry residues");
                entry.sums[l].add(segment.offset as usize, residues);
                if segment.window == 0 {
                    entry.bos[l] = bos.map(<[f32]>::to_vec);
                }
                continue;
            }
            if let Some(mean) = &layer.mean {
                self.mean[l][row * h..(row + 1) * h].copy_from_slice(&mean[i * h..(i + 1) * h]);
            }
            if let Some(bos) = bos {
                self.bos[l][row * h..(row + 1) * h].copy_from_slice(bos);
            }
            if self.columns.pooling.per_residue {
                self.residues[l][row] = residues.map(<[f32]>::to_vec);
            }
        }
    }

    /// Sum every row's pseudo-log-likelihood terms, in residue order (the order `esmbed score`
    /// sums them in, whatever order the packs came back in).
    fn sum_pll(&mut self) {
        for (row, terms) in std::mem::take(&mut self.pll_terms) {
            self.pll[row as usize] = crate::score::Pll::from_terms(terms).pll;
        }
    }

    /// A segment could not be embedded (out of memory even alone): its row becomes an error.
    pub fn fail(&mut self, segment: Segment, reason: String) {
        self.failed.entry(segment.row).or_insert(reason);
        self.remaining -= 1;
    }

    /// Average the windows of long rows into their per-residue vectors, means and BOS vectors.
    fn merge_windows(&mut self) {
        let h = self.columns.hidden;
        for (row, w) in std::mem::take(&mut self.windows) {
            let row = row as usize;
            for (l, sums) in w.sums.into_iter().enumerate() {
                let (averaged, mean) = sums.finish();
                if self.columns.pooling.mean {
                    self.mean[l][row * h..(row + 1) * h].copy_from_slice(&mean);
                }
                if let (true, Some(bos)) = (self.columns.pooling.bos, &w.bos[l]) {
                    self.bos[l][row * h..(row + 1) * h].copy_from_slice(bos);
                }
                if self.columns.pooling.per_residue {
                    self.residues[l][row] = Some(averaged);
                }
            }
        }
    }

    /// The part's output rows (input order, as a batch of `schema`), its error rows (by
    /// position) and its manifest record. Parts must finish in input order: results kept in
    /// `cache` for later rows are taken and given here.
    pub fn finish(
        mut self,
        schema: &SchemaRef,
        cache: &mut ResultCache,
    ) -> Result<(RecordBatch, Vec<ErrorRow>, PartRecord)> {
        self.merge_windows();
        self.sum_pll();
        self.share_results(cache)?;
        let rows = self.settle();
        let mut columns = self.passthrough_columns(schema, &rows.keep)?;
        columns.push(Arc::new(Int32Array::from(rows.lengths)));
        columns.push(Arc::new(BooleanArray::from(rows.truncated)));
        columns.extend(self.embedding_columns(&rows.keep));
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(arrow_error)?;
        let record = PartRecord {
            first_position: self.plan.first_position,
            rows: self.plan.rows.len() as u64,
            output_rows: batch.num_rows() as u64,
            error_rows: rows.errors.len() as u64,
            residues: rows.residues,
            reused: rows.reused,
            truncated: batch
                .column_by_name("truncated")
                .map(|c| {
                    let b: &BooleanArray = c.as_any().downcast_ref().expect("boolean");
                    b.true_count() as u64
                })
                .unwrap_or(0),
        };
        Ok((batch, rows.errors, record))
    }

    /// In row order: hold the results that later rows copy, and copy held results into the rows
    /// that reuse them (a source row precedes its copies, in this part or an earlier one).
    fn share_results(&mut self, cache: &mut ResultCache) -> Result<()> {
        for row in 0..self.plan.rows.len() {
            match self.plan.rows[row] {
                RowPlan::Embed {
                    source: RowSource::Compute { keep: Some(key) },
                    ..
                } => cache.hold(key, self.held_row(row)),
                RowPlan::Embed {
                    source: RowSource::Copy { key, last },
                    ..
                } => {
                    let held = cache.copy(key, last).ok_or_else(|| {
                        Error::internal("a reused sequence's result was not held (planner bug)")
                    })?;
                    self.put_row(row, held);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Row `row`'s outputs, to hold for later copies.
    fn held_row(&self, row: usize) -> HeldRow {
        if let Some(reason) = self.failed.get(&(row as u32)) {
            return HeldRow::Failed(reason.clone());
        }
        let h = self.columns.hidden;
        let slice = |v: &Vec<f32>| {
            if v.is_empty() {
                Vec::new()
            } else {
                v[row * h..(row + 1) * h].to_vec()
            }
        };
        HeldRow::Done {
            mean: self.mean.iter().map(slice).collect(),
            bos: self.bos.iter().map(slice).collect(),
            residues: self
                .residues
                .iter()
                .map(|r| r.get(row).cloned().flatten())
                .collect(),
            pll: self.pll.get(row).copied(),
        }
    }

    /// Give row `row` a held result.
    fn put_row(&mut self, row: usize, held: HeldRow) {
        let (mean, bos, residues) = match held {
            HeldRow::Failed(reason) => {
                self.failed.insert(row as u32, reason);
                return;
            }
            HeldRow::Done {
                mean,
                bos,
                residues,
                pll,
            } => {
                if let (Some(to), Some(from)) = (self.pll.get_mut(row), pll) {
                    *to = from;
                }
                (mean, bos, residues)
            }
        };
        let h = self.columns.hidden;
        for (to, from) in self
            .mean
            .iter_mut()
            .zip(mean)
            .chain(self.bos.iter_mut().zip(bos))
        {
            if !from.is_empty() {
                to[row * h..(row + 1) * h].copy_from_slice(&from);
            }
        }
        for (to, from) in self.residues.iter_mut().zip(residues) {
            if let Some(slot) = to.get_mut(row) {
                *slot = from;
            }
        }
    }

    /// Which rows are output rows (with their length columns) and which are errors: planned
    /// errors, and rows whose segments failed.
    fn settle(&mut self) -> Settled {
        let mut rows = Settled {
            errors: std::mem::take(&mut self.plan.errors),
            ..Settled::default()
        };
        for (row, plan) in self.plan.rows.iter().enumerate() {
            let RowPlan::Embed {
                length,
                embedded,
                truncated,
                source,
                ..
            } = *plan
            else {
                continue;
            };
            if let Some(reason) = self.failed.get(&(row as u32)) {
                let origin = &self.plan.origins[row];
                rows.errors.push(ErrorRow {
                    id: origin.id.clone(),
                    position: self.plan.first_position + row as u64,
                    input: origin.input.to_string(),
                    record: origin.record,
                    problem: crate::prepare::Problem::OutOfMemory,
                    reason: reason.clone(),
                });
                continue;
            }
            rows.reused += u64::from(matches!(source, RowSource::Copy { .. }));
            rows.keep.push(row as u32);
            rows.lengths.push(length as i32);
            rows.truncated.push(truncated);
            rows.residues += embedded as u64;
        }
        rows.errors.sort_by_key(|e| e.position);
        rows
    }

    /// The input's columns of the kept rows.
    fn passthrough_columns(&self, schema: &SchemaRef, keep: &[u32]) -> Result<Vec<ArrayRef>> {
        let passthrough_schema = Arc::new(arrow::datatypes::Schema::new(
            schema.fields()[..schema.fields().len() - 2 - self.columns.fields().len()].to_vec(),
        ));
        let all = arrow::compute::concat_batches(&passthrough_schema, &self.plan.passthrough)
            .map_err(arrow_error)?;
        let indices = UInt32Array::from(keep.to_vec());
        all.columns()
            .iter()
            .map(|c| arrow::compute::take(c, &indices, None))
            .collect::<std::result::Result<_, _>>()
            .map_err(arrow_error)
    }

    /// The embedding columns of the kept rows, layer by layer.
    fn embedding_columns(&mut self, keep: &[u32]) -> Vec<ArrayRef> {
        let h = self.columns.hidden;
        let gather = |values: &[f32]| -> Vec<f32> {
            keep.iter()
                .flat_map(|&r| &values[r as usize * h..(r as usize + 1) * h])
                .copied()
                .collect()
        };
        let p = self.columns.pooling;
        let mut columns = Vec::new();
        for l in 0..self.columns.layers.len() {
            if p.mean {
                columns.push(self.columns.vectors(gather(&self.mean[l])));
            }
            if p.bos {
                columns.push(self.columns.vectors(gather(&self.bos[l])));
            }
            if p.per_residue {
                let mut counts = Vec::with_capacity(keep.len());
                let mut values = Vec::new();
                for &r in keep {
                    let v = self.residues[l][r as usize].take().unwrap_or_default();
                    counts.push(v.len() / h);
                    values.extend_from_slice(&v);
                }
                columns.push(self.columns.vector_lists(values, &counts));
            }
        }
        if self.columns.pll {
            columns.extend(self.pll_columns(keep));
        }
        columns
    }

    /// `pll` and `pseudo_perplexity` (`exp(−PLL / L)`) of the kept rows.
    fn pll_columns(&self, keep: &[u32]) -> [ArrayRef; 2] {
        let pll: Vec<f64> = keep.iter().map(|&r| self.pll[r as usize]).collect();
        let perplexity: Vec<f64> = keep
            .iter()
            .zip(&pll)
            .map(|(&r, &pll)| {
                let embedded = match self.plan.rows[r as usize] {
                    RowPlan::Embed { embedded, .. } => embedded,
                    RowPlan::Error => 0,
                };
                crate::score::pseudo_perplexity(pll, embedded)
            })
            .collect();
        [
            Arc::new(Float64Array::from(pll)),
            Arc::new(Float64Array::from(perplexity)),
        ]
    }
}

fn arrow_error(e: arrow::error::ArrowError) -> Error {
    Error::internal(format!("assembling output rows failed: {e}"))
}
