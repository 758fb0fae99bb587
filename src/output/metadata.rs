//! What an output records about the job that wrote it, as typed structs: the footer metadata
//! every Parquet file carries (readers see which model and layers made the vectors), and the job
//! identity in the manifest (a resumed job must be the same job).

use serde::{Deserialize, Serialize};

use super::columns::OutputDType;
use crate::prepare::LongPolicy;

/// How the vectors were pooled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolingMeta {
    /// What the unsuffixed `embedding` columns hold.
    pub embedding: String,
    /// Whether `bos` columns are present.
    pub bos: bool,
    /// Whether per-residue columns are present.
    pub per_residue: bool,
}

/// The settings that shape every vector, in both the footer metadata and the job identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Pooling.
    pub pooling: PoolingMeta,
    /// The dtype the model computed in.
    pub compute_dtype: String,
    /// The dtype of the vectors.
    pub output_dtype: OutputDType,
    /// `--max-length`.
    pub max_length: usize,
    /// `--long`.
    pub long: LongPolicy,
    /// `--unknown`.
    pub unknown: String,
    /// What a score job computes (`esmbed score`), `None` for embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<String>,
}

/// esmbed's footer metadata (key [`super::METADATA_KEY`]) of every output file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMetadata {
    /// esmbed version that wrote the file.
    pub esmbed_version: String,
    /// The model as the user named it.
    pub model: String,
    /// Fingerprint of its weights.
    pub model_fingerprint: String,
    /// Transformer layers of the model.
    pub num_layers: usize,
    /// Embedding width.
    pub hidden_size: usize,
    /// Layers in the file (resolved fair-esm numbers).
    pub layers: Vec<usize>,
    /// The layer of the unsuffixed columns.
    pub primary_layer: usize,
    /// How the vectors were computed.
    #[serde(flatten)]
    pub settings: Settings,
}

/// One input of a job, as its identity records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputIdentity {
    /// Path or URL.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

impl InputIdentity {
    /// The identities of a job's inputs, in order.
    pub fn of(inputs: &crate::input::Inputs) -> Vec<Self> {
        inputs
            .files
            .iter()
            .map(|f| Self {
                path: f.name(),
                size: f.size(),
            })
            .collect()
    }
}

/// Everything that shapes a job's result: `--resume` requires the same. The token budget and
/// the number of devices do not belong here (packing does not change a sequence's numbers), so a
/// resumed job may lower `--tokens-per-batch` or run elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobIdentity {
    /// The inputs.
    pub inputs: Vec<InputIdentity>,
    /// `--seq-column`.
    pub seq_column: String,
    /// `--id-column`.
    pub id_column: String,
    /// Fingerprint of the model's weights.
    pub model_fingerprint: String,
    /// Layers (resolved).
    pub layers: Vec<usize>,
    /// How the vectors are computed.
    #[serde(flatten)]
    pub settings: Settings,
    /// `--rows-per-part` (part boundaries).
    pub rows_per_part: usize,
    /// `--dedupe`.
    pub dedupe: bool,
}

impl JobIdentity {
    /// The names of the settings in which `other` differs from this job.
    pub fn differences(&self, other: &JobIdentity) -> Vec<&'static str> {
        let (a, b) = (&self.settings, &other.settings);
        let checks = [
            ("inputs", self.inputs == other.inputs),
            ("seq_column", self.seq_column == other.seq_column),
            ("id_column", self.id_column == other.id_column),
            (
                "model_fingerprint",
                self.model_fingerprint == other.model_fingerprint,
            ),
            ("layers", self.layers == other.layers),
            ("pooling", a.pooling == b.pooling),
            ("compute_dtype", a.compute_dtype == b.compute_dtype),
            ("output_dtype", a.output_dtype == b.output_dtype),
            ("max_length", a.max_length == b.max_length),
            ("long", a.long == b.long),
            ("unknown", a.unknown == b.unknown),
            ("scores", a.scores == b.scores),
            ("rows_per_part", self.rows_per_part == other.rows_per_part),
            ("dedupe", self.dedupe == other.dedupe),
        ];
        checks
            .into_iter()
            .filter(|(_, same)| !same)
            .map(|(name, _)| name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> JobIdentity {
        JobIdentity {
            inputs: vec![InputIdentity {
                path: "a.fasta".into(),
                size: 10,
            }],
            seq_column: "sequence".into(),
            id_column: "id".into(),
            model_fingerprint: "sha256:00".into(),
            layers: vec![6],
            settings: Settings {
                pooling: PoolingMeta {
                    embedding: "mean".into(),
                    bos: false,
                    per_residue: false,
                },
                compute_dtype: "f32".into(),
                output_dtype: OutputDType::F32,
                max_length: 1022,
                long: LongPolicy::Truncate,
                unknown: "error".into(),
                scores: None,
            },
            rows_per_part: 100,
            dedupe: false,
        }
    }

    #[test]
    fn differences_name_the_settings() {
        let a = identity();
        let mut b = identity();
        assert!(a.differences(&b).is_empty());
        b.layers = vec![3, 6];
        b.settings.max_length = 500;
        assert_eq!(a.differences(&b), vec!["layers", "max_length"]);
        let text = serde_json::to_string(&a).unwrap();
        let back: JobIdentity = serde_json::from_str(&text).unwrap();
        assert_eq!(back, a);
    }
}
