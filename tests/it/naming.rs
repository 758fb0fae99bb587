//! Whatever transformers loads, esmbed loads: tiny_h16's weights under every naming
//! transformers accepts (`tests/fixtures/naming/`, each checked by the fixture script to load in
//! transformers to the same model) give bitwise the plain fixture's outputs; a checkpoint without
//! `inv_freq` matches transformers' computed frequencies; one parameter under two names with
//! different values is refused; a truly missing tensor names what was tried.

use crate::common::*;
use esmbed::{Checkpoint, DType, Device, Model, ModelSource, PackedBatch};

fn load(dir: &std::path::Path) -> esmbed::Result<Model> {
    let checkpoint = Checkpoint::open(&ModelSource::HfDir(dir.to_path_buf()))?;
    Model::load(&checkpoint, &Device::Cpu, DType::F32, false)
}

/// Every layer's hidden states of the fixture's cases, in one pack.
fn hidden(model: &Model, fixture: &Fixture) -> Vec<Vec<f32>> {
    let batch = PackedBatch::from_sequences(fixture.cases.iter().map(|c| &c.tokens[..]));
    let layers: Vec<usize> = (0..=fixture.num_layers).collect();
    model
        .forward(&batch, &layers)
        .unwrap()
        .iter()
        .map(|h| h.flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn every_naming_transformers_accepts_gives_the_plain_fixtures_numbers() {
    let fixture = Fixture::load("tiny_h16");
    let want = hidden(&fixture.hf_model(), &fixture);
    for variant in ["legacy_gamma_beta", "sharded_model_level", "bare_bin"] {
        let dir = fixture_dir(&format!("naming/{variant}"));
        let model = load(&dir).unwrap_or_else(|e| panic!("{variant}: {e}"));
        let got = hidden(&model, &fixture);
        for (layer, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a == b, "{variant}: layer {layer} differs from tiny_h16");
        }
    }
}

#[test]
fn without_inv_freq_the_frequencies_are_computed_as_transformers_does() {
    let fixture = Fixture::load("naming/no_inv_freq");
    let model = fixture.hf_model();
    let batch = PackedBatch::from_sequences(fixture.cases.iter().map(|c| &c.tokens[..]));
    let n = fixture.num_layers;
    let plain = Fixture::load("tiny_h16").hf_model();
    let h = model.forward(&batch, &[n]).unwrap().remove(0);
    let hp = plain.forward(&batch, &[n]).unwrap().remove(0);
    let pooling = esmbed::Pooling {
        mean: true,
        bos: false,
        per_residue: false,
    };
    let means = esmbed::pool::pool(&h, &batch, n, pooling)
        .unwrap()
        .mean
        .unwrap();
    let plain_means = esmbed::pool::pool(&hp, &batch, n, pooling)
        .unwrap()
        .mean
        .unwrap();
    assert_ne!(
        means, plain_means,
        "the fixture must be sensitive to inv_freq"
    );
    let size = fixture.hidden_size;
    for (i, case) in fixture.cases.iter().enumerate() {
        let reference = fixture.get_vec(&format!("{}.mean.{n}", case.id));
        let got = &means[i * size..(i + 1) * size];
        assert_close_vec(got, &reference, 1e-4, &format!("no_inv_freq/{}", case.id));
    }
}

#[test]
fn one_parameter_under_two_names_must_agree() {
    let weight = "esm.encoder.layer.0.LayerNorm.weight";
    // The same values under both names: fine, and the numbers are the plain fixture's.
    let same = edited_model("same", |t| {
        let w = t[weight].clone();
        t.insert("esm.encoder.layer.0.LayerNorm.gamma".into(), w);
    });
    let fixture = Fixture::load("tiny_h16");
    assert!(hidden(&load(&same).unwrap(), &fixture) == hidden(&fixture.hf_model(), &fixture));

    // Different values: refused, naming both.
    let differ = edited_model("differ", |t| {
        let w = (t[weight].clone() + 1.0).unwrap();
        t.insert("esm.encoder.layer.0.LayerNorm.gamma".into(), w);
    });
    let err = load(&differ)
        .err()
        .expect("conflicting names are refused")
        .to_string();
    assert!(err.contains("esm.encoder.layer.0.LayerNorm.gamma"), "{err}");
    assert!(err.contains(weight), "{err}");
    assert!(err.contains("different values"), "{err}");

    // Per-layer inv_freq are one parameter: layers that disagree are refused too.
    let inv = edited_model("inv", |t| {
        let key = "esm.encoder.layer.2.attention.self.rotary_embeddings.inv_freq";
        let v = (t[key].clone() * 2.0).unwrap();
        t.insert(key.into(), v);
    });
    let err = load(&inv)
        .err()
        .expect("disagreeing inv_freq are refused")
        .to_string();
    assert!(
        err.contains("layer.2.attention.self.rotary_embeddings.inv_freq"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_lists_the_names_tried() {
    let dir = edited_model("missing", |t| {
        t.remove("esm.encoder.layer.0.attention.LayerNorm.weight");
    });
    let err = load(&dir)
        .err()
        .expect("a missing tensor is an error")
        .to_string();
    assert!(
        err.contains("encoder.layer.0.attention.LayerNorm.weight"),
        "{err}"
    );
    assert!(
        err.contains("esm.encoder.layer.0.attention.LayerNorm.gamma"),
        "{err}"
    );
    assert!(err.contains("looked for"), "{err}");
}

#[test]
fn shard_names_stay_in_the_model_directory() {
    let dir = scratch("naming-escape");
    let src = fixture_dir("tiny_h16");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let index =
        r#"{"weight_map": {"embeddings.word_embeddings.weight": "../tiny_h16/model.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    let err = load(&dir)
        .err()
        .expect("an escaping shard is refused")
        .to_string();
    assert!(
        err.contains("not a file name in the model directory"),
        "{err}"
    );
}
