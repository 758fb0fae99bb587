//! One error type for the library. What a user reads when something goes wrong is decided here:
//! every variant names the thing at fault (file, tensor, record, character) and, where there is
//! one, the fix. Variants are what code must tell apart (an out-of-memory pack is split and
//! retried, a missing object is not retried, a failed device leaves the pool); [`Error::kind`]
//! groups them for exit codes. No code decides on message text.

use std::path::PathBuf;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is: the CLI's exit codes come from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input is at fault: unreadable records, bad sequences, duplicate ids.
    BadInput,
    /// Reading or writing files or objects failed.
    Io,
    /// The model could not be loaded or run (device failures and out of memory included).
    Model,
    /// Options contradict each other, or an output is in the way.
    Usage,
    /// The job was stopped by a signal; finished work is kept.
    Interrupted,
    /// A bug in esmbed.
    Internal,
}

impl ErrorKind {
    /// The `esmbed` command's exit code for this kind (the README's table): 3 bad input, 4 I/O,
    /// 5 model or device (out of memory included), 2 usage, 130 interrupted, 70 internal.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::BadInput => 3,
            ErrorKind::Io => 4,
            ErrorKind::Model => 5,
            ErrorKind::Usage => 2,
            ErrorKind::Interrupted => 130,
            ErrorKind::Internal => 70,
        }
    }
}

