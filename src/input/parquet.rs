//! Parquet inputs, read as Arrow batches with the parquet crate's reader. Every column passes
//! through to the output except the sequence column; a truncated or corrupt file is an error that
//! says so before any model work (the footer is read when the file is opened).

use std::fs::File;

use parquet::file::reader::ChunkReader;

use super::InputFile;
use crate::storage::ObjectChunks;

use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};

use super::SourceBatch;

/// Open an input file (local or in an object store, read by ranges) and return its schema and a
/// batch iterator.
pub fn open(input: &InputFile, batch_rows: usize) -> crate::Result<(SchemaRef, ParquetBatches)> {
    let name = input.name();
    match &input.object {
        Some((object, size)) => {
            open_reader(ObjectChunks::new(object.clone(), *size), &name, batch_rows)
        }
        None => {
            let file = File::open(&input.path).map_err(|e| crate::Error::io(&name, e))?;
            open_reader(file, &name, batch_rows)
        }
    }
}

fn open_reader<R: ChunkReader + 'static>(
    reader: R,
    name: &str,
    batch_rows: usize,
) -> crate::Result<(SchemaRef, ParquetBatches)> {
    let unreadable = |e: parquet::errors::ParquetError| crate::Error::BadInput {
        input: name.to_string(),
        reason: format!(
            "not a readable Parquet file ({e}); a file cut short by a crashed writer has no \
             footer: regenerate it"
        ),
    };
    let metadata = footer(&reader, name).map_err(unreadable)?;
    let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(reader, metadata);
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(batch_rows.max(1))
        .build()
        .map_err(|e| crate::Error::BadInput {
            input: name.to_string(),
            reason: e.to_string(),
        })?;
    Ok((
        schema,
        ParquetBatches {
            reader,
            name: name.to_string(),
            failed: false,
        },
    ))
}

/// The file's footer, with the Arrow schema writers embed in it (`ARROW:schema`: exact column
/// types, e.g. large strings or time zones). arrow-ipc 59 panics on some corrupt embedded schemas
/// instead of returning an error (found by `fuzz/`'s `parquet` target: an integer type of an
/// unsupported width); such a file is read by its Parquet schema alone, with a warning, rather
/// than taking the job down.
fn footer<R: ChunkReader>(reader: &R, name: &str) -> parquet::errors::Result<ArrowReaderMetadata> {
    let with_arrow = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ArrowReaderMetadata::load(reader, ArrowReaderOptions::new())
    }));
    match with_arrow {
        Ok(metadata) => metadata,
        Err(_) => {
            tracing::warn!(
                "{name}: the Arrow schema embedded in the footer is corrupt; reading the file by its \
                 Parquet schema"
            );
            ArrowReaderMetadata::load(
                reader,
                ArrowReaderOptions::new().with_skip_arrow_metadata(true),
            )
        }
    }
}

/// Check that `column` exists and holds strings.
pub fn check_sequence_column(schema: &SchemaRef, column: &str, name: &str) -> crate::Result<()> {
    let field = schema
        .field_with_name(column)
        .map_err(|_| crate::Error::BadInput {
            input: name.to_string(),
            reason: format!(
                "no column `{column}` (columns: {}); name the sequence column with --seq-column",
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(()),
        other => Err(crate::Error::BadInput {
            input: name.to_string(),
            reason: format!(
                "column `{column}` has type {other}, sequences must be strings (Utf8, LargeUtf8 or Utf8View)"
            ),
        }),
    }
}

/// Batches of a Parquet file.
pub struct ParquetBatches {
    reader: ParquetRecordBatchReader,
    name: String,
    /// A page could not be decoded: nothing more is read.
    failed: bool,
}

impl Iterator for ParquetBatches {
    type Item = crate::Result<SourceBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        // parquet 59 panics on some corrupt pages instead of returning an error (found by
        // `fuzz/`'s `parquet` target: a dictionary page declaring no values but holding bytes, a
        // division by zero); a corrupt file is the input's fault, not a reason to take the job down.
        let reader = &mut self.reader;
        let batch = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.next())) {
            Ok(batch) => batch?,
            Err(_) => {
                self.failed = true;
                return Some(Err(crate::Error::BadInput {
                    input: self.name.clone(),
                    reason: "corrupt data: the Parquet reader could not decode a page; regenerate \
                             the file"
                        .into(),
                }));
            }
        };
        Some(
            batch
                .map(|batch| SourceBatch {
                    batch,
                    problems: Vec::new(),
                })
                .map_err(|e| crate::Error::BadInput {
                    input: self.name.clone(),
                    reason: format!("corrupt data: {e}"),
                }),
        )
    }
}
