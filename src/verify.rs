//! How far a device and dtype are from the exact CPU f32 path, on the same weights.
//!
//! The CPU f32 path is tested against transformers in CI; this measures everything else (GPU,
//! bf16/f16, FlashAttention) against it: cosine similarity and errors of the mean embeddings,
//! the error of the last layer's per-token states, the agreement of the masked-LM head's top-1
//! prediction at every residue (where the checkpoint has a head), and batch invariance on the
//! device (a sequence alone vs inside a pack).

use candle_core::{DType, Device};
use serde::Serialize;

use crate::embed::{EmbedOptions, Embedder};
use crate::error::Result;
use crate::model::{Checkpoint, Model};
use crate::pack::pack;

/// Agreement of one device/dtype with the CPU f32 reference.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// Device, as debug text.
    pub device: String,
    /// Compute dtype.
    pub dtype: String,
    /// The attention kernel the subject ran ([`crate::model::attention::kernel`]).
    pub attention: &'static str,
    /// Sequences compared.
    pub sequences: usize,
    /// Lowest cosine similarity of a mean embedding with its reference.
    pub min_cosine: f64,
    /// Average cosine similarity of a mean embedding with its reference.
    pub mean_cosine: f64,
    /// Largest absolute error of a mean-embedding element.
    pub mean_max_abs_error: f64,
    /// Largest `max |err| / max |ref|` of a mean embedding.
    pub mean_max_rel_error: f64,
    /// Largest `max |err| / max |ref|` of the last layer's per-token states of a sequence.
    pub hidden_max_rel_error: f64,
    /// Fraction of residues whose top-1 masked-LM prediction (last layer, unmasked input)
    /// equals the reference's; `None` where the checkpoint has no head.
    pub top1_agreement: Option<f64>,
    /// Largest absolute difference of a mean embedding alone vs inside a pack (on the device).
    pub invariance_max_abs: f64,
}

fn means(embedder: &Embedder, sequences: &[Vec<u32>], budget: usize) -> Result<Vec<Vec<f32>>> {
    Ok(embedder
        .embed_tokens_with_budget(sequences, budget)?
        .into_iter()
        .map(|e| e.layers[0].mean.clone().expect("mean pooling"))
        .collect())
}

/// Pack budget of the comparisons (several packs for the default 45 sequences).
const BUDGET: usize = 8192;

/// What the CPU f32 path gives on the sequences: mean embeddings, the last layer's token states
/// of each pack (per sequence), and the head's top-1 token at each residue (with a head).
struct Reference {
    means: Vec<Vec<f32>>,
    packs: Vec<ReferencePack>,
}

struct ReferencePack {
    batch: crate::pack::PackedBatch,
    last: LastLayer,
}

/// The last layer's token states of each sequence of a pack, and the head's top-1 token at
/// every residue (with a head).
struct LastLayer {
    states: Vec<Vec<f32>>,
    top1: Option<Vec<usize>>,
}

impl Reference {
    fn new(checkpoint: &Checkpoint, sequences: &[Vec<u32>]) -> Result<Self> {
        let head = checkpoint.has_lm_head();
        let model = Model::load(checkpoint, &Device::Cpu, DType::F32, head)?;
        let embedder = Embedder::new(model, &EmbedOptions::default())?;
        let packs = pack(sequences, BUDGET)
            .into_iter()
            .map(|group| {
                let last = last_layer(embedder.model(), &group.batch, head)?;
                Ok(ReferencePack {
                    batch: group.batch,
                    last,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            means: means(&embedder, sequences, BUDGET)?,
            packs,
        })
    }
}

/// [`LastLayer`] of `batch` (the top-1 tokens with `head`), from one forward.
fn last_layer(model: &Model, batch: &crate::pack::PackedBatch, head: bool) -> Result<LastLayer> {
    let hidden = model
        .forward(batch, &[model.config().num_hidden_layers])?
        .remove(0);
    let top1 = match head {
        true => {
            let at = crate::engine::LogProbsAt::Residues;
            let rows = crate::model::esm2::query_positions(batch, at, model.config().mask_token_id);
            Some(match rows.is_empty() {
                true => Vec::new(),
                false => top1(&model.head_log_probs(&hidden, rows)?),
            })
        }
        false => None,
    };
    Ok(LastLayer {
        states: per_sequence(batch, hidden)?,
        top1,
    })
}

/// The rows of `[T, H]` states of each sequence of `batch`, in f32 on the host.
fn per_sequence(
    batch: &crate::pack::PackedBatch,
    states: candle_core::Tensor,
) -> Result<Vec<Vec<f32>>> {
    let states = states.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    (0..batch.len())
        .map(|i| {
            let range = batch.range(i);
            Ok(states
                .narrow(0, range.start, range.len())?
                .flatten_all()?
                .to_vec1()?)
        })
        .collect()
}

/// Compare `device`/`dtype` with CPU f32 on `sequences` (token ids with `<cls>`/`<eos>`).
pub fn compare(
    checkpoint: &Checkpoint,
    device: &Device,
    dtype: DType,
    sequences: &[Vec<u32>],
) -> Result<Agreement> {
    let dtypes = [dtype];
    let mut each = compare_each(checkpoint, device, &dtypes, sequences)?;
    each.next().expect("one dtype, one agreement")
}

/// [`compare`] for each of `dtypes`, the CPU f32 reference computed once (the slow part on large
/// models); each agreement is computed as the iterator reaches it.
pub fn compare_each<'a>(
    checkpoint: &'a Checkpoint,
    device: &'a Device,
    dtypes: &'a [DType],
    sequences: &'a [Vec<u32>],
) -> Result<impl Iterator<Item = Result<Agreement>> + 'a> {
    let reference = Reference::new(checkpoint, sequences)?;
    Ok(dtypes
        .iter()
        .map(move |&dtype| against(&reference, checkpoint, device, dtype, sequences)))
}

