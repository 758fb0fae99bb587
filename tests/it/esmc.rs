//! ESM C through every front, on the fixture models (`tests/fixtures/make_esmc_reference.py`):
//! `esmbed embed` equals transformers' `EsmcModel` (multi-chain `|` input included; for ESM-2 a
//! `|` stays an error row), `esm_embed` in SQL equals `esmbed embed`, a job on two workers and a
//! killed-and-resumed job equal a plain one, and the model's crop (2046) is the default
//! `--max-length`. The layer-by-layer check against transformers is in `reference.rs`, the
//! scores in `scores.rs`.

use std::path::Path;

use crate::common::*;

const MODEL: &str = "tiny_esmc";

/// The fixture's cases that have text, as FASTA (plus an ESM-2-only bad row when asked).
fn fasta(dir: &Path) -> (std::path::PathBuf, Fixture) {
    let fixture = Fixture::load(MODEL);
    let mut text = String::new();
    for case in fixture.cases.iter().filter(|c| c.input.is_some()) {
        let seq: String = case.input.as_deref().unwrap().split_whitespace().collect();
        text.push_str(&format!(">{}\n{}\n", case.id, seq));
    }
    let path = dir.join("in.fasta");
    std::fs::write(&path, text).unwrap();
    (path, fixture)
}

fn embed(dir: &Path, model: &str, args: &[&str]) -> (i32, String) {
    let model = fixture_dir(model);
    let mut all = vec![
        "embed",
        "in.fasta",
        "--model",
        model.to_str().unwrap(),
        "--no-progress",
    ];
    all.extend_from_slice(args);
    let (code, _, stderr) = esmbed_in(dir, &all);
    (code, stderr)
}

#[test]
fn esmbed_embed_runs_esmc_and_reads_chain_breaks() {
    let dir = scratch("esmc-embed");
    let (_, fixture) = fasta(&dir);
    let (code, stderr) = embed(
        &dir,
        MODEL,
        &["-o", "out.parquet", "--tokens-per-batch", "300"],
    );
    assert_eq!(code, 0, "{stderr}");
    let out = read_parquet(&dir.join("out.parquet"));
    let ids = strings(&out, "id");
    let vectors = vectors(&out, "embedding");
    let last = fixture.num_layers;
    let cases: Vec<_> = fixture.cases.iter().filter(|c| c.input.is_some()).collect();
    assert_eq!(
        ids.len(),
        cases.len(),
        "every row, the chain break included"
    );
    for ((id, v), case) in ids.iter().zip(&vectors).zip(&cases) {
        assert_eq!(id.as_deref(), Some(case.id.as_str()));
        let want = fixture.get_vec(&format!("{}.mean.{last}", case.id));
        assert_close_vec(v, &want, 1e-4, &case.id);
    }
    // The crop of ESM C is the default --max-length: the 1022-residue case is whole.
    use parquet::file::reader::FileReader;
    let file = std::fs::File::open(dir.join("out.parquet")).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    let footer = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap();
    let meta = footer
        .iter()
        .find(|kv| kv.key == esmbed::output::METADATA_KEY)
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(meta.value.as_deref().unwrap()).unwrap();
    assert_eq!(meta["max_length"], 2046, "{meta}");

    // The same weights as the `esm` package saves them (`.pth`): the same rows, bitwise.
    let pth = "naming/esmc_package/tiny_esmc.pth";
    let (code, stderr) = embed(
        &dir,
        pth,
        &["-o", "pth.parquet", "--tokens-per-batch", "300"],
    );
    assert_eq!(code, 0, "{stderr}");
    let from_pth = crate::common::vectors(&read_parquet(&dir.join("pth.parquet")), "embedding");
    assert!(from_pth == vectors, "the .pth embeds as the HF directory");

    // For ESM-2, `|` is not a token: that row is an error naming the character and the fix.
    let (code, stderr) = embed(&dir, "tiny_h16", &["-o", "esm2.parquet"]);
    assert_eq!(code, 0, "{stderr}");
    let errors = read_parquet(&dir.join("esm2.errors.parquet"));
    assert_eq!(strings(&errors, "id"), [Some("chains".to_string())]);
    let reason = strings(&errors, "reason")[0].clone().unwrap();
    assert!(
        reason.contains("'|'") && reason.contains("ESM C"),
        "{reason}"
    );
}

#[test]
fn esm_embed_in_sql_equals_esmbed_embed_for_esmc() {
    let dir = scratch("esmc-sql");
    fasta(&dir);
    let (code, stderr) = embed(&dir, MODEL, &["-o", "embed.parquet"]);
    assert_eq!(code, 0, "{stderr}");
    let model = fixture_dir(MODEL);
    let query = "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION 'in.fasta'; \
                 COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO 'sql.parquet'";
    let sql = [
        "sql",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "-c",
        query,
    ];
    let (code, _, stderr) = esmbed_in(&dir, sql);
    assert_eq!(code, 0, "{stderr}");
    let (a, b) = (
        read_parquet(&dir.join("embed.parquet")),
        read_parquet(&dir.join("sql.parquet")),
    );
    let by_id = |batch: &arrow::array::RecordBatch| {
        let mut rows: Vec<_> = strings(batch, "id")
            .into_iter()
            .zip(vectors(batch, "embedding"))
            .collect();
        rows.sort_by(|x, y| x.0.cmp(&y.0));
        rows
    };
    let (a, b) = (by_id(&a), by_id(&b));
    assert_eq!(a.len(), b.len());
    for ((id, x), (_, y)) in a.iter().zip(&b) {
        assert_close_vec(x, y, 1e-5, id.as_deref().unwrap_or("?"));
    }
}

#[test]
fn esmc_jobs_on_two_workers_and_resumed_equal_a_plain_one() {
    let dir = scratch("esmc-workers");
    let (input, _) = fasta(&dir);
    let model = load_embedder(MODEL);
    let one = |name: &str, workers: usize| {
        let devices = (0..workers)
            .map(|_| {
                std::sync::Arc::new(load_embedder(MODEL))
                    as std::sync::Arc<dyn esmbed::engine::PackEmbedder>
            })
            .collect();
        let output = dir.join(name);
        run_job(&input, &output, &model, devices, 200, 3).unwrap();
        read_parquet(&output)
    };
    let (a, b) = (one("one.parquet", 1), one("two.parquet", 2));
    assert_eq!(a.column_by_name("embedding"), b.column_by_name("embedding"));

    // Killed after some parts, resumed: the same bits as the uninterrupted run.
    let model_dir = fixture_dir(MODEL);
    let args = [
        "embed",
        "in.fasta",
        "-o",
        "resumed.parquet",
        "--rows-per-part",
        "2",
        "--no-progress",
        "--tokens-per-batch",
        "200",
        "--model",
        model_dir.to_str().unwrap(),
    ];
    kill_after_parts(&dir, &args, "resumed.parquet", 2);
    let (code, stderr) = embed(
        &dir,
        MODEL,
        &[
            "-o",
            "resumed.parquet",
            "--rows-per-part",
            "2",
            "--tokens-per-batch",
            "200",
            "--resume",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resumed:"), "{stderr}");
    let (code, stderr) = embed(
        &dir,
        MODEL,
        &[
            "-o",
            "plain.parquet",
            "--rows-per-part",
            "2",
            "--tokens-per-batch",
            "200",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let (r, p) = (
        read_parquet(&dir.join("resumed.parquet")),
        read_parquet(&dir.join("plain.parquet")),
    );
    assert_eq!(r.column_by_name("embedding"), p.column_by_name("embedding"));
}
