//! The model families behind one interface: ESM-2 and ESM C take the same packed input (flat ids
//! and `cu_seqlens`) and give the same outputs (a `[T, H]` representation per requested layer,
//! numbered alike: 0 = embeddings, N = the last block after the final norm; log-probabilities of
//! the masked-LM head). Which one a checkpoint is comes from its config ([`Family`]); nothing
//! past the model (pooling, the device pool, the pipeline, SQL) asks.

use candle_core::{DType, Device, Tensor};

use super::config::{EsmConfig, Family};
use super::esm2::Esm2;
use super::esmc::Esmc;
use super::weights::Checkpoint;
use crate::engine::LogProbsAt;
use crate::error::{Error, Result};
use crate::pack::PackedBatch;

/// A loaded model of either family. A clone shares the weights (candle tensors are reference
/// counted): the Python package builds one embedder per call's output choices from one model.
#[derive(Clone)]
pub enum Model {
    /// ESM-2.
    Esm2(Esm2),
    /// ESM C.
    Esmc(Esmc),
}

impl From<Esm2> for Model {
    fn from(model: Esm2) -> Self {
        Model::Esm2(model)
    }
}

impl From<Esmc> for Model {
    fn from(model: Esmc) -> Self {
        Model::Esmc(model)
    }
}

impl Model {
    /// Build the model `checkpoint` holds (its config says which family), weights converted to
    /// `dtype` on `device`; with `head`, the masked-LM head too (for scores).
    pub fn load(
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
        head: bool,
    ) -> Result<Self> {
        let config = &checkpoint.config;
        Self::built_in(config, device, dtype, |dtype| {
            Ok(match (config.family, head) {
                (Family::Esm2, false) => Esm2::load(checkpoint, device, dtype)?.into(),
                (Family::Esm2, true) => Esm2::load_with_head(checkpoint, device, dtype)?.into(),
                (Family::Esmc, false) => Esmc::load(checkpoint, device, dtype)?.into(),
                (Family::Esmc, true) => Esmc::load_with_head(checkpoint, device, dtype)?.into(),
            })
        })
    }

    /// `build(dtype)` in the activations' dtype, then, for `--dtype fp8`, its blocks put on e4m3
    /// GEMMs (see [`super::fp8`]): the device and the shape are checked first, before any weight
    /// is read.
    fn built_in(
        config: &EsmConfig,
        device: &Device,
        dtype: DType,
        build: impl FnOnce(DType) -> Result<Model>,
    ) -> Result<Self> {
        if dtype != DType::F8E4M3 {
            return build(dtype);
        }
        super::fp8::check(device, config.hidden_size, config.intermediate_size)?;
        Ok(match build(super::fp8::activation_dtype(dtype))? {
            Model::Esm2(m) => m.quantize_fp8()?.into(),
            Model::Esmc(m) => m.quantize_fp8()?.into(),
        })
    }

    /// Random weights of `config`'s shape and family (benchmarks).
    pub fn random(config: &EsmConfig, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        Self::built_in(config, device, dtype, |dtype| {
            Ok(match config.family {
                Family::Esm2 => Esm2::random(config, device, dtype, seed)?.into(),
                Family::Esmc => Esmc::random(config, device, dtype, seed)?.into(),
            })
        })
    }

    /// The same model on another device: every weight copied, so replicas give bitwise-identical
    /// results.
    pub fn replicate(&self, device: &Device) -> Result<Self> {
        Ok(match self {
            Model::Esm2(m) => m.replicate(device)?.into(),
            Model::Esmc(m) => m.replicate(device)?.into(),
        })
    }

    /// This model on `devices[0]` (where it must already be) and replicas on the others, copied
    /// in parallel; in device order.
    pub fn replicate_to(self, devices: &[Device]) -> Result<Vec<Self>> {
        let this = &self;
        let copies: Vec<Result<Self>> = std::thread::scope(|scope| {
            let handles: Vec<_> = devices
                .iter()
                .skip(1)
                .map(|d| {
                    scope.spawn(move || {
                        let started = std::time::Instant::now();
                        let copy = this.replicate(d);
                        tracing::info!(
                            "replicated the model to {} in {:.1}s",
                            crate::devices::label(d),
                            started.elapsed().as_secs_f64()
                        );
                        copy
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("replication does not panic"))
                .collect()
        });
        let mut all = Vec::with_capacity(devices.len());
        all.push(self);
        for copy in copies {
            all.push(copy?);
        }
        Ok(all)
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &EsmConfig {
        match self {
            Model::Esm2(m) => m.config(),
            Model::Esmc(m) => m.config(),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match self {
            Model::Esm2(m) => m.device(),
            Model::Esmc(m) => m.device(),
        }
    }

    /// The compute dtype (`F8E4M3` for a model on FP8 GEMMs, whose activations are bf16: see
    /// [`super::fp8::activation_dtype`]).
    pub fn dtype(&self) -> DType {
        match self {
            Model::Esm2(m) => m.dtype(),
            Model::Esmc(m) => m.dtype(),
        }
    }

    /// Resolve fair-esm layer numbers (0 = embeddings, N = last and normalized, negatives from
    /// the end: -1 = N) to `0..=N`.
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        self.config().resolve_layer(layer)
    }

    /// The packed forward: `[T, H]` per requested layer (resolved numbers), in the order asked.
    pub fn forward(&self, batch: &PackedBatch, layers: &[usize]) -> Result<Vec<Tensor>> {
        match self {
            Model::Esm2(m) => m.forward(batch, layers),
            Model::Esmc(m) => m.forward(batch, layers),
        }
    }

    /// Log-probabilities over the 33 tokens (`[Q, 33]` f32, row-major) at the positions `at`
    /// picks in each sequence of `batch`, in order, from the masked-LM head on the last layer.
    pub fn log_probs(&self, batch: &PackedBatch, at: LogProbsAt) -> Result<Vec<f32>> {
        self.head()?;
        let rows = super::esm2::query_positions(batch, at, self.config().mask_token_id);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.config().num_hidden_layers;
        let hidden = self.forward(batch, &[n])?.remove(0);
        self.head_log_probs(&hidden, rows)
    }

    /// Log-probabilities (`[Q, 33]` f32) of the masked-LM head at token rows `rows` of `last`,
    /// the last layer's output `[T, H]` of a forward.
    pub fn head_log_probs(&self, last: &Tensor, rows: Vec<u32>) -> Result<Vec<f32>> {
        let head = self.head()?;
        let rows = Tensor::from_vec(rows.clone(), rows.len(), self.device())?;
        let log_probs = head.log_probs(&last.index_select(&rows, 0)?)?;
        Ok(log_probs.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Whether the masked-LM head is loaded.
    pub fn has_head(&self) -> bool {
        self.head().is_ok()
    }

    fn head(&self) -> Result<&super::head::LmHead> {
        let head = match self {
            Model::Esm2(m) => m.head(),
            Model::Esmc(m) => m.head(),
        };
        head.ok_or_else(|| {
            Error::InvalidOption(
                "scores need the masked-LM head, and this model was loaded without one (its \
                 checkpoint has none: use the ForMaskedLM weights, as every published checkpoint \
                 has; in the library, Model::load with head, or Esm2::load_with_head)"
                    .into(),
            )
        })
    }
}
