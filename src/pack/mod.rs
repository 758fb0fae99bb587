//! The packed batch: the seam between the host side (reading, tokenizing, packing) and the model.
//!
//! Sequences are laid end to end in one flat token stream; `cu_seqlens` marks where each begins.
//! No padding anywhere: a pack of sequences of lengths 3, 5, 2 is 10 tokens and
//! `cu_seqlens = [0, 3, 8, 10]`. This is the layout FlashAttention's varlen kernels take, and
//! the CPU path attends within each `[cu_seqlens[i], cu_seqlens[i+1])` segment.

use std::ops::Range;

mod masked;

pub use masked::{masked_copies, MaskedCopies, MaskedCopy};

/// Token sequences laid end to end, with their boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedBatch {
    /// All token ids of all sequences, each sequence `<cls> residues <eos>`.
    pub ids: Vec<u32>,
    /// Cumulative lengths: `batch + 1` entries, starting at 0, ending at `ids.len()`.
    pub cu_seqlens: Vec<u32>,
    /// Length of the longest sequence, in tokens.
    pub max_len: usize,
}

impl PackedBatch {
    /// Pack the given token sequences in the given order.
    pub fn from_sequences<'a>(sequences: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut batch = PackedBatch {
            ids: Vec::new(),
            cu_seqlens: vec![0],
            max_len: 0,
        };
        for seq in sequences {
            batch.push(seq);
        }
        batch
    }

    /// Append one sequence.
    pub fn push(&mut self, tokens: &[u32]) {
        if self.cu_seqlens.is_empty() {
            self.cu_seqlens.push(0);
        }
        self.ids.extend_from_slice(tokens);
        self.cu_seqlens.push(self.ids.len() as u32);
        self.max_len = self.max_len.max(tokens.len());
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Whether the batch holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of tokens (specials included).
    pub fn total_tokens(&self) -> usize {
        self.ids.len()
    }

    /// Token range of sequence `i` in the flat stream.
    pub fn range(&self, i: usize) -> Range<usize> {
        self.cu_seqlens[i] as usize..self.cu_seqlens[i + 1] as usize
    }

    /// Tokens of sequence `i`.
    pub fn tokens(&self, i: usize) -> &[u32] {
        &self.ids[self.range(i)]
    }

    /// Position of every token within its own sequence (0 on `<cls>`), as rotary needs.
    pub fn positions(&self) -> Vec<u32> {
        let mut positions = Vec::with_capacity(self.ids.len());
        for i in 0..self.len() {
            positions.extend(0..self.range(i).len() as u32);
        }
        positions
    }

    /// Residue count of every sequence (tokens minus `<cls>` and `<eos>`).
    pub fn residue_counts(&self) -> Vec<usize> {
        (0..self.len())
            .map(|i| self.range(i).len().saturating_sub(2))
            .collect()
    }
}

/// Group items into packs of at most `budget` tokens by first-fit decreasing: longest first, each
/// into the first pack with room. An item longer than the budget gets a pack of its own. Returns
/// item indices per pack; packs are ordered by their first (longest) item, so similar lengths run
/// together. Deterministic: ties keep input order.
pub fn first_fit_decreasing(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut packs: Vec<Vec<usize>> = Vec::new();
    let mut room: Vec<usize> = Vec::new();
    for i in order {
        let len = lengths[i];
        match room.iter().position(|&r| r >= len) {
            Some(p) => {
                packs[p].push(i);
                room[p] -= len;
            }
            None => {
                packs.push(vec![i]);
                room.push(budget.saturating_sub(len));
            }
        }
    }
    packs
}

/// One pack of [`pack`]: which sequences, and their tokens laid end to end.
#[derive(Debug, Clone)]
pub struct Group {
    /// Indices of the packed sequences, in pack order.
    pub members: Vec<usize>,
    /// Their tokens.
    pub batch: PackedBatch,
}

/// Token lists → packs of at most `budget` tokens ([`first_fit_decreasing`]). The one way every
/// front (job, SQL, bench, the library's `embed`) turns sequences into packs.
pub fn pack<T: AsRef<[u32]>>(sequences: &[T], budget: usize) -> Vec<Group> {
    let lengths: Vec<usize> = sequences.iter().map(|s| s.as_ref().len()).collect();
    first_fit_decreasing(&lengths, budget.max(1))
        .into_iter()
        .map(|members| Group {
            batch: PackedBatch::from_sequences(members.iter().map(|&i| sequences[i].as_ref())),
            members,
        })
        .collect()
}

/// Real tokens over budgeted tokens (`packs × budget`): how much of the compute a fixed budget
/// pays for goes to real tokens.
pub fn packing_efficiency(total_tokens: usize, packs: usize, budget: usize) -> f64 {
    if packs == 0 {
        return 1.0;
    }
    total_tokens as f64 / (packs as f64 * budget as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_and_positions() {
        let batch = PackedBatch::from_sequences([&[0, 5, 2][..], &[0, 4, 4, 4, 2], &[0, 2]]);
        assert_eq!(batch.cu_seqlens, [0, 3, 8, 10]);
        assert_eq!(batch.max_len, 5);
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.tokens(1), [0, 4, 4, 4, 2]);
        assert_eq!(batch.positions(), [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]);
        assert_eq!(batch.residue_counts(), [1, 3, 0]);
    }

    proptest::proptest! {
        #[test]
        fn packs_hold_every_item_once_within_budget(
            lengths in proptest::collection::vec(1usize..3000, 0..400),
            budget in 64usize..5000,
        ) {
            let packs = first_fit_decreasing(&lengths, budget);
            let mut seen: Vec<usize> = packs.concat();
            seen.sort();
            proptest::prop_assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
            for pack in &packs {
                let tokens: usize = pack.iter().map(|&i| lengths[i]).sum();
                proptest::prop_assert!(tokens <= budget || pack.len() == 1, "pack over budget: {tokens}");
                let seqs: Vec<Vec<u32>> = pack.iter().map(|&i| vec![4; lengths[i]]).collect();
                let batch = PackedBatch::from_sequences(seqs.iter().map(Vec::as_slice));
                proptest::prop_assert!(batch.cu_seqlens.windows(2).all(|w| w[0] < w[1]));
                proptest::prop_assert_eq!(*batch.cu_seqlens.last().unwrap() as usize, tokens);
                proptest::prop_assert_eq!(batch.max_len, pack.iter().map(|&i| lengths[i]).max().unwrap());
            }
        }
    }

    #[test]
    fn first_fit_decreasing_fills_gaps() {
        let lengths = [3, 10, 4, 12, 5, 6];
        let packs = first_fit_decreasing(&lengths, 10);
        assert_eq!(packs, vec![vec![3], vec![1], vec![5, 2], vec![4, 0]]);
    }
}
