//! The host side of a job: input rows → parts → tokenized, length-sorted, token-budgeted packs.
//!
//! A part is a fixed number of consecutive input rows (`rows_per_part`). It is the unit of
//! sorting (lengths are sorted within a part, so memory stays bounded whatever the input size),
//! of output (one part file, one row group) and of resume (the manifest lists finished parts).
//! Because part boundaries depend only on the row count, a resumed job cuts the same parts and
//! produces the same result.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;

use super::reuse::{sequence_key, ReusePlanner, RowSource};
use crate::output::ErrorRow;
use crate::pack::{pack, PackedBatch};
pub use crate::prepare::LongPolicy;
use crate::prepare::{InputPolicy, Problem};

/// How rows become packs.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Token budget of a pack (specials included).
    pub tokens_per_batch: usize,
    /// Longest sequence embedded whole, in residues.
    pub max_length: usize,
    /// Policy beyond `max_length`.
    pub long: LongPolicy,
    /// Also every row's pseudo-log-likelihood: each computed sequence is followed, in the
    /// packs, by its masked copies ([`crate::pack::masked_copies`]).
    pub pll: bool,
}

impl PlanOptions {
    /// The input policy these options and `tokenizer` make.
    pub fn policy(&self, tokenizer: crate::Tokenizer) -> InputPolicy {
        InputPolicy {
            tokenizer,
            max_length: self.max_length,
            long: self.long,
        }
    }
}

/// One model input: a sequence, or one window of a long one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Row within the part.
    pub row: u32,
    /// Index of the window (0 for a whole sequence).
    pub window: u32,
    /// First residue of the window in the sequence.
    pub offset: u32,
    /// For a masked copy (`--pll`), the residue it masks; `None` for the sequence itself.
    pub masked: Option<MaskedResidue>,
}

/// The residue a masked copy hides: its token position and its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskedResidue {
    /// Token position (residue k is at position k).
    pub position: u32,
    /// The token the `<mask>` replaced.
    pub token: u32,
}

/// A pack of segments of one part, ready for the model.
#[derive(Debug, Clone)]
pub struct Pack {
    /// Part index.
    pub part: usize,
    /// The segments, in pack order.
    pub segments: Vec<Segment>,
    /// Their tokens.
    pub batch: PackedBatch,
    /// Whether per-residue outputs are needed (windows are averaged per residue).
    pub needs_residues: bool,
    /// Whether the pack holds masked copies (`--pll`): their log-probabilities are needed.
    pub log_probs: bool,
}

impl Pack {
    /// What the device must compute for this pack.
    pub fn request(&self) -> crate::engine::Request {
        crate::engine::Request::Configured {
            residues: self.needs_residues,
            log_probs: self.log_probs,
        }
    }
}

/// A part's packs, made as they are taken: with `--pll` a part's masked copies are far too
/// many tokens to hold at once.
pub type Packs = Box<dyn Iterator<Item = Pack>>;

/// How one input row of a part ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowPlan {
    /// Embedded from `windows` segments; `length` residues in the input.
    Embed {
        /// Residues of the input sequence.
        length: usize,
        /// Residues actually embedded (after truncation).
        embedded: usize,
        /// Whether it was cut to `max_length`.
        truncated: bool,
        /// Number of segments (1, or the window count; 0 for a copied row).
        windows: usize,
        /// Computed, or copied from an identical sequence's result.
        source: RowSource,
    },
    /// In the errors output.
    Error,
}

/// Everything the writer needs to know about a part before its results arrive.
#[derive(Debug, Clone)]
pub struct PartPlan {
    /// Part index.
    pub index: usize,
    /// Global position of its first row.
    pub first_position: u64,
    /// Pass-through columns of all its rows, in order.
    pub passthrough: Vec<RecordBatch>,
    /// Fate of each row.
    pub rows: Vec<RowPlan>,
    /// Error rows.
    pub errors: Vec<ErrorRow>,
    /// Where each row came from.
    pub origins: Vec<Origin>,
    /// Segments the model will return.
    pub segments: usize,
}

