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
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, StorageRef, Tensor, WithDType,
};

use std::mem::size_of;

use candle_nn::Linear;

use super::gemm::{self, Operand};
use crate::error::Result;

const MODULE: &str = "esmbed_fused";

/// The LayerNorm kernel's variants: 16-byte vectors per lane kept in registers (`V` in the source).
const LAYER_NORM_VECTORS: [usize; 3] = [8, 12, 20];

/// The widest LayerNorm row the kernels take (a multiple of 8): 5120, ESM-2 15B's hidden size.
pub const MAX_LAYER_NORM_WIDTH: usize = 32 * 8 * LAYER_NORM_VECTORS[LAYER_NORM_VECTORS.len() - 1];

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
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
#define LO(v, LOAD) LOAD((unsigned short)((v) & 0xffff))
#define HI(v, LOAD) LOAD((unsigned short)((v) >> 16))
/* Two values rounded (to nearest even, as the scalar stores) and packed, low half first, in one
   instruction (sm_80+, which FlashAttention needs anyway): the element-wise kernels were
   issue-bound on the scalar rounding. */
__device__ __forceinline__ unsigned int store_bf16x2(float lo, float hi) {
    unsigned int d; asm("{ cvt.rn.bf16x2.f32 %0, %1, %2; }" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ unsigned int store_f16x2(float lo, float hi) {
    unsigned int d; asm("{ cvt.rn.f16x2.f32 %0, %1, %2; }" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
#define PACK(f0, f1, STORE) STORE##x2(f0, f1)

/* Exact (erf) GELU in place, eight elements per thread (16-byte accesses). */
#define GELU(NAME, LOAD, STORE)                                                                   \
extern "C" __global__ void NAME##_gelu8(uint4* x, unsigned long long n8) {                        \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n8; \
         i += (unsigned long long)blockDim.x * gridDim.x) {                                       \
        uint4 v = x[i];                                                                           \
        v.x = PACK(gelu_erf(LO(v.x, LOAD)), gelu_erf(HI(v.x, LOAD)), STORE);                      \
        v.y = PACK(gelu_erf(LO(v.y, LOAD)), gelu_erf(HI(v.y, LOAD)), STORE);                      \
        v.z = PACK(gelu_erf(LO(v.z, LOAD)), gelu_erf(HI(v.z, LOAD)), STORE);                      \
        v.w = PACK(gelu_erf(LO(v.w, LOAD)), gelu_erf(HI(v.w, LOAD)), STORE);                      \
        x[i] = v;                                                                                 \
    }                                                                                             \
}                                                                                                 \
extern "C" __global__ void NAME##_gelu1(unsigned short* x, unsigned long long n) {                \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;  \
         i += (unsigned long long)blockDim.x * gridDim.x)                                         \
        x[i] = STORE(gelu_erf(LOAD(x[i])));                                                       \
}
GELU(bf16, load_bf16, store_bf16)
GELU(f16, load_f16, store_f16)

/* LayerNorm over rows of 8 * cols8 <= 32 * 8 * V elements, one warp per row: the row is read
   once, with 16-byte loads all in flight together, and kept in registers for the statistics (f32:
   the mean, then the mean squared deviation, PyTorch's biased variance) and the output,
   y = (x - mean) * rstd * w + b rounded once. Instantiated for V = 8, 12 and 20 (rows up to 2048,
   3072 and 5120: every ESM-2 up to 15B); the smallest that fits is used, since the registers a
   thread holds (4 * V for the row) decide how many warps an SM keeps in flight. */
#define SUM8(v, LOAD) (((LO(v.x, LOAD) + HI(v.x, LOAD)) + (LO(v.y, LOAD) + HI(v.y, LOAD))) +      \
                       ((LO(v.z, LOAD) + HI(v.z, LOAD)) + (LO(v.w, LOAD) + HI(v.w, LOAD))))
#define SQ2(u, LOAD) ((LO(u, LOAD) - mean) * (LO(u, LOAD) - mean) + (HI(u, LOAD) - mean) * (HI(u, LOAD) - mean))
#define NORM2(u, g, s, LOAD, STORE) PACK((LO(u, LOAD) - mean) * rstd * LO(g, LOAD) + LO(s, LOAD),   \
                                         (HI(u, LOAD) - mean) * rstd * HI(g, LOAD) + HI(s, LOAD), STORE)
