//! The one engine under every front: SQL's `esm_embed` runs on the same device pool as
//! `esmbed embed` (out-of-memory splits, typed errors) and prepares sequences with the same
//! policy (`--long`, `--unknown`); exit codes follow the error's kind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::*;
use esmbed::engine::PackEmbedder;
use esmbed::sql::service::{EmbedService, ServiceOptions};
use esmbed::{Error, ErrorKind};

fn sequences(n: usize) -> Vec<String> {
    let residues = b"ACDEFGHIKLMNPQRSTVWY";
    (0..n)
        .map(|i| {
            (0..10 + (i * 7) % 70)
                .map(|j| residues[(i * 3 + j * 5) % 20] as char)
                .collect()
        })
        .collect()
}

fn service(device: Arc<dyn PackEmbedder>) -> EmbedService {
    let model = load_embedder("tiny_h16");
    let options = ServiceOptions {
        tokens_per_batch: 1024,
        ..ServiceOptions::default()
    };
    let config = model.model().config().clone();
    EmbedService::start_devices(vec![device], config, *model.tokenizer(), options).unwrap()
}

#[test]
fn out_of_memory_in_a_sql_call_splits_the_packs_and_every_row_comes_back_in_order() {
    let seqs = sequences(100);
    let rows: Vec<Option<&str>> = seqs.iter().map(|s| Some(s.as_str())).collect();
    let clean = service(Arc::new(load_embedder("tiny_h16")));
    let layer = clean.num_layers();
    let (want, valid) = clean.embed(&rows, layer).unwrap();
    assert!(valid.iter().all(|&v| v));

    let faulty = Arc::new(Faulty {
        inner: load_embedder("tiny_h16"),
        max_tokens: 200,
        poison: 0,
        failures: AtomicUsize::new(0),
    });
    let split = service(faulty.clone());
    let (got, valid) = split.embed(&rows, layer).unwrap();
    assert!(
        faulty.failures.load(Ordering::SeqCst) > 0,
        "no OOM injected"
    );
    assert!(valid.iter().all(|&v| v));
    let h = clean.hidden();
    for (i, (a, b)) in want.chunks(h).zip(got.chunks(h)).enumerate() {
        assert!(
            relative_error(b, a) <= 1e-5,
            "row {i}: {}",
            relative_error(b, a)
        );
    }

    // A sequence that does not fit even alone fails the call: out of memory, exit code 5.
    let poisoned = service(Arc::new(Faulty {
        inner: load_embedder("tiny_h16"),
        max_tokens: usize::MAX,
        poison: seqs[3].len() + 2,
        failures: AtomicUsize::new(0),
    }));
    let err = poisoned.embed(&rows, layer).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    assert!(err.to_string().contains("--max-length"), "{err}");
    assert_eq!(err.kind().exit_code(), 5);
}

