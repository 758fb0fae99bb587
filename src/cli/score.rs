//! `esmbed score`: zero-shot scores from the masked-LM head, as Parquet.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::engine::{DevicePool, PackEmbedder, PoolOptions};
use crate::input::{InputOptions, Inputs};
use crate::output::columns::OutputDType;
use crate::output::metadata::{InputIdentity, JobIdentity, PoolingMeta, Settings};
use crate::prepare::{InputPolicy, LongPolicy};
use crate::score::job::{self, ScoreJob, ScoreMode, ScoreOptions, ScoreSummary};
use crate::score::Strategy;
use crate::{EmbedOptions, Embedder, Tokenizer};

use super::{InputArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Sequences to score (FASTA, FASTA.gz, Parquet; files or directories). Not with --mutants.
    #[arg(value_name = "INPUT", required_unless_present = "mutants")]
    pub inputs: Vec<String>,

    /// Output: `out.parquet` or a dataset directory `out/`.
    #[arg(long, short)]
    pub output: String,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub input: InputArgs,

    /// Per-residue log-probabilities over the 20 standard amino acids (column `log_probs`,
    /// `List<FixedSizeList<Float32>[20]>`, columns in the order ACDEFGHIKLMNPQRSTVWY), from one
    /// unmasked forward per sequence, instead of pseudo-log-likelihoods.
    #[arg(long, conflicts_with_all = ["mutants", "per_residue"])]
    pub logits: bool,

    /// With the pseudo-log-likelihood (the default score): also each residue's term
    /// (`pll_per_residue`, `List<Float32>`).
    #[arg(long)]
    pub per_residue: bool,

    /// A deep mutational scan: a CSV/TSV (ProteinGym's format) or Parquet file of mutants (`A23G`,
    /// multi-mutants `A23G:K45R`) in --mutant-column, each scored against --wt. Output: the
    /// file's columns plus `esm_score`.
    #[arg(long, value_name = "FILE", requires = "wt")]
    pub mutants: Option<PathBuf>,

    /// The wild-type sequence: the residues, or a FASTA file whose first record is it.
    #[arg(long, value_name = "SEQUENCE|FASTA")]
    pub wt: Option<String>,

    /// The column of --mutants holding the mutants.
    #[arg(long, default_value = "mutant")]
    pub mutant_column: String,

    /// The number of the wild type's first residue in the mutants' positions.
    #[arg(long, default_value_t = 1)]
    pub offset: i64,

    /// How mutants are scored: wt-marginals (one forward of the wild type), masked-marginals
    /// (one forward per mutated position, that position masked) or pll (the mutant's
    /// pseudo-log-likelihood minus the wild type's).
    #[arg(long, value_enum, default_value = "wt-marginals")]
    pub strategy: Strategy,

    /// Sequences longer than this many residues are truncated to their first residues (scores
    /// do not window). Default: the model's training crop, 1022 for ESM-2, 2046 for ESM C.
    #[arg(long)]
    pub max_length: Option<usize>,

    /// Characters outside the ESM alphabet: error (the row goes to the errors file), x or unk.
    #[arg(long, value_enum, default_value = "error")]
    pub unknown: super::UnknownArg,

    /// Tokens per pack. Default: 4096 on the CPU; on a GPU, what fits in its free memory.
    #[arg(long)]
    pub tokens_per_batch: Option<usize>,

    /// Rows per part (output row group, resume unit). A PLL costs L forwards per sequence: the
    /// default, 1,000 rows, is minutes of GPU work per part.
    #[arg(long, default_value_t = 1000)]
    pub rows_per_part: usize,

    /// Continue an interrupted job (same command): finished parts are kept.
    #[arg(long)]
    pub resume: bool,

    /// Replace an existing output.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,

    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// Plan the job without running it (no weights loaded): rows, error rows by kind (bad
    /// mutants included), distinct sequences, residues, the masked copies' tokens and packs,
    /// the output's estimated size, memory and, where a throughput is known, the run time.
    /// Writes nothing; exits 0 when the job would run.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let devices = super::parse_devices(&args.model.run.device)?;
    let dtype = crate::devices::parse_dtype(&args.model.run.dtype, &devices[0])?;
    let (locations, seq_column) = match &args.mutants {
        Some(file) => (vec![file.display().to_string()], args.mutant_column.clone()),
        None => (args.inputs.clone(), args.input.seq_column.clone()),
    };
    let inputs = Inputs::open_locations(
        &locations,
        InputOptions {
            format: args.input.format,
            seq_column: seq_column.clone(),
            id_column: args.input.id_column.clone(),
            ..InputOptions::default()
        },
        &crate::storage::StoreOptions::from_env(),
        None,
    )?;
    let mode = mode(&args)?;
    // The dry run reads the config and fingerprint only; a run loads the model with its head.
    let (loaded, config, name, fingerprint) = if args.dry_run {
        let (config, name, fingerprint) = crate::model::describe_model(&args.model.source.model)?;
        (None, config, name, fingerprint)
    } else {
        let loaded = crate::model::load_model(
            &args.model.source.model,
            &devices,
            dtype,
            crate::model::Head::Required,
        )?;
        let config = loaded.replicas[0].config().clone();
        let (name, fingerprint) = (loaded.name.clone(), loaded.fingerprint.clone());
        (Some(loaded), config, name, fingerprint)
    };
    let tokens_per_batch = args.tokens_per_batch.unwrap_or_else(|| {
        if args.dry_run {
            return super::dry_run::planned_budget(&devices[0], &config, dtype);
        }
        crate::embed::default_tokens_per_batch_on(&devices, config.hidden_size, dtype)
    });
    let tokenizer = Tokenizer::for_family(config.family, args.unknown.into());
    let max_length = args.max_length.unwrap_or(config.crop());
    let settings = Settings {
        pooling: PoolingMeta {
            embedding: "none (scores)".into(),
            bos: false,
            per_residue: args.per_residue,
        },
        compute_dtype: crate::devices::dtype_label(dtype),
        output_dtype: OutputDType::F32,
        max_length,
        long: LongPolicy::Truncate,
        unknown: format!("{:?}", tokenizer.unknown).to_lowercase(),
        scores: Some(mode.describe()),
    };
    let identity = JobIdentity {
        inputs: InputIdentity::of(&inputs),
        seq_column,
        id_column: args.input.id_column.clone(),
        model_fingerprint: fingerprint.clone(),
        layers: vec![config.num_hidden_layers],
        settings: settings.clone(),
        rows_per_part: args.rows_per_part,
        dedupe: false,
    };
    let metadata = serde_json::json!({
        "esmbed_version": env!("CARGO_PKG_VERSION"),
        "model": name,
        "model_fingerprint": fingerprint,
        "num_layers": config.num_hidden_layers,
        "scores": settings.scores,
        "compute_dtype": settings.compute_dtype,
        "max_length": max_length,
    })
    .to_string();
    let options = ScoreOptions {
        tokens_per_batch,
        rows_per_part: args.rows_per_part,
        policy: InputPolicy {
            tokenizer,
            max_length,
            long: LongPolicy::Truncate,
        },
        resume: args.resume,
        overwrite: args.overwrite,
    };
    let output = std::path::Path::new(&args.output);
    let mut job = ScoreJob::new(inputs, output, mode, options, identity, metadata);
    if args.dry_run {
        let facts = super::dry_run::facts(&config, dtype, &devices[0]);
        let report = crate::score::dry_run::dry_run(&job, &facts)?;
        super::dry_run::print(&report, args.json, &devices[0]);
        return Ok(());
    }
    job.progress = super::progress::bar(!args.no_progress);
    let embedders = loaded
        .expect("loaded unless a dry run")
        .replicas
        .into_iter()
        .map(|m| {
            let options = EmbedOptions {
                tokens_per_batch,
                ..EmbedOptions::default()
            };
            Embedder::new(m, &options).map(|e| Arc::new(e) as Arc<dyn PackEmbedder>)
        })
        .collect::<crate::Result<Vec<_>>>()?;
    let warm_up = if devices[0].is_cpu() {
        Vec::new()
    } else {
        vec![crate::embed::warm_up_pack(tokens_per_batch, max_length)]
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let pool: DevicePool<usize> = DevicePool::start(
        embedders,
        PoolOptions {
            warm_up,
            ..PoolOptions::default()
        },
        cancel.clone(),
    )?;
    let result = job::run(&job, &pool, &cancel);
    pool.close();
    let devices = pool.join();
    let mut summary = result?;
    for d in devices? {
        summary.tokens += d.tokens;
        summary.packs += d.packs;
    }
    print_summary(&summary, args.json);
    Ok(())
}

/// What the command line asks for.
fn mode(args: &ScoreArgs) -> anyhow::Result<ScoreMode> {
    if args.mutants.is_some() {
        let wt = args.wt.as_deref().expect("clap requires --wt");
        let wt = wild_type(wt)?;
        return Ok(ScoreMode::Mutants {
            wt,
            offset: args.offset,
            strategy: args.strategy,
        });
    }
    if args.wt.is_some() {
        anyhow::bail!("--wt needs --mutants FILE (the mutants to score against it)");
    }
    Ok(if args.logits {
        ScoreMode::Logits
    } else {
        ScoreMode::Pll {
            per_residue: args.per_residue,
        }
    })
}

/// `--wt`: residues, or the first record of a FASTA file; uppercase, whitespace and a trailing
/// `*` removed.
fn wild_type(value: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(value);
    let text = if path.is_file() {
        let content = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --wt {}", path.display()))?;
        let mut lines = content.lines().skip_while(|l| l.trim().is_empty());
        let header = lines.next().unwrap_or_default();
        anyhow::ensure!(
            header.starts_with('>'),
            "--wt {}: not a FASTA file (no '>' header)",
            path.display()
        );
        lines
            .take_while(|l| !l.starts_with('>'))
            .collect::<Vec<_>>()
            .join("")
    } else {
        value.to_string()
    };
    let mut residues: String = text.split_whitespace().collect::<String>().to_uppercase();
    if residues.ends_with('*') {
        residues.pop();
    }
    anyhow::ensure!(!residues.is_empty(), "--wt is empty");
    if let Some(c) = residues.chars().find(|c| !c.is_ascii_alphabetic()) {
        anyhow::bail!("--wt: {c:?} is not an amino-acid letter");
    }
    Ok(residues)
}

/// The mode, for the manifest and the footer: what a resume must match.
fn print_summary(s: &ScoreSummary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(s).expect("summary serializes")
        );
    }
    eprintln!(
        "esmbed: {} of {} rows scored → {}",
        s.scored, s.rows, s.output
    );
    if let Some(errors) = &s.errors_output {
        eprintln!("  {} rows in {} (each with its reason)", s.errors, errors);
    }
    if s.parts_resumed > 0 {
        eprintln!("  resumed: {} parts were already done", s.parts_resumed);
    }
    if s.reused > 0 {
        eprintln!(
            "  {} rows copied the scores of an identical sequence",
            s.reused
        );
    }
    eprintln!(
        "  {} residues scored in {:.1} s ({:.0} residues/s), {} tokens in {} packs",
        s.residues,
        s.seconds,
        s.residues as f64 / s.seconds.max(1e-9),
        s.tokens,
        s.packs
    );
}
