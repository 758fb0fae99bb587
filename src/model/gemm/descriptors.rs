//! Owned cuBLASLt descriptors (matrix layouts, the matmul descriptor, the heuristic
//! preference), destroyed on drop, with typed attribute setters.

use super::*;

/// The values a descriptor or preference attribute may take here: plain integers without
/// padding, whose every byte cuBLASLt may read.
pub(super) trait Attribute: Copy {}
impl Attribute for i8 {}
impl Attribute for i32 {}
impl Attribute for u32 {}
impl Attribute for u64 {}

/// Owned cuBLASLt descriptors, destroyed on drop.
pub(super) struct Layout(pub(super) sys::cublasLtMatrixLayout_t);
pub(super) struct Desc(pub(super) sys::cublasLtMatmulDesc_t);
pub(super) struct Pref(pub(super) sys::cublasLtMatmulPreference_t);

/// The column-major layouts of `A` (`W`, `k × m`, transposed by the descriptor), `B` (`X`,
/// `k × n`) and `C`/`D` (`m × n`).
pub(super) struct Layouts {
    pub(super) a: Layout,
    pub(super) b: Layout,
    pub(super) d: Layout,
}

impl Layouts {
    pub(super) fn new(t: sys::cudaDataType, p: Problem) -> candle_core::Result<Self> {
        Self::mixed(t, t, p)
    }

    /// Inputs `A`, `B` of type `ab`, `C`/`D` of type `d` (FP8 inputs, bf16 output).
    pub(super) fn mixed(
        ab: sys::cudaDataType,
        d: sys::cudaDataType,
        p: Problem,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            a: Layout::new(ab, p.k, p.m)?,
            b: Layout::new(ab, p.k, p.n)?,
            d: Layout::new(d, p.m, p.n)?,
        })
    }
}

impl Layout {
    /// A dense column-major `rows × cols` matrix (leading dimension `rows`).
    pub(super) fn new(t: sys::cudaDataType, rows: u64, cols: u64) -> candle_core::Result<Self> {
        let ld = i64::try_from(rows).map_err(candle_core::Error::wrap)?;
        result::create_matrix_layout(t, rows, cols, ld)
            .map(Self)
            .map_err(|e| lt_error(e, "creating a cuBLASLt matrix layout"))
    }
}

impl Desc {
    /// `D = op(A) · B + bias (+ C)` with A transposed, in f32, the bias at `bias` (device).
    pub(super) fn new(bias: u64) -> candle_core::Result<Self> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map(Self)
        .map_err(|e| lt_error(e, "creating a cuBLASLt matmul descriptor"))?;
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSA, 1i32)?; // CUBLAS_OP_T: W is [N, K] row-major
        desc.set(A::CUBLASLT_MATMUL_DESC_TRANSB, 0i32)?; // CUBLAS_OP_N
        let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
        desc.set(A::CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue)?;
        desc.set(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias)?;
        Ok(desc)
    }

    /// FP8 inputs with one f32 scale per row of `A` (the weight's output channels) and per
    /// column of `B` (the tokens) at the device addresses `a_scale`, `b_scale`, a bf16 bias, and
    /// cuBLASLt's fast accumulation when `fast` (`ESMBED_FP8_FAST_ACCUM`).
    pub(super) fn scaled(&self, a_scale: u64, b_scale: u64, fast: bool) -> candle_core::Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        self.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, outer as u32)?;
        self.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, outer as u32)?;
        self.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale)?;
        self.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale)?;
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF as u32;
        self.set(A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, bf16)?;
        self.set(A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast as i8)
    }

    pub(super) fn set<V: Attribute>(
        &self,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: V,
    ) -> candle_core::Result<()> {
        // SAFETY: a live descriptor; cuBLASLt copies `size_of::<V>()` bytes from `value`, a live
        // padding-free integer, and rejects a size that is not the attribute's. The bias pointer
        // is only stored here; `linear` vouches for it when the GEMM runs.
        unsafe {
            result::set_matmul_desc_attribute(
                self.0,
                attr,
                &value as *const V as *const c_void,
                size_of::<V>(),
            )
        }
        .map_err(|e| lt_error(e, format_args!("setting cuBLASLt's {attr:?}")))
    }
}

impl Pref {
    pub(super) fn new() -> candle_core::Result<Self> {
        result::create_matmul_pref()
            .map(Self)
            .map_err(|e| lt_error(e, "creating a cuBLASLt matmul preference"))
    }

    pub(super) fn set<V: Attribute>(
        &self,
        attr: sys::cublasLtMatmulPreferenceAttributes_t,
        value: V,
    ) -> candle_core::Result<()> {
        // SAFETY: a live preference; cuBLASLt copies `size_of::<V>()` bytes from `value`, a live
        // padding-free integer, and rejects a size that is not the attribute's.
        unsafe {
            result::set_matmul_pref_attribute(
                self.0,
                attr,
                &value as *const V as *const c_void,
                size_of::<V>(),
            )
        }
        .map_err(|e| lt_error(e, format_args!("setting cuBLASLt's {attr:?}")))
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `Layout::new`, destroyed once. A failure leaks a descriptor and is
        // not worth a panic in drop.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `Desc::new`, destroyed once (a failure only leaks it).
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `Pref::new`, destroyed once (a failure only leaks it).
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}
