//! esmbed against HF transformers' `EsmModel` on the same weights.
//!
//! The fixtures under `tests/fixtures/` were produced by `tests/fixtures/make_reference.py` from
//! transformers (f32, CPU, each sequence alone): random-weight ESM-2 models with head dim 16 and 64
//! (one stored as bf16 without the `esm.` prefix), and every layer's hidden states, mean and BOS
//! vectors for sequences of length 1, 2, 1022, rare residues, lowercase, a trailing `*`, and one
//! with `<mask>` tokens. Here all of them run through esmbed in one pack and must agree within
//! 1e-4 relative (max abs error over the tensor / max abs value of the reference).

use crate::common::*;
use esmbed::{Checkpoint, DType, Device, Esm2, ModelSource, PackedBatch, Pooling, Tokenizer};

/// The agreed tolerance: max |esmbed - reference| / max |reference| per tensor.
const TOLERANCE: f32 = 1e-4;

fn check_fixture(name: &str) {
    let fixture = Fixture::load(name);
    let model = fixture.hf_model();
    let n = fixture.num_layers;
    let tokenizer = Tokenizer::for_family(model.config().family, Default::default());
    for case in &fixture.cases {
        if let Some(input) = &case.input {
            assert_eq!(
                tokenizer.encode(input).unwrap(),
                case.tokens,
                "{name}/{}: tokenization",
                case.id
            );
        }
    }

    // Every case in one pack: the reference ran each alone, so this also checks packing.
    let batch = PackedBatch::from_sequences(fixture.cases.iter().map(|c| &c.tokens[..]));
    let layers: Vec<usize> = (0..=n).collect();
    let hidden = model.forward(&batch, &layers).unwrap();
    let all = Pooling {
        mean: true,
        bos: true,
        per_residue: true,
    };
    let mut worst = 0f32;
    for (layer, h) in layers.iter().zip(&hidden) {
        let pooled = esmbed::pool::pool(h, &batch, *layer, all).unwrap();
        let hsize = pooled.hidden;
        let mut residue_offset = 0;
        for (i, case) in fixture.cases.iter().enumerate() {
            let range = batch.range(i);
            let l = case.length;
            let what = |kind: &str| format!("{name}/{}/{kind}/layer {layer}", case.id);

            if let Some(reference) = fixture.get(&format!("{}.hidden.{layer}", case.id)) {
                let got = h.narrow(0, range.start, range.len()).unwrap();
                worst = worst.max(assert_close(&got, &reference, TOLERANCE, &what("hidden")));
            }
            let mean = pooled.mean.as_ref().unwrap()[i * hsize..(i + 1) * hsize].to_vec();
            let reference = fixture.get_vec(&format!("{}.mean.{layer}", case.id));
            worst = worst.max(assert_close_vec(
                &mean,
                &reference,
                TOLERANCE,
                &what("mean"),
            ));
            let bos = pooled.bos.as_ref().unwrap()[i * hsize..(i + 1) * hsize].to_vec();
            let reference = fixture.get_vec(&format!("{}.bos.{layer}", case.id));
            worst = worst.max(assert_close_vec(&bos, &reference, TOLERANCE, &what("bos")));

            // Per-residue output = the reference hidden rows 1..=L.
            let residues = &pooled.residues.as_ref().unwrap()
                [residue_offset * hsize..(residue_offset + l) * hsize];
            residue_offset += l;
            if let Some(reference) = fixture.get(&format!("{}.hidden.{layer}", case.id)) {
                let reference = reference.narrow(0, 1, l).unwrap();
                let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
                worst = worst.max(assert_close_vec(
                    residues,
                    &reference,
                    TOLERANCE,
                    &what("per-residue"),
                ));
            }
        }
    }
    eprintln!("{name}: worst relative error {worst:.2e} (tolerance {TOLERANCE:.0e})");
}

#[test]
fn tiny_h16_matches_transformers() {
    check_fixture("tiny_h16");
}

#[test]
fn tiny_h64_matches_transformers() {
    check_fixture("tiny_h64");
}

#[test]
fn bf16_checkpoint_without_prefix_matches_transformers() {
    check_fixture("tiny_h16_bf16");
}

#[test]
fn esmc_masked_lm_directory_matches_transformers() {
    check_fixture("tiny_esmc");
}

#[test]
fn esmc_base_model_sharded_without_prefix_matches_transformers() {
    check_fixture("tiny_esmc_h16");
}

