//! Tensor names as transformers resolves them when it loads an ESM checkpoint, so that whatever
//! transformers loads, esmbed loads.
//!
//! The rules (transformers 5.24, `conversion_mapping.py` for `esm` and `modeling_esm.py`):
//! - the `esm.` prefix of `EsmForMaskedLM` checkpoints (`base_model_prefix`) is optional;
//! - the legacy names `LayerNorm.gamma` / `LayerNorm.beta` (TensorFlow-era saves) are
//!   `LayerNorm.weight` / `LayerNorm.bias`;
//! - rotary `inv_freq` is one buffer of the model: `rotary_embeddings.inv_freq`, or the per-layer
//!   `encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq` of older saves (and the literal
//!   wildcard key `encoder.layer.*.attention.self.rotary_embeddings.inv_freq` some versions wrote),
//!   all the same parameter; absent, it is computed from `rope_theta`;
//! - the masked-LM head keeps its names (`lm_head.dense.*`, `lm_head.layer_norm.*`, `lm_head.bias`,
//!   `lm_head.decoder.weight`, which is the word-embedding matrix unless the config unties it);
//!   it is loaded only for scores;
//! - heads esmbed does not use (`contact_head.*`, `pooler.*`) are ignored;
//! - ESM C (`modeling_esmc.py`, no conversion rules): `EsmcForMaskedLM` keys are under `esmc.`
//!   (optional, as `esm.` is), its encoder names are `embed_tokens.*`, `layers.{i}.*`, `norm.*`,
//!   its head `lm_head.{dense,layer_norm,decoder}.*` (untied). The two families' names do not
//!   overlap.
//!
//! Several names of one checkpoint may resolve to the same parameter; that is fine when they hold
//! the same values, and refused (naming both) when they do not: esmbed never picks one silently.

use std::collections::BTreeMap;

/// The one name of the rotary frequencies, whatever the checkpoint calls them.
pub const INV_FREQ: &str = "rotary_embeddings.inv_freq";

/// The canonical name (HF `EsmModel` naming without the `esm.` prefix) of a tensor as a
/// checkpoint names it, or `None` for tensors esmbed does not use.
pub fn canonical(name: &str) -> Option<String> {
    let name = name
        .strip_prefix("esm.")
        .or_else(|| name.strip_prefix("esmc."))
        .unwrap_or(name);
    if name.ends_with("rotary_embeddings.inv_freq") {
        return Some(INV_FREQ.to_string());
    }
    if name.starts_with("lm_head.") {
        return Some(name.to_string());
    }
    let esmc = ["embed_tokens.", "layers.", "norm."];
    if esmc.iter().any(|stem| name.starts_with(stem)) {
        return Some(name.to_string());
    }
    let used = name.starts_with("embeddings.word_embeddings.") || name.starts_with("encoder.");
    if !used {
        return None;
    }
    let renamed = if let Some(stem) = name.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = name.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        name.to_string()
    };
    Some(renamed)
}

/// How many blocks names of the form `{prefix}{i}.…` number (the highest `i` plus one), or
/// `None` where there are none. For checkpoints with no config to say it (fair-esm `.pt`, the
/// `esm` package's `.pth`).
pub fn block_count<'a>(names: impl IntoIterator<Item = &'a String>, prefix: &str) -> Option<usize> {
    names
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map(|max| max + 1)
}

/// The names a checkpoint may give the parameter `canonical`, for a message about a missing
/// tensor (what was tried).
pub fn aliases(canonical: &str) -> Vec<String> {
    let mut bare = vec![canonical.to_string()];
    if let Some(stem) = canonical.strip_suffix("LayerNorm.weight") {
        bare.push(format!("{stem}LayerNorm.gamma"));
    }
    if let Some(stem) = canonical.strip_suffix("LayerNorm.bias") {
        bare.push(format!("{stem}LayerNorm.beta"));
    }
    if canonical == INV_FREQ {
        bare.push("encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq".into());
        bare.push("encoder.layer.*.attention.self.rotary_embeddings.inv_freq".into());
    }
    let esmc = ["embed_tokens.", "layers.", "norm."];
    let prefix = match esmc.iter().any(|stem| canonical.starts_with(stem)) {
        true => "esmc.",
        false => "esm.",
    };
    let prefixed: Vec<String> = bare.iter().map(|n| format!("{prefix}{n}")).collect();
    bare.into_iter().chain(prefixed).collect()
}

