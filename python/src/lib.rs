//! `esmbed._native`: the esmbed library from Python, wrapped by the pure-Python `esmbed` package.
//!
//! Nothing here computes: rows cross as Arrow C streams (PyCapsules, no copies), options are
//! the library's or the command line's, and every call runs the same job, SQL session or command
//! as `esmbed` does. The model runs without the GIL; Ctrl-C stops a job cleanly (it is polled
//! while the job runs on its own thread) and raises `esmbed.Interrupted`.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ffi_stream::{ArrowArrayStreamReader, FFI_ArrowArrayStream};
use arrow::record_batch::{RecordBatchIterator, RecordBatchReader};
use clap::{Parser, ValueEnum};
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use esmbed::cli::{Cli, Command, UnknownArg};
use esmbed::engine::PackEmbedder;
use esmbed::input::InputOptions;
use esmbed::output::columns::OutputDType;
use esmbed::pipeline::memory::{self, MemoryInput};
use esmbed::pipeline::plan::{LongPolicy, PlanOptions};
use esmbed::pipeline::spec::ModelView;
use esmbed::pipeline::{JobOptions, ModelIdentity};
use esmbed::{DType, Device, EmbedOptions, ErrorKind, Model, Pooling};

/// The PyCapsule name of an Arrow C stream (the Arrow PyCapsule interface).
const STREAM: &CStr = c"arrow_array_stream";

/// A model loaded on its devices, ready to embed rows with any layers and pooling.
#[pyclass(frozen, module = "esmbed._native")]
struct Embedder {
    replicas: Vec<Model>,
    identity: ModelIdentity,
    devices: Vec<Device>,
    dtype: DType,
    tokens_per_batch: usize,
}

#[pymethods]
impl Embedder {
    #[new]
    #[pyo3(signature = (model, device = "auto", dtype = "auto", tokens_per_batch = None))]
    fn new(
        py: Python<'_>,
        model: &str,
        device: &str,
        dtype: &str,
        tokens_per_batch: Option<usize>,
    ) -> PyResult<Self> {
        py.detach(|| -> esmbed::Result<Self> {
            let devices = esmbed::devices::parse(device)?;
            let dtype = esmbed::devices::parse_dtype(dtype, &devices[0])?;
            let loaded =
                esmbed::model::load_model(model, &devices, dtype, esmbed::model::Head::IfPresent)?;
            let hidden = loaded.replicas[0].config().hidden_size;
            let tokens_per_batch = tokens_per_batch.unwrap_or_else(|| {
                esmbed::embed::default_tokens_per_batch_on(&devices, hidden, dtype)
            });
            Ok(Self {
                replicas: loaded.replicas,
                identity: ModelIdentity {
                    name: loaded.name,
                    fingerprint: loaded.fingerprint,
                },
                devices,
                dtype,
                tokens_per_batch: tokens_per_batch.max(1),
            })
        })
        .map_err(|e| library_error(py, &e))
    }

    /// The model as named (hub id, directory, short name).
    #[getter]
    fn model(&self) -> String {
        self.identity.name.clone()
    }

    /// Fingerprint of the weights (as recorded in the output's metadata).
    #[getter]
    fn fingerprint(&self) -> String {
        self.identity.fingerprint.clone()
    }