#[test]
fn fair_esm_pt_and_hf_directory_give_identical_outputs() {
    for name in ["tiny_h16", "tiny_h64"] {
        let fixture = Fixture::load(name);
        let hf = fixture.hf_model();
        let pt_path = fixture.dir.join("model.pt");
        let source = ModelSource::parse(pt_path.to_str().unwrap()).unwrap();
        assert_eq!(source, ModelSource::TorchFile(pt_path.clone()));
        let checkpoint = Checkpoint::open(&source).unwrap();
        assert_eq!(checkpoint.config.num_hidden_layers, fixture.num_layers);
        assert_eq!(checkpoint.config.hidden_size, fixture.hidden_size);
        let pt = Esm2::load(&checkpoint, &Device::Cpu, DType::F32).unwrap();
        let batch = PackedBatch::from_sequences(fixture.cases.iter().map(|c| &c.tokens[..]));
        let layers: Vec<usize> = (0..=fixture.num_layers).collect();
        let a = hf.forward(&batch, &layers).unwrap();
        let b = pt.forward(&batch, &layers).unwrap();
        assert_layers_bitwise(&a, &b, &format!("{name}: HF and .pt loads"));
    }
}

/// The `esm` package's `.pth` of tiny_esmc (`tests/fixtures/make_esmc_pth.py`, whose mapping the
/// package's own forward checked against transformers): the same model as the HF directory,
/// bitwise, every layer and the head's log-probabilities.
#[test]
fn esm_package_pth_and_hf_directory_give_identical_outputs() {
    let fixture = Fixture::load("tiny_esmc");
    let path = fixture_dir("naming/esmc_package/tiny_esmc.pth");
    let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
    // The package's hub layout: a directory with the weights under data/weights/.
    let repo = scratch("esmc-package-repo");
    std::fs::create_dir_all(repo.join("data/weights")).unwrap();
    let in_repo = repo.join("data/weights/esmc_tiny_2024_12_v0.pth");
    std::fs::copy(&path, &in_repo).unwrap();
    std::fs::write(repo.join("config.json"), r#"{"model_type": "esmc_300m"}"#).unwrap();
    let from_dir = ModelSource::parse(repo.to_str().unwrap()).unwrap();
    assert_eq!(from_dir, ModelSource::TorchFile(in_repo));
    let checkpoint = Checkpoint::open(&source).unwrap();
    assert_eq!(checkpoint.config.family, esmbed::Family::Esmc);
    assert_eq!(checkpoint.config.num_attention_heads, 2);
    assert_eq!(checkpoint.config.intermediate_size, 320);
    assert!(checkpoint.has_lm_head());
    let pth = esmbed::Model::load(&checkpoint, &Device::Cpu, DType::F32, true).unwrap();
    let hf = {
        let dir = ModelSource::HfDir(fixture.dir.clone());
        esmbed::Model::load(
            &Checkpoint::open(&dir).unwrap(),
            &Device::Cpu,
            DType::F32,
            true,
        )
        .unwrap()
    };
    let batch = PackedBatch::from_sequences(fixture.cases.iter().map(|c| &c.tokens[..]));
    let layers: Vec<usize> = (0..=fixture.num_layers).collect();
    let a = hf.forward(&batch, &layers).unwrap();
    let b = pth.forward(&batch, &layers).unwrap();
    assert_layers_bitwise(&a, &b, "HF and .pth loads");
    let at = esmbed::engine::LogProbsAt::Residues;
    assert_eq!(
        hf.log_probs(&batch, at).unwrap(),
        pth.log_probs(&batch, at).unwrap(),
        "the head"
    );
}

/// Every layer of two loads of one model, bit for bit.
fn assert_layers_bitwise(a: &[candle_core::Tensor], b: &[candle_core::Tensor], what: &str) {
    for (layer, (a, b)) in a.iter().zip(b).enumerate() {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{what}: layer {layer} differs");
    }
}

#[test]
fn checkpoint_inv_freq_is_used() {
    // The fixtures store fp16-rounded inv_freq, as real ESM-2 checkpoints do. A model that
    // recomputed inv_freq would drift from the reference at long positions; make sure the
    // fixture is sensitive to it, so the tolerance test above really checks the stored values.
    let fixture = Fixture::load("tiny_h64");
    let checkpoint = Checkpoint::open(&ModelSource::HfDir(fixture.dir.clone())).unwrap();
    let stored: Vec<f32> = checkpoint
        .load_any(
            "encoder.layer.0.attention.self.rotary_embeddings.inv_freq",
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = fixture.hidden_size / 2; // head_dim of tiny_h64 (2 heads)
    let computed: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / 10000f32.powf(i as f32 / d as f32))
        .collect();
    assert_ne!(
        stored, computed,
        "fixture inv_freq should differ from a recomputation"
    );
}
