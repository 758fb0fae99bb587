//! Inputs as streams of Arrow record batches: FASTA (plain or gzip) and Parquet files.
//!
//! ```text
//!   file ─┬─ FASTA   ─> (id, description, sequence)      ─┐
//!         └─ Parquet ─> (the file's columns)              ─┴─> InputRows: pass-through columns,
//!                                                              ids, sequences, global positions
//! ```
//! Rows are numbered across all inputs in order (`position`); that number is what ties an output
//! or error row back to its input and what resume and ordering are built on.

pub mod fasta;
pub mod parquet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Schema, SchemaRef};

/// An input could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The content is not what the format requires.
    #[error("{input}: {reason}")]
    Format {
        /// The input file.
        input: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Reading failed.
    #[error("{input}: {source}")]
    Io {
        /// The input file.
        input: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl InputError {
    pub(crate) fn io(input: &str, source: std::io::Error) -> Self {
        InputError::Io {
            input: input.to_string(),
            source,
        }
    }
}

/// A batch from one source, with per-record problems the reader found (row in batch, reason).
#[derive(Debug, Clone)]
pub struct SourceBatch {
    /// The rows.
    pub batch: RecordBatch,
    /// Records the reader could parse only in part (e.g. an empty FASTA header).
    pub problems: Vec<(usize, String)>,
}

/// File formats esmbed reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// FASTA, plain or gzip-compressed.
    Fasta,
    /// Apache Parquet.
    Parquet,
}

/// How to read the inputs.
#[derive(Debug, Clone)]
pub struct InputOptions {
    /// Format of every input; `None` guesses from the name, then the content.
    pub format: Option<InputFormat>,
    /// Column holding the sequences (Parquet).
    pub seq_column: String,
    /// Column holding the ids (Parquet); absent ids are allowed.
    pub id_column: String,
    /// Rows per batch read.
    pub batch_rows: usize,
}

impl Default for InputOptions {
    fn default() -> Self {
        Self {
            format: None,
            seq_column: "sequence".into(),
            id_column: "id".into(),
            batch_rows: 8192,
        }
    }
}

/// One input file.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// Where it is.
    pub path: PathBuf,
    /// How to read it.
    pub format: InputFormat,
}

impl InputFile {
    /// The name used in messages.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Guess the format of `path`: by extension, then by content (`PAR1` magic).
pub fn detect_format(path: &Path) -> Result<InputFormat, InputError> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    if stem.ends_with(".parquet") || stem.ends_with(".pq") {
        return Ok(InputFormat::Parquet);
    }
    if [".fa", ".fasta", ".faa", ".fas", ".fna", ".mpfa", ".fsa"]
        .iter()
        .any(|ext| stem.ends_with(ext))
    {
        return Ok(InputFormat::Fasta);
    }
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| InputError::io(&name, e))?;
    let n = file.read(&mut head).map_err(|e| InputError::io(&name, e))?;
    Ok(if n == 4 && &head == b"PAR1" {
        InputFormat::Parquet
    } else {
        InputFormat::Fasta
    })
}

/// The inputs of a job, checked: they exist, their format is known, and they share one schema.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The files, in the order rows are numbered.
    pub files: Vec<InputFile>,
    /// How to read them.
    pub options: InputOptions,
    /// Schema of the source batches (all files).
    pub schema: SchemaRef,
}

