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
}

/// Count all rows, and find duplicate ids (`position → first position` of later duplicates).
/// Without `dedupe`, the first duplicate is an error naming both records. Ids are kept as 128-bit
/// hashes: 10 million ids cost ~300 MB, not their text. With `sequences`, also count the rows of
/// each distinct sequence as that policy prepares them (rows it rejects, and duplicate ids, are
/// not counted).
pub fn scan(inputs: &Inputs, dedupe: bool, sequences: Option<&InputPolicy>) -> Result<Scan> {
    let mut seen: HashMap<u128, u64> = HashMap::new();
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
                if let (Some(policy), Some(sequence), true) = (sequences, sequence, countable) {
                    if let Ok(prepared) = policy.prepare(sequence) {
                        *counts.entry(sequence_key(&prepared)).or_default() += 1;
                    }
                }
                position += 1;
            }
        }
    }
    Ok(Scan {
        rows: position,
        duplicates,
        sequences: sequences.map(|_| counts),
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
        let found = scan(&inputs(&dir, text), true, None).unwrap();
        assert_eq!(found.rows, 5);
        assert_eq!(found.duplicates, Duplicates::from([(2, 0), (4, 1)]));
        let err = scan(&inputs(&dir, text), false, None)
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
        let found = scan(&inputs(&dir, text), true, Some(&policy)).unwrap();
        let mut counts: Vec<u32> = found.sequences.unwrap().into_values().collect();
        counts.sort();
        assert_eq!(counts, [2, 2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
