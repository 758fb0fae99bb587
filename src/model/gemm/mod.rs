//! The forward's matmuls on cuBLASLt, with the bias (and the residual) added in the GEMM's
//! epilogue.
//!
//! candle's matmul is plain cuBLAS: every Linear then needed a second pass over its output to add
//! the bias (and another for the residual), which on the 650M shape cost as much memory traffic
//! as the rest of the layer. cuBLASLt computes `D = A·B + bias + C` in one kernel, in f32
//! registers, with one rounding to bf16/f16 on store (PyTorch's `addmm` uses the same epilogue;
//! its residual add is a second rounding, ours is not).
//!
//! Row-major `Y[T, N] = X[T, K] · W[N, K]ᵀ` is column-major `Yᵀ[N, T] = W · Xᵀ`: A = W
//! (transposed), B = X, m = N, n = T, k = K; the bias runs along m.

//!
//! Every wrapper here checks the operands' lengths against the shape it launches with and every
//! status cuBLASLt returns; a cuBLASLt allocation failure becomes a typed [`DeviceOutOfMemory`].

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{DType, WithDType};

mod descriptors;
use descriptors::{Desc, Layouts, Pref};

/// The device ran out of memory inside one of esmbed's own CUDA library calls (cuBLASLt's
/// `CUBLAS_STATUS_ALLOC_FAILED`). It travels as `candle_core::Error::Cuda`, where
/// [`crate::Error`]'s conversion finds it by type: the pack is split and retried.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {status}")]
pub struct DeviceOutOfMemory {
    /// What was being run, e.g. the GEMM and its shape.
    pub operation: String,
    /// The library's status.
    pub status: result::CublasError,
}

/// Any other failed cuBLASLt call.
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed: {status}")]
struct CublasLtFailed {
    operation: String,
    status: result::CublasError,
}

/// A failed cuBLASLt status as a candle error, sorted by type: allocation failures are
/// [`DeviceOutOfMemory`].
fn lt_error(status: result::CublasError, operation: impl fmt::Display) -> candle_core::Error {
    let operation = operation.to_string();
    let error: Box<dyn std::error::Error + Send + Sync> =
        if status.0 == sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
            Box::new(DeviceOutOfMemory { operation, status })
        } else {
            Box::new(CublasLtFailed { operation, status })
        };
    candle_core::Error::Cuda(error).bt()
}

/// Workspace for cuBLASLt's split-K and stream-K kernels (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Developer knobs for measuring the heuristic's choices (`ESMBED_LT_WORKSPACE_MIB`,
/// `ESMBED_LT_ALGO`: take the heuristic's n-th candidate instead of its first).
fn knob(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn workspace_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| knob("ESMBED_LT_WORKSPACE_MIB").map_or(WORKSPACE_BYTES, |m| m << 20))
}

/// Distinct problem shapes remembered per device before the cache starts over (token counts vary
/// per pack; a long job sees a few thousand).
const MAX_CACHED_ALGOS: usize = 4096;

/// Candidates asked of the heuristic (`ESMBED_LT_ALGO` picks among them).
const CANDIDATES: usize = 8;

/// A cuBLASLt handle, its workspace and the chosen algorithms, for one device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: Mutex<HashMap<Key, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: cuBLASLt handles may be used from any thread; each device's work goes to candle's one
// stream for that device, so the workspace is never used by two GEMMs at once.
unsafe impl Send for Lt {}
// SAFETY: as for `Send`; the algorithm cache is behind a mutex, the handle is only read.
unsafe impl Sync for Lt {}

/// A GEMM as cuBLASLt sees it: column-major `D[m, n]`, inner dimension `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    dtype: DType,
    m: u64,
    n: u64,
    k: u64,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Problem { dtype, m, n, k } = self;
        write!(f, "cuBLASLt GEMM {m}x{n}x{k} {dtype:?}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    problem: Problem,
    residual: bool,
    align: [u32; 4],
}