#define LAYER_NORM(NAME, LOAD, STORE, V)                                                         \
extern "C" __global__ void NAME##_layer_norm##V(const uint4* x, const uint4* w, const uint4* b,  \
        uint4* out, unsigned int rows, unsigned int cols8, float eps) {                           \
    unsigned int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                              \
    unsigned int lane = threadIdx.x & 31;                                                         \
    if (row >= rows) return;                                                                      \
    const uint4* in = x + (unsigned long long)row * cols8;                                        \
    uint4* o = out + (unsigned long long)row * cols8;                                             \
    uint4 v[V];                                                                                \
    float sum = 0.0f;                                                                             \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                            \
        unsigned int c = lane + 32u * i;                                                          \
        if (c < cols8) { v[i] = in[c]; sum += SUM8(v[i], LOAD); }                                 \
    }                                                                                             \
    float n = (float)(cols8 * 8);                                                                 \
    float mean = warp_sum(sum) / n;                                                               \
    float sq = 0.0f;                                                                              \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                            \
        if (lane + 32u * i < cols8)                                                               \
            sq += (SQ2(v[i].x, LOAD) + SQ2(v[i].y, LOAD)) + (SQ2(v[i].z, LOAD) + SQ2(v[i].w, LOAD)); \
    }                                                                                             \
    float rstd = rsqrtf(warp_sum(sq) / n + eps);                                                  \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                            \
        unsigned int c = lane + 32u * i;                                                          \
        if (c < cols8) {                                                                          \
            uint4 g = w[c], s = b[c];                                                             \
            o[c] = make_uint4(NORM2(v[i].x, g.x, s.x, LOAD, STORE), NORM2(v[i].y, g.y, s.y, LOAD, STORE), \
                              NORM2(v[i].z, g.z, s.z, LOAD, STORE), NORM2(v[i].w, g.w, s.w, LOAD, STORE)); \
        }                                                                                         \
    }                                                                                             \
}
LAYER_NORM(bf16, load_bf16, store_bf16, 8)
LAYER_NORM(bf16, load_bf16, store_bf16, 12)
LAYER_NORM(bf16, load_bf16, store_bf16, 20)
LAYER_NORM(f16, load_f16, store_f16, 8)
LAYER_NORM(f16, load_f16, store_f16, 12)
LAYER_NORM(f16, load_f16, store_f16, 20)

/* Rotate-half (NeoX) rotary in place on the query and key heads of a fused projection output
   (rows of `row` elements: heads2 = 2 * heads heads of 2 * half, then the values, untouched).
   cos/sin: f32 [tokens, half], positions already per sequence. In f32 as HF does it
   (x * cos + rotate_half(x) * sin with f32 tables), rounded once. Each thread takes two
   neighbouring pairs (i, i + half) and (i + 1, i + 1 + half). */
#define ROTARY(NAME, LOAD, STORE)                                                                 \
extern "C" __global__ void NAME##_rotary(unsigned short* qkv, const float* cos, const float* sin, \
        unsigned int tokens, unsigned int heads2, unsigned int half, unsigned int row) {          \
    unsigned int quarter = half >> 1;                                                             \
    unsigned long long total = (unsigned long long)tokens * heads2 * quarter;                     \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;        \
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {                            \
        unsigned int j = (unsigned int)(i % quarter) * 2;                                         \
        unsigned long long th = i / quarter;                                                      \
        unsigned int h = (unsigned int)(th % heads2);                                             \
        unsigned long long t = th / heads2;                                                       \
        unsigned short* base = qkv + t * row + (unsigned long long)h * 2 * half + j;              \
        unsigned int* p1 = (unsigned int*)base;                                                   \
        unsigned int* p2 = (unsigned int*)(base + half);                                          \
        unsigned int a = *p1, b = *p2;                                                            \
        float c0 = cos[t * half + j], c1 = cos[t * half + j + 1];                                 \
        float s0 = sin[t * half + j], s1 = sin[t * half + j + 1];                                 \
        float x10 = LO(a, LOAD), x11 = HI(a, LOAD), x20 = LO(b, LOAD), x21 = HI(b, LOAD);         \
        *p1 = PACK(x10 * c0 + (-x20) * s0, x11 * c1 + (-x21) * s1, STORE);                        \
        *p2 = PACK(x20 * c0 + x10 * s0, x21 * c1 + x11 * s1, STORE);                              \
    }                                                                                             \
}
ROTARY(bf16, load_bf16, store_bf16)
ROTARY(f16, load_f16, store_f16)

