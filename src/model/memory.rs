//! What a model needs in memory: its weights and a pack's activations. One estimate for the
//! default token budget on a GPU, the check before a job's first pack (the longest sequence
//! alone must fit) and `--dry-run`'s figure.

use candle_core::DType;
use serde::Serialize;

use super::config::Family;
use super::EsmConfig;

/// Peak activation bytes per token per hidden unit, in units of the compute dtype's size: the
/// FFN's 4H intermediate and its GELU, QKV, the residual stream and the normalized copy, with
/// headroom for the allocator.
pub const ACTIVATION_UNITS_PER_TOKEN: usize = 24;

/// Bytes a model needs on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryEstimate {
    /// The weights.
    pub weights: u64,
    /// A pack's activations at their peak, outputs included.
    pub activations: u64,
}

impl MemoryEstimate {
    /// Weights and activations.
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// Parameters of the encoder (the masked-LM head is not loaded for embeddings).
pub fn parameters(config: &EsmConfig) -> u64 {
    let (h, f, v) = (
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.vocab_size as u64,
    );
    let (attention, ffn, norms) = match config.family {
        Family::Esm2 => (4 * h * h + 4 * h, 2 * h * f + f + h, 2 * 2 * h),
        // No biases; q/k norms over the hidden width; gate, up and down.
        Family::Esmc => (4 * h * h, 3 * h * f, 2 * 2 * h + 2 * h),
    };
    v * h + config.num_hidden_layers as u64 * (attention + ffn + norms) + 2 * h
}

/// Activation bytes of one pack of `tokens` tokens whose longest sequence has `longest` tokens,
/// with `outputs` layers returned as f32. The CPU path materializes each sequence's attention
/// scores (`heads × L × L` f32, three such buffers at the softmax); FlashAttention does not.
pub fn activations(
    config: &EsmConfig,
    dtype: DType,
    cpu: bool,
    tokens: usize,
    longest: usize,
    outputs: usize,
) -> u64 {
    let h = config.hidden_size as u64;
    let tokens = tokens as u64;
    let unit = super::fp8::activation_dtype(dtype).size_in_bytes() as u64;
    let stream = tokens * ACTIVATION_UNITS_PER_TOKEN as u64 * h * unit;
    let returned = tokens * h * 4 * outputs as u64;
    let scores = if cpu {
        3 * config.num_attention_heads as u64 * (longest as u64).pow(2) * 4
    } else {
        0
    };
    stream + returned + scores
}

/// The model's weights in `dtype` and the activations of a pack (see [`activations`]).
pub fn estimate(
    config: &EsmConfig,
    dtype: DType,
    cpu: bool,
    tokens: usize,
    longest: usize,
    outputs: usize,
) -> MemoryEstimate {
    MemoryEstimate {
        weights: parameters(config) * dtype.size_in_bytes() as u64,
        activations: activations(config, dtype, cpu, tokens, longest, outputs),
    }
}

/// Memory available for activations on the CPU: `MemAvailable` of `/proc/meminfo` (Linux).
pub fn available_host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_match_the_published_sizes() {
        // Parameter counts of the published checkpoints, without the LM head (contact head
        // excluded too), in millions.
        for (shape, millions) in [("8M", 7.5), ("35M", 33.5), ("650M", 651.0), ("3B", 2838.0)] {
            let config = EsmConfig::published(shape).unwrap();
            let got = parameters(&config) as f64 / 1e6;
            assert!((got / millions - 1.0).abs() < 0.02, "{shape}: {got:.1}M");
        }
    }

    #[test]
    fn the_cpu_counts_attention_scores() {
        let config = EsmConfig::published("8M").unwrap();
        let gpu = activations(&config, DType::BF16, false, 4096, 1024, 1);
        let cpu = activations(&config, DType::F32, true, 4096, 1024, 1);
        assert!(cpu > 2 * gpu);
        assert_eq!(
            activations(&config, DType::F32, true, 1026, 1026, 0)
                - activations(&config, DType::F32, false, 1026, 1026, 0),
            3 * 20 * 1026 * 1026 * 4
        );
    }
}
