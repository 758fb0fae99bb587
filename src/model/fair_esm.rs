//! fair-esm `.pt` checkpoints: their state-dict names mapped to HF's `EsmModel` naming, and
//! their config read from the pickled `cfg.model` (or inferred from tensor shapes).

use std::collections::HashMap;
use std::fs;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};

use super::config::EsmConfig;
use super::weights::Store;
use crate::error::{Error, Result};

/// Map a fair-esm state-dict name to the HF name, or `None` for tensors esmbed does not use
/// (`lm_head`, `contact_head`).
pub(super) fn hf_name(name: &str) -> Option<String> {
    let name = name
        .strip_prefix("encoder.sentence_encoder.")
        .or_else(|| name.strip_prefix("encoder."))
        .unwrap_or(name);
    if let Some(rest) = name.strip_prefix("embed_tokens.") {
        return Some(format!("embeddings.word_embeddings.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("emb_layer_norm_after.") {
        return Some(format!("encoder.emb_layer_norm_after.{rest}"));
    }
    // RobertaLMHead: `weight` is the decoder (tied to embed_tokens), `bias` HF's `lm_head.bias`.
    if let Some(rest) = name.strip_prefix("lm_head.") {
        return Some(match rest {
            "weight" => "lm_head.decoder.weight".to_string(),
            _ => format!("lm_head.{rest}"),
        });
    }
    let rest = name.strip_prefix("layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let mapped = [
        ("self_attn.q_proj.", "attention.self.query."),
        ("self_attn.k_proj.", "attention.self.key."),
        ("self_attn.v_proj.", "attention.self.value."),
        ("self_attn.out_proj.", "attention.output.dense."),
        ("self_attn.rot_emb.", "attention.self.rotary_embeddings."),
        ("self_attn_layer_norm.", "attention.LayerNorm."),
        ("fc1.", "intermediate.dense."),
        ("fc2.", "output.dense."),
        ("final_layer_norm.", "LayerNorm."),
    ]
    .iter()
    .find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}")))?;
    Some(format!("encoder.layer.{index}.{mapped}"))
}

/// The config of a fair-esm checkpoint: from its `cfg.model` entry when that can be read, else
/// inferred from the tensor shapes (the head count from the published sizes).
pub(super) fn config(
    path: &Path,
    names: &HashMap<String, String>,
    store: &Store,
    source_name: &str,
) -> Result<EsmConfig> {
    let layers = super::names::block_count(names.keys(), "encoder.layer.").ok_or_else(|| {
        Error::model(
            source_name,
            "no transformer layers found: is this an ESM-2 checkpoint?",
        )
    })?;
    let embed_name = names
        .get("embeddings.word_embeddings.weight")
        .ok_or_else(|| Error::MissingTensor {
            source_name: source_name.to_string(),
            tensor: "embeddings.word_embeddings.weight".into(),
            tried: vec!["encoder.sentence_encoder.embed_tokens.weight".into()],
        })?;
    let hidden = match store {
        Store::Pth(pth) => pth
            .tensor_infos()
            .get(embed_name)
            .map(|info| info.layout.shape().dims().to_vec()),
        Store::Safetensors(_) => None,
    }
    .and_then(|dims| dims.get(1).copied())
    .ok_or_else(|| Error::model(source_name, "cannot read the embedding's shape"))?;

    let cfg = read_fair_esm_cfg(path).unwrap_or_default();
    let get = |key: &str| cfg.get(key).copied();
    let heads = get("encoder_attention_heads")
        .map(|h| h as usize)
        .or_else(|| {
            super::config::PUBLISHED
                .iter()
                .find(|p| p.3 == hidden)
                .map(|p| p.4)
        })
        .ok_or_else(|| {
            Error::model(
                source_name,
                "the checkpoint's cfg.model.encoder_attention_heads is unreadable and the hidden size matches no published ESM-2; convert it to HF format",
            )
        })?;
    if let Some(cfg_layers) = get("encoder_layers") {
        if cfg_layers as usize != layers {
            return Err(Error::model(
                source_name,
                format!("cfg says {cfg_layers} layers but the state dict has {layers}"),
            ));
        }
    }
    let mut config = EsmConfig::new(layers, hidden, heads);
    if let Some(token_dropout) = get("token_dropout") {
        config.token_dropout = token_dropout != 0;
    }
    Ok(config)
}

/// Read `cfg["model"]` of a torch checkpoint as integer fields (booleans as 0/1). Handles a plain
/// dict and an `argparse.Namespace`-like object whose state is a dict. `None` if unreadable.
fn read_fair_esm_cfg(path: &Path) -> Option<HashMap<String, i64>> {
    let file = fs::File::open(path).ok()?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).ok()?;
    let pkl = zip
        .file_names()
        .filter_map(|name| name.ok())
        .find(|name| name.ends_with("data.pkl"))?
        .into_owned();
    let mut bytes = Vec::new();
    zip.by_name(&pkl).ok()?.read_to_end(&mut bytes).ok()?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut BufReader::new(&bytes[..])).ok()?;
    let root = stack.finalize().ok()?;
    let cfg = dict_get(&root, "cfg")?;
    let model = dict_get(cfg, "model")?;
    let fields = match model {
        Object::Dict(kv) => kv,
        Object::Build { args, .. } => match args.as_ref() {
            Object::Dict(kv) => kv,
            _ => return None,
        },
        _ => return None,
    };
    Some(
        fields
            .iter()
            .filter_map(|(k, v)| {
                let key = match k {
                    Object::Unicode(s) => s.clone(),
                    _ => return None,
                };
                let value = match v {
                    Object::Int(i) => *i as i64,
                    Object::Long(l) => *l,
                    Object::Bool(b) => *b as i64,
                    _ => return None,
                };
                Some((key, value))
            })
            .collect(),
    )
}

fn dict_get<'a>(obj: &'a Object, key: &str) -> Option<&'a Object> {
    match obj {
        Object::Dict(kv) => kv
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_esm_names_map_to_hf() {
        let cases = [
            (
                "encoder.sentence_encoder.embed_tokens.weight",
                Some("embeddings.word_embeddings.weight"),
            ),
            (
                "encoder.layers.3.self_attn.q_proj.bias",
                Some("encoder.layer.3.attention.self.query.bias"),
            ),
            (
                "layers.0.self_attn.rot_emb.inv_freq",
                Some("encoder.layer.0.attention.self.rotary_embeddings.inv_freq"),
            ),
            (
                "encoder.sentence_encoder.layers.12.final_layer_norm.weight",
                Some("encoder.layer.12.LayerNorm.weight"),
            ),
            (
                "encoder.sentence_encoder.layers.1.self_attn_layer_norm.bias",
                Some("encoder.layer.1.attention.LayerNorm.bias"),
            ),
            (
                "encoder.sentence_encoder.emb_layer_norm_after.weight",
                Some("encoder.emb_layer_norm_after.weight"),
            ),
            ("encoder.lm_head.dense.weight", Some("lm_head.dense.weight")),
            ("encoder.lm_head.weight", Some("lm_head.decoder.weight")),
            ("encoder.lm_head.bias", Some("lm_head.bias")),
            (
                "encoder.sentence_encoder.contact_head.regression.weight",
                None,
            ),
        ];
        for (from, to) in cases {
            assert_eq!(hf_name(from).as_deref(), to, "{from}");
        }
    }
}
