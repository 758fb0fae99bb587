//! `esmbed embed --dry-run`: every figure against the real run of the same job (rows, errors,
//! packs, tokens exact; the estimated size within 10 % of the file), nothing written, and the
//! memory check that stops a job whose longest sequence cannot fit, before any model work.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use crate::reuse::repeated_fasta;

fn run(args: &[&str]) -> (i32, serde_json::Value, String) {
    let (code, stdout, stderr) = esmbed(args);
    let value = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (code, value, stderr)
}

fn job<'a>(input: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let model = fixture_dir("tiny_h64").to_str().unwrap().to_string().leak();
    let mut args = vec![
        "embed",
        input,
        "-o",
        out,
        "--model",
        model,
        "--rows-per-part",
        "9",
        "--tokens-per-batch",
        "128",
        "--max-length",
        "40",
        "--no-progress",
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

fn file_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .map(|p| p.metadata().unwrap().len())
            .sum()
    } else {
        path.metadata().unwrap().len()
    }
}

#[test]
fn the_dry_run_figures_are_the_jobs() {
    let dir = scratch("dry-run");
    let (input, _) = repeated_fasta(&dir, 90, 21);
    let input = input.to_str().unwrap();
    for (name, extra) in [
        ("pooled.parquet", &["--bos"][..]),
        (
            "f16.parquet",
            &["--output-dtype", "f16", "--layers", "1,-1"][..],
        ),
        ("residues/", &["--per-residue"][..]),
        ("windows.parquet", &["--long", "window", "--no-reuse"][..]),
    ] {
        let out = dir.join(name);
        let out = out.to_str().unwrap();
        let (code, plan, stderr) = run(&[&job(input, out, extra)[..], &["--dry-run"]].concat());
        assert_eq!(code, 0, "{stderr}");
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "{name}: the dry run wrote something"
        );
        let (code, done, stderr) = run(&job(input, out, extra));
        assert_eq!(code, 0, "{stderr}");
        for key in [
            "rows",
            "errors",
            "packs",
            "tokens",
            "residues",
            "truncated",
            "distinct",
            "reused",
        ] {
            assert_eq!(plan[key], done[key], "{name}: {key}");
        }
        assert_eq!(plan["output_rows"], done["embedded"], "{name}");
        assert_eq!(plan["packing_efficiency"], done["packing_efficiency"]);

        // Error rows by kind: the errors file's `problem` column.
        let errors = read_parquet(Path::new(done["errors_output"].as_str().unwrap()));
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for p in strings(&errors, "problem") {
            *kinds.entry(p.unwrap()).or_default() += 1;
        }
        let planned: BTreeMap<String, u64> =
            serde_json::from_value(plan["errors_by_problem"].clone()).unwrap();
        assert_eq!(planned, kinds, "{name}");
        assert_eq!(plan["error_examples"][0]["problem"], "invalid_residue");

        let estimate = plan["output_bytes"].as_f64().unwrap();
        let real = file_size(Path::new(out.trim_end_matches('/'))) as f64;
        assert!(
            (estimate / real - 1.0).abs() < 0.10,
            "{name}: estimated {estimate} bytes, the file has {real}"
        );
        let memory = &plan["memory"];
        assert!(memory["weights"].as_u64().unwrap() > 0);
        assert!(memory["activations"].as_u64().unwrap() > 0);
        std::fs::remove_dir_all(Path::new(out.trim_end_matches('/'))).ok();
        std::fs::remove_file(Path::new(out)).ok();
        std::fs::remove_file(done["errors_output"].as_str().unwrap()).unwrap();
    }
}

