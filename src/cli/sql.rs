//! `esmbed sql`: DataFusion with esmbed's functions, from the command line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::sql::service::{BadRows, EmbedService, ServiceOptions};
use crate::sql::{self, SessionOptions};
use crate::{EmbedOptions, Embedder};

use super::{ModelArgs, UnknownArg};

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// SQL to run: one or more statements separated by `;`.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "SQL",
        conflicts_with = "file"
    )]
    pub command: Option<String>,

    /// A file of SQL statements, or a sqllogictest file (`.slt`): its queries are run and their
    /// results checked (as the sql/ examples are).
    #[arg(short = 'f', long, value_name = "FILE")]
    pub file: Option<PathBuf>,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Do not load a model: FASTA tables and cosine_similarity work, esm_embed does not exist.
    #[arg(long)]
    pub no_model: bool,

    /// Rows that esm_embed cannot embed (a character outside the alphabet, an empty sequence)
    /// give NULL instead of failing the query.
    #[arg(long)]
    pub lenient: bool,

    /// Characters outside the ESM alphabet: error (see --lenient), x or unk.
    #[arg(long, value_enum, default_value = "error")]
    pub unknown: UnknownArg,

    /// Sequences longer than this many residues follow --long (default: the model's training
    /// crop, 1022 for ESM-2, 2046 for ESM C).
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Long sequences, as for `esmbed embed`: truncate (first --max-length residues), error (the
    /// query fails naming the row, or NULL with --lenient), or window (overlapping windows
    /// averaged per residue, then the mean: a heuristic).
    #[arg(long, value_enum, default_value = "truncate")]
    pub long: crate::prepare::LongPolicy,

    /// Tokens per pack. Default: 4096 on the CPU; on a GPU, what fits in its free memory.
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,

    /// Rows per batch, hence per esm_embed call (each call is sorted and packed as a whole).
    #[arg(long, default_value_t = sql::DEFAULT_BATCH_ROWS)]
    pub batch_rows: usize,

    /// Embed every row, even rows identical to another row of the same call (default: identical
    /// sequences of a call are embedded once; the result is the same). For benchmarking.
    #[arg(long)]
    pub no_reuse: bool,

    /// Partitions run at once (default: the number of CPU cores).
    #[arg(long)]
    pub partitions: Option<usize>,

    #[command(flatten)]
    pub store: super::StoreArgs,

    /// Run the queries on a cluster: the scheduler's HOST:PORT (`esmbed scheduler`). The
    /// executors embed, each with its own model, which must be the weights of --model (checked
    /// by fingerprint); --lenient, --unknown, --max-length and --long hold on every executor.
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "HOST:PORT")]
    pub cluster: Option<String>,

    /// With --cluster: let Ballista re-plan stages as they finish
    /// (ballista.planner.adaptive.enabled).
    #[cfg(feature = "cluster")]
    #[arg(long, requires = "cluster")]
    pub adaptive: bool,
}

pub fn run(args: SqlArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let (ctx, service) = session(&args, &runtime)?;
    let started = Instant::now();
    let result = runtime.block_on(async {
        if let Some(file) = &args.file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if file.extension().is_some_and(|e| e == "slt") {
                let records = sql::slt::run(&ctx, &file.display().to_string(), &text).await?;
                eprintln!("esmbed: {}: {records} records passed", file.display());
                return Ok(());
            }
            run_and_print(&ctx, &text).await
        } else if let Some(command) = &args.command {
            run_and_print(&ctx, command).await
        } else if std::io::stdin().is_terminal() {
            prompt(&ctx).await
        } else {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            run_and_print(&ctx, &text).await
        }
    });
    if let Some(service) = &service {
        let wall = started.elapsed().as_secs_f64();
        let stats = service.device_stats();
        let tokens: u64 = stats.iter().map(|d| d.tokens).sum();
        if tokens > 0 {
            tracing::info!(
                "esm_embed: {tokens} tokens in {wall:.1}s, {:.0} tokens/s",
                tokens as f64 / wall.max(1e-9)
            );
        }
        for d in stats.iter().filter(|d| d.packs > 0) {
            tracing::info!(
                "{}: {} tokens in {} packs, {:.0} tokens/s while busy, busy {:.0}% of {:.1}s",
                d.device,
                d.tokens,
                d.packs,
                d.tokens_per_second,
                100.0 * d.busy_seconds / wall.max(1e-9),
                wall
            );
        }
    }
    result
}

/// Run `args.command` (every statement, in order) and return each statement's result: the
/// Python package's `esmbed.sql`, with the options the command line has.
pub fn query(args: SqlArgs) -> anyhow::Result<Vec<sql::StatementResult>> {
    let text = match (&args.command, &args.file) {
        (Some(command), _) => command.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?,
        (None, None) => anyhow::bail!("no statement: give -c SQL or -f FILE"),
    };
    let runtime = runtime()?;
    let (ctx, _service) = session(&args, &runtime)?;
    Ok(runtime.block_on(sql::run_script(&ctx, &text))?)
}

