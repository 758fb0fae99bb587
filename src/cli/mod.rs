//! The command line: a thin front over the library. Parse, call, print.
//!
//! It is part of the library (feature `cli`) so that the `esmbed` command of the Python package
//! runs this same code: [`main`] is the whole program, for the binary and the wheel alike. Its
//! own argument errors are `anyhow` messages (exit 2); the library's are [`crate::Error`]s,
//! whose kind gives the exit code.

pub mod bench;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod dry_run;
pub mod embed;
pub mod inspect;
pub mod progress;
pub mod score;
pub mod sql;
pub mod verify;

use std::ffi::OsString;

use clap::{Args, Parser, Subcommand};

use crate::input::InputFormat;
use crate::output::columns::OutputDType;
use crate::prepare::LongPolicy;

/// Run the `esmbed` command on `args` (the program name first) and return its exit code: parse,
/// set up logging (once per process), run, and print an error as a message.
pub fn main(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let level = match cli.verbose {
        0 => "esmbed=info",
        1 => "esmbed=debug",
        _ => "esmbed=trace",
    };
    // A second call in one process (the Python package) keeps the first call's logger.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    let result = match cli.command {
        Command::Embed(args) => embed::run(*args).map(|_| ()),
        Command::Score(args) => score::run(*args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Sql(args) => sql::run(*args),
        #[cfg(feature = "cluster")]
        Command::Scheduler(args) => cluster::scheduler(args),
        #[cfg(feature = "cluster")]
        Command::Executor(args) => cluster::executor(*args),
    };
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("esmbed: error: {error:#}");
            exit_code(&error)
        }
    }
}

/// The exit code of a failure: from its kind ([`crate::ErrorKind::exit_code`], the README's
/// table). Errors that are not the library's come from argument checks here: usage (2).
fn exit_code(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<crate::Error>() {
        Some(error) => error.kind().exit_code(),
        None => 2,
    }
}

/// ESM-2 protein embeddings at the speed of the GPU, as Parquet.
///
/// Reads FASTA (plain or gzip) or Parquet, writes Parquet with one embedding per sequence that
/// DuckDB, Polars, pyarrow and Spark read as is. Exact ESM-2 (same numbers as HF transformers).
#[derive(Debug, Parser)]
#[command(
    name = "esmbed",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Embed sequences from FASTA or Parquet files into a Parquet file or dataset.
    ///
    /// Examples:
    ///   esmbed embed proteins.fasta.gz -o proteins.parquet
    ///   esmbed embed uniref/ -o emb/ --model facebook/esm2_t33_650M_UR50D --device cuda
    ///   esmbed embed seqs.parquet --seq-column aa --id-column acc -o out.parquet --layers 20,-1
    ///
    /// Every input row ends up in the output or in OUTPUT.errors.parquet (with the reason).
    /// A killed job continues with --resume; the output appears only once complete.
    #[command(verbatim_doc_comment)]
    Embed(Box<embed::EmbedArgs>),
    /// Zero-shot scores from the masked-LM head: pseudo-log-likelihoods (default), per-residue
    /// log-probabilities (--logits), or the mutants of a deep mutational scan (--wt, --mutants).
    ///
    /// Examples:
    ///   esmbed score designs.fasta -o pll.parquet --model 650M --device cuda
    ///   esmbed score --wt P53.fasta --mutants dms.parquet --strategy masked-marginals -o dms_scores.parquet
    ///   esmbed score seqs.fasta --logits -o heatmaps.parquet
    ///
    /// Definitions (fair-esm's): PLL = Σ_k log p(x_k | x with k masked), log-softmax over the
    /// full vocabulary; every masked copy of every sequence is packed with the others.
    #[command(verbatim_doc_comment)]
    Score(Box<score::ScoreArgs>),
    /// Show the schema, row count and esmbed metadata of an output file or dataset.
    Inspect(inspect::InspectArgs),
    /// Measure throughput (tokens/s, MFU) on a synthetic workload, packed vs padded.
    ///
    /// The workload matches the PyTorch reference benchmark: log-normal lengths (median 270),
    /// random weights of the real shapes. Example: esmbed bench --shape 650M,3B --device cuda
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),
    /// Check a device and dtype (GPU, bf16/f16) against the exact CPU f32 path on one model.
    Verify(verify::VerifyArgs),
    /// Run SQL with esm_embed(sequence), esm_tokens, cosine_similarity and FASTA tables.
    ///
    /// Examples:
    ///   esmbed sql -c "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION 'x.fasta';
    ///                  COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO 'emb.parquet'"
    ///   esmbed sql -f sql/similarity_search.slt --model tests/fixtures/tiny_h64
    ///   esmbed sql            (an interactive prompt)
    ///
    /// Parquet files are tables too: CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '...',
    /// or SELECT ... FROM 'file.parquet'. esm_embed runs on every device of --device.
    #[command(verbatim_doc_comment)]
    Sql(Box<sql::SqlArgs>),
    /// Start a cluster's scheduler (DataFusion Ballista): clients send it queries, it hands
    /// their tasks to the executors.
    ///
    /// Example (one scheduler, one executor per GPU machine, then the same SQL as locally):
    ///   esmbed scheduler --bind 0.0.0.0:50050
    ///   esmbed executor --scheduler sched-host:50050 --bind 0.0.0.0:50051 --external-host gpu1 --device cuda --model 650M
    ///   esmbed sql --cluster sched-host:50050 --model 650M -c "CREATE EXTERNAL TABLE p STORED AS PARQUET
    ///     LOCATION 's3://lab/uniref50/'; COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO 's3://lab/emb/'"
    #[cfg(feature = "cluster")]
    #[command(verbatim_doc_comment)]
    Scheduler(cluster::SchedulerArgs),
    /// Start a cluster executor: loads --model once onto its devices and runs the tasks the
    /// scheduler sends (see `esmbed scheduler --help`).
    ///
    /// Every executor of a cluster must serve the same weights as the clients' --model: a task
    /// planned for other weights fails, naming both.
    #[cfg(feature = "cluster")]
    Executor(Box<cluster::ExecutorArgs>),
}

