//! The ESM alphabet and the input policy that turns user text into token ids.
//!
//! Ids are exactly fair-esm's (`esm/data.py`, `Alphabet.from_architecture("ESM-1b")`): a sequence
//! becomes `<cls> residues <eos>`, one token per character. Tokenization is character by character,
//! so the text `<mask>` inside a sequence is data (and an error), never a special token.
//!
//! Policy, chosen for users rather than copied from either reference (fair-esm raises on lowercase,
//! HF maps unknowns to `<unk>` and silently collapses runs of them):
//! - lowercase letters are uppercased;
//! - ASCII whitespace (line breaks of wrapped text included) is dropped;
//! - one trailing `*` (a stop codon in translated sequences) is stripped;
//! - anything else outside the 25 residue letters is an error naming the character and its
//!   position, unless [`UnknownResidue`] says to map it to `X` or `<unk>`.
//!
//! Gap characters `-` and `.` are alphabet tokens, but an embedding of an aligned row is not what a
//! user wants, so they are treated like any other foreign character.

use std::fmt;

/// `<cls>`, the first token of every sequence.
pub const CLS: u32 = 0;
/// `<pad>`; esmbed never pads, but the id is part of the alphabet.
pub const PAD: u32 = 1;
/// `<eos>`, the last token of every sequence.
pub const EOS: u32 = 2;
/// `<unk>`.
pub const UNK: u32 = 3;
/// `X`, the "any residue" letter.
pub const X: u32 = 24;
/// `|`, ESM C's chain break (ESM-2's `<null_1>`, never produced for it).
pub const CHAIN_BREAK: u32 = 31;
/// `<mask>`: its embedding row is zeroed and it counts in the token-dropout rescale.
pub const MASK: u32 = 32;
/// Size of the ESM-2 vocabulary.
pub const VOCAB_SIZE: usize = 33;

/// The 33 tokens in id order.
pub const TOKENS: [&str; VOCAB_SIZE] = [
    "<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K",
    "Q", "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>",
    "<mask>",
];

/// Residue letter (uppercase ASCII) → token id, or 0 where the byte is not a residue letter.
const RESIDUE_IDS: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut id = 4;
    while id <= 28 {
        let letter = TOKENS[id].as_bytes()[0];
        table[letter as usize] = id as u8;
        id += 1;
    }
    table
};

/// The token of a residue letter (either case), `None` for anything else.
pub fn residue_token(c: char) -> Option<u32> {
    let upper = c.to_ascii_uppercase();
    let id = if upper.is_ascii() {
        RESIDUE_IDS[upper as usize]
    } else {
        0
    };
    (id != 0).then_some(id as u32)
}

/// What to do with a character that is not a residue letter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownResidue {
    /// Reject the sequence with an error naming the character and its position (the default).
    #[default]
    Error,
    /// Map it to `X` (any amino acid), the usual choice for ambiguous residues such as `J`.
    MapToX,
    /// Map it to `<unk>`, as HF's tokenizer does (without collapsing runs).
    MapToUnk,
}

/// A sequence could not be tokenized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizeError {
    /// A character outside the ESM alphabet.
    #[error("invalid residue {} at position {position}: {hint}", describe(*character))]
    InvalidResidue {
        /// The character at fault.
        character: char,
        /// Its 1-based position among the characters of the sequence as given.
        position: usize,
        /// What the user can do about it.
        hint: &'static str,
    },
    /// Nothing is left once whitespace and the trailing `*` are removed.
    #[error("empty sequence: no residues (remove the record, or check the input column)")]
    Empty,
}

fn describe(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("'{c}'")
    } else {
        format!("{:?} (U+{:04X})", c, c as u32)
    }
}

fn hint_for(c: char) -> &'static str {
    match c {
        '-' | '.' => "gap characters are not residues; embed unaligned sequences (delete gaps)",
        '|' => "'|' is ESM C's chain break; ESM-2 has none: embed the chains one by one, or use an ESM C model",
        '*' => {
            "'*' (stop) is only allowed as the last character; split the sequence at internal stops"
        }
        '<' | '>' => {
            "special tokens such as <mask> are not parsed from text; pass token ids to mask"
        }
        c if c.is_ascii_digit() => "digits are not residues; is this a sequence column?",
        c if c.is_ascii_alphabetic() => {
            "not an amino-acid letter; map unknown letters to X with --unknown x"
        }
        _ => "not an amino-acid letter; check the file's encoding, or map to X with --unknown x",
    }
}

/// Turns protein text into ESM token ids under a fixed [`UnknownResidue`] policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tokenizer {
    /// What to do with characters outside the alphabet.
    pub unknown: UnknownResidue,
    /// Whether `|` is a chain break ([`CHAIN_BREAK`], ESM C) rather than a foreign character.
    pub chain_breaks: bool,
}

impl Tokenizer {
    /// An ESM-2 tokenizer with the given policy for unknown characters.
    pub fn new(unknown: UnknownResidue) -> Self {
        Self {
            unknown,
            chain_breaks: false,
        }
    }

    /// The tokenizer of a model family: ESM C reads `|` as its chain break.
    pub fn for_family(family: crate::model::Family, unknown: UnknownResidue) -> Self {
        Self {
            unknown,
            chain_breaks: family == crate::model::Family::Esmc,
        }
    }

