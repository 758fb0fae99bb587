//! FlashAttention varlen on CUDA: the whole pack in one kernel call, no padding.
//!
//! The kernels take bf16/f16 and head dims that are multiples of 32 (32 … 256). ESM-2 8M (16) and
//! 35M (24) are zero-padded to 32: zero query/key columns add nothing to the scores and zero value
//! columns produce zero outputs, which are sliced off. The query arrives already scaled by
//! `d^-½` (HF's order), so the kernel's own scale is 1.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Attention of `q`, `k`, `v` `[T, heads, d]` on a CUDA device, `cu_seqlens` (u32) on the same
/// device. f32 inputs, which the kernels do not take, go through the exact per-segment path.
pub fn attend_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: usize,
) -> Result<Option<Tensor>> {
    if !matches!(q.dtype(), DType::BF16 | DType::F16) {
        return Ok(None);
    }
    let d = q.dim(2)?;
    let padded = d.div_ceil(32) * 32;
    let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
        if padded == d {
            t.contiguous()
        } else {
            t.pad_with_zeros(2, 0, padded - d)?.contiguous()
        }
    };
    let out = candle_flash_attn::flash_attn_varlen(
        &pad(q)?,
        &pad(k)?,
        &pad(v)?,
        cu_seqlens,
        cu_seqlens,
        max_len,
        max_len,
        1.0,
        false,
    )?;
    Ok(Some(if padded == d {
        out
    } else {
        out.narrow(2, 0, d)?
    }))
}
