//! The command line: a thin front over the library. Parse, call, print.

pub mod bench;
pub mod embed;
pub mod inspect;
pub mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use esmbed::input::InputFormat;
use esmbed::output::columns::OutputDType;
use esmbed::pipeline::plan::LongPolicy;

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
}

/// Where the model comes from and how it runs.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Model: a HuggingFace hub id, a published size (8M, 35M, 150M, 650M, 3B, 15B), a local HF
    /// directory (config.json + model.safetensors) or a fair-esm .pt checkpoint. Hub models come
    /// from the HF cache (HF_HOME); HF_HUB_OFFLINE=1 forbids downloads.
    #[arg(
        long,
        short,
        env = "ESMBED_MODEL",
        default_value = "facebook/esm2_t33_650M_UR50D"
    )]
    pub model: String,

    /// Device: auto (a GPU if esmbed was built with CUDA and one is present, else the CPU), cpu,
    /// cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute precision: auto (f32 on CPU, bf16 on GPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// What to read and how.
#[derive(Debug, Args, Clone)]
pub struct InputArgs {
    /// Input format; by default guessed from the file name, then the content.
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,

    /// Parquet: the column holding sequences.
    #[arg(long, default_value = "sequence")]
    pub seq_column: String,

    /// Parquet: the column holding ids (optional; used in error rows and duplicate checks).
    #[arg(long, default_value = "id")]
    pub id_column: String,
}

/// `--unknown`: what to do with characters outside the ESM alphabet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownArg {
    /// The record goes to the errors file, with the character and its position.
    Error,
    /// Map to X (any amino acid).
    X,
    /// Map to <unk>.
    Unk,
}

impl From<UnknownArg> for esmbed::UnknownResidue {
    fn from(u: UnknownArg) -> Self {
        match u {
            UnknownArg::Error => esmbed::UnknownResidue::Error,
            UnknownArg::X => esmbed::UnknownResidue::MapToX,
            UnknownArg::Unk => esmbed::UnknownResidue::MapToUnk,
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

    /// Also output the <cls> (BOS) vector. The ESM authors discourage it: use the mean.
    #[arg(long)]
    pub bos: bool,

    /// Element type of the embedding columns.
    #[arg(long, value_enum, default_value = "f32")]
    pub output_dtype: OutputDType,

    /// Sequences longer than this many residues follow --long (ESM-2 was trained on 1022).
    #[arg(long, default_value_t = 1022)]
    pub max_length: usize,

    /// Long sequences: truncate (first --max-length residues, row marked `truncated`), error
    /// (to the errors file), or window (overlapping windows averaged per residue: a heuristic).
    #[arg(long, value_enum, default_value = "truncate")]
    pub long: LongPolicy,

    /// Characters outside the ESM alphabet (e.g. J, digits): error, x or unk.
    #[arg(long, value_enum, default_value = "error")]
    pub unknown: UnknownArg,
}

/// Parse `--device`.
pub fn parse_device(spec: &str) -> anyhow::Result<esmbed::Device> {
    use anyhow::{bail, Context};
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(esmbed::Device::Cpu),
        "auto" => {
            #[cfg(feature = "cuda")]
            if let Ok(device) = esmbed::Device::new_cuda(0) {
                return Ok(device);
            }
            Ok(esmbed::Device::Cpu)
        }
        gpu if gpu == "cuda" || gpu.starts_with("cuda:") => {
            let ordinal: usize = gpu
                .strip_prefix("cuda:")
                .map(|n| n.parse().context("--device cuda:N needs a GPU number"))
                .transpose()?
                .unwrap_or(0);
            if cfg!(feature = "cuda") {
                esmbed::Device::new_cuda(ordinal).with_context(|| {
                    format!("cannot open GPU {ordinal} (is a CUDA driver and GPU present?)")
                })
            } else {
                bail!(
                    "this esmbed was built without GPU support; rebuild with `cargo build --release --features cuda`, or use --device cpu"
                )
            }
        }
        other => bail!("unknown --device {other:?}: use auto, cpu, cuda or cuda:N"),
    }
}

/// Parse `--dtype` for a device.
pub fn parse_dtype(spec: &str, device: &esmbed::Device) -> anyhow::Result<esmbed::DType> {
    use esmbed::DType;
    Ok(match spec.trim().to_ascii_lowercase().as_str() {
        "auto" if device.is_cpu() => DType::F32,
        "auto" => DType::BF16,
        "f32" | "fp32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "fp16" | "float16" | "half" => DType::F16,
        other => anyhow::bail!("unknown --dtype {other:?}: use auto, f32, bf16 or f16"),
    })
}

/// Paths given on the command line.
pub fn paths(items: &[String]) -> Vec<PathBuf> {
    items.iter().map(PathBuf::from).collect()
}
