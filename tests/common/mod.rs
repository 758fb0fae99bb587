//! Shared helpers of the integration tests: fixture models and reference outputs, tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use esmbed::{Checkpoint, DType, Device, Model, ModelSource};

/// One reference case of `reference.json`.
#[derive(Debug, serde::Deserialize)]
pub struct Case {
    pub id: String,
    pub input: Option<String>,
    pub tokens: Vec<u32>,
    pub length: usize,
}

#[derive(serde::Deserialize)]
struct ReferenceJson {
    num_layers: usize,
    hidden_size: usize,
    cases: Vec<Case>,
}

/// A fixture model directory with its transformers reference outputs.
pub struct Fixture {
    pub dir: PathBuf,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub cases: Vec<Case>,
    tensors: HashMap<String, candle_core::Tensor>,
}

/// `tests/fixtures/<name>`: relative to the working directory when it has them (test binaries
/// carried to the GPU machine run from a copy of the tree), else to the crate.
pub fn fixture_dir(name: &str) -> PathBuf {
    let local = PathBuf::from("tests/fixtures").join(name);
    if local.is_dir() {
        return std::fs::canonicalize(local).unwrap();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let dir = fixture_dir(name);
        let json = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let parsed: ReferenceJson = serde_json::from_str(&json).unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        Self {
            dir,
            num_layers: parsed.num_layers,
            hidden_size: parsed.hidden_size,
            cases: parsed.cases,
            tensors,
        }
    }

    /// The model loaded from the HF directory, f32 on the CPU.
    pub fn hf_model(&self) -> Model {
        let checkpoint = Checkpoint::open(&ModelSource::HfDir(self.dir.clone())).unwrap();
        Model::load(&checkpoint, &Device::Cpu, DType::F32, false).unwrap()
    }

    pub fn get(&self, key: &str) -> Option<candle_core::Tensor> {
        self.tensors.get(key).cloned()
    }

    pub fn get_vec(&self, key: &str) -> Vec<f32> {
        self.get(key)
            .unwrap_or_else(|| panic!("reference has no {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

/// max |a - b| / max |b|.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

pub fn assert_close_vec(a: &[f32], b: &[f32], tolerance: f32, what: &str) -> f32 {
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let err = relative_error(a, b);
    assert!(
        err <= tolerance,
        "{what}: relative error {err:.3e} > {tolerance:.0e}"
    );
    err
}

pub fn assert_close(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    tolerance: f32,
    what: &str,
) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_close_vec(&a, &b, tolerance, what)
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("esmbed-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run the esmbed binary; returns (exit code, stdout, stderr).
pub fn esmbed<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    esmbed_in(std::path::Path::new("."), args)
}

/// [`esmbed`] in the directory `dir` (relative input and output paths resolve there).
pub fn esmbed_in<I, S>(dir: &std::path::Path, args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_esmbed"))
        .args(args)
        .current_dir(dir)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("ESMBED_MODEL")
        .output()
        .expect("esmbed runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Read a Parquet file (or every part of a dataset directory, in name order) into one batch.
pub fn read_parquet(path: &std::path::Path) -> arrow::array::RecordBatch {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("part-")
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut batches = Vec::new();
    let mut schema = None;
    for file in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file).unwrap())
            .unwrap()
            .build()
            .unwrap();
        schema = Some(arrow::array::RecordBatchReader::schema(&reader));
        for b in reader {
            batches.push(b.unwrap());
        }
    }
    arrow::compute::concat_batches(&schema.unwrap(), &batches).unwrap()
}

/// A string column as `Option<String>`s.
pub fn strings(batch: &arrow::array::RecordBatch, name: &str) -> Vec<Option<String>> {
    use arrow::array::{Array, AsArray};
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8).unwrap();
    let col = col.as_string::<i32>();
    (0..col.len())
        .map(|i| col.is_valid(i).then(|| col.value(i).to_string()))
        .collect()
}

/// A `FixedSizeList<Float32|Float16>` column as vectors.
pub fn vectors(batch: &arrow::array::RecordBatch, name: &str) -> Vec<Vec<f32>> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float16Type, Float32Type};
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let list = col.as_fixed_size_list();
    (0..list.len())
        .map(|i| {
            let v = list.value(i);
            match v.data_type() {
                arrow::datatypes::DataType::Float32 => {
                    v.as_primitive::<Float32Type>().values().to_vec()
                }
                arrow::datatypes::DataType::Float16 => v
                    .as_primitive::<Float16Type>()
                    .values()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect(),
                other => panic!("unexpected element type {other}"),
            }
        })
        .collect()
}