/// Where a row came from, for error rows.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The row's id, if the input has ids.
    pub id: Option<String>,
    /// Input name.
    pub input: Arc<str>,
    /// 1-based record number in that input.
    pub record: u64,
}

/// Accumulates the rows of one part.
pub struct PartBuilder {
    index: usize,
    first_position: u64,
    passthrough: Vec<RecordBatch>,
    rows: Vec<RowPlan>,
    errors: Vec<ErrorRow>,
    origins: Vec<Origin>,
    /// Tokens per segment, with the segment.
    segments: Vec<(Segment, Vec<u32>)>,
}

impl PartBuilder {
    /// Start part `index` at global position `first_position`.
    pub fn new(index: usize, first_position: u64) -> Self {
        Self {
            index,
            first_position,
            passthrough: Vec::new(),
            rows: Vec::new(),
            errors: Vec::new(),
            origins: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// The part's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Rows so far.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the part has no row yet.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Global position of the next row.
    pub fn next_position(&self) -> u64 {
        self.first_position + self.rows.len() as u64
    }

    /// Add the pass-through columns of rows about to be added.
    pub fn add_passthrough(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.passthrough.push(batch);
        }
    }

    /// Add one row: `problem` is found before tokenizing (reader problem, duplicate id).
    /// With `reuse`, a row whose sequence's result the writer holds is copied, not computed.
    pub fn add_row(
        &mut self,
        sequence: Option<&str>,
        origin: Origin,
        problem: Option<(Problem, String)>,
        policy: &InputPolicy,
        reuse: Option<&mut ReusePlanner>,
    ) {
        if let Some((problem, reason)) = problem {
            return self.add_error(origin, problem, reason);
        }
        let Some(sequence) = sequence else {
            return self.add_error(origin, Problem::NullSequence, "sequence is null".into());
        };
        let prepared = match policy.prepare(sequence) {
            Ok(p) => p,
            Err(e) => return self.add_error(origin, e.problem, e.reason),
        };
        let row = self.rows.len() as u32;
        let source = match reuse {
            Some(reuse) => reuse.decide(sequence_key(&prepared), prepared.embedded),
            None => RowSource::Compute { keep: None },
        };
        let copied = matches!(source, RowSource::Copy { .. });
        let plan = RowPlan::Embed {
            length: prepared.length,
            embedded: prepared.embedded,
            truncated: prepared.truncated,
            windows: if copied { 0 } else { prepared.segments.len() },
            source,
        };
        let segments = if copied {
            Vec::new()
        } else {
            prepared.segments
        };
        for (w, (offset, tokens)) in segments.into_iter().enumerate() {
            let segment = Segment {
                row,
                window: w as u32,
                offset: offset as u32,
                masked: None,
            };
            self.segments.push((segment, tokens));
        }
        self.origins.push(origin);
        self.rows.push(plan);
    }

    /// Count a row of a part that a previous run finished (nothing is kept).
    pub fn add_skipped(&mut self) {
        self.rows.push(RowPlan::Error);
    }

    /// The error row of the last row added, if it was one.
    pub fn last_error(&self) -> Option<&ErrorRow> {
        match self.rows.last() {
            Some(RowPlan::Error) => self.errors.last(),
            _ => None,
        }
    }

    /// Add a row that goes to the errors output.
    pub fn add_error(&mut self, origin: Origin, problem: Problem, reason: String) {
        self.errors.push(ErrorRow {
            id: origin.id.clone(),
            position: self.next_position(),
            input: origin.input.to_string(),
            record: origin.record,
            problem,
            reason,
        });
        self.origins.push(origin);
        self.rows.push(RowPlan::Error);
    }

    /// Close the part: sort its segments by length and pack them (with `--pll`, followed each
    /// by its masked copies, packed as they are taken).
    pub fn finish(self, options: &PlanOptions) -> (PartPlan, Packs) {
        let budget = options.tokens_per_batch;
        let packed = (!options.pll).then(|| self.packs(budget));
        let copies: usize = match options.pll {
            true => self.segments.iter().map(|(_, t)| t.len() - 2).sum(),
            false => 0,
        };
        let plan = PartPlan {
            index: self.index,
            first_position: self.first_position,
            passthrough: self.passthrough,
            rows: self.rows,
            errors: self.errors,
            origins: self.origins,
            segments: self.segments.len() + copies,
        };
        let packs = match packed {
            Some(packs) => Box::new(packs.into_iter()),
            None => masked_packs(self.index, self.segments, budget),
        };
        (plan, packs)
    }

    /// The segments, first-fit decreasing into packs of at most `budget` tokens.
    fn packs(&self, budget: usize) -> Vec<Pack> {
        let tokens: Vec<&[u32]> = self.segments.iter().map(|(_, t)| &t[..]).collect();
        pack(&tokens, budget)
            .into_iter()
            .map(|group| {
                let needs_residues = group
                    .members
                    .iter()
                    .any(|&g| self.windows_of(self.segments[g].0.row) > 1);
                Pack {
                    part: self.index,
                    segments: group.members.iter().map(|&g| self.segments[g].0).collect(),
                    batch: group.batch,
                    needs_residues,
                    log_probs: false,
                }
            })
            .collect()
    }

    fn windows_of(&self, row: u32) -> usize {
        match self.rows[row as usize] {
            RowPlan::Embed { windows, .. } => windows,
            RowPlan::Error => 0,
        }
    }
}

/// Part `part`'s segments longest first, each followed by its masked copies, next-fit into packs
/// of at most `budget` tokens. (Windows are refused with `--pll`: every segment is a whole, or
/// truncated, row.)
fn masked_packs(part: usize, mut segments: Vec<(Segment, Vec<u32>)>, budget: usize) -> Packs {
    segments.sort_by_key(|(_, t)| std::cmp::Reverse(t.len()));
    let (segments, tokens): (Vec<Segment>, Vec<Vec<u32>>) = segments.into_iter().unzip();
    let tokens: Arc<[Vec<u32>]> = tokens.into();
    let positions = tokens.iter().map(|t| (1..t.len() - 1).collect()).collect();
    let copies = crate::pack::masked_copies(tokens.clone(), positions, budget, true);
    Box::new(copies.map(move |(batch, which)| {
        Pack {
            part,
            segments: which
                .iter()
                .map(|c| Segment {
                    masked: c.masked.map(|k| MaskedResidue {
                        position: k as u32,
                        token: tokens[c.sequence][k],
                    }),
                    ..segments[c.sequence]
                })
                .collect(),
            batch,
            needs_residues: false,
            log_probs: true,
        }
    }))
}

/// Ids seen more than once: `position → first position` of each later duplicate.
pub type Duplicates = HashMap<u64, u64>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::EOS;

