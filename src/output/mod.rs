//! Where results go, and how a job's output becomes visible only when it is complete.
//!
//! ```text
//!  -o out.parquet                         -o out/
//!  .out.parquet.esmbed/  (staging)        out/
//!     part-00000.parquet                     part-00000.parquet   (visible as soon as complete)
//!     errors-00000.parquet                   _esmbed/errors-00000.parquet
//!     _manifest.json                         _manifest.json
//!  then: parts → out.parquet (row groups     then: errors → out.errors.parquet
//!  copied, no re-encoding), errors →
//!  out.errors.parquet, staging removed
//! ```
//! Every file is written under a hidden temporary name, synced, then renamed: a reader never sees
//! a half-written file, and a killed job leaves only temporaries that the next run discards. The
//! manifest lists finished parts; `--resume` skips them.

pub mod columns;
pub mod combine;
pub mod metadata;
pub mod remote;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use metadata::JobIdentity;

/// Key of esmbed's metadata in the Parquet footer and the Arrow schema.
pub const METADATA_KEY: &str = "esmbed";

/// One file, or a directory of part files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A single Parquet file, written at the end from staged parts.
    File,
    /// A dataset directory of `part-NNNNN.parquet` files.
    Dataset,
}

/// The paths of a job's output.
#[derive(Debug, Clone)]
pub struct OutputLayout {
    /// File or dataset.
    pub kind: OutputKind,
    /// What the user named: `out.parquet` or `out/`.
    pub target: PathBuf,
    /// Where parts, part errors and the manifest live while the job runs.
    pub staging: PathBuf,
    /// The errors file beside the output.
    pub errors: PathBuf,
}

impl OutputLayout {
    /// Decide the layout from the path the user gave: a trailing `/`, an existing directory or a
    /// name without `.parquet`/`.pq` extension is a dataset directory.
    pub fn new(target: &Path) -> Self {
        let text = target.to_string_lossy();
        let is_dir = text.ends_with('/')
            || target.is_dir()
            || !matches!(
                target.extension().and_then(|e| e.to_str()),
                Some("parquet" | "pq")
            );
        let trimmed = PathBuf::from(text.trim_end_matches('/'));
        let parent = trimmed
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let name = trimmed
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        if is_dir {
            Self {
                kind: OutputKind::Dataset,
                staging: trimmed.join("_esmbed"),
                errors: parent.join(format!("{name}.errors.parquet")),
                target: trimmed,
            }
        } else {
            let stem = name
                .strip_suffix(".parquet")
                .or_else(|| name.strip_suffix(".pq"))
                .unwrap_or(&name)
                .to_string();
            Self {
                kind: OutputKind::File,
                staging: parent.join(format!(".{name}.esmbed")),
                errors: parent.join(format!("{stem}.errors.parquet")),
                target: trimmed,
            }
        }
    }

    /// Where part `index` is committed.
    pub fn part_path(&self, index: usize) -> PathBuf {
        let name = format!("part-{index:05}.parquet");
        match self.kind {
            OutputKind::File => self.staging.join(name),
            OutputKind::Dataset => self.target.join(name),
        }
    }

    /// Where the errors of part `index` are committed.
    pub fn part_errors_path(&self, index: usize) -> PathBuf {
        self.staging.join(format!("errors-{index:05}.parquet"))
    }

    /// The manifest.
    pub fn manifest_path(&self) -> PathBuf {
        match self.kind {
            OutputKind::File => self.staging.join("_manifest.json"),
            OutputKind::Dataset => self.target.join("_manifest.json"),
        }
    }

    /// Whether a finished output is already there.
    pub fn finished_output_exists(&self) -> bool {
        match self.kind {
            OutputKind::File => self.target.exists(),
            OutputKind::Dataset => Manifest::load(&self.manifest_path())
                .ok()
                .flatten()
                .is_some_and(|m| m.complete),
        }
    }

    /// Whether an unfinished job left progress.
    pub fn progress_exists(&self) -> bool {
        self.manifest_path().exists() && !self.finished_output_exists()
    }