/// The session the options describe, with its model service (none with --no-model, or on a
/// cluster, whose executors hold the model).
fn session(
    args: &SqlArgs,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<(
    datafusion::prelude::SessionContext,
    Option<Arc<EmbedService>>,
)> {
    let mut options = SessionOptions {
        batch_rows: args.batch_rows,
        store: args.store.options(),
        ..SessionOptions::default()
    };
    if let Some(p) = args.partitions {
        options.target_partitions = p;
    }
    #[cfg(feature = "cluster")]
    if let Some(scheduler) = &args.cluster {
        let spec = (!args.no_model).then(|| cluster_spec(args)).transpose()?;
        let cluster = crate::cluster::client::ClusterOptions {
            adaptive: args.adaptive,
        };
        let ctx = runtime.block_on(crate::cluster::client::session(
            scheduler, spec, &options, &cluster,
        ))?;
        return Ok((ctx, None));
    }
    let _ = runtime;
    let service = if args.no_model {
        None
    } else {
        Some(Arc::new(start_service(
            &args.model,
            args.tokens_per_batch,
            policy(args),
        )?))
    };
    Ok((sql::session(service.clone(), &options), service))
}

/// The row policy of the options (`max_length` None: the model's crop).
fn policy(args: &SqlArgs) -> RowOptions {
    RowOptions {
        unknown: args.unknown.into(),
        max_length: args.max_length,
        long: args.long,
        bad_rows: if args.lenient {
            BadRows::Null
        } else {
            BadRows::Error
        },
        reuse: !args.no_reuse,
    }
}

/// What the model functions of a cluster session stand for: the model the executors must
/// serve (described here without loading its weights) and this command's row policy.
#[cfg(feature = "cluster")]
fn cluster_spec(args: &SqlArgs) -> anyhow::Result<crate::sql::spec::FunctionSpec> {
    let (config, name, fingerprint) = crate::model::describe_model(&args.model.source.model)?;
    Ok(crate::sql::spec::FunctionSpec {
        model: crate::sql::spec::ModelIdentity {
            name,
            fingerprint,
            hidden: config.hidden_size,
            layers: config.num_hidden_layers,
            dtype: crate::devices::parse_dtype_name(&args.model.run.dtype)?
                .map_or_else(|| "auto".into(), crate::devices::dtype_label),
        },
        policy: policy(args).resolve(config.crop()),
    })
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// How a service treats rows.
pub(super) struct RowOptions {
    pub unknown: crate::UnknownResidue,
    /// None: the model's crop.
    pub max_length: Option<usize>,
    pub long: crate::prepare::LongPolicy,
    pub bad_rows: BadRows,
    pub reuse: bool,
}

impl RowOptions {
    /// The row policy for a model whose crop is `crop` (the default `max_length`).
    fn resolve(&self, crop: usize) -> crate::sql::spec::RowPolicy {
        crate::sql::spec::RowPolicy {
            unknown: self.unknown,
            max_length: self.max_length.unwrap_or(crop),
            long: self.long,
            bad_rows: self.bad_rows,
        }
    }
}

/// Load `model` on its devices behind a service (`esmbed sql`, `esmbed executor`).
pub(super) fn start_service(
    model: &super::ModelArgs,
    tokens_per_batch: Option<usize>,
    rows: RowOptions,
) -> anyhow::Result<EmbedService> {
    let devices = super::parse_devices(&model.run.device)?;
    let dtype = crate::devices::parse_dtype(&model.run.dtype, &devices[0])?;
    let loading = Instant::now();
    let loaded = crate::model::load_model(
        &model.source.model,
        &devices,
        dtype,
        crate::model::Head::IfPresent,
    )?;
    let hidden = loaded.replicas[0].config().hidden_size;
    let policy = rows.resolve(loaded.replicas[0].config().crop());
    let tokens_per_batch = tokens_per_batch
        .unwrap_or_else(|| crate::embed::default_tokens_per_batch_on(&devices, hidden, dtype));
    let options = EmbedOptions {
        unknown: rows.unknown,
        tokens_per_batch,
        ..EmbedOptions::default()
    };
    let embedders = loaded
        .replicas
        .into_iter()
        .map(|m| Embedder::new(m, &options))
        .collect::<crate::Result<Vec<_>>>()?;
    let labels: Vec<String> = embedders.iter().map(Embedder::device_label).collect();
    tracing::info!(
        "esm_embed: {} on {} as {:?}, {} tokens per pack (loaded in {:.1}s)",
        loaded.name,
        labels.join(", "),
        dtype,
        tokens_per_batch,
        loading.elapsed().as_secs_f64()
    );
    Ok(EmbedService::start(
        embedders,
        ServiceOptions {
            tokens_per_batch,
            max_length: policy.max_length,
            long: policy.long,
            bad_rows: policy.bad_rows,
            warm_up: !devices[0].is_cpu(),
            reuse: rows.reuse,
            name: loaded.name.clone(),
            fingerprint: loaded.fingerprint.clone(),
            ..ServiceOptions::default()
        },
    )?)
}

async fn run_and_print(
    ctx: &datafusion::prelude::SessionContext,
    text: &str,
) -> anyhow::Result<()> {
    for result in sql::run_script(ctx, text).await? {
        if result.schema.fields().is_empty() {
            continue; // DDL
        }
        println!("{}", sql::display::table(&result.schema, &result.batches)?);
    }
    Ok(())
}

/// An interactive prompt: statements end with `;`, `\q` or end of input quits.
async fn prompt(ctx: &datafusion::prelude::SessionContext) -> anyhow::Result<()> {
    eprintln!(
        "esmbed sql: statements end with ';'. \\q quits. Try: SELECT esm_tokens('MKTAYIAK');"
    );
    let stdin = std::io::stdin();
    let mut pending = String::new();
    loop {
        eprint!(
            "{}",
            if pending.is_empty() {
                "esmbed> "
            } else {
                "     -> "
            }
        );
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim() == "\\q" {
            return Ok(());
        }
        pending.push_str(&line);
        if !pending.trim_end().ends_with(';') {
            continue;
        }
        let started = Instant::now();
        match run_and_print(ctx, &pending).await {
            Ok(()) => eprintln!("({:.2}s)", started.elapsed().as_secs_f64()),
            Err(e) => eprintln!("error: {e:#}"),
        }
        pending.clear();
    }
}
