//! ESM C with one forward: packed, variable length, no padding.
//!
//! Biohub's ESM Cambrian (2024; MIT licence since 2026). Reference implementation: HF
//! transformers `models/esmc/modeling_esmc.py` (`EsmcModel`), which this module matches on the
//! same weights.
//!
//! ```text
//!   ids [T] ──embed──> x [T, H]                                                     repr 0
//!   for each block:  q, k, v = split(LN(x) · Wqkv);  q = LN_q(q), k = LN_k(k)   (over all of H)
//!                    x += out(attn(rope(q)·d^-½, rope(k), v)) / s                      pre-LN
//!                    x += down(silu(gate(LN(x))) ⊙ up(LN(x))) / s                       repr k
//!   last block only: LN_final(x) (no bias)                                              repr N
//! ```
//! with `s = √(N / 36)`. No biases in attention or MLP, no token-dropout rescale (a `<mask>` is
//! embedded as it is). Folded at load, as for ESM-2's query scale: `d^-½` into `LN_q`'s weight
//! (no bias, so exact; `d` = 64 in every released size, a power of two), `1/s` into the output and
//! down projections (no biases), gate and up into one `[2I, H]` matmul. LayerNorms without a bias
//! get a zero one, which adds nothing; on the fused CUDA path (bf16/f16, opt-in for now: see
//! `fused`) the linear layers get zero biases too, so that ESM-2's fused kernels apply
//! (LayerNorm, and cuBLASLt GEMMs with the residual in their epilogue). Positions restart at 0 for every packed sequence, as they do
//! for one sequence alone in transformers; a chain break `|` is a token like any other (full
//! attention across it, positions running on), as transformers runs it without `sequence_id`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::attention::{self, PackLayout};
use super::config::EsmConfig;
use super::esm2::{linear, prepare_device, rope};
use super::fp8::Fp8Scales;
use super::head::LmHead;
use super::trunk;
use super::weights::Checkpoint;
use crate::error::{Error, Result};
use crate::pack::PackedBatch;

/// One pre-LN block.
#[derive(Clone)]
struct Block {
    attn_norm: LayerNorm,
    /// `[3H, H]`: query, key, value.
    qkv: Linear,
    /// Over the query's full width, its weight times `d^-½`.
    q_norm: LayerNorm,
    k_norm: LayerNorm,
    /// Its weight divided by the residual scale.
    out: Linear,
    ffn_norm: LayerNorm,
    /// `[2I, H]`: gate rows, then up rows.
    gate_up: Linear,
    /// Its weight divided by the residual scale.
    down: Linear,
    /// With `--dtype fp8`: the scales of qkv, out, gate_up and down, whose weights are then e4m3.
    fp8: Option<Fp8Scales>,
}

/// An ESM C model on one device, in one dtype.
#[derive(Clone)]
pub struct Esmc {
    config: EsmConfig,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    inv_freq: Tensor,
    head: Option<LmHead>,
    device: Device,
    dtype: DType,
    /// Whether the blocks run on the fused CUDA kernels (see [`fused`]).
    fused: bool,
}

