//! `esmbed embed`: the main job.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::input::{InputOptions, Inputs};
use crate::pipeline::plan::PlanOptions;
use crate::pipeline::{self, JobOptions, JobSpec, JobSummary, ModelIdentity};
use crate::{EmbedOptions, Embedder, Pooling};

use super::{InputArgs, ModelArgs, OutputArgs};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Input files or directories (FASTA, FASTA.gz, Parquet), local or `s3://bucket/key`: an
    /// object, a prefix (`s3://bucket/in/`) or a glob (`s3://bucket/in/*.fa.gz`). Rows are
    /// numbered across them in the order given; a directory or prefix contributes its files
    /// sorted by name. Objects are streamed by range requests, never downloaded whole.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,

    /// Output: `out.parquet` (one file, appears complete at the end) or `out/` (a dataset of
    /// part files, readable as they complete, e.g. `read_parquet('out/*.parquet')`); local or
    /// `s3://bucket/key.parquet` / `s3://bucket/prefix/` (multipart uploads; the manifest lives
    /// beside the output, so --resume works from any machine).
    #[arg(long, short)]
    pub output: String,

    /// Run share I of N of the input files (0-based: 0/4 … 3/4), for several machines splitting
    /// one job deterministically; give each shard its own --output.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::input::Shard>,

    #[command(flatten)]
    pub store: super::StoreArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub input: InputArgs,

    #[command(flatten)]
    pub columns: OutputArgs,

    /// Tokens per pack (sequences are packed end to end, no padding). Default: 4096 on the CPU;
    /// on a GPU, what fits in the memory left after the weights (up to 65536), checked at start
    /// by a warm-up pack.
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,

    /// Rows per part: the unit of length sorting, output row groups and resume. Default 50,000
    /// (hundreds of packs per part, so packs are >99 % full), 2,000 with --per-residue (whose
    /// rows are large), 1,000 with --pll (whose rows are L forwards each).
    #[arg(long)]
    pub rows_per_part: Option<usize>,

    /// Also each sequence's pseudo-log-likelihood, columns `pll` and `pseudo_perplexity`, the
    /// same numbers as `esmbed score` (see its --help for the definition). An L-residue
    /// sequence adds L masked copies to the job's packs: about L times the compute of its
    /// embedding. Needs the masked-LM head (EsmForMaskedLM weights); not with --long window.
    #[arg(long)]
    pub pll: bool,

    /// Stop at the first bad record (default: list it in the errors file and go on).
    #[arg(long)]
    pub strict: bool,

    /// Keep the first of duplicate ids, list the others in the errors file (default: duplicate
    /// ids stop the job before any model work).
    #[arg(long)]
    pub dedupe: bool,

    /// Embed every row, even rows whose sequence is identical to another's (default: identical
    /// sequences, after case, whitespace, a trailing `*` and truncation, are embedded once and
    /// the result copied; the output is bitwise the same). For benchmarking.
    #[arg(long)]
    pub no_reuse: bool,

    /// Continue an interrupted job (same command): finished parts are kept.
    #[arg(long)]
    pub resume: bool,

    /// Replace an existing output (and discard an interrupted job's progress).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,

    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// Plan the job without running it: read the input (no weights on a device) and print rows,
    /// distinct sequences, residues, tokens, error rows by kind, packs, the output's estimated
    /// size, the longest pack's estimated memory, and the run time where a throughput is known
    /// (or measured with --bench). Writes nothing; exits 0 when the job would run.
    #[arg(long)]
    pub dry_run: bool,

    /// With --dry-run: load the model and time a few of the job's packs on the first device, for
    /// the run-time estimate.
    #[arg(long, requires = "dry_run")]
    pub bench: bool,
}

/// Run the job (or, with `--dry-run`, plan it: no summary then), stopped cleanly by SIGINT or
/// SIGTERM.
pub fn run(args: EmbedArgs) -> anyhow::Result<Option<JobSummary>> {
    run_with(args, None)
}

