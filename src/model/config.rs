//! Model hyper-parameters, read from an HF `config.json` (transformers' `EsmConfig` for ESM-2,
//! `EsmcConfig` for ESM C, told apart by `model_type`) or taken from the published sizes.

use serde::{Deserialize, Serialize};

/// Which architecture a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// ESM-2 (`model_type` `esm`): post-embedding token-dropout rescale, GELU MLP, biases.
    #[default]
    Esm2,
    /// ESM C (`model_type` `esmc`): QK-LayerNorm, SwiGLU, no biases in attention or MLP, scaled
    /// residual branches, no token dropout.
    Esmc,
}

impl Family {
    fn is_esm2(&self) -> bool {
        *self == Family::Esm2
    }
}

/// The fields of HF's `EsmConfig` that decide the computation, and the same facts of an ESM C
/// config. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsmConfig {
    /// The architecture. Not written for ESM-2, so its configs (and fingerprints) read as before.
    #[serde(default, skip_serializing_if = "Family::is_esm2")]
    pub family: Family,
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

/// The fields of transformers' `EsmcConfig` that decide the computation.
#[derive(Deserialize)]
struct EsmcJson {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "esmc_vocab")]
    vocab_size: usize,
    #[serde(default = "default_mask")]
    mask_token_id: u32,
    #[serde(default = "silu")]
    hidden_act: String,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

#[derive(Deserialize)]
struct RopeParameters {
    #[serde(default = "default_rope_type")]
    rope_type: String,
    #[serde(default)]
    rope_theta: Option<f64>,
}

fn esmc_vocab() -> usize {
    64
}
fn silu() -> String {
    "silu".into()
}
fn default_rope_type() -> String {
    "default".into()
}

