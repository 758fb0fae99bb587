//! Throughput measurement on a synthetic workload that matches the PyTorch reference benchmark
//! (`shared/bench/torch_baseline.py`): log-normal lengths (median 270, σ 0.75, clamped to
//! 20..=1022 residues), random standard residues, random weights of a real ESM-2 shape.
//!
//! For the same workload as the reference, pass the reference's lengths (`--lengths-file`, one
//! integer per line, written by the same Python function); otherwise esmbed draws its own with
//! the same distribution.
//!
//! Two methods: `packed` (esmbed's: first-fit-decreasing packs, no padding) and `padded`
//! (length-sorted token-budgeted batches, every sequence padded to its batch's longest, as
//! fair-esm's `extract.py` does). `padded` reproduces the *cost* of padding (pad tokens go
//! through every matmul and attention); its vectors are not meaningful and are discarded.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::embed::Embedder;
use crate::engine::pool::Reply;
use crate::engine::{
    DevicePool, DeviceSummary, PackEmbedder, PackOutcome, PoolOptions, Request, Submission,
};
use crate::error::{Error, Result};
use crate::pack::{pack, packing_efficiency, PackedBatch};
use crate::tokenize::{CLS, EOS, PAD};

/// Peak dense bf16 throughput of an H100 SXM, the reference for MFU.
pub const H100_PEAK_TFLOPS: f64 = 989.0;

/// A small deterministic generator (SplitMix64), so workloads are reproducible everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// `n` residue counts, log-normal around a median of 270, clamped to `20..=cap`.
pub fn synthetic_lengths(n: usize, seed: u64, cap: usize) -> Vec<usize> {
    let mut rng = SplitMix(seed);
    (0..n)
        .map(|_| {
            let l = (rng.normal() * 0.75 + 270f64.ln()).exp().round();
            (l as usize).clamp(20, cap)
        })
        .collect()
}

/// Token sequences (`<cls>`, random standard residues (ids 4..24), `<eos>`) of the given lengths.
pub fn random_sequences(lengths: &[usize], seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix(seed ^ 0x5EED);
    lengths
        .iter()
        .map(|&l| {
            let mut t = Vec::with_capacity(l + 2);
            t.push(CLS);
            t.extend((0..l).map(|_| 4 + (rng.next() % 20) as u32));
            t.push(EOS);
            t
        })
        .collect()
}

/// How sequences are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Packed, no padding (esmbed).
    Packed,
    /// Length-sorted padded batches (the cost of padding, for comparison).
    Padded,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Model shape.
    pub model: String,
    /// The dtype the forward ran in (`bf16`, `f8e4m3`, ...), as `esmbed verify` names it, so that
    /// JSON lines of several runs say which is which.
    pub dtype: String,
    /// Method.
    pub method: Method,
    /// Sequences.
    pub sequences: usize,
    /// Real tokens (residues + 2 per sequence), as the reference counts them.
    pub tokens: usize,
    /// Tokens computed, padding included.
    pub computed_tokens: usize,
    /// Batches run.
    pub batches: usize,
    /// Wall seconds (after warm-up).
    pub seconds: f64,
    /// Real tokens per second.
    pub tokens_per_s: f64,
    /// Sequences per second.
    pub seq_per_s: f64,
    /// Model FLOP utilization against `peak_tflops`.
    pub mfu: f64,
    /// Real tokens / budgeted tokens.
    pub packing_efficiency: f64,
    /// Real tokens / computed tokens.
    pub padding_efficiency: f64,
    /// Share of wall time inside forward + pooling (averaged over devices).
    pub busy: f64,
    /// The attention kernel the packs ran ([`crate::model::attention::kernel`]).
    pub attention: &'static str,
    /// Per device, when several ran (work shared through one queue).
    pub devices: Vec<DeviceBench>,
}