fn against(
    reference: &Reference,
    checkpoint: &Checkpoint,
    device: &Device,
    dtype: DType,
    sequences: &[Vec<u32>],
) -> Result<Agreement> {
    let head = checkpoint.has_lm_head();
    let subject = Embedder::new(
        Model::load(checkpoint, device, dtype, head)?,
        &EmbedOptions::default(),
    )?;
    let got = means(&subject, sequences, BUDGET)?;
    let activations = crate::model::fp8::activation_dtype(dtype);
    let mut a = Agreement {
        device: format!("{device:?}"),
        dtype: crate::devices::dtype_label(dtype),
        attention: crate::model::attention::kernel(device, activations),
        sequences: sequences.len(),
        min_cosine: 1.0,
        mean_cosine: 0.0,
        mean_max_abs_error: 0.0,
        mean_max_rel_error: 0.0,
        hidden_max_rel_error: 0.0,
        top1_agreement: None,
        invariance_max_abs: 0.0,
    };
    for (g, e) in got.iter().zip(&reference.means) {
        let c = cosine(g, e);
        a.min_cosine = a.min_cosine.min(c);
        a.mean_cosine += c / got.len().max(1) as f64;
        let err = max_abs_diff(g, e);
        a.mean_max_abs_error = a.mean_max_abs_error.max(err);
        a.mean_max_rel_error = a.mean_max_rel_error.max(err / max_abs(e));
    }
    // Per-token states of the last layer and the head's top-1, pack by pack.
    let (mut agreeing, mut residues) = (0usize, 0usize);
    for p in &reference.packs {
        let got = last_layer(subject.model(), &p.batch, head)?;
        for (ss, rr) in got.states.iter().zip(&p.last.states) {
            a.hidden_max_rel_error = a
                .hidden_max_rel_error
                .max(max_abs_diff(ss, rr) / max_abs(rr));
        }
        if let (Some(want), Some(have)) = (&p.last.top1, got.top1) {
            agreeing += want.iter().zip(&have).filter(|(w, h)| w == h).count();
            residues += want.len();
        }
    }
    if head {
        a.top1_agreement = Some(agreeing as f64 / residues.max(1) as f64);
    }
    // Batch invariance on the device: alone vs packed.
    for (i, seq) in sequences.iter().enumerate() {
        let alone = means(&subject, std::slice::from_ref(seq), BUDGET)?;
        a.invariance_max_abs = a.invariance_max_abs.max(max_abs_diff(&alone[0], &got[i]));
    }
    Ok(a)
}

/// The most probable token of each row of `[Q, 33]` log-probabilities.
fn top1(log_probs: &[f32]) -> Vec<usize> {
    log_probs
        .chunks(33)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()))
}

fn max_abs(a: &[f32]) -> f64 {
    a.iter()
        .fold(0f64, |m, x| m.max((*x as f64).abs()))
        .max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_is_the_argmax_of_each_row() {
        let mut rows = vec![-5f32; 66];
        rows[7] = -0.1;
        rows[33 + 32] = -0.5;
        rows[33 + 4] = -0.6;
        assert_eq!(top1(&rows), vec![7, 32]);
    }

    #[test]
    fn cosine_and_errors() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-12);
        assert_eq!(max_abs_diff(&[1.0, -2.0], &[1.5, -2.0]), 0.5);
        assert_eq!(max_abs(&[1.0, -3.0]), 3.0);
    }
}