/// Everything that can go wrong in esmbed's library.
///
/// `Debug` prints the message (see the impl below).
#[derive(thiserror::Error)]
pub enum Error {
    /// A sequence holds a character outside the ESM alphabet (see [`crate::tokenize`]).
    #[error(transparent)]
    Tokenize(#[from] crate::tokenize::TokenizeError),

    /// A sequence passed to the library API did not tokenize.
    #[error("sequence #{index}: {source}")]
    InvalidSequence {
        /// 0-based index in the input.
        index: usize,
        /// What was wrong.
        source: crate::tokenize::TokenizeError,
    },

    /// An input's content is not what its format requires (or there is none).
    #[error("{input}: {reason}")]
    BadInput {
        /// The input file or object.
        input: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// `--strict`: a bad record stops the job.
    #[error("{input} record {record}{}: {reason} (--strict stops at the first bad record; without it, bad records go to the errors file)", id.as_ref().map(|i| format!(" (id {i})")).unwrap_or_default())]
    Strict {
        /// The input file.
        input: String,
        /// 1-based record number.
        record: u64,
        /// The record's id.
        id: Option<String>,
        /// What was wrong.
        reason: String,
    },

    /// The same id twice: results could not be joined back unambiguously.
    #[error("duplicate id {id:?}: {first} and {second}. Ids must be unique to join embeddings back to \
             the input: fix the input, or pass --dedupe to keep the first and list the others in the errors file")]
    DuplicateId {
        /// The id.
        id: String,
        /// Where it first appears.
        first: String,
        /// Where it appears again.
        second: String,
    },

    /// The model directory or checkpoint could not be read as an ESM-2 model.
    #[error("model {source_name}: {reason}")]
    Model {
        /// The path or hub id the user gave.
        source_name: String,
        /// What was wrong, and what to do about it.
        reason: String,
    },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("model {source_name}: tensor `{tensor}` is missing from the checkpoint (is this an ESM-2 model?); looked for {}", tried.join(", "))]
    MissingTensor {
        /// The path or hub id the user gave.
        source_name: String,
        /// The tensor's name, as esmbed looks for it (HF naming, without the `esm.` prefix).
        tensor: String,
        /// Every name transformers would accept for it ([`crate::model::names::aliases`]).
        tried: Vec<String>,
    },

    /// One parameter under two names in one checkpoint, with different values.
    #[error("model {source_name}: `{first}` and `{second}` are both the parameter `{parameter}` but hold              different values; esmbed does not pick one: remove one of them from the checkpoint (or re-save              it with transformers)")]
    ConflictingTensors {
        /// The path or hub id the user gave.
        source_name: String,
        /// The parameter (canonical name).
        parameter: String,
        /// One name in the file.
        first: String,
        /// The other.
        second: String,
    },

    /// A tensor has another shape than the config implies.
    #[error("model {source_name}: tensor `{tensor}` has shape {found:?}, expected {expected:?} from the config")]
    TensorShape {
        /// The path or hub id the user gave.
        source_name: String,
        /// The tensor's name.
        tensor: String,
        /// Shape in the checkpoint.
        found: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },

    /// The HuggingFace hub could not provide the model.
    #[error("model {model_id}: {reason}")]
    Hub {
        /// The hub id, e.g. `facebook/esm2_t33_650M_UR50D`.
        model_id: String,
        /// What went wrong and what to do.
        reason: String,
    },

    /// The device ran out of memory. A pack that does is split and retried; this reaches the
    /// user only for what does not fit even alone.
    #[error("out of memory: {detail}")]
    OutOfMemory {
        /// What was being computed, and the fix where the caller knows it.
        detail: String,
    },

    /// A tensor operation failed on the device (a driver error, or a bug).
    #[error("tensor operation failed: {0}")]
    Device(candle_core::Error),

    /// No device is left to run the work (each one failed; see the log).
    #[error("{0}")]
    NoDevice(String),

    /// Options that contradict each other or the model.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// The output (or an unfinished job's progress) is already there.
    #[error("{path} already exists: {hint}")]
    OutputExists {
        /// The output path.
        path: String,
        /// What to do.
        hint: String,
    },

    /// `--resume` with another command than the interrupted job's.
    #[error("--resume: this command differs from the interrupted job (differs in: {differences}); rerun it \
             with the same inputs, model and output options, or pass --overwrite to start over")]
    ResumeMismatch {
        /// The settings that differ, comma-separated.
        differences: String,
    },

    /// A cluster executor serves other weights than the query was planned with.
    #[error(
        "this executor serves {served}, but the query was planned with {planned}: start every \
             executor with the client's --model (the same weights), or run the client with the \
             executors' model"
    )]
    ModelMismatch {
        /// The client's model: name and fingerprint.
        planned: String,
        /// The executor's model: name and fingerprint.
        served: String,
    },

    /// A cluster executor computes in another dtype than the query asks for (the same weights).
    #[error(
        "this executor computes in {served}, but the query asks for {planned} (`auto`: the \
             executor's default, f32 on a CPU, bf16 on a GPU): start every executor with the \
             client's --dtype, or run the client with --dtype {served}"
    )]
    DtypeMismatch {
        /// The client's `--dtype` (`auto` or a dtype).
        planned: String,
        /// The executor's dtype.
        served: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault (or the input's name).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An object or prefix that must exist does not.
    #[error("{url}: {hint}")]
    NotFound {
        /// The object, prefix or bucket.
        url: String,
        /// What to do.
        hint: String,
    },

    /// An object-store location is unusable before any request: not a URL, a scheme that is not
    /// built, no key where one is needed.
    #[error("{url}: {reason}")]
    Remote {
        /// The object or prefix.
        url: String,
        /// What went wrong and what to do.
        reason: String,
    },

    /// An object-store operation failed (after object_store's retries, for transient errors).
    #[error("{url}: {reason}: {error}")]
    Store {
        /// The object, prefix or store.
        url: String,
        /// What failed and what to do.
        reason: String,
        /// object_store's error, to match on (boxed: it is larger than every other variant).
        /// Shown in the message but not returned as `source()`: object_store's messages already
        /// hold their causes, which a printer of the error chain would repeat.
        error: Box<object_store::Error>,
    },

    /// A Parquet file could not be read or written.
    #[error("{path}: {source}")]
    Parquet {
        /// The file or object.
        path: String,
        /// The underlying error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// SIGINT/SIGTERM: the job stopped cleanly with finished parts recorded.
    #[error("interrupted after {done} of {total}+ parts; finished parts are kept: rerun the same command with --resume to continue")]
    Interrupted {
        /// Parts finished (this run and earlier ones).
        done: usize,
        /// Parts started so far.
        total: usize,
    },

    /// A SQL statement failed in DataFusion (syntax, planning, execution); esmbed's own errors
    /// raised inside a query are unwrapped to their variant instead (see [`Error::from_sql`]).
    #[error("{0}")]
    Sql(datafusion::error::DataFusionError),

    /// A bug: an invariant esmbed relies on did not hold.
    #[error("internal error (please report it): {0}")]
    Internal(String),
}

/// The message, as `Display` gives it: Ballista reports a failed task's error with `{:?}`, and
/// the cluster client should read what went wrong and what to do, not a struct dump.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl Error {
    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A model error with a reason.
    pub(crate) fn model(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Model {
            source_name: source_name.into(),
            reason: reason.into(),
        }
    }

    /// An input whose content is wrong.
    pub(crate) fn bad_input(input: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::BadInput {
            input: input.into(),
            reason: reason.into(),
        }
    }

    /// A broken invariant, e.g. an Arrow operation on arrays esmbed built itself.
    pub(crate) fn internal(what: impl std::fmt::Display) -> Self {
        Error::Internal(what.to_string())
    }

    /// The error of a failed SQL statement: esmbed's own error when a UDF or table raised one
    /// (DataFusion wraps it, possibly in context), else DataFusion's.
    pub fn from_sql(error: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as E;
        match error {
            E::External(inner) => match inner.downcast::<Error>() {
                Ok(error) => *error,
                Err(inner) => Error::Sql(E::External(inner)),
            },
            E::Context(_, inner) => Error::from_sql(*inner),
            E::Shared(shared) => match std::sync::Arc::try_unwrap(shared) {
                Ok(inner) => Error::from_sql(inner),
                Err(shared) => Error::Sql(E::Shared(shared)),
            },
            // Errors that crossed a partition's record-batch stream come back inside Arrow's.
            E::ArrowError(arrow, backtrace) => match *arrow {
                arrow::error::ArrowError::ExternalError(inner) => {
                    match inner.downcast::<datafusion::error::DataFusionError>() {
                        Ok(df) => Error::from_sql(*df),
                        Err(inner) => match inner.downcast::<Error>() {
                            Ok(error) => *error,
                            Err(inner) => Error::Sql(E::ArrowError(
                                Box::new(arrow::error::ArrowError::ExternalError(inner)),
                                backtrace,
                            )),
                        },
                    }
                }
                other => Error::Sql(E::ArrowError(Box::new(other), backtrace)),
            },
            other => Error::Sql(other),
        }
    }

    /// Whether this is the device running out of memory (the pack can be split and retried).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory { .. })
    }

    /// The kind of failure, for exit codes.
    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            Tokenize(_) | InvalidSequence { .. } | BadInput { .. } | Strict { .. } => {
                ErrorKind::BadInput
            }
            DuplicateId { .. } => ErrorKind::BadInput,
            Model { .. } | MissingTensor { .. } | TensorShape { .. } | Hub { .. } => {
                ErrorKind::Model
            }
            ConflictingTensors { .. } => ErrorKind::Model,
            OutOfMemory { .. } | Device(_) | NoDevice(_) => ErrorKind::Model,
            InvalidOption(_) | OutputExists { .. } | ResumeMismatch { .. } => ErrorKind::Usage,
            ModelMismatch { .. } | DtypeMismatch { .. } => ErrorKind::Usage,
            Io { .. } | NotFound { .. } | Remote { .. } | Store { .. } | Parquet { .. } => {
                ErrorKind::Io
            }
            Interrupted { .. } => ErrorKind::Interrupted,
            Sql(e) => sql_kind(e),
            Internal(_) => ErrorKind::Internal,
        }
    }
}