    /// Width of the embeddings.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.replicas[0].config().hidden_size
    }

    /// Number of layers (layer numbers run from 0, the embeddings, to this, normalized).
    #[getter]
    fn num_layers(&self) -> usize {
        self.replicas[0].config().num_hidden_layers
    }

    /// The devices the model runs on (`cpu`, `cuda:0`, ...).
    #[getter]
    fn devices(&self) -> Vec<String> {
        self.devices.iter().map(esmbed::devices::label).collect()
    }

    /// The compute dtype (`f32`, `bf16`, `f16`).
    #[getter]
    fn dtype(&self) -> String {
        format!("{:?}", self.dtype).to_lowercase()
    }

    /// Tokens per pack.
    #[getter]
    fn tokens_per_batch(&self) -> usize {
        self.tokens_per_batch
    }

    /// Whether the checkpoint's masked-LM head was loaded (needed by `pll`).
    #[getter]
    fn has_head(&self) -> bool {
        self.replicas[0].has_head()
    }

    /// Embed the rows of an Arrow stream; returns (rows, errors, summary as JSON).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (rows, *, seq_column, id_column, name, layers, mean, bos, per_residue,
                        pll, strict, dedupe, reuse, max_length, long, unknown, output_dtype,
                        rows_per_part))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyCapsule>,
        seq_column: String,
        id_column: String,
        name: String,
        layers: Vec<i64>,
        mean: bool,
        bos: bool,
        per_residue: bool,
        pll: bool,
        strict: bool,
        dedupe: bool,
        reuse: bool,
        max_length: Option<usize>,
        long: &str,
        unknown: &str,
        output_dtype: &str,
        rows_per_part: Option<usize>,
    ) -> PyResult<(Bound<'py, PyCapsule>, Bound<'py, PyCapsule>, String)> {
        let (schema, batches) = import_stream(rows)?;
        let long: LongPolicy = parse_choice(py, "long", long)?;
        let unknown: UnknownArg = parse_choice(py, "unknown", unknown)?;
        let output_dtype: OutputDType = parse_choice(py, "output_dtype", output_dtype)?;
        let pooling = Pooling {
            mean,
            bos,
            per_residue,
        };
        if pll && !self.has_head() {
            return Err(usage_error(
                py,
                format!(
                    "pll needs the masked-LM head, and {} has none (an EsmModel checkpoint): \
                     use EsmForMaskedLM weights",
                    self.identity.name
                ),
            ));
        }
        let options = EmbedOptions {
            layers,
            pooling,
            unknown: unknown.into(),
            tokens_per_batch: self.tokens_per_batch,
        };
        let embedders = self
            .replicas
            .iter()
            .map(|m| esmbed::Embedder::new(m.clone(), &options).map(Arc::new))
            .collect::<esmbed::Result<Vec<_>>>()
            .map_err(|e| library_error(py, &e))?;
        let config = self.replicas[0].config();
        let job = JobOptions {
            plan: PlanOptions {
                tokens_per_batch: self.tokens_per_batch,
                max_length: max_length.unwrap_or(config.crop()),
                long,
                pll,
            },
            rows_per_part: rows_per_part
                .unwrap_or_else(|| JobOptions::default_rows_per_part(pll, per_residue)),
            strict,
            dedupe,
            output_dtype,
            resume: false,
            overwrite: true,
            warm_up: !self.devices[0].is_cpu(),
            reuse,
            reuse_memory: JobOptions::DEFAULT_REUSE_MEMORY,
        };
        let input = MemoryInput {
            batches,
            schema,
            options: InputOptions {
                seq_column,
                id_column,
                ..InputOptions::default()
            },
            name,
        };
        let identity = self.identity.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let output = run_interruptible(py, &cancel, {
            let cancel = cancel.clone();
            move || {
                let view = ModelView::of(&embedders[0]);
                let devices: Vec<Arc<dyn PackEmbedder>> = embedders
                    .iter()
                    .map(|e| e.clone() as Arc<dyn PackEmbedder>)
                    .collect();
                runtime()?.block_on(memory::run(input, &view, identity, job, devices, cancel))
            }
        })?
        .map_err(|e| library_error(py, &e))?;
        let summary = serde_json::to_string(&output.summary).expect("summary serializes");
        let errors_schema = esmbed::output::errors_schema();
        Ok((
            export_stream(py, output.schema, output.batches)?,
            export_stream(py, errors_schema, output.errors)?,
            summary,
        ))
    }
}

/// Run `esmbed` with `argv` (the program name first); returns its exit code.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(|| esmbed::cli::main(argv))
}

/// `esmbed embed` with `argv` (its arguments after `embed`); returns the summary as JSON (None
/// for a dry run).
#[pyfunction]
fn embed_file(py: Python<'_>, argv: Vec<String>) -> PyResult<Option<String>> {
    let Command::Embed(args) = parse_command(py, "embed", argv)? else {
        unreachable!("parsed as embed")
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let summary = run_interruptible(py, &cancel, {
        let cancel = cancel.clone();
        move || esmbed::cli::embed::run_with(*args, Some(cancel))
    })?
    .map_err(|e| cli_error(py, &e))?;
    Ok(summary.map(|s| serde_json::to_string(&s).expect("summary serializes")))
}

/// `esmbed sql` with `argv` (its arguments after `sql`); returns the last statement's rows, if
/// a statement returned any.
#[pyfunction]
fn sql<'py>(py: Python<'py>, argv: Vec<String>) -> PyResult<Option<Bound<'py, PyCapsule>>> {
    let Command::Sql(args) = parse_command(py, "sql", argv)? else {
        unreachable!("parsed as sql")
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let results = run_interruptible(py, &cancel, move || esmbed::cli::sql::query(*args))?
        .map_err(|e| cli_error(py, &e))?;
    match results.into_iter().rfind(|r| !r.schema.fields().is_empty()) {
        Some(last) => Ok(Some(export_stream(py, last.schema, last.batches)?)),
        None => Ok(None),
    }
}

