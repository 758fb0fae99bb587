//! Hub ids resolve through the HuggingFace cache layout; offline, a missing model is a clear
//! error. (No download is attempted here: these machines cannot reach the hub.)

use crate::common::fixture_dir;
use esmbed::{Checkpoint, HubOptions, ModelSource};

#[test]
fn hub_ids_resolve_from_the_cache_and_fail_clearly_offline() {
    // The cache and the offline flag are passed in, not set in the process environment.
    let home = std::env::temp_dir().join(format!("esmbed-hf-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let hub = HubOptions {
        cache_dir: home.join("hub"),
        offline: true,
    };

    let id = "facebook/esm2_t6_8M_UR50D";
    let err = Checkpoint::open_with(&ModelSource::Hub(id.into()), &hub)
        .err()
        .expect("an empty cache cannot provide the model")
        .to_string();
    assert!(err.contains(id), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("huggingface-cli download"), "{err}");
    assert!(err.contains(&home.display().to_string()), "{err}");

    // The same layout huggingface_hub writes: refs/main names the snapshot.
    let repo = home.join("hub/models--esmbed-test--tiny_h16");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir("tiny_h16").join(file), snapshot.join(file)).unwrap();
    }
    let source = ModelSource::parse("esmbed-test/tiny_h16").unwrap();
    assert_eq!(source, ModelSource::Hub("esmbed-test/tiny_h16".into()));
    let checkpoint = Checkpoint::open_with(&source, &hub).unwrap();
    assert_eq!(checkpoint.config.num_hidden_layers, 3);
    assert_eq!(checkpoint.source_name, "esmbed-test/tiny_h16");

    // A snapshot without weights is not a usable cache entry.
    std::fs::remove_file(snapshot.join("model.safetensors")).unwrap();
    let err = Checkpoint::open_with(&source, &hub)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");

    // The `esm` package's ESM C repositories: no config.json, the weights under data/weights/.
    let id = "EvolutionaryScale/esmc-300m-2024-12";
    let repo = home.join("hub/models--EvolutionaryScale--esmc-300m-2024-12");
    let snapshot = repo.join("snapshots/fedcba9876543210");
    std::fs::create_dir_all(snapshot.join("data/weights")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "fedcba9876543210").unwrap();
    let pth = fixture_dir("naming/esmc_package/tiny_esmc.pth");
    std::fs::copy(pth, snapshot.join("data/weights/esmc_300m_2024_12_v0.pth")).unwrap();
    // The repository's own config.json is not transformers'.
    std::fs::write(
        snapshot.join("config.json"),
        r#"{"model_type": "esmc_300m"}"#,
    )
    .unwrap();
    let checkpoint = Checkpoint::open_with(&ModelSource::parse(id).unwrap(), &hub).unwrap();
    assert_eq!(checkpoint.config.family, esmbed::Family::Esmc);
    assert_eq!(checkpoint.config.num_hidden_layers, 2);
    assert_eq!(checkpoint.source_name, id);
    // As typed in another case, the same cache entry.
    let lower = ModelSource::Hub(id.to_lowercase());
    assert!(Checkpoint::open_with(&lower, &hub).is_ok());
    std::fs::remove_dir_all(&home).unwrap();
}