/// One device's share of a measurement.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceBench {
    /// `cuda:0`.
    pub device: String,
    /// Batches it ran.
    pub batches: usize,
    /// Real tokens it embedded.
    pub tokens: usize,
    /// Its tokens per second of wall time.
    pub tokens_per_s: f64,
    /// Share of wall time it spent computing.
    pub busy: f64,
}

/// Batches for `method`: token-id sequences laid out as the model will see them.
pub fn batches(sequences: &[Vec<u32>], budget: usize, method: Method) -> Vec<PackedBatch> {
    match method {
        Method::Packed => pack(sequences, budget)
            .into_iter()
            .map(|group| group.batch)
            .collect(),
        Method::Padded => {
            // fair-esm style: sorted by length, batches while (count × max length) fits.
            let mut order: Vec<usize> = (0..sequences.len()).collect();
            order.sort_by_key(|&i| sequences[i].len());
            let mut out = Vec::new();
            let mut current: Vec<usize> = Vec::new();
            let mut longest = 0;
            for i in order {
                let l = sequences[i].len();
                if !current.is_empty() && longest.max(l) * (current.len() + 1) > budget {
                    out.push(padded(sequences, &current, longest));
                    current.clear();
                    longest = 0;
                }
                current.push(i);
                longest = longest.max(l);
            }
            if !current.is_empty() {
                out.push(padded(sequences, &current, longest));
            }
            out
        }
    }
}

fn padded(sequences: &[Vec<u32>], group: &[usize], longest: usize) -> PackedBatch {
    let rows: Vec<Vec<u32>> = group
        .iter()
        .map(|&i| {
            let mut t = sequences[i].clone();
            t.resize(longest, PAD);
            t
        })
        .collect();
    PackedBatch::from_sequences(rows.iter().map(Vec::as_slice))
}

/// Run `batches` through the embedders (replicas of one model on several devices) as a job
/// does: through the engine's device pool, one worker per device taking the next pack from the
/// shared queue, forward + mean pooling to the host. Each device first runs `warmup` untimed
/// batches. MFU is per device (throughput / devices / peak).
pub fn measure_devices(
    embedders: &[Arc<Embedder>],
    model_name: &str,
    method: Method,
    sequences: &[Vec<u32>],
    budget: usize,
    warmup: usize,
    peak_tflops: f64,
) -> Result<BenchResult> {
    let batches = batches(sequences, budget, method);
    let (stats, real, seconds) = run_timed(embedders, &batches, warmup, budget)?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    let computed: usize = batches.iter().map(PackedBatch::total_tokens).sum();
    let avg = tokens as f64 / sequences.len().max(1) as f64;
    let flops = embedders[0]
        .model()
        .config()
        .flops_per_token(avg.round() as usize)
        * tokens as f64;
    let devices: Vec<DeviceBench> = stats
        .iter()
        .zip(&real)
        .map(|(s, &tokens)| DeviceBench {
            device: s.device.clone(),
            batches: s.packs as usize,
            tokens,
            tokens_per_s: tokens as f64 / seconds,
            busy: s.busy_seconds / seconds,
        })
        .collect();
    let n = embedders.len().max(1) as f64;
    Ok(BenchResult {
        model: model_name.to_string(),
        dtype: crate::devices::dtype_label(embedders[0].model().dtype()),
        method,
        sequences: sequences.len(),
        tokens,
        computed_tokens: computed,
        batches: batches.len(),
        seconds,
        tokens_per_s: tokens as f64 / seconds,
        seq_per_s: sequences.len() as f64 / seconds,
        mfu: flops / seconds / (peak_tflops * 1e12) / n,
        packing_efficiency: packing_efficiency(tokens, batches.len(), budget),
        padding_efficiency: tokens as f64 / computed as f64,
        busy: devices.iter().map(|d| d.busy).sum::<f64>() / n,
        attention: attention_of(&embedders[0]),
        devices,
    })
}

