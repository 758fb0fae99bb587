//! The CUDA forward's own kernels (bf16/f16), compiled with NVRTC at first use, and the candle
//! ops that pair them with the cuBLASLt GEMMs of [`super::gemm`].
//!
//! Measured with Nsight Compute and `ESMBED_PROFILE` on an H200 (650M shape): candle's broadcast
//! bias add, its LayerNorm and its rotary kernel each cost several times the memory traffic they
//! need. Per layer the forward is now: LayerNorm (one warp per row) → QKV GEMM with the bias in
//! its epilogue, rotary in place on its output → FlashAttention → output GEMM with bias and
//! residual in the epilogue → LayerNorm → FC1 GEMM with bias, exact GELU in place → FC2 GEMM
//! with bias and residual. Every kernel computes in f32 and rounds once on store.
//!
//! The element-wise kernels run near the memory bandwidth (650M on an H200: GELU 8 %, rotary 4 %,
//! the LayerNorms 4 % of GPU time); the rest is cuBLAS and FlashAttention (README, "Performance").
//!
//! bf16/f16 conversions are written out (bit operations and PTX `cvt`) so that the source needs
//! no CUDA headers at run time.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp1, Layout, Shape, Storage, StorageRef,
    Tensor, WithDType,
};

use std::mem::size_of;
use std::sync::OnceLock;

use candle_nn::Linear;

use super::gemm::{self, Operand};
use crate::error::Result;

const MODULE: &str = "esmbed_fused";

/// The LayerNorm kernel's variants: 16-byte vectors per lane kept in registers (`V` in the source).
const LAYER_NORM_VECTORS: [usize; 3] = [8, 12, 20];

/// The widest LayerNorm row the kernels take (a multiple of 8): 5120, ESM-2 15B's hidden size.
pub const MAX_LAYER_NORM_WIDTH: usize = 32 * 8 * LAYER_NORM_VECTORS[LAYER_NORM_VECTORS.len() - 1];

const SOURCE: &str = include_str!("kernels.cu");

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    // The virtual architecture of Ampere, the oldest GPU FlashAttention runs on (the packed
    // two-value conversions need it); the driver JIT-compiles the PTX for the GPU present.
    compiled(
        &PTX,
        || SOURCE.to_string(),
        "compute_80",
        "esmbed's fused kernels",
    )
}

/// `source()` compiled by NVRTC for `arch` once per process, kept in `cell` (an error too).
fn compiled(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: impl FnOnce() -> String,
    arch: &'static str,
    what: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| {
        let options = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(source(), options)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling {what}: {e}")))
}

fn prefix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("fused kernels take bf16/f16, not {other:?}"),
    }
}

/// Where a contiguous tensor lies in its storage (the kernels take no strided inputs).
fn offsets(l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernels need contiguous inputs".into()))
}

/// A contiguous view of `s` as `T` (bf16, f16, f32 or u32), inside its allocation.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = offsets(l)?;
    let slice = s.as_cuda_slice::<T>()?;
    slice.try_slice(start..end).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "fused kernels: elements {start}..{end} outside an allocation of {}",
            slice.len()
        ))
    })
}

/// That a tensor of `T` starts 16-byte aligned in its allocation (the kernels' vector accesses;
/// candle's allocations themselves are 256-byte aligned).
fn check_aligned<T>(l: &Layout, what: &str) -> candle_core::Result<()> {
    if !(l.start_offset() * size_of::<T>()).is_multiple_of(16) {
        candle_core::bail!(
            "{what}: starts at element {}, not 16-byte aligned",
            l.start_offset()
        );
    }
    Ok(())
}

/// `s` as a GEMM operand: the whole allocation and where the contiguous tensor starts (the GEMM
/// checks the lengths it reads against the allocation).
fn operand<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<Operand<'a, T>> {
    let (start, _) = offsets(l)?;
    Ok(Operand {
        slice: s.as_cuda_slice::<T>()?,
        offset: start,
    })
}

