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

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::DType;

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

/// A cuBLASLt handle, its workspace and the chosen algorithms, for one device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: Mutex<HashMap<Key, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: cuBLASLt handles may be used from any thread; each device's work goes to candle's one
// stream for that device, so the workspace is never used by two GEMMs at once.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    m: u64,
    n: u64,
    k: u64,
    residual: bool,
    align: [u32; 4],
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
    let handle = result::create_handle().map_err(candle_core::Error::wrap)?;
    // SAFETY: scratch memory, only ever written by cuBLASLt.
    let workspace = unsafe { dev.alloc::<u8>(workspace_bytes().max(1))? };
    let lt = Arc::new(Lt {
        handle,
        workspace,
        algos: Mutex::new(HashMap::new()),
    });
    handles.insert(dev.id(), lt.clone());
    Ok(lt)
}

/// A device pointer and its element offset, as the GEMM sees an operand.
pub struct Operand<'a, T> {
    pub slice: &'a CudaSlice<T>,
    pub offset: usize,
}

/// `out[T, N] = x[T, K] · w[N, K]ᵀ + bias[N] (+ residual[T, N])`, all contiguous row-major,
/// `T` = bf16 or f16 (`dtype`).
#[allow(clippy::too_many_arguments)]
pub fn linear<T>(
    dev: &CudaDevice,
    dtype: DType,
    x: Operand<'_, T>,
    w: Operand<'_, T>,
    bias: Operand<'_, T>,
    residual: Option<Operand<'_, T>>,
    out: &mut CudaSlice<T>,
    (tokens, n, k): (usize, usize, usize),
) -> candle_core::Result<()> {
    let data_type = match dtype {
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        other => candle_core::bail!("cuBLASLt path takes bf16/f16, not {other:?}"),
    };
    let stream = dev.cuda_stream();
    // This device's context current, for creating its handle and for the GEMM: cuBLASLt reads
    // the device's properties from the calling thread's context.
    stream
        .context()
        .bind_to_thread()
        .map_err(candle_core::Error::wrap)?;
    let lt = lt(dev)?;
    let (a_ptr, _a) = ptr(&w, &stream);
    let (b_ptr, _b) = ptr(&x, &stream);
    let (bias_ptr, _bias) = ptr(&bias, &stream);
    let residual = residual.as_ref().map(|r| ptr(r, &stream));
    let (d_ptr, _d) = out.device_ptr_mut(&stream);
    let c_ptr = residual.as_ref().map_or(d_ptr, |r| r.0);
    let align = |p: u64| (1u64 << p.trailing_zeros().min(8)) as u32;
    let (m, n_cols, kk) = (n as u64, tokens as u64, k as u64);
    let key = Key {
        dtype,
        m,
        n: n_cols,
        k: kk,
        residual: residual.is_some(),
        align: [align(a_ptr), align(b_ptr), align(c_ptr), align(d_ptr)],
    };

    // SAFETY: descriptors are created, used and destroyed here; every pointer is a live device
    // allocation of the sizes the layouts describe (checked by the callers' shapes).
    unsafe {
        let a_layout = Layout::new(data_type, kk, m, kk as i64)?;
        let b_layout = Layout::new(data_type, kk, n_cols, kk as i64)?;
        let d_layout = Layout::new(data_type, m, n_cols, m as i64)?;
        let desc = Desc::new()?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &1i32, // CUBLAS_OP_T: W is [N, K] row-major
        )?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &0i32, // CUBLAS_OP_N
        )?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &(sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32),
        )?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias_ptr,
        )?;

        let cached = lt.algos.lock().expect("algorithm cache").get(&key).copied();
        let algo = match cached {
            Some(algo) => algo,
            None => {
                let pref = Pref::new()?;
                pref.set(
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &(workspace_bytes() as u64),
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
                    pref.set(attr, &a)?;
                }
                let mut found = [std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>(); 8];
                let mut count = 0i32;
                let status = sys::cublasLtMatmulAlgoGetHeuristic(
                    lt.handle,
                    desc.0,
                    a_layout.0,
                    b_layout.0,
                    d_layout.0,
                    d_layout.0,
                    pref.0,
                    found.len() as i32,
                    found.as_mut_ptr(),
                    &mut count,
                );
                if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || count < 1 {
                    candle_core::bail!(
                        "cuBLASLt has no algorithm for a {m}x{n_cols}x{kk} {dtype:?} GEMM: {status:?}"
                    );
                }
                let pick = knob("ESMBED_LT_ALGO").unwrap_or(0).min(count as usize - 1);
                let heuristic = found[pick];
                if super::profile::enabled() {
                    let get = |attr| {
                        let mut v = 0u32;
                        let mut written = 0usize;
                        sys::cublasLtMatmulAlgoConfigGetAttribute(
                            &heuristic.algo,
                            attr,
                            &mut v as *mut u32 as *mut c_void,
                            size_of::<u32>(),
                            &mut written,
                        );
                        v
                    };
                    use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
                    eprintln!(
                        "gemm m={m} n={n_cols} k={kk} residual={} pick={pick}/{count} id={} tile={} splitk={} stages={} waves={:.2} ws={}",
                        residual.is_some(),
                        get(A::CUBLASLT_ALGO_CONFIG_ID),
                        get(A::CUBLASLT_ALGO_CONFIG_TILE_ID),
                        get(A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                        get(A::CUBLASLT_ALGO_CONFIG_STAGES_ID),
                        heuristic.wavesCount,
                        heuristic.workspaceSize,
                    );
                }
                let mut algos = lt.algos.lock().expect("algorithm cache");
                if algos.len() >= MAX_CACHED_ALGOS {
                    algos.clear();
                }
                algos.insert(key, heuristic.algo);
                heuristic.algo
            }
        };

        let alpha = 1f32;
        let beta = if residual.is_some() { 1f32 } else { 0f32 };
        let (ws_ptr, _ws) = lt.workspace.device_ptr(&stream);
        result::matmul(
            lt.handle,
            desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            a_ptr as *const c_void,
            a_layout.0,
            b_ptr as *const c_void,
            b_layout.0,
            c_ptr as *const c_void,
            d_layout.0,
            d_ptr as *mut c_void,
            d_layout.0,
            &algo,
            ws_ptr as *mut c_void,
            workspace_bytes(),
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(|e| {
            // Spelled so that the pipeline's out-of-memory handling (split the pack and retry)
            // recognizes it.
            let oom = if e.0 == sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
                " (out of memory)"
            } else {
                ""
            };
            candle_core::Error::Msg(format!(
                "cuBLASLt GEMM {m}x{n_cols}x{kk} {dtype:?} failed: {e:?}{oom}"
            ))
        })?;
    }
    Ok(())
}

