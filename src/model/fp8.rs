//! `--dtype fp8`: which blocks run their four projections on e4m3 GEMMs, and their weights
//! quantized once at load.
//!
//! A model asked for in FP8 is built in bf16 (the residual stream, LayerNorm statistics,
//! attention, the final norm and pooling stay there), then each quantized block's four weight
//! matrices become e4m3 with one f32 scale per output channel (`kernels::quantize_rows`);
//! the bf16 copies are dropped, so weights take half the memory. The block's forward then feeds
//! those GEMMs e4m3 activations written by the kernels before them
//! (`kernels`' `*_fp8` functions).

use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use crate::error::{Error, Result};

/// The per-output-channel scales (f32) of a quantized block's projections, in the order QKV,
/// attention output, FFN input (ESM-2's FC1, ESM C's gate/up), FFN output (FC2, down); a
/// quantized projection's `Linear` then holds e4m3 weights (`DType::F8E4M3`) and a bf16 bias.
/// The FFN's two are always quantized; QKV and the output projection may stay bf16
/// ([`bf16_attention`]).
pub(super) type Fp8Scales = [Option<Tensor>; 4];

/// Which attention projections of a quantized block stay bf16: `ESMBED_FP8_BF16=qkv,out` (either
/// or both), for measuring what each costs in fidelity and speed.
#[cfg(feature = "cuda")]
pub(super) fn bf16_attention() -> Result<[bool; 2]> {
    let mut keep = [false; 2];
    let Ok(spec) = std::env::var("ESMBED_FP8_BF16") else {
        return Ok(keep);
    };
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "qkv" => keep[0] = true,
            "out" => keep[1] = true,
            other => {
                return Err(Error::InvalidOption(format!(
                    "ESMBED_FP8_BF16: {other:?} is not qkv or out"
                )))
            }
        }
    }
    Ok(keep)
}

/// The dtype the forward's activations take for a requested `dtype`: bf16 for FP8.
pub fn activation_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F8E4M3 => DType::BF16,
        other => other,
    }
}

/// Which of `blocks` blocks are quantized: all but those `ESMBED_FP8_BF16_BLOCKS` lists (block
/// indices, negative ones from the end: `0,-1` keeps the first and the last in bf16), for
/// measuring the fidelity each choice gives (`esmbed verify --dtype fp8`).
pub(super) fn quantized_blocks(blocks: usize) -> Result<Vec<bool>> {
    let mut quantized = vec![true; blocks];
    let Ok(spec) = std::env::var("ESMBED_FP8_BF16_BLOCKS") else {
        return Ok(quantized);
    };
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let index: i64 = item.parse().map_err(|_| {
            Error::InvalidOption(format!(
                "ESMBED_FP8_BF16_BLOCKS: {item:?} is not a block index (e.g. 0,-1)"
            ))
        })?;
        let resolved = if index < 0 {
            blocks as i64 + index
        } else {
            index
        };
        let slot = usize::try_from(resolved)
            .ok()
            .and_then(|i| quantized.get_mut(i))
            .ok_or_else(|| {
                Error::InvalidOption(format!(
                    "ESMBED_FP8_BF16_BLOCKS: block {index} does not exist (the model has {blocks})"
                ))
            })?;
        *slot = false;
    }
    Ok(quantized)
}

/// That a model of hidden size `hidden` and FFN width `ffn` can run FP8 GEMMs on `device`.
pub(super) fn check(device: &Device, hidden: usize, ffn: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        super::kernels::check_fp8_device(device)?;
        if !hidden.is_multiple_of(16) || !ffn.is_multiple_of(16) {
            return Err(Error::InvalidOption(format!(
                "--dtype fp8 needs a hidden size and an FFN width that are multiples of 16 \
                 (this model: {hidden} and {ffn}): use --dtype bf16"
            )));
        }
        if hidden > super::kernels::MAX_LAYER_NORM_WIDTH || ffn > super::kernels::MAX_FP8_ROW {
            return Err(Error::InvalidOption(format!(
                "--dtype fp8 takes hidden sizes up to {} and FFN widths up to {} (this model: \
                 {hidden} and {ffn}): use --dtype bf16",
                super::kernels::MAX_LAYER_NORM_WIDTH,
                super::kernels::MAX_FP8_ROW
            )));
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, hidden, ffn);
        Err(Error::InvalidOption(
            "--dtype fp8 runs on CUDA GPUs; this esmbed was built without GPU support (cargo \
             build --release --features cuda)"
                .into(),
        ))
    }
}