/// [`run`], stopped by `cancel` instead of signals when given (the Python package watches for
/// Ctrl-C itself: a second one must not end the interpreter).
pub fn run_with(
    args: EmbedArgs,
    cancel: Option<Arc<AtomicBool>>,
) -> anyhow::Result<Option<JobSummary>> {
    let devices = super::parse_devices(&args.model.run.device)?;
    let dtype = crate::devices::parse_dtype(&args.model.run.dtype, &devices[0])?;
    if args.columns.max_length == Some(0) {
        anyhow::bail!("--max-length must be at least 1");
    }
    let rows_per_part = args
        .rows_per_part
        .unwrap_or_else(|| JobOptions::default_rows_per_part(args.pll, args.columns.per_residue));
    if rows_per_part == 0 {
        anyhow::bail!("--rows-per-part must be at least 1");
    }

    let store = args.store.options();
    let inputs = Inputs::open_locations(
        &args.inputs,
        InputOptions {
            format: args.input.format,
            seq_column: args.input.seq_column.clone(),
            id_column: args.input.id_column.clone(),
            ..InputOptions::default()
        },
        &store,
        args.shard,
    )?;
    let remote = if crate::storage::is_url(&args.output) {
        Some(crate::output::remote::RemoteOutput::new(
            &args.output,
            &store,
            None,
        )?)
    } else {
        None
    };
    if args.dry_run && !args.bench {
        super::dry_run::run(&args, inputs, remote, &devices, dtype, rows_per_part)?;
        return Ok(None);
    }
    let (embedders, model, tokens_per_batch) = load(&args, &devices, dtype)?;
    let config = embedders[0].model().config();
    let options = job_options(&args, config, tokens_per_batch, rows_per_part, &devices);
    let output = std::path::Path::new(&args.output);
    let mut spec = JobSpec::new(inputs, output, &embedders[0], model, options);
    if let Some(remote) = remote {
        spec = spec.with_remote_output(remote);
    }
    if args.dry_run {
        super::dry_run::run_measured(&args, &spec, &embedders[0], &devices, dtype)?;
        return Ok(None);
    }
    spec = spec.with_progress(super::progress::bar(!args.no_progress));
    let summary = execute(spec, embedders, cancel)?;
    print_summary(&summary, args.json);
    Ok(Some(summary))
}

/// The job's options from the command line.
pub fn job_options(
    args: &EmbedArgs,
    config: &crate::EsmConfig,
    tokens_per_batch: usize,
    rows_per_part: usize,
    devices: &[crate::Device],
) -> JobOptions {
    JobOptions {
        plan: PlanOptions {
            tokens_per_batch,
            max_length: args.columns.max_length.unwrap_or(config.crop()),
            long: args.columns.long,
            pll: args.pll,
        },
        rows_per_part,
        strict: args.strict,
        dedupe: args.dedupe,
        output_dtype: args.columns.output_dtype,
        resume: args.resume,
        overwrite: args.overwrite,
        warm_up: !devices[0].is_cpu(),
        reuse: !args.no_reuse,
        reuse_memory: JobOptions::DEFAULT_REUSE_MEMORY,
    }
}

/// The model on every device, as the job's embedders, with its identity and the token budget
/// (from `--tokens-per-batch`, or what fits in the devices' free memory).
fn load(
    args: &EmbedArgs,
    devices: &[crate::Device],
    dtype: crate::DType,
) -> anyhow::Result<(Vec<Embedder>, ModelIdentity, usize)> {
    let loading = Instant::now();
    let crate::model::LoadedModel {
        replicas,
        name,
        fingerprint,
    } = crate::model::load_model(
        &args.model.source.model,
        devices,
        dtype,
        if args.pll {
            crate::model::Head::Required
        } else {
            crate::model::Head::No
        },
    )?;
    let config = replicas[0].config().clone();
    let tokens_per_batch = args.tokens_per_batch.unwrap_or_else(|| {
        crate::embed::default_tokens_per_batch_on(devices, config.hidden_size, dtype)
    });
    let options = EmbedOptions {
        layers: args.columns.layers.clone(),
        pooling: pooling(args),
        unknown: args.columns.unknown.into(),
        tokens_per_batch,
    };
    let embedders = replicas
        .into_iter()
        .map(|m| Embedder::new(m, &options))
        .collect::<crate::Result<Vec<_>>>()?;
    let labels: Vec<String> = embedders.iter().map(Embedder::device_label).collect();
    tracing::info!(
        "loaded {} ({} layers, hidden {}) on {} as {:?} in {:.1}s",
        name,
        config.num_hidden_layers,
        config.hidden_size,
        labels.join(", "),
        dtype,
        loading.elapsed().as_secs_f64()
    );
    Ok((
        embedders,
        ModelIdentity { name, fingerprint },
        tokens_per_batch,
    ))
}

