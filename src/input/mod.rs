//! Inputs as streams of Arrow record batches: FASTA (plain or gzip) and Parquet files.
//!
//! ```text
//!   file ─┬─ FASTA   ─> (id, description, sequence)      ─┐
//!         └─ Parquet ─> (the file's columns)              ─┴─> InputRows: pass-through columns,
//!                                                              ids, sequences, global positions
//! ```
//! Rows are numbered across all inputs in order (`position`); that number is what ties an output
//! or error row back to its input and what resume and ordering are built on.

pub mod csv;
pub mod fasta;
pub mod parquet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Schema, SchemaRef};

use crate::storage::{KeyPattern, ObjectUrl, StoreOptions};

/// The input files an object-store location names: an object, a prefix (`…/`) or a glob
/// (`s3://bucket/in/*.fa.gz`, with [`KeyPattern`]'s rules). A missing object or bucket, or a
/// location that is not a usable URL, is the input's fault; other store failures are I/O errors.
fn list_objects(
    location: &str,
    options: &InputOptions,
    store: &StoreOptions,
) -> crate::Result<Vec<InputFile>> {
    let bad_input = |e: crate::Error| match e {
        crate::Error::NotFound { hint: reason, .. } | crate::Error::Remote { reason, .. } => {
            crate::Error::BadInput {
                input: location.to_string(),
                reason,
            }
        }
        other => other,
    };
    let file = |object: ObjectUrl, size: u64| -> crate::Result<InputFile> {
        let format = match options.format {
            Some(f) => f,
            None => detect_object_format(&object, size)?,
        };
        Ok(InputFile {
            path: PathBuf::from(object.url()),
            format,
            object: Some((object, size)),
        })
    };
    let url = ObjectUrl::parse(location, store).map_err(bad_input)?;
    let (_, _, key) = crate::storage::split(location)?;
    let pattern = KeyPattern::new(key).map_err(|e| crate::Error::BadInput {
        input: location.to_string(),
        reason: format!("not a valid glob ({e})"),
    })?;
    let is_prefix = location.ends_with('/') || key.is_empty();
    if !pattern.is_glob() && !is_prefix {
        let meta = url.require().map_err(bad_input)?;
        return Ok(vec![file(url, meta.size)?]);
    }
    let listed = match pattern.is_glob() {
        true => url.matching(&pattern),
        false => url.list(),
    }
    .map_err(bad_input)?;
    let mut files = Vec::new();
    for meta in listed {
        let name = meta.location.as_ref();
        let leaf = meta.location.filename().unwrap_or(name);
        let wanted = pattern.is_glob()
            || (!leaf.starts_with(['.', '_']) && format_from_name(leaf).is_some());
        if wanted {
            files.push(file(url.with_key(name), meta.size)?);
        }
    }
    if files.is_empty() {
        return Err(crate::Error::BadInput {
            input: location.to_string(),
            reason: "no FASTA or Parquet objects match (a prefix lists *.fasta[.gz], *.fa[.gz], \
                     *.parquet …; a glob such as s3://bucket/in/*.fa.gz takes any name)"
                .into(),
        });
    }
    Ok(files)
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum InputFormat {
    /// FASTA, plain or gzip-compressed.
    Fasta,
    /// Apache Parquet.
    Parquet,
    /// CSV or TSV (by name: `.tsv`/`.tab` are tab-separated), plain or gzip, with a header line.
    Csv,
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
    /// Where it is (for an object, its URL).
    pub path: PathBuf,
    /// How to read it.
    pub format: InputFormat,
    /// The object and its size, for an input in an object store.
    pub object: Option<(ObjectUrl, u64)>,
}

impl InputFile {
    /// The name used in messages.
    pub fn name(&self) -> String {
        match &self.object {
            Some((o, _)) => o.url(),
            None => self.path.display().to_string(),
        }
    }

    /// Its size in bytes (0 if it cannot be read).
    pub fn size(&self) -> u64 {
        match &self.object {
            Some((_, size)) => *size,
            None => std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
        }
    }

    /// A reader from the start.
    fn open(&self) -> crate::Result<Box<dyn std::io::Read + Send>> {
        Ok(match &self.object {
            Some((o, size)) => Box::new(o.reader(*size)),
            None => Box::new(
                std::fs::File::open(&self.path).map_err(|e| crate::Error::io(self.name(), e))?,
            ),
        })
    }
}

/// The format of an object: by name, then by its first bytes.
fn detect_object_format(object: &ObjectUrl, size: u64) -> crate::Result<InputFormat> {
    if let Some(format) = format_from_name(object.key()) {
        return Ok(format);
    }
    let head = object
        .get_range(0..size.min(4))
        .map_err(|e| crate::Error::io(object.url(), std::io::Error::other(e)))?;
    Ok(if head.as_ref() == b"PAR1" {
        InputFormat::Parquet
    } else {
        InputFormat::Fasta
    })
}

/// The format a file name implies, if any.
fn format_from_name(name: &str) -> Option<InputFormat> {
    let name = name.to_ascii_lowercase();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    if stem.ends_with(".parquet") || stem.ends_with(".pq") {
        return Some(InputFormat::Parquet);
    }
    if [".csv", ".tsv", ".tab"]
        .iter()
        .any(|ext| stem.ends_with(ext))
    {
        return Some(InputFormat::Csv);
    }
    [".fa", ".fasta", ".faa", ".fas", ".fna", ".mpfa", ".fsa"]
        .iter()
        .any(|ext| stem.ends_with(ext))
        .then_some(InputFormat::Fasta)
}

/// `--shard i/n`: this machine's share of a job's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// Shards in all.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("--shard {s:?}: write I/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("--shard {s:?}: I is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("--shard {s:?}: N is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("--shard {s:?}: needs 0 <= I < N"));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Whether the `k`-th input file (in the job's sorted order) belongs to this shard.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

/// Guess the format of `path`: by extension, then by content (`PAR1` magic).
pub fn detect_format(path: &Path) -> crate::Result<InputFormat> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if let Some(format) = format_from_name(&name) {
        return Ok(format);
    }
    use std::io::Read;
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| crate::Error::io(&name, e))?;
    let n = file
        .read(&mut head)
        .map_err(|e| crate::Error::io(&name, e))?;
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