    /// Tokenize into `[<cls>] residues [<eos>]`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = Vec::with_capacity(text.len() + 2);
        ids.push(CLS);
        self.encode_residues_into(text, &mut ids)?;
        ids.push(EOS);
        Ok(ids)
    }

    /// Keep the first `max_residues` residues of an encoded sequence (and its `<eos>`), as
    /// fair-esm truncates; shorter sequences are left as they are.
    pub fn truncate(tokens: &mut Vec<u32>, max_residues: usize) {
        if tokens.len() > max_residues + 2 {
            tokens.truncate(max_residues + 1);
            tokens.push(EOS);
        }
    }

    /// Append the residue ids of `text` (no `<cls>`/`<eos>`) to `out`.
    pub fn encode_residues_into(
        &self,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        let start = out.len();
        let body = strip_trailing_stop(text);
        for (index, c) in body.chars().enumerate() {
            if c.is_ascii_whitespace() {
                continue;
            }
            let id = match c {
                '|' if self.chain_breaks => CHAIN_BREAK,
                c => residue_token(c).unwrap_or(0),
            };
            let id = match (id, self.unknown) {
                (0, UnknownResidue::Error) => {
                    out.truncate(start);
                    return Err(TokenizeError::InvalidResidue {
                        character: c,
                        position: index + 1,
                        hint: hint_for(c),
                    });
                }
                (0, UnknownResidue::MapToX) => X,
                (0, UnknownResidue::MapToUnk) => UNK,
                (id, _) => id,
            };
            out.push(id);
        }
        if out.len() == start {
            return Err(TokenizeError::Empty);
        }
        Ok(())
    }

    /// Number of residues `text` tokenizes to (whitespace and one trailing `*` excluded), without
    /// validating the characters.
    pub fn residue_count(text: &str) -> usize {
        strip_trailing_stop(text)
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .count()
    }
}

/// Strip trailing whitespace, then one `*`.
fn strip_trailing_stop(text: &str) -> &str {
    let trimmed = text.trim_end_matches(|c: char| c.is_ascii_whitespace());
    trimmed.strip_suffix('*').unwrap_or(text)
}

/// Human-readable tokens for ids (for debugging and error messages).
pub struct Decoded<'a>(pub &'a [u32]);

impl fmt::Display for Decoded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &id in self.0 {
            f.write_str(TOKENS.get(id as usize).copied().unwrap_or("<?>"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(text: &str) -> Result<Vec<u32>, TokenizeError> {
        Tokenizer::default().encode(text)
    }

    #[test]
    fn documented_example() {
        assert_eq!(encode("MKTVRQG").unwrap(), [0, 20, 15, 11, 7, 10, 16, 6, 2]);
    }

    #[test]
    fn every_residue_letter_has_its_fair_esm_id() {
        let letters = "LAGVSERTIDPKQNFYMHWCXBUZO";
        let ids = encode(letters).unwrap();
        assert_eq!(ids[1..ids.len() - 1], (4..=28).collect::<Vec<u32>>()[..]);
        assert_eq!(Decoded(&ids).to_string(), format!("<cls>{letters}<eos>"));
    }

    #[test]
    fn lowercase_whitespace_and_trailing_stop() {
        let clean = encode("MKTVRQG").unwrap();
        assert_eq!(encode("mktVrqg").unwrap(), clean);
        assert_eq!(encode("MKT\nVRQ G\r\n").unwrap(), clean);
        assert_eq!(encode("MKTVRQG*").unwrap(), clean);
        assert_eq!(encode("MKTVRQG*\n").unwrap(), clean);
    }

    #[test]
    fn internal_stop_and_double_stop_are_errors() {
        let err = encode("MK*TV").unwrap_err();
        assert!(matches!(
            err,
            TokenizeError::InvalidResidue {
                character: '*',
                position: 3,
                ..
            }
        ));
        assert!(encode("MKTV**").is_err());
    }

    #[test]
    fn errors_name_character_and_position() {
        let err = encode("MKJ").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'J'") && msg.contains("position 3"), "{msg}");
        let err = encode("MA-G").unwrap_err();
        assert!(err.to_string().contains("gap"), "{err}");
        let err = encode("M<mask>").unwrap_err();
        assert!(err.to_string().contains("position 2"), "{err}");
        let err = encode("MAé").unwrap_err();
        assert!(err.to_string().contains("U+00E9"), "{err}");
        let err = encode("MA1").unwrap_err();
        assert!(err.to_string().contains("digits"), "{err}");
    }

    #[test]
    fn empty_sequences_are_errors() {
        assert_eq!(encode(""), Err(TokenizeError::Empty));
        assert_eq!(encode(" \n*"), Err(TokenizeError::Empty));
    }

    #[test]
    fn unknown_policies_map_instead_of_failing() {
        let x = Tokenizer::new(UnknownResidue::MapToX)
            .encode("MJJ")
            .unwrap();
        assert_eq!(x, [CLS, 20, X, X, EOS]);
        let unk = Tokenizer::new(UnknownResidue::MapToUnk)
            .encode("MJJ")
            .unwrap();
        assert_eq!(unk, [CLS, 20, UNK, UNK, EOS]);
    }

    #[test]
    fn residue_count_matches_encoding() {
        for text in ["MKTVRQG", "mk tv\n*", "A", "AC*"] {
            assert_eq!(
                Tokenizer::residue_count(text) + 2,
                encode(text).unwrap().len()
            );
        }
    }
}
