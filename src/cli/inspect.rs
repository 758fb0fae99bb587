//! `esmbed inspect`: what an output holds.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::output::{Manifest, METADATA_KEY};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An output file (`out.parquet`), a dataset directory (`out/`) or an errors file.
    pub path: PathBuf,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let path = &args.path;
    if path.is_dir() {
        let mut parts: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
            })
            .collect();
        parts.sort();
        let manifest = Manifest::load(&path.join("_manifest.json"))?;
        let status = match &manifest {
            Some(m) if m.complete => "complete".to_string(),
            Some(m) => format!(
                "incomplete: {} parts finished (continue with --resume)",
                m.parts.len()
            ),
            None => "no esmbed manifest".to_string(),
        };
        let mut rows = 0;
        for part in &parts {
            rows += describe(part, false)?;
        }
        println!(
            "{}: dataset of {} part files, {rows} rows, {status}",
            path.display(),
            parts.len()
        );
        if let Some(first) = parts.first() {
            describe(first, true)?;
        }
    } else {
        describe(path, true)?;
    }
    Ok(())
}

/// Print one file (with `verbose`: schema and metadata); returns its row count.
fn describe(path: &Path, verbose: bool) -> anyhow::Result<i64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
    let metadata = builder.metadata().clone();
    let rows = metadata.file_metadata().num_rows();
    if !verbose {
        return Ok(rows);
    }
    println!(
        "{}: {rows} rows, {} row groups, {:.1} MB",
        path.display(),
        metadata.num_row_groups(),
        size as f64 / 1e6
    );
    println!("schema:");
    for field in builder.schema().fields() {
        println!(
            "  {}: {}{}",
            field.name(),
            field.data_type(),
            if field.is_nullable() { "" } else { " not null" }
        );
    }
    let esmbed = metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == METADATA_KEY))
        .and_then(|k| k.value.clone());
    match esmbed {
        Some(text) => {
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            println!(
                "esmbed metadata:\n{}",
                serde_json::to_string_pretty(&value)?
            );
        }
        None => println!("no esmbed metadata"),
    }
    Ok(rows)
}
