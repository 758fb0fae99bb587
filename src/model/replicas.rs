//! A model as a job loads it: from what the user typed, on every device of the job, with the
//! identity its output records. Every front (the CLI, SQL, Python) loads through here.

use candle_core::{DType, Device};

use super::{Checkpoint, EsmConfig, Model, ModelSource};
use crate::error::Result;

/// Whether a job loads the masked-LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Embeddings only.
    No,
    /// Where the checkpoint has one (`esmbed sql`: the score functions work then).
    IfPresent,
    /// Scores: a checkpoint without one is an error naming what is missing.
    Required,
}

/// A model loaded on every device of a job.
pub struct LoadedModel {
    /// One replica per device, in device order (copies of the first: identical results).
    pub replicas: Vec<Model>,
    /// The model as the user named it.
    pub name: String,
    /// Fingerprint of its weights (for resume checks and the output's metadata).
    pub fingerprint: String,
}

/// Load `spec` (hub id, directory, `.pt`, short name or `random:SHAPE`) on `devices[0]` with the
/// masked-LM head as `head` says, and replicate it to the other devices.
pub fn load_model(spec: &str, devices: &[Device], dtype: DType, head: Head) -> Result<LoadedModel> {
    let source = ModelSource::parse(spec)?;
    let (model, fingerprint) = match &source {
        ModelSource::Random(shape) => {
            let config = EsmConfig::published(shape).expect("checked by parse");
            let model = Model::random(&config, &devices[0], dtype, 0)?;
            (model, random_fingerprint(shape))
        }
        _ => {
            let checkpoint = Checkpoint::open(&source)?;
            let fingerprint = checkpoint.fingerprint()?;
            let with_head = match head {
                Head::No => false,
                Head::IfPresent => checkpoint.has_lm_head(),
                Head::Required => true,
            };
            let model = Model::load(&checkpoint, &devices[0], dtype, with_head)?;
            (model, fingerprint)
        }
    };
    Ok(LoadedModel {
        replicas: model.replicate_to(devices)?,
        name: source.display_name(),
        fingerprint,
    })
}

/// A model's config, display name and fingerprint, without loading its weights (safetensors are
/// mapped, not read; a `.pt` is opened for its tensor index).
pub fn describe_model(spec: &str) -> Result<(EsmConfig, String, String)> {
    let source = ModelSource::parse(spec)?;
    Ok(match &source {
        ModelSource::Random(shape) => (
            EsmConfig::published(shape).expect("checked by parse"),
            source.display_name(),
            random_fingerprint(shape),
        ),
        _ => {
            let checkpoint = Checkpoint::open(&source)?;
            let fingerprint = checkpoint.fingerprint()?;
            (checkpoint.config, source.display_name(), fingerprint)
        }
    })
}

/// Random weights are seeded (seed 0): the shape names them.
fn random_fingerprint(shape: &str) -> String {
    format!("random:{shape}:seed0")
}