/// Whether this is a CI run (then optional tools must be present instead of skipped).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// A fixture model on the CPU in f32, default output options.
pub fn load_embedder(name: &str) -> esmbed::Embedder {
    esmbed::Embedder::load(
        fixture_dir(name).to_str().unwrap(),
        &Device::Cpu,
        DType::F32,
        &esmbed::EmbedOptions::default(),
    )
    .unwrap()
}

/// The options of a test job: packs of 4096 tokens, parts of 1,000 rows, truncation at 1022,
/// reuse on, an existing output replaced.
pub fn job_options() -> esmbed::pipeline::JobOptions {
    use esmbed::pipeline::plan::{LongPolicy, PlanOptions};
    use esmbed::pipeline::JobOptions;
    JobOptions {
        plan: PlanOptions {
            tokens_per_batch: 4096,
            max_length: 1022,
            long: LongPolicy::Truncate,
            pll: false,
        },
        rows_per_part: 1000,
        strict: false,
        dedupe: false,
        output_dtype: Default::default(),
        resume: false,
        overwrite: true,
        warm_up: false,
        reuse: true,
        reuse_memory: JobOptions::DEFAULT_REUSE_MEMORY,
    }
}

/// Run a library job (`esmbed embed` without the CLI): `input` into `output` (replaced if it
/// exists), packs of `tokens_per_batch` tokens, parts of `rows_per_part` rows, on `workers`.
/// `model` describes the output (layers, pooling, width).
pub fn run_job(
    input: &std::path::Path,
    output: &std::path::Path,
    model: &esmbed::Embedder,
    workers: Vec<std::sync::Arc<dyn esmbed::engine::PackEmbedder>>,
    tokens_per_batch: usize,
    rows_per_part: usize,
) -> esmbed::Result<esmbed::pipeline::JobSummary> {
    run_job_with(input, output, model, workers, |o| {
        o.plan.tokens_per_batch = tokens_per_batch;
        o.rows_per_part = rows_per_part;
    })
}

/// [`run_job`] with the job's options as `edit` leaves them.
pub fn run_job_with(
    input: &std::path::Path,
    output: &std::path::Path,
    model: &esmbed::Embedder,
    workers: Vec<std::sync::Arc<dyn esmbed::engine::PackEmbedder>>,
    edit: impl FnOnce(&mut esmbed::pipeline::JobOptions),
) -> esmbed::Result<esmbed::pipeline::JobSummary> {
    use esmbed::input::{InputOptions, Inputs};
    use esmbed::pipeline::{JobSpec, ModelIdentity};
    let inputs = Inputs::open(&[input.to_path_buf()], InputOptions::default()).unwrap();
    let mut options = job_options();
    edit(&mut options);
    let identity = ModelIdentity {
        name: "fixture".into(),
        fingerprint: "test".into(),
    };
    let spec = JobSpec::new(inputs, output, model, identity, options);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(esmbed::pipeline::run(
            spec,
            workers,
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ))
}

/// Fails like a GPU out of memory on packs over `max_tokens`, and on any pack holding a sequence
/// of exactly `poison` tokens.
pub struct Faulty {
    pub inner: esmbed::Embedder,
    pub max_tokens: usize,
    pub poison: usize,
    pub failures: std::sync::atomic::AtomicUsize,
}

impl esmbed::engine::PackEmbedder for Faulty {
    fn embed(
        &self,
        batch: &esmbed::PackedBatch,
        request: esmbed::engine::Request,
    ) -> esmbed::Result<Vec<esmbed::PooledLayer>> {
        let poisoned = (0..batch.len()).any(|i| batch.range(i).len() == self.poison);
        if batch.total_tokens() > self.max_tokens || poisoned {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(esmbed::Error::OutOfMemory {
                detail: "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
            });
        }
        self.inner.embed_request(batch, request)
    }
}

/// A copy of tiny_h16 whose safetensors went through `edit`.
pub fn edited_model(
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, candle_core::Tensor>),
) -> std::path::PathBuf {
    let dir = scratch(&format!("edited-{name}"));
    let src = fixture_dir("tiny_h16");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &esmbed::Device::Cpu)
            .unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// Run `esmbed args` in `dir` with its writer slowed down after each part, and kill it (SIGKILL)
/// once the manifest of `output` lists `parts` finished parts: a job stopped mid-way, for resume
/// tests. Fails the test if that takes over two minutes.
pub fn kill_after_parts(dir: &std::path::Path, args: &[&str], output: &str, parts: usize) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_esmbed"))
        .args(args)
        .current_dir(dir)
        .env("ESMBED_TEST_PART_DELAY_MS", "300")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let manifest = esmbed::output::OutputLayout::new(&dir.join(output)).manifest_path();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&manifest)
        .map(|t| t.matches("first_position").count() < parts)
        .unwrap_or(true)
    {
        assert!(started.elapsed().as_secs() < 120, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !dir.join(output).exists(),
        "a killed job left a complete-looking output"
    );
}