impl Esmc {
    /// Build the model from a checkpoint, converting weights to `dtype` on `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        prepare_device(device)?;
        let config = checkpoint.config.clone();
        let (h, ffn) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let host =
            |name: &str, shape: &[usize]| checkpoint.load(name, shape, DType::F32, &Device::Cpu);
        let to_device = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        let norm = |name: &str, bias: bool, scale: f64| -> Result<LayerNorm> {
            let weight = (host(&format!("{name}.weight"), &[h])? * scale)?;
            let bias = match bias {
                true => host(&format!("{name}.bias"), &[h])?,
                false => Tensor::zeros(h, DType::F32, &Device::Cpu)?,
            };
            Ok(LayerNorm::new(to_device(weight)?, to_device(bias)?, eps))
        };
        let fused = fused(&config, device, dtype);
        let weight = |names: &[String], rows: usize, cols: usize, scale: f64| -> Result<Linear> {
            let parts = names
                .iter()
                .map(|n| host(n, &[rows, cols]))
                .collect::<Result<Vec<_>>>()?;
            unbiased(to_device((Tensor::cat(&parts, 0)? * scale)?)?, fused)
        };
        let residual = 1.0 / residual_scale(&config);
        let query = (config.head_dim() as f64).powf(-0.5);
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        // One projection where the checkpoint fuses them (the `esm` package's), else the parts,
        // each `rows` long.
        let parts =
            |fused: String, parts: Vec<String>, rows: usize| match checkpoint.contains(&fused) {
                true => (vec![fused], parts.len() * rows),
                false => (parts, rows),
            };
        for i in 0..config.num_hidden_layers {
            let p = format!("layers.{i}");
            let attn = |n: &str| format!("{p}.self_attn.{n}.weight");
            let mlp = |n: &str| format!("{p}.mlp.{n}.weight");
            let qkv_parts = vec![attn("q_proj"), attn("k_proj"), attn("v_proj")];
            let (qkv, qkv_rows) = parts(super::esm_package::qkv_proj(i), qkv_parts, h);
            let gate_up_parts = vec![mlp("gate_proj"), mlp("up_proj")];
            let (gate_up, gate_up_rows) =
                parts(super::esm_package::gate_up_proj(i), gate_up_parts, ffn);
            blocks.push(Block {
                attn_norm: norm(&format!("{p}.input_layernorm"), true, 1.0)?,
                qkv: weight(&qkv, qkv_rows, h, 1.0)?,
                q_norm: norm(&format!("{p}.self_attn.q_norm"), false, query)?,
                k_norm: norm(&format!("{p}.self_attn.k_norm"), false, 1.0)?,
                out: weight(&[attn("o_proj")], h, h, residual)?,
                ffn_norm: norm(&format!("{p}.post_attention_layernorm"), true, 1.0)?,
                gate_up: weight(&gate_up, gate_up_rows, h, 1.0)?,
                down: weight(&[mlp("down_proj")], h, ffn, residual)?,
                fp8: None,
            });
        }
        Ok(Self {
            embed_tokens: to_device(host("embed_tokens.weight", &[config.vocab_size, h])?)?,
            blocks,
            final_norm: norm("norm", false, 1.0)?,
            inv_freq: Tensor::from_vec(
                super::esm2::computed_inv_freq(&config),
                config.head_dim() / 2,
                device,
            )?,
            head: None,
            device: device.clone(),
            dtype,
            fused,
            config,
        })
    }

    /// [`Esmc::load`] with the masked-LM head, for scores.
    pub fn load_with_head(checkpoint: &Checkpoint, device: &Device, dtype: DType) -> Result<Self> {
        let mut model = Self::load(checkpoint, device, dtype)?;
        model.head = Some(LmHead::load(
            checkpoint,
            &model.embed_tokens,
            dtype,
            device,
        )?);
        Ok(model)
    }

    /// A model of the given shape with random weights, for benchmarks. Deterministic in `seed`
    /// on GPUs.
    pub fn random(config: &EsmConfig, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        config.validate().map_err(|r| Error::model("random", r))?;
        prepare_device(device)?;
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        let (h, ffn) = (config.hidden_size, config.intermediate_size);
        let eps = config.layer_norm_eps;
        let randn = |shape: &[usize], std: f64| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
        };
        let fused = fused(config, device, dtype);
        let linear = |out: usize, inp: usize| unbiased(randn(&[out, inp], 0.02)?, fused);
        let norm = || -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                Tensor::ones(h, dtype, device)?,
                Tensor::zeros(h, dtype, device)?,
                eps,
            ))
        };
        let blocks = (0..config.num_hidden_layers)
            .map(|_| {
                Ok(Block {
                    attn_norm: norm()?,
                    qkv: linear(3 * h, h)?,
                    q_norm: norm()?,
                    k_norm: norm()?,
                    out: linear(h, h)?,
                    ffn_norm: norm()?,
                    gate_up: linear(2 * ffn, h)?,
                    down: linear(h, ffn)?,
                    fp8: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = randn(&[config.vocab_size, h], 1.0)?;
        let head = LmHead::random(&embed_tokens, eps)?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            blocks,
            final_norm: norm()?,
            inv_freq: Tensor::from_vec(
                super::esm2::computed_inv_freq(config),
                config.head_dim() / 2,
                device,
            )?,
            head: Some(head),
            device: device.clone(),
            dtype,
            fused,
        })
    }

    /// The same model on another device, every weight copied (through the host).
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
                    q_norm: to.norm(&b.q_norm)?,
                    k_norm: to.norm(&b.k_norm)?,
                    out: to.linear(&b.out)?,
                    ffn_norm: to.norm(&b.ffn_norm)?,
                    gate_up: to.linear(&b.gate_up)?,
                    down: to.linear(&b.down)?,
                    fp8: b.fp8.as_ref().map(|s| to.scales(s)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = to.tensor(&self.embed_tokens)?;
        let head = match &self.head {
            Some(h) => Some(h.replicate(device, &embed_tokens, false)?),
            None => None,
        };
        Ok(Self {
            config: self.config.clone(),
            embed_tokens,
            blocks,
            final_norm: to.norm(&self.final_norm)?,
            inv_freq: to.tensor(&self.inv_freq)?,
            head,
            device: device.clone(),
            dtype: self.dtype,
            fused: self.fused && trunk::fused_kernels_apply(&self.config, device, self.dtype),
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

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        match self.blocks.iter().any(|b| b.fp8.is_some()) {
            true => DType::F8E4M3,
            false => self.dtype,
        }
    }

    /// The same model with the blocks [`super::fp8::quantized_blocks`] picks on e4m3 GEMMs
    /// (on a GPU that takes FP8, which [`super::fp8::check`] confirmed; see [`super::fp8`]).
    pub(super) fn quantize_fp8(mut self) -> Result<Self> {
        if self.dtype != DType::BF16 {
            return Err(Error::internal("FP8 quantization of a model not in bf16"));
        }
        if !self.fused {
            return Err(Error::InvalidOption(
                "--dtype fp8 runs on the fused CUDA kernels, which ESMBED_ESMC_FUSED=0 turns off: \
                 unset it"
                    .into(),
            ));
        }
        super::fp8::quantize_each(self.blocks.iter_mut().map(|b| {
            let linears = [&mut b.qkv, &mut b.out, &mut b.gate_up, &mut b.down];
            (linears, &mut b.fp8)
        }))?;
        Ok(self)
    }

    /// The masked-LM head, if loaded.
    pub(crate) fn head(&self) -> Option<&LmHead> {
        self.head.as_ref()
    }

    /// The packed forward: the representation `[T, H]` of each requested layer (resolved
    /// numbers, 0 = embeddings, N = after the final norm), in the order asked; blocks after the
    /// deepest requested layer are skipped.
    pub fn forward(&self, batch: &PackedBatch, layers: &[usize]) -> Result<Vec<Tensor>> {
        let n = self.config.num_hidden_layers;
        trunk::check_request(n, batch, layers)?;
        let layout = PackLayout::new(batch, &self.device)?;
        let ids = Tensor::from_slice(&batch.ids, batch.total_tokens(), &self.device)?;
        let x = self.embed_tokens.embedding(&ids)?;
        // cos/sin in f32, then the compute dtype, as transformers' EsmcRotaryEmbedding.
        let (cos, sin) = trunk::rotary_tables(batch, &self.inv_freq)?;
        let (mut cos, mut sin) = (cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?);
        if self.fused {
            // The fused rotary kernel reads f32 tables: the same rounded values.
            (cos, sin) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
        }
        trunk::run_blocks(
            x,
            n,
            layers,
            |i, x| self.block_forward(&self.blocks[i], x, &cos, &sin, &layout),
            |x| Ok(self.final_norm.forward(x)?),
        )
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
        if self.fused {
            return self.block_forward_fused(block, x, cos, sin, layout);
        }
        let (total, h) = x.dims2()?;
        let heads = self.config.num_attention_heads;
        let d = self.config.head_dim();
        let qkv = linear(&block.qkv, &block.attn_norm.forward(x)?)?;
        let q = block.q_norm.forward(&qkv.narrow(1, 0, h)?.contiguous()?)?;
        let k = block.k_norm.forward(&qkv.narrow(1, h, h)?.contiguous()?)?;
        let qk = Tensor::cat(&[q, k], 1)?.reshape((total, 2 * heads, d))?;
        let qk = rope(&qk, cos, sin)?;
        let (q, k) = (qk.narrow(1, 0, heads)?, qk.narrow(1, heads, heads)?);
        let v = qkv.narrow(1, 2 * h, h)?.reshape((total, heads, d))?;
        let context = attention::attend(&q, &k, &v, layout)?.reshape((total, h))?;
        let x = (x + linear(&block.out, &context)?)?;
        let gate_up = linear(&block.gate_up, &block.ffn_norm.forward(&x)?)?;
        let ffn = self.config.intermediate_size;
        let act = (gate_up.narrow(1, 0, ffn)?.silu()? * gate_up.narrow(1, ffn, ffn)?)?;
        Ok((x + linear(&block.down, &act)?)?)
    }
}

impl Esmc {
    /// The block on ESM-2's fused CUDA kernels (the linear layers carry zero biases there). The
    /// projections a quantized block (`--dtype fp8`) has scales for run on e4m3 GEMMs, whose
    /// inputs the LayerNorms and SwiGLU write in e4m3; the Q/K norms and rotary stay bf16 (see
    /// [`super::fp8`]).
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
        let (d, ffn) = (self.config.head_dim(), self.config.intermediate_size);
        let dev = &self.device;
        let eps = self.config.layer_norm_eps;
        let norm = |n: &LayerNorm, x: &Tensor| -> Result<Tensor> {
            let (weight, bias) = norm_params(n);
            kernels::layer_norm(x, weight, bias, eps)
        };
        let [s_qkv, s_out, s_up, s_down] = fp8::scales_of(&block.fp8);
        let qkv = match s_qkv {
            Some(s) => {
                let normed = time(dev, "attn_layernorm", || {
                    fp8::layer_norm(&block.attn_norm, x, eps)
                })?;
                time(dev, "qkv", || fp8::linear(&normed, &block.qkv, s, None))?
            }
            None => {
                let normed = time(dev, "attn_layernorm", || norm(&block.attn_norm, x))?;
                time(dev, "qkv", || kernels::linear(&normed, &block.qkv))?
            }
        };
        time(dev, "qk_norm_rotary", || {
            let (q, k) = (norm_params(&block.q_norm), norm_params(&block.k_norm));
            kernels::qk_norm_rotary(&qkv, q, k, eps, (cos, sin), 2 * heads, d / 2)
        })?;
        let context = time(dev, "attention", || {
            attention::attend_fused_qkv(&qkv, heads, d, layout)
        })?;
        let x = time(dev, "out_proj_residual", || {
            fp8::out_projection(&context, &block.out, s_out, x)
        })?;
        match (s_up, s_down) {
            (Some(s_up), Some(s_down)) => {
                let normed = time(dev, "ffn_layernorm", || {
                    fp8::layer_norm(&block.ffn_norm, &x, eps)
                })?;
                let act = time(dev, "gate_up_swiglu", || {
                    kernels::swiglu_fp8(&fp8::linear(&normed, &block.gate_up, s_up, None)?)
                })?;
                time(dev, "down_residual", || {
                    fp8::linear(&act, &block.down, s_down, Some(&x))
                })
            }
            _ => {
                let normed = time(dev, "ffn_layernorm", || norm(&block.ffn_norm, &x))?;
                let act = time(dev, "gate_up_swiglu", || {
                    let gate_up = kernels::linear(&normed, &block.gate_up)?;
                    if ffn.is_multiple_of(8) {
                        kernels::swiglu(&gate_up)
                    } else {
                        Ok((gate_up.narrow(1, 0, ffn)?.silu()? * gate_up.narrow(1, ffn, ffn)?)?)
                    }
                })?;
                time(dev, "down_residual", || {
                    kernels::linear_residual(&act, &block.down, &x)
                })
            }
        }
    }
}

/// A LayerNorm's weight and bias (esmbed gives every LayerNorm one).
#[cfg(feature = "cuda")]
fn norm_params(norm: &LayerNorm) -> (&Tensor, &Tensor) {
    let bias = norm.bias().expect("esmbed gives every LayerNorm a bias");
    (norm.weight(), bias)
}

/// Whether a model built now runs on the fused CUDA kernels ([`trunk::fused_kernels_apply`]):
/// by default where they apply (verified against the CPU path with `esmbed verify` on an H200;
/// README, "ESM C"); `ESMBED_ESMC_FUSED=0` keeps candle's generic CUDA ops, for comparison.
/// Decided once per model, at build: the zero biases the fused kernels need are made then.
fn fused(config: &EsmConfig, device: &Device, dtype: DType) -> bool {
    !std::env::var("ESMBED_ESMC_FUSED").is_ok_and(|v| v == "0")
        && trunk::fused_kernels_apply(config, device, dtype)
}

/// `weight` as a Linear: with a zero bias where the fused kernels run (they add one in the
/// GEMM's epilogue; zero adds nothing), else without.
fn unbiased(weight: Tensor, fused: bool) -> Result<Linear> {
    let bias = match fused {
        true => Some(Tensor::zeros(
            weight.dim(0)?,
            weight.dtype(),
            weight.device(),
        )?),
        false => None,
    };
    Ok(Linear::new(weight, bias))
}

/// ESM C's residual-branch divisor `√(N / 36)` (ESM3's scaling; every released checkpoint has it).
fn residual_scale(config: &EsmConfig) -> f64 {
    (config.num_hidden_layers as f64 / 36.0).sqrt()
}
