//! ESM-2 with one forward: packed, variable length, no padding.
//!
//! Lin et al., "Evolutionary-scale prediction of atomic-level protein structure with a language
//! model", Science 2023. Reference implementation: HF transformers `models/esm/modeling_esm.py`
//! (`EsmModel`), which this module matches on the same weights; the original is
//! facebookresearch/esm `esm/model/esm2.py`.
//!
//! ```text
//!   ids [T] ──embed──> ×token-dropout scale (per sequence) ──> x [T, H]      repr 0
//!   for each block:  x += out(attn(rope(q·d^-½), rope(k), v))  on LN(x)       pre-LN
//!                    x += fc2(gelu(fc1(LN(x))))                                 repr k
//!   last block only: LN_after(x)                                                repr N
//! ```
//! `T` is the total token count of the pack; attention never crosses sequence boundaries.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::attention::{self, PackLayout};
use super::config::EsmConfig;
use super::trunk;
use crate::error::Result;
use crate::pack::PackedBatch;

mod load;

pub(crate) use load::computed_inv_freq;

use super::fp8::Fp8Scales;
use super::head::LmHead;

/// Token-dropout rate seen in training: 15 % of tokens masked, 80 % of those replaced by `<mask>`
/// (HF `EsmEmbeddings.forward`: `mask_ratio_train = 0.15 * 0.8`).
const MASK_RATIO_TRAIN: f64 = 0.15 * 0.8;

/// One pre-LN transformer block.
#[derive(Clone)]
struct Block {
    attn_norm: LayerNorm,
    /// Query, key and value projections fused into one `[3H, H]` matmul, the query's rows
    /// pre-scaled by `d^-½`; the attention reads its output as three strided views.
    qkv: Linear,
    out: Linear,
    ffn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// With `--dtype fp8`: the scales of the four projections, whose weights are then e4m3.
    fp8: Option<Fp8Scales>,
}

/// An ESM-2 model on one device, in one dtype.
#[derive(Clone)]
pub struct Esm2 {
    config: EsmConfig,
    word_embeddings: Tensor,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    /// Rotary `inv_freq` (f32, `[head_dim / 2]`): one for every layer, as in transformers.
    inv_freq: Tensor,
    /// The masked-LM head, when scores were asked for ([`Esm2::load_with_head`]).
    head: Option<LmHead>,
    device: Device,
    /// The activations' dtype (bf16 for FP8).
    dtype: DType,
}