/// The pooling the command line asks for.
pub fn pooling(args: &EmbedArgs) -> Pooling {
    Pooling {
        mean: true,
        bos: args.columns.bos,
        per_residue: args.columns.per_residue,
    }
}

/// Run the job on an async runtime, stopped cleanly by `cancel` or, without one, by SIGINT and
/// SIGTERM.
fn execute(
    spec: JobSpec,
    embedders: Vec<Embedder>,
    cancel: Option<Arc<AtomicBool>>,
) -> anyhow::Result<JobSummary> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let signals = cancel.is_none();
    let cancel = cancel.unwrap_or_default();
    let summary = runtime.block_on(async {
        let watcher = signals.then(|| tokio::spawn(watch_signals(cancel.clone())));
        let devices = embedders
            .into_iter()
            .map(|e| Arc::new(e) as Arc<dyn crate::engine::PackEmbedder>)
            .collect();
        let result = pipeline::run(spec, devices, cancel.clone()).await;
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        result
    })?;
    Ok(summary)
}

/// SIGINT or SIGTERM: ask the pipeline to stop; a second SIGINT exits at once.
async fn watch_signals(cancel: Arc<AtomicBool>) {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    loop {
        #[cfg(unix)]
        let terminate = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = terminate => {},
        }
        if cancel.swap(true, Ordering::SeqCst) {
            eprintln!("esmbed: interrupted again, exiting now (rerun with --resume to continue)");
            std::process::exit(130);
        }
        eprintln!("esmbed: stopping after the part being written; finished parts are kept");
    }
}

fn print_summary(s: &JobSummary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(s).expect("summary serializes")
        );
    }
    let busy = if s.seconds > 0.0 {
        100.0 * s.model_busy_seconds / s.seconds
    } else {
        0.0
    };
    eprintln!(
        "esmbed: {} of {} sequences embedded → {}",
        s.embedded, s.rows, s.output
    );
    if let Some(distinct) = s.distinct {
        eprintln!(
            "  {} rows, {} distinct sequences embedded ({} rows copied an identical sequence's result)",
            s.rows, distinct, s.reused
        );
    }
    if let Some(errors) = &s.errors_output {
        eprintln!("  {} rows in {} (each with its reason)", s.errors, errors);
    }
    if s.truncated > 0 {
        eprintln!(
            "  {} sequences truncated to --max-length (column `truncated`)",
            s.truncated
        );
    }
    if s.parts_resumed > 0 {
        eprintln!("  resumed: {} parts were already done", s.parts_resumed);
    }
    eprintln!(
        "  {} residues, {} tokens in {} packs (packing efficiency {:.1}%), {:.1} s, {:.0} tokens/s, model busy {:.0}%",
        s.residues,
        s.tokens,
        s.packs,
        100.0 * s.packing_efficiency,
        s.seconds,
        s.tokens_per_second(),
        busy
    );
    if s.devices.len() > 1 || s.devices.iter().any(|d| d.failed.is_some()) {
        for d in &s.devices {
            eprintln!(
                "  {}: {} tokens in {} packs, {:.0} tokens/s while busy, busy {:.0}%{}",
                d.device,
                d.tokens,
                d.packs,
                d.tokens_per_second,
                100.0 * d.busy_seconds / s.seconds.max(1e-9),
                d.failed
                    .as_ref()
                    .map(|f| format!(", FAILED (its packs went to the others): {f}"))
                    .unwrap_or_default()
            );
        }
    }
}
