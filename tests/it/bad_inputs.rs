//! The bad inputs of `shared/docs/reliability.md`, each with its fixture and the outcome a user
//! should see: a clear fatal error (exit 3) naming the file and the fix, or an error row naming
//! the record and the reason while the rest of the job completes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

fn model() -> String {
    fixture_dir("tiny_h16").display().to_string()
}

/// Run `embed` on `input`; returns (exit code, stderr, output rows' ids, errors' (id, reason)).
fn embed(input: &Path, extra: &[&str]) -> (i32, String, Vec<String>, Vec<(String, String)>) {
    let dir = input.parent().unwrap();
    let out = dir.join("out.parquet");
    let model = model();
    let args = [
        &[
            "embed",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--model",
            &model,
            "--overwrite",
        ][..],
        extra,
    ]
    .concat();
    let (code, _, stderr) = esmbed(&args);
    let ids = if out.exists() {
        strings(&read_parquet(&out), "id")
            .into_iter()
            .map(|s| s.unwrap_or_default())
            .collect()
    } else {
        Vec::new()
    };
    let errors_path = dir.join("out.errors.parquet");
    let errors = if errors_path.exists() {
        let e = read_parquet(&errors_path);
        strings(&e, "id")
            .into_iter()
            .zip(strings(&e, "reason"))
            .map(|(i, r)| (i.unwrap_or_default(), r.unwrap()))
            .collect()
    } else {
        Vec::new()
    };
    (code, stderr, ids, errors)
}

