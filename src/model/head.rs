//! The masked-LM head, for scores (likelihoods, variant effects): HF `EsmLMHead`
//! (`x = LayerNorm(gelu(dense(h)))`, logits `= x · decoderᵀ + bias`, the decoder tied to the word
//! embeddings unless the config unties it); fair-esm's `RobertaLMHead` is the same, and so is
//! ESM C's `EsmcMaskedLMHead` (untied, its bias named `lm_head.decoder.bias`, 64 logits of which
//! the first 33 are tokens: log-softmax over all 64, as transformers computes it, then the 33).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::config::Family;
use crate::error::{Error, Result};
use crate::model::weights::Checkpoint;
use crate::tokenize::VOCAB_SIZE;

/// The head's tensors, on the model's device and in its dtype.
#[derive(Clone)]
pub(crate) struct LmHead {
    dense: Linear,
    norm: LayerNorm,
    eps: f64,
    /// `[V, H]`: the word embeddings (tied) or the checkpoint's decoder.
    decoder: Tensor,
    bias: Tensor,
}

/// Names of the head's tensors (HF `EsmForMaskedLM`; `EsmcForMaskedLM` names its bias
/// `lm_head.decoder.bias` and always has `lm_head.decoder.weight`).
const HEAD: [&str; 4] = [
    "lm_head.dense.weight",
    "lm_head.dense.bias",
    "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias",
];

/// The head's output bias and, when untied, decoder, as `family` names them.
fn decoder_names(family: Family, tied: bool) -> Vec<&'static str> {
    match (family, tied) {
        (Family::Esm2, true) => vec!["lm_head.bias"],
        (Family::Esm2, false) => vec!["lm_head.bias", "lm_head.decoder.weight"],
        (Family::Esmc, _) => vec!["lm_head.decoder.bias", "lm_head.decoder.weight"],
    }
}

impl LmHead {
    /// Load the head of `checkpoint`; `embeddings` is the model's word-embedding matrix, the
    /// decoder when tied. A checkpoint without a head (an `EsmModel` save) is an error naming
    /// what is missing.
    pub(crate) fn load(
        checkpoint: &Checkpoint,
        embeddings: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = &checkpoint.config;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let outputs = decoder_names(config.family, config.tie_word_embeddings);
        let missing: Vec<&str> = HEAD
            .iter()
            .copied()
            .chain(outputs.iter().copied())
            .filter(|n| !checkpoint.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(Error::model(
                &checkpoint.source_name,
                format!(
                    "no masked-LM head (missing {}): scores need the weights of an \
                     {arch}ForMaskedLM (as every published checkpoint has), not an {arch}Model \
                     save",
                    missing.join(", "),
                    arch = match config.family {
                        Family::Esm2 => "Esm",
                        Family::Esmc => "Esmc",
                    }
                ),
            ));
        }
        let load = |name: &str, shape: &[usize]| checkpoint.load(name, shape, dtype, device);
        let decoder = match outputs.get(1) {
            None => embeddings.clone(),
            Some(name) => load(name, &[v, h])?,
        };
        Ok(Self {
            dense: Linear::new(
                load("lm_head.dense.weight", &[h, h])?,
                Some(load("lm_head.dense.bias", &[h])?),
            ),
            norm: LayerNorm::new(
                load("lm_head.layer_norm.weight", &[h])?,
                load("lm_head.layer_norm.bias", &[h])?,
                config.layer_norm_eps,
            ),
            eps: config.layer_norm_eps,
            decoder,
            bias: load(outputs[0], &[v])?,
        })
    }

    /// A random head of `h × v` tied to `embeddings`, for benchmarks.
    pub(crate) fn random(embeddings: &Tensor, eps: f64) -> Result<Self> {
        let (v, h) = embeddings.dims2()?;
        let (dtype, device) = (embeddings.dtype(), embeddings.device());
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?)
        };
        Ok(Self {
            dense: Linear::new(randn(&[h, h])?, Some(randn(&[h])?)),
            norm: LayerNorm::new(
                Tensor::ones(h, dtype, device)?,
                Tensor::zeros(h, dtype, device)?,
                eps,
            ),
            eps,
            decoder: embeddings.clone(),
            bias: randn(&[v])?,
        })
    }

    /// The same head on `device`; `embeddings` is the copy's word-embedding matrix.
    pub(crate) fn replicate(
        &self,
        device: &Device,
        embeddings: &Tensor,
        tied: bool,
    ) -> Result<Self> {
        let copy =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_device(device)?) };
        let bias = self.norm.bias().expect("the head's LayerNorm has a bias");
        Ok(Self {
            dense: Linear::new(
                copy(self.dense.weight())?,
                self.dense.bias().map(copy).transpose()?,
            ),
            norm: LayerNorm::new(copy(self.norm.weight())?, copy(bias)?, self.eps),
            eps: self.eps,
            decoder: if tied {
                embeddings.clone()
            } else {
                copy(&self.decoder)?
            },
            bias: copy(&self.bias)?,
        })
    }

    /// Log-probabilities over the vocabulary (log-softmax in f32) of the final hidden states
    /// `hidden` (`[P, H]`, after `emb_layer_norm_after`): `[P, V]` f32. The projection to the
    /// vocabulary runs in f32 (it is `P × H × 33`): bf16 logits would cost the scores their
    /// third digit. On the CPU a position's log-probabilities are bitwise the same in any pack:
    /// tiny inputs are padded for the dense matmul (see [`super::row_padded`]), and the
    /// decoder's 33 dot products per row are summed in a fixed order (`gemm` rounds a
    /// 33-column product differently as the row count changes).
    pub(crate) fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = super::esm2::row_padded(hidden, |h| Ok(self.dense.forward(h)?))?.gelu_erf()?;
        let x = self.norm.forward(&x)?.to_dtype(DType::F32)?;
        let decoder = self.decoder.to_dtype(DType::F32)?;
        let bias = self.bias.to_dtype(DType::F32)?;
        let logits = if x.device().is_cpu() {
            rowwise_logits(&x, &decoder, &bias)?
        } else {
            x.matmul(&decoder.t()?)?.broadcast_add(&bias)?
        };
        let log_probs = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        // ESM C pads its vocabulary to 64: no token beyond the 33 is ever looked at.
        match log_probs.dim(1)? > VOCAB_SIZE {
            true => Ok(log_probs.narrow(1, 0, VOCAB_SIZE)?.contiguous()?),
            false => Ok(log_probs),
        }
    }
}

/// `x · decoderᵀ + bias` on the CPU, each logit a sequential f32 dot product.
fn rowwise_logits(x: &Tensor, decoder: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (rows, h) = x.dims2()?;
    let v = decoder.dim(0)?;
    let x = x.flatten_all()?.to_vec1::<f32>()?;
    let d = decoder.flatten_all()?.to_vec1::<f32>()?;
    let b = bias.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(rows * v);
    for row in x.chunks_exact(h) {
        for (token, weights) in d.chunks_exact(h).enumerate() {
            let dot: f32 = row.iter().zip(weights).map(|(a, w)| a * w).sum();
            out.push(dot + b[token]);
        }
    }
    Ok(Tensor::from_vec(out, (rows, v), &Device::Cpu)?)
}
