//! The pre-pass of a job: count every row and find duplicate ids before any model work (and
//! before anything is written), so a job with ambiguous ids fails at once, not at its end.

use std::collections::HashMap;
use std::hash::BuildHasher;

use super::plan::Duplicates;
use crate::error::{Error, Result};
use crate::input::Inputs;

/// Count all rows, and find duplicate ids (`position → first position` of later duplicates).
/// Without `dedupe`, the first duplicate is an error naming both records. Ids are kept as 128-bit
/// hashes: 10 million ids cost ~300 MB, not their text.
pub fn scan_ids(inputs: &Inputs, dedupe: bool) -> Result<(u64, Duplicates)> {
    let mut seen: HashMap<u128, u64> = HashMap::new();
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
            for i in 0..rows.len() {
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
                        }
                        None => {
                            seen.insert(key, position);
                        }
                    }
                }
                position += 1;
            }
        }
    }
    Ok((position, duplicates))
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
        let (rows, dups) = scan_ids(&inputs(&dir, text), true).unwrap();
        assert_eq!(rows, 5);
        assert_eq!(dups, Duplicates::from([(2, 0), (4, 1)]));
        let err = scan_ids(&inputs(&dir, text), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("record 1") && err.contains("record 3"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