    /// Remove everything a previous job wrote here (for `--overwrite`).
    pub fn clear(&self) -> Result<()> {
        let remove_file = |p: &Path| match fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(p, e)),
            _ => Ok(()),
        };
        match self.kind {
            OutputKind::File => remove_file(&self.target)?,
            OutputKind::Dataset => {
                if self.target.is_dir() {
                    for entry in
                        fs::read_dir(&self.target).map_err(|e| Error::io(&self.target, e))?
                    {
                        let path = entry.map_err(|e| Error::io(&self.target, e))?.path();
                        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                        let ours = (name.starts_with("part-") && name.ends_with(".parquet"))
                            || name == "_manifest.json"
                            || name.starts_with(".part-");
                        if ours {
                            remove_file(&path)?;
                        }
                    }
                }
            }
        }
        remove_file(&self.errors)?;
        if self.staging.exists() {
            fs::remove_dir_all(&self.staging).map_err(|e| Error::io(&self.staging, e))?;
        }
        Ok(())
    }

    /// Create the directories, and discard temporaries of a killed run.
    pub fn prepare(&self) -> Result<()> {
        fs::create_dir_all(&self.staging).map_err(|e| Error::io(&self.staging, e))?;
        if self.kind == OutputKind::Dataset {
            fs::create_dir_all(&self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        for dir in [&self.staging, &self.target] {
            if !dir.is_dir() {
                continue;
            }
            for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// A finished part, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// Global position of the part's first input row.
    pub first_position: u64,
    /// Input rows in the part.
    pub rows: u64,
    /// Rows written to the output.
    pub output_rows: u64,
    /// Rows written to the errors.
    pub error_rows: u64,
    /// Residues embedded.
    pub residues: u64,
    /// Output rows whose result was copied from an identical sequence's.
    #[serde(default)]
    pub reused: u64,
    /// Rows truncated.
    pub truncated: u64,
}

/// The job's progress record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// esmbed version that wrote it.
    pub esmbed_version: String,
    /// What the job is (inputs, model, options that shape the result); resume requires equality.
    pub job: JobIdentity,
    /// Finished parts by index.
    pub parts: BTreeMap<usize, PartRecord>,
    /// Total number of parts, once the input is exhausted.
    pub total_parts: Option<usize>,
    /// Whether the output is complete.
    pub complete: bool,
}

impl Manifest {
    /// A new, empty manifest.
    pub fn new(job: JobIdentity) -> Self {
        Self {
            esmbed_version: env!("CARGO_PKG_VERSION").to_string(),
            job,
            parts: BTreeMap::new(),
            total_parts: None,
            complete: false,
        }
    }

    /// Read a manifest, `None` if there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                Error::io(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("not a valid esmbed manifest ({e}); remove it or pass --overwrite"),
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Write atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("manifest serializes");
        write_atomic(path, |f| f.write_all(text.as_bytes()))
    }
}

/// The one rule for what is already at an output, for local and object-store outputs alike: a
/// finished output is never replaced without `--overwrite` (and there is nothing to resume), and
/// an interrupted job's progress (at `progress`) is continued only with `--resume`. Call it
/// after `--overwrite` has cleared the output.
/// The output's state before a job, shared by every job and the dry run (which writes nothing):
/// a finished output or an interrupted job's progress is never replaced without `overwrite`
/// (the caller clears it), and with `resume` the earlier run's manifest is returned, which must
/// describe the same job. `None`: start afresh.
pub fn resume_state(
    layout: &OutputLayout,
    identity: &metadata::JobIdentity,
    overwrite: bool,
    resume: bool,
) -> Result<Option<Manifest>> {
    if overwrite {
        return Ok(None);
    }
    let progress = layout.progress_exists().then_some(layout.staging.as_path());
    check_existing(
        &layout.target.display().to_string(),
        layout.finished_output_exists(),
        progress,
        resume,
    )?;
    match Manifest::load(&layout.manifest_path())? {
        Some(m) if resume => {
            let differences = m.job.differences(identity);
            if !differences.is_empty() {
                return Err(Error::ResumeMismatch {
                    differences: differences.join(", "),
                });
            }
            Ok(Some(m))
        }
        _ => Ok(None),
    }
}

pub fn check_existing(
    target: &str,
    finished: bool,
    progress: Option<&Path>,
    resume: bool,
) -> Result<()> {
    let exists = |hint: String| {
        Err(Error::OutputExists {
            path: target.to_string(),
            hint,
        })
    };
    if finished && resume {
        return exists(
            "the job it belongs to is complete: nothing to resume (pass --overwrite to redo it)"
                .into(),
        );
    }
    if finished {
        return exists("pass --overwrite to replace it, or choose another -o".into());
    }
    match progress {
        Some(staging) if !resume => exists(format!(
            "an interrupted job left progress in {}; continue it with --resume, or start over with --overwrite",
            staging.display()
        )),
        _ => Ok(()),
    }
}

/// The temporary name of `path`: hidden, in the same directory (so the rename is atomic).
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Write `path` through a hidden temporary: write, sync, rename, sync the directory.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temporary_path(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writer settings for esmbed's files: zstd, no dictionaries (float vectors do not repeat), one
/// row group per part, and esmbed's metadata in the footer.
pub fn writer_properties(metadata: Option<&str>) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).expect("valid level"),
        ))
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(usize::MAX))
        .set_key_value_metadata(
            metadata.map(|m| vec![KeyValue::new(METADATA_KEY.to_string(), m.to_string())]),
        )
        .build()
}

