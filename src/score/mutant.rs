//! Mutants in ProteinGym / fair-esm syntax: `A23G` (wild-type letter, position, mutant letter),
//! multi-mutants joined by `:` (`A23G:K45R`), positions numbered from `offset` (1 by default:
//! the first residue is position 1).

use std::fmt;

/// One substitution: the residue at `index` (1-based in the sequence, after the offset) from
/// `wt` to `mt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mutation {
    /// 1-based residue index in the wild-type sequence (the token position).
    pub index: usize,
    /// Wild-type letter.
    pub wt: char,
    /// Mutant letter.
    pub mt: char,
}

/// Why a mutant cannot be scored: the reason an error row gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MutantError {
    /// Not `<letter><number><letter>`.
    Syntax(String),
    /// The position is outside the sequence.
    OutOfRange {
        /// The mutation as written.
        mutation: String,
        /// Its position in the input's numbering.
        position: i64,
        /// The positions the sequence covers.
        first: i64,
        /// Last position.
        last: i64,
    },
    /// The wild-type letter does not match the sequence.
    WrongWildType {
        /// The mutation as written.
        mutation: String,
        /// Its position.
        position: i64,
        /// The letter the mutant names.
        named: char,
        /// The sequence's letter there.
        actual: char,
    },
    /// The mutant letter is not one of the 20 standard amino acids.
    NotAnAminoAcid {
        /// The mutation as written.
        mutation: String,
        /// The letter.
        letter: char,
    },
}

impl fmt::Display for MutantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MutantError::Syntax(m) => write!(
                f,
                "mutant {m:?} is not in the form A23G (wild-type letter, position, mutant letter; \
                 several joined by ':')"
            ),
            MutantError::OutOfRange {
                mutation,
                position,
                first,
                last,
            } => write!(
                f,
                "{mutation}: position {position} is outside the sequence (positions {first}..{last}); \
                 check --offset"
            ),
            MutantError::WrongWildType {
                mutation,
                position,
                named,
                actual,
            } => write!(
                f,
                "{mutation}: the wild type has {actual} at position {position}, not {named}; check \
                 the sequence and --offset"
            ),
            MutantError::NotAnAminoAcid { mutation, letter } => write!(
                f,
                "{mutation}: {letter:?} is not one of the 20 standard amino acids"
            ),
        }
    }
}

impl std::error::Error for MutantError {}

/// The 20 standard amino acids, in the column order of per-residue log-probabilities.
pub const STANDARD: &str = "ACDEFGHIKLMNPQRSTVWY";

/// The residue letters of a wild type's tokens (`<cls>` and `<eos>` included): what its mutants
/// are parsed against, so a position beyond a truncated wild type is out of range.
pub fn residues_of(tokens: &[u32]) -> Vec<u8> {
    tokens[1..tokens.len() - 1]
        .iter()
        .map(|&t| crate::tokenize::TOKENS[t as usize].as_bytes()[0])
        .collect()
}

/// Parse `text` against the wild-type `sequence` (residues, uppercase) numbered from `offset`.
pub fn parse(text: &str, sequence: &[u8], offset: i64) -> Result<Vec<Mutation>, MutantError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(MutantError::Syntax(text.to_string()));
    }
    text.split(':')
        .map(|part| parse_one(part.trim(), sequence, offset))
        .collect()
}

fn parse_one(part: &str, sequence: &[u8], offset: i64) -> Result<Mutation, MutantError> {
    let syntax = || MutantError::Syntax(part.to_string());
    let mut chars = part.chars();
    let wt = chars.next().ok_or_else(syntax)?.to_ascii_uppercase();
    let mt = chars.next_back().ok_or_else(syntax)?.to_ascii_uppercase();
    let digits = chars.as_str();
    let numeric = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    if !wt.is_ascii_alphabetic() || !mt.is_ascii_alphabetic() || !numeric {
        return Err(syntax());
    }
    let position: i64 = digits.parse().map_err(|_| syntax())?;
    let (first, last) = (offset, offset + sequence.len() as i64 - 1);
    if position < first || position > last {
        return Err(MutantError::OutOfRange {
            mutation: part.to_string(),
            position,
            first,
            last,
        });
    }
    let index = (position - offset) as usize + 1;
    let actual = sequence[index - 1] as char;
    if actual != wt {
        return Err(MutantError::WrongWildType {
            mutation: part.to_string(),
            position,
            named: wt,
            actual,
        });
    }
    if !STANDARD.contains(mt) {
        return Err(MutantError::NotAnAminoAcid {
            mutation: part.to_string(),
            letter: mt,
        });
    }
    Ok(Mutation { index, wt, mt })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WT: &[u8] = b"MKTAYIAKQR";

    #[test]
    fn singles_and_multiples_with_an_offset() {
        assert_eq!(
            parse("K2R", WT, 1).unwrap(),
            [Mutation {
                index: 2,
                wt: 'K',
                mt: 'R'
            }]
        );
        let m = parse("M5A:R14G", WT, 5).unwrap();
        assert_eq!((m[0].index, m[1].index), (1, 10));
        assert_eq!(parse(" k2r ", WT, 1).unwrap()[0].mt, 'R');
    }

    #[test]
    fn each_problem_is_its_own_error() {
        for bad in ["", "K2", "2R", "KxR", "K2R:", "K-2R"] {
            assert!(
                matches!(parse(bad, WT, 1), Err(MutantError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("R11A", WT, 1),
            Err(MutantError::OutOfRange {
                position: 11,
                last: 10,
                ..
            })
        ));
        let e = parse("A2R", WT, 1).unwrap_err();
        assert!(matches!(
            e,
            MutantError::WrongWildType {
                named: 'A',
                actual: 'K',
                ..
            }
        ));
        assert!(e.to_string().contains("has K at position 2"), "{e}");
        assert!(matches!(
            parse("K2X", WT, 1),
            Err(MutantError::NotAnAminoAcid { letter: 'X', .. })
        ));
    }
}
