//! Checkpoint files beside a valid tiny config: `model.safetensors` (header, offsets, dtypes,
//! shapes) or `model.safetensors.index.json` (the shard index), opened and loaded as a model.
//! The first byte picks which file the rest becomes.
#![no_main]

use std::path::Path;

const CONFIG: &str = r#"{"model_type": "esm", "hidden_size": 8, "num_hidden_layers": 1,
  "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 33,
  "max_position_embeddings": 1026, "position_embedding_type": "rotary", "token_dropout": true,
  "mask_token_id": 32, "pad_token_id": 1, "layer_norm_eps": 1e-5, "emb_layer_norm_before": false, "hidden_act": "gelu", "rope_theta": 10000.0}"#;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("esmbed-fuzz-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let file = if which % 2 == 0 {
        "model.safetensors"
    } else {
        "model.safetensors.index.json"
    };
    std::fs::write(dir.join(file), rest).unwrap();
    open_and_load(&dir);
});

fn open_and_load(dir: &Path) {
    let source = esmbed::ModelSource::HfDir(dir.to_path_buf());
    let Ok(checkpoint) = esmbed::Checkpoint::open(&source) else {
        return;
    };
    let _ = esmbed::Esm2::load(&checkpoint, &esmbed::Device::Cpu, esmbed::DType::F32);
}
