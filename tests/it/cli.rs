//! `esmbed embed` end to end, as a subprocess: FASTA and Parquet in, Parquet out, equal to the
//! library API and to the transformers reference; order, pass-through columns, layers, dtypes,
//! datasets, errors, duplicate ids, existing outputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use arrow::array::{Array, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use esmbed::{DType, Device, EmbedOptions, Embedder, Pooling};

fn model(name: &str) -> String {
    fixture_dir(name).display().to_string()
}

fn write_fasta(path: &Path, records: &[(&str, &str)]) {
    let text: String = records
        .iter()
        .map(|(id, seq)| format!(">{id}\n{seq}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn embed_ok(args: &[&str]) -> String {
    let (code, _, stderr) = esmbed(args);
    assert_eq!(code, 0, "esmbed {args:?} failed:\n{stderr}");
    stderr
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn fasta_to_parquet_equals_reference_and_library() {
    let fixture = Fixture::load("tiny_h16");
    let dir = scratch("fasta-ref");
    // Every text case of the reference, in its order (lengths 1 … 1022, rare, lowercase, `*`).
    let cases: Vec<_> = fixture.cases.iter().filter(|c| c.input.is_some()).collect();
    let text: String = cases
        .iter()
        .map(|c| format!(">{} case {}\n{}\n", c.id, c.id, c.input.as_ref().unwrap()))
        .collect();
    let input = dir.join("in.fasta");
    std::fs::write(&input, text).unwrap();
    let out = dir.join("out.parquet");
    embed_ok(&[
        "embed",
        p(&input),
        "-o",
        p(&out),
        "--model",
        &model("tiny_h16"),
        "--layers",
        "0,-1",
        "--tokens-per-batch",
        "1100",
        "--rows-per-part",
        "3",
    ]);
    let batch = read_parquet(&out);
    let ids: Vec<String> = strings(&batch, "id")
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(
        ids,
        cases.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        "input order"
    );
    assert_eq!(
        strings(&batch, "description")[0].as_deref(),
        Some("case len1")
    );
    let lengths = batch
        .column_by_name("length")
        .unwrap()
        .as_primitive::<arrow::datatypes::Int32Type>();
    let n = fixture.num_layers;
    let last = vectors(&batch, "embedding");
    let first = vectors(&batch, "embedding_0");
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(lengths.value(i) as usize, case.length);
        let what = case.id.clone();
        assert_close_vec(
            &last[i],
            &fixture.get_vec(&format!("{}.mean.{n}", case.id)),
            1e-4,
            &what,
        );
        assert_close_vec(
            &first[i],
            &fixture.get_vec(&format!("{}.mean.0", case.id)),
            1e-4,
            &what,
        );
    }

    // The library API gives the same numbers.
    let embedder = Embedder::load(
        &model("tiny_h16"),
        &Device::Cpu,
        DType::F32,
        &EmbedOptions::default(),
    )
    .unwrap();
    let inputs: Vec<&str> = cases.iter().map(|c| c.input.as_deref().unwrap()).collect();
    let api = embedder.embed(&inputs).unwrap();
    for (i, e) in api.iter().enumerate() {
        let err = relative_error(&last[i], e.layers[0].mean.as_ref().unwrap());
        assert!(err <= 1e-6, "row {i}: CLI and library differ by {err:.2e}");
    }
}

fn parquet_input(path: &Path, rows: &[(i64, Option<&str>, &str)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("acc", DataType::Int64, false),
        Field::new("aa", DataType::Utf8, true),
        Field::new("organism", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.0 as f64 / 2.0),
            )),
        ],
    )
    .unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None)
            .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_to_parquet_passes_columns_through() {
    let dir = scratch("parquet-pass");
    let input = dir.join("in.parquet");
    let rows = [
        (10, Some("MKTVRQGLAGVSERTIDPK"), "E. coli"),
        (11, Some("MA"), "human"),
        (12, None, "yeast"),
        (13, Some("MKJ"), "mouse"),
        (14, Some("ACDEFGHIKLMNPQRSTVWY"), "rat"),
    ];
    parquet_input(&input, &rows);
    let out = dir.join("out.parquet");
    embed_ok(&[
        "embed",
        p(&input),
        "-o",
        p(&out),
        "--model",
        &model("tiny_h64"),
        "--seq-column",
        "aa",
        "--id-column",
        "acc",
        "--bos",
        "--per-residue",
        "--output-dtype",
        "f16",
    ]);
    let batch = read_parquet(&out);
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "acc",
            "organism",
            "score",
            "length",
            "truncated",
            "embedding",
            "bos_embedding",
            "residue_embeddings"
        ]
    );
    assert_eq!(
        strings(&batch, "acc"),
        ["10", "11", "14"].map(|s| Some(s.to_string()))
    );
    assert_eq!(
        strings(&batch, "organism"),
        ["E. coli", "human", "rat"].map(|s| Some(s.to_string()))
    );
    let score = batch
        .column_by_name("score")
        .unwrap()
        .as_primitive::<arrow::datatypes::Float64Type>();
    assert_eq!(score.values().to_vec(), [5.0, 5.5, 7.0]);
    assert!(matches!(
        batch.column_by_name("embedding").unwrap().data_type(),
        DataType::FixedSizeList(f, 128) if f.data_type() == &DataType::Float16
    ));
    // Per-residue rows: one vector per residue.
    let residues = batch
        .column_by_name("residue_embeddings")
        .unwrap()
        .as_list::<i32>();
    assert_eq!(residues.value(0).len(), 19);
    assert_eq!(residues.value(1).len(), 2);

    // f16 output equals the library's f32 numbers rounded.
    let options = EmbedOptions {
        pooling: Pooling {
            mean: true,
            bos: true,
            per_residue: true,
        },
        ..EmbedOptions::default()
    };
    let embedder = Embedder::load(&model("tiny_h64"), &Device::Cpu, DType::F32, &options).unwrap();
    let api = embedder
        .embed(&["MKTVRQGLAGVSERTIDPK", "MA", "ACDEFGHIKLMNPQRSTVWY"])
        .unwrap();
    let means = vectors(&batch, "embedding");
    for (i, e) in api.iter().enumerate() {
        let err = relative_error(&means[i], e.layers[0].mean.as_ref().unwrap());
        assert!(err < 2e-3, "row {i}: f16 output off by {err:.2e}");
    }

    // The errors file lists the null and the invalid row, with their ids and positions.
    let errors = read_parquet(&dir.join("out.errors.parquet"));
    assert_eq!(
        strings(&errors, "id"),
        [Some("12".into()), Some("13".into())]
    );
    assert_eq!(
        strings(&errors, "position"),
        [Some("2".into()), Some("3".into())]
    );
    let reasons = strings(&errors, "reason");
    assert_eq!(reasons[0].as_deref(), Some("sequence is null"));
    assert!(
        reasons[1].as_deref().unwrap().contains("'J' at position 3"),
        "{reasons:?}"
    );
}

