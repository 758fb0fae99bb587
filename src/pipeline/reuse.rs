//! Identical sequences embedded once: rows whose model inputs are identical (after the input
//! policy: case, whitespace, a trailing `*`, truncation or windows) share one computation, and
//! the result is copied to every such row.
//!
//! This is exact by construction: a sequence's output does not depend on its pack (bitwise, on
//! the CPU and on the GPU; `tests/it/invariance.rs`), so a copied row holds the bits it would
//! have been computed with. Two sides keep it bounded:
//! - the pre-pass counts each distinct sequence's rows, as a 128-bit key and a count
//!   ([`SequenceCounts`]: 33 bytes per hash-table slot, 35 to 70 MB per million distinct
//!   sequences);
//! - the planner ([`ReusePlanner`]) decides, row by row in input order, whether a row is
//!   computed or copied, and which computed results the writer keeps for later rows: only
//!   results of sequences with rows still to come, within a memory limit, dropped at their last
//!   row. A sequence whose result is not held (over the limit, or computed by an earlier run of
//!   a resumed job) is simply computed again: the output is the same either way.
//!
//! The writer ([`ResultCache`]) holds the kept results; it settles parts in input order, so a
//! row's source is always settled before the row.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::prepare::Prepared;

/// A sequence's identity: the first 128 bits of SHA-256 over its model inputs.
pub type SequenceKey = u128;

/// Rows per distinct sequence, from the pre-pass.
pub type SequenceCounts = HashMap<SequenceKey, u32>;

/// The key of a prepared row: every segment's offset and tokens (token ids fit a byte).
pub fn sequence_key(prepared: &Prepared) -> SequenceKey {
    segments_key(prepared.segments.iter().map(|(o, t)| (*o, &t[..])))
}

/// [`sequence_key`] of a row's segments, `(offset, tokens)` in window order.
pub fn segments_key<'a>(
    segments: impl ExactSizeIterator<Item = (usize, &'a [u32])>,
) -> SequenceKey {
    let mut hasher = Sha256::new();
    hasher.update((segments.len() as u64).to_le_bytes());
    for (offset, tokens) in segments {
        hasher.update((offset as u64).to_le_bytes());
        hasher.update((tokens.len() as u64).to_le_bytes());
        let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
        hasher.update(&bytes);
    }
    let digest = hasher.finalize();
    u128::from_le_bytes(digest[..16].try_into().expect("32-byte digest"))
}

/// Where a row's outputs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSource {
    /// Computed from its own segments; with `keep`, the writer holds the result for later rows
    /// of the same sequence.
    Compute {
        /// The key to keep the result under.
        keep: Option<SequenceKey>,
    },
    /// Copied from the held result of an earlier row; `last` drops it afterwards.
    Copy {
        /// The sequence.
        key: SequenceKey,
        /// Whether no later row needs the result.
        last: bool,
    },
}

/// Bytes of one row's held result: `pooled` for its pooled vectors, `per_residue` per residue.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowSize {
    /// Mean and BOS vectors of every layer.
    pub pooled: usize,
    /// Residue vectors of every layer, per residue.
    pub per_residue: usize,
}

/// The planner's side: which rows are computed, which copied, what the writer holds.
#[derive(Debug)]
pub struct ReusePlanner {
    size: RowSize,
    /// Rows not yet planned, per sequence (from the pre-pass; a hint: a wrong count only costs
    /// memory or a recomputation, never a wrong result).
    remaining: SequenceCounts,
    /// Results the writer will hold, with their size in bytes.
    held: HashMap<SequenceKey, usize>,
    bytes: usize,
    limit: usize,
    copied: u64,
}

impl ReusePlanner {
    /// Plan with `counts` from the pre-pass, holding at most `limit` bytes of results of rows
    /// of `size`.
    pub fn new(counts: SequenceCounts, size: RowSize, limit: usize) -> Self {
        Self {
            size,
            remaining: counts,
            held: HashMap::new(),
            bytes: 0,
            limit,
            copied: 0,
        }
    }

    /// Decide for the next row, of sequence `key` with `residues` residues embedded.
    pub fn decide(&mut self, key: SequenceKey, residues: usize) -> RowSource {
        let bytes = self.size.pooled + residues * self.size.per_residue;
        let left = self.take_one(key);
        if self.held.contains_key(&key) {
            self.copied += 1;
            if left == 0 {
                self.bytes -= self.held.remove(&key).expect("held");
            }
            return RowSource::Copy {
                key,
                last: left == 0,
            };
        }
        if left > 0 && self.bytes + bytes <= self.limit {
            self.held.insert(key, bytes);
            self.bytes += bytes;
            return RowSource::Compute { keep: Some(key) };
        }
        RowSource::Compute { keep: None }
    }

    /// A row of a part that an earlier run finished: nothing is computed or copied.
    pub fn skip(&mut self, key: SequenceKey) {
        self.take_one(key);
    }

    /// Rows planned as copies so far.
    pub fn copied(&self) -> u64 {
        self.copied
    }

