//! LayerNorm in one kernel: one warp per row, the row held in registers (rows up to
//! [`super::MAX_LAYER_NORM_WIDTH`]), f32 statistics, one rounding on store.

use super::*;

/// LayerNorm over the last dimension, one warp per row.
pub(super) struct LayerNormOp<'a> {
    pub(super) w: &'a Tensor,
    pub(super) b: &'a Tensor,
    pub(super) eps: f32,
}

/// One warp per row, eight rows per block of 256 threads: the LayerNorm kernels' launch.
pub(super) fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The LayerNorm variant for rows of `cols` (a multiple of 8, at most
/// [`MAX_LAYER_NORM_WIDTH`]): the fewest registers that hold the row.
pub(super) fn vectors_for(cols: usize) -> usize {
    LAYER_NORM_VECTORS
        .into_iter()
        .find(|v| cols <= 32 * 8 * v)
        .expect("checked against the widest")
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
        let vectors = vectors_for(cols);
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
        let cfg = warp_per_row(rows);
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
