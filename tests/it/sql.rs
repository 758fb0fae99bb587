//! The SQL front: the sql/ examples (sqllogictest files) against a fixture model, the SQL path's
//! embeddings against `esmbed embed`'s, NULLs and bad residues, FASTA tables over directories,
//! globs and gzip, several devices behind one session, and `esmbed sql` itself.

use std::sync::Arc;

use crate::common::*;
use esmbed::engine::PackEmbedder;
use esmbed::sql::service::{BadRows, EmbedService, ServiceOptions};
use esmbed::sql::{self, SessionOptions};
use esmbed::{Device, Embedder};

const MODEL: &str = "tiny_h64";

/// The fixture model with its masked-LM head (the sql/ examples use the score functions too).
fn embedder() -> Embedder {
    let source = esmbed::ModelSource::parse(fixture_dir(MODEL).to_str().unwrap()).unwrap();
    let checkpoint = esmbed::Checkpoint::open(&source).unwrap();
    let model =
        esmbed::Esm2::load_with_head(&checkpoint, &Device::Cpu, esmbed::DType::F32).unwrap();
    Embedder::new(model, &esmbed::EmbedOptions::default()).unwrap()
}

fn service(workers: usize, bad_rows: BadRows) -> Arc<EmbedService> {
    let first = embedder();
    let mut embedders: Vec<Embedder> = (1..workers)
        .map(|_| first.replicate(&Device::Cpu).unwrap())
        .collect();
    embedders.insert(0, first);
    Arc::new(
        EmbedService::start(
            embedders,
            ServiceOptions {
                tokens_per_batch: 1024,
                max_length: 1022,
                bad_rows,
                ..ServiceOptions::default()
            },
        )
        .unwrap(),
    )
}

fn session(service: Arc<EmbedService>) -> datafusion::prelude::SessionContext {
    sql::session(
        Some(service),
        &SessionOptions {
            batch_rows: 8192,
            target_partitions: 2,
            ..SessionOptions::default()
        },
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Rows of a query as strings (vectors summarized).
fn query(ctx: &datafusion::prelude::SessionContext, sql: &str) -> Vec<Vec<String>> {
    runtime().block_on(async {
        let frame = ctx.sql(sql).await.unwrap();
        let schema = frame.schema().inner().clone();
        let batches = frame.collect().await.unwrap();
        sql::display::cells(&schema, &batches).unwrap()
    })
}

fn query_error(ctx: &datafusion::prelude::SessionContext, sql: &str) -> String {
    runtime().block_on(async {
        let result = async { ctx.sql(sql).await?.collect().await }.await;
        result.expect_err("the query must fail").to_string()
    })
}

#[test]
fn the_sql_examples_pass() {
    let mut files: Vec<_> = std::fs::read_dir("sql")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "the sql/ examples: {files:?}");
    let service = service(1, BadRows::Error);
    for file in files {
        // A fresh session per file, as `esmbed sql -f` has.
        let ctx = session(service.clone());
        let text = std::fs::read_to_string(&file).unwrap();
        let records = runtime()
            .block_on(sql::slt::run(&ctx, &file.display().to_string(), &text))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(records >= 4, "{}: {records} records", file.display());
    }
}

#[test]
fn the_slt_runner_catches_wrong_results() {
    let ctx = sql::session(None, &SessionOptions::default());
    let wrong = "query I\nSELECT 1 + 1\n----\n3\n";
    let error = runtime()
        .block_on(sql::slt::run(&ctx, "wrong.slt", wrong))
        .unwrap_err();
    assert!(error.to_string().contains("wrong.slt:1"), "{error}");
    let right =
        "query I\nSELECT 1 + 1\n----\n2\n\nstatement error No field named nope\nSELECT nope\n";
    assert_eq!(
        runtime()
            .block_on(sql::slt::run(&ctx, "right.slt", right))
            .unwrap(),
        2
    );
}

#[test]
fn sql_embeddings_equal_esmbed_embed() {
    let dir = scratch("sql_equal");
    let fasta = std::path::Path::new("examples/data/some_proteins.fasta");

    // esmbed embed, through the library.
    let model = embedder();
    run_job(
        fasta,
        &dir.join("embed.parquet"),
        &model,
        vec![Arc::new(embedder()) as Arc<dyn PackEmbedder>],
        4096,
        1000,
    )
    .unwrap();

    // The same rows through SQL.
    let ctx = session(service(1, BadRows::Error));
    let out = dir.join("sql.parquet");
    let copied = query(
        &ctx,
        &format!(
            "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '{}'",
            fasta.display()
        ),
    );
    assert!(copied.is_empty());
    query(
        &ctx,
        &format!(
            "COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO '{}' STORED AS PARQUET",
            out.display()
        ),
    );

    let a = read_parquet(&dir.join("embed.parquet"));
    let b = read_parquet(&out);
    assert_eq!(strings(&a, "id"), strings(&b, "id"));
    let (va, vb) = (vectors(&a, "embedding"), vectors(&b, "embedding"));
    assert_eq!(va.len(), 15);
    for (x, y) in va.iter().zip(&vb) {
        assert!(relative_error(y, x) <= 1e-5, "{}", relative_error(y, x));
    }
}

#[test]
fn nulls_and_bad_residues_are_errors_or_nulls_as_documented() {
    // Default: the query fails, naming the row's value, the character and the fix.
    let strict = session(service(1, BadRows::Error));
    let message = query_error(
        &strict,
        "SELECT esm_embed(s) FROM (VALUES ('MKTAYIAK'), ('MKJLV')) AS t(s)",
    );
    assert!(message.contains("'MKJLV'"), "{message}");
    assert!(
        message.contains("invalid residue 'J' at position 3"),
        "{message}"
    );
    assert!(message.contains("--lenient"), "{message}");
    let message = query_error(&strict, "SELECT esm_embed(s) FROM (VALUES ('')) AS t(s)");
    assert!(message.contains("empty sequence"), "{message}");

    // Lenient: NULL for rows that cannot be embedded, and for NULL input.
    let lenient = session(service(1, BadRows::Null));
    let rows = query(
        &lenient,
        "SELECT n, esm_embed(s) IS NULL, esm_tokens(s) FROM (VALUES (1, 'MKTAYIAK'), (2, 'MKJLV'), \
         (3, NULL), (4, ''), (5, 'mktayiak*')) AS t(n, s) ORDER BY n",
    );
    let rows: Vec<String> = rows.into_iter().map(|r| r.join(" ")).collect();
    assert_eq!(
        rows,
        [
            "1 false 10",
            "2 true NULL",
            "3 true NULL",
            "4 true NULL",
            "5 false 10"
        ]
    );
    // Lower case and a trailing stop are the same protein.
    let same = query(
        &lenient,
        "SELECT round(cosine_similarity(esm_embed('MKTAYIAK'), esm_embed('mktayiak*')), 6)",
    );
    assert_eq!(same[0][0], "1.0");
}

#[test]
fn fasta_tables_read_directories_globs_and_gzip() {
    use std::io::Write;
    let dir = scratch("sql_fasta");
    std::fs::write(dir.join("a.fasta"), ">a1 first\nMKT\nAYI\n>a2\nMSEQ\n").unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b">b1 gz\nMKTAYIAKQR\n").unwrap();
    std::fs::write(dir.join("b.fa.gz"), gz.finish().unwrap()).unwrap();
    // Gzip is detected from the content, whatever the name.
    std::fs::copy(dir.join("b.fa.gz"), dir.join("c.fasta")).unwrap();

    let ctx = sql::session(None, &SessionOptions::default());
    let location = |l: &str| {
        format!(
            "CREATE EXTERNAL TABLE t STORED AS FASTA LOCATION '{}'",
            dir.join(l).display()
        )
    };
    query(&ctx, &location("a.fasta"));
    assert_eq!(
        query(&ctx, "SELECT id, description, sequence FROM t ORDER BY id"),
        [
            ["a1", "first", "MKTAYI"].map(String::from).to_vec(),
            ["a2", "NULL", "MSEQ"].map(String::from).to_vec()
        ]
    );
    query(&ctx, "DROP TABLE t");
    // A directory: its *.fasta files (a.fasta, and c.fasta, which is gzip inside).
    query(&ctx, &location(""));
    assert_eq!(
        query(&ctx, "SELECT id FROM t ORDER BY id"),
        [vec!["a1".to_string()], vec!["a2".into()], vec!["b1".into()]]
    );
    query(&ctx, "DROP TABLE t");
    // A glob of other names.
    query(&ctx, &location("*.fa.gz"));
    assert_eq!(
        query(&ctx, "SELECT sequence FROM t"),
        [vec!["MKTAYIAKQR".to_string()]]
    );
    query(&ctx, "DROP TABLE t");

    // Not FASTA: the error names the file.
    std::fs::write(dir.join("bad.fasta"), "id,sequence\n1,MKT\n").unwrap();
    query(&ctx, &location("bad.fasta"));
    let message = query_error(&ctx, "SELECT * FROM t");
    assert!(
        message.contains("bad.fasta") && message.contains("not a FASTA file"),
        "{message}"
    );
}

