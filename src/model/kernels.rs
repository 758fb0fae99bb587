//! Fused elementwise CUDA kernels for the bf16/f16 forward, compiled with NVRTC at first use.
//!
//! Measured with Nsight Compute on an H200 (650M shape, one 61k-token pack): candle's broadcast
//! add of the Linear biases took 58 % of the GPU time (a [T, 5120] bias add 5.9 ms, against
//! 0.6–0.95 ms for the matmul that produced it), and the erf GELU another 8 %. These kernels do the
//! bias add, the bias add plus residual, and the bias add plus exact GELU in one pass each, in f32
//! registers with a single rounding to the storage type (as PyTorch's cuBLASLt bias epilogue does).
//!
//! bf16/f16 conversions are written out (bit operations and PTX `cvt`) so that the source needs
//! no CUDA headers at run time.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::error::Result;

const MODULE: &str = "esmbed_fused";

const SOURCE: &str = r#"
__device__ __forceinline__ float load_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short store_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;
    u += 0x7fff + ((u >> 16) & 1);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float load_f16(unsigned short h) {
    float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short store_f16(float f) {
    unsigned short h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

#define FUSED(NAME, LOAD, STORE)                                                                  \
extern "C" __global__ void NAME##_bias(const unsigned short* x, const unsigned short* bias,       \
        unsigned short* out, unsigned long long n, unsigned int cols) {                          \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;  \
         i += (unsigned long long)blockDim.x * gridDim.x)                                         \
        out[i] = STORE(LOAD(x[i]) + LOAD(bias[i % cols]));                                       \
}                                                                                                 \
extern "C" __global__ void NAME##_bias_residual(const unsigned short* x, const unsigned short* bias, \
        const unsigned short* residual, unsigned short* out, unsigned long long n, unsigned int cols) { \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;  \
         i += (unsigned long long)blockDim.x * gridDim.x)                                         \
        out[i] = STORE(LOAD(residual[i]) + (LOAD(x[i]) + LOAD(bias[i % cols])));                 \
}                                                                                                 \
extern "C" __global__ void NAME##_bias_gelu(const unsigned short* x, const unsigned short* bias,  \
        unsigned short* out, unsigned long long n, unsigned int cols) {                          \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;  \
         i += (unsigned long long)blockDim.x * gridDim.x)                                         \
        out[i] = STORE(gelu_erf(LOAD(x[i]) + LOAD(bias[i % cols])));                             \
}

FUSED(bf16, load_bf16, store_bf16)
FUSED(f16, load_f16, store_f16)

/* The same, four elements per thread (8-byte loads), 32-bit indices: rows of a multiple of 4. */
#define LANE(v, k, LOAD) LOAD((unsigned short)(((k) & 1) ? ((v) >> 16) : ((v) & 0xffff)))
#define PACK(f0, f1, STORE) ((unsigned int)STORE(f0) | ((unsigned int)STORE(f1) << 16))
#define MAP4(a, b, EXPR, LOAD, STORE, out)                                                        \
    {                                                                                             \
        float r0, r1, r2, r3, e, f;                                                               \
        e = LANE(a.x, 0, LOAD); f = LANE(b.x, 0, LOAD); r0 = EXPR;                                \
        e = LANE(a.x, 1, LOAD); f = LANE(b.x, 1, LOAD); r1 = EXPR;                                \
        e = LANE(a.y, 0, LOAD); f = LANE(b.y, 0, LOAD); r2 = EXPR;                                \
        e = LANE(a.y, 1, LOAD); f = LANE(b.y, 1, LOAD); r3 = EXPR;                                \
        out = make_uint2(PACK(r0, r1, STORE), PACK(r2, r3, STORE));                               \
    }
