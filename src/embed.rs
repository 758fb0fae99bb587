//! The library's front door: text in, embeddings out.
//!
//! [`Embedder`] owns a model and the choices that shape its output (layers, pooling, tokenizer
//! policy). [`Embedder::embed_packed`] is the primitive the pipeline drives;
//! [`Embedder::embed`] is the convenience for a list of sequences: it sorts them by length, packs
//! them under a token budget, and returns results in the caller's order.

use candle_core::{DType, Device};

use crate::engine::{LogProbsAt, Request};
use crate::error::{Error, Result};
use crate::model::{Checkpoint, Model, ModelSource};
use crate::pack::PackedBatch;
use crate::pool::{pool, pool_selected, PooledLayer, Pooling};
use crate::tokenize::{Tokenizer, UnknownResidue};

/// What to compute for every sequence.
#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// Layers to return, fair-esm numbering: 0 = embeddings, negatives from the end (-1 = last,
    /// normalized). Default `[-1]`.
    pub layers: Vec<i64>,
    /// Which pooled outputs per layer.
    pub pooling: Pooling,
    /// Policy for characters outside the alphabet.
    pub unknown: UnknownResidue,
    /// Token budget of one pack for [`Embedder::embed`].
    pub tokens_per_batch: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            layers: vec![-1],
            pooling: Pooling::default(),
            unknown: UnknownResidue::Error,
            tokens_per_batch: 8192,
        }
    }
}

/// One sequence's outputs for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerEmbedding {
    /// The layer (resolved fair-esm number).
    pub layer: usize,
    /// Mean over residues, `[H]`.
    pub mean: Option<Vec<f32>>,
    /// The `<cls>` vector, `[H]`.
    pub bos: Option<Vec<f32>>,
    /// Residue vectors, `[L × H]` row-major.
    pub residues: Option<Vec<f32>>,
}

/// All outputs for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceEmbedding {
    /// Residue count.
    pub length: usize,
    /// One entry per requested layer, in the order requested.
    pub layers: Vec<LayerEmbedding>,
}

/// A loaded model with its output choices.
pub struct Embedder {
    model: Model,
    layers: Vec<usize>,
    pooling: Pooling,
    tokenizer: Tokenizer,
    tokens_per_batch: usize,
}

impl Embedder {
    /// Wrap a loaded model.
    pub fn new(model: impl Into<Model>, options: &EmbedOptions) -> Result<Self> {
        let model = model.into();
        if options.layers.is_empty() {
            return Err(Error::InvalidOption("no layers requested".into()));
        }
        let mut layers = Vec::with_capacity(options.layers.len());
        for &l in &options.layers {
            let resolved = model.resolve_layer(l)?;
            if !layers.contains(&resolved) {
                layers.push(resolved);
            }
        }
        let p = options.pooling;
        if !(p.mean || p.bos || p.per_residue) {
            return Err(Error::InvalidOption("no pooling selected".into()));
        }
        Ok(Self {
            tokenizer: Tokenizer::for_family(model.config().family, options.unknown),
            model,
            layers,
            pooling: options.pooling,
            tokens_per_batch: options.tokens_per_batch.max(1),
        })
    }

    /// Load a model from what the user typed (directory, `.pt`, hub id or short name).
    pub fn load(spec: &str, device: &Device, dtype: DType, options: &EmbedOptions) -> Result<Self> {
        let checkpoint = Checkpoint::open(&ModelSource::parse(spec)?)?;
        Self::new(Model::load(&checkpoint, device, dtype, false)?, options)
    }

