//! A job's description: inputs, output, the columns it writes, and what it records about itself
//! (the footer metadata of its files, the identity a resume must match).

use std::sync::Arc;

use super::progress::{self, Progress};
use super::JobOptions;
use crate::embed::Embedder;
use crate::input::Inputs;
use crate::model::EsmConfig;
use crate::output::columns::EmbeddingColumns;
use crate::output::metadata::{FileMetadata, InputIdentity, JobIdentity, PoolingMeta, Settings};
use crate::output::remote::RemoteOutput;
use crate::output::OutputLayout;
use crate::pool::Pooling;
use crate::tokenize::Tokenizer;
use candle_core::DType;

/// Which model a job runs, for the output's metadata and resume checks.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    /// The model as the user named it.
    pub name: String,
    /// [`crate::Checkpoint::fingerprint`] of its weights.
    pub fingerprint: String,
}

/// Everything that defines a job's result, and where it goes.
#[derive(Clone)]
pub struct JobSpec {
    /// The inputs.
    pub inputs: Inputs,
    /// The output layout.
    pub layout: OutputLayout,
    /// Embedding columns.
    pub columns: Arc<EmbeddingColumns>,
    /// esmbed's footer metadata, as JSON.
    pub metadata: String,
    /// The job identity recorded in the manifest.
    pub identity: JobIdentity,
    /// Options.
    pub options: JobOptions,
    /// Policy for unknown characters.
    pub tokenizer: Tokenizer,
    /// Where the output is mirrored, for an output in an object store.
    pub remote: Option<Arc<RemoteOutput>>,
    /// Where progress events go.
    pub progress: Progress,
}

impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSpec")
            .field("layout", &self.layout)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// What a job needs to know of its model: enough to describe the output without weights (the
/// dry run describes a job before loading any).
#[derive(Debug, Clone)]
pub struct ModelView<'a> {
    /// Hyper-parameters.
    pub config: &'a EsmConfig,
    /// Compute dtype.
    pub dtype: DType,
    /// Resolved layers, in the order requested.
    pub layers: Vec<usize>,
    /// Which outputs per layer.
    pub pooling: Pooling,
    /// The alphabet and the policy for unknown letters.
    pub tokenizer: Tokenizer,
}

impl<'a> ModelView<'a> {
    /// The view of a loaded embedder.
    pub fn of(embedder: &'a Embedder) -> Self {
        Self {
            config: embedder.model().config(),
            dtype: embedder.model().dtype(),
            layers: embedder.layers().to_vec(),
            pooling: embedder.pooling(),
            tokenizer: *embedder.tokenizer(),
        }
    }
}

impl JobSpec {
    /// Describe a job: `inputs` embedded by `embedder` into `output`.
    pub fn new(
        inputs: Inputs,
        output: &std::path::Path,
        embedder: &Embedder,
        model: ModelIdentity,
        options: JobOptions,
    ) -> Self {
        Self::for_model(inputs, output, &ModelView::of(embedder), model, options)
    }

    /// [`JobSpec::new`] for a model described by `view`.
    pub fn for_model(
        inputs: Inputs,
        output: &std::path::Path,
        view: &ModelView,
        model: ModelIdentity,
        options: JobOptions,
    ) -> Self {
        let config = view.config;
        let pooling = view.pooling;
        let columns = Arc::new(EmbeddingColumns {
            layers: view.layers.clone(),
            last_layer: config.num_hidden_layers,
            pooling,
            hidden: config.hidden_size,
            dtype: options.output_dtype,
            pll: options.plan.pll,
        });
        let settings = Settings {
            pooling: PoolingMeta {
                embedding: "mean over residues (BOS/EOS excluded)".into(),
                bos: pooling.bos,
                per_residue: pooling.per_residue,
            },
            compute_dtype: crate::devices::dtype_label(view.dtype),
            output_dtype: options.output_dtype,
            max_length: options.plan.max_length,
            long: options.plan.long,
            unknown: format!("{:?}", view.tokenizer.unknown).to_lowercase(),
            scores: options
                .plan
                .pll
                .then(|| crate::score::job::ScoreMode::Pll { per_residue: false }.describe()),
        };
        let metadata = FileMetadata {
            esmbed_version: env!("CARGO_PKG_VERSION").into(),
            model: model.name,
            model_fingerprint: model.fingerprint.clone(),
            num_layers: config.num_hidden_layers,
            hidden_size: config.hidden_size,
            layers: columns.layers.clone(),
            primary_layer: columns.primary_layer(),
            settings: settings.clone(),
        };
        let identity = JobIdentity {
            inputs: InputIdentity::of(&inputs),
            seq_column: inputs.options.seq_column.clone(),
            id_column: inputs.options.id_column.clone(),
            model_fingerprint: model.fingerprint,
            layers: columns.layers.clone(),
            settings,
            rows_per_part: options.rows_per_part,
            dedupe: options.dedupe,
        };
        Self {
            layout: OutputLayout::new(output),
            inputs,
            columns,
            metadata: serde_json::to_string(&metadata).expect("metadata serializes"),
            identity,
            tokenizer: view.tokenizer,
            options,
            remote: None,
            progress: progress::silent(),
        }
    }

    /// Write the output to an object store (see [`RemoteOutput`]): the job writes the remote
    /// output's local mirror, and every committed file is uploaded.
    pub fn with_remote_output(mut self, remote: RemoteOutput) -> Self {
        self.layout = remote.local.clone();
        self.remote = Some(Arc::new(remote));
        self
    }

    /// Send progress events to `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }
}
