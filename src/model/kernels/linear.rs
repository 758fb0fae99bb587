//! The GEMM-with-epilogue ops: the cuBLASLt GEMM of [`super::super::gemm`] with bias (and
//! residual) in its epilogue, then exact GELU or rotary in place on its output.

use super::*;

/// Rotary on the first `heads2` heads of `2 * half` (queries then keys), f32 `cos`/`sin` tables
/// `[T, half]`.
#[derive(Clone, Copy)]
pub(super) struct Rotary<'a> {
    pub(super) cos: &'a Tensor,
    pub(super) sin: &'a Tensor,
    pub(super) heads2: usize,
    pub(super) half: usize,
}

/// What runs on a Linear's output before anyone reads it.
#[derive(Clone, Copy)]
pub(super) enum Post<'a> {
    None,
    /// Exact GELU in place.
    Gelu,
    /// Rotary in place.
    Rotary(Rotary<'a>),
}

/// `post(x · wᵀ + b (+ residual))` on cuBLASLt plus at most one in-place kernel.
pub(super) struct LinearOp<'a> {
    pub(super) w: &'a Tensor,
    pub(super) b: &'a Tensor,
    pub(super) residual: Option<&'a Tensor>,
    pub(super) post: Post<'a>,
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
        let profiling = crate::model::profile::enabled() && !matches!(self.post, Post::None);
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
            crate::model::profile::record_part(part, started.elapsed().as_secs_f64());
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
pub(super) fn rotary<T: DeviceRepr>(
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