/// Where the model comes from.
#[derive(Debug, Args, Clone)]
pub struct ModelArg {
    /// Model: a HuggingFace hub id, a published size (ESM-2: 8M, 35M, 150M, 650M, 3B, 15B; ESM C:
    /// esmc-300m, esmc-600m, esmc-6b), a local HF directory (config.json + model.safetensors;
    /// ESM-2 or ESM C, as its model_type says), a fair-esm .pt checkpoint, or an ESM C .pth of
    /// the `esm` package (its file, its repository's directory, or its hub id:
    /// EvolutionaryScale/esmc-300m-2024-12). Hub models come from the HF cache (HF_HOME);
    /// HF_HUB_OFFLINE=1 forbids downloads.
    #[arg(
        long,
        short,
        env = "ESMBED_MODEL",
        default_value = "facebook/esm2_t33_650M_UR50D"
    )]
    pub model: String,
}

/// Where the model runs, and in which precision.
#[derive(Debug, Args, Clone)]
pub struct DeviceArgs {
    /// Device: auto (every GPU if esmbed was built with CUDA and one is present, else the CPU),
    /// cpu, cuda (every visible GPU), cuda:N, or a list: cuda:0,1. Each GPU holds a replica of
    /// the model and pulls packs from a shared queue; the output does not depend on how many.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: auto (f32 on CPU, bf16 on GPU), f32, bf16, f16, or fp8 (Hopper GPUs:
    /// e4m3 matmuls, bf16 elsewhere; check your model with `esmbed verify --dtype bf16,fp8` first,
    /// README "FP8"). With `sql --cluster`, the dtype every executor must compute in (auto:
    /// each executor's default).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// Where the model comes from and how it runs.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    #[command(flatten)]
    pub source: ModelArg,

    #[command(flatten)]
    pub run: DeviceArgs,
}

/// What to read and how.
#[derive(Debug, Args, Clone)]
pub struct InputArgs {
    /// Input format; by default guessed from the file name, then the content.
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,