/* The same rotary, one block per token and four pairs per thread: 8-byte accesses to the heads,
   16-byte reads of the tables, and no 64-bit division per element (which made the one-pair
   kernel above issue-bound, at a fraction of the memory bandwidth). Needs half % 4 == 0. */
#define ROTARY4(NAME, LOAD, STORE)                                                                \
extern "C" __global__ void NAME##_rotary4(unsigned short* qkv, const float4* cos,                 \
        const float4* sin, unsigned int tokens, unsigned int heads2, unsigned int half,           \
        unsigned int row) {                                                                       \
    unsigned int q4 = half >> 2, per_token = heads2 * q4;                                         \
    for (unsigned int t = blockIdx.x; t < tokens; t += gridDim.x) {                               \
        const float4* ct = cos + (unsigned long long)t * q4;                                      \
        const float4* st = sin + (unsigned long long)t * q4;                                      \
        unsigned short* r = qkv + (unsigned long long)t * row;                                    \
        for (unsigned int i = threadIdx.x; i < per_token; i += blockDim.x) {                      \
            unsigned int h = i / q4, g = i - h * q4;                                              \
            uint2* p1 = (uint2*)(r + h * 2 * half + g * 4);                                       \
            uint2* p2 = (uint2*)(r + h * 2 * half + half + g * 4);                                \
            uint2 a = *p1, b = *p2;                                                               \
            float4 c = ct[g], s = st[g];                                                          \
            float a0 = LO(a.x, LOAD), a1 = HI(a.x, LOAD), a2 = LO(a.y, LOAD), a3 = HI(a.y, LOAD); \
            float b0 = LO(b.x, LOAD), b1 = HI(b.x, LOAD), b2 = LO(b.y, LOAD), b3 = HI(b.y, LOAD); \
            *p1 = make_uint2(PACK(a0 * c.x + (-b0) * s.x, a1 * c.y + (-b1) * s.y, STORE),         \
                             PACK(a2 * c.z + (-b2) * s.z, a3 * c.w + (-b3) * s.w, STORE));        \
            *p2 = make_uint2(PACK(b0 * c.x + a0 * s.x, b1 * c.y + a1 * s.y, STORE),               \
                             PACK(b2 * c.z + a2 * s.z, b3 * c.w + a3 * s.w, STORE));              \
        }                                                                                         \
    }                                                                                             \
}
ROTARY4(bf16, load_bf16, store_bf16)
ROTARY4(f16, load_f16, store_f16)

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

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        // The virtual architecture of Ampere, the oldest GPU FlashAttention runs on (the packed
        // two-value conversions need it); the driver JIT-compiles the PTX for the GPU present.
        let options = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
            arch: Some("compute_80"),
            ..Default::default()
        };
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

/// Rotary on the first `heads2` heads of `2 * half` (queries then keys), f32 `cos`/`sin` tables
/// `[T, half]`.
#[derive(Clone, Copy)]
struct Rotary<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    heads2: usize,
    half: usize,
}

/// What runs on a Linear's output before anyone reads it.
#[derive(Clone, Copy)]
enum Post<'a> {
    None,
    /// Exact GELU in place.
    Gelu,
    /// Rotary in place.
    Rotary(Rotary<'a>),
}

/// `post(x · wᵀ + b (+ residual))` on cuBLASLt plus at most one in-place kernel.
struct LinearOp<'a> {
    w: &'a Tensor,
    b: &'a Tensor,
    residual: Option<&'a Tensor>,
    post: Post<'a>,
}

