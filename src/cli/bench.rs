//! `esmbed bench`: throughput on the reference benchmark's synthetic workload.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::bench::{self, Method, H100_PEAK_TFLOPS};
use crate::{EmbedOptions, Embedder, EsmConfig, Model};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Shapes to measure, with random weights (the cost does not depend on the values): ESM-2's
    /// 8M, 35M, 150M, 650M, 3B, 15B and ESM C's esmc-300m, esmc-600m, esmc-6b.
    #[arg(long, value_delimiter = ',', default_value = "650M")]
    pub shape: Vec<String>,

    #[command(flatten)]
    pub run: super::DeviceArgs,

    /// Number of synthetic sequences.
    #[arg(long, short, default_value_t = 4000)]
    pub n: usize,

    /// Seed of the synthetic lengths and residues.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Residue counts, one per line, instead of esmbed's own draw (to run exactly the reference
    /// benchmark's workload).
    #[arg(long)]
    pub lengths_file: Option<PathBuf>,

    /// Token budget per batch. Default: 65536, or 32768 for 3B and larger (as the reference).
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,

    /// Methods: packed (esmbed) and padded (length-sorted padded batches, for comparison).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "packed,padded"
    )]
    pub method: Vec<Method>,

    /// Only the no-packing comparison (length-sorted padded batches): `--method padded`.
    #[arg(long, conflicts_with = "method")]
    pub no_pack: bool,

    /// Untimed warm-up batches.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,

    /// Peak TFLOP/s of one device, for MFU (H100 SXM dense bf16: 989). With several devices MFU
    /// is per device.
    #[arg(long, default_value_t = H100_PEAK_TFLOPS)]
    pub peak_tflops: f64,

    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Residue counts of the workload: the reference's (`--lengths-file`) or drawn like them.
fn workload_lengths(args: &BenchArgs) -> anyhow::Result<Vec<usize>> {
    Ok(match &args.lengths_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .split_whitespace()
            .map(|t| {
                t.parse::<usize>()
                    .with_context(|| format!("{}: not a length: {t:?}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => bench::synthetic_lengths(args.n, args.seed, 1022),
    })
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let devices = super::parse_devices(&args.run.device)?;
    let device = devices[0].clone();
    let dtype = crate::devices::parse_dtype(&args.run.dtype, &device)?;
    let lengths = workload_lengths(&args)?;
    let sequences = bench::random_sequences(&lengths, args.seed + 1);
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    if !args.json {
        println!(
            "workload: {} sequences, {} tokens (mean {:.0}), device {:?}, {:?}",
            sequences.len(),
            tokens,
            tokens as f64 / sequences.len().max(1) as f64,
            device,
            dtype
        );
        println!(
            "{:<6} {:<7} {:>12} {:>9} {:>6} {:>8} {:>8} {:>6}",
            "model", "method", "tokens/s", "seq/s", "MFU", "packing", "padding", "busy"
        );
    }
    for shape in &args.shape {
        let config = EsmConfig::published(shape).with_context(|| {
            format!(
                "unknown shape {shape:?}: use one of {}",
                EsmConfig::published_names()
            )
        })?;
        let budget = args
            .tokens_per_batch
            .unwrap_or(if config.hidden_size >= 2560 {
                32768
            } else {
                65536
            });
        let model = Model::random(&config, &device, dtype, 0)?;
        let embedders = model
            .replicate_to(&devices)?
            .into_iter()
            .map(|m| Embedder::new(m, &EmbedOptions::default()).map(std::sync::Arc::new))
            .collect::<crate::Result<Vec<_>>>()?;
        let methods = if args.no_pack {
            vec![Method::Padded]
        } else {
            args.method.clone()
        };
        for &method in &methods {
            let r = bench::measure_devices(
                &embedders,
                shape,
                method,
                &sequences,
                budget,
                args.warmup,
                args.peak_tflops,
            )?;
            report(&r, shape, args.json)?;
        }
    }
    Ok(())
}

/// Print one measurement (and the per-op profile, when enabled).
fn report(r: &bench::BenchResult, shape: &str, json: bool) -> anyhow::Result<()> {
    if crate::model::profile::enabled() {
        for (name, seconds, calls, share) in crate::model::profile::take_report() {
            let row = serde_json::json!({"model": shape, "method": r.method, "op": name,
                "seconds": seconds, "calls": calls, "share": share});
            eprintln!("{row}");
        }
    }
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:<6} {:<7} {:>12.0} {:>9.1} {:>6.3} {:>7.1}% {:>7.1}% {:>5.0}%",
            r.model,
            format!("{:?}", r.method).to_lowercase(),
            r.tokens_per_s,
            r.seq_per_s,
            r.mfu,
            100.0 * r.packing_efficiency,
            100.0 * r.padding_efficiency,
            100.0 * r.busy
        );
        if r.devices.len() > 1 {
            for d in &r.devices {
                println!(
                    "  {:<12} {:>12.0} tokens/s, {} batches, busy {:.0}%",
                    d.device,
                    d.tokens_per_s,
                    d.batches,
                    100.0 * d.busy
                );
            }
        }
    }
    Ok(())
}