impl Key {
    /// Row-major `[T, N] = [T, K] · [N, K]ᵀ` in `dtype` (the inputs' type), with or without a
    /// residual, its operands at the device addresses `[A, B, C, D]` (their alignment, up to
    /// 256 bytes, can change the algorithm).
    fn new(
        dtype: DType,
        (tokens, n, k): (usize, usize, usize),
        residual: bool,
        pointers: [u64; 4],
    ) -> Self {
        let problem = Problem {
            dtype,
            m: n as u64,
            n: tokens as u64,
            k: k as u64,
        };
        let align = pointers.map(|p| (1u64 << p.trailing_zeros().min(8)) as u32);
        Key {
            problem,
            residual,
            align,
        }
    }
}

fn lt(dev: &CudaDevice) -> candle_core::Result<Arc<Lt>> {
    static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<Lt>>>> = OnceLock::new();
    let mut handles = HANDLES
        .get_or_init(Default::default)
        .lock()
        .expect("cuBLASLt handle table");
    if let Some(lt) = handles.get(&dev.id()) {
        return Ok(lt.clone());
    }
    let handle = result::create_handle().map_err(|e| lt_error(e, "creating a cuBLASLt handle"))?;
    // A failed allocation is the driver's CUDA_ERROR_OUT_OF_MEMORY, which `crate::Error` sorts
    // as out of memory by its type.
    // SAFETY: scratch memory, only ever written and read by cuBLASLt.
    let workspace = unsafe { dev.alloc::<u8>(workspace_bytes().max(1))? };
    let lt = Arc::new(Lt {
        handle,
        workspace,
        algos: Mutex::new(HashMap::new()),
    });
    handles.insert(dev.id(), lt.clone());
    Ok(lt)
}

/// A device allocation and the element offset where an operand starts in it.
pub(crate) struct Operand<'a, T> {
    pub(crate) slice: &'a CudaSlice<T>,
    pub(crate) offset: usize,
}

impl<T> Operand<'_, T> {
    /// That `len` elements from the offset lie inside the allocation, on `stream`'s device.
    fn check(&self, what: &str, len: usize, stream: &CudaStream) -> candle_core::Result<()> {
        if self.slice.context().cu_ctx() != stream.context().cu_ctx() {
            candle_core::bail!("linear: {what} is on another device");
        }
        match self.offset.checked_add(len) {
            Some(end) if end <= self.slice.len() => Ok(()),
            _ => candle_core::bail!(
                "linear: {what} needs {len} elements from {}, its allocation has {}",
                self.offset,
                self.slice.len()
            ),
        }
    }
}

/// `out[T, N] = x[T, K] · w[N, K]ᵀ + bias[N] (+ residual[T, N])`, all contiguous row-major,
/// `T` = bf16 or f16. Every operand's length is checked against the shape first.
pub(crate) fn linear<T: WithDType + DeviceRepr>(
    dev: &CudaDevice,
    x: Operand<'_, T>,
    w: Operand<'_, T>,
    bias: Operand<'_, T>,
    residual: Option<Operand<'_, T>>,
    out: &mut CudaSlice<T>,
    (tokens, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    let data_type = data_type(T::DTYPE)?;
    let stream = dev.cuda_stream();
    check_operands(
        &stream,
        [&x, &w, &bias],
        residual.as_ref(),
        out,
        (tokens, n, k),
    )?;
    // This device's context current, for creating its handle and for the GEMM: cuBLASLt reads
    // the device's properties from the calling thread's context.
    stream.context().bind_to_thread().w()?;
    let lt = lt(dev)?;
    let (a_ptr, _a) = ptr(&w, &stream);
    let (b_ptr, _b) = ptr(&x, &stream);
    let (bias_ptr, _bias) = ptr(&bias, &stream);
    let residual = residual.as_ref().map(|r| ptr(r, &stream));
    let (d_ptr, _d) = out.device_ptr_mut(&stream);
    let c_ptr = residual.as_ref().map_or(d_ptr, |r| r.0);
    let pointers = [a_ptr, b_ptr, c_ptr, d_ptr];
    let key = Key::new(T::DTYPE, (tokens, n, k), residual.is_some(), pointers);
    let problem = key.problem;
    let layouts = Layouts::new(data_type, problem)?;
    let desc = Desc::new(bias_ptr)?;
    let algo = algorithm(&lt, &desc, &layouts, &key)?;
    // SAFETY: A, B, C, D and the bias are device allocations of this context, held by their
    // guards, with at least the elements the layouts describe (`check_operands`).
    unsafe { launch(&lt, (&desc, &layouts, &algo), &key, pointers, &stream) }
        .map_err(|e| lt_error(e, problem))
}

/// An FP8 GEMM operand: e4m3 values and one f32 dequantization scale per row (`x ≈ q · s`).
pub(crate) struct Scaled<'a> {
    pub(crate) q: Operand<'a, float8::F8E4M3>,
    pub(crate) scale: Operand<'a, f32>,
}