    /// The same embedder on another device. Weights are copied, not reloaded, so every replica
    /// gives identical results (random weights included).
    pub fn replicate(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            model: self.model.replicate(device)?,
            layers: self.layers.clone(),
            pooling: self.pooling,
            tokenizer: self.tokenizer,
            tokens_per_batch: self.tokens_per_batch,
        })
    }

    /// The device's short name (`cpu`, `cuda:1`).
    pub fn device_label(&self) -> String {
        crate::devices::label(self.model.device())
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Resolved layers, in output order.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Pooling choices.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The tokenizer (with the configured policy).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Embed one pack: one forward, then pooling of every requested layer for the whole pack.
    pub fn embed_packed(&self, batch: &PackedBatch) -> Result<Vec<PooledLayer>> {
        self.embed_packed_with(batch, false)
    }

    /// [`Embedder::embed_packed`], with per-residue outputs forced on when `residues` is set
    /// (long sequences embedded in windows are averaged per residue).
    pub fn embed_packed_with(
        &self,
        batch: &PackedBatch,
        residues: bool,
    ) -> Result<Vec<PooledLayer>> {
        let hidden = self.model.forward(batch, &self.layers)?;
        let mut pooling = self.pooling;
        pooling.per_residue |= residues;
        crate::model::profile::time(self.model.device(), "pool_to_host", || {
            hidden
                .iter()
                .zip(&self.layers)
                .map(|(h, &layer)| pool(h, batch, layer, pooling))
                .collect()
        })
    }

    /// [`Embedder::embed_packed_with`] for a pack of masked copies (`embed --pll`): one forward
    /// gives the configured layers and, from the last, the log-probabilities at every `<mask>`
    /// (a trailing entry, see [`Request::Configured`]); per-residue vectors only for the
    /// sequences without a mask.
    fn embed_with_log_probs(
        &self,
        batch: &PackedBatch,
        residues: bool,
    ) -> Result<Vec<PooledLayer>> {
        let config = self.model.config();
        let last = config.num_hidden_layers;
        let mut layers = self.layers.clone();
        let at = match layers.iter().position(|&l| l == last) {
            Some(i) => i,
            None => {
                layers.push(last);
                layers.len() - 1
            }
        };
        let hidden = self.model.forward(batch, &layers)?;
        let mask = config.mask_token_id;
        let unmasked: Vec<bool> = (0..batch.len())
            .map(|i| !batch.tokens(i).contains(&mask))
            .collect();
        let mut pooling = self.pooling;
        pooling.per_residue |= residues;
        let mut out = crate::model::profile::time(self.model.device(), "pool_to_host", || {
            hidden
                .iter()
                .zip(&self.layers)
                .map(|(h, &layer)| pool_selected(h, batch, layer, pooling, Some(&unmasked)))
                .collect::<Result<Vec<_>>>()
        })?;
        let rows = crate::model::esm2::query_positions(batch, LogProbsAt::Masked, mask);
        let log_probs = match rows.is_empty() {
            true => Vec::new(),
            false => self.model.head_log_probs(&hidden[at], rows)?,
        };
        out.push(PooledLayer {
            layer: last,
            hidden: config.hidden_size,
            mean: None,
            bos: None,
            residues: None,
            log_probs: Some(log_probs),
        });
        Ok(out)
    }

    /// Embed one pack as `request` asks: the configured layers and pooling, or the mean (and
    /// per-residue outputs) of one layer, whatever the embedder was built for (SQL picks the
    /// layer per call).
    pub fn embed_request(&self, batch: &PackedBatch, request: Request) -> Result<Vec<PooledLayer>> {
        match request {
            Request::Configured {
                residues,
                log_probs: false,
            } => self.embed_packed_with(batch, residues),
            Request::Configured {
                residues,
                log_probs: true,
            } => self.embed_with_log_probs(batch, residues),
            Request::Layer { layer, residues } => {
                let hidden = self.model.forward(batch, &[layer])?;
                let pooling = Pooling {
                    mean: true,
                    bos: false,
                    per_residue: residues,
                };
                Ok(vec![pool(&hidden[0], batch, layer, pooling)?])
            }
            Request::LogProbs { at } => {
                let log_probs = self.model.log_probs(batch, at)?;
                Ok(vec![PooledLayer {
                    layer: self.model.config().num_hidden_layers,
                    hidden: self.model.config().hidden_size,
                    mean: None,
                    bos: None,
                    residues: None,
                    log_probs: Some(log_probs),
                }])
            }
        }
    }

    /// Embed sequences given as text, returning results in input order. Fails on the first
    /// sequence that does not tokenize, naming its index.
    pub fn embed<S: AsRef<str>>(&self, sequences: &[S]) -> Result<Vec<SequenceEmbedding>> {
        let tokens = sequences
            .iter()
            .enumerate()
            .map(|(index, s)| {
                self.tokenizer
                    .encode(s.as_ref())
                    .map_err(|source| Error::InvalidSequence { index, source })
            })
            .collect::<Result<Vec<_>>>()?;
        self.embed_tokens(&tokens)
    }

    /// Embed pre-tokenized sequences (`<cls> … <eos>`, `<mask>` allowed), in input order.
    pub fn embed_tokens(&self, tokens: &[Vec<u32>]) -> Result<Vec<SequenceEmbedding>> {
        self.embed_tokens_with_budget(tokens, self.tokens_per_batch)
    }

    /// [`Embedder::embed_tokens`] with packs of at most `budget` tokens.
    pub fn embed_tokens_with_budget(
        &self,
        tokens: &[Vec<u32>],
        budget: usize,
    ) -> Result<Vec<SequenceEmbedding>> {
        let mut results: Vec<Option<SequenceEmbedding>> = vec![None; tokens.len()];
        for group in crate::pack::pack(tokens, budget) {
            let pooled = self.embed_packed(&group.batch)?;
            for (slot, split) in group
                .members
                .iter()
                .zip(split_pooled(&pooled, &group.batch))
            {
                results[*slot] = Some(split);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every sequence is in exactly one pack"))
            .collect())
    }
}

/// Cut a pack's pooled outputs into one [`SequenceEmbedding`] per sequence, in pack order.
pub fn split_pooled(pooled: &[PooledLayer], batch: &PackedBatch) -> Vec<SequenceEmbedding> {
    let counts = batch.residue_counts();
    let mut residue_offsets = Vec::with_capacity(counts.len());
    let mut offset = 0;
    for &c in &counts {
        residue_offsets.push(offset);
        offset += c;
    }
    (0..batch.len())
        .map(|i| SequenceEmbedding {
            length: counts[i],
            layers: pooled
                .iter()
                .map(|p| {
                    let h = p.hidden;
                    LayerEmbedding {
                        layer: p.layer,
                        mean: p.mean.as_ref().map(|m| m[i * h..(i + 1) * h].to_vec()),
                        bos: p.bos.as_ref().map(|m| m[i * h..(i + 1) * h].to_vec()),
                        residues: p.residues.as_ref().map(|r| {
                            let start = residue_offsets[i] * h;
                            r[start..start + counts[i] * h].to_vec()
                        }),
                    }
                })
                .collect(),
        })
        .collect()
}

/// A pack of `tokens_per_batch` tokens of the longest allowed sequences: run first on every
/// device ([`crate::engine::PoolOptions::warm_up`]), so that a budget that does not fit in device
/// memory fails at start-up with the fix, not an hour into a job.
pub fn warm_up_pack(tokens_per_batch: usize, max_length: usize) -> PackedBatch {
    let per_sequence = (max_length + 2).min(tokens_per_batch.max(3));
    let count = (tokens_per_batch / per_sequence).max(1);
    let sequence: Vec<u32> = std::iter::once(crate::tokenize::CLS)
        .chain(std::iter::repeat_n(5, per_sequence - 2))
        .chain(std::iter::once(crate::tokenize::EOS))
        .collect();
    PackedBatch::from_sequences(std::iter::repeat_n(&sequence[..], count))
}

/// Free memory of `device` in bytes; `None` on the CPU.
pub fn free_device_memory(device: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free);
    }
    let _ = device;
    None
}