    /// Count one row of `key`; the rows still to come after it.
    fn take_one(&mut self, key: SequenceKey) -> u32 {
        match self.remaining.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                *n
            }
            Some(_) => {
                self.remaining.remove(&key);
                0
            }
            None => 0,
        }
    }
}

/// A held result: per layer, the row's mean and BOS vectors and residue vectors (those the job
/// writes), or the reason it could not be computed.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldRow {
    /// The outputs.
    Done {
        /// Per layer: mean vector (empty when not written).
        mean: Vec<Vec<f32>>,
        /// Per layer: BOS vector (empty when not written).
        bos: Vec<Vec<f32>>,
        /// Per layer: residue vectors.
        residues: Vec<Option<Vec<f32>>>,
        /// The pseudo-log-likelihood (`--pll`).
        pll: Option<f64>,
    },
    /// The error row's reason.
    Failed(String),
}

/// The writer's side: results kept for later rows.
#[derive(Debug, Default)]
pub struct ResultCache {
    rows: HashMap<SequenceKey, HeldRow>,
}

impl ResultCache {
    /// Hold `row` for later copies.
    pub fn hold(&mut self, key: SequenceKey, row: HeldRow) {
        self.rows.insert(key, row);
    }

    /// The held result of `key`, removed with `last`. `None` means the planner and the writer
    /// disagree, a bug.
    pub fn copy(&mut self, key: SequenceKey, last: bool) -> Option<HeldRow> {
        if last {
            self.rows.remove(&key)
        } else {
            self.rows.get(&key).cloned()
        }
    }

    /// Results held now.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::{InputPolicy, LongPolicy};
    use crate::tokenize::Tokenizer;

    fn key(text: &str, max_length: usize, long: LongPolicy) -> SequenceKey {
        let policy = InputPolicy {
            tokenizer: Tokenizer::default(),
            max_length,
            long,
        };
        sequence_key(&policy.prepare(text).unwrap())
    }

    #[test]
    fn keys_follow_the_input_policy() {
        let k = key("MKTAYIAK", 100, LongPolicy::Truncate);
        assert_eq!(k, key("mktayiak*", 100, LongPolicy::Truncate));
        assert_eq!(k, key("MKT AYI\tAK", 100, LongPolicy::Truncate));
        assert_ne!(k, key("MKTAYIAL", 100, LongPolicy::Truncate));
        // Truncated to the same residues: the same model input.
        assert_eq!(
            key("MKTAYIAK", 4, LongPolicy::Truncate),
            key("MKTAGGGG", 4, LongPolicy::Truncate)
        );
        // Windows of different sequences differ.
        assert_ne!(
            key("MKTAYIAK", 4, LongPolicy::Window),
            key("MKTAGGGG", 4, LongPolicy::Window)
        );
    }

    #[test]
    fn rows_are_copied_while_held_and_dropped_at_the_last() {
        let (a, b, c) = (1, 2, 3);
        let size = RowSize {
            pooled: 0,
            per_residue: 1,
        };
        let counts = SequenceCounts::from([(a, 3), (b, 1), (c, 2)]);
        let mut planner = ReusePlanner::new(counts, size, 100);
        assert_eq!(planner.decide(a, 40), RowSource::Compute { keep: Some(a) });
        assert_eq!(planner.decide(b, 40), RowSource::Compute { keep: None });
        // Over the limit: computed, not held; its later row is computed again.
        assert_eq!(planner.decide(c, 80), RowSource::Compute { keep: None });
        assert_eq!(
            planner.decide(a, 40),
            RowSource::Copy {
                key: a,
                last: false
            }
        );
        assert_eq!(planner.decide(c, 80), RowSource::Compute { keep: None });
        assert_eq!(
            planner.decide(a, 40),
            RowSource::Copy { key: a, last: true }
        );
        assert_eq!(planner.bytes, 0);
        assert_eq!(planner.copied(), 2);
        // More rows than counted: computed (a hint, not a promise).
        assert_eq!(planner.decide(a, 40), RowSource::Compute { keep: None });
    }

    #[test]
    fn rows_of_finished_parts_count_but_are_not_held() {
        let a = 7;
        let size = RowSize {
            pooled: 10,
            per_residue: 0,
        };
        let mut planner = ReusePlanner::new(SequenceCounts::from([(a, 3)]), size, 100);
        planner.skip(a);
        assert_eq!(planner.decide(a, 10), RowSource::Compute { keep: Some(a) });
        assert_eq!(
            planner.decide(a, 10),
            RowSource::Copy { key: a, last: true }
        );
    }

    #[test]
    fn the_cache_drops_a_result_at_its_last_copy() {
        let mut cache = ResultCache::default();
        cache.hold(5, HeldRow::Failed("out of memory".into()));
        assert!(cache.copy(5, false).is_some());
        assert!(cache.copy(5, true).is_some());
        assert!(cache.is_empty());
        assert_eq!(cache.copy(5, true), None);
    }
}