impl Typed for LinearOp<'_> {
    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let (tokens, k) = xl.shape().dims2()?;
        let w_guard = self.w.storage_and_layout();
        let b_guard = self.b.storage_and_layout();
        let r_guard = self.residual.map(|r| r.storage_and_layout());
        let (n, wk) = w_guard.1.shape().dims2()?;
        if wk != k || b_guard.1.shape().elem_count() != n {
            candle_core::bail!(
                "linear: x [{tokens}, {k}], w {:?}, b {:?}",
                w_guard.1.shape(),
                b_guard.1.shape()
            );
        }
        let residual = match &r_guard {
            Some((storage, layout)) => {
                if layout.shape().dims2()? != (tokens, n) {
                    candle_core::bail!("linear: residual {:?} for [{tokens}, {n}]", layout.shape());
                }
                Some(operand::<T>(cuda(storage, dev)?, layout)?)
            }
            None => None,
        };
        // SAFETY: every element is written by the GEMM before anything reads it.
        let mut out = unsafe { dev.alloc::<T>(elements(tokens, n)?)? };
        gemm::linear(
            dev,
            operand::<T>(x, xl)?,
            operand::<T>(cuda(&w_guard.0, dev)?, w_guard.1)?,
            operand::<T>(cuda(&b_guard.0, dev)?, b_guard.1)?,
            residual,
            &mut out,
            (tokens, n, k),
        )?;
        // With ESMBED_PROFILE, the pass after the GEMM is timed on its own too.
        let profiling = super::profile::enabled() && !matches!(self.post, Post::None);
        let started = if profiling {
            dev.cuda_stream().synchronize().w()?;
            Some(std::time::Instant::now())
        } else {
            None
        };
        match self.post {
            Post::None => {}
            Post::Gelu => gelu(dev, dtype, &mut out, n)?,
            Post::Rotary(r) => rotary(dev, dtype, &mut out, (tokens, n), r)?,
        }
        if let Some(started) = started {
            dev.cuda_stream().synchronize().w()?;
            let part = match self.post {
                Post::Gelu => "fc1_gelu/gelu",
                _ => "qkv_rotary/rotary",
            };
            super::profile::record_part(part, started.elapsed().as_secs_f64());
        }
        Ok(out)
    }
}

/// Exact GELU in place on `out`, rows of `n`.
fn gelu<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    out: &mut CudaSlice<T>,
    n: usize,
) -> candle_core::Result<()> {
    let total = out.len();
    let (name, threads) = if n.is_multiple_of(8) && total.is_multiple_of(8) {
        ("gelu8", total / 8)
    } else {
        ("gelu1", total)
    };
    let func =
        dev.get_or_load_custom_func(&format!("{}_{name}", prefix(dtype)?), MODULE, ptx()?)?;
    let count = threads as u64;
    let mut builder = func.builder();
    builder.arg(out);
    builder.arg(&count);
    // SAFETY: the kernel takes (x, count) and touches `count` 16-byte vectors (gelu8) or
    // elements (gelu1) of `x`: exactly the `total` elements `out` holds. `out` is a whole
    // allocation of the kernel's dtype (`prefix(dtype)` matches `T`), so 16-byte aligned.
    unsafe { builder.launch(grid(threads)) }.w()?;
    Ok(())
}