#define FUSED4(NAME, LOAD, STORE)                                                                 \
extern "C" __global__ void NAME##_bias4(const uint2* x, const uint2* bias, uint2* out,            \
        unsigned int n, unsigned int cols) {                                                      \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) { \
        uint2 a = x[i], b = bias[i % cols]; MAP4(a, b, e + f, LOAD, STORE, out[i]) }              \
}                                                                                                 \
extern "C" __global__ void NAME##_bias_gelu4(const uint2* x, const uint2* bias, uint2* out,       \
        unsigned int n, unsigned int cols) {                                                      \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) { \
        uint2 a = x[i], b = bias[i % cols]; MAP4(a, b, gelu_erf(e + f), LOAD, STORE, out[i]) }    \
}                                                                                                 \
extern "C" __global__ void NAME##_bias_residual4(const uint2* x, const uint2* bias,               \
        const uint2* residual, uint2* out, unsigned int n, unsigned int cols) {                   \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) { \
        uint2 a = x[i], b = bias[i % cols], r = residual[i];                                      \
        float r0 = LANE(r.x, 0, LOAD) + (LANE(a.x, 0, LOAD) + LANE(b.x, 0, LOAD));                \
        float r1 = LANE(r.x, 1, LOAD) + (LANE(a.x, 1, LOAD) + LANE(b.x, 1, LOAD));                \
        float r2 = LANE(r.y, 0, LOAD) + (LANE(a.y, 0, LOAD) + LANE(b.y, 0, LOAD));                \
        float r3 = LANE(r.y, 1, LOAD) + (LANE(a.y, 1, LOAD) + LANE(b.y, 1, LOAD));                \
        out[i] = make_uint2(PACK(r0, r1, STORE), PACK(r2, r3, STORE));                            \
    }                                                                                             \
}
FUSED4(bf16, load_bf16, store_bf16)
FUSED4(f16, load_f16, store_f16)

/* Mean over the residue rows of each sequence of a pack: grid (sequences, column blocks). */
#define SEGMENT_MEAN(NAME, LOAD)                                                                  \
extern "C" __global__ void NAME##_segment_mean(const unsigned short* hidden,                      \
        const unsigned int* starts, const unsigned int* counts, float* out, unsigned int cols) {  \
    unsigned int s = blockIdx.x;                                                                  \
    unsigned int c = blockIdx.y * blockDim.x + threadIdx.x;                                       \
    if (c >= cols) return;                                                                        \
    unsigned long long row = starts[s];                                                           \
    unsigned int count = counts[s];                                                               \
    float acc = 0.0f;                                                                             \
    for (unsigned int r = 0; r < count; ++r) acc += LOAD(hidden[(row + r) * cols + c]);          \
    out[(unsigned long long)s * cols + c] = acc / (float)(count > 0 ? count : 1);                 \
}
SEGMENT_MEAN(bf16, load_bf16)
SEGMENT_MEAN(f16, load_f16)
"#;

/// Which fused operation.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bias,
    BiasGelu,
}

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        // No `arch`: NVRTC's default virtual architecture, which the driver JIT-compiles for
        // whatever GPU is present (the kernels use nothing architecture-specific).
        let options = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions::default();
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(SOURCE, options)
            .map(|p| p.to_src())
            .map_err(|e| format!("{e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(format!("compiling esmbed's fused kernels: {e}")))
}

fn prefix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("fused kernels take bf16/f16, not {other:?}"),
    }
}

/// A contiguous view of `s` as `T` (bf16 or f16).
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernels need contiguous inputs".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// Run kernel `{dtype}_{name}` over `n` elements of rows of `cols`, inputs then output.
fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
    dev: &candle_core::CudaDevice,
    dtype: DType,
    name: &str,
    inputs: &[CudaView<'_, T>],
    n: usize,
    cols: usize,
    aligned: bool,
) -> candle_core::Result<CudaSlice<T>> {
    // Four elements per thread when rows are a multiple of 4 (every ESM-2 width) and indices
    // fit in 32 bits, and every input starts 8-byte aligned.
    let vec4 = aligned && cols.is_multiple_of(4) && n / 4 < u32::MAX as usize;
    let kernel = if vec4 {
        format!("{}_{name}4", prefix(dtype)?)
    } else {
        format!("{}_{name}", prefix(dtype)?)
    };
    let func = dev.get_or_load_custom_func(&kernel, MODULE, ptx()?)?;
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<T>(n)? };
    let mut builder = func.builder();
    for input in inputs {
        builder.arg(input);
    }
    builder.arg(&out);
    let (n64, cols32) = (n as u64, cols as u32);
    let (n4, cols4) = ((n / 4) as u32, (cols / 4) as u32);
    if vec4 {
        builder.arg(&n4);
        builder.arg(&cols4);
    } else {
        builder.arg(&n64);
        builder.arg(&cols32);
    }
    let threads = if vec4 { n / 4 } else { n };
    let blocks = threads.div_ceil(256).min(65535 * 8) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel takes (inputs..., out, n, cols) with 2-byte elements, as passed here.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}

