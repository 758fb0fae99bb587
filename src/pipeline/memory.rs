//! A job on rows held in memory (the Python package's `Embedder.embed`), with the output of a
//! file job, bit for bit.
//!
//! The rows run as a file job in a scratch directory: written as one Parquet input, embedded by
//! [`super::run`] into a Parquet output, read back. So every option of `esmbed embed` means the
//! same here (reuse of identical sequences, `--long`, `--pll`, the errors with their `problem`),
//! by construction rather than by a second implementation that would have to be kept equal.
//! The price is one Parquet encode and decode of the rows, small beside the model's work; the
//! directory is removed when the job ends, however it ends.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;

use super::spec::ModelView;
use super::{JobOptions, JobSpec, JobSummary, ModelIdentity};
use crate::engine::PackEmbedder;
use crate::error::{Error, Result};
use crate::input::{InputFormat, InputOptions, Inputs};
use crate::output;
use crate::output::combine::read_batches;

/// Rows to embed: one schema, a sequence column and, optionally, an id column.
#[derive(Debug, Clone)]
pub struct MemoryInput {
    /// The rows (at least the schema: an empty input gives an empty output).
    pub batches: Vec<RecordBatch>,
    /// Their schema.
    pub schema: SchemaRef,
    /// Which columns hold the sequences and the ids.
    pub options: InputOptions,
    /// What messages and the errors' `input` column call these rows.
    pub name: String,
}

/// What an in-memory job made.
#[derive(Debug, Clone)]
pub struct MemoryOutput {
    /// The output's schema (`esmbed embed`'s: pass-through columns, `length`, `truncated`,
    /// embeddings).
    pub schema: SchemaRef,
    /// Its rows, in input order.
    pub batches: Vec<RecordBatch>,
    /// The rows that could not be embedded, with their position and reason (the errors file's
    /// columns).
    pub errors: Vec<RecordBatch>,
    /// The job's summary (`output`: the input's name).
    pub summary: JobSummary,
}

/// Embed `input` as [`super::run`] would embed it from a file, on `devices` (replicas of the
/// model `view` describes); `cancel` stops it ([`Error::Interrupted`]).
pub async fn run(
    input: MemoryInput,
    view: &ModelView<'_>,
    model: ModelIdentity,
    mut options: JobOptions,
    devices: Vec<Arc<dyn PackEmbedder>>,
    cancel: Arc<AtomicBool>,
) -> Result<MemoryOutput> {
    let scratch = tempfile::Builder::new()
        .prefix("esmbed-memory-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let input_path = scratch.path().join("input.parquet");
    let output_path = scratch.path().join("output.parquet");
    let rows = arrow::compute::concat_batches(&input.schema, &input.batches)
        .map_err(|e| Error::internal(format!("input rows: {e}")))?;
    output::write_parquet(&input_path, &rows, None)?;
    let inputs = Inputs::open(
        std::slice::from_ref(&input_path),
        InputOptions {
            format: Some(InputFormat::Parquet),
            ..input.options.clone()
        },
    )
    .map_err(|e| rename_input(e, &input_path, &input.name))?;
    (options.resume, options.overwrite) = (false, true);
    let spec = JobSpec::for_model(inputs, &output_path, view, model, options);
    let schema = super::writer::output_schema(&spec);
    if rows.num_rows() == 0 {
        return Ok(MemoryOutput {
            schema,
            batches: Vec::new(),
            errors: Vec::new(),
            summary: JobSummary {
                output: input.name,
                ..JobSummary::default()
            },
        });
    }
    let mut summary = super::run(spec, devices, cancel)
        .await
        .map_err(|e| rename_input(e, &input_path, &input.name))?;
    let batches = read_batches(&output_path)?;
    let errors = match summary.errors_output.take() {
        Some(path) => read_batches(Path::new(&path))?
            .into_iter()
            .map(|b| name_errors_input(b, &input.name))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    summary.output = input.name;
    Ok(MemoryOutput {
        schema,
        batches,
        errors,
        summary,
    })
}

/// The errors' `input` column names the rows as the caller does, not the scratch file.
fn name_errors_input(batch: RecordBatch, name: &str) -> Result<RecordBatch> {
    let index = batch
        .schema()
        .index_of("input")
        .map_err(|e| Error::internal(format!("errors file: {e}")))?;
    let mut columns = batch.columns().to_vec();
    columns[index] = Arc::new(StringArray::from(vec![name; batch.num_rows()])) as ArrayRef;
    RecordBatch::try_new(batch.schema(), columns)
        .map_err(|e| Error::internal(format!("errors file: {e}")))
}

/// An error about the scratch input, about the caller's rows instead.
fn rename_input(error: Error, scratch: &Path, name: &str) -> Error {
    let scratch = scratch.display().to_string();
    let rename = |s: String| s.replace(&scratch, name);
    match error {
        Error::BadInput { input, reason } => Error::BadInput {
            input: rename(input),
            reason: rename(reason),
        },
        Error::Strict {
            input,
            record,
            id,
            reason,
        } => Error::Strict {
            input: rename(input),
            record,
            id,
            reason,
        },
        Error::DuplicateId { id, first, second } => Error::DuplicateId {
            id,
            first: rename(first),
            second: rename(second),
        },
        other => other,
    }
}