/// The attention kernel an embedder's packs run.
fn attention_of(embedder: &Embedder) -> &'static str {
    let model = embedder.model();
    let activations = crate::model::fp8::activation_dtype(model.dtype());
    crate::model::attention::kernel(model.device(), activations)
}

/// Warm every device up on the first `warmup` batches, then run all of them through the pool:
/// per-device summaries, real tokens (padding excluded) per device, and the timed seconds.
fn run_timed(
    embedders: &[Arc<Embedder>],
    batches: &[PackedBatch],
    warmup: usize,
    budget: usize,
) -> Result<(Vec<DeviceSummary>, Vec<usize>, f64)> {
    let devices: Vec<Arc<dyn PackEmbedder>> = embedders
        .iter()
        .map(|e| e.clone() as Arc<dyn PackEmbedder>)
        .collect();
    let options = PoolOptions {
        capacity: None,
        warm_up: batches.iter().take(warmup).cloned().collect(),
    };
    let pool = DevicePool::<()>::start(devices, options, Arc::new(AtomicBool::new(false)))?;
    tracing::info!("warm-up done on {} device(s)", embedders.len());
    // The profile covers the timed batches only.
    crate::model::profile::reset();
    // Real tokens (padding excluded) per device, and whether a sequence did not fit.
    let real = Arc::new(Mutex::new((vec![0usize; embedders.len()], false)));
    let reply: Reply<()> = {
        let real = real.clone();
        Arc::new(move |outcome| {
            let mut real = real.lock().unwrap();
            match outcome {
                PackOutcome::Done { batch, device, .. } => {
                    real.0[device] += (0..batch.len())
                        .map(|i| batch.tokens(i).iter().filter(|&&t| t != PAD).count())
                        .sum::<usize>();
                }
                PackOutcome::Failed { .. } => real.1 = true,
            }
            true
        })
    };
    let started = Instant::now();
    for batch in batches {
        let submission = Submission {
            batch: batch.clone(),
            request: Request::Configured {
                residues: false,
                log_probs: false,
            },
            context: Arc::new(()),
            reply: reply.clone(),
        };
        if !pool.submit(submission) {
            break;
        }
    }
    pool.close();
    let stats = pool.join()?;
    let seconds = started.elapsed().as_secs_f64();
    let (real, failed) = real.lock().unwrap().clone();
    if failed {
        return Err(Error::OutOfMemory {
            detail: format!(
                "a benchmark sequence does not fit even alone: lower --tokens-per-batch ({budget})"
            ),
        });
    }
    Ok((stats, real, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_follow_the_reference_distribution() {
        let lengths = synthetic_lengths(20_000, 0, 1022);
        assert!(lengths.iter().all(|&l| (20..=1022).contains(&l)));
        let mut sorted = lengths.clone();
        sorted.sort();
        let median = sorted[sorted.len() / 2];
        assert!((255..=285).contains(&median), "median {median}");
        let mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        // The reference's mean is ~338 residues (340 tokens).
        assert!((320.0..=355.0).contains(&mean), "mean {mean}");
        assert_eq!(
            synthetic_lengths(10, 0, 1022),
            synthetic_lengths(10, 0, 1022)
        );
    }

    #[test]
    fn packed_beats_padded_on_computed_tokens() {
        // A part's worth of UniRef-like sequences (esmbed sorts and packs 10k rows at a time).
        let seqs = random_sequences(&synthetic_lengths(10_000, 1, 1022), 1);
        let packed = batches(&seqs, 16384, Method::Packed);
        let padded = batches(&seqs, 16384, Method::Padded);
        let real: usize = seqs.iter().map(Vec::len).sum();
        let p: usize = packed.iter().map(PackedBatch::total_tokens).sum();
        let q: usize = padded.iter().map(PackedBatch::total_tokens).sum();
        assert_eq!(p, real);
        assert!(q > real);
        assert!(packing_efficiency(real, packed.len(), 16384) > 0.99);
        assert!(padded.iter().all(|b| b.total_tokens() <= 16384));
    }
}