/// How many GPUs this build can use (0 without the `cuda` feature).
#[pyfunction]
fn cuda_device_count() -> usize {
    esmbed::devices::cuda_device_count()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("cuda", cfg!(feature = "cuda"))?;
    m.add_class::<Embedder>()?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(embed_file, m)?)?;
    m.add_function(wrap_pyfunction!(sql, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    Ok(())
}

/// Run `work` on its own thread without the GIL, checking for Ctrl-C meanwhile: a signal sets
/// `cancel`, which the job polls, and the job's own result (`Interrupted`, or done) is returned.
fn run_interruptible<T: Send>(
    py: Python<'_>,
    cancel: &AtomicBool,
    work: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    std::thread::scope(|scope| {
        let job = scope.spawn(work);
        while !job.is_finished() {
            py.detach(|| std::thread::sleep(Duration::from_millis(20)));
            if py.check_signals().is_err() {
                // The job ends cleanly and reports the interruption itself.
                cancel.store(true, Ordering::SeqCst);
            }
        }
        job.join()
            .map_err(|_| pyo3::exceptions::PyRuntimeError::new_err("an esmbed job panicked"))
    })
}

fn runtime() -> esmbed::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| esmbed::Error::io("async runtime", e))
}

/// The command line's parse of `esmbed COMMAND argv...`; a bad option is a `UsageError` with
/// clap's message.
fn parse_command(py: Python<'_>, command: &str, argv: Vec<String>) -> PyResult<Command> {
    let args = ["esmbed".to_string(), command.to_string()]
        .into_iter()
        .chain(argv);
    Cli::try_parse_from(args)
        .map(|cli| cli.command)
        .map_err(|e| usage_error(py, e.render().to_string()))
}

/// One of an option enum's values, by the name the command line uses.
fn parse_choice<T: ValueEnum>(py: Python<'_>, option: &str, value: &str) -> PyResult<T> {
    T::from_str(value, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        usage_error(
            py,
            format!("{option}={value:?}: use one of {}", names.join(", ")),
        )
    })
}

fn import_stream(capsule: &Bound<'_, PyCapsule>) -> PyResult<(SchemaRef, Vec<RecordBatch>)> {
    let stream = capsule
        .pointer_checked(Some(STREAM))?
        .cast::<FFI_ArrowArrayStream>();
    // SAFETY: the capsule holds an Arrow C stream (its name says so); `from_raw` moves it out,
    // leaving a released stream for the capsule's destructor.
    let reader =
        unsafe { ArrowArrayStreamReader::from_raw(stream.as_ptr()) }.map_err(arrow_error)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(arrow_error)?;
    Ok((schema, batches))
}

fn export_stream<'py>(
    py: Python<'py>,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> PyResult<Bound<'py, PyCapsule>> {
    let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
    let stream = FFI_ArrowArrayStream::new(Box::new(reader));
    PyCapsule::new_with_value(py, stream, STREAM)
}

fn arrow_error(e: arrow::error::ArrowError) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(format!("Arrow data: {e}"))
}

/// The `esmbed.errors` class of an error kind, raised with the library's message.
fn raise(py: Python<'_>, kind: ErrorKind, message: String) -> PyErr {
    let class = match kind {
        ErrorKind::BadInput => "BadInputError",
        ErrorKind::Io => "StorageError",
        ErrorKind::Model => "ModelError",
        ErrorKind::Usage => "UsageError",
        ErrorKind::Interrupted => "Interrupted",
        ErrorKind::Internal => "InternalError",
    };
    match py
        .import("esmbed.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((message,)))
    {
        Ok(exception) => PyErr::from_value(exception),
        Err(e) => e,
    }
}

fn library_error(py: Python<'_>, error: &esmbed::Error) -> PyErr {
    raise(py, error.kind(), error.to_string())
}

fn usage_error(py: Python<'_>, message: String) -> PyErr {
    raise(py, ErrorKind::Usage, message)
}

/// A command's error: the library's kind where it is the library's, else a usage error (the
/// command line's own checks), with the whole chain of context.
fn cli_error(py: Python<'_>, error: &anyhow::Error) -> PyErr {
    match error.downcast_ref::<esmbed::Error>() {
        Some(e) => raise(py, e.kind(), format!("{error:#}")),
        None => usage_error(py, format!("{error:#}")),
    }
}