/// The kind of a DataFusion error that could not be unwrapped: esmbed's own error's, when one is
/// in its source chain (a shared error still referenced elsewhere), else I/O or usage.
fn sql_kind(error: &datafusion::error::DataFusionError) -> ErrorKind {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(own) = e.downcast_ref::<Error>() {
            return own.kind();
        }
        // An I/O error's own source is its inner error's source, not the inner error.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(own) = inner.and_then(|i| i.downcast_ref::<Error>()) {
            return own.kind();
        }
        source = e.source();
    }
    match error.find_root() {
        datafusion::error::DataFusionError::IoError(_)
        | datafusion::error::DataFusionError::ObjectStore(_) => ErrorKind::Io,
        _ => ErrorKind::Usage,
    }
}

/// Candle errors are sorted once, here: the device running out of memory (the CUDA driver's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's `ALLOC_FAILED`) becomes [`Error::OutOfMemory`], found by
/// the error's type and code, never its text; everything else is a [`Error::Device`] failure.
impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        if device_out_of_memory(&error) {
            Error::OutOfMemory {
                detail: error.to_string(),
            }
        } else {
            Error::Device(error)
        }
    }
}

#[cfg(feature = "cuda")]
fn device_out_of_memory(error: &candle_core::Error) -> bool {
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasStatus_t;
    use candle_core::cuda_backend::cudarc::driver::sys::CUresult;
    use candle_core::cuda_backend::CudaError;
    match error {
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::Context { inner, .. } => device_out_of_memory(inner),
        candle_core::Error::Cuda(inner) => match inner.downcast_ref::<CudaError>() {
            Some(CudaError::Cuda(e)) => e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY,
            Some(CudaError::Cublas(e)) => e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            _ => inner
                .downcast_ref::<crate::model::DeviceOutOfMemory>()
                .is_some(),
        },
        _ => false,
    }
}

/// On the CPU an allocation failure aborts the process: there is no out-of-memory error to sort.
#[cfg(not(feature = "cuda"))]
fn device_out_of_memory(_: &candle_core::Error) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_failure_passed_as_an_io_error_keeps_its_kind_and_message() {
        let io = std::io::Error::other(Error::NoDevice("every device failed".into()));
        let error = Error::Sql(datafusion::error::DataFusionError::IoError(io));
        assert_eq!(error.kind(), ErrorKind::Model);
        assert!(error.to_string().contains("every device failed"), "{error}");
        assert_eq!(
            format!("{error:?}"),
            error.to_string(),
            "Debug is the message"
        );
    }

    #[test]
    fn kinds_follow_the_variant() {
        let oom = Error::OutOfMemory {
            detail: "a pack".into(),
        };
        assert!(oom.is_out_of_memory());
        assert_eq!(oom.kind(), ErrorKind::Model);
        assert_eq!(
            Error::bad_input("a.fasta", "empty").kind(),
            ErrorKind::BadInput
        );
        assert_eq!(Error::internal("x").kind(), ErrorKind::Internal);
        // Text that mentions memory is not a typed out-of-memory error.
        let text = Error::from(candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into()));
        assert!(!text.is_out_of_memory());
        assert_eq!(text.kind(), ErrorKind::Model);
    }
}