/// Whether FP8 GEMMs use cuBLASLt's fast accumulation (`ESMBED_FP8_FAST_ACCUM=0`: off). On
/// Hopper, FP8 tensor cores accumulate in reduced precision; without fast accumulation cuBLASLt
/// promotes partial sums to f32 at intervals, at some cost in speed.
fn fast_accumulation() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| knob("ESMBED_FP8_FAST_ACCUM") != Some(0))
}

/// `out[T, N] = (x[T, K] · w[N, K]ᵀ) · s_x[T] ⊗ s_w[N] + bias[N] (+ residual[T, N])` with e4m3
/// `x` and `w`, bf16 bias, residual and output, f32 accumulation, one rounding on store. `K`
/// must be a multiple of 16 and `N` of 8 (cuBLASLt's FP8 alignment).
pub(crate) fn linear_fp8(
    dev: &CudaDevice,
    x: Scaled<'_>,
    w: Scaled<'_>,
    bias: Operand<'_, half::bf16>,
    residual: Option<Operand<'_, half::bf16>>,
    out: &mut CudaSlice<half::bf16>,
    (tokens, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    if !k.is_multiple_of(16) || !n.is_multiple_of(8) {
        candle_core::bail!("FP8 GEMM: K = {k} must be a multiple of 16 and N = {n} of 8");
    }
    let stream = dev.cuda_stream();
    let outputs = elements(tokens, n)?;
    x.q.check("x", elements(tokens, k)?, &stream)?;
    x.scale.check("x scales", tokens, &stream)?;
    w.q.check("w", elements(n, k)?, &stream)?;
    w.scale.check("w scales", n, &stream)?;
    bias.check("bias", n, &stream)?;
    if let Some(r) = &residual {
        r.check("residual", outputs, &stream)?;
    }
    let whole = Operand {
        slice: &*out,
        offset: 0,
    };
    whole.check("out", outputs, &stream)?;
    stream.context().bind_to_thread().w()?;
    let lt = lt(dev)?;
    let (a_ptr, _a) = ptr(&w.q, &stream);
    let (b_ptr, _b) = ptr(&x.q, &stream);
    let (a_scale, _as) = ptr(&w.scale, &stream);
    let (b_scale, _bs) = ptr(&x.scale, &stream);
    let (bias_ptr, _bias) = ptr(&bias, &stream);
    let residual = residual.as_ref().map(|r| ptr(r, &stream));
    let (d_ptr, _d) = out.device_ptr_mut(&stream);
    let c_ptr = residual.as_ref().map_or(d_ptr, |r| r.0);
    let pointers = [a_ptr, b_ptr, c_ptr, d_ptr];
    let key = Key::new(DType::F8E4M3, (tokens, n, k), residual.is_some(), pointers);
    let problem = key.problem;
    let layouts = Layouts::mixed(
        sys::cudaDataType_t::CUDA_R_8F_E4M3,
        sys::cudaDataType_t::CUDA_R_16BF,
        problem,
    )?;
    let desc = Desc::new(bias_ptr)?;
    desc.scaled(a_scale, b_scale, fast_accumulation())?;
    let algo = algorithm(&lt, &desc, &layouts, &key)?;
    // SAFETY: A, B (e4m3), C, D, the bias (bf16) and both scale vectors (f32, N and T
    // elements) are device allocations of this context, held by their guards, with at least
    // the elements the layouts and scale modes describe (checked above).
    unsafe { launch(&lt, (&desc, &layouts, &algo), &key, pointers, &stream) }
        .map_err(|e| lt_error(e, problem))
}

/// `D = op(A) · B (+ C where `key` has a residual)` with the descriptor's epilogue.
///
/// # Safety
/// `[a, b, c, d]` are device addresses of this context holding at least what `layouts`
/// describes, live until the stream has run the GEMM, as is every pointer the descriptor holds.
unsafe fn launch(
    lt: &Lt,
    (desc, layouts, algo): (&Desc, &Layouts, &sys::cublasLtMatmulAlgo_t),
    key: &Key,
    [a, b, c, d]: [u64; 4],
    stream: &CudaStream,
) -> Result<(), result::CublasError> {
    let alpha = 1f32;
    let beta = if key.residual { 1f32 } else { 0f32 };
    let (ws_ptr, _ws) = lt.workspace.device_ptr(stream);
    // SAFETY: the handle, descriptor, layouts and algorithm are live (the caller's borrows);
    // the operands as the caller vouches; the workspace holds at least `workspace_bytes()`;
    // `alpha` and `beta` are host scalars (the default pointer mode) read before the call
    // returns; the stream is this device's, its context current.
    unsafe {
        result::matmul(
            lt.handle,
            desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a as *const c_void,
            layouts.a.0,
            b as *const c_void,
            layouts.b.0,
            c as *const c_void,
            layouts.d.0,
            d as *mut c_void,
            layouts.d.0,
            algo,
            ws_ptr as *mut c_void,
            workspace_bytes(),
            stream.cu_stream() as sys::cudaStream_t,
        )
    }
}

/// `rows · cols` elements, within what cuBLASLt's 64-bit dimensions take.
fn elements(rows: usize, cols: usize) -> candle_core::Result<usize> {
    rows.checked_mul(cols)
        .filter(|&e| i64::try_from(e).is_ok())
        .ok_or_else(|| candle_core::Error::Msg(format!("linear: [{rows}, {cols}] is too large")))
}

fn data_type(dtype: DType) -> candle_core::Result<sys::cudaDataType_t> {
    match dtype {
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType_t::CUDA_R_16F),
        other => candle_core::bail!("cuBLASLt path takes bf16/f16, not {other:?}"),
    }
}

