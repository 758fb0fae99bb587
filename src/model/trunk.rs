//! What both families' packed forwards share: checking a request, the rotary tables, running the
//! blocks while keeping the requested layers' representations (the final norm after the last
//! block), and copying weights to another device.

use candle_core::{Device, Tensor};
use candle_nn::{LayerNorm, Linear};

use crate::error::{Error, Result};
use crate::pack::PackedBatch;

/// Refuse a forward that cannot be one: a layer past the model's `n`, an empty pack.
pub(super) fn check_request(n: usize, batch: &PackedBatch, layers: &[usize]) -> Result<()> {
    if let Some(&bad) = layers.iter().find(|&&l| l > n) {
        return Err(Error::internal(format!(
            "layer {bad} does not exist (model has {n}); layers are resolved before a forward"
        )));
    }
    if batch.is_empty() {
        return Err(Error::internal("a forward of an empty pack"));
    }
    Ok(())
}

/// Rotary `cos`/`sin` tables `[T, d/2]` of `batch` in f32 (positions restart at 0 for every
/// sequence): `freqs = t ⊗ inv_freq`, as transformers computes them.
pub(super) fn rotary_tables(batch: &PackedBatch, inv_freq: &Tensor) -> Result<(Tensor, Tensor)> {
    let positions: Vec<f32> = batch.positions().into_iter().map(|p| p as f32).collect();
    let positions = Tensor::from_vec(positions, (batch.total_tokens(), 1), inv_freq.device())?;
    let freqs = positions.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Run `blocks` blocks on the embeddings `x` (`block(i, x)` is block i), the final norm after the
/// last one, stopping after the deepest of `layers`; the representations of `layers`, in order
/// (0 = `x` itself).
pub(super) fn run_blocks(
    mut x: Tensor,
    blocks: usize,
    layers: &[usize],
    mut block: impl FnMut(usize, &Tensor) -> Result<Tensor>,
    final_norm: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let deepest = layers.iter().copied().max().unwrap_or(blocks);
    let mut reprs: Vec<Option<Tensor>> = vec![None; blocks + 1];
    if layers.contains(&0) {
        reprs[0] = Some(x.clone());
    }
    for index in 0..deepest {
        x = block(index, &x)?;
        let layer = index + 1;
        if layer == blocks {
            x = final_norm(&x)?;
        }
        if layers.contains(&layer) {
            reprs[layer] = Some(x.clone());
        }
    }
    Ok(layers
        .iter()
        .map(|&l| {
            reprs[l]
                .clone()
                .expect("every requested layer was computed")
        })
        .collect())
}

/// Whether ESM-2's fused CUDA kernels can run a model of `config` on `device` in `dtype`:
/// bf16/f16 on a GPU, a head dim that is a multiple of 4 and a hidden size that is a multiple of
/// 8 up to the LayerNorm kernel's width (every published ESM-2 and ESM C size).
pub(super) fn fused_kernels_apply(
    config: &super::config::EsmConfig,
    device: &Device,
    dtype: candle_core::DType,
) -> bool {
    #[cfg(feature = "cuda")]
    if device.is_cuda()
        && matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16)
        && config.head_dim().is_multiple_of(4)
        && config.hidden_size.is_multiple_of(8)
        && config.hidden_size <= super::kernels::MAX_LAYER_NORM_WIDTH
    {
        return true;
    }
    let _ = (config, device, dtype);
    false
}

/// Copies weights to one device, through the host: a direct copy between GPUs needs peer access,
/// which not every host grants (and the host copy costs seconds once per job). Every replica
/// then holds the same bits, so replicas give identical results.
pub(super) struct Replicator<'a> {
    /// Where the copies go.
    pub device: &'a Device,
    /// LayerNorm epsilon of the model.
    pub eps: f64,
}

impl Replicator<'_> {
    pub(super) fn tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_device(&Device::Cpu)?.to_device(self.device)?)
    }

    pub(super) fn linear(&self, l: &Linear) -> Result<Linear> {
        let bias = l.bias().map(|b| self.tensor(b)).transpose()?;
        Ok(Linear::new(self.tensor(l.weight())?, bias))
    }

    /// A quantized block's projection scales ([`super::fp8::Fp8Scales`]).
    pub(super) fn scales(&self, s: &super::fp8::Fp8Scales) -> Result<super::fp8::Fp8Scales> {
        let copy = |t: &Option<Tensor>| t.as_ref().map(|t| self.tensor(t)).transpose();
        let [a, b, c, d] = s;
        Ok([copy(a)?, copy(b)?, copy(c)?, copy(d)?])
    }

    /// esmbed gives every LayerNorm a bias (a zero one where the model has none).
    pub(super) fn norm(&self, n: &LayerNorm) -> Result<LayerNorm> {
        let bias = n.bias().expect("esmbed gives every LayerNorm a bias");
        Ok(LayerNorm::new(
            self.tensor(n.weight())?,
            self.tensor(bias)?,
            self.eps,
        ))
    }
}
