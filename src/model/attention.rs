//! Attention over a packed batch: each token attends only to the tokens of its own sequence.
//!
//! On the CPU the attention runs per segment, exactly, in the model's dtype (f32 for the reference
//! path): scores `[heads, L, L]`, a stable softmax, then the values. On CUDA
//! (feature `cuda`) the whole pack goes through one varlen kernel call: FlashAttention 2, or
//! cuDNN's fused attention where the `cudnn` feature is built, libcudnn loads and
//! `ESMBED_ATTENTION=cudnn` asks for it.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::pack::PackedBatch;

/// Sequence boundaries of a pack, in the form the attention kernels want.
pub struct PackLayout {
    /// Token range of each sequence (host side).
    segments: Vec<(usize, usize)>,
    /// `cu_seqlens` on the device, as `u32`, for the varlen kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    cu_seqlens: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    max_len: usize,
    /// Lengths and ragged offsets for cuDNN's attention, made on its first use in the pack.
    #[cfg(feature = "cudnn")]
    cudnn: super::cudnn::PackIndex,
}

impl PackLayout {
    /// Take the boundaries of `batch` onto `device`.
    pub fn new(batch: &PackedBatch, device: &Device) -> Result<Self> {
        let segments = (0..batch.len())
            .map(|i| {
                let r = batch.range(i);
                (r.start, r.len())
            })
            .collect();
        let cu_seqlens = Tensor::from_slice(&batch.cu_seqlens, batch.cu_seqlens.len(), device)?;
        Ok(Self {
            segments,
            cu_seqlens,
            max_len: batch.max_len,
            #[cfg(feature = "cudnn")]
            cudnn: Default::default(),
        })
    }
}

impl PackLayout {
    /// `cu_seqlens` and the longest sequence for the varlen kernels, after checking that the
    /// sequences tile `tokens` rows from 0 without gaps and none is longer than `max_len` (the
    /// kernels trust both).
    #[cfg(feature = "cuda")]
    fn varlen(&self, tokens: usize) -> Result<(&Tensor, usize)> {
        let mut end = 0;
        for &(start, len) in &self.segments {
            if start != end || len > self.max_len {
                return Err(crate::Error::internal(format!(
                    "pack layout: segment ({start}, {len}) after {end} tokens, longest {}",
                    self.max_len
                )));
            }
            end = start + len;
        }
        let boundaries = self.cu_seqlens.elem_count();
        if self.segments.is_empty() || end != tokens || boundaries != self.segments.len() + 1 {
            return Err(crate::Error::internal(format!(
                "pack layout: {} segments of {end} tokens ({boundaries} boundaries) for {tokens} rows",
                self.segments.len()
            )));
        }
        Ok((&self.cu_seqlens, self.max_len))
    }
}

/// Which attention kernel packs of `dtype` activations on `device` run, for reports (`bench`,
/// `verify`): after a run, what it ran.
pub fn kernel(device: &Device, dtype: candle_core::DType) -> &'static str {
    let half = matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16);
    if !device.is_cuda() || !half {
        return "exact";
    }
    #[cfg(feature = "cudnn")]
    if let Some(kernel) = super::cudnn::kernel() {
        return kernel;
    }
    "flash-attention-2"
}

/// Attention for `q`, `k`, `v` of shape `[T, heads, head_dim]` (`q` already scaled), returning
/// `[T, heads, head_dim]`.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, layout: &PackLayout) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let (cu_seqlens, max_len) = layout.varlen(q.dim(0)?)?;
        #[cfg(feature = "cudnn")]
        if let Some(out) = super::cudnn::attend(q, k, v, &layout.segments, max_len, &layout.cudnn)?
        {
            return Ok(out);
        }
        if let Some(out) = super::flash::attend_varlen(q, k, v, cu_seqlens, max_len)? {
            return Ok(out);
        }
    }
    attend_per_segment(q, k, v, layout)
}

/// The exact path: one small attention per sequence.
fn attend_per_segment(q: &Tensor, k: &Tensor, v: &Tensor, layout: &PackLayout) -> Result<Tensor> {
    let mut outputs = Vec::with_capacity(layout.segments.len());
    for &(start, len) in &layout.segments {
        // [L, heads, d] -> [heads, L, d]
        let seg = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.narrow(0, start, len)?.transpose(0, 1)?.contiguous()
        };
        let (qs, ks, vs) = (seg(q)?, seg(k)?, seg(v)?);
        let scores = qs.matmul(&ks.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&vs)?; // [heads, L, d]
        outputs.push(context.transpose(0, 1)?);
    }
    Ok(Tensor::cat(&outputs, 0)?)
}

/// Attention over the `[T, 3H]` output of a fused Q/K/V projection (`heads` heads of `d`), its
/// queries, keys and values read as strided views of the one buffer; `[T, H]`.
pub fn attend_fused_qkv(
    qkv: &Tensor,
    heads: usize,
    d: usize,
    layout: &PackLayout,
) -> Result<Tensor> {
    let total = qkv.dim(0)?;
    let heads3 = qkv.reshape((total, 3 * heads, d))?;
    let q = heads3.narrow(1, 0, heads)?;
    let k = heads3.narrow(1, heads, heads)?;
    let v = heads3.narrow(1, 2 * heads, heads)?;
    Ok(attend(&q, &k, &v, layout)?.reshape((total, heads * d))?)
}

/// Plain softmax attention over a dense `[heads, L, d]` triple, for tests of the fast paths.
#[cfg(test)]
pub(crate) fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    use candle_core::D;
    let scores = q.matmul(&k.t()?)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(probs.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_name_the_exact_path_off_the_gpu() {
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
            assert_eq!(kernel(&Device::Cpu, dtype), "exact");
        }
    }

    #[test]
    fn segments_do_not_attend_across_boundaries() -> Result<()> {
        let dev = Device::Cpu;
        let batch = PackedBatch::from_sequences([&[0u32, 4, 2][..], &[0, 5, 6, 7, 2]]);
        let layout = PackLayout::new(&batch, &dev)?;
        let (heads, d) = (2, 4);
        let q = Tensor::randn(0f32, 1.0, (8, heads, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (8, heads, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (8, heads, d), &dev)?;
        let packed = attend(&q, &k, &v, &layout)?;
        for (start, len) in [(0, 3), (3, 5)] {
            let seg = |t: &Tensor| t.narrow(0, start, len).unwrap().transpose(0, 1).unwrap();
            let alone = naive(&seg(&q), &seg(&k), &seg(&v))?.transpose(0, 1)?;
            let got = packed.narrow(0, start, len)?;
            let diff = (got - alone)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "segment at {start}: {diff}");
        }
        Ok(())
    }
}
