//! FASTA records as Arrow batches (`id`, `description`, `sequence`), streaming, plain or gzip.
//!
//! Parsing is noodles-fasta's (wrapped lines, CRLF and blank lines within a record are handled
//! there); esmbed adds what a job needs on top: gzip detection by magic bytes (not by name), a
//! clear error for a file that is not FASTA at all, and per-record problems (an empty header)
//! that become error rows instead of stopping the job.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use noodles_fasta::record::Definition;

use super::SourceBatch;

/// The schema of a FASTA source.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("description", DataType::Utf8, true),
        Field::new("sequence", DataType::Utf8, false),
    ]))
}

/// Wrap `reader` in a gzip decoder if it starts with the gzip magic bytes.
pub fn maybe_gunzip<'a>(
    reader: impl Read + Send + 'a,
) -> std::io::Result<Box<dyn BufRead + Send + 'a>> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::bufread::MultiGzDecoder::new(reader),
        )))
    } else {
        Ok(Box::new(reader))
    }
}

/// Streams a FASTA file as record batches.
pub struct FastaBatches<'a> {
    reader: noodles_fasta::io::Reader<Box<dyn BufRead + Send + 'a>>,
    name: String,
    batch_rows: usize,
    record: usize,
    started: bool,
    done: bool,
}

impl<'a> FastaBatches<'a> {
    /// Read from `reader` (plain or gzip), naming the input `name` in errors.
    pub fn new(
        reader: impl Read + Send + 'a,
        name: &str,
        batch_rows: usize,
    ) -> crate::Result<Self> {
        let reader = maybe_gunzip(reader).map_err(|e| crate::Error::io(name, e))?;
        Ok(Self {
            reader: noodles_fasta::io::Reader::new(reader),
            name: name.to_string(),
            batch_rows: batch_rows.max(1),
            record: 0,
            started: false,
            done: false,
        })
    }

    /// Check that the input starts (after blank lines) with `>`.
    fn check_start(&mut self) -> crate::Result<bool> {
        let inner = self.reader.get_mut();
        loop {
            let buf = inner
                .fill_buf()
                .map_err(|e| crate::Error::io(&self.name, e))?;
            let Some(&first) = buf.first() else {
                return Ok(false); // empty input
            };
            if first.is_ascii_whitespace() {
                inner.consume(1);
                continue;
            }
            if first == b'>' {
                return Ok(true);
            }
            let what = if first.is_ascii_graphic() {
                format!("'{}'", first as char)
            } else {
                format!("byte 0x{first:02x}")
            };
            return Err(crate::Error::BadInput {
                input: self.name.clone(),
                reason: format!(
                    "not a FASTA file: it starts with {what}, a FASTA file starts with '>' (a header line). \
                     Is it Parquet or another format? Pass --format, or check the file"
                ),
            });
        }
    }

    fn next_batch(&mut self) -> crate::Result<Option<SourceBatch>> {
        if !self.started {
            self.started = true;
            if !self.check_start()? {
                self.done = true;
                return Ok(None);
            }
        }
        if self.done {
            return Ok(None);
        }
        let mut ids = StringBuilder::new();
        let mut descriptions = StringBuilder::new();
        let mut sequences = StringBuilder::new();
        let mut problems = Vec::new();
        let mut definition = Definition::default();
        let mut sequence = Vec::new();
        let mut rows = 0;
        while rows < self.batch_rows {
            let header = self.reader.read_definition(&mut definition);
            let header_problem = match header {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(_) => None,
                // noodles rejects an empty name; the line is consumed, so the record's sequence
                // can still be read and the record reported as an error row.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Some(format!(
                    "invalid header ({e}): a header is '>' followed by an id; give this record an id"
                )),
                Err(e) => return Err(crate::Error::io(&self.name, e)),
            };
            sequence.clear();
            self.reader
                .read_sequence(&mut sequence)
                .map_err(|e| crate::Error::io(&self.name, e))?;
            self.record += 1;
            match header_problem {
                None => {
                    ids.append_value(String::from_utf8_lossy(definition.name()));
                    match definition.description() {
                        Some(d) => descriptions.append_value(String::from_utf8_lossy(d)),
                        None => descriptions.append_null(),
                    }
                }
                Some(problem) => {
                    ids.append_value("");
                    descriptions.append_null();
                    problems.push((rows, problem));
                }
            }
            if sequence.is_empty() && problems.last().map(|p| p.0) != Some(rows) {
                problems.push((
                    rows,
                    "header with no sequence: the record has no residue lines".to_string(),
                ));
            }
            sequences.append_value(String::from_utf8_lossy(&sequence));
            rows += 1;
        }
        if rows == 0 {
            return Ok(None);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ids.finish()),
            Arc::new(descriptions.finish()),
            Arc::new(sequences.finish()),
        ];
        let batch = RecordBatch::try_new(schema(), columns).expect("columns match the schema");
        Ok(Some(SourceBatch { batch, problems }))
    }
}