/// The lengths the GEMM reads and writes against the allocations: `x` `[T, K]`, `w` `[N, K]`,
/// `bias` `[N]`, `residual` and `out` `[T, N]`.
fn check_operands<T>(
    stream: &CudaStream,
    [x, w, bias]: [&Operand<'_, T>; 3],
    residual: Option<&Operand<'_, T>>,
    out: &CudaSlice<T>,
    (tokens, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    let outputs = elements(tokens, n)?;
    x.check("x", elements(tokens, k)?, stream)?;
    w.check("w", elements(n, k)?, stream)?;
    bias.check("bias", n, stream)?;
    if let Some(r) = residual {
        r.check("residual", outputs, stream)?;
    }
    let out = Operand {
        slice: out,
        offset: 0,
    };
    out.check("out", outputs, stream)
}

/// The device address of an operand's first element, and the guard that orders this use after
/// earlier writes.
fn ptr<'a, T>(o: &Operand<'a, T>, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    let (p, guard) = o.slice.device_ptr(stream);
    (p + (o.offset * size_of::<T>()) as u64, guard)
}

/// The algorithm for `key`: cached, or the heuristic's first candidate (`ESMBED_LT_ALGO`: another).
fn algorithm(
    lt: &Lt,
    desc: &Desc,
    layouts: &Layouts,
    key: &Key,
) -> candle_core::Result<sys::cublasLtMatmulAlgo_t> {
    let cached = lt.algos.lock().expect("algorithm cache").get(key).copied();
    if let Some(algo) = cached {
        return Ok(algo);
    }
    let pref = Pref::new()?;
    pref.set(
        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
        workspace_bytes() as u64,
    )?;
    for (attr, a) in [
        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
    ]
    .into_iter()
    .zip(key.align)
    {
        pref.set(attr, a)?;
    }
    let found = heuristic(lt, desc, layouts, &pref, key.problem)?;
    let pick = knob("ESMBED_LT_ALGO").unwrap_or(0).min(found.len() - 1);
    let chosen = found[pick];
    if super::profile::enabled() {
        log_choice(key, &chosen, pick, found.len())?;
    }
    let mut algos = lt.algos.lock().expect("algorithm cache");
    if algos.len() >= MAX_CACHED_ALGOS {
        algos.clear();
    }
    algos.insert(*key, chosen.algo);
    Ok(chosen.algo)
}

/// The heuristic's candidates for the problem, best first; at least one, each usable.
fn heuristic(
    lt: &Lt,
    desc: &Desc,
    layouts: &Layouts,
    pref: &Pref,
    problem: Problem,
) -> candle_core::Result<Vec<sys::cublasLtMatmulHeuristicResult_t>> {
    // SAFETY: a plain C struct of integers, floats and a status enum whose 0 is
    // CUBLAS_STATUS_SUCCESS: all-zero bytes are a valid value.
    let mut found: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] =
        unsafe { std::mem::zeroed() };
    let mut count = 0i32;
    // SAFETY: handle, descriptor, layouts and preference are live; cuBLASLt writes at most
    // `CANDIDATES` results into `found` and their number into `count`, both live locals.
    let status = unsafe {
        sys::cublasLtMatmulAlgoGetHeuristic(
            lt.handle,
            desc.0,
            layouts.a.0,
            layouts.b.0,
            layouts.d.0,
            layouts.d.0,
            pref.0,
            CANDIDATES as i32,
            found.as_mut_ptr(),
            &mut count,
        )
    };
    let failed = |e| lt_error(e, format_args!("{problem}: algorithm heuristic"));
    status.result().map_err(failed)?;
    let count = usize::try_from(count).unwrap_or(0).min(CANDIDATES);
    if count == 0 {
        candle_core::bail!("{problem}: cuBLASLt has no algorithm for it");
    }
    let found = &found[..count];
    for candidate in found {
        candidate.state.result().map_err(failed)?;
    }
    Ok(found.to_vec())
}

