//! Masked copies of sequences, streamed a pack at a time: copy `(s, k)` is sequence `s` with
//! token `k` replaced by `<mask>`. A pseudo-log-likelihood of an L-residue sequence is L copies
//! of one length, so they pack perfectly; they are made pack by pack, never all at once (a
//! 15,000-residue sequence is 15,000 copies of 15,002 tokens). An embedding job that also scores
//! its rows (`embed --pll`) puts each sequence itself in the stream before its copies, so the
//! embedding forwards share packs with the copies.

use std::borrow::Borrow;

use super::PackedBatch;
use crate::tokenize::MASK;

/// One sequence of a pack of copies: which input sequence, and which token is masked (`None`:
/// the sequence itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskedCopy {
    /// Index of the input sequence.
    pub sequence: usize,
    /// The masked token position.
    pub masked: Option<usize>,
}

/// The stream of [`masked_copies`]: packs of at most `budget` tokens (one copy alone when it is
/// longer), next-fit in the order given, with which copy each sequence of the pack is.
pub struct MaskedCopies<T> {
    tokens: T,
    /// Per sequence, the token positions to mask.
    positions: Vec<Vec<usize>>,
    /// Whether each sequence comes unmasked first.
    originals: bool,
    budget: usize,
    /// (sequence, slot): slot 0 is the original when `originals`, then the positions.
    next: (usize, usize),
}

/// Masked copies of `tokens` (each with `<cls>` and `<eos>`), masking `positions[s]` of sequence
/// `s` one at a time, each sequence preceded by itself unmasked when `originals` is set.
pub fn masked_copies<T: Borrow<[Vec<u32>]>>(
    tokens: T,
    positions: Vec<Vec<usize>>,
    budget: usize,
    originals: bool,
) -> MaskedCopies<T> {
    let mut copies = MaskedCopies {
        tokens,
        positions,
        originals,
        budget: budget.max(1),
        next: (0, 0),
    };
    copies.skip_empty();
    copies
}

impl<T: Borrow<[Vec<u32>]>> MaskedCopies<T> {
    fn slots(&self, sequence: usize) -> usize {
        self.positions
            .get(sequence)
            .map_or(0, |p| p.len() + usize::from(self.originals))
    }

    /// Move past sequences with nothing to run.
    fn skip_empty(&mut self) {
        while self.next.0 < self.positions.len() && self.next.1 >= self.slots(self.next.0) {
            self.next = (self.next.0 + 1, 0);
        }
    }

    /// The copy at `next`, and its tokens.
    fn current(&self) -> (MaskedCopy, Vec<u32>) {
        let (s, slot) = self.next;
        let masked = match (self.originals, slot) {
            (true, 0) => None,
            (true, j) => Some(self.positions[s][j - 1]),
            (false, j) => Some(self.positions[s][j]),
        };
        let mut tokens = self.tokens.borrow()[s].clone();
        if let Some(k) = masked {
            tokens[k] = MASK;
        }
        let copy = MaskedCopy {
            sequence: s,
            masked,
        };
        (copy, tokens)
    }
}

impl<T: Borrow<[Vec<u32>]>> Iterator for MaskedCopies<T> {
    type Item = (PackedBatch, Vec<MaskedCopy>);

    fn next(&mut self) -> Option<Self::Item> {
        let mut batch = PackedBatch::default();
        let mut which = Vec::new();
        while self.next.0 < self.positions.len() {
            let len = self.tokens.borrow()[self.next.0].len();
            if !which.is_empty() && batch.total_tokens() + len > self.budget {
                break;
            }
            let (copy, tokens) = self.current();
            batch.push(&tokens);
            which.push(copy);
            self.next.1 += 1;
            self.skip_empty();
        }
        (!which.is_empty()).then_some((batch, which))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<Vec<u32>> {
        vec![
            vec![0, 5, 6, 7, 2],
            vec![0, 8, 2],
            vec![0, 9, 9, 9, 9, 9, 2],
        ]
    }

    fn all_positions(tokens: &[Vec<u32>]) -> Vec<Vec<usize>> {
        tokens.iter().map(|t| (1..t.len() - 1).collect()).collect()
    }

    #[test]
    fn copies_mask_one_position_each_and_respect_the_budget() {
        let tokens = tokens();
        let packs: Vec<_> = masked_copies(&tokens[..], all_positions(&tokens), 12, false).collect();
        let all: Vec<MaskedCopy> = packs.iter().flat_map(|p| p.1.clone()).collect();
        assert_eq!(all.len(), 3 + 1 + 5);
        assert_eq!(
            all[0],
            MaskedCopy {
                sequence: 0,
                masked: Some(1)
            }
        );
        assert_eq!(
            all[3],
            MaskedCopy {
                sequence: 1,
                masked: Some(1)
            }
        );
        for (batch, which) in &packs {
            assert!(batch.total_tokens() <= 12 || which.len() == 1);
            for (i, copy) in which.iter().enumerate() {
                let t = batch.tokens(i);
                assert_eq!(t[copy.masked.unwrap()], MASK);
                assert_eq!(t.iter().filter(|&&t| t == MASK).count(), 1);
                assert_eq!(t.len(), tokens[copy.sequence].len());
            }
        }
        // Sequences with nothing to mask are skipped.
        let packs: Vec<_> =
            masked_copies(&tokens[..], vec![vec![], vec![1], vec![]], 100, false).collect();
        assert_eq!(packs.len(), 1);
        assert_eq!(
            packs[0].1,
            [MaskedCopy {
                sequence: 1,
                masked: Some(1)
            }]
        );
    }

    #[test]
    fn originals_come_first_and_unmasked() {
        let tokens = tokens();
        let packs: Vec<_> =
            masked_copies(tokens.clone(), all_positions(&tokens), 1000, true).collect();
        assert_eq!(packs.len(), 1);
        let (batch, which) = &packs[0];
        assert_eq!(which.len(), (1 + 3) + (1 + 1) + (1 + 5));
        assert_eq!(
            which[0],
            MaskedCopy {
                sequence: 0,
                masked: None
            }
        );
        assert_eq!(batch.tokens(0), tokens[0]);
        assert_eq!(
            which[4],
            MaskedCopy {
                sequence: 1,
                masked: None
            }
        );
        assert_eq!(
            which[6],
            MaskedCopy {
                sequence: 2,
                masked: None
            }
        );
        assert!(!batch.tokens(6).contains(&MASK));
    }
}
