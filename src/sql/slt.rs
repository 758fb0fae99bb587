//! A sqllogictest runner (the subset the `sql/` examples use), so every example is also a test.
//!
//! Records are separated by blank lines:
//! ```text
//! statement ok
//! CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION 'examples/data/some_proteins.fasta'
//!
//! statement error invalid residue 'J'
//! SELECT esm_embed('MJK')
//!
//! query IT rowsort
//! SELECT esm_tokens(sequence), id FROM p
//! ----
//! 6 a
//! ```
//! `query` compares rows (cells joined by spaces, whitespace collapsed; vectors shown as by
//! `esmbed sql`); `rowsort` sorts rows before comparing; `statement error <text>` expects an
//! error containing `<text>`. Lines starting with `#` are comments.

use datafusion::prelude::SessionContext;

use super::display;

/// One failed record.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct SltFailure {
    /// The file.
    pub file: String,
    /// The record's first line (1-based).
    pub line: usize,
    /// What went wrong.
    pub message: String,
}

fn normalize(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Run the records of `text` (named `file` in failures) against `ctx`, stopping at the first
/// failure. Returns the number of records run.
pub async fn run(ctx: &SessionContext, file: &str, text: &str) -> Result<usize, SltFailure> {
    let mut records = 0;
    let mut line_no = 0;
    let lines: Vec<&str> = text.lines().collect();
    while line_no < lines.len() {
        // Skip blank lines and comments between records.
        let trimmed = lines[line_no].trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            line_no += 1;
            continue;
        }
        let start = line_no;
        let mut block = Vec::new();
        while line_no < lines.len() && !lines[line_no].trim().is_empty() {
            if !lines[line_no].trim_start().starts_with('#') {
                block.push(lines[line_no]);
            }
            line_no += 1;
        }
        let fail = |message: String| SltFailure {
            file: file.to_string(),
            line: start + 1,
            message,
        };
        let head: Vec<&str> = block[0].split_whitespace().collect();
        let body = &block[1..];
        let split = body.iter().position(|l| l.trim() == "----");
        let sql = body[..split.unwrap_or(body.len())].join("\n");
        let expected: Vec<String> = split
            .map(|s| body[s + 1..].iter().map(|l| normalize(l)).collect())
            .unwrap_or_default();
        let result = async {
            let frame = ctx.sql(&sql).await?;
            let schema = frame.schema().inner().clone();
            let batches = frame.collect().await?;
            Ok::<_, datafusion::error::DataFusionError>((schema, batches))
        }
        .await;
        match head.as_slice() {
            ["statement", "ok"] => {
                result.map_err(|e| fail(format!("{sql}\nfailed: {e}")))?;
            }
            ["statement" | "query", "error", message @ ..] => {
                let message = message.join(" ");
                match result {
                    Ok(_) => return Err(fail(format!("{sql}\nsucceeded; expected an error"))),
                    Err(e) if e.to_string().contains(&message) => {}
                    Err(e) => {
                        return Err(fail(format!(
                            "{sql}\nfailed with: {e}\nexpected an error containing: {message}"
                        )))
                    }
                }
            }
            ["query", _types, options @ ..] => {
                let (schema, batches) =
                    result.map_err(|e| fail(format!("{sql}\nfailed: {e}")))?;
                let mut rows: Vec<String> = display::cells(&schema, &batches)
                    .map_err(|e| fail(e.to_string()))?
                    .into_iter()
                    .map(|cells| normalize(&cells.join(" ")))
                    .collect();
                if options.contains(&"rowsort") {
                    rows.sort();
                    let mut expected = expected.clone();
                    expected.sort();
                    if rows != expected {
                        return Err(fail(mismatch(&sql, &expected, &rows)));
                    }
                } else if rows != expected {
                    return Err(fail(mismatch(&sql, &expected, &rows)));
                }
            }
            other => {
                return Err(fail(format!(
                    "unknown record {other:?}: use `statement ok`, `statement error <text>` or `query <types>`"
                )))
            }
        }
        records += 1;
    }
    Ok(records)
}

fn mismatch(sql: &str, expected: &[String], got: &[String]) -> String {
    format!(
        "{sql}\nexpected:\n  {}\ngot:\n  {}",
        expected.join("\n  "),
        got.join("\n  ")
    )
}