#[test]
fn esm_embed_uses_every_device_of_the_session() {
    let one = service(1, BadRows::Error);
    let two = service(2, BadRows::Error);
    let sql =
        "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION 'examples/data/some_proteins.fasta'";
    let select = "SELECT id, esm_embed(sequence) FROM p ORDER BY id";
    let (a, b) = (session(one.clone()), session(two.clone()));
    query(&a, sql);
    query(&b, sql);
    let run = |ctx: &datafusion::prelude::SessionContext| {
        runtime().block_on(async {
            let batches = ctx.sql(select).await.unwrap().collect().await.unwrap();
            arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
        })
    };
    let (x, y) = (run(&a), run(&b));
    assert_eq!(
        x.column(1).as_ref(),
        y.column(1).as_ref(),
        "identical embeddings"
    );
    let stats = two.device_stats();
    assert_eq!(stats.len(), 2);
    assert!(
        stats.iter().all(|d| d.packs > 0),
        "both workers ran packs: {stats:?}"
    );
}

#[test]
fn esmbed_sql_runs_statements_and_example_files() {
    let model = fixture_dir(MODEL);
    let (code, out, err) = esmbed([
        "sql",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "-c",
        "SELECT esm_tokens('MKTAYIAK') AS tokens, esm_embed('MKTAYIAK') AS embedding",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tokens") && out.contains("| 10 "), "{out}");
    assert!(
        out.contains("… 128 values]"),
        "vectors are summarized: {out}"
    );

    let (code, _, err) = esmbed([
        "sql",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "-f",
        "sql/similarity_search.slt",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("records passed"), "{err}");

    let (code, _, err) = esmbed(["sql", "--no-model", "-c", "SELECT nope FROM nowhere"]);
    assert_ne!(code, 0);
    assert!(err.contains("nowhere"), "{err}");
}