fn fasta(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = scratch(name);
    let path = dir.join("in.fasta");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn empty_file_is_a_clear_error() {
    let input = fasta("empty", b"");
    let (code, stderr, _, _) = embed(&input, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("in.fasta") && stderr.contains("no records"),
        "{stderr}"
    );
}

#[test]
fn binary_file_is_not_fasta() {
    let input = fasta("binary", b"\x00\x01\x02garbage\xff");
    let (code, stderr, _, _) = embed(&input, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("not a FASTA file") && stderr.contains("0x00"),
        "{stderr}"
    );
    assert!(stderr.contains("in.fasta"), "{stderr}");
}

#[test]
fn record_level_problems_become_error_rows_and_the_job_completes() {
    let long = "A".repeat(100_000);
    let text = format!(
        ">ok1\nMKTVRQG\n>noseq\n>lower\nmktvrqg\n>stop\nMKTVRQG*\n>inner_stop\nMKT*VRQG\n>gap\nMKT-VRQG\n>dot\nMK.T\n\
         >J\nMKJT\n>digit\nMK7T\n>nonascii\nMKÉT\n>masktext\nMK<mask>T\n>huge\n{long}\n>ok2\nACDEFGHIKLMNPQRSTVWY\n>\nMKTV\n"
    );
    let input = fasta("records", text.as_bytes());
    let (code, stderr, ids, errors) = embed(&input, &["--long", "error", "--max-length", "1022"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(ids, ["ok1", "lower", "stop", "ok2"]);
    let reason = |id: &str| {
        errors
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("no error row for {id:?}: {errors:?}"))
    };
    assert!(reason("noseq").contains("no sequence"));
    assert!(
        reason("inner_stop").contains("'*' at position 4"),
        "{}",
        reason("inner_stop")
    );
    assert!(reason("gap").contains("gap"));
    assert!(reason("dot").contains("'.' at position 3"));
    assert!(reason("J").contains("'J' at position 3") && reason("J").contains("--unknown x"));
    assert!(reason("digit").contains("'7'"));
    assert!(reason("nonascii").contains("U+00C9"));
    assert!(reason("masktext").contains("'<' at position 3"));
    assert!(reason("huge").contains("100000 residues"));
    assert!(reason("").contains("invalid header"));
    // Every record exactly once: 4 embedded + 10 errors = 14 records.
    assert_eq!(ids.len() + errors.len(), 14);
    assert!(stderr.contains("4 of 14 sequences embedded"), "{stderr}");
}

#[test]
fn unknown_letters_can_be_mapped_to_x() {
    let input = fasta("map-x", b">J\nMKJT\n");
    let (code, stderr, ids, errors) = embed(&input, &["--unknown", "x"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(ids, ["J"]);
    assert!(errors.is_empty());
}

#[test]
fn crlf_wrapped_blank_lines_and_gzip_embed_like_a_clean_file() {
    let clean = fasta("clean", b">a one\nMKTVRQGLAG\n>b\nACDEFGH\n");
    let messy = fasta(
        "messy",
        b"\r\n>a one\r\nMKTV\r\nRQG\r\n\r\nLAG\r\n>b\r\nACD\nEFGH",
    );
    let gz = {
        let dir = scratch("gzip");
        let path = dir.join("in.fa.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::default(),
        );
        enc.write_all(b">a one\nMKTVRQGLAG\n>b\nACDEFGH\n").unwrap();
        enc.finish().unwrap();
        path
    };
    let read = |input: &Path| {
        let (code, stderr, _, _) = embed(input, &[]);
        assert_eq!(code, 0, "{stderr}");
        read_parquet(&input.parent().unwrap().join("out.parquet"))
    };
    let (a, b, c) = (read(&clean), read(&messy), read(&gz));
    for other in [&b, &c] {
        assert_eq!(strings(&a, "id"), strings(other, "id"));
        assert_eq!(strings(&a, "description"), strings(other, "description"));
        assert_eq!(vectors(&a, "embedding"), vectors(other, "embedding"));
    }
}

fn parquet_file(name: &str, schema: Arc<Schema>, columns: Vec<arrow::array::ArrayRef>) -> PathBuf {
    let dir = scratch(name);
    let path = dir.join("in.parquet");
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    path
}

fn good_parquet(name: &str) -> PathBuf {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("sequence", DataType::Utf8, true),
    ]));
    parquet_file(
        name,
        schema,
        vec![
            Arc::new(StringArray::from(vec!["a", "b", "c"])),
            Arc::new(StringArray::from(vec![Some("MKTV"), None, Some("MKLLA")])),
        ],
    )
}

#[test]
fn truncated_and_corrupt_parquet_are_clear_errors() {
    let input = good_parquet("truncated");
    let bytes = std::fs::read(&input).unwrap();
    std::fs::write(&input, &bytes[..bytes.len() / 2]).unwrap();
    let (code, stderr, _, _) = embed(&input, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("in.parquet") && stderr.contains("not a readable Parquet file"),
        "{stderr}"
    );
    assert!(stderr.contains("regenerate"), "{stderr}");

    let input = good_parquet("corrupt");
    let mut bytes = std::fs::read(&input).unwrap();
    for b in &mut bytes[4..40] {
        *b = 0xAB;
    }
    std::fs::write(&input, &bytes).unwrap();
    let (code, stderr, _, _) = embed(&input, &[]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("in.parquet"), "{stderr}");
}

#[test]
fn missing_or_wrongly_typed_columns_are_named() {
    let input = good_parquet("missing-col");
    let (code, stderr, _, _) = embed(&input, &["--seq-column", "aa"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("no column `aa`") && stderr.contains("id, sequence"),
        "{stderr}"
    );
    assert!(stderr.contains("--seq-column"), "{stderr}");

    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("sequence", DataType::Int64, false),
    ]));
    let input = parquet_file(
        "wrong-type",
        schema,
        vec![
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Int64Array::from(vec![1])),
        ],
    );
    let (code, stderr, _, _) = embed(&input, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("column `sequence` has type Int64"),
        "{stderr}"
    );
}

#[test]
fn null_sequences_are_error_rows() {
    let input = good_parquet("nulls");
    let (code, stderr, ids, errors) = embed(&input, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(errors, [("b".to_string(), "sequence is null".to_string())]);
}

#[test]
fn odd_ids_pass_through() {
    let long_id = "x".repeat(10_000);
    let text = format!(">sp/P12345/1-100 with spaces\nMKTV\n>{long_id}\nMKLL\n");
    let input = fasta("ids", text.as_bytes());
    let (code, stderr, ids, _) = embed(&input, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(ids, ["sp/P12345/1-100".to_string(), long_id]);
}