/// Launch on bf16 or f16 storages.
fn launch(
    name: &str,
    storages: &[(&CudaStorage, &Layout)],
    n: usize,
    cols: usize,
) -> candle_core::Result<CudaStorage> {
    let dev = storages[0].0.device();
    let dtype = storages[0].0.dtype();
    let aligned = storages
        .iter()
        .all(|(_, l)| l.start_offset().is_multiple_of(4));
    let slice = match dtype {
        DType::BF16 => {
            let views = storages
                .iter()
                .map(|(s, l)| view::<half::bf16>(s, l))
                .collect::<candle_core::Result<Vec<_>>>()?;
            CudaStorageSlice::BF16(run(dev, dtype, name, &views, n, cols, aligned)?)
        }
        DType::F16 => {
            let views = storages
                .iter()
                .map(|(s, l)| view::<half::f16>(s, l))
                .collect::<candle_core::Result<Vec<_>>>()?;
            CudaStorageSlice::F16(run(dev, dtype, name, &views, n, cols, aligned)?)
        }
        other => candle_core::bail!("fused kernels take bf16/f16, not {other:?}"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

struct BiasOp(Kind);

impl CustomOp2 for BiasOp {
    fn name(&self) -> &'static str {
        "esmbed-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let cols = bl.shape().elem_count();
        let n = xl.shape().elem_count();
        let name = match self.0 {
            Kind::Bias => "bias",
            Kind::BiasGelu => "bias_gelu",
        };
        let out = launch(name, &[(x, xl), (b, bl)], n, cols)?;
        Ok((out, xl.shape().clone()))
    }
}

struct BiasResidualOp;

impl CustomOp3 for BiasResidualOp {
    fn name(&self) -> &'static str {
        "esmbed-bias-residual"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let cols = bl.shape().elem_count();
        let n = xl.shape().elem_count();
        let out = launch("bias_residual", &[(x, xl), (b, bl), (r, rl)], n, cols)?;
        Ok((out, xl.shape().clone()))
    }
}

struct SegmentMeanOp;

impl CustomOp3 for SegmentMeanOp {
    fn name(&self) -> &'static str {
        "esmbed-segment-mean"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        hl: &Layout,
        starts: &CudaStorage,
        sl: &Layout,
        counts: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = h.device();
        let (_, cols) = hl.shape().dims2()?;
        let segments = sl.shape().elem_count();
        let func = dev.get_or_load_custom_func(
            &format!("{}_segment_mean", prefix(h.dtype())?),
            MODULE,
            ptx()?,
        )?;
        let starts = view::<u32>(starts, sl)?;
        let counts = view::<u32>(counts, cl)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<f32>(segments * cols)? };
        let (bf16_rows, f16_rows);
        let mut builder = func.builder();
        match h.dtype() {
            DType::BF16 => {
                bf16_rows = view::<half::bf16>(h, hl)?;
                builder.arg(&bf16_rows)
            }
            _ => {
                f16_rows = view::<half::f16>(h, hl)?;
                builder.arg(&f16_rows)
            }
        };
        builder.arg(&starts);
        builder.arg(&counts);
        builder.arg(&out);
        let cols32 = cols as u32;
        builder.arg(&cols32);
        let cfg = LaunchConfig {
            grid_dim: (segments as u32, cols.div_ceil(128) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel takes (hidden, starts, counts, out, cols), as passed here.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage {
                slice: CudaStorageSlice::F32(out),
                device: dev.clone(),
            },
            Shape::from((segments, cols)),
        ))
    }
}

/// Mean of rows `starts[i] .. starts[i] + counts[i]` of `hidden` (`[T, H]`, bf16/f16), in f32:
/// `[B, H]`.
pub fn segment_mean(hidden: &Tensor, starts: &Tensor, counts: &Tensor) -> Result<Tensor> {
    Ok(hidden
        .contiguous()?
        .apply_op3_no_bwd(starts, counts, &SegmentMeanOp)?)
}

/// Whether the fused kernels apply to `x`.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// `x + bias` (bias broadcast over rows).
pub fn bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(bias, &BiasOp(Kind::Bias))?)
}

/// `gelu_erf(x + bias)`.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2_no_bwd(bias, &BiasOp(Kind::BiasGelu))?)
}

/// `residual + (x + bias)`.
pub fn bias_residual(x: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3_no_bwd(bias, &residual.contiguous()?, &BiasResidualOp)?)
}