#[test]
fn dataset_output_and_parts_equal_single_file() {
    let dir = scratch("dataset");
    let input = examples_fasta();
    let single = dir.join("one.parquet");
    let dataset = dir.join("many/");
    let common = ["--model", &model("tiny_h16")];
    embed_ok(&[&["embed", p(&input), "-o", p(&single)][..], &common[..]].concat());
    embed_ok(
        &[
            &[
                "embed",
                p(&input),
                "-o",
                p(&dataset),
                "--rows-per-part",
                "4",
            ][..],
            &common[..],
        ]
        .concat(),
    );
    let parts: Vec<_> = std::fs::read_dir(&dataset)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("part-"))
        .collect();
    assert_eq!(parts.len(), 4, "15 rows in parts of 4: {parts:?}");
    assert!(dataset.join("_manifest.json").is_file());
    assert!(!dataset.join("_esmbed").exists(), "staging removed");
    let a = read_parquet(&single);
    let b = read_parquet(&dataset);
    assert_eq!(strings(&a, "id"), strings(&b, "id"));
    assert_eq!(vectors(&a, "embedding"), vectors(&b, "embedding"));
    // No staging directory, no errors file, nothing else beside the single file.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let (code, stdout, _) = esmbed(["inspect", p(&dataset)]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("4 part files, 15 rows, complete"),
        "{stdout}"
    );
    assert!(stdout.contains("model_fingerprint"), "{stdout}");
}

fn examples_fasta() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/some_proteins.fasta")
}