/// Rotary in place on the query and key heads of `out`, `[tokens, n]`.
fn rotary<T: DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    out: &mut CudaSlice<T>,
    (tokens, n): (usize, usize),
    Rotary {
        cos,
        sin,
        heads2,
        half,
    }: Rotary<'_>,
) -> candle_core::Result<()> {
    let rotated = heads2.checked_mul(2 * half);
    if half == 0 || !half.is_multiple_of(2) || !n.is_multiple_of(2) || rotated.is_none_or(|r| r > n)
    {
        candle_core::bail!("rotary: {heads2} heads of {} in rows of {n}", 2 * half);
    }
    if out.len() != elements(tokens, n)? {
        candle_core::bail!("rotary: {} elements for [{tokens}, {n}]", out.len());
    }
    let cos_guard = cos.storage_and_layout();
    let sin_guard = sin.storage_and_layout();
    // The four-pairs-per-thread kernel wherever its 8/16-byte accesses line up.
    let wide = half.is_multiple_of(4) && n.is_multiple_of(4);
    for l in [cos_guard.1, sin_guard.1] {
        if l.shape().dims2()? != (tokens, half) {
            candle_core::bail!("rotary tables {:?} for [{tokens}, {half}]", l.shape());
        }
        if wide {
            check_aligned::<f32>(l, "rotary table")?;
        }
    }
    let cos = view::<f32>(cuda(&cos_guard.0, dev)?, cos_guard.1)?;
    let sin = view::<f32>(cuda(&sin_guard.0, dev)?, sin_guard.1)?;
    let name = if wide { "rotary4" } else { "rotary" };
    let func =
        dev.get_or_load_custom_func(&format!("{}_{name}", prefix(dtype)?), MODULE, ptx()?)?;
    let t32 = arg32(tokens, "tokens")?;
    let (h32, half32, row32) = (
        arg32(heads2, "heads")?,
        arg32(half, "half")?,
        arg32(n, "row")?,
    );
    let mut builder = func.builder();
    builder.arg(out);
    builder.arg(&cos);
    builder.arg(&sin);
    builder.arg(&t32);
    builder.arg(&h32);
    builder.arg(&half32);
    builder.arg(&row32);
    let cfg = if wide {
        let per_token = (heads2 * half / 4).next_multiple_of(32).min(512);
        LaunchConfig {
            grid_dim: (tokens.clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (per_token as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        grid(tokens * heads2 * half / 2)
    };
    // SAFETY: (qkv, cos, sin, tokens, heads2, half, row): for each token t < tokens the kernels
    // touch elements t·row + [0, heads2·2·half) of `out` (tokens × row elements, heads2·2·half
    // ≤ row, checked) and t·half + [0, half) of the f32 tables (views checked [tokens, half]).
    // Alignment: `out` is a whole allocation and row and half are even (4-byte pairs); for the
    // wide kernel both are multiples of 4 (8-byte accesses) and the tables start 16-byte
    // aligned (checked).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

impl CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "esmbed-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = Shape::from((xl.shape().dims2()?.0, self.w.dim(0)?));
        run_typed(self, x, xl, shape)
    }
}

/// LayerNorm over the last dimension, one warp per row.
struct LayerNormOp<'a> {
    w: &'a Tensor,
    b: &'a Tensor,
    eps: f32,
}

impl Typed for LayerNormOp<'_> {
    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let (rows, cols) = xl.shape().dims2()?;
        if !cols.is_multiple_of(8) || cols > MAX_LAYER_NORM_WIDTH {
            candle_core::bail!(
                "layer_norm: rows of {cols}, not a multiple of 8 up to {MAX_LAYER_NORM_WIDTH}"
            );
        }
        let w_guard = self.w.storage_and_layout();
        let b_guard = self.b.storage_and_layout();
        for (what, l) in [("input", xl), ("weight", w_guard.1), ("bias", b_guard.1)] {
            check_aligned::<T>(l, what)?;
        }
        for l in [w_guard.1, b_guard.1] {
            if l.shape().dims() != [cols] {
                candle_core::bail!("layer_norm: parameters {:?} for rows of {cols}", l.shape());
            }
        }
        let w = view::<T>(cuda(&w_guard.0, dev)?, w_guard.1)?;
        let b = view::<T>(cuda(&b_guard.0, dev)?, b_guard.1)?;
        let x = view::<T>(x, xl)?;
        let (rows32, cols8) = (arg32(rows, "rows")?, (cols / 8) as u32);
        // SAFETY: every element is written by the kernel before anything reads it.
        let mut out = unsafe { dev.alloc::<T>(elements(rows, cols)?)? };
        let vectors = LAYER_NORM_VECTORS
            .into_iter()
            .find(|v| cols <= 32 * 8 * v)
            .expect("checked against the widest");
        let func = dev.get_or_load_custom_func(
            &format!("{}_layer_norm{vectors}", prefix(dtype)?),
            MODULE,
            ptx()?,
        )?;
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&w);
        builder.arg(&b);
        builder.arg(&mut out);
        builder.arg(&rows32);
        builder.arg(&cols8);
        builder.arg(&self.eps);
        // Eight rows (warps) per block of 256 threads.
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (x, w, b, out, rows, cols / 8, eps): warp r < rows reads the cols / 8 16-byte
        // vectors of row r of `x` (a checked [rows, cols] view) and of `w` and `b` ([cols],
        // checked) and writes row r of `out` (rows × cols elements); every operand starts
        // 16-byte aligned (checked; `out` is a whole allocation), and all are of the kernel's
        // dtype (`prefix(dtype)` matches `T`, the views' type).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for LayerNormOp<'_> {
    fn name(&self) -> &'static str {
        "esmbed-layer-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        run_typed(self, x, xl, xl.shape().clone())
    }
}

