//! Building an ESM-2: from a checkpoint (weights converted to the compute dtype on the device,
//! the query projection pre-scaled and fused with key and value, rotary frequencies as the
//! checkpoint stores them), or with random weights of a published shape.

use candle_core::{DType, Device, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::{prepare_device, Block, Esm2};
use crate::error::{Error, Result};
use crate::model::config::EsmConfig;
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
        let computed = computed_inv_freq(&config);
        let shared = shared_inv_freq(checkpoint, half)?;
        let mut rotary_host: Vec<Vec<f32>> = Vec::new();
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let attn = format!("{p}.attention.self");
            let qkv = fused_qkv(checkpoint, &attn, dtype, device)?;
            // The checkpoint's inv_freq when present: ESM-2 was trained in fp16 and its stored
            // buffer differs from a recomputation enough to matter at long positions.
            let inv_freq = match layer_inv_freq(checkpoint, &attn, half)? {
                Some(v) => v,
                None => shared.clone().unwrap_or_else(|| computed.clone()),
            };
            let rotary = match rotary_host.iter().position(|v| *v == inv_freq) {
                Some(index) => index,
                None => {
                    rotary_host.push(inv_freq);
                    rotary_host.len() - 1
                }
            };
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.attention.LayerNorm"))?,
                qkv,
                out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                ffn_norm: norm(&format!("{p}.LayerNorm"))?,
                fc1: linear(&format!("{p}.intermediate.dense"), ffn, h)?,
                fc2: linear(&format!("{p}.output.dense"), h, ffn)?,
                rotary,
            });
        }
        let final_norm = norm("encoder.emb_layer_norm_after")?;
        let rotary = rotary_host
            .into_iter()
            .map(|v| Tensor::from_vec(v, half, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            word_embeddings,
            blocks,
            final_norm,
            rotary,
            device: device.clone(),
            dtype,
        })
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
                    rotary: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let half = config.head_dim() / 2;
        Ok(Self {
            config: config.clone(),
            word_embeddings: randn(&[config.vocab_size, h], 1.0)?,
            blocks,
            final_norm: norm()?,
            rotary: vec![Tensor::from_vec(computed_inv_freq(config), half, device)?],
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

/// A block's own `rotary_embeddings.inv_freq`, if the checkpoint stores one.
fn layer_inv_freq(checkpoint: &Checkpoint, attn: &str, half: usize) -> Result<Option<Vec<f32>>> {
    let name = format!("{attn}.rotary_embeddings.inv_freq");
    if !checkpoint.contains(&name) {
        return Ok(None);
    }
    let t = checkpoint.load(&name, &[half], DType::F32, &Device::Cpu)?;
    Ok(Some(t.to_vec1::<f32>()?))
}

/// `1 / base^(2i/d)`, in f32 as HF's `RotaryEmbedding.__init__` computes it.
pub(super) fn computed_inv_freq(config: &EsmConfig) -> Vec<f32> {
    let d = config.head_dim();
    let base = config.rope_theta as f32;
    (0..d)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / d as f32))
        .collect()
}

/// A single `inv_freq` shared by all layers, as newer transformers versions save it: at model
/// level (`rotary_embeddings.inv_freq`) or under a literal wildcard key
/// (`encoder.layer.*.attention.self.rotary_embeddings.inv_freq`).
fn shared_inv_freq(checkpoint: &Checkpoint, half: usize) -> Result<Option<Vec<f32>>> {
    let per_layer = |n: &str| {
        n.strip_prefix("encoder.layer.")
            .and_then(|rest| rest.split('.').next())
            .is_some_and(|index| index.parse::<usize>().is_ok())
    };
    let mut names: Vec<&str> = checkpoint
        .tensor_names()
        .filter(|n| n.ends_with("inv_freq") && !per_layer(n))
        .collect();
    names.sort_unstable();
    let name = names.first().map(|n| n.to_string());
    name.map(|name| {
        Ok(checkpoint
            .load(&name, &[half], DType::F32, &Device::Cpu)?
            .to_vec1::<f32>()?)
    })
    .transpose()
}