fn fasta(dir: &std::path::Path) -> std::path::PathBuf {
    let mut text = String::new();
    for (i, s) in sequences(40).iter().enumerate() {
        // Every fifth sequence has a letter outside the alphabet.
        let s = if i % 5 == 0 {
            format!("{}J{}", &s[..4], &s[4..])
        } else {
            s.clone()
        };
        text.push_str(&format!(">s{i}\n{s}\n"));
    }
    let path = dir.join("in.fasta");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn esm_embed_follows_long_and_unknown_like_embed() {
    let dir = scratch("engine_policy");
    let input = fasta(&dir);
    let model = fixture_dir("tiny_h16").display().to_string();
    for long in ["truncate", "window"] {
        let policy = [
            "--model",
            &model,
            "--max-length",
            "30",
            "--long",
            long,
            "--unknown",
            "x",
        ];
        let embedded = dir.join(format!("embed-{long}.parquet"));
        let mut args = vec![
            "embed",
            input.to_str().unwrap(),
            "-o",
            embedded.to_str().unwrap(),
        ];
        args.extend(["--overwrite", "--no-progress"]);
        args.extend(policy);
        let (code, _, stderr) = esmbed(&args);
        assert_eq!(code, 0, "{stderr}");

        let copied = dir.join(format!("sql-{long}.parquet"));
        let sql = format!(
            "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '{}'; \
             COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO '{}' STORED AS PARQUET",
            input.display(),
            copied.display()
        );
        let mut args = vec!["sql", "-c", &sql];
        args.extend(policy);
        let (code, _, stderr) = esmbed(&args);
        assert_eq!(code, 0, "{stderr}");

        let (a, b) = (read_parquet(&embedded), read_parquet(&copied));
        assert_eq!(strings(&a, "id"), strings(&b, "id"), "--long {long}");
        let (va, vb) = (vectors(&a, "embedding"), vectors(&b, "embedding"));
        assert_eq!(va.len(), 40);
        for (x, y) in va.iter().zip(&vb) {
            assert!(relative_error(y, x) <= 1e-5, "--long {long}");
        }
    }

    // --long error: the query fails naming the row and the fix; --unknown error (the default)
    // names the letter.
    let cases = [
        (["--long", "error", "--unknown", "x"], "--max-length 30"),
        (["--long", "truncate", "--unknown", "error"], "'J'"),
    ];
    for (flags, expect) in cases {
        let sql = format!(
            "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '{}'; SELECT count(esm_embed(sequence)) FROM p",
            input.display()
        );
        let mut args = vec!["sql", "-c", &sql, "--model", &model, "--max-length", "30"];
        args.extend(flags);
        let (code, _, stderr) = esmbed(&args);
        assert_eq!(code, 3, "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
    }
}

#[test]
fn exit_codes_follow_the_error_kind() {
    let kinds = [
        (
            Error::BadInput {
                input: "a.fasta".into(),
                reason: "not FASTA".into(),
            },
            ErrorKind::BadInput,
            3,
        ),
        (
            Error::io("x", std::io::Error::other("disk")),
            ErrorKind::Io,
            4,
        ),
        (
            Error::OutOfMemory {
                detail: "one sequence".into(),
            },
            ErrorKind::Model,
            5,
        ),
        (Error::NoDevice("gone".into()), ErrorKind::Model, 5),
        (Error::InvalidOption("x".into()), ErrorKind::Usage, 2),
        (
            Error::Interrupted { done: 1, total: 2 },
            ErrorKind::Interrupted,
            130,
        ),
        (Error::Internal("x".into()), ErrorKind::Internal, 70),
    ];
    for (error, kind, code) in kinds {
        assert_eq!(error.kind(), kind, "{error}");
        assert_eq!(kind.exit_code(), code, "{error}");
    }

    // And from the command line: bad input, I/O, model, usage.
    let dir = scratch("exit_codes");
    let model = fixture_dir("tiny_h16").display().to_string();
    let good = dir.join("good.fasta");
    std::fs::write(&good, ">a\nMKT\n").unwrap();
    let binary = dir.join("binary.fasta");
    std::fs::write(&binary, [0u8, 159, 146, 150, 0, 1, 2]).unwrap();
    let blocker = dir.join("file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let run = |input: &std::path::Path, output: std::path::PathBuf, model: &str| {
        esmbed([
            "embed",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--model",
            model,
            "--no-progress",
            "--overwrite",
        ])
    };
    let (code, _, stderr) = run(&binary, dir.join("a.parquet"), &model);
    assert_eq!(code, 3, "{stderr}");
    let (code, _, stderr) = run(&good, blocker.join("out.parquet"), &model);
    assert_eq!(code, 4, "{stderr}");
    let (code, _, stderr) = run(&good, dir.join("b.parquet"), dir.to_str().unwrap());
    assert_eq!(code, 5, "{stderr}");
    let (code, _, stderr) = esmbed(["embed", good.to_str().unwrap(), "--resume", "--overwrite"]);
    assert_eq!(code, 2, "{stderr}");
}
