//! `config.json`: parsing and validation of an ESM-2 config, and what the model derives from it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(config) = serde_json::from_slice::<esmbed::EsmConfig>(data) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let _ = config.head_dim();
    let _ = config.flops_per_token(300);
    for layer in [-1i64, 0, 1, i64::MIN, i64::MAX] {
        let _ = config.resolve_layer(layer);
    }
});
