//! FlashAttention varlen on CUDA: the whole pack in one kernel call, no padding.
//!
//! The kernels take bf16/f16 and head dims that are multiples of 32 (32 … 256). ESM-2 8M (16) and
//! 35M (24) are zero-padded to 32: zero query/key columns add nothing to the scores and zero value
//! columns produce zero outputs, which are sliced off. The query arrives already scaled by
//! `d^-½` (HF's order), so the kernel's own scale is 1.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Attention of `q`, `k`, `v` `[T, heads, d]` on a CUDA device, `cu_seqlens` (u32) on the same
/// device, checked by the caller against `T` and `max_len` ([`super::attention`]'s layout). f32
/// inputs, which the kernels do not take, go through the exact per-segment path.
pub(crate) fn attend_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    max_len: usize,
) -> Result<Option<Tensor>> {
    if !matches!(q.dtype(), DType::BF16 | DType::F16) {
        return Ok(None);
    }
    let (_, _, d) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || cu_seqlens.dtype() != DType::U32 {
        return Err(crate::Error::internal(format!(
            "attention: q {:?}, k {:?}, v {:?}, cu_seqlens {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            cu_seqlens.dtype()
        )));
    }
    let padded = d.div_ceil(32) * 32;
    // Strided views (q and k are halves of one rotated tensor) are fine for the kernel as long
    // as the head dimension is contiguous.
    let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
        if padded == d && t.stride()[2] == 1 {
            Ok(t.clone())
        } else if padded == d {
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

/// Keep freed device memory in the CUDA memory pool instead of returning it to the driver at
/// every synchronization.
///
/// candle allocates every op's output with `cuMemAllocAsync` from the device's default pool,
/// whose release threshold is 0: each synchronization (one per pack, when pooled vectors come to
/// the host) hands the pool's memory back, and the next pack maps it again, op by op. Measured on
/// an H200 with the 650M shape, that re-mapping made matmuls and elementwise ops 3-10x slower
/// than the hardware allows. A threshold of "everything" makes the pool behave like PyTorch's
/// caching allocator.
pub(crate) fn keep_freed_memory(device: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::WrapErr;
    let Ok(cuda) = device.as_cuda_device() else {
        return Ok(());
    };
    let stream = cuda.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `context.cu_device()` is a valid device handle (the context is live) and `pool` is
    // a live local the driver writes the pool's handle into.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) }
        .result()
        .w()?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: `pool` is the handle the driver just returned (checked above); the release
    // threshold attribute is a `cuuint64_t`, read from `threshold`, which outlives the call.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
    }
    .result()
    .w()?;
    Ok(())
}
