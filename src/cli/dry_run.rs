//! `esmbed embed --dry-run`: the job's plan and estimates, printed (see
//! [`crate::pipeline::dry_run`]).

use crate::input::Inputs;
use crate::output::remote::RemoteOutput;
use crate::pipeline::dry_run::{self, DryRun, ModelFacts};
use crate::pipeline::spec::ModelView;
use crate::pipeline::{JobSpec, ModelIdentity};
use crate::{DType, Device, Embedder, Tokenizer};

use super::embed::{job_options, pooling, EmbedArgs};

/// Plan the job with the model's config only: no weights are loaded.
pub fn run(
    args: &EmbedArgs,
    inputs: Inputs,
    remote: Option<RemoteOutput>,
    devices: &[Device],
    dtype: DType,
    rows_per_part: usize,
) -> anyhow::Result<()> {
    let (config, name, fingerprint) = crate::model::describe_model(&args.model.source.model)?;
    let mut layers = Vec::new();
    for &l in &args.columns.layers {
        let resolved = config.resolve_layer(l)?;
        if !layers.contains(&resolved) {
            layers.push(resolved);
        }
    }
    let device = &devices[0];
    let tokens_per_batch = args
        .tokens_per_batch
        .unwrap_or_else(|| planned_budget(device, &config, dtype));
    let view = ModelView {
        config: &config,
        dtype,
        layers,
        pooling: pooling(args),
        tokenizer: Tokenizer::for_family(config.family, args.columns.unknown.into()),
    };
    let options = job_options(args, &config, tokens_per_batch, rows_per_part, devices);
    let output = std::path::Path::new(&args.output);
    let identity = ModelIdentity { name, fingerprint };
    let mut spec = JobSpec::for_model(inputs, output, &view, identity, options);
    if let Some(remote) = remote {
        spec = spec.with_remote_output(remote);
    }
    let report = dry_run::dry_run(&spec, &facts(&config, dtype, device), None)?;
    print(&report, args.json, device);
    Ok(())
}

/// Plan the job, then time a few of its packs on the loaded model (`--bench`).
pub fn run_measured(
    args: &EmbedArgs,
    spec: &JobSpec,
    embedder: &Embedder,
    devices: &[Device],
    dtype: DType,
) -> anyhow::Result<()> {
    let config = embedder.model().config();
    let report = dry_run::dry_run(spec, &facts(config, dtype, &devices[0]), Some(embedder))?;
    print(&report, args.json, &devices[0]);
    Ok(())
}

/// The token budget a job would pick on `device` once the weights are loaded (they are not: the
/// free memory less their estimated size).
pub fn planned_budget(device: &Device, config: &crate::EsmConfig, dtype: DType) -> usize {
    let weights = crate::model::memory::parameters(config) * dtype.size_in_bytes() as u64;
    crate::embed::free_device_memory(device)
        .map(|free| {
            let left = (free as u64).saturating_sub(weights);
            crate::embed::tokens_per_batch_for(left, config.hidden_size, dtype)
        })
        .unwrap_or(4096)
}

/// What the dry run needs of the model and device.
pub fn facts(config: &crate::EsmConfig, dtype: DType, device: &Device) -> ModelFacts {
    ModelFacts {
        config: config.clone(),
        dtype,
        cpu: device.is_cpu(),
        device_name: crate::devices::name(device),
    }
}

/// Print the report (`--json`: one object).
pub fn print(r: &DryRun, json: bool, device: &Device) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("the report serializes")
        );
        return;
    }
    println!("esmbed dry run: nothing was computed or written");
    println!("  rows               {}", r.rows);
    println!(
        "  output rows        {} ({} truncated to --max-length)",
        r.output_rows, r.truncated
    );
    if let Some(distinct) = r.distinct {
        println!(
            "  distinct sequences {distinct} ({} rows would copy an identical sequence's result)",
            r.reused
        );
    }
    println!("  error rows         {}", r.errors);
    for (problem, n) in &r.errors_by_problem {
        println!("    {problem:<18} {n}");
    }
    for e in &r.error_examples {
        println!(
            "    e.g. {} record {} ({}): {}",
            e.input,
            e.record,
            e.id.as_deref().unwrap_or("no id"),
            e.reason
        );
    }
    println!("  residues           {}", r.residues);
    println!(
        "  tokens             {} in {} packs of up to {} (packing efficiency {:.1}%), {} part(s){}",
        r.tokens,
        r.packs,
        r.tokens_per_batch,
        100.0 * r.packing_efficiency,
        r.parts,
        if r.parts_resumed > 0 {
            format!(" ({} already done)", r.parts_resumed)
        } else {
            String::new()
        }
    );
    println!(
        "  output size        ~{} (estimated)",
        bytes(r.output_bytes)
    );
    println!(
        "  peak memory        ~{} on {}: weights {} + activations {} (fullest pack {} tokens, longest sequence {} tokens)",
        bytes(r.memory.total()),
        crate::devices::label(device),
        bytes(r.memory.weights),
        bytes(r.memory.activations),
        r.longest_pack_tokens,
        r.longest_sequence_tokens
    );
    match (&r.throughput, r.estimated_seconds) {
        (Some(t), Some(seconds)) => println!(
            "  model time         ~{} at {:.0} tokens/s ({})",
            duration(seconds),
            t.tokens_per_second,
            t.source
        ),
        _ => println!(
            "  model time         unknown for this model and device: add --bench to time a few packs"
        ),
    }
}

fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = b as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=119 => format!("{seconds:.1} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{:.1} h", seconds / 3600.0),
    }
}
