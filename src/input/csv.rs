//! CSV and TSV files (plain or gzip) as Arrow batches: a deep mutational scan's mutants
//! (ProteinGym ships them as CSV), or any table with a sequence column. The first line is the
//! header; column types are inferred from the whole file (numbers stay numbers), so a value late
//! in the file never fails the read.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_csv::reader::Format;

use super::{InputFile, SourceBatch};
use crate::error::{Error, Result};

/// Tab for `.tsv` / `.tab` names, else comma.
fn delimiter(name: &str) -> u8 {
    let name = name.to_ascii_lowercase();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    if stem.ends_with(".tsv") || stem.ends_with(".tab") {
        b'\t'
    } else {
        b','
    }
}

fn format(name: &str) -> Format {
    Format::default()
        .with_header(true)
        .with_delimiter(delimiter(name))
}

fn reader(input: &InputFile) -> Result<Box<dyn std::io::BufRead + Send>> {
    super::fasta::maybe_gunzip(input.open()?).map_err(|e| Error::io(input.name(), e))
}

fn bad(input: &InputFile, e: impl std::fmt::Display) -> Error {
    Error::BadInput {
        input: input.name(),
        reason: format!("not a readable CSV/TSV file with a header line: {e}"),
    }
}

/// The file's schema, inferred from every record.
pub fn schema(input: &InputFile) -> Result<SchemaRef> {
    let (schema, _) = format(&input.name())
        .infer_schema(reader(input)?, None)
        .map_err(|e| bad(input, e))?;
    Ok(std::sync::Arc::new(schema))
}

/// The file's records as `schema` (the inputs' schema, inferred once when they were opened),
/// `batch_rows` at a time.
pub fn batches(
    input: &InputFile,
    schema: SchemaRef,
    batch_rows: usize,
) -> Result<Box<dyn Iterator<Item = Result<SourceBatch>> + Send>> {
    let name = input.name();
    let csv = arrow_csv::ReaderBuilder::new(schema)
        .with_format(format(&name))
        .with_batch_size(batch_rows.max(1))
        .build(reader(input)?)
        .map_err(|e| bad(input, e))?;
    let input = input.clone();
    Ok(Box::new(csv.map(
        move |b: std::result::Result<RecordBatch, _>| {
            b.map(|batch| SourceBatch {
                batch,
                problems: Vec::new(),
            })
            .map_err(|e| bad(&input, e))
        },
    )))
}