/// The device address of an operand's first element (2-byte elements), and the guard that
/// orders this use after earlier writes.
fn ptr<'a, T>(o: &Operand<'a, T>, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
    let (p, guard) = o.slice.device_ptr(stream);
    (p + o.offset as u64 * 2, guard)
}

/// Owned cuBLASLt descriptors, destroyed on drop.
struct Layout(sys::cublasLtMatrixLayout_t);
struct Desc(sys::cublasLtMatmulDesc_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Layout {
    fn new(t: sys::cudaDataType, rows: u64, cols: u64, ld: i64) -> candle_core::Result<Self> {
        result::create_matrix_layout(t, rows, cols, ld)
            .map(Self)
            .map_err(candle_core::Error::wrap)
    }
}

impl Desc {
    fn new() -> candle_core::Result<Self> {
        result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map(Self)
        .map_err(candle_core::Error::wrap)
    }

    /// # Safety
    /// `value` must have the type cuBLASLt documents for `attr`.
    unsafe fn set<V>(
        &self,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: &V,
    ) -> candle_core::Result<()> {
        result::set_matmul_desc_attribute(
            self.0,
            attr,
            value as *const V as *const c_void,
            size_of::<V>(),
        )
        .map_err(candle_core::Error::wrap)
    }
}

impl Pref {
    fn new() -> candle_core::Result<Self> {
        result::create_matmul_pref()
            .map(Self)
            .map_err(candle_core::Error::wrap)
    }

    /// # Safety
    /// `value` must have the type cuBLASLt documents for `attr`.
    unsafe fn set<V>(
        &self,
        attr: sys::cublasLtMatmulPreferenceAttributes_t,
        value: &V,
    ) -> candle_core::Result<()> {
        result::set_matmul_pref_attribute(
            self.0,
            attr,
            value as *const V as *const c_void,
            size_of::<V>(),
        )
        .map_err(candle_core::Error::wrap)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `Layout::new`, destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `Desc::new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `Pref::new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}