impl Iterator for FastaBatches<'_> {
    type Item = crate::Result<SourceBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_batch() {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};

    fn read(data: &[u8]) -> crate::Result<Vec<SourceBatch>> {
        FastaBatches::new(data, "test.fa", 2)?.collect()
    }

    fn column(batches: &[SourceBatch], name: &str) -> Vec<Option<String>> {
        batches
            .iter()
            .flat_map(|b| {
                let col = b
                    .batch
                    .column_by_name(name)
                    .unwrap()
                    .as_string::<i32>()
                    .clone();
                (0..col.len())
                    .map(|i| col.is_valid(i).then(|| col.value(i).to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn wrapped_crlf_and_blank_lines_read_like_a_clean_file() {
        let clean = read(b">a desc one\nMKTV\n>b\nACDE\n>c\nGG\n").unwrap();
        let messy = read(b"\n\r\n>a desc one\r\nMK\r\nTV\r\n\r\n>b\nAC\n\nDE\n>c\nG\nG").unwrap();
        for name in ["id", "description", "sequence"] {
            assert_eq!(column(&clean, name), column(&messy, name), "{name}");
        }
        assert_eq!(
            column(&clean, "id"),
            [Some("a".into()), Some("b".into()), Some("c".into())]
        );
        assert_eq!(
            column(&clean, "description")[..2],
            [Some("desc one".into()), None]
        );
        assert_eq!(clean.len(), 2, "batches of 2 rows");
    }

    #[test]
    fn gzip_is_detected_by_content() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b">a\nMKTV\n").unwrap();
        let bytes = gz.finish().unwrap();
        let batches = read(&bytes).unwrap();
        assert_eq!(column(&batches, "sequence"), [Some("MKTV".into())]);
    }

    #[test]
    fn not_fasta_is_a_clear_error() {
        let err = read(b"PAR1\x00\x01binary").unwrap_err().to_string();
        assert!(
            err.contains("test.fa") && err.contains("not a FASTA file"),
            "{err}"
        );
        assert!(err.contains("'P'"), "{err}");
        let err = read(b"\x89PNG").unwrap_err().to_string();
        assert!(err.contains("0x89"), "{err}");
    }

    #[test]
    fn empty_input_has_no_batches() {
        assert!(read(b"").unwrap().is_empty());
        assert!(read(b"\n\n").unwrap().is_empty());
    }

    #[test]
    fn record_problems_become_error_rows() {
        let batches = read(b">\nMKTV\n>nohit\n>ok\nAA\n").unwrap();
        let problems: Vec<_> = batches.iter().flat_map(|b| b.problems.clone()).collect();
        assert_eq!(problems.len(), 2);
        assert!(
            problems[0].1.contains("invalid header"),
            "{:?}",
            problems[0]
        );
        assert!(problems[1].1.contains("no sequence"), "{:?}", problems[1]);
        assert_eq!(column(&batches, "id")[2], Some("ok".into()));
    }
}
