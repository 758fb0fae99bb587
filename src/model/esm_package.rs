//! ESM C as Biohub's `esm` package saves it (`esmc_300m_2024_12_v0.pth`,
//! `esmc_600m_2024_12_v0.pth`: a plain `torch.save` of its `ESMC` module's state dict): names
//! mapped to transformers' `EsmcModel` naming, the config inferred from the tensor shapes.
//!
//! The package fuses what transformers keeps apart: one `[3H, H]` Linear for Q|K|V
//! (`attn.layernorm_qkv.1`, after its LayerNorm `.0`) and one `[2I, H]` Linear for gate|up
//! (`ffn.1`, SwiGLU's first half gated). Those map to `self_attn.qkv_proj` and `mlp.gate_up_proj`,
//! names of esmbed's own that the ESM C loader takes in place of the three (two) separate
//! projections; it concatenates those anyway. The mapping is checked against the package's own
//! forward in `tests/fixtures/make_esmc_pth.py`.

use std::collections::HashMap;

use super::config::EsmConfig;
use crate::error::{Error, Result};

/// A name only the package's ESM C checkpoints have.
pub(super) const MARKER: &str = "transformer.blocks.0.attn.layernorm_qkv.1.weight";

/// The fused Q|K|V projection of block `i`, under esmbed's name for it.
pub fn qkv_proj(i: usize) -> String {
    format!("layers.{i}.self_attn.qkv_proj.weight")
}

/// The fused gate|up projection of block `i`, under esmbed's name for it.
pub fn gate_up_proj(i: usize) -> String {
    format!("layers.{i}.mlp.gate_up_proj.weight")
}

/// The transformers name of a package state-dict name, or `None` for tensors esmbed does not use.
pub(super) fn hf_name(name: &str) -> Option<String> {
    match name {
        "embed.weight" => return Some("embed_tokens.weight".into()),
        "transformer.norm.weight" => return Some("norm.weight".into()),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("sequence_head.") {
        let (index, kind) = rest.split_once('.')?;
        let part = match index {
            "0" => "dense",
            "2" => "layer_norm",
            "3" => "decoder",
            _ => return None,
        };
        return Some(format!("lm_head.{part}.{kind}"));
    }
    let rest = name.strip_prefix("transformer.blocks.")?;
    let (index, rest) = rest.split_once('.')?;
    let i: usize = index.parse().ok()?;
    let mapped = match rest {
        "attn.layernorm_qkv.0.weight" => "input_layernorm.weight",
        "attn.layernorm_qkv.0.bias" => "input_layernorm.bias",
        "attn.layernorm_qkv.1.weight" => return Some(qkv_proj(i)),
        "attn.q_ln.weight" => "self_attn.q_norm.weight",
        "attn.k_ln.weight" => "self_attn.k_norm.weight",
        "attn.out_proj.weight" => "self_attn.o_proj.weight",
        "ffn.0.weight" => "post_attention_layernorm.weight",
        "ffn.0.bias" => "post_attention_layernorm.bias",
        "ffn.1.weight" => return Some(gate_up_proj(i)),
        "ffn.3.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("layers.{i}.{mapped}"))
}

/// Every name of a package state dict mapped to transformers', or an error listing the names
/// esmbed does not know (a bias the published models lack, ESM3's structure tensors): none may
/// be dropped silently.
pub(super) fn hf_names<'a>(
    names: impl Iterator<Item = &'a String>,
    source_name: &str,
) -> Result<HashMap<String, String>> {
    let (mut mapped, mut unknown) = (HashMap::new(), Vec::new());
    for name in names {
        match hf_name(name) {
            Some(hf) => {
                mapped.insert(hf, name.clone());
            }
            None => unknown.push(name.clone()),
        }
    }
    if unknown.is_empty() {
        return Ok(mapped);
    }
    unknown.sort();
    let shown = unknown
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::model(
        source_name,
        format!(
            "an esm-package state dict with {} tensors an ESM C does not have ({shown}{}): \
             esmbed reads the package's ESM C (300M, 600M), not ESM3 or modified models",
            unknown.len(),
            if unknown.len() > 5 { ", …" } else { "" }
        ),
    ))
}

/// The config of a package checkpoint, from its shapes (`shape` of a mapped name). The heads are
/// 64 wide in every ESM C the package ships (300M: 15, 600M: 18, 6B: 40), which the state dict
/// does not record.
pub(super) fn config(
    names: &HashMap<String, String>,
    shape: impl Fn(&str) -> Option<Vec<usize>>,
    source_name: &str,
) -> Result<EsmConfig> {
    // At least 1: the marker tensor is block 0's.
    let layers = super::names::block_count(names.keys(), "layers.").unwrap_or(0);
    let dims = |name: &str, package_name: &str| {
        shape(name).ok_or_else(|| Error::MissingTensor {
            source_name: source_name.to_string(),
            tensor: package_name.to_string(),
            tried: vec![name.to_string()],
        })
    };
    let hidden = dims("embed_tokens.weight", "embed.weight")?[1];
    let gate_up = dims(&gate_up_proj(0), "transformer.blocks.0.ffn.1.weight")?[0];
    if hidden % 64 != 0 {
        return Err(Error::model(
            source_name,
            format!(
                "an esm-package ESM C of width {hidden}, not a multiple of its 64-wide heads: \
                 not one of the package's models"
            ),
        ));
    }
    Ok(EsmConfig::esmc(layers, hidden, hidden / 64, gate_up / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_map_to_transformers_names() {
        let cases = [
            ("embed.weight", "embed_tokens.weight"),
            ("transformer.norm.weight", "norm.weight"),
            (
                "transformer.blocks.3.attn.layernorm_qkv.0.bias",
                "layers.3.input_layernorm.bias",
            ),
            (
                "transformer.blocks.3.attn.layernorm_qkv.1.weight",
                "layers.3.self_attn.qkv_proj.weight",
            ),
            (
                "transformer.blocks.0.attn.k_ln.weight",
                "layers.0.self_attn.k_norm.weight",
            ),
            (
                "transformer.blocks.11.ffn.1.weight",
                "layers.11.mlp.gate_up_proj.weight",
            ),
            (
                "transformer.blocks.11.ffn.3.weight",
                "layers.11.mlp.down_proj.weight",
            ),
            ("sequence_head.3.bias", "lm_head.decoder.bias"),
            ("sequence_head.2.weight", "lm_head.layer_norm.weight"),
        ];
        for (package, hf) in cases {
            assert_eq!(hf_name(package).as_deref(), Some(hf), "{package}");
        }
        assert_eq!(hf_name("transformer.blocks.0.attn.rotary.inv_freq"), None);
        assert_eq!(hf_name("sequence_head.1.weight"), None);
    }

    #[test]
    fn unknown_names_are_refused_not_dropped() {
        let names = [
            "embed.weight".to_string(),
            "transformer.blocks.0.attn.out_proj.bias".to_string(),
        ];
        let err = hf_names(names.iter(), "x.pth").unwrap_err().to_string();
        assert!(
            err.contains("out_proj.bias") && err.contains("ESM3"),
            "{err}"
        );
        assert_eq!(hf_names(names[..1].iter(), "x.pth").unwrap().len(), 1);
    }
}
