//! SQL over proteins: DataFusion with esmbed's functions and a FASTA table format.
//!
//! ```sql
//! CREATE EXTERNAL TABLE proteins STORED AS FASTA LOCATION 'uniprot/*.fasta.gz';
//! COPY (SELECT id, esm_embed(sequence) AS embedding FROM proteins) TO 'emb.parquet';
//! SELECT id, cosine_similarity(embedding, (SELECT embedding FROM emb WHERE id = 'P69905')) AS sim
//! FROM emb ORDER BY sim DESC LIMIT 10;
//! ```
//! [`session`] builds a `SessionContext` with [`functions()`] registered over an
//! [`service::EmbedService`] (one model replica per device, shared by every partition),
//! `STORED AS FASTA` ([`fasta_table`]) and object stores resolved from the URLs the SQL names
//! ([`stores`]). [`run_script`] runs `;`-separated statements; [`slt`] runs sqllogictest files,
//! which is how the `sql/` examples are checked.

pub mod display;
pub mod fasta_table;
pub mod functions;
pub mod scores;
pub mod service;
pub mod slt;
pub mod spec;
pub mod stores;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::Result;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use self::fasta_table::FastaFormatFactory;
use self::functions::{CosineSimilarity, EsmEmbed, EsmTokens};
use self::service::EmbedService;
use self::spec::FunctionModel;
use self::stores::{FastaTables, Stores};
use crate::storage::StoreOptions;

/// Rows per `esm_embed` call: one call is sorted and packed as a whole, so larger batches pack
/// better and keep the devices fed; 8192 rows are ~2.8 M tokens of UniRef-like sequences.
pub const DEFAULT_BATCH_ROWS: usize = 8192;

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Rows per batch (`datafusion.execution.batch_size`), hence per `esm_embed` call.
    pub batch_rows: usize,
    /// Partitions run at once (several partitions keep several devices busy).
    pub target_partitions: usize,
    /// How the object stores that tables and `COPY … TO` name are reached (`s3://bucket/…`),
    /// as for `esmbed embed`. The default takes nothing from the environment; the CLI passes
    /// [`StoreOptions::from_env`].
    pub store: StoreOptions,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            batch_rows: DEFAULT_BATCH_ROWS,
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(4)
                .max(2),
            store: StoreOptions::default(),
        }
    }
}

/// A DataFusion session with `esm_embed`, `esm_tokens`, `cosine_similarity` over `service`,
/// `STORED AS FASTA`, and the object stores of `options.store` built as URLs name them. Without a
/// service the embedding function is absent (the others work).
pub fn session(service: Option<Arc<EmbedService>>, options: &SessionOptions) -> SessionContext {
    let ctx = SessionContext::new_with_state(session_state(options));
    register_functions(&ctx, service.map(FunctionModel::Served));
    ctx
}

/// The session's configuration: settings, object stores, `STORED AS FASTA`; no functions of
/// esmbed's yet ([`register_functions`]; a cluster client registers them after Ballista has
/// rebuilt the state).
pub fn session_state(options: &SessionOptions) -> datafusion::execution::SessionState {
    session_state_with(session_config(options), &options.store)
}

/// The settings of [`session_state`].
pub fn session_config(options: &SessionOptions) -> SessionConfig {
    SessionConfig::new()
        .with_batch_size(options.batch_rows.max(1))
        .with_target_partitions(options.target_partitions.max(1))
        .with_information_schema(true)
}

/// [`session_state`] with other settings (a cluster scheduler's, which Ballista gives it).
pub fn session_state_with(
    config: SessionConfig,
    store: &crate::storage::StoreOptions,
) -> datafusion::execution::SessionState {
    // The format list must be set before the defaults (which extend it).
    SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime_env(store))
        .with_file_formats(vec![Arc::new(FastaFormatFactory)])
        .with_default_features()
        .with_table_factory("FASTA".into(), Arc::new(FastaTables::default()))
        .build()
}

/// A runtime whose object stores are built, as URLs name them, with `store`'s settings.
pub fn runtime_env(store: &crate::storage::StoreOptions) -> Arc<RuntimeEnv> {
    Arc::new(RuntimeEnv {
        object_store_registry: Arc::new(Stores::new(store.clone())),
        ..RuntimeEnv::default()
    })
}

/// esmbed's functions: `cosine_similarity`, and with a model the model functions over it.
pub fn register_functions(ctx: &SessionContext, model: Option<FunctionModel>) {
    for udf in functions(model) {
        ctx.register_udf(udf);
    }
}

/// The functions [`register_functions`] registers.
pub fn functions(model: Option<FunctionModel>) -> Vec<datafusion::logical_expr::ScalarUDF> {
    let mut udfs = vec![CosineSimilarity::udf()];
    if let Some(model) = model {
        udfs.push(EsmEmbed::udf(model.clone()));
        udfs.push(scores::EsmScores::pll(model.clone()));
        udfs.push(scores::EsmScores::score(model.clone()));
        udfs.push(EsmTokens::udf(model));
    }
    udfs
}

/// The result of one statement.
#[derive(Debug)]
pub struct StatementResult {
    /// The statement's text, as parsed.
    pub sql: String,
    /// Its schema (empty for DDL).
    pub schema: SchemaRef,
    /// Its rows (COPY returns one row with the count written).
    pub batches: Vec<RecordBatch>,
}

/// Run every statement of `sql` (separated by `;`) in order, stopping at the first error.
pub async fn run_script(ctx: &SessionContext, sql: &str) -> crate::Result<Vec<StatementResult>> {
    run_statements(ctx, sql)
        .await
        .map_err(crate::Error::from_sql)
}

async fn run_statements(ctx: &SessionContext, sql: &str) -> Result<Vec<StatementResult>> {
    let statements = datafusion::sql::parser::DFParser::parse_sql(sql)?;
    let mut results = Vec::with_capacity(statements.len());
    for statement in statements {
        let text = statement.to_string();
        let plan = ctx.state().statement_to_plan(statement).await?;
        let frame = ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = frame.schema().inner().clone();
        let batches = frame.collect().await?;
        results.push(StatementResult {
            sql: text,
            schema,
            batches,
        });
    }
    Ok(results)
}