/// Every file name of a checkpoint grouped under its canonical name (file names sorted, so the
/// first is the one transformers prefers: layer 0's `inv_freq` before layer 1's).
pub fn group<I: IntoIterator<Item = String>>(file_names: I) -> BTreeMap<String, Vec<String>> {
    group_as(file_names.into_iter().map(|n| (n.clone(), n)))
}

/// [`group`] for checkpoints whose names are first mapped to HF's (fair-esm `.pt`): pairs of
/// (HF name, name in the file), grouped by the HF name's canonical name.
pub fn group_as<I: IntoIterator<Item = (String, String)>>(
    names: I,
) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (hf_name, file_name) in names {
        if let Some(c) = canonical(&hf_name) {
            groups.entry(c).or_default().push(file_name);
        }
    }
    for names in groups.values_mut() {
        // The model-level name first, then the rest in order (`encoder.layer.0…` < `…1…`).
        names.sort_by_key(|n| {
            (
                !n.trim_start_matches("esm.").starts_with(INV_FREQ),
                n.clone(),
            )
        });
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_drop_prefix_and_heads() {
        assert_eq!(
            canonical("esm.encoder.layer.0.attention.self.key.weight").as_deref(),
            Some("encoder.layer.0.attention.self.key.weight")
        );
        assert_eq!(canonical("lm_head.bias").as_deref(), Some("lm_head.bias"));
        assert_eq!(
            canonical("esm.rotary_embeddings.inv_freq").as_deref(),
            Some("rotary_embeddings.inv_freq")
        );
        assert_eq!(canonical("esm.contact_head.regression.weight"), None);
        assert_eq!(canonical("esm.embeddings.position_embeddings.weight"), None);
        // ESM C.
        assert_eq!(
            canonical("esmc.layers.3.self_attn.q_norm.weight").as_deref(),
            Some("layers.3.self_attn.q_norm.weight")
        );
        assert_eq!(canonical("norm.weight").as_deref(), Some("norm.weight"));
        assert_eq!(
            canonical("lm_head.decoder.bias").as_deref(),
            Some("lm_head.decoder.bias")
        );
        assert!(aliases("layers.0.mlp.up_proj.weight")
            .contains(&"esmc.layers.0.mlp.up_proj.weight".to_string()));
    }

    #[test]
    fn transformers_rules() {
        let c = |n: &str| canonical(n);
        assert_eq!(
            c("esm.encoder.layer.0.attention.LayerNorm.gamma").as_deref(),
            Some("encoder.layer.0.attention.LayerNorm.weight")
        );
        assert_eq!(
            c("encoder.layer.2.LayerNorm.beta").as_deref(),
            Some("encoder.layer.2.LayerNorm.bias")
        );
        assert_eq!(
            c("esm.encoder.emb_layer_norm_after.weight").as_deref(),
            Some("encoder.emb_layer_norm_after.weight")
        );
        for n in [
            "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq",
            "encoder.layer.3.attention.self.rotary_embeddings.inv_freq",
            "esm.rotary_embeddings.inv_freq",
        ] {
            assert_eq!(c(n).as_deref(), Some(INV_FREQ), "{n}");
        }
        for n in ["lm_head.decoder.weight", "lm_head.layer_norm.weight"] {
            assert_eq!(c(n).as_deref(), Some(n), "{n}");
        }
        for n in ["esm.contact_head.regression.weight", "pooler.dense.weight"] {
            assert_eq!(c(n), None, "{n}");
        }
    }

    #[test]
    fn groups_prefer_the_model_level_name_then_layer_order() {
        let groups = group([
            "esm.encoder.layer.1.attention.self.rotary_embeddings.inv_freq".to_string(),
            "esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq".to_string(),
            "esm.encoder.layer.0.LayerNorm.weight".to_string(),
        ]);
        assert_eq!(
            groups[INV_FREQ][0],
            "esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq"
        );
        let groups = group([
            "encoder.layer.0.attention.self.rotary_embeddings.inv_freq".to_string(),
            "rotary_embeddings.inv_freq".to_string(),
        ]);
        assert_eq!(groups[INV_FREQ][0], "rotary_embeddings.inv_freq");
        let tried = aliases("encoder.layer.0.LayerNorm.weight");
        assert!(tried.contains(&"esm.encoder.layer.0.LayerNorm.gamma".to_string()));
    }
}