/// The default token budget of a pack. On the CPU 4096 (larger packs do not run faster there).
/// On a GPU, from the memory left once the weights are loaded: a pack's activations peak at about
/// [`crate::model::memory::ACTIVATION_UNITS_PER_TOKEN`] × 2 bytes per hidden unit per token in
/// bf16/f16; 60 % of the free memory, between 4096 and 65536 tokens, a multiple of 1024.
pub fn default_tokens_per_batch(device: &Device, hidden: usize, dtype: DType) -> usize {
    match free_device_memory(device) {
        Some(free) => tokens_per_batch_for(free as u64, hidden, dtype),
        None => 4096,
    }
}

/// The default token budget of a job on `devices`: the smallest of theirs (every device runs the
/// same packs).
pub fn default_tokens_per_batch_on(devices: &[Device], hidden: usize, dtype: DType) -> usize {
    devices
        .iter()
        .map(|d| default_tokens_per_batch(d, hidden, dtype))
        .min()
        .unwrap_or(4096)
}

/// The default GPU token budget with `free` bytes left for activations (see
/// [`default_tokens_per_batch`]).
pub fn tokens_per_batch_for(free: u64, hidden: usize, dtype: DType) -> usize {
    let activations = crate::model::fp8::activation_dtype(dtype);
    let bytes_per_token =
        crate::model::memory::ACTIVATION_UNITS_PER_TOKEN * hidden * activations.size_in_bytes();
    let fit = (free as f64 * 0.6 / bytes_per_token as f64) as usize;
    (fit.clamp(4096, 65536) / 1024) * 1024
}
