//! Out of memory on the device: split the pack in halves and retry each, down to single
//! sequences. The device pool's workers do this for every front, so `embed`, SQL and bench split
//! the same way; what a sequence that fails alone becomes (an error row, a failed query) is the
//! front's choice.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::pack::PackedBatch;

/// Sequences `range` of the original pack, packed on their own, and what running them gave:
/// `Err` only when a single sequence ran out of memory alone.
#[derive(Debug)]
pub struct Outcome<T> {
    /// Which sequences of the pack.
    pub range: Range<usize>,
    /// Their tokens, packed.
    pub batch: PackedBatch,
    /// What running them gave.
    pub result: std::result::Result<T, Error>,
}

/// Run `run` on `batch`. On out of memory, split it in halves and retry each half, recursively;
/// `on_split` hears of each split first (for a log line). The outcomes cover the pack's sequences
/// in order, each exactly once. Any other error ends the call: the device failed, not the pack.
pub fn run_halving<T>(
    batch: &PackedBatch,
    run: &mut dyn FnMut(&PackedBatch) -> Result<T>,
    on_split: &mut dyn FnMut(&PackedBatch),
) -> Result<Vec<Outcome<T>>> {
    let mut outcomes = Vec::new();
    halve(batch.clone(), 0, run, on_split, &mut outcomes)?;
    Ok(outcomes)
}

fn halve<T>(
    batch: PackedBatch,
    start: usize,
    run: &mut dyn FnMut(&PackedBatch) -> Result<T>,
    on_split: &mut dyn FnMut(&PackedBatch),
    outcomes: &mut Vec<Outcome<T>>,
) -> Result<()> {
    let range = start..start + batch.len();
    match run(&batch) {
        Ok(value) => outcomes.push(Outcome {
            range,
            batch,
            result: Ok(value),
        }),
        Err(e) if e.is_out_of_memory() && batch.len() <= 1 => outcomes.push(Outcome {
            range,
            batch,
            result: Err(e),
        }),
        Err(e) if e.is_out_of_memory() => {
            on_split(&batch);
            let half = batch.len() / 2;
            let left = PackedBatch::from_sequences((0..half).map(|i| batch.tokens(i)));
            let right = PackedBatch::from_sequences((half..batch.len()).map(|i| batch.tokens(i)));
            halve(left, start, run, on_split, outcomes)?;
            halve(right, start + half, run, on_split, outcomes)?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom() -> Error {
        Error::OutOfMemory {
            detail: "a test pack".into(),
        }
    }

    /// Sequences of these lengths (plus BOS/EOS), in one pack.
    fn pack(lengths: &[usize]) -> PackedBatch {
        let seqs: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![5; n + 2]).collect();
        PackedBatch::from_sequences(seqs.iter().map(|s| s.as_slice()))
    }

    #[test]
    fn a_pack_that_fits_runs_once() {
        let batch = pack(&[3, 4, 5]);
        let mut calls = 0;
        let out = run_halving(
            &batch,
            &mut |b| {
                calls += 1;
                Ok(b.len())
            },
            &mut |_| panic!("no split"),
        )
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].range, 0..3);
        assert_eq!(out[0].result.as_ref().unwrap(), &3);
    }

    #[test]
    fn out_of_memory_splits_down_to_the_sequence_that_does_not_fit() {
        // A device that runs out of memory above 40 tokens: the 50-residue sequence fails alone.
        let lengths = [10, 20, 50, 5, 8];
        let batch = pack(&lengths);
        let mut splits = 0;
        let out = run_halving(
            &batch,
            &mut |b| {
                if b.total_tokens() > 40 {
                    Err(oom())
                } else {
                    Ok(b.total_tokens())
                }
            },
            &mut |_| splits += 1,
        )
        .unwrap();
        // Every sequence exactly once, in order, each outcome's batch holding its own tokens.
        let covered: Vec<usize> = out.iter().flat_map(|o| o.range.clone()).collect();
        assert_eq!(covered, vec![0, 1, 2, 3, 4]);
        for o in &out {
            let lens: Vec<usize> = (0..o.batch.len())
                .map(|i| o.batch.tokens(i).len())
                .collect();
            let want: Vec<usize> = lengths[o.range.clone()].iter().map(|n| n + 2).collect();
            assert_eq!(lens, want);
        }
        let failed: Vec<_> = out.iter().filter(|o| o.result.is_err()).collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].range, 2..3);
        assert!(splits >= 2);
        assert!(out
            .iter()
            .all(|o| o.result.is_err() || o.batch.total_tokens() <= 40));
    }

    #[test]
    fn other_errors_end_the_call() {
        let batch = pack(&[3, 4]);
        let err = run_halving::<()>(
            &batch,
            &mut |_| Err(Error::NoDevice("device lost".into())),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("device lost"));
    }
}