    /// Parquet and CSV/TSV: the column holding sequences.
    #[arg(long, default_value = "sequence")]
    pub seq_column: String,

    /// Parquet and CSV/TSV: the column holding ids (optional; used in error rows and duplicate
    /// checks).
    #[arg(long, default_value = "id")]
    pub id_column: String,
}

/// Object stores (inputs and outputs given as `s3://bucket/key`).
#[derive(Debug, Args, Clone)]
pub struct StoreArgs {
    /// Endpoint of an S3-compatible store, e.g. http://localhost:9000 for MinIO (default:
    /// AWS_ENDPOINT, else AWS). Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    /// (and AWS_SESSION_TOKEN, AWS_REGION).
    #[arg(long, env = "AWS_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// Allow plain http:// endpoints (a local MinIO; default: AWS_ALLOW_HTTP).
    #[arg(long)]
    pub s3_allow_http: bool,

    /// Attempts per object-store request (object_store's retries with exponential backoff)
    /// before a transient error (5xx, throttling, a dropped connection) fails the job. Missing
    /// objects and refused credentials fail at once.
    #[arg(long, default_value_t = 5)]
    pub s3_attempts: usize,
}

impl StoreArgs {
    /// The library's options: the environment's (`AWS_*`), with these flags over it.
    pub fn options(&self) -> crate::storage::StoreOptions {
        crate::storage::StoreOptions {
            endpoint: self.s3_endpoint.clone(),
            allow_http: self.s3_allow_http,
            attempts: self.s3_attempts.max(1),
            ..crate::storage::StoreOptions::from_env()
        }
    }
}

/// `--unknown`: what to do with characters outside the ESM alphabet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownArg {
    /// The record goes to the errors file, with the character and its position.
    Error,
    /// Map to X (any amino acid).
    X,
    /// Map to `<unk>`.
    Unk,
}

impl From<UnknownArg> for crate::UnknownResidue {
    fn from(u: UnknownArg) -> Self {
        match u {
            UnknownArg::Error => crate::UnknownResidue::Error,
            UnknownArg::X => crate::UnknownResidue::MapToX,
            UnknownArg::Unk => crate::UnknownResidue::MapToUnk,
        }
    }
}

/// Output columns.
#[derive(Debug, Args, Clone)]
pub struct OutputArgs {
    /// Layers to output, fair-esm numbering: 0 = embeddings, -1 = last (normalized). The last
    /// layer goes to `embedding`, others to `embedding_K`.
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-1"
    )]
    pub layers: Vec<i64>,

    /// Also output every residue's vector (`residue_embeddings`): ~2.5 KB per residue for 650M
    /// in f16. Large: use with --output-dtype f16.
    #[arg(long)]
    pub per_residue: bool,

    /// Also output the `<cls>` (BOS) vector. The ESM authors discourage it: use the mean.
    #[arg(long)]
    pub bos: bool,

    /// Element type of the embedding columns.
    #[arg(long, value_enum, default_value = "f32")]
    pub output_dtype: OutputDType,

    /// Sequences longer than this many residues follow --long (default: the model's training
    /// crop, 1022 for ESM-2, 2046 for ESM C).
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Long sequences: truncate (first --max-length residues, row marked `truncated`), error
    /// (to the errors file), or window (overlapping windows averaged per residue: a heuristic).
    #[arg(long, value_enum, default_value = "truncate")]
    pub long: LongPolicy,

    /// Characters outside the ESM alphabet (e.g. J, digits): error, x or unk.
    #[arg(long, value_enum, default_value = "error")]
    pub unknown: UnknownArg,
}

/// Parse `--device` into the devices to run on (one model replica each).
pub fn parse_devices(spec: &str) -> anyhow::Result<Vec<crate::Device>> {
    Ok(crate::devices::parse(spec)?)
}

/// Parse `--device` for a command that runs on one device: the first one listed.
pub fn parse_device(spec: &str) -> anyhow::Result<crate::Device> {
    Ok(parse_devices(spec)?.remove(0))
}
