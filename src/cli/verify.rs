//! `esmbed verify`: how close a device and dtype are to the exact CPU f32 path.

use anyhow::Context;
use clap::Args;

use crate::{bench, verify, Checkpoint, ModelSource};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub model: super::ModelArg,

    /// Device to check against the CPU f32 path.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Dtypes to check (fp8: e4m3 GEMMs on Hopper GPUs; run this on your own model before a
    /// large FP8 job).
    #[arg(long, value_delimiter = ',', default_value = "bf16,f16")]
    pub dtype: Vec<String>,

    /// Random sequences besides the fixed edge cases (lengths 1, 2, 3, 50, 1022).
    #[arg(long, short, default_value_t = 40)]
    pub n: usize,

    /// Fail (exit 1) if a mean embedding's cosine similarity falls below this.
    #[arg(long, default_value_t = 0.999)]
    pub min_cosine: f64,

    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let device = super::parse_device(&args.device)?;
    let checkpoint = Checkpoint::open(&ModelSource::parse(&args.model.model)?)?;
    let mut lengths = vec![1, 2, 3, 50, 1022];
    lengths.extend(bench::synthetic_lengths(args.n, 7, 1022));
    let sequences = bench::random_sequences(&lengths, 7);
    let mut failed = false;
    let dtypes = args
        .dtype
        .iter()
        .map(|d| crate::devices::parse_dtype(d, &device))
        .collect::<Result<Vec<_>, _>>()?;
    let agreements = verify::compare_each(&checkpoint, &device, &dtypes, &sequences)
        .context("running the CPU f32 reference")?;
    for (a, dtype) in agreements.zip(&dtypes) {
        let a = a.with_context(|| format!("running {device:?} in {dtype:?}"))?;
        if args.json {
            println!("{}", serde_json::to_string(&a)?);
        } else {
            let top1 = a
                .top1_agreement
                .map_or("no head".into(), |t| format!("{:.4}", t));
            println!(
                "{} {} ({}): {} sequences, min cosine {:.6} (mean {:.6}), mean max abs err {:.2e} (rel {:.2e}), last-layer tokens rel err {:.2e}, top-1 agreement {top1}, alone-vs-packed max abs {:.2e}",
                a.device, a.dtype, a.attention, a.sequences, a.min_cosine, a.mean_cosine, a.mean_max_abs_error, a.mean_max_rel_error,
                a.hidden_max_rel_error, a.invariance_max_abs
            );
        }
        failed |= a.min_cosine < args.min_cosine;
    }
    if failed {
        anyhow::bail!("cosine similarity below --min-cosine {}", args.min_cosine);
    }
    Ok(())
}
