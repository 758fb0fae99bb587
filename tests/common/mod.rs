//! Shared helpers of the integration tests: fixture models and reference outputs, tolerances.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use esmbed::{Checkpoint, DType, Device, Esm2, ModelSource};

/// One reference case of `reference.json`.
#[derive(Debug, serde::Deserialize)]
pub struct Case {
    pub id: String,
    pub input: Option<String>,
    pub tokens: Vec<u32>,
    pub length: usize,
}

#[derive(serde::Deserialize)]
struct ReferenceJson {
    num_layers: usize,
    hidden_size: usize,
    cases: Vec<Case>,
}

/// A fixture model directory with its transformers reference outputs.
pub struct Fixture {
    pub dir: PathBuf,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub cases: Vec<Case>,
    tensors: HashMap<String, candle_core::Tensor>,
}

/// `tests/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let dir = fixture_dir(name);
        let json = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let parsed: ReferenceJson = serde_json::from_str(&json).unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        Self {
            dir,
            num_layers: parsed.num_layers,
            hidden_size: parsed.hidden_size,
            cases: parsed.cases,
            tensors,
        }
    }

    /// The model loaded from the HF directory, f32 on the CPU.
    pub fn hf_model(&self) -> Esm2 {
        let checkpoint = Checkpoint::open(&ModelSource::HfDir(self.dir.clone())).unwrap();
        Esm2::load(&checkpoint, &Device::Cpu, DType::F32).unwrap()
    }

    pub fn get(&self, key: &str) -> Option<candle_core::Tensor> {
        self.tensors.get(key).cloned()
    }

    pub fn get_vec(&self, key: &str) -> Vec<f32> {
        self.get(key)
            .unwrap_or_else(|| panic!("reference has no {key}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

/// max |a - b| / max |b|.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

pub fn assert_close_vec(a: &[f32], b: &[f32], tolerance: f32, what: &str) -> f32 {
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let err = relative_error(a, b);
    assert!(
        err <= tolerance,
        "{what}: relative error {err:.3e} > {tolerance:.0e}"
    );
    err
}

pub fn assert_close(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    tolerance: f32,
    what: &str,
) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_close_vec(&a, &b, tolerance, what)
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}