impl Inputs {
    /// Resolve and check the given paths; directories expand to the FASTA/Parquet files in them
    /// (sorted by name).
    pub fn open(paths: &[PathBuf], options: InputOptions) -> Result<Self, InputError> {
        let mut files = Vec::new();
        for path in paths {
            if path.is_dir() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|e| InputError::io(&path.display().to_string(), e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && !is_hidden(p))
                    .collect();
                entries.sort();
                for p in entries {
                    let format = options
                        .format
                        .map(Ok)
                        .unwrap_or_else(|| detect_format(&p))?;
                    files.push(InputFile { path: p, format });
                }
            } else {
                if !path.exists() {
                    return Err(InputError::Format {
                        input: path.display().to_string(),
                        reason: "no such file".into(),
                    });
                }
                let format = options
                    .format
                    .map(Ok)
                    .unwrap_or_else(|| detect_format(path))?;
                files.push(InputFile {
                    path: path.clone(),
                    format,
                });
            }
        }
        if files.is_empty() {
            return Err(InputError::Format {
                input: paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: "no input files".into(),
            });
        }
        let mut schema: Option<(SchemaRef, String)> = None;
        for file in &files {
            let this = match file.format {
                InputFormat::Fasta => fasta::schema(),
                InputFormat::Parquet => {
                    let (schema, _) = parquet::open(&file.path, &file.name(), 1)?;
                    parquet::check_sequence_column(&schema, &options.seq_column, &file.name())?;
                    schema
                }
            };
            let this = Arc::new(Schema::new(this.fields().clone()));
            match &schema {
                None => schema = Some((this, file.name())),
                Some((first, first_name)) if first != &this => {
                    return Err(InputError::Format {
                        input: file.name(),
                        reason: format!(
                            "its columns differ from those of {first_name}; inputs of one job must share one schema \
                             (run separate jobs, or write one output directory per schema)"
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        let (schema, _) = schema.expect("at least one file");
        let seq = schema
            .field_with_name(&options.seq_column)
            .map_err(|_| InputError::Format {
                input: files[0].name(),
                reason: format!("no column `{}`", options.seq_column),
            })?;
        debug_assert!(matches!(
            seq.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ));
        Ok(Self {
            files,
            options,
            schema,
        })
    }

    /// Whether the id column exists.
    pub fn has_ids(&self) -> bool {
        self.schema.field_with_name(&self.options.id_column).is_ok()
    }

    /// The schema of the columns passed through to the output (all but the sequence column).
    pub fn passthrough_schema(&self) -> SchemaRef {
        let fields = self
            .schema
            .fields()
            .iter()
            .filter(|f| f.name() != &self.options.seq_column)
            .cloned()
            .collect::<Vec<_>>();
        Arc::new(Schema::new(fields))
    }

    /// Stream the batches of file `index`.
    pub fn read(
        &self,
        index: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<SourceBatch, InputError>> + Send>, InputError> {
        let file = &self.files[index];
        let name = file.name();
        Ok(match file.format {
            InputFormat::Fasta => {
                let f = std::fs::File::open(&file.path).map_err(|e| InputError::io(&name, e))?;
                Box::new(fasta::FastaBatches::new(f, &name, self.options.batch_rows)?)
            }
            InputFormat::Parquet => {
                Box::new(parquet::open(&file.path, &name, self.options.batch_rows)?.1)
            }
        })
    }

    /// Split a source batch into what the pipeline needs.
    pub fn rows(&self, source: SourceBatch) -> InputRows {
        let batch = source.batch;
        let seq_index = batch
            .schema()
            .index_of(&self.options.seq_column)
            .expect("checked at open");
        let sequences = to_utf8(batch.column(seq_index)).expect("checked to be a string column");
        let ids = batch
            .column_by_name(&self.options.id_column)
            .and_then(to_utf8);
        let mut passthrough = batch;
        passthrough.remove_column(seq_index);
        InputRows {
            passthrough,
            ids,
            sequences,
            problems: source.problems,
        }
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') || n.starts_with('_'))
}

/// The column as text (strings as they are, numbers formatted), `None` if it has no text form.
fn to_utf8(array: &Arc<dyn Array>) -> Option<StringArray> {
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().clone()),
        _ => arrow::compute::cast(array, &DataType::Utf8)
            .ok()
            .map(|a| a.as_string::<i32>().clone()),
    }
}

/// Rows of one source batch, split for the pipeline.
#[derive(Debug, Clone)]
pub struct InputRows {
    /// Columns carried to the output unchanged.
    pub passthrough: RecordBatch,
    /// Ids as text, if the input has an id column.
    pub ids: Option<StringArray>,
    /// Sequences (null where the input is null).
    pub sequences: StringArray,
    /// Reader-found problems: (row, reason).
    pub problems: Vec<(usize, String)>,
}

impl InputRows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of row `i`, if any.
    pub fn id(&self, i: usize) -> Option<&str> {
        self.ids
            .as_ref()
            .and_then(|ids| ids.is_valid(i).then(|| ids.value(i)))
    }
}
