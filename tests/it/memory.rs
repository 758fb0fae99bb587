//! `pipeline::memory`: rows held in memory (the Python package's `Embedder.embed`) give the file
//! job's output, with errors about the caller's rows rather than the scratch files.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use esmbed::input::InputOptions;
use esmbed::pipeline::memory::{self, MemoryInput, MemoryOutput};
use esmbed::pipeline::spec::ModelView;
use esmbed::pipeline::{JobOptions, ModelIdentity};

use crate::common::{job_options, load_embedder, read_parquet, run_job_with, scratch};

fn rows(ids: &[&str], sequences: &[Option<&str>]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("sequence", DataType::Utf8, true),
    ]));
    let columns = vec![
        Arc::new(StringArray::from(ids.to_vec())) as _,
        Arc::new(StringArray::from(sequences.to_vec())) as _,
    ];
    RecordBatch::try_new(schema, columns).unwrap()
}

fn options(strict: bool) -> JobOptions {
    let mut options = job_options();
    options.plan.tokens_per_batch = 64;
    options.rows_per_part = 3;
    options.strict = strict;
    options
}

fn run_in_memory(batch: RecordBatch, strict: bool) -> esmbed::Result<MemoryOutput> {
    let embedder = Arc::new(load_embedder("tiny_h16"));
    let input = MemoryInput {
        schema: batch.schema(),
        batches: vec![batch],
        options: InputOptions::default(),
        name: "my rows".into(),
    };
    let identity = ModelIdentity {
        name: "fixture".into(),
        fingerprint: "test".into(),
    };
    let devices = vec![embedder.clone() as Arc<dyn esmbed::engine::PackEmbedder>];
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(memory::run(
            input,
            &ModelView::of(&embedder),
            identity,
            options(strict),
            devices,
            Arc::new(AtomicBool::new(false)),
        ))
}

#[test]
fn in_memory_rows_equal_the_file_job() {
    let ids = ["a", "b", "c", "d", "e", "f", "g"];
    let seqs = [
        Some("MKTAYIAKQR"),
        Some("MSEQ"),
        Some("MKJ1"),
        None,
        Some("MKTAYIAKQR"),
        Some("GGGGAAAV"),
        Some(""),
    ];
    let batch = rows(&ids, &seqs);
    let out = run_in_memory(batch.clone(), false).unwrap();

    let dir = scratch("memory_equals_file");
    let input = dir.join("in.parquet");
    esmbed::output::write_parquet(&input, &batch, None).unwrap();
    let embedder = load_embedder("tiny_h16");
    let output = dir.join("out.parquet");
    let workers =
        vec![Arc::new(load_embedder("tiny_h16")) as Arc<dyn esmbed::engine::PackEmbedder>];
    let summary =
        run_job_with(&input, &output, &embedder, workers, |o| *o = options(false)).unwrap();
    let file = read_parquet(&output);
    let memory = arrow::compute::concat_batches(&out.schema, &out.batches).unwrap();
    assert_eq!(memory.schema().fields(), file.schema().fields());
    assert_eq!(
        memory.columns(),
        file.columns(),
        "bitwise the file job's rows"
    );
    let metadata = &out.schema.metadata()[esmbed::output::METADATA_KEY];
    assert!(metadata.contains("\"model\":\"fixture\""), "{metadata}");
    assert_eq!(
        (out.summary.rows, out.summary.embedded, out.summary.errors),
        (7, 4, 3)
    );
    assert_eq!(summary.embedded, out.summary.embedded);
    assert_eq!(out.summary.output, "my rows");

    let errors = arrow::compute::concat_batches(&out.errors[0].schema(), &out.errors).unwrap();
    let file_errors = read_parquet(std::path::Path::new(&summary.errors_output.unwrap()));
    for column in ["id", "position", "record", "problem", "reason"] {
        assert_eq!(
            errors.column_by_name(column),
            file_errors.column_by_name(column),
            "{column}"
        );
    }
    let inputs = errors.column_by_name("input").unwrap();
    let inputs = inputs.as_any().downcast_ref::<StringArray>().unwrap();
    assert!(inputs.iter().all(|v| v == Some("my rows")));
}

#[test]
fn in_memory_errors_name_the_callers_rows() {
    let strict = run_in_memory(rows(&["a", "b"], &[Some("MKT"), Some("MK1")]), true).unwrap_err();
    assert_eq!(strict.kind(), esmbed::ErrorKind::BadInput);
    let message = strict.to_string();
    assert!(message.starts_with("my rows record 2 (id b)"), "{message}");
    assert!(!message.contains("input.parquet"), "{message}");

    let duplicate =
        run_in_memory(rows(&["a", "a"], &[Some("MKT"), Some("MKV")]), false).unwrap_err();
    assert!(duplicate.to_string().contains("my rows"), "{duplicate}");
    assert!(
        !duplicate.to_string().contains("input.parquet"),
        "{duplicate}"
    );
}

#[test]
fn empty_rows_give_an_empty_output_with_the_schema() {
    let out = run_in_memory(rows(&[], &[]), false).unwrap();
    assert!(out.batches.is_empty() && out.errors.is_empty());
    let names: Vec<_> = out
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["id", "length", "truncated", "embedding"]);
}