/// The bytes `batch` takes written as a job writes it, in memory, in `row_groups` row groups
/// (with or without the page index, which combined files lack): per top-level column, and the
/// rest of the file (footer, magic). For size estimates.
pub fn written_sizes(
    batch: &RecordBatch,
    metadata: &str,
    row_groups: usize,
    page_index: bool,
) -> Result<(HashMap<String, u64>, u64)> {
    let mut props = writer_properties(Some(metadata));
    if !page_index {
        props = props
            .into_builder()
            .set_statistics_enabled(parquet::file::properties::EnabledStatistics::Chunk)
            .build();
    }
    let mut buffer = Vec::new();
    let written = (|| {
        let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(props))?;
        let step = batch.num_rows().div_ceil(row_groups.max(1)).max(1);
        for start in (0..batch.num_rows()).step_by(step) {
            writer.write(&batch.slice(start, step.min(batch.num_rows() - start)))?;
            writer.flush()?;
        }
        writer.close()
    })()
    .map_err(|e| Error::internal(format!("writing a size sample failed: {e}")))?;
    let mut columns: HashMap<String, u64> = HashMap::new();
    for group in written.row_groups() {
        for chunk in group.columns() {
            let name = chunk.column_path().parts()[0].clone();
            *columns.entry(name).or_default() += chunk.compressed_size() as u64;
        }
    }
    let data: u64 = columns.values().sum();
    Ok((columns, (buffer.len() as u64).saturating_sub(data)))
}

/// Write `batch` as a Parquet file at `path`, atomically.
pub fn write_parquet(path: &Path, batch: &RecordBatch, metadata: Option<&str>) -> Result<()> {
    write_atomic(path, |file| {
        let props = writer_properties(metadata);
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(std::io::Error::other)?;
        writer.write(batch).map_err(std::io::Error::other)?;
        writer.close().map_err(std::io::Error::other)?;
        Ok(())
    })
}

/// A row that was not embedded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRow {
    /// The record's id, if the input has ids.
    pub id: Option<String>,
    /// Global position of the input row (0-based, across all inputs).
    pub position: u64,
    /// The input file.
    pub input: String,
    /// 1-based record number within that file.
    pub record: u64,
    /// The kind of problem.
    pub problem: crate::prepare::Problem,
    /// What was wrong, and what to do.
    pub reason: String,
}

/// Schema of the errors file.
pub fn errors_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("position", DataType::UInt64, false),
        Field::new("input", DataType::Utf8, false),
        Field::new("record", DataType::UInt64, false),
        Field::new("problem", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
}

/// Error rows as a record batch.
pub fn errors_batch(rows: &[ErrorRow]) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.id.as_deref()))),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.position),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.input.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.record))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.problem.name()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reason.as_str()),
        )),
    ];
    RecordBatch::try_new(errors_schema(), columns).expect("columns match the schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let file = OutputLayout::new(Path::new("res/out.parquet"));
        assert_eq!(file.kind, OutputKind::File);
        assert_eq!(file.staging, Path::new("res/.out.parquet.esmbed"));
        assert_eq!(file.errors, Path::new("res/out.errors.parquet"));
        assert_eq!(
            file.part_path(3),
            Path::new("res/.out.parquet.esmbed/part-00003.parquet")
        );

        let dataset = OutputLayout::new(Path::new("res/emb/"));
        assert_eq!(dataset.kind, OutputKind::Dataset);
        assert_eq!(dataset.target, Path::new("res/emb"));
        assert_eq!(dataset.errors, Path::new("res/emb.errors.parquet"));
        assert_eq!(
            dataset.part_path(0),
            Path::new("res/emb/part-00000.parquet")
        );
        assert_eq!(dataset.manifest_path(), Path::new("res/emb/_manifest.json"));

        let bare = OutputLayout::new(Path::new("out.parquet"));
        assert_eq!(bare.errors, Path::new("./out.errors.parquet"));
    }

    #[test]
    fn atomic_write_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("esmbed-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.json");
        write_atomic(&path, |f| f.write_all(b"{}")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}");
        assert!(!temporary_path(&path).exists());
        let failed = write_atomic(&dir.join("y.json"), |_| {
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.unwrap_err().to_string().contains("y.json"));
        assert!(!temporary_path(&dir.join("y.json")).exists());
        assert!(!dir.join("y.json").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
