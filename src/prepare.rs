//! The input policy: a sequence's text → the token lists the model sees. One policy object for
//! every front, so `esmbed embed` and SQL's `esm_embed` treat unknown letters (`--unknown`) and
//! sequences beyond `--max-length` (`--long`) the same way.

use crate::tokenize::{Tokenizer, CLS, EOS};

/// What to do with sequences longer than `--max-length` residues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LongPolicy {
    /// Keep the first `max_length` residues (and `<eos>`), mark the row `truncated` (fair-esm).
    #[default]
    Truncate,
    /// Put the row in the errors output.
    Error,
    /// Embed overlapping windows of `max_length` residues (stride half a window) and average each
    /// residue over the windows that cover it. A heuristic: ESM-2 never saw such sequences whole.
    Window,
}

/// Why a row is in the errors output, in a word: the errors file's `problem` column (to count
/// or filter by) and `--dry-run`'s tally. The `reason` beside it says what exactly, and the fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// The reader could not make a row of the record.
    Unreadable,
    /// The sequence is null.
    NullSequence,
    /// A character outside the alphabet (see `--unknown`).
    InvalidResidue,
    /// No residues.
    EmptySequence,
    /// Longer than `--max-length` under `--long error`.
    TooLong,
    /// An id seen before, under `--dedupe`.
    DuplicateId,
    /// Did not fit on any device even alone.
    OutOfMemory,
    /// A mutant that cannot be scored (`esmbed score --mutants`): malformed, out of range, a
    /// wild-type letter that does not match, not an amino acid.
    BadMutant,
}

impl Problem {
    /// The name in the errors file.
    pub fn name(self) -> &'static str {
        match self {
            Problem::Unreadable => "unreadable",
            Problem::NullSequence => "null_sequence",
            Problem::InvalidResidue => "invalid_residue",
            Problem::EmptySequence => "empty_sequence",
            Problem::TooLong => "too_long",
            Problem::DuplicateId => "duplicate_id",
            Problem::OutOfMemory => "out_of_memory",
            Problem::BadMutant => "bad_mutant",
        }
    }
}

/// A row the policy cannot embed: what kind of problem, and the reason for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The kind.
    pub problem: Problem,
    /// What is wrong and what to do.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// How text becomes model inputs.
#[derive(Debug, Clone, Copy)]
pub struct InputPolicy {
    /// The alphabet and the policy for unknown letters.
    pub tokenizer: Tokenizer,
    /// Longest sequence embedded whole, in residues.
    pub max_length: usize,
    /// Policy beyond `max_length`.
    pub long: LongPolicy,
}

/// A sequence ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Residues of the input sequence.
    pub length: usize,
    /// Residues actually embedded (after truncation).
    pub embedded: usize,
    /// Whether it was cut to `max_length`.
    pub truncated: bool,
    /// The model inputs: `(first residue, tokens)`; one for a whole sequence, several windows
    /// for a long one under [`LongPolicy::Window`].
    pub segments: Vec<(usize, Vec<u32>)>,
}

impl InputPolicy {
    /// The policy for scores: the same, except that `--long window` truncates (a score is of
    /// one sequence; windows would be other sequences).
    pub fn for_scores(self) -> Self {
        Self {
            long: match self.long {
                LongPolicy::Window => LongPolicy::Truncate,
                other => other,
            },
            ..self
        }
    }

    /// Tokenize `sequence` and apply the length policy. `Err` is why the row cannot be
    /// embedded (a character outside the alphabet, an empty sequence, too long under `--long
    /// error`).
    pub fn prepare(&self, sequence: &str) -> Result<Prepared, Rejection> {
        let mut tokens = self.tokenizer.encode(sequence).map_err(|e| Rejection {
            problem: match e {
                crate::tokenize::TokenizeError::InvalidResidue { .. } => Problem::InvalidResidue,
                crate::tokenize::TokenizeError::Empty => Problem::EmptySequence,
            },
            reason: e.to_string(),
        })?;
        let length = tokens.len() - 2;
        let max = self.max_length;
        let whole = |tokens, embedded, truncated| Prepared {
            length,
            embedded,
            truncated,
            segments: vec![(0, tokens)],
        };
        if length <= max {
            return Ok(whole(tokens, length, false));
        }
        match self.long {
            LongPolicy::Truncate => {
                Tokenizer::truncate(&mut tokens, max);
                Ok(whole(tokens, max, true))
            }
            LongPolicy::Error => Err(Rejection {
                problem: Problem::TooLong,
                reason: format!(
                    "sequence has {length} residues, more than --max-length {max}; use --long \
                     truncate (first {max} residues) or --long window, or raise --max-length"
                ),
            }),
            LongPolicy::Window => {
                let residues = &tokens[1..=length];
                let segments = window_starts(length, max)
                    .into_iter()
                    .map(|start| {
                        let mut window = Vec::with_capacity(max + 2);
                        window.push(CLS);
                        window.extend_from_slice(&residues[start..start + max]);
                        window.push(EOS);
                        (start, window)
                    })
                    .collect();
                Ok(Prepared {
                    length,
                    embedded: length,
                    truncated: false,
                    segments,
                })
            }
        }
    }
}

