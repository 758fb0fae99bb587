//! One error type for the library. What a user reads when something goes wrong is decided here:
//! every variant names the thing at fault (file, tensor, record, character) and, where there is
//! one, the fix.

use std::path::PathBuf;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in esmbed's library.
#[derive(Debug, thiserror::Error)]
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

    /// The model directory or checkpoint could not be read as an ESM-2 model.
    #[error("model {source_name}: {reason}")]
    Model {
        /// The path or hub id the user gave.
        source_name: String,
        /// What was wrong, and what to do about it.
        reason: String,
    },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("model {source_name}: tensor `{tensor}` is missing from the checkpoint (is this an ESM-2 model?)")]
    MissingTensor {
        /// The path or hub id the user gave.
        source_name: String,
        /// The tensor's name, as esmbed looks for it (HF naming, without the `esm.` prefix).
        tensor: String,
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

    /// Options that contradict each other or the model.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An object-store request failed (after retries, for transient errors).
    #[error("{url}: {reason}")]
    Remote {
        /// The object or prefix.
        url: String,
        /// What went wrong and what to do.
        reason: String,
    },

    /// An input could not be read.
    #[error(transparent)]
    Input(#[from] crate::input::InputError),

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

    /// The output (or an unfinished job's progress) is already there.
    #[error("{path} already exists: {hint}")]
    OutputExists {
        /// The output path.
        path: String,
        /// What to do.
        hint: String,
    },

    /// SIGINT/SIGTERM: the job stopped cleanly with finished parts recorded.
    #[error("interrupted after {done} of {total}+ parts; finished parts are kept: rerun the same command with --resume to continue")]
    Interrupted {
        /// Parts finished (this run and earlier ones).
        done: usize,
        /// Parts started so far.
        total: usize,
    },

    /// A tensor operation failed (out of memory, device error, or a bug).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
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
}
