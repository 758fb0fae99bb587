//! Mean pooling of a pack on the device: one kernel averages each sequence's residue rows
//! (starts and counts checked on the host before they are uploaded).

use super::*;

/// Means of row ranges of a `[rows, H]` tensor. Built only by [`segment_mean`], after it checked
/// the ranges against `rows` on the host.
pub(super) struct SegmentMeanOp {
    pub(super) rows: usize,
    pub(super) segments: usize,
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