#[test]
fn existing_output_is_never_overwritten_silently() {
    let dir = scratch("exists");
    let input = dir.join("in.fa");
    write_fasta(&input, &[("a", "MKTV"), ("b", "MKLL")]);
    let out = dir.join("out.parquet");
    let args = [
        "embed",
        p(&input),
        "-o",
        p(&out),
        "--model",
        &model("tiny_h16"),
    ];
    embed_ok(&args);
    let before = std::fs::read(&out).unwrap();
    let (code, _, stderr) = esmbed(args);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("already exists") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    let (code, _, stderr) = esmbed([&args[..], &["--resume"]].concat());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nothing to resume"), "{stderr}");
    embed_ok(&[&args[..], &["--overwrite"]].concat());
    assert_eq!(std::fs::read(&out).unwrap(), before, "deterministic output");
}

#[test]
fn duplicate_ids_stop_before_model_work_unless_deduped() {
    let dir = scratch("dups");
    let input = dir.join("in.fa");
    write_fasta(&input, &[("a", "MKTV"), ("b", "MKLL"), ("a", "MAAA")]);
    let out = dir.join("out.parquet");
    let args = [
        "embed",
        p(&input),
        "-o",
        p(&out),
        "--model",
        &model("tiny_h16"),
    ];
    let (code, _, stderr) = esmbed(args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("duplicate id \"a\""), "{stderr}");
    assert!(
        stderr.contains("record 1") && stderr.contains("record 3"),
        "{stderr}"
    );
    assert!(stderr.contains("--dedupe"), "{stderr}");
    assert!(!out.exists());
    embed_ok(&[&args[..], &["--dedupe", "--overwrite"]].concat());
    assert_eq!(
        strings(&read_parquet(&out), "id"),
        [Some("a".into()), Some("b".into())]
    );
    let errors = read_parquet(&dir.join("out.errors.parquet"));
    assert!(strings(&errors, "reason")[0]
        .as_deref()
        .unwrap()
        .contains("duplicate id"));
}

