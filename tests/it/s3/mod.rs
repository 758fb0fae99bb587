//! Inputs and outputs in S3, against a real S3-compatible server: `moto_server` (PyPI
//! `moto[server]`, installed by `.ci/run`), started on a loopback port per test. Outside CI the
//! tests skip with a message when moto is not installed; in CI they fail instead.

mod faults;
pub(crate) mod moto;

use std::io::Write;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;

use esmbed::storage::{ObjectUrl, StoreOptions};

use self::faults::Faulty;
use self::moto::Moto;

fn model() -> String {
    fixture_dir("tiny_h16").display().to_string()
}

/// Two FASTA inputs (one gzip) of 60 sequences in all.
fn fasta_inputs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let residues = b"ACDEFGHIKLMNPQRSTVWY";
    let seq = |i: usize| -> String {
        (0..15 + (i * 7) % 90)
            .map(|j| residues[(i * 5 + j * 3) % 20] as char)
            .collect()
    };
    let mut a = String::new();
    let mut b = String::new();
    for i in 0..60 {
        let record = format!(">q{i:02}\n{}\n", seq(i));
        if i < 35 {
            a.push_str(&record)
        } else {
            b.push_str(&record)
        }
    }
    let pa = dir.join("a.fasta");
    std::fs::write(&pa, a).unwrap();
    let pb = dir.join("b.fasta.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b.as_bytes()).unwrap();
    std::fs::write(&pb, gz.finish().unwrap()).unwrap();
    vec![pa, pb]
}

fn upload(moto: &Moto, local: &std::path::Path, url: &str) {
    moto.object(url).upload(local).unwrap();
}

/// Upload local files under `prefix`, keeping their names.
fn upload_all(moto: &Moto, files: &[std::path::PathBuf], prefix: &str) {
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy();
        upload(moto, f, &format!("{prefix}/{name}"));
    }
}

fn download(moto: &Moto, url: &str, local: &std::path::Path) -> arrow::array::RecordBatch {
    moto.object(url).download(local).unwrap();
    read_parquet(local)
}

fn assert_same(a: &arrow::array::RecordBatch, b: &arrow::array::RecordBatch) {
    assert_eq!(strings(a, "id"), strings(b, "id"));
    assert_eq!(vectors(a, "embedding"), vectors(b, "embedding"));
}

