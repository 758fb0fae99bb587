//! ESM-2 hyper-parameters, read from an HF `config.json` (`EsmConfig` in transformers) or taken from
//! the published sizes.

use serde::{Deserialize, Serialize};

/// The fields of HF's `EsmConfig` that decide the computation. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsmConfig {
    /// Width of the residual stream (320 for 8M … 5120 for 15B).
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer (4 × hidden for every ESM-2).
    pub intermediate_size: usize,
    /// Vocabulary size (33 for ESM-2).
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Whether the embedding is rescaled for the masking rate seen in training (true for ESM-2).
    #[serde(default = "default_true")]
    pub token_dropout: bool,
    /// `<mask>` id, whose embedding rows are zeroed.
    #[serde(default = "default_mask")]
    pub mask_token_id: u32,
    /// `rotary` for ESM-2; ESM-1b's `absolute` is not supported.
    #[serde(default = "default_rotary")]
    pub position_embedding_type: String,
    /// ESM-1b has a LayerNorm before the first block; ESM-2 does not.
    #[serde(default)]
    pub emb_layer_norm_before: Option<bool>,
    /// Activation of the feed-forward layer (exact erf GELU for ESM-2).
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    /// Rotary base (10000 for ESM-2; newer transformers write it out).
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Whether the masked-LM head's decoder is the word-embedding matrix (true for every ESM-2;
    /// transformers' default). Not written when true, so configs serialize as before.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub tie_word_embeddings: bool,
}

fn is_true(value: &bool) -> bool {
    *value
}

fn default_vocab() -> usize {
    crate::tokenize::VOCAB_SIZE
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_mask() -> u32 {
    crate::tokenize::MASK
}
fn default_rotary() -> String {
    "rotary".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_theta() -> f64 {
    10000.0
}

/// The published ESM-2 sizes: (short name, hub id, layers, hidden, heads).
pub const PUBLISHED: [(&str, &str, usize, usize, usize); 6] = [
    ("8M", "facebook/esm2_t6_8M_UR50D", 6, 320, 20),
    ("35M", "facebook/esm2_t12_35M_UR50D", 12, 480, 20),
    ("150M", "facebook/esm2_t30_150M_UR50D", 30, 640, 20),
    ("650M", "facebook/esm2_t33_650M_UR50D", 33, 1280, 20),
    ("3B", "facebook/esm2_t36_3B_UR50D", 36, 2560, 40),
    ("15B", "facebook/esm2_t48_15B_UR50D", 48, 5120, 40),
];

impl EsmConfig {
    /// A config with ESM-2's fixed choices and the given size.
    pub fn new(num_hidden_layers: usize, hidden_size: usize, num_attention_heads: usize) -> Self {
        Self {
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size: 4 * hidden_size,
            vocab_size: default_vocab(),
            layer_norm_eps: default_eps(),
            token_dropout: true,
            mask_token_id: default_mask(),
            position_embedding_type: default_rotary(),
            emb_layer_norm_before: Some(false),
            hidden_act: default_gelu(),
            rope_theta: default_theta(),
            tie_word_embeddings: true,
        }
    }

    /// The config of a published size by short name (`650M`, case-insensitive) or hub id.
    pub fn published(name: &str) -> Option<Self> {
        PUBLISHED
            .iter()
            .find(|(short, id, ..)| short.eq_ignore_ascii_case(name) || *id == name)
            .map(|&(_, _, layers, hidden, heads)| Self::new(layers, hidden, heads))
    }

    /// Names accepted by [`EsmConfig::published`], for help and error messages.
    pub fn published_names() -> String {
        PUBLISHED.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
    }

    /// Resolve a fair-esm layer number (0 = embeddings, N = last and normalized, negatives
    /// count from the end: -1 = N) to `0..=N`.
    pub fn resolve_layer(&self, layer: i64) -> crate::error::Result<usize> {
        let n = self.num_hidden_layers as i64;
        let resolved = if layer < 0 { n + 1 + layer } else { layer };
        if (0..=n).contains(&resolved) {
            Ok(resolved as usize)
        } else {
            Err(crate::error::Error::InvalidOption(format!(
                "layer {layer} does not exist: this model has layers 0 (embeddings) to {n} (or -1 to -{})",
                n + 1
            )))
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Forward FLOPs for one token in a sequence of `seq_len` tokens: the matmuls
    /// (`24 H²` per layer: QKV, output, two FFN layers at 4H) plus attention (`4 S H`).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        self.num_hidden_layers as f64 * (24.0 * h * h + 4.0 * seq_len as f64 * h)
    }

    /// Reject configs that are not ESM-2, with the reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.position_embedding_type != "rotary" {
            return Err(format!(
                "position_embedding_type is {:?}; esmbed supports ESM-2 (rotary) models only, not ESM-1b",
                self.position_embedding_type
            ));
        }
        if self.emb_layer_norm_before == Some(true) {
            return Err("emb_layer_norm_before is true: this is an ESM-1b model, not ESM-2".into());
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act is {:?}; ESM-2 uses exact GELU (\"gelu\")",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} is odd; rotary embeddings need an even one",
                self.head_dim()
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err("num_hidden_layers is 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_config() {
        let json = r#"{"architectures":["EsmForMaskedLM"],"hidden_size":320,"num_hidden_layers":6,
            "num_attention_heads":20,"intermediate_size":1280,"vocab_size":33,"token_dropout":true,
            "mask_token_id":32,"position_embedding_type":"rotary","emb_layer_norm_before":false,
            "layer_norm_eps":1e-05,"hidden_act":"gelu","is_folding_model":false}"#;
        let config: EsmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config, EsmConfig::published("8M").unwrap());
        assert_eq!(config.head_dim(), 16);
        config.validate().unwrap();
    }

    #[test]
    fn rejects_esm1b() {
        let mut config = EsmConfig::published("650M").unwrap();
        config.position_embedding_type = "absolute".into();
        assert!(config.validate().unwrap_err().contains("ESM-1b"));
    }

    #[test]
    fn flops_match_the_spec() {
        // 650M: about 1.30 GFLOP per token before attention.
        let config = EsmConfig::published("facebook/esm2_t33_650M_UR50D").unwrap();
        let gflop = config.flops_per_token(0) / 1e9;
        assert!((gflop - 1.297).abs() < 0.01, "{gflop}");
        assert!(EsmConfig::published("7B").is_none());
    }
}
