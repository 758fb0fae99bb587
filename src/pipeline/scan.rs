//! The pre-pass of a job: count every row and find duplicate ids before any model work (and
//! before anything is written), so a job with ambiguous ids fails at once, not at its end; and
//! count the rows of each distinct sequence, for reusing results ([`super::reuse`]).

use std::collections::HashMap;
use std::hash::BuildHasher;

use arrow::array::Array;

use super::plan::Duplicates;
use super::reuse::{sequence_key, SequenceCounts};
use crate::error::{Error, Result};
use crate::input::Inputs;
use crate::prepare::InputPolicy;

/// What the pre-pass found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Input rows.
    pub rows: u64,
    /// Later duplicates of ids: `position → first position`.
    pub duplicates: Duplicates,
    /// Rows per distinct sequence among the rows that can be embedded (when asked for).
    pub sequences: Option<SequenceCounts>,
    /// The longest model input (a sequence after truncation, or a window): its tokens and where
    /// it is (`file record N`).
    pub longest: Option<(usize, String)>,
}

/// Count all rows, and find duplicate ids (`position → first position` of later duplicates).
/// Without `dedupe`, the first duplicate is an error naming both records. Ids are kept as 128-bit
/// hashes: 10 million ids cost ~300 MB, not their text. Rows are prepared with `policy`, to find
/// the longest model input and, with `count_sequences`, to count the rows of each distinct
/// sequence (rows the policy rejects, and duplicate ids, are not counted).
pub fn scan(
    inputs: &Inputs,
    dedupe: bool,
    policy: &InputPolicy,
    count_sequences: bool,
) -> Result<Scan> {
    let mut seen: HashMap<u128, u64> = HashMap::new();
    let mut longest: Option<(usize, u64)> = None;
    let mut counts = SequenceCounts::new();
    let mut duplicates = Duplicates::new();
    let hashers = (std::hash::RandomState::new(), std::hash::RandomState::new());
    let has_ids = inputs.has_ids();
    let mut position = 0u64;
    let mut file_starts: Vec<u64> = Vec::new();
    // (input, record) of a global position.
    let locate = |starts: &[u64], position: u64| {
        let file = starts.partition_point(|&s| s <= position) - 1;
        format!(
            "{} record {}",
            inputs.files[file].name(),
            position - starts[file] + 1
        )
    };
    for index in 0..inputs.files.len() {
        file_starts.push(position);
        for batch in inputs.read(index)? {
            let rows = inputs.rows(batch?);
            let problems: std::collections::HashSet<usize> =
                rows.problems.iter().map(|p| p.0).collect();
            for i in 0..rows.len() {
                let mut countable = !problems.contains(&i);
                if let Some(id) = rows.id(i).filter(|_| has_ids) {
                    let key = hash128(&hashers, id);
                    match seen.get(&key) {
                        Some(&first) if !dedupe => {
                            return Err(Error::DuplicateId {
                                id: id.to_string(),
                                first: locate(&file_starts, first),
                                second: locate(&file_starts, position),
                            });
                        }
                        Some(&first) => {
                            duplicates.insert(position, first);
                            countable = false;
                        }
                        None => {
                            seen.insert(key, position);
                        }
                    }
                }
                let sequence = rows.sequences.is_valid(i).then(|| rows.sequences.value(i));
                if let (Some(sequence), true) = (sequence, countable) {
                    if let Ok(prepared) = policy.prepare(sequence) {
                        let tokens = prepared.segments.iter().map(|s| s.1.len()).max();
                        let tokens = tokens.unwrap_or(0);
                        if longest.is_none_or(|(t, _)| tokens > t) {
                            longest = Some((tokens, position));
                        }
                        if count_sequences {
                            *counts.entry(sequence_key(&prepared)).or_default() += 1;
                        }
                    }
                }
                position += 1;
            }
        }
    }
    Ok(Scan {
        rows: position,
        duplicates,
        sequences: count_sequences.then_some(counts),
        longest: longest.map(|(tokens, at)| (tokens, locate(&file_starts, at))),
    })
}

fn hash128(hashers: &(std::hash::RandomState, std::hash::RandomState), id: &str) -> u128 {
    ((hashers.0.hash_one(id) as u128) << 64) | hashers.1.hash_one(id) as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::InputOptions;

    fn inputs(dir: &std::path::Path, text: &str) -> Inputs {
        let path = dir.join("in.fasta");
        std::fs::write(&path, text).unwrap();
        Inputs::open(&[path], InputOptions::default()).unwrap()
    }

    #[test]
    fn duplicates_are_found_or_refused() {
        let dir = std::env::temp_dir().join(format!("esmbed-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = ">a\nMK\n>b\nMKT\n>a\nMV\n>c\nM\n>b\nA\n";
        let policy = InputPolicy {
            tokenizer: Default::default(),
            max_length: 100,
            long: Default::default(),
        };
        let found = scan(&inputs(&dir, text), true, &policy, false).unwrap();
        assert_eq!(found.rows, 5);
        assert_eq!(found.duplicates, Duplicates::from([(2, 0), (4, 1)]));
        assert!(found.sequences.is_none());
        let (tokens, at) = found.longest.unwrap();
        assert_eq!(tokens, 5);
        assert!(at.ends_with("in.fasta record 2"), "{at}");
        let err = scan(&inputs(&dir, text), false, &policy, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("record 1") && err.contains("record 3"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sequences_are_counted_as_the_policy_prepares_them() {
        let dir = std::env::temp_dir().join(format!("esmbed-scan-seq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // c repeats a's id (not counted), d is a's sequence in lowercase with a stop, e is bad.
        let text = ">a\nMKT\n>b\nMV\n>a\nMKT\n>d\nmkt*\n>e\nM1\n>f\nMV\n";
        let policy = InputPolicy {
            tokenizer: Default::default(),
            max_length: 100,
            long: Default::default(),
        };
        let found = scan(&inputs(&dir, text), true, &policy, true).unwrap();
        let mut counts: Vec<u32> = found.sequences.unwrap().into_values().collect();
        counts.sort();
        assert_eq!(counts, [2, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
