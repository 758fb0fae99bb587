//! Concatenating part files into one Parquet file by copying their column chunks: no decoding,
//! no re-encoding, so combining costs about one sequential copy of the data.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

use super::{errors_schema, write_atomic, writer_properties};
use crate::error::{Error, Result};

fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> Error {
    Error::Parquet {
        path: path.display().to_string(),
        source: e,
    }
}

/// Write the row groups of `parts` (in order) as one file at `target`, atomically. The parts must
/// share one schema; the footer metadata (Arrow schema, esmbed's key) is the first part's.
pub fn concat_parts(parts: &[std::path::PathBuf], target: &Path) -> Result<()> {
    let mut inputs = Vec::with_capacity(parts.len());
    for path in parts {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let metadata = ParquetMetaDataReader::new()
            .parse_and_finish(&file)
            .map_err(|e| parquet_error(path, e))?;
        inputs.push((path, file, metadata));
    }
    let Some((_, _, first)) = inputs.first() else {
        return Err(Error::internal("no parts to combine"));
    };
    let schema = first.file_metadata().schema_descr().root_schema_ptr();
    let props = Arc::new(
        WriterProperties::builder()
            .set_key_value_metadata(first.file_metadata().key_value_metadata().cloned())
            .build(),
    );
    write_atomic(target, |out| {
        fn io(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
            std::io::Error::other(e)
        }
        let mut writer = SerializedFileWriter::new(out, schema.clone(), props).map_err(io)?;
        for (path, file, metadata) in &inputs {
            if metadata.file_metadata().schema_descr().root_schema_ptr() != schema {
                return Err(io(format!(
                    "{} has another schema than the first part",
                    path.display()
                )));
            }
            for row_group in metadata.row_groups() {
                let mut out_group = writer.next_row_group().map_err(io)?;
                for column in row_group.columns() {
                    let close = ColumnCloseResult {
                        bytes_written: column.compressed_size() as u64,
                        rows_written: row_group.num_rows() as u64,
                        metadata: column.clone(),
                        bloom_filter: None,
                        column_index: None,
                        offset_index: None,
                    };
                    out_group.append_column(file, close).map_err(io)?;
                }
                out_group.close().map_err(io)?;
            }
        }
        writer.close().map_err(io)?;
        Ok(())
    })
}

/// Every row of a Parquet file esmbed wrote, decoded.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| parquet_error(path, e))?;
    reader
        .map(|batch| batch.map_err(|e| Error::io(path, std::io::Error::other(e))))
        .collect()
}

/// Read the error parts and write them as one errors file (they are small: decode and rewrite).
pub fn concat_errors(parts: &[std::path::PathBuf], target: &Path) -> Result<u64> {
    let mut batches = Vec::new();
    for path in parts {
        batches.extend(read_batches(path)?);
    }
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    write_atomic(target, |file| {
        let mut writer = ArrowWriter::try_new(file, errors_schema(), Some(writer_properties(None)))
            .map_err(std::io::Error::other)?;
        for batch in &batches {
            writer.write(batch).map_err(std::io::Error::other)?;
        }
        writer.close().map_err(std::io::Error::other)?;
        Ok(())
    })?;
    Ok(rows)
}