#[test]
fn inputs_from_a_bucket_prefix_and_outputs_to_a_bucket_equal_local_results() {
    let Some(moto) = Moto::start() else { return };
    moto.bucket("data");
    let dir = scratch("s3_equal");
    let files = fasta_inputs(&dir);
    upload_all(&moto, &files, "s3://data/in");
    let common = [
        "--model",
        &model(),
        "--device",
        "cpu",
        "--rows-per-part",
        "25",
        "--no-progress",
    ];

    // Local reference.
    let local = dir.join("local.parquet");
    let mut args = vec![
        "embed",
        files[0].to_str().unwrap(),
        files[1].to_str().unwrap(),
        "-o",
        local.to_str().unwrap(),
    ];
    args.extend(common);
    let (code, _, err) = esmbed(&args);
    assert_eq!(code, 0, "{err}");

    // FASTA from a prefix (plain + gzip) to one Parquet object.
    let mut args = vec!["embed", "s3://data/in/", "-o", "s3://data/out/emb.parquet"];
    args.extend(common);
    let (code, _, err) = moto.esmbed(&args);
    assert_eq!(code, 0, "{err}");
    let remote = download(
        &moto,
        "s3://data/out/emb.parquet",
        &dir.join("remote.parquet"),
    );
    assert_same(&read_parquet(&local), &remote);
    assert_eq!(
        moto.keys("data")
            .iter()
            .filter(|k| k.starts_with("out/"))
            .collect::<Vec<_>>(),
        ["out/emb.parquet"],
        "no staging objects left"
    );

    // Parquet input (the FASTA output has id + embedding; embed its ids again from a glob) to
    // a dataset prefix.
    let table = dir.join("seqs.parquet");
    let (code, _, err) = esmbed([
        "sql",
        "--no-model",
        "-c",
        &format!(
            "CREATE EXTERNAL TABLE f STORED AS FASTA LOCATION '{}'; \
             COPY (SELECT id, sequence FROM f) TO '{}' STORED AS PARQUET",
            files[0].display(),
            table.display()
        ),
    ]);
    assert_eq!(code, 0, "{err}");
    upload(&moto, &table, "s3://data/pq/seqs.parquet");
    let mut args = vec!["embed", "s3://data/pq/*.parquet", "-o", "s3://data/ds/"];
    args.extend(common);
    let (code, _, err) = moto.esmbed(&args);
    assert_eq!(code, 0, "{err}");

    // SQL: a FASTA table in the bucket, COPY to the bucket.
    let (code, out, err) = moto.esmbed(&[
        "sql", "--model", &model(), "--device", "cpu", "-c",
        "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION 's3://data/in/b.fasta.gz'; \
         COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO 's3://data/sql/emb.parquet' STORED AS PARQUET",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| 25 "), "25 rows copied: {out}");
    let via_sql = download(&moto, "s3://data/sql/emb.parquet", &dir.join("sql.parquet"));
    assert_eq!(
        strings(&via_sql, "id"),
        strings(&read_parquet(&local), "id")[35..].to_vec()
    );

    let parts: Vec<String> = moto
        .keys("data")
        .into_iter()
        .filter(|k| k.starts_with("ds/"))
        .collect();
    assert!(
        parts.contains(&"ds/part-00000.parquet".to_string()),
        "{parts:?}"
    );
    assert!(
        parts.contains(&"ds/_manifest.json".to_string()),
        "{parts:?}"
    );
    let local_ds = dir.join("ds");
    std::fs::create_dir_all(&local_ds).unwrap();
    for key in parts.iter().filter(|k| k.ends_with(".parquet")) {
        moto.object(&format!("s3://data/{key}"))
            .download(&local_ds.join(key.trim_start_matches("ds/")))
            .unwrap();
    }
    let from_parquet = read_parquet(&local_ds);
    let reference = read_parquet(&local);
    let n = strings(&from_parquet, "id").len();
    assert_eq!(n, 35);
    assert_eq!(
        strings(&from_parquet, "id"),
        strings(&reference, "id")[..n].to_vec()
    );
    assert_eq!(
        vectors(&from_parquet, "embedding"),
        vectors(&reference, "embedding")[..n].to_vec()
    );
}

#[test]
fn a_killed_job_resumes_with_no_duplicate_or_partial_object() {
    let Some(moto) = Moto::start() else { return };
    moto.bucket("jobs");
    let dir = scratch("s3_resume");
    let files = fasta_inputs(&dir);
    upload_all(&moto, &files, "s3://jobs/in");
    let args = [
        "embed",
        "s3://jobs/in/",
        "-o",
        "s3://jobs/emb.parquet",
        "--model",
        &model(),
        "--device",
        "cpu",
        "--rows-per-part",
        "10",
        "--no-progress",
    ];
    let (code, _, err) = moto.esmbed(&args);
    assert_eq!(code, 0, "{err}");
    let reference = download(
        &moto,
        "s3://jobs/emb.parquet",
        &dir.join("reference.parquet"),
    );

    let mut overwrite = args.to_vec();
    overwrite.push("--overwrite");
    // Slow parts, killed once the store's manifest lists a part.
    let mut child = moto
        .command(&overwrite)
        .env("ESMBED_TEST_PART_DELAY_MS", "400")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let manifest = moto.object("s3://jobs/.emb.parquet.esmbed/_manifest.json");
    let started = Instant::now();
    loop {
        let listed = manifest
            .head()
            .unwrap()
            .and_then(|_| manifest.get().ok())
            .is_some_and(|m| String::from_utf8_lossy(&m).contains("\"first_position\""));
        if listed || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        moto.object("s3://jobs/emb.parquet")
            .head()
            .unwrap()
            .is_none(),
        "a killed job leaves no output object"
    );
    let (code, _, err) = moto.esmbed(&args);
    assert_eq!(code, 2, "without --resume the progress is refused: {err}");
    assert!(err.contains("--resume"), "{err}");

    let mut resume = args.to_vec();
    resume.push("--resume");
    let (code, _, err) = moto.esmbed(&resume);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed"), "{err}");
    let resumed = download(&moto, "s3://jobs/emb.parquet", &dir.join("resumed.parquet"));
    assert_same(&reference, &resumed);
    let keys = moto.keys("jobs");
    assert_eq!(
        keys.iter()
            .filter(|k| !k.starts_with("in/"))
            .collect::<Vec<_>>(),
        ["emb.parquet"],
        "no duplicate, partial or staging object: {keys:?}"
    );
}

#[test]
fn transient_faults_are_retried_and_permanent_ones_reported() {
    let Some(moto) = Moto::start() else { return };
    moto.bucket("faults");
    let base = moto.object("s3://faults/x.bin");
    let store = |fail: usize, denied: bool| -> ObjectUrl {
        // The same client, over an HTTP layer that injects faults below object_store's retries.
        let options = StoreOptions {
            http: Some(Arc::new(Faulty::new(fail, denied))),
            ..moto.options()
        };
        ObjectUrl::parse("s3://faults/x.bin", &options).unwrap()
    };

    // Two transient failures, then success: retried (3 attempts).
    let flaky = store(2, false);
    flaky.put(Bytes::from_static(b"hello")).unwrap();
    assert_eq!(base.get().unwrap().as_ref(), b"hello");
    let flaky = store(2, false);
    assert_eq!(flaky.get().unwrap().as_ref(), b"hello");

    // A multipart upload (20 MiB, three parts) whose first request and first part fail once:
    // each is retried by object_store, and the object is complete.
    let dir = scratch("s3_faults");
    let big = dir.join("big.bin");
    let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let flaky = store(1, false).with_key("big.bin");
    flaky.upload(&big).unwrap();
    let back = dir.join("back.bin");
    base.with_key("big.bin").download(&back).unwrap();
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the multipart object is complete"
    );

    // Always failing: reported after the attempts, naming the URL; nothing is visible.
    let broken = store(usize::MAX, false).with_key("never.bin");
    let error = broken.upload(&big).unwrap_err().to_string();
    assert!(
        error.contains("s3://faults/never.bin") && error.contains("failed 3 times"),
        "{error}"
    );
    assert!(
        base.with_key("never.bin").head().unwrap().is_none(),
        "a failed upload leaves no object"
    );

    // Access denied: not retried, named.
    let denied = store(0, true);
    let started = Instant::now();
    let error = denied.get().unwrap_err().to_string();
    assert!(
        error.contains("access denied") && error.contains("s3://faults/x.bin"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "denied requests are not retried"
    );
}

#[test]
fn bad_credentials_and_missing_objects_fail_fast_with_the_url() {
    let Some(moto) = Moto::start() else { return };
    moto.bucket("locked");
    let dir = scratch("s3_auth");
    let files = fasta_inputs(&dir);
    upload(&moto, &files[0], "s3://locked/in/a.fasta");

    // A missing object: exit 3 (bad input), the URL named.
    let (code, _, err) = moto.esmbed(&[
        "embed",
        "s3://locked/in/nope.fasta",
        "-o",
        "s3://locked/o.parquet",
        "--model",
        &model(),
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("s3://locked/in/nope.fasta") && err.contains("no such object"),
        "{err}"
    );

    // Authentication on, unknown keys: refused at once (not retried), with the fix.
    let response = moto
        .http("POST", "/moto-api/reset-auth", Some("0"))
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let started = Instant::now();
    let (code, _, err) = moto.esmbed_env(
        &[
            "embed",
            "s3://locked/in/a.fasta",
            "-o",
            "s3://locked/o.parquet",
            "--model",
            &model(),
            "--device",
            "cpu",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1"),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
        ],
    );
    moto.http("POST", "/moto-api/reset-auth", Some("inf"));
    assert_ne!(code, 0);
    assert!(err.contains("s3://locked/in/a.fasta"), "{err}");
    assert!(
        err.contains("access denied") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn globs_follow_one_rule_in_embed_inputs_and_sql_tables() {
    let Some(moto) = Moto::start() else { return };
    moto.bucket("globs");
    let dir = scratch("s3_globs");
    let files = fasta_inputs(&dir);
    upload_all(&moto, &files, "s3://globs/in");
    upload(&moto, &files[0], "s3://globs/in/sub/deeper.fasta");
    upload(&moto, &files[0], "s3://globs/in/a-1.fasta");

    // `*` stays within a segment, `?` is one character, `**` crosses segments.
    let inputs = |location: &str| -> Vec<String> {
        let inputs = esmbed::input::Inputs::open_locations(
            &[location.to_string()],
            esmbed::input::InputOptions::default(),
            &moto.options(),
            None,
        )
        .unwrap();
        inputs.files.iter().map(|f| f.name()).collect()
    };
    assert_eq!(
        inputs("s3://globs/in/*.fa*"),
        [
            "s3://globs/in/a-1.fasta",
            "s3://globs/in/a.fasta",
            "s3://globs/in/b.fasta.gz"
        ]
    );
    assert_eq!(
        inputs("s3://globs/in/a-?.fasta"),
        ["s3://globs/in/a-1.fasta"]
    );
    assert_eq!(
        inputs("s3://globs/in/**/deep*"),
        ["s3://globs/in/sub/deeper.fasta"]
    );

    // The same locations as SQL tables, in this process, with the same store settings.
    let ctx = esmbed::sql::session(
        None,
        &esmbed::sql::SessionOptions {
            store: moto.options(),
            ..Default::default()
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let count = |location: &str| -> String {
        runtime.block_on(async {
            let sql = format!(
                "CREATE OR REPLACE EXTERNAL TABLE t STORED AS FASTA LOCATION '{location}'; \
                 SELECT count(*) FROM t"
            );
            let results = esmbed::sql::run_script(&ctx, &sql).await.unwrap();
            let last = results.last().unwrap();
            esmbed::sql::display::cells(&last.schema, &last.batches).unwrap()[0][0].clone()
        })
    };
    // a.fasta and a-1.fasta hold 35 records each, b.fasta.gz 25.
    assert_eq!(count("s3://globs/in/*.fa*"), "95");
    assert_eq!(count("s3://globs/in/a-?.fasta"), "35");
    assert_eq!(count("s3://globs/in/**/deep*"), "35");
}