impl EsmcJson {
    fn into_config(self) -> Result<EsmConfig, String> {
        if self.attention_bias || self.mlp_bias {
            return Err(
                "attention_bias/mlp_bias are set: no released ESM C has biases there".into(),
            );
        }
        if self
            .num_key_value_heads
            .is_some_and(|k| k != self.num_attention_heads)
        {
            return Err(
                "num_key_value_heads differs from num_attention_heads: ESM C has no \
                        grouped-query attention"
                    .into(),
            );
        }
        if self
            .head_dim
            .is_some_and(|d| d * self.num_attention_heads != self.hidden_size)
        {
            return Err("head_dim × num_attention_heads is not hidden_size".into());
        }
        let rope = self.rope_parameters.as_ref();
        if let Some(kind) = rope.map(|r| &r.rope_type).filter(|t| *t != "default") {
            return Err(format!(
                "rope_type {kind:?}: esmbed supports the default rotary only"
            ));
        }
        let theta = rope.and_then(|r| r.rope_theta).or(self.rope_theta);
        Ok(EsmConfig {
            family: Family::Esmc,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            // nn.LayerNorm's default: EsmcConfig has no epsilon field.
            layer_norm_eps: default_eps(),
            token_dropout: false,
            mask_token_id: self.mask_token_id,
            position_embedding_type: default_rotary(),
            emb_layer_norm_before: None,
            hidden_act: self.hidden_act,
            rope_theta: theta.unwrap_or_else(default_theta),
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
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

/// The published ESM C sizes: (short name, hub id, layers, hidden, heads, intermediate).
pub const PUBLISHED_ESMC: [(&str, &str, usize, usize, usize, usize); 3] = [
    ("esmc-300m", "biohub/ESMC-300M", 30, 960, 15, 2560),
    ("esmc-600m", "biohub/ESMC-600M", 36, 1152, 18, 3072),
    ("esmc-6b", "biohub/ESMC-6B", 80, 2560, 40, 6912),
];

impl EsmConfig {
    /// Read a `config.json`: `model_type` `esmc` is ESM C (transformers' `EsmcConfig`), anything
    /// else ESM-2 (`EsmConfig`). `Err` is what is wrong with it.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match value.get("model_type").and_then(|t| t.as_str()) {
            Some("esmc") => serde_json::from_value::<EsmcJson>(value)
                .map_err(|e| e.to_string())?
                .into_config(),
            _ => serde_json::from_value(value).map_err(|e| e.to_string()),
        }
    }

    /// An ESM C config of the given size (random-weight benchmarks of the published shapes).
    pub fn esmc(layers: usize, hidden: usize, heads: usize, intermediate: usize) -> Self {
        Self {
            family: Family::Esmc,
            intermediate_size: intermediate,
            vocab_size: esmc_vocab(),
            token_dropout: false,
            emb_layer_norm_before: None,
            hidden_act: silu(),
            tie_word_embeddings: false,
            ..Self::new(layers, hidden, heads)
        }
    }

    /// The longest sequence the model was trained on, in residues (its crop): 1022 for ESM-2,
    /// 2046 for ESM C (`max_position_embeddings` 2048, less `<cls>` and `<eos>`).
    pub fn crop(&self) -> usize {
        match self.family {
            Family::Esm2 => 1022,
            Family::Esmc => 2046,
        }
    }

    /// A config with ESM-2's fixed choices and the given size.
    pub fn new(num_hidden_layers: usize, hidden_size: usize, num_attention_heads: usize) -> Self {
        Self {
            family: Family::Esm2,
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

    /// The config of a published size by short name (`650M`, `esmc-600m`, case-insensitive) or
    /// hub id.
    pub fn published(name: &str) -> Option<Self> {
        let esm2 = PUBLISHED
            .iter()
            .find(|(short, id, ..)| short.eq_ignore_ascii_case(name) || *id == name)
            .map(|&(_, _, layers, hidden, heads)| Self::new(layers, hidden, heads));
        esm2.or_else(|| {
            PUBLISHED_ESMC
                .iter()
                .find(|(short, id, ..)| short.eq_ignore_ascii_case(name) || *id == name)
                .map(|&(_, _, l, h, heads, ffn)| Self::esmc(l, h, heads, ffn))
        })
    }

    /// The hub id of a published size's short name (or of the hub id itself).
    pub fn published_id(name: &str) -> Option<&'static str> {
        let esm2 = PUBLISHED.iter().map(|p| (p.0, p.1));
        let esmc = PUBLISHED_ESMC.iter().map(|p| (p.0, p.1));
        esm2.chain(esmc)
            .find(|(short, id)| short.eq_ignore_ascii_case(name) || *id == name)
            .map(|(_, id)| id)
    }

    /// Names accepted by [`EsmConfig::published`], for help and error messages.
    pub fn published_names() -> String {
        let esm2 = PUBLISHED.iter().map(|p| p.0);
        let esmc = PUBLISHED_ESMC.iter().map(|p| p.0);
        esm2.chain(esmc).collect::<Vec<_>>().join(", ")
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

    /// Forward FLOPs for one token in a sequence of `seq_len` tokens: the matmuls (`8 H²` for
    /// QKV and output, `4 H I` for ESM-2's two FFN layers, `6 H I` for ESM C's three) plus
    /// attention (`4 S H`), per layer.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        let ffn = self.intermediate_size as f64
            * match self.family {
                Family::Esm2 => 4.0,
                Family::Esmc => 6.0,
            };
        self.num_hidden_layers as f64 * (8.0 * h * h + ffn * h + 4.0 * seq_len as f64 * h)
    }

    /// Reject configs that are neither ESM-2 nor ESM C, with the reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.family == Family::Esmc && self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act is {:?}; ESM C uses SwiGLU (\"silu\")",
                self.hidden_act
            ));
        }
        self.validate_shape()?;
        if self.family == Family::Esmc {
            return Ok(());
        }
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
        Ok(())
    }

    fn validate_shape(&self) -> Result<(), String> {
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
        // ESM C 600M: 36 × (8·1152² + 6·1152·3072) ≈ 1.15 GFLOP.
        let esmc = EsmConfig::published("ESMC-600m").unwrap();
        let gflop = esmc.flops_per_token(0) / 1e9;
        assert!((gflop - 1.147).abs() < 0.01, "{gflop}");
    }

    #[test]
    fn reads_esmc_config() {
        let json = r#"{"architectures":["EsmcForMaskedLM"],"model_type":"esmc","hidden_size":960,
            "num_hidden_layers":30,"num_attention_heads":15,"intermediate_size":2560,"vocab_size":64,
            "hidden_act":"silu","head_dim":64,"max_position_embeddings":2048,"mask_token_id":32,
            "rope_parameters":{"rope_theta":10000.0,"rope_type":"default"},"tie_word_embeddings":false}"#;
        let config = EsmConfig::from_json(json).unwrap();
        assert_eq!(config, EsmConfig::published("biohub/ESMC-300M").unwrap());
        assert_eq!((config.head_dim(), config.crop()), (64, 2046));
        config.validate().unwrap();
        let serialized = serde_json::to_string(&config).unwrap();
        assert!(serialized.contains(r#""family":"esmc""#), "{serialized}");
        assert_eq!(EsmConfig::from_json(&serialized).unwrap(), config);
        let esm2 = serde_json::to_string(&EsmConfig::published("8M").unwrap()).unwrap();
        assert!(
            !esm2.contains("family"),
            "ESM-2 configs serialize as before"
        );
        let scaled = json.replace(r#""rope_type":"default""#, r#""rope_type":"linear""#);
        assert!(EsmConfig::from_json(&scaled)
            .unwrap_err()
            .contains("linear"));
    }
}