    fn make_plan(seqs: &[Option<&str>], long: LongPolicy) -> (PartPlan, Vec<Pack>) {
        make_plan_with(seqs, long, false)
    }

    fn make_plan_with(seqs: &[Option<&str>], long: LongPolicy, pll: bool) -> (PartPlan, Vec<Pack>) {
        let options = PlanOptions {
            tokens_per_batch: 16,
            max_length: 6,
            long,
            pll,
        };
        let mut part = PartBuilder::new(2, 100);
        let input: Arc<str> = Arc::from("in.fa");
        for (i, seq) in seqs.iter().enumerate() {
            let origin = Origin {
                id: Some(format!("r{i}")),
                input: input.clone(),
                record: i as u64 + 1,
            };
            part.add_row(
                *seq,
                origin,
                None,
                &options.policy(Default::default()),
                None,
            );
        }
        let (plan, packs) = part.finish(&options);
        (plan, packs.collect())
    }

    #[test]
    fn rows_become_segments_or_errors() {
        let (plan, packs) = make_plan(
            &[Some("MKT"), None, Some("MJ"), Some("MKTVRQGL"), Some("A")],
            LongPolicy::Truncate,
        );
        assert_eq!(plan.rows.len(), 5);
        assert_eq!(plan.errors.len(), 2);
        assert_eq!(plan.errors[0].position, 101);
        assert_eq!(plan.errors[0].id.as_deref(), Some("r1"));
        assert_eq!(plan.errors[0].reason, "sequence is null");
        assert!(plan.errors[1].reason.contains("'J'"));
        assert_eq!(plan.errors[1].record, 3);
        assert_eq!(
            plan.rows[3],
            RowPlan::Embed {
                length: 8,
                embedded: 6,
                truncated: true,
                windows: 1,
                source: RowSource::Compute { keep: None },
            }
        );
        let tokens: usize = packs.iter().map(|p| p.batch.total_tokens()).sum();
        assert_eq!(tokens, 5 + 8 + 3);
        assert!(packs.iter().all(|p| p.batch.total_tokens() <= 16));
        // The truncated row keeps <eos>.
        let long = packs
            .iter()
            .flat_map(|p| {
                (0..p.batch.len()).map(move |i| (p.segments[i], p.batch.tokens(i).to_vec()))
            })
            .find(|(s, _)| s.row == 3)
            .unwrap();
        assert_eq!(long.1.len(), 8);
        assert_eq!(*long.1.last().unwrap(), EOS);
    }