#[test]
fn strict_stops_at_the_first_bad_record() {
    let dir = scratch("strict");
    let input = dir.join("in.fa");
    write_fasta(&input, &[("a", "MKTV"), ("b", "MK1L")]);
    let out = dir.join("out.parquet");
    let (code, _, stderr) = esmbed([
        "embed",
        p(&input),
        "-o",
        p(&out),
        "--model",
        &model("tiny_h16"),
        "--strict",
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("record 2 (id b)") && stderr.contains("'1' at position 3"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn long_sequences_truncate_error_or_window() {
    let dir = scratch("long");
    let input = dir.join("in.fa");
    let long: String = "MKTVRQGLAGVSERTIDPKQNFYWHC".repeat(4); // 104 residues
    write_fasta(&input, &[("short", "MKTV"), ("long", &long)]);
    let run = |policy: &str, name: &str| {
        let out = dir.join(name);
        embed_ok(&[
            "embed",
            p(&input),
            "-o",
            p(&out),
            "--model",
            &model("tiny_h16"),
            "--max-length",
            "40",
            "--long",
            policy,
        ]);
        out
    };
    let t = read_parquet(&run("truncate", "t.parquet"));
    let truncated = t.column_by_name("truncated").unwrap().as_boolean();
    assert!(!truncated.value(0) && truncated.value(1));
    assert_eq!(
        t.column_by_name("length")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int32Type>()
            .value(1),
        104
    );
    // Truncation embeds the first 40 residues.
    let embedder = Embedder::load(
        &model("tiny_h16"),
        &Device::Cpu,
        DType::F32,
        &EmbedOptions::default(),
    )
    .unwrap();
    let first40 = embedder.embed(&[&long[..40]]).unwrap();
    let err = relative_error(
        &vectors(&t, "embedding")[1],
        first40[0].layers[0].mean.as_ref().unwrap(),
    );
    assert!(err < 1e-6, "{err}");

    let e = read_parquet(&run("error", "e.parquet"));
    assert_eq!(e.num_rows(), 1);
    let errors = read_parquet(&dir.join("e.errors.parquet"));
    assert!(strings(&errors, "reason")[0]
        .as_deref()
        .unwrap()
        .contains("104 residues"));

    let w = read_parquet(&run("window", "w.parquet"));
    assert_eq!(w.num_rows(), 2);
    let windowed = &vectors(&w, "embedding")[1];
    assert!(windowed.iter().all(|x| x.is_finite()));
    assert!(relative_error(windowed, first40[0].layers[0].mean.as_ref().unwrap()) > 1e-3);
}

#[test]
fn outputs_read_in_pyarrow_and_duckdb() {
    let python = std::process::Command::new("python3")
        .args(["-c", "import pyarrow, duckdb"])
        .status();
    if !python.is_ok_and(|s| s.success()) {
        assert!(!in_ci(), "CI must install pyarrow and duckdb (.ci/run)");
        eprintln!(
            "skipping: python3 with pyarrow and duckdb not available (pip install pyarrow duckdb)"
        );
        return;
    }
    let dir = scratch("readers");
    let out = dir.join("out.parquet");
    embed_ok(&[
        "embed",
        p(&examples_fasta()),
        "-o",
        p(&out),
        "--model",
        &model("tiny_h64"),
        "--per-residue",
        "--output-dtype",
        "f16",
        "--layers",
        "1,-1",
    ]);
    let script = format!(
        r#"
import pyarrow as pa, pyarrow.parquet as pq, duckdb, json
t = pq.read_table({out:?})
assert t.num_rows == 15, t.num_rows
ty = t.schema.field("embedding").type
assert pa.types.is_fixed_size_list(ty) and ty.list_size == 128 and ty.value_type == pa.float16(), ty
meta = json.loads(t.schema.metadata[b"esmbed"])
assert meta["layers"] == [1, 2], meta
con = duckdb.connect()
n, dim, res = con.execute("select count(*), max(len(embedding_1)), sum(len(residue_embeddings)) from read_parquet('{glob}')").fetchone()
assert (n, dim) == (15, 128), (n, dim)
total = sum(t.column("length").to_pylist())
assert res == total, (res, total)
first = con.execute("select id from read_parquet('{glob}') limit 1").fetchone()[0]
assert first == "UniRef50_A0A1E3NP16", first
print("ok")
"#,
        out = out.display().to_string(),
        glob = out.display()
    );
    let output = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn help_teaches() {
    let (code, stdout, _) = esmbed(["embed", "--help"]);
    assert_eq!(code, 0);
    for needle in [
        "--resume",
        "--tokens-per-batch",
        "--long",
        "esmbed embed proteins.fasta.gz",
        "errors.parquet",
    ] {
        assert!(stdout.contains(needle), "--help lacks {needle}");
    }
    let (code, _, stderr) = esmbed(["embed", "x.fa", "-o", "y.parquet", "--device", "cuda"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("no such file") || stderr.contains("without GPU support"),
        "{stderr}"
    );
}

#[test]
fn missing_inputs_and_models_are_named() {
    let dir = scratch("missing");
    let out = dir.join("o.parquet");
    let (code, _, stderr) = esmbed([
        "embed",
        "/nonexistent/x.fa",
        "-o",
        p(&out),
        "--model",
        &model("tiny_h16"),
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/x.fa") && stderr.contains("no such file"),
        "{stderr}"
    );
    let input = dir.join("in.fa");
    write_fasta(&input, &[("a", "MKTV")]);
    let (code, _, stderr) = esmbed([
        "embed",
        p(&input),
        "-o",
        p(&out),
        "--model",
        "facebook/esm2_t6_8M_UR50D",
    ]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

/// `--json` output: one JSON value per line.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn bench_runs_on_the_cpu_and_reports_json() {
    let (code, stdout, stderr) = esmbed([
        "bench",
        "--shape",
        "8M",
        "--device",
        "cpu",
        "-n",
        "6",
        "--warmup",
        "0",
        "--method",
        "packed,padded",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows = json_lines(&stdout);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["method"], "packed");
    assert_eq!(rows[1]["method"], "padded");
    assert_eq!(rows[0]["tokens"], rows[1]["tokens"]);
    assert!(rows[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(rows[1]["computed_tokens"].as_u64() >= rows[0]["computed_tokens"].as_u64());
    assert_eq!(rows[0]["padding_efficiency"], 1.0);
    assert_eq!(rows[0]["dtype"], "f32");
    assert_eq!(rows[0]["attention"], "exact");
}

/// `esmbed verify` of the CPU f32 path against itself: the same numbers (the report's measures
/// are computed, the reference once for both dtypes), the head's top-1 agreeing everywhere; FP8
/// on the CPU is refused naming the fix.
#[test]
fn verify_reports_each_dtype_against_the_cpu_reference() {
    let model = fixture_dir("tiny_h16");
    let model = model.to_str().unwrap();
    let args = |dtype| {
        [
            "verify", "--model", model, "--device", "cpu", "--dtype", dtype, "-n", "2", "--json",
        ]
    };
    let (code, stdout, stderr) = esmbed(args("f32,f32"));
    assert_eq!(code, 0, "{stderr}");
    let rows = json_lines(&stdout);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["dtype"], "f32");
        assert_eq!(row["sequences"], 7);
        assert!(row["min_cosine"].as_f64().unwrap() > 0.999_999, "{row}");
        assert!(row["mean_cosine"].as_f64().unwrap() > 0.999_999, "{row}");
        assert_eq!(row["mean_max_abs_error"], 0.0, "{row}");
        assert_eq!(row["top1_agreement"], 1.0, "{row}");
        assert_eq!(row["invariance_max_abs"], 0.0, "{row}");
    }
    let (code, _, stderr) = esmbed(args("fp8"));
    assert_ne!(code, 0);
    assert!(stderr.contains("--dtype fp8 runs on CUDA GPUs"), "{stderr}");
}

#[test]
fn bench_no_pack_measures_padded_batches_only() {
    let (code, stdout, stderr) = esmbed([
        "bench",
        "--shape",
        "8M",
        "--device",
        "cpu",
        "-n",
        "4",
        "--warmup",
        "0",
        "--no-pack",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows = json_lines(&stdout);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["method"], "padded");
    let (code, _, stderr) = esmbed(["bench", "--no-pack", "--method", "packed"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn random_models_run_whole_jobs() {
    let dir = scratch("random-model");
    let input = dir.join("in.fa");
    write_fasta(&input, &[("a", "MKTVRQG"), ("b", "MKLLAG")]);
    let out = dir.join("out.parquet");
    embed_ok(&["embed", p(&input), "-o", p(&out), "--model", "random:8M"]);
    let batch = read_parquet(&out);
    assert_eq!(batch.num_rows(), 2);
    assert_eq!(vectors(&batch, "embedding")[0].len(), 320);
    let (code, _, stderr) = esmbed([
        "embed",
        p(&input),
        "-o",
        p(&dir.join("x.parquet")),
        "--model",
        "random:7B",
    ]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("unknown shape"), "{stderr}");
}

#[test]
fn shards_split_the_inputs_without_overlap() {
    let dir = scratch("shards");
    let input_dir = dir.join("in");
    std::fs::create_dir_all(&input_dir).unwrap();
    let inputs: Vec<PathBuf> = (0..3)
        .map(|k| {
            let path = input_dir.join(format!("in{k}.fasta"));
            let ids: Vec<String> = (0..4).map(|i| format!("f{k}s{i}")).collect();
            let records: Vec<(&str, &str)> = ids
                .iter()
                .map(|id| (id.as_str(), "MKTAYIAKQRQISFVKSHFSRQ"))
                .collect();
            write_fasta(&path, &records);
            path
        })
        .collect();
    let tiny = model("tiny_h16");
    let mut seen = Vec::new();
    for shard in ["0/2", "1/2"] {
        let out = dir.join(format!("shard{}.parquet", &shard[..1]));
        embed_ok(&[
            "embed",
            p(&input_dir),
            "-o",
            p(&out),
            "--model",
            &tiny,
            "--device",
            "cpu",
            "--shard",
            shard,
        ]);
        seen.extend(strings(&read_parquet(&out), "id").into_iter().flatten());
    }
    // Shard 0 has files 0 and 2, shard 1 file 1: every row once.
    seen.sort();
    let mut all: Vec<String> = (0..3)
        .flat_map(|k| (0..4).map(move |i| format!("f{k}s{i}")))
        .collect();
    all.sort();
    assert_eq!(seen, all);
    assert_eq!(inputs.len(), 3);
    let (code, _, err) = esmbed(["embed", p(&input_dir), "-o", "x.parquet", "--shard", "2/2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("0 <= I < N"), "{err}");
}
