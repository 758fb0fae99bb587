//! SwiGLU in one pass over ESM C's fused gate/up GEMM output: candle's `narrow`, `silu` and `mul`
//! made three passes with two strided copies, 54 % of ESM C 600M's GPU time before this kernel
//! (H200, `ESMBED_PROFILE`).

use super::*;

/// `silu(gate) * up` of `[T, 2I]` rows (gate columns first), `[T, I]`.
pub(super) struct SwigluOp;

impl Typed for SwigluOp {
    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: &CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<CudaSlice<T>> {
        let (rows, cols) = xl.shape().dims2()?;
        if !cols.is_multiple_of(16) {
            candle_core::bail!("swiglu: rows of {cols}, not twice a multiple of 8");
        }
        check_aligned::<T>(xl, "swiglu input")?;
        let ffn = cols / 2;
        let x = view::<T>(x, xl)?;
        let (rows64, ffn8) = (rows as u64, arg32(ffn / 8, "ffn / 8")?);
        // SAFETY: every element is written by the kernel before anything reads it.
        let mut out = unsafe { dev.alloc::<T>(elements(rows, ffn)?)? };
        let func =
            dev.get_or_load_custom_func(&format!("{}_swiglu8", prefix(dtype)?), MODULE, ptx()?)?;
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&mut out);
        builder.arg(&rows64);
        builder.arg(&ffn8);
        // SAFETY: (gate_up, out, rows, ffn / 8): thread i < rows · ffn / 8 reads 16-byte vector
        // i % (ffn / 8) of row i / (ffn / 8) of both halves of `x` (a checked contiguous
        // [rows, 2 · ffn] view, 16-byte aligned) and writes vector i of `out` (rows × ffn
        // elements, a whole allocation); both are of the kernel's dtype.
        unsafe { builder.launch(grid(rows * ffn / 8)) }.w()?;
        Ok(out)
    }
}

impl CustomOp1 for SwigluOp {
    fn name(&self) -> &'static str {
        "esmbed-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = xl.shape().dims2()?;
        run_typed(self, x, xl, Shape::from((rows, cols / 2)))
    }
}