    #[test]
    fn long_rows_as_errors_or_windows() {
        let (plan, _) = make_plan(&[Some("MKTVRQGL")], LongPolicy::Error);
        assert!(plan.errors[0].reason.contains("--max-length 6"));
        let (plan, packs) = make_plan(&[Some("MKTVRQGLAG")], LongPolicy::Window);
        assert_eq!(plan.segments, 3);
        assert!(packs.iter().all(|p| p.needs_residues));
        let mut offsets: Vec<u32> = packs
            .iter()
            .flat_map(|p| p.segments.iter().map(|s| s.offset))
            .collect();
        offsets.sort();
        assert_eq!(offsets, [0, 3, 4]);
    }

    #[test]
    fn pll_follows_each_sequence_with_its_masked_copies() {
        let (plan, packs) = make_plan_with(
            &[Some("MK"), Some("MKTVRQGL"), None],
            LongPolicy::Truncate,
            true,
        );
        // Two computed rows (the second truncated to 6 residues): 2 originals and 2 + 6 copies.
        assert_eq!(plan.segments, 2 + 2 + 6);
        let segments: Vec<Segment> = packs.iter().flat_map(|p| p.segments.clone()).collect();
        assert_eq!(segments.len(), plan.segments);
        assert!(packs.iter().all(|p| p.log_probs && !p.needs_residues));
        // Longest first, the original before its copies, one copy per residue.
        assert_eq!((segments[0].row, segments[0].masked), (1, None));
        let masked: Vec<u32> = segments[1..7]
            .iter()
            .map(|s| s.masked.unwrap().position)
            .collect();
        assert_eq!(masked, [1, 2, 3, 4, 5, 6]);
        assert_eq!(segments[7].masked, None);
        for pack in &packs {
            assert!(pack.batch.total_tokens() <= 16 || pack.segments.len() == 1);
            for (i, s) in pack.segments.iter().enumerate() {
                let tokens = pack.batch.tokens(i);
                match s.masked {
                    Some(m) => {
                        assert_eq!(tokens[m.position as usize], crate::tokenize::MASK);
                        let original = if s.row == 1 { "MKTVRQ" } else { "MK" };
                        let want = crate::tokenize::residue_token(
                            original.chars().nth(m.position as usize - 1).unwrap(),
                        );
                        assert_eq!(Some(m.token), want);
                    }
                    None => assert!(!tokens.contains(&crate::tokenize::MASK)),
                }
            }
        }
    }
}