/// Quantize a block's four bf16 projections in place (QKV and the output projection unless
/// [`bf16_attention`] keeps them): weights to e4m3, their scales returned.
#[cfg(feature = "cuda")]
pub(super) fn quantize(linears: [&mut Linear; 4]) -> Result<Fp8Scales> {
    let [keep_qkv, keep_out] = bf16_attention()?;
    let keep = [keep_qkv, keep_out, false, false];
    let mut scales: Fp8Scales = Default::default();
    for ((l, keep), scale) in linears.into_iter().zip(keep).zip(&mut scales) {
        if !keep {
            let rows = super::kernels::quantize_rows(l.weight())?;
            *l = Linear::new(rows.q, l.bias().cloned());
            *scale = Some(rows.scale);
        }
    }
    Ok(scales)
}

/// Without CUDA there is nothing to quantize with ([`check`] refuses first).
#[cfg(not(feature = "cuda"))]
pub(super) fn quantize(_: [&mut Linear; 4]) -> Result<Fp8Scales> {
    Err(Error::internal("FP8 quantization without CUDA"))
}

/// The scales of a block's four projections, `None` for those in bf16 (all four for a block that
/// is not quantized).
#[cfg(feature = "cuda")]
pub(super) fn scales_of(fp8: &Option<Fp8Scales>) -> [Option<&Tensor>; 4] {
    match fp8 {
        Some(scales) => scales.each_ref().map(Option::as_ref),
        None => [None; 4],
    }
}

/// A quantized projection as the FP8 GEMM takes it.
#[cfg(feature = "cuda")]
pub(super) fn weights(linear: &Linear, scale: &Tensor) -> super::kernels::Fp8Rows {
    super::kernels::Fp8Rows {
        q: linear.weight().clone(),
        scale: scale.clone(),
    }
}

/// A projection's bias (esmbed gives every projection one on the fused path: zeros where the
/// model has none).
#[cfg(feature = "cuda")]
pub(super) fn bias(linear: &Linear) -> Result<&Tensor> {
    linear
        .bias()
        .ok_or_else(|| Error::internal("a fused projection without a bias"))
}

/// LayerNorm of `x`'s rows as the e4m3 input of the next GEMM.
#[cfg(feature = "cuda")]
pub(super) fn layer_norm(
    norm: &candle_nn::LayerNorm,
    x: &Tensor,
    eps: f64,
) -> Result<super::kernels::Fp8Rows> {
    let bias = norm
        .bias()
        .ok_or_else(|| Error::internal("a LayerNorm without a bias"))?;
    super::kernels::layer_norm_fp8(x, norm.weight(), bias, eps)
}

/// `x · wᵀ + b (+ residual)` of a quantized projection on its e4m3 input.
#[cfg(feature = "cuda")]
pub(super) fn linear(
    x: &super::kernels::Fp8Rows,
    linear: &Linear,
    scale: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    super::kernels::linear_fp8(x, &weights(linear, scale), bias(linear)?, residual)
}

/// The attention output projection with the residual: on e4m3 (the attention output quantized
/// per token) where the block quantized it (`scale`), else in bf16.
#[cfg(feature = "cuda")]
pub(super) fn out_projection(
    context: &Tensor,
    out: &Linear,
    scale: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    use super::kernels;
    match scale {
        Some(s) => linear(&kernels::quantize_rows(context)?, out, s, Some(residual)),
        None => kernels::linear_residual(context, out, residual),
    }
}

/// Quantize, in place, the projections `linears` gives for each block that
/// [`quantized_blocks`] picks (see [`quantize`]), setting the block's scales (`fp8`).
pub(super) fn quantize_each<'a>(
    blocks: impl ExactSizeIterator<Item = ([&'a mut Linear; 4], &'a mut Option<Fp8Scales>)>,
) -> Result<()> {
    let picked = quantized_blocks(blocks.len())?;
    for ((linears, fp8), pick) in blocks.zip(picked) {
        if pick {
            *fp8 = Some(quantize(linears)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_activations_are_bf16() {
        assert_eq!(activation_dtype(DType::F8E4M3), DType::BF16);
        assert_eq!(activation_dtype(DType::F16), DType::F16);
    }

    #[test]
    fn fp8_is_refused_on_the_cpu_with_the_fix() {
        let err = check(&Device::Cpu, 320, 1280).unwrap_err().to_string();
        assert!(err.contains("--dtype fp8"), "{err}");
        assert!(err.contains("CUDA"), "{err}");
    }
}