/// The input files one location names: a URL's objects, a directory's files (sorted, hidden
/// ones left out) or one file; each with its format (`--format`, or detected from the content).
fn locate(
    location: &str,
    options: &InputOptions,
    store: &StoreOptions,
) -> crate::Result<Vec<InputFile>> {
    if crate::storage::is_url(location) {
        return list_objects(location, options, store);
    }
    let mut files = Vec::new();
    let path = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
    let path = &path;
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| crate::Error::io(path.display().to_string(), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !is_hidden(p))
            .collect();
        entries.sort();
        for p in entries {
            let format = options
                .format
                .map(Ok)
                .unwrap_or_else(|| detect_format(&p))?;
            files.push(InputFile {
                path: p,
                format,
                object: None,
            });
        }
    } else {
        if !path.exists() {
            return Err(crate::Error::BadInput {
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
            object: None,
        });
    }
    Ok(files)
}

/// The one schema every input shares (FASTA's, or the Parquet files' own), or the first file
/// whose columns differ.
fn common_schema(files: &[InputFile], options: &InputOptions) -> crate::Result<SchemaRef> {
    let mut schema: Option<(SchemaRef, String)> = None;
    for file in files {
        let this = match file.format {
            InputFormat::Fasta => fasta::schema(),
            InputFormat::Parquet => {
                let (schema, _) = parquet::open(file, 1)?;
                parquet::check_sequence_column(&schema, &options.seq_column, &file.name())?;
                schema
            }
            InputFormat::Csv => {
                let schema = csv::schema(file)?;
                parquet::check_sequence_column(&schema, &options.seq_column, &file.name())?;
                schema
            }
        };
        let this = Arc::new(Schema::new(this.fields().clone()));
        match &schema {
            None => schema = Some((this, file.name())),
            Some((first, first_name)) if first != &this => {
                return Err(crate::Error::BadInput {
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
    Ok(schema.expect("at least one file").0)
}

impl Inputs {
    /// Resolve and check the given local paths; see [`Inputs::open_locations`].
    pub fn open(paths: &[PathBuf], options: InputOptions) -> crate::Result<Self> {
        let locations: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        Self::open_locations(&locations, options, &StoreOptions::default(), None)
    }

    /// Resolve and check inputs: local paths, `file://` URLs and `s3://` URLs. A directory, an
    /// `s3://…/` prefix or a glob (`s3://b/in/*.fasta.gz`) expands to the FASTA/Parquet files in
    /// it, sorted by name. With a `shard`, only the files of that shard are kept (every `n`-th
    /// file of the sorted list, so machines that run `--shard 0/n` … `--shard n-1/n` split a job
    /// without overlap).
    pub fn open_locations(
        locations: &[String],
        options: InputOptions,
        store: &StoreOptions,
        shard: Option<Shard>,
    ) -> crate::Result<Self> {
        let mut files = Vec::new();
        for location in locations {
            files.extend(locate(location, &options, store)?);
        }
        if let Some(shard) = shard {
            files = files
                .into_iter()
                .enumerate()
                .filter(|(k, _)| shard.owns(*k))
                .map(|(_, f)| f)
                .collect();
        }
        if files.is_empty() {
            return Err(crate::Error::BadInput {
                input: locations.join(", "),
                reason: match shard {
                    Some(s) => format!("no input files for --shard {}/{}", s.index, s.count),
                    None => "no input files".into(),
                },
            });
        }
        let schema = common_schema(&files, &options)?;
        let seq =
            schema
                .field_with_name(&options.seq_column)
                .map_err(|_| crate::Error::BadInput {
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

    /// The error of a job whose inputs hold no record.
    pub fn no_records(&self) -> crate::Error {
        let names: Vec<String> = self.files.iter().map(|f| f.name()).collect();
        crate::Error::bad_input(names.join(", "), "no records: the input is empty")
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
    ) -> crate::Result<Box<dyn Iterator<Item = crate::Result<SourceBatch>> + Send>> {
        let file = &self.files[index];
        let name = file.name();
        Ok(match file.format {
            InputFormat::Fasta => Box::new(fasta::FastaBatches::new(
                file.open()?,
                &name,
                self.options.batch_rows,
            )?),
            InputFormat::Parquet => Box::new(parquet::open(file, self.options.batch_rows)?.1),
            InputFormat::Csv => csv::batches(file, self.schema.clone(), self.options.batch_rows)?,
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