/// The CUDA storage behind a read guard, on `dev`.
fn cuda<'a>(storage: &'a StorageRef<'_>, dev: &CudaDevice) -> candle_core::Result<&'a CudaStorage> {
    match &**storage {
        Storage::Cuda(s) if s.device().id() == dev.id() => Ok(s),
        Storage::Cuda(_) => candle_core::bail!("fused kernels: operands on different devices"),
        _ => candle_core::bail!("esmbed's fused kernels run on CUDA only"),
    }
}

/// A size as the kernels' 32-bit argument.
fn arg32(value: usize, what: &str) -> candle_core::Result<u32> {
    u32::try_from(value).map_err(|_| {
        candle_core::Error::Msg(format!("fused kernels: {what} {value} exceeds 32 bits"))
    })
}

/// `rows · cols` elements, without overflow.
fn elements(rows: usize, cols: usize) -> candle_core::Result<usize> {
    rows.checked_mul(cols).ok_or_else(|| {
        candle_core::Error::Msg(format!("fused kernels: [{rows}, {cols}] overflows"))
    })
}

/// A grid-stride launch of `threads` threads in blocks of 256.
fn grid(threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (threads.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An op whose output is computed the same way for bf16 and f16 storage (`T`).
trait Typed {
    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<CudaSlice<T>>;
}

/// Run `op` on `x` in its dtype, as a storage of `shape`.
fn run_typed(
    op: &impl Typed,
    x: &CudaStorage,
    xl: &Layout,
    shape: Shape,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let dtype = x.dtype();
    let slice = match dtype {
        DType::BF16 => CudaStorageSlice::BF16(op.typed::<half::bf16>(dev, dtype, x, xl)?),
        DType::F16 => CudaStorageSlice::F16(op.typed::<half::f16>(dev, dtype, x, xl)?),
        other => candle_core::bail!("fused kernels take bf16/f16, not {other:?}"),
    };
    let storage = CudaStorage {
        slice,
        device: dev.clone(),
    };
    Ok((storage, shape))
}

mod fp8;
mod layer_norm;
mod linear;
mod qk_norm;
mod segment_mean;
mod swiglu;

pub use fp8::{
    check_device as check_fp8_device, gelu_fp8, layer_norm_fp8, quantize_rows, swiglu_fp8, Fp8Rows,
    MAX_FP8_ROW,
};
use layer_norm::LayerNormOp;
use linear::{LinearOp, Post, Rotary};
use qk_norm::QkNormRotary;
pub(crate) use segment_mean::segment_mean;
use swiglu::SwigluOp;

/// Whether the fused kernels apply to `x`.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// A contiguous `t` whose first element is 16-byte aligned (the kernels' vector accesses): `t`
/// itself, or a fresh copy at the start of its own allocation (`Tensor::copy` would keep the
/// layout, strides and offset included).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let bytes = t.layout().start_offset() * t.dtype().size_in_bytes();
    let ok = t.is_contiguous() && bytes.is_multiple_of(16);
    Ok(if ok { t.clone() } else { t.force_contiguous()? })
}

/// `post(x · wᵀ + b (+ residual))` for an ESM-2 Linear (they all have a bias).
fn apply(x: &Tensor, layer: &Linear, residual: Option<&Tensor>, post: Post<'_>) -> Result<Tensor> {
    let b = layer
        .bias()
        .ok_or_else(|| candle_core::Error::Msg("fused Linear without a bias".into()))?;
    let op = LinearOp {
        w: layer.weight(),
        b,
        residual,
        post,
    };
    Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
}

/// `x · wᵀ + b`, one rounding.
pub fn linear(x: &Tensor, layer: &Linear) -> Result<Tensor> {
    apply(x, layer, None, Post::None)
}

/// `residual + x · wᵀ + b`, one rounding.
pub fn linear_residual(x: &Tensor, layer: &Linear, residual: &Tensor) -> Result<Tensor> {
    apply(x, layer, Some(&residual.contiguous()?), Post::None)
}

/// `gelu_erf(x · wᵀ + b)`: the GEMM's output is rounded, then the GELU (HF's order).
pub fn linear_gelu(x: &Tensor, layer: &Linear) -> Result<Tensor> {
    apply(x, layer, None, Post::Gelu)
}

/// The fused query/key/value projection `x · wᵀ + b`, `[T, 3H]`, with rotary applied to the
/// `heads2 = 2 · heads` query and key heads (head dim `2 · half`, `half` even) from f32 tables
/// `[T, half]`.
pub fn linear_rotary(
    x: &Tensor,
    layer: &Linear,
    (cos, sin): (&Tensor, &Tensor),
    heads2: usize,
    half: usize,
) -> Result<Tensor> {
    with_rotary((cos, sin), heads2, half, |post| apply(x, layer, None, post))
}

/// `f` given rotary as a GEMM's post-op (see [`linear_rotary`]), its tables 16-byte aligned.
fn with_rotary<R>(
    (cos, sin): (&Tensor, &Tensor),
    heads2: usize,
    half: usize,
    f: impl FnOnce(Post<'_>) -> Result<R>,
) -> Result<R> {
    let (cos, sin) = (aligned(cos)?, aligned(sin)?);
    f(Post::Rotary(Rotary {
        cos: &cos,
        sin: &sin,
        heads2,
        half,
    }))
}

/// `x · wᵀ + b (+ residual)` on e4m3 inputs (`x` quantized rows, `w` e4m3 weights with their
/// per-channel scales), bf16 out, one rounding.
pub fn linear_fp8(
    x: &Fp8Rows,
    w: &Fp8Rows,
    b: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    fp8::linear_fp8(x, w, b, residual, Post::None)
}

/// [`linear_rotary`] on e4m3 inputs.
pub fn linear_fp8_rotary(
    x: &Fp8Rows,
    w: &Fp8Rows,
    b: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads2: usize,
    half: usize,
) -> Result<Tensor> {
    with_rotary((cos, sin), heads2, half, |post| {
        fp8::linear_fp8(x, w, b, None, post)
    })
}

/// ESM C's query and key LayerNorms (`q`, `k`: weight and bias over the hidden size `H`) and
/// rotary (f32 tables `[T, half]`, `heads2 = 2 · heads`), in place on the QKV output `qkv`
/// (`[T, 3H]`, fresh from its GEMM: a whole contiguous allocation no other tensor shares).
pub fn qk_norm_rotary(
    qkv: &Tensor,
    q: (&Tensor, &Tensor),
    k: (&Tensor, &Tensor),
    eps: f64,
    (cos, sin): (&Tensor, &Tensor),
    heads2: usize,
    half: usize,
) -> Result<()> {
    let (cos, sin) = (aligned(cos)?, aligned(sin)?);
    let (qw, qb, kw, kb) = (aligned(q.0)?, aligned(q.1)?, aligned(k.0)?, aligned(k.1)?);
    let op = QkNormRotary {
        q: (&qw, &qb),
        k: (&kw, &kb),
        eps: eps as f32,
        rotary: Rotary {
            cos: &cos,
            sin: &sin,
            heads2,
            half,
        },
    };
    Ok(qkv.inplace_op1(&op)?)
}

/// `silu(gate) · up` of ESM C's fused gate/up output `[T, 2I]` (gate columns first; `I` a
/// multiple of 8), `[T, I]`, one rounding.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    Ok(aligned(gate_up)?.apply_op1_no_bwd(&SwigluOp)?)
}

/// LayerNorm of the rows of `x` (`[T, H]`, `H` a multiple of 8, at most [`MAX_LAYER_NORM_WIDTH`]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (w, b) = (aligned(w)?, aligned(b)?);
    let op = LayerNormOp {
        w: &w,
        b: &b,
        eps: eps as f32,
    };
    Ok(aligned(x)?.apply_op1_no_bwd(&op)?)
}
