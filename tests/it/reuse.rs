//! Identical sequences embedded once: the output with reuse (the default) is bitwise the output
//! of `--no-reuse`, and the summary counts the distinct sequences. The same across a killed and
//! resumed job is in `resume.rs`; in SQL, here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;

const RESIDUES: &[u8] = b"ACDEFGHIKLMNPQRSTVWY";

/// A FASTA of `n` rows where every third row repeats an earlier row's sequence under another
/// id, written another way (lowercase, a trailing `*`, split over lines); plus a bad record and
/// its repeat, and two long sequences that share their first 40 residues. Returns the path and
/// the number of distinct sequences after truncation to 40 residues.
pub fn repeated_fasta(dir: &Path, n: usize, seed: u64) -> (PathBuf, usize) {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut sequences: Vec<String> = Vec::new();
    let mut text = String::new();
    for i in 0..n {
        let (sequence, written) = if i % 3 == 2 {
            let s = sequences[next() % sequences.len()].clone();
            let written = match i % 4 {
                0 => s.to_lowercase(),
                1 => format!("{s}*"),
                2 => format!("{}\n{}", &s[..s.len() / 2], &s[s.len() / 2..]),
                _ => s.clone(),
            };
            (s, written)
        } else {
            let len = 5 + next() % 30;
            let s: String = (0..len)
                .map(|_| RESIDUES[next() % RESIDUES.len()] as char)
                .collect();
            (s.clone(), s)
        };
        text.push_str(&format!(">row{i}\n{written}\n"));
        sequences.push(sequence);
    }
    let prefix: String = (0..40)
        .map(|_| RESIDUES[next() % RESIDUES.len()] as char)
        .collect();
    text.push_str(&format!(
        ">long1\n{prefix}MKTAYIAKQR\n>long2\n{prefix}GGGG\n"
    ));
    text.push_str(">bad1\nMK1T\n>bad2\nmk1t\n");
    sequences.push(prefix.clone());
    let distinct = sequences.iter().collect::<HashSet<_>>().len();
    let path = dir.join(format!("repeated-{seed}.fasta"));
    std::fs::write(&path, text).unwrap();
    (path, distinct)
}

fn embed(input: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "embed",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model",
        fixture_dir("tiny_h64").to_str().unwrap().to_string().leak(),
        "--rows-per-part",
        "7",
        "--tokens-per-batch",
        "96",
        "--max-length",
        "40",
        "--no-progress",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = esmbed(&args);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn assert_same_files(a: &Path, b: &Path) {
    let (x, y) = (read_parquet(a), read_parquet(b));
    assert_eq!(x.num_rows(), y.num_rows());
    assert_eq!(x.schema(), y.schema());
    for (name, (c, d)) in x
        .schema()
        .fields()
        .iter()
        .map(|f| f.name())
        .zip(x.columns().iter().zip(y.columns()))
    {
        assert_eq!(c.to_data(), d.to_data(), "column {name} differs");
    }
}

#[test]
fn identical_sequences_are_embedded_once_with_the_same_bits() {
    let dir = scratch("reuse");
    let (input, distinct) = repeated_fasta(&dir, 60, 7);
    for (name, extra) in [
        ("pooled", &["--bos", "--layers", "1,-1"][..]),
        ("residues", &["--per-residue", "--bos"][..]),
        ("windows", &["--long", "window", "--per-residue"][..]),
    ] {
        let with = dir.join(format!("{name}.parquet"));
        let without = dir.join(format!("{name}-no-reuse.parquet"));
        let summary = embed(&input, &with, extra);
        let plain = embed(&input, &without, &[extra, &["--no-reuse"][..]].concat());
        assert_same_files(&with, &without);
        let errors = |p: &Path| p.with_extension("errors.parquet");
        assert_same_files(&errors(&with), &errors(&without));
        assert_eq!(summary["rows"], 64, "{name}");
        assert_eq!(summary["errors"], 2, "{name}: both bad records");
        assert_eq!(plain["reused"], 0, "{name}");
        assert_eq!(plain["distinct"], serde_json::Value::Null, "{name}");
        // Under windows, the long rows differ beyond residue 40: one more distinct sequence.
        let expected = distinct + usize::from(name == "windows");
        assert_eq!(summary["distinct"], expected, "{name}");
        assert_eq!(summary["reused"], 62 - expected, "{name}");
        assert!(
            summary["tokens"].as_u64() < plain["tokens"].as_u64(),
            "{name}: {summary} {plain}"
        );
    }
}

#[test]
fn a_result_over_the_memory_limit_is_computed_again_with_the_same_bits() {
    let dir = scratch("reuse-limit");
    let (input, _) = repeated_fasta(&dir, 40, 11);
    let model = load_embedder("tiny_h64");
    let workers =
        || vec![Arc::new(load_embedder("tiny_h64")) as Arc<dyn esmbed::engine::PackEmbedder>];
    let reference = dir.join("ref.parquet");
    run_job(&input, &reference, &model, workers(), 4096, 5).unwrap();
    // One held result at a time (256 bytes of f32 means): most repeats are computed again.
    let limited = dir.join("limited.parquet");
    let summary = run_job_with(&input, &limited, &model, workers(), |o| {
        o.rows_per_part = 5;
        o.reuse_memory = 256;
    })
    .unwrap();
    assert_same_files(&reference, &limited);
    let full = run_job(
        &input,
        &dir.join("full.parquet"),
        &model,
        workers(),
        4096,
        5,
    )
    .unwrap();
    assert!(
        summary.reused < full.reused,
        "{} {}",
        summary.reused,
        full.reused
    );
}

#[test]
fn sql_embeds_identical_rows_of_a_call_once() {
    use esmbed::sql::service::{EmbedService, ServiceOptions};
    let dir = scratch("reuse-sql");
    let (input, _) = repeated_fasta(&dir, 45, 3);
    let start = |reuse| {
        let model = load_embedder("tiny_h64");
        let options = ServiceOptions {
            tokens_per_batch: 96,
            max_length: 40,
            bad_rows: esmbed::sql::service::BadRows::Null,
            reuse,
            ..ServiceOptions::default()
        };
        Arc::new(EmbedService::start(vec![model], options).unwrap())
    };
    let text = std::fs::read_to_string(&input).unwrap();
    let records: Vec<String> = text
        .split('>')
        .filter(|r| !r.is_empty())
        .map(|r| r.split_once('\n').unwrap().1.replace('\n', ""))
        .collect();
    let rows: Vec<Option<&str>> = records.iter().map(|s| Some(s.as_str())).collect();
    let (with, without) = (start(true), start(false));
    let layer = with.num_layers();
    let a = with.embed(&rows, layer).unwrap();
    let b = without.embed(&rows, layer).unwrap();
    assert_eq!(a.1, b.1, "validity");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.0), bits(&b.0));
    assert!(with.reused_rows() >= 15, "{}", with.reused_rows());
    assert_eq!(without.reused_rows(), 0);
    let tokens = |s: &EmbedService| s.device_stats()[0].tokens;
    assert!(tokens(&with) < tokens(&without));
}