/// `ESMBED_PROFILE`: which algorithm the heuristic chose, and its configuration.
fn log_choice(
    key: &Key,
    chosen: &sys::cublasLtMatmulHeuristicResult_t,
    pick: usize,
    count: usize,
) -> candle_core::Result<()> {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
    let get = |attr| algo_config(&chosen.algo, attr);
    let Problem { m, n, k, .. } = key.problem;
    eprintln!(
        "gemm m={m} n={n} k={k} residual={} pick={pick}/{count} id={} tile={} splitk={} stages={} waves={:.2} ws={}",
        key.residual,
        get(A::CUBLASLT_ALGO_CONFIG_ID)?,
        get(A::CUBLASLT_ALGO_CONFIG_TILE_ID)?,
        get(A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM)?,
        get(A::CUBLASLT_ALGO_CONFIG_STAGES_ID)?,
        chosen.wavesCount,
        chosen.workspaceSize,
    );
    Ok(())
}

/// One 32-bit configuration attribute of an algorithm (ID, TILE_ID, SPLITK_NUM, STAGES_ID).
fn algo_config(
    algo: &sys::cublasLtMatmulAlgo_t,
    attr: sys::cublasLtMatmulAlgoConfigAttributes_t,
) -> candle_core::Result<u32> {
    let mut value = 0u32;
    let mut written = 0usize;
    // SAFETY: `algo` is a live algorithm; cuBLASLt writes at most `size_of::<u32>()` bytes into
    // `value` (it rejects an attribute of another size) and the size into `written`.
    let status = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            attr,
            &mut value as *mut u32 as *mut c_void,
            size_of::<u32>(),
            &mut written,
        )
    };
    status
        .result()
        .map_err(|e| lt_error(e, format_args!("reading cuBLASLt's {attr:?}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: sys::cublasStatus_t) -> result::CublasError {
        result::CublasError(s)
    }

    /// Host-only: the driver's own out-of-memory error is checked in tests/gpu.rs (formatting it
    /// needs the CUDA driver).
    #[test]
    fn cublaslt_alloc_failure_is_out_of_memory_by_type() {
        let oom = lt_error(
            status(sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED),
            "a GEMM",
        );
        assert!(crate::Error::from(oom.context("layer 3")).is_out_of_memory());
        let other = lt_error(
            status(sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE),
            "a GEMM",
        );
        let other = crate::Error::from(other);
        assert!(!other.is_out_of_memory());
        assert!(matches!(other, crate::Error::Device(_)));
    }
}