/// Means of row ranges of a `[rows, H]` tensor. Built only by [`segment_mean`], after it checked
/// the ranges against `rows` on the host.
struct SegmentMeanOp {
    rows: usize,
    segments: usize,
}

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
        let (rows, cols) = hl.shape().dims2()?;
        let segments = self.segments;
        if rows != self.rows || sl.shape().dims() != [segments] || cl.shape().dims() != [segments] {
            candle_core::bail!(
                "segment_mean: {:?} rows, {:?} starts, {:?} counts",
                hl.shape(),
                sl.shape(),
                cl.shape()
            );
        }
        let func = dev.get_or_load_custom_func(
            &format!("{}_segment_mean", prefix(h.dtype())?),
            MODULE,
            ptx()?,
        )?;
        let starts = view::<u32>(starts, sl)?;
        let counts = view::<u32>(counts, cl)?;
        let (grid_x, grid_y) = (arg32(segments, "segments")?, cols.div_ceil(128));
        if grid_y > 65535 {
            candle_core::bail!("segment_mean: rows of {cols} are too wide");
        }
        let cols32 = arg32(cols, "cols")?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<f32>(elements(segments, cols)?)? };
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
        builder.arg(&cols32);
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (hidden, starts, counts, out, cols): block (s, ·), s < segments, reads
        // `starts`/`counts` [segments] (checked views) and rows starts[s] .. starts[s] +
        // counts[s] ≤ rows of `hidden` (a checked [rows, cols] view of the kernel's dtype; the
        // ranges were checked on the host by `segment_mean`, which uploaded them), and writes
        // row s of `out` (segments × cols).
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
/// `[B, H]`. The ranges must lie inside the `T` rows.
pub(crate) fn segment_mean(hidden: &Tensor, starts: &[u32], counts: &[u32]) -> Result<Tensor> {
    let (rows, cols) = hidden.dims2()?;
    let inside = starts.len() == counts.len()
        && starts
            .iter()
            .zip(counts)
            .all(|(&s, &c)| s as usize + c as usize <= rows);
    if !inside {
        return Err(crate::Error::internal(format!(
            "segment_mean: {} starts and {} counts, not all inside {rows} rows",
            starts.len(),
            counts.len()
        )));
    }
    let device = hidden.device();
    if starts.is_empty() {
        return Ok(Tensor::zeros((0, cols), DType::F32, device)?);
    }
    let op = SegmentMeanOp {
        rows,
        segments: starts.len(),
    };
    let starts = Tensor::from_slice(starts, starts.len(), device)?;
    let counts = Tensor::from_slice(counts, counts.len(), device)?;
    Ok(hidden
        .contiguous()?
        .apply_op3_no_bwd(&starts, &counts, &op)?)
}

/// Whether the fused kernels apply to `x`.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// A contiguous `t` whose first element is 16-byte aligned (the kernels' vector accesses).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let bytes = t.layout().start_offset() * t.dtype().size_in_bytes();
    let ok = t.is_contiguous() && bytes.is_multiple_of(16);
    Ok(if ok { t.clone() } else { t.copy()? })
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

/// `residual + x · wᵀ + b`, one rounding.
pub(crate) fn linear_residual(x: &Tensor, layer: &Linear, residual: &Tensor) -> Result<Tensor> {
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
    let (cos, sin) = (aligned(cos)?, aligned(sin)?);
    let post = Post::Rotary(Rotary {
        cos: &cos,
        sin: &sin,
        heads2,
        half,
    });
    apply(x, layer, None, post)
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
