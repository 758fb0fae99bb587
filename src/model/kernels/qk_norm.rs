//! ESM C's query/key LayerNorms and rotary, in place on the QKV GEMM's output: two strided
//! LayerNorm launches (the Q and K columns of every row) and ESM-2's rotary kernel. Before, the
//! norms copied strided views, concatenated them and ran candle's rotary: 35 % of ESM C 600M's
//! GPU time (H200, `ESMBED_PROFILE`).

use super::layer_norm::{vectors_for, warp_per_row};
use super::linear::{rotary, Rotary};
use super::*;

/// LayerNorm of the first two `H`-wide column blocks of `[T, 3H]` rows (query, key), each with
/// its parameters, then rotary on their heads; the values are left as they are.
pub(super) struct QkNormRotary<'a> {
    pub(super) q: (&'a Tensor, &'a Tensor),
    pub(super) k: (&'a Tensor, &'a Tensor),
    pub(super) eps: f32,
    pub(super) rotary: Rotary<'a>,
}

impl QkNormRotary<'_> {
    fn typed<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        x: &mut CudaSlice<T>,
        l: &Layout,
    ) -> candle_core::Result<()> {
        let (rows, n) = l.shape().dims2()?;
        let h = n / 3;
        if l.start_offset() != 0 || !l.is_contiguous() || x.len() != elements(rows, n)? {
            candle_core::bail!("qk_norm: the QKV output must be a whole contiguous allocation");
        }
        if n != 3 * h || !h.is_multiple_of(8) || h > MAX_LAYER_NORM_WIDTH {
            candle_core::bail!("qk_norm: rows of {n}, not 3 × a multiple of 8");
        }
        let vectors = vectors_for(h);
        let func = dev.get_or_load_custom_func(
            &format!("{}_layer_norm_strided{vectors}", prefix(dtype)?),
            MODULE,
            ptx()?,
        )?;
        let (rows32, cols8, stride8) = (arg32(rows, "rows")?, (h / 8) as u32, (n / 8) as u32);
        for (block, (w, b)) in [(0, self.q), (1, self.k)] {
            let w_guard = w.storage_and_layout();
            let b_guard = b.storage_and_layout();
            for l in [w_guard.1, b_guard.1] {
                check_aligned::<T>(l, "qk_norm parameters")?;
                if l.shape().dims() != [h] {
                    candle_core::bail!("qk_norm: parameters {:?} for rows of {h}", l.shape());
                }
            }
            let w = view::<T>(cuda(&w_guard.0, dev)?, w_guard.1)?;
            let b = view::<T>(cuda(&b_guard.0, dev)?, b_guard.1)?;
            let mut columns = x.slice_mut(block * h..);
            let mut builder = func.builder();
            builder.arg(&mut columns);
            builder.arg(&w);
            builder.arg(&b);
            builder.arg(&rows32);
            builder.arg(&cols8);
            builder.arg(&stride8);
            builder.arg(&self.eps);
            let cfg = warp_per_row(rows);
            // SAFETY: (x, w, b, rows, h / 8, n / 8, eps): warp r < rows reads and then writes the
            // h / 8 16-byte vectors at r · n / 8 of `columns`, which starts `block · h` elements
            // into `x` (rows × n elements, a whole allocation: checked), so it touches elements
            // r · n + block · h + [0, h) < rows · n; h and n are multiples of 8, so every access
            // is 16-byte aligned; `w` and `b` are checked [h] views, aligned; all of `T`.
            unsafe { builder.launch(cfg) }.w()?;
        }
        let Rotary {
            cos,
            sin,
            heads2,
            half,
        } = self.rotary;
        rotary(
            dev,
            dtype,
            x,
            (rows, n),
            Rotary {
                cos,
                sin,
                heads2,
                half,
            },
        )
    }
}

impl InplaceOp1 for QkNormRotary<'_> {
    fn name(&self) -> &'static str {
        "esmbed-qk-norm-rotary"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("esmbed's fused kernels run on CUDA only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let dev = s.device().clone();
        let dtype = s.dtype();
        match &mut s.slice {
            CudaStorageSlice::BF16(x) => self.typed(&dev, dtype, x, l),
            CudaStorageSlice::F16(x) => self.typed(&dev, dtype, x, l),
            _ => candle_core::bail!("fused kernels take bf16/f16, not {dtype:?}"),
        }
    }
}