#[test]
fn a_dry_run_fails_where_the_job_would_and_bench_measures_packs() {
    let dir = scratch("dry-run-fails");
    let (input, _) = repeated_fasta(&dir, 30, 4);
    let input = input.to_str().unwrap();
    let out = dir.join("out.parquet");
    let out = out.to_str().unwrap();
    let (code, _, stderr) = run(&job(input, out, &[]));
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run(&[&job(input, out, &[])[..], &["--dry-run"]].concat());
    assert_eq!(
        code, 2,
        "an existing output stops the job, so the dry run: {stderr}"
    );
    assert!(stderr.contains("--overwrite"), "{stderr}");

    let (code, plan, stderr) = run(&[
        &job(input, out, &[])[..],
        &["--dry-run", "--bench", "--overwrite"],
    ]
    .concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(plan["throughput"]["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(plan["estimated_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        Path::new(out).exists(),
        "--dry-run --overwrite must not remove the output"
    );

    let (code, stdout, _) = esmbed(
        [&job(input, out, &[])[..], &["--dry-run", "--overwrite"]]
            .concat()
            .into_iter()
            .filter(|a| *a != "--json"),
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("distinct sequences"), "{stdout}");
    assert!(stdout.contains("add --bench"), "{stdout}");
}

#[test]
fn a_sequence_that_cannot_fit_alone_stops_the_job_at_start() {
    let dir = scratch("too-big");
    // 120,000 residues whole on the CPU: the attention scores alone are ~700 GB.
    let path = dir.join("huge.fasta");
    let residues: String = "MKTAYIAKQR".repeat(12_000);
    std::fs::write(&path, format!(">small\nMKT\n>huge\n{residues}\n")).unwrap();
    let out = dir.join("out.parquet");
    let model = fixture_dir("tiny_h16");
    let args = [
        "embed",
        path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--max-length",
        "200000",
        "--no-progress",
    ];
    let started = std::time::Instant::now();
    let (code, _, stderr) = esmbed(args);
    assert_eq!(code, 5, "{stderr}");
    assert!(
        started.elapsed().as_secs() < 20,
        "it must fail before model work"
    );
    for fix in [
        "--max-length",
        "--long window",
        "huge.fasta record 2",
        "120002 tokens",
    ] {
        assert!(stderr.contains(fix), "{fix}: {stderr}");
    }
    assert!(!out.exists());
    assert!(!esmbed::output::OutputLayout::new(&out).staging.exists());
    // The dry run shows the same figure.
    let (code, plan, _) = run(&[&args[..], &["--dry-run", "--json"]].concat());
    assert_eq!(code, 0);
    assert!(plan["memory"]["activations"].as_u64().unwrap() > 100 << 30);
}

#[test]
fn a_score_dry_run_plans_the_score_job() {
    let dir = scratch("score-dry-run");
    let (input, _) = repeated_fasta(&dir, 40, 5);
    let model = fixture_dir("tiny_h64");
    for (name, extra) in [
        ("pll.parquet", &[][..]),
        ("terms/", &["--per-residue"][..]),
        ("logits.parquet", &["--logits"][..]),
    ] {
        let out = dir.join(name);
        let base = [
            "score",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--rows-per-part",
            "7",
            "--tokens-per-batch",
            "128",
            "--max-length",
            "40",
            "--no-progress",
            "--json",
        ];
        let args = [&base[..], extra].concat();
        let (code, plan, stderr) = run(&[&args[..], &["--dry-run"]].concat());
        assert_eq!(code, 0, "{stderr}");
        assert!(!out.exists(), "{name}: the dry run wrote the output");
        let (code, done, stderr) = run(&args);
        assert_eq!(code, 0, "{stderr}");
        for (p, d) in [
            ("rows", "rows"),
            ("output_rows", "scored"),
            ("errors", "errors"),
            ("residues", "residues"),
            ("reused", "reused"),
            ("tokens", "tokens"),
            ("packs", "packs"),
        ] {
            assert_eq!(plan[p], done[d], "{name}: {p}");
        }
        assert_eq!(plan["errors_by_problem"]["invalid_residue"], 2, "{name}");
        let estimate = plan["output_bytes"].as_f64().unwrap();
        let real = file_size(Path::new(out.to_str().unwrap().trim_end_matches('/'))) as f64;
        assert!(
            (estimate / real - 1.0).abs() < 0.10,
            "{name}: estimated {estimate} bytes, the file has {real}"
        );
    }
}