impl Esm2 {
    /// The same model on another device: every weight copied, so replicas on several GPUs give
    /// bitwise-identical results (random weights included, whatever the device's generator).
    pub fn replicate(&self, device: &Device) -> Result<Self> {
        prepare_device(device)?;
        if self.blocks.iter().any(|b| b.fp8.is_some()) {
            let (h, ffn) = (self.config.hidden_size, self.config.intermediate_size);
            super::fp8::check(device, h, ffn)?;
        }
        let to = trunk::Replicator {
            device,
            eps: self.config.layer_norm_eps,
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    attn_norm: to.norm(&b.attn_norm)?,
                    qkv: to.linear(&b.qkv)?,
                    out: to.linear(&b.out)?,
                    ffn_norm: to.norm(&b.ffn_norm)?,
                    fc1: to.linear(&b.fc1)?,
                    fc2: to.linear(&b.fc2)?,
                    fp8: b.fp8.as_ref().map(|s| to.scales(s)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let word_embeddings = to.tensor(&self.word_embeddings)?;
        let tied = self.config.tie_word_embeddings;
        let head = match &self.head {
            Some(h) => Some(h.replicate(device, &word_embeddings, tied)?),
            None => None,
        };
        Ok(Self {
            config: self.config.clone(),
            word_embeddings,
            blocks,
            final_norm: to.norm(&self.final_norm)?,
            inv_freq: to.tensor(&self.inv_freq)?,
            head,
            device: device.clone(),
            dtype: self.dtype,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &EsmConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype: `F8E4M3` when blocks run FP8 GEMMs (their activations are bf16).
    pub fn dtype(&self) -> DType {
        match self.blocks.iter().any(|b| b.fp8.is_some()) {
            true => DType::F8E4M3,
            false => self.dtype,
        }
    }

    /// The same model with the blocks [`super::fp8::quantized_blocks`] picks on e4m3 GEMMs
    /// (a bf16 model on a GPU that takes FP8, which [`super::fp8::check`] confirmed; see
    /// [`super::fp8`]).
    pub(super) fn quantize_fp8(mut self) -> Result<Self> {
        if self.dtype != DType::BF16 || !self.fused() {
            return Err(crate::Error::internal(
                "FP8 quantization of a model not in fused bf16",
            ));
        }
        super::fp8::quantize_each(self.blocks.iter_mut().map(|b| {
            let linears = [&mut b.qkv, &mut b.out, &mut b.fc1, &mut b.fc2];
            (linears, &mut b.fp8)
        }))?;
        Ok(self)
    }

    /// Resolve fair-esm layer numbers (0 = embeddings, N = last and normalized, negatives count
    /// from the end: -1 = N) to `0..=N`.
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        self.config.resolve_layer(layer)
    }

    /// Run the packed forward and return the representation `[T, H]` of each requested layer
    /// (resolved numbers, see [`Esm2::resolve_layer`]), in the order asked. Blocks after the
    /// deepest requested layer are skipped.
    pub fn forward(&self, batch: &PackedBatch, layers: &[usize]) -> Result<Vec<Tensor>> {
        let n = self.config.num_hidden_layers;
        trunk::check_request(n, batch, layers)?;
        let layout = PackLayout::new(batch, &self.device)?;
        let ids = Tensor::from_slice(&batch.ids, batch.total_tokens(), &self.device)?;
        let scale = self.embedding_scale(batch)?;
        let x = self
            .word_embeddings
            .embedding(&ids)?
            .broadcast_mul(&scale)?;
        // The fused kernel reads the f32 tables; candle's rope wants the compute dtype.
        let (mut cos, mut sin) = trunk::rotary_tables(batch, &self.inv_freq)?;
        if !self.fused() {
            (cos, sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        }
        trunk::run_blocks(
            x,
            n,
            layers,
            |i, x| self.block_forward(&self.blocks[i], x, &cos, &sin, &layout),
            |x| self.layer_norm(&self.final_norm, x),
        )
    }

    /// Whether this model runs on the fused CUDA kernels ([`trunk::fused_kernels_apply`]).
    fn fused(&self) -> bool {
        trunk::fused_kernels_apply(&self.config, &self.device, self.dtype)
    }

    fn layer_norm(&self, norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused() {
            let bias = norm.bias().expect("ESM-2 LayerNorms have a bias");
            return super::kernels::layer_norm(x, norm.weight(), bias, self.config.layer_norm_eps);
        }
        Ok(norm.forward(x)?)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: &PackLayout,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused() {
            return self.block_forward_fused(block, x, cos, sin, layout);
        }
        let (total, h) = x.dims2()?;
        let heads = self.config.num_attention_heads;
        let d = self.config.head_dim();

        let normed = block.attn_norm.forward(x)?;
        let qkv = linear(&block.qkv, &normed)?;
        // Rotate queries and keys together: [T, 2·heads, d], positions per token.
        let qk = rope(
            &qkv.narrow(1, 0, 2 * h)?.reshape((total, 2 * heads, d))?,
            cos,
            sin,
        )?;
        let q = qk.narrow(1, 0, heads)?;
        let k = qk.narrow(1, heads, heads)?;
        let v = qkv.narrow(1, 2 * h, h)?.reshape((total, heads, d))?;
        let context = attention::attend(&q, &k, &v, layout)?.reshape((total, h))?;
        let x = (x + linear(&block.out, &context)?)?;
        let normed = block.ffn_norm.forward(&x)?;
        let act = linear(&block.fc1, &normed)?.gelu_erf()?;
        Ok((x + linear(&block.fc2, &act)?)?)
    }

    /// The block on the fused CUDA kernels (see [`super::kernels`]); `cos`/`sin` are f32. The
    /// projections a quantized block (`--dtype fp8`) has scales for run on e4m3 GEMMs, whose
    /// inputs the LayerNorms and the GELU write in e4m3 (see [`super::fp8`]).
    #[cfg(feature = "cuda")]
    fn block_forward_fused(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: &PackLayout,
    ) -> Result<Tensor> {
        use super::fp8;
        use super::kernels;
        use super::profile::time;
        let heads = self.config.num_attention_heads;
        let d = self.config.head_dim();
        let (dev, eps) = (&self.device, self.config.layer_norm_eps);
        let [s_qkv, s_out, s_fc1, s_fc2] = fp8::scales_of(&block.fp8);

        let qkv = match s_qkv {
            Some(s) => {
                let normed = time(dev, "attn_layernorm", || {
                    fp8::layer_norm(&block.attn_norm, x, eps)
                })?;
                time(dev, "qkv_rotary", || {
                    let (w, b) = (fp8::weights(&block.qkv, s), fp8::bias(&block.qkv)?);
                    kernels::linear_fp8_rotary(&normed, &w, b, (cos, sin), 2 * heads, d / 2)
                })?
            }
            None => {
                let normed = time(dev, "attn_layernorm", || {
                    self.layer_norm(&block.attn_norm, x)
                })?;
                time(dev, "qkv_rotary", || {
                    kernels::linear_rotary(&normed, &block.qkv, (cos, sin), 2 * heads, d / 2)
                })?
            }
        };
        let context = time(dev, "attention", || {
            attention::attend_fused_qkv(&qkv, heads, d, layout)
        })?;
        let x = time(dev, "out_proj_residual", || {
            fp8::out_projection(&context, &block.out, s_out, x)
        })?;
        match (s_fc1, s_fc2) {
            (Some(s1), Some(s2)) => {
                let normed = time(dev, "ffn_layernorm", || {
                    fp8::layer_norm(&block.ffn_norm, &x, eps)
                })?;
                let act = time(dev, "fc1_gelu", || {
                    kernels::gelu_fp8(&fp8::linear(&normed, &block.fc1, s1, None)?)
                })?;
                time(dev, "fc2_residual", || {
                    fp8::linear(&act, &block.fc2, s2, Some(&x))
                })
            }
            _ => {
                let normed = time(dev, "ffn_layernorm", || {
                    self.layer_norm(&block.ffn_norm, &x)
                })?;
                let act = time(dev, "fc1_gelu", || {
                    kernels::linear_gelu(&normed, &block.fc1)
                })?;
                time(dev, "fc2_residual", || {
                    kernels::linear_residual(&act, &block.fc2, &x)
                })
            }
        }
    }

    /// The masked-LM head, if loaded.
    pub(crate) fn head(&self) -> Option<&LmHead> {
        self.head.as_ref()
    }

    /// Per-token factor `[T, 1]` of the embedding: 0 on `<mask>` rows, else
    /// `(1 - 0.12) / (1 - masks/tokens)` of the token's own sequence (counts include cls and eos).
    fn embedding_scale(&self, batch: &PackedBatch) -> Result<Tensor> {
        let mut scale = vec![1f32; batch.total_tokens()];
        if self.config.token_dropout {
            let mask = self.config.mask_token_id;
            for i in 0..batch.len() {
                let range = batch.range(i);
                let tokens = &batch.ids[range.clone()];
                let masks = tokens.iter().filter(|&&t| t == mask).count();
                let observed = masks as f64 / tokens.len() as f64;
                let factor = ((1.0 - MASK_RATIO_TRAIN) / (1.0 - observed)) as f32;
                for (s, &t) in scale[range].iter_mut().zip(tokens) {
                    *s = if t == mask { 0.0 } else { factor };
                }
            }
        }
        Ok(
            Tensor::from_vec(scale, (batch.total_tokens(), 1), &self.device)?
                .to_dtype(self.dtype)?,
        )
    }
}

/// Token indices of `batch` whose log-probabilities a scores request returns (see
/// [`crate::engine::LogProbsAt`]).
pub fn query_positions(batch: &PackedBatch, at: crate::engine::LogProbsAt, mask: u32) -> Vec<u32> {
    use crate::engine::LogProbsAt;
    let mut rows = Vec::new();
    for i in 0..batch.len() {
        let range = batch.range(i);
        match at {
            LogProbsAt::Masked => rows.extend(
                range
                    .clone()
                    .filter(|&t| batch.ids[t] == mask)
                    .map(|t| t as u32),
            ),
            LogProbsAt::Residues => rows.extend((range.start + 1..range.end - 1).map(|t| t as u32)),
        }
    }
    rows
}

/// Device settings the forward relies on (see [`super::flash::keep_freed_memory`]).
pub(super) fn prepare_device(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    super::flash::keep_freed_memory(device)?;
    let _ = device;
    Ok(())
}

/// Rotate-half (NeoX) rotary on the packed layout `[T, heads, d]`, positions restarting per
/// sequence (they are baked into `cos`/`sin`, `[T, d/2]`).
pub(super) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?.unsqueeze(0)?;
    Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
}

/// Fewest rows a CPU matmul runs with. The `gemm` crate takes other code paths for a handful of
/// rows (a GEMV for one, other micro-kernels up to 16 on narrow layers), which round differently:
/// a short sequence alone in a pack would not get the bits it gets among others. Padding such
/// packs to this many rows keeps every sequence's output bitwise the same in any pack, which
/// reusing the results of identical sequences relies on.
const MIN_CPU_ROWS: usize = 32;

/// `x · wᵀ + b`, with tiny CPU inputs padded to [`MIN_CPU_ROWS`] rows.
pub(super) fn linear(layer: &Linear, x: &Tensor) -> Result<Tensor> {
    row_padded(x, |x| Ok(layer.forward(x)?))
}

/// `f(x)` for a row-wise `f` (a matmul), tiny CPU inputs padded to [`MIN_CPU_ROWS`] rows.
pub(super) fn row_padded(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if !x.device().is_cpu() || rows >= MIN_CPU_ROWS {
        return f(x);
    }
    let padding = Tensor::zeros((MIN_CPU_ROWS - rows, x.dim(1)?), x.dtype(), x.device())?;
    let padded = Tensor::cat(&[x, &padding], 0)?;
    Ok(f(&padded)?.narrow(0, 0, rows)?)
}