/// Window starts covering `length` residues with windows of `window` residues, stride half a
/// window; the last window ends at the last residue.
pub fn window_starts(length: usize, window: usize) -> Vec<usize> {
    let stride = (window / 2).max(1);
    let mut starts = Vec::new();
    let mut start = 0;
    while start + window < length {
        starts.push(start);
        start += stride;
    }
    starts.push(length.saturating_sub(window));
    starts
}

/// Per-residue sums of the windows of one long sequence, for one layer: each residue's vector
/// is the average over the windows that cover it.
#[derive(Debug, Clone)]
pub struct WindowSums {
    hidden: usize,
    sums: Vec<f32>,
    counts: Vec<u32>,
}

impl WindowSums {
    /// Sums for a sequence of `length` residues of width `hidden`.
    pub fn new(length: usize, hidden: usize) -> Self {
        Self {
            hidden,
            sums: vec![0.0; length * hidden],
            counts: vec![0; length],
        }
    }

    /// Add a window's residue vectors (`[n × H]`), starting at residue `offset`.
    pub fn add(&mut self, offset: usize, residues: &[f32]) {
        let h = self.hidden;
        let n = residues.len() / h;
        for (s, r) in self.sums[offset * h..(offset + n) * h]
            .iter_mut()
            .zip(residues)
        {
            *s += r;
        }
        for c in &mut self.counts[offset..offset + n] {
            *c += 1;
        }
    }

    /// The averaged residue vectors (`[L × H]`) and their mean (`[H]`).
    pub fn finish(mut self) -> (Vec<f32>, Vec<f32>) {
        let h = self.hidden;
        let length = self.counts.len();
        let mut mean = vec![0f32; h];
        for (r, &c) in self.counts.iter().enumerate() {
            let inv = 1.0 / c.max(1) as f32;
            let row = &mut self.sums[r * h..(r + 1) * h];
            for (v, m) in row.iter_mut().zip(&mut mean) {
                *v *= inv;
                *m += *v;
            }
        }
        for m in &mut mean {
            *m /= length.max(1) as f32;
        }
        (self.sums, mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::UnknownResidue;

    fn policy(long: LongPolicy) -> InputPolicy {
        InputPolicy {
            tokenizer: Tokenizer::new(UnknownResidue::Error),
            max_length: 4,
            long,
        }
    }

    #[test]
    fn long_sequences_follow_the_policy() {
        let p = policy(LongPolicy::Truncate).prepare("ACDEFG").unwrap();
        assert_eq!((p.length, p.embedded, p.truncated), (6, 4, true));
        assert_eq!(p.segments[0].1.len(), 6);
        let e = policy(LongPolicy::Error).prepare("ACDEFG").unwrap_err();
        assert!(e.reason.contains("--max-length 4"), "{e}");
        assert_eq!(e.problem, Problem::TooLong);
        let w = policy(LongPolicy::Window).prepare("ACDEFG").unwrap();
        let starts: Vec<usize> = w.segments.iter().map(|s| s.0).collect();
        assert_eq!(starts, vec![0, 2]);
        assert!(
            policy(LongPolicy::Window)
                .prepare("AC")
                .unwrap()
                .segments
                .len()
                == 1
        );
        let e = policy(LongPolicy::Truncate).prepare("AC1").unwrap_err();
        assert_eq!(e.problem, Problem::InvalidResidue);
        let e = policy(LongPolicy::Truncate).prepare(" *").unwrap_err();
        assert_eq!(e.problem, Problem::EmptySequence);
    }

    #[test]
    fn window_starts_cover_the_sequence() {
        assert_eq!(window_starts(10, 6), [0, 3, 4]);
        assert_eq!(window_starts(12, 6), [0, 3, 6]);
        assert_eq!(window_starts(7, 6), [0, 1]);
        for length in 7..60 {
            let starts = window_starts(length, 6);
            let mut covered = vec![false; length];
            for s in &starts {
                covered[*s..s + 6].iter_mut().for_each(|c| *c = true);
            }
            assert!(covered.iter().all(|&c| c), "{length}");
        }
    }

    #[test]
    fn windows_average_per_residue() {
        // Three residues of width 1; windows [0, 1] and [1, 2].
        let mut w = WindowSums::new(3, 1);
        w.add(0, &[1.0, 2.0]);
        w.add(1, &[4.0, 6.0]);
        let (residues, mean) = w.finish();
        assert_eq!(residues, vec![1.0, 3.0, 6.0]);
        assert_eq!(mean, vec![10.0 / 3.0]);
    }
}
