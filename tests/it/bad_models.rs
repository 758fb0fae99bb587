//! Broken checkpoints are errors that name the tensor or file at fault, never panics.

use crate::common::{edited_model, fixture_dir};
use esmbed::{Checkpoint, DType, Device, Esm2, ModelSource};

fn load_error(dir: &std::path::Path) -> String {
    let checkpoint = match Checkpoint::open(&ModelSource::HfDir(dir.to_path_buf())) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    Esm2::load(&checkpoint, &Device::Cpu, DType::F32)
        .err()
        .expect("loading must fail")
        .to_string()
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_model("missing", |t| {
        t.remove("esm.encoder.layer.1.intermediate.dense.weight");
    });
    let err = load_error(&dir);
    assert!(
        err.contains("encoder.layer.1.intermediate.dense.weight"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn misshapen_tensor_is_named_with_both_shapes() {
    let dir = edited_model("shape", |t| {
        let w = t["esm.encoder.layer.0.attention.self.key.weight"]
            .narrow(0, 0, 32)
            .unwrap();
        t.insert("esm.encoder.layer.0.attention.self.key.weight".into(), w);
    });
    let err = load_error(&dir);
    assert!(
        err.contains("encoder.layer.0.attention.self.key.weight"),
        "{err}"
    );
    assert!(
        err.contains("[32, 64]") && err.contains("[64, 64]"),
        "{err}"
    );
}

#[test]
fn directory_without_weights_or_config() {
    let dir = std::env::temp_dir().join(format!("esmbed-bad-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        fixture_dir("tiny_h16").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("no weights") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn esm1b_config_is_rejected() {
    let dir = edited_model("esm1b", |_| {});
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config.replace("\"rotary\"", "\"absolute\"");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("ESM-1b"), "{err}");
}
