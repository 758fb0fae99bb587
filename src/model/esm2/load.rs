//! Building an ESM-2: from a checkpoint (weights converted to the compute dtype on the device,
//! the query projection pre-scaled and fused with key and value, rotary frequencies as the
//! checkpoint stores them), or with random weights of a published shape.

use candle_core::{DType, Device, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::{prepare_device, Block, Esm2, LmHead};
use crate::error::{Error, Result};
use crate::model::config::EsmConfig;
use crate::model::names;
use crate::model::weights::Checkpoint;

impl Esm2 {
    /// Build the model from a checkpoint, converting weights to `dtype` on `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        prepare_device(device)?;
        let config = checkpoint.config.clone();
        let h = config.hidden_size;
        let ffn = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let load = |name: &str, shape: &[usize]| checkpoint.load(name, shape, dtype, device);
        let linear = |prefix: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                load(&format!("{prefix}.weight"), &[out, inp])?,
                Some(load(&format!("{prefix}.bias"), &[out])?),
            ))
        };
        let norm = |prefix: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                load(&format!("{prefix}.weight"), &[h])?,
                load(&format!("{prefix}.bias"), &[h])?,
                eps,
            ))
        };

        let word_embeddings = load("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let half = config.head_dim() / 2;
        let inv_freq = model_inv_freq(checkpoint, half)?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let qkv = fused_qkv(checkpoint, &format!("{p}.attention.self"), dtype, device)?;
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.attention.LayerNorm"))?,
                qkv,
                out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                ffn_norm: norm(&format!("{p}.LayerNorm"))?,
                fc1: linear(&format!("{p}.intermediate.dense"), ffn, h)?,
                fc2: linear(&format!("{p}.output.dense"), h, ffn)?,
                fp8: None,
            });
        }
        let final_norm = norm("encoder.emb_layer_norm_after")?;
        Ok(Self {
            config,
            word_embeddings,
            blocks,
            final_norm,
            inv_freq: Tensor::from_vec(inv_freq, half, device)?,
            head: None,
            device: device.clone(),
            dtype,
        })
    }

    /// [`Esm2::load`] with the masked-LM head, for scores.
    pub fn load_with_head(checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        let mut model = Self::load(checkpoint, device, dtype)?;
        model.head = Some(LmHead::load(
            checkpoint,
            &model.word_embeddings,
            dtype,
            device,
        )?);
        Ok(model)
    }

    /// A model of the given shape with random weights, for benchmarks (the cost of a forward does
    /// not depend on the values). Deterministic in `seed` on GPUs.
    pub fn random(config: &EsmConfig, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        config.validate().map_err(|r| Error::model("random", r))?;
        prepare_device(device)?;
        // candle's CPU generator cannot be seeded: CPU random weights differ run to run, which a
        // benchmark does not mind (the cost does not depend on the values).
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let h = config.hidden_size;
        let ffn = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let randn = |shape: &[usize], std: f64| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
        };
        let linear = |out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear::new(
                randn(&[out, inp], 0.02)?,
                Some(randn(&[out], 0.02)?),
            ))
        };
        let norm = || -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                Tensor::ones(h, dtype, device)?,
                Tensor::zeros(h, dtype, device)?,
                eps,
            ))
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|_| {
                Ok(Block {
                    attn_norm: norm()?,
                    qkv: linear(3 * h, h)?,
                    out: linear(h, h)?,
                    ffn_norm: norm()?,
                    fc1: linear(ffn, h)?,
                    fc2: linear(h, ffn)?,
                    fp8: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let half = config.head_dim() / 2;
        let word_embeddings = randn(&[config.vocab_size, h], 1.0)?;
        let head = LmHead::random(&word_embeddings, eps)?;
        Ok(Self {
            config: config.clone(),
            word_embeddings,
            blocks,
            final_norm: norm()?,
            inv_freq: Tensor::from_vec(computed_inv_freq(config), half, device)?,
            head: Some(head),
            device: device.clone(),
            dtype,
        })
    }
}

/// The query, key and value projections of one block as one `[3H, H]` linear. HF scales the
/// query by d^-½ before rotary; folding the scale into the query's weights and bias keeps that
/// order. It is exact for head dims 16 and 64 (650M, 3B: a power of two) and one f32 rounding
/// otherwise, done before any conversion.
fn fused_qkv(checkpoint: &Checkpoint, attn: &str, dtype: DType, device: &Device) -> Result<Linear> {
    let h = checkpoint.config.hidden_size;
    let scale = (checkpoint.config.head_dim() as f64).powf(-0.5);
    let f32_cpu =
        |name: String, shape: &[usize]| checkpoint.load(&name, shape, DType::F32, &Device::Cpu);
    let query_w = (f32_cpu(format!("{attn}.query.weight"), &[h, h])? * scale)?;
    let query_b = (f32_cpu(format!("{attn}.query.bias"), &[h])? * scale)?;
    let key_w = f32_cpu(format!("{attn}.key.weight"), &[h, h])?;
    let key_b = f32_cpu(format!("{attn}.key.bias"), &[h])?;
    let value_w = f32_cpu(format!("{attn}.value.weight"), &[h, h])?;
    let value_b = f32_cpu(format!("{attn}.value.bias"), &[h])?;
    let to_device = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
    Ok(Linear::new(
        to_device(Tensor::cat(&[query_w, key_w, value_w], 0)?)?,
        Some(to_device(Tensor::cat(&[query_b, key_b, value_b], 0)?)?),
    ))
}

/// `1 / base^(2i/d)`, in f32 as HF's `RotaryEmbedding.__init__` computes it.
pub(crate) fn computed_inv_freq(config: &EsmConfig) -> Vec<f32> {
    let d = config.head_dim();
    let base = config.rope_theta as f32;
    (0..d)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / d as f32))
        .collect()
}

/// The model's rotary frequencies: the checkpoint's (transformers keeps one buffer for all
/// layers, under any of the names [`names::INV_FREQ`] stands for), else computed as transformers
/// computes them. The stored ones matter: ESM-2 was trained in fp16 and its saved buffer differs
/// from a recomputation enough to matter at long positions.
fn model_inv_freq(checkpoint: &Checkpoint, half: usize) -> Result<Vec<f32>> {
    if !checkpoint.contains(names::INV_FREQ) {
        return Ok(computed_inv_freq(&checkpoint.config));
    }
    let t = checkpoint.load(names::INV_FREQ, &[half], DType::F32, &Device::Cpu)?;
    Ok(t.to_vec1::<f32>()?)
}
