//! Pooling a packed layer output `[T, H]` into per-sequence vectors, for the whole pack at once.
//!
//! Mean pooling averages the residues only (tokens `1..=L`), leaving out `<cls>` and `<eos>`, as
//! fair-esm's `extract.py` does. It is one `index_add` that routes every residue row to its
//! sequence and every special token to a discarded extra row, in f32 whatever the compute dtype.
//! Only the pooled results (and per-residue rows when asked for) leave the device.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::pack::PackedBatch;

/// Which outputs to compute for each requested layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// Mean over residues (the usual per-protein embedding).
    pub mean: bool,
    /// The `<cls>` (BOS) vector. The ESM authors discourage it: it had no training signal.
    pub bos: bool,
    /// Every residue's vector (large: L × H floats per sequence).
    pub per_residue: bool,
}

impl Default for Pooling {
    fn default() -> Self {
        Self {
            mean: true,
            bos: false,
            per_residue: false,
        }
    }
}

/// Pooled outputs of one layer for a pack, on the host, f32, row-major, sequences in pack order.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledLayer {
    /// The layer (fair-esm numbering, resolved).
    pub layer: usize,
    /// Width H of every vector.
    pub hidden: usize,
    /// `[B, H]` mean over residues.
    pub mean: Option<Vec<f32>>,
    /// `[B, H]` BOS vectors.
    pub bos: Option<Vec<f32>>,
    /// `[R, H]` residue vectors, R = total residues of the pack, sequences back to back.
    pub residues: Option<Vec<f32>>,
    /// `[Q, V]` log-probabilities over the vocabulary at the queried positions (a scores
    /// request, [`crate::engine::Request::LogProbs`]), sequences back to back.
    pub log_probs: Option<Vec<f32>>,
}

/// Pool one layer's packed output `hidden` (`[T, H]`) of `batch`.
pub fn pool(
    hidden: &Tensor,
    batch: &PackedBatch,
    layer: usize,
    pooling: Pooling,
) -> Result<PooledLayer> {
    pool_selected(hidden, batch, layer, pooling, None)
}

/// [`pool`], with per-residue vectors only for the sequences `residues_of` marks (`None`: all).
/// A pack of masked copies (`embed --pll`) needs them for its originals only.
pub fn pool_selected(
    hidden: &Tensor,
    batch: &PackedBatch,
    layer: usize,
    pooling: Pooling,
    residues_of: Option<&[bool]>,
) -> Result<PooledLayer> {
    let device = hidden.device();
    let (_, h) = hidden.dims2()?;
    let b = batch.len();
    let counts = batch.residue_counts();

    #[cfg(feature = "cuda")]
    let fused_mean = if pooling.mean && crate::model::kernels::applies(hidden) {
        let starts: Vec<u32> = (0..b).map(|i| batch.range(i).start as u32 + 1).collect();
        let residues: Vec<u32> = counts.iter().map(|&c| c as u32).collect();
        Some(to_host(&crate::model::kernels::segment_mean(
            hidden, &starts, &residues,
        )?)?)
    } else {
        None
    };
    #[cfg(not(feature = "cuda"))]
    let fused_mean: Option<Vec<f32>> = None;
    // Everything else works on f32 rows (a cast only when something still needs them).
    let hidden = if fused_mean.is_none() || pooling.bos || pooling.per_residue {
        hidden.to_dtype(DType::F32)?
    } else {
        hidden.clone()
    };

    let mean = if fused_mean.is_some() {
        fused_mean
    } else if pooling.mean {
        // segment[t] = sequence index for residues, b (a spill row) for cls/eos.
        let mut segment = vec![b as u32; batch.total_tokens()];
        for (i, &count) in counts.iter().enumerate() {
            let start = batch.range(i).start + 1;
            segment[start..start + count].fill(i as u32);
        }
        let segment = Tensor::from_vec(segment, batch.total_tokens(), device)?;
        let sums = Tensor::zeros((b + 1, h), DType::F32, device)?
            .index_add(&segment, &hidden, 0)?
            .narrow(0, 0, b)?;
        let inverse: Vec<f32> = counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
        let inverse = Tensor::from_vec(inverse, (b, 1), device)?;
        Some(to_host(&sums.broadcast_mul(&inverse)?)?)
    } else {
        None
    };
    let bos = if pooling.bos {
        let starts = Tensor::from_slice(&batch.cu_seqlens[..b], b, device)?;
        Some(to_host(&hidden.index_select(&starts, 0)?)?)
    } else {
        None
    };
    let residues = if pooling.per_residue {
        let rows: Vec<u32> = (0..b)
            .filter(|&i| residues_of.is_none_or(|r| r[i]))
            .flat_map(|i| {
                let start = batch.range(i).start as u32 + 1;
                start..start + counts[i] as u32
            })
            .collect();
        let rows = Tensor::from_vec(rows.clone(), rows.len(), device)?;
        Some(to_host(&hidden.index_select(&rows, 0)?)?)
    } else {
        None
    };
    Ok(PooledLayer {
        layer,
        hidden: h,
        mean,
        bos,
        residues,
        log_probs: None,
    })
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pools_exclude_specials_and_follow_pack_order() -> Result<()> {
        // Two sequences: 3 residues, then 1 residue. H = 2. Row t holds (t, 10 t).
        let batch = PackedBatch::from_sequences([&[0u32, 4, 5, 6, 2][..], &[0, 7, 2]]);
        let rows: Vec<f32> = (0..8).flat_map(|t| [t as f32, 10.0 * t as f32]).collect();
        let hidden = Tensor::from_vec(rows, (8, 2), &Device::Cpu)?;
        let all = Pooling {
            mean: true,
            bos: true,
            per_residue: true,
        };
        let pooled = pool(&hidden, &batch, 3, all)?;
        assert_eq!(pooled.layer, 3);
        assert_eq!(pooled.mean.unwrap(), [2.0, 20.0, 6.0, 60.0]);
        assert_eq!(pooled.bos.unwrap(), [0.0, 0.0, 5.0, 50.0]);
        assert_eq!(
            pooled.residues.unwrap(),
            [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 6.0, 60.0]
        );
        let second = pool_selected(&hidden, &batch, 3, all, Some(&[false, true]))?;
        assert_eq!(second.residues.unwrap(), [6.0, 60.0]);
        assert_eq!(second.mean.unwrap().len(), 4);
        let mean_only = pool(&hidden, &batch, 3, Pooling::default())?;
        assert!(mean_only.bos.is_none() && mean_only.residues.is_none());
        Ok(())
    }
}
