//! What a model function (`esm_embed`, `esm_tokens`, `esm_pll`, `esm_score`) stands for: which
//! model and which row policy, apart from where it runs.
//!
//! A local session runs the functions over its own [`EmbedService`]. On a cluster the client and
//! the scheduler only plan them, and the executors run them: the function travels by name with
//! its [`FunctionSpec`] (the model's identity and the client's row policy), and an executor
//! serving other weights refuses the task instead of mixing vectors of two models. The spec also
//! rides on each function's output field as metadata ([`SPEC_METADATA_KEY`]), which is how a
//! plan codec reads it back from a function DataFusion has wrapped, and how an embedding column
//! written to Parquet says which model made it.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::service::{BadRows, EmbedService};
use crate::error::{Error, Result};
use crate::prepare::LongPolicy;
use crate::tokenize::UnknownResidue;

/// The output field metadata key holding a model function's [`FunctionSpec`] (JSON).
pub const SPEC_METADATA_KEY: &str = "esmbed.function";

/// Which weights a model function uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The model as the user named it (`facebook/esm2_t33_650M_UR50D`, a directory).
    pub name: String,
    /// The fingerprint of its weights ([`crate::model::Checkpoint::fingerprint`]).
    pub fingerprint: String,
    /// Width of its embeddings.
    pub hidden: usize,
    /// Its number of layers.
    pub layers: usize,
    /// The dtype its vectors are computed in ([`crate::devices::dtype_label`]: `f32`, `bf16`,
    /// `f16`, `f8e4m3`); in a cluster client's plan also `auto`, each executor's default for
    /// its device. An executor computes in the dtype the client named, or under `auto` in its
    /// device's default: an FP8 or f16 executor never joins a bf16 query unasked (with `auto`,
    /// CPU and GPU executors still differ: f32 and bf16).
    #[serde(default = "auto")]
    pub dtype: String,
}

fn auto() -> String {
    "auto".into()
}

impl ModelIdentity {
    /// Whether two identities name the same weights.
    pub fn same_weights(&self, other: &ModelIdentity) -> bool {
        self.fingerprint == other.fingerprint
    }

    /// Whether this served identity (a concrete dtype, `is_default` when it is its devices'
    /// `--dtype auto`) is what `planned` asks for: the same weights, and its dtype or `auto`.
    pub fn serves(&self, planned: &ModelIdentity, is_default: bool) -> bool {
        self.same_weights(planned)
            && (planned.dtype == self.dtype || (planned.dtype == "auto" && is_default))
    }
}

impl std::fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.fingerprint)
    }
}

/// How a function treats the rows it is given (`esmbed sql`'s `--unknown`, `--max-length`,
/// `--long`, `--lenient`): a property of the query, so the client's settings hold on every
/// executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowPolicy {
    /// Characters outside the alphabet.
    pub unknown: UnknownResidue,
    /// Longest sequence embedded whole, in residues.
    pub max_length: usize,
    /// Beyond `max_length`.
    pub long: LongPolicy,
    /// Rows that cannot be embedded: an error or NULL.
    pub bad_rows: BadRows,
}

/// A model function's model and row policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// The weights.
    pub model: ModelIdentity,
    /// The row policy.
    pub policy: RowPolicy,
}

impl FunctionSpec {
    /// As output field metadata.
    pub fn metadata(&self) -> HashMap<String, String> {
        let json = serde_json::to_string(self).expect("a spec serializes");
        HashMap::from([(SPEC_METADATA_KEY.to_string(), json)])
    }

    /// From output field metadata, if it holds a spec.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Option<Result<FunctionSpec>> {
        metadata
            .get(SPEC_METADATA_KEY)
            .map(|json| Self::decode(json.as_bytes()))
    }

    /// From its JSON encoding.
    pub fn decode(bytes: &[u8]) -> Result<FunctionSpec> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::Internal(format!(
                "a model function's description does not parse ({e}): are the client, scheduler \
                 and executors the same esmbed version?"
            ))
        })
    }

    /// Its JSON encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a spec serializes")
    }
}

/// Where a model function's work happens.
#[derive(Debug, Clone)]
pub enum FunctionModel {
    /// On this process's devices.
    Served(Arc<EmbedService>),
    /// Elsewhere (a cluster's executors): this process only plans the function.
    Planned(Arc<FunctionSpec>),
    /// Planned for other weights than this process serves: the function plans, and fails when
    /// called, naming both (a cluster task fails with that message rather than an opaque
    /// decoding error).
    Mismatched {
        /// What the query was planned with.
        planned: Arc<FunctionSpec>,
        /// What this process serves.
        served: ModelIdentity,
    },
}

impl FunctionModel {
    /// The spec of the functions over this model.
    pub fn spec(&self) -> FunctionSpec {
        match self {
            FunctionModel::Served(service) => service.spec(),
            FunctionModel::Planned(spec) | FunctionModel::Mismatched { planned: spec, .. } => {
                (**spec).clone()
            }
        }
    }

    /// Width of the embeddings.
    pub fn hidden(&self) -> usize {
        match self {
            FunctionModel::Served(service) => service.hidden(),
            FunctionModel::Planned(spec) | FunctionModel::Mismatched { planned: spec, .. } => {
                spec.model.hidden
            }
        }
    }

    /// The service that runs the function here, or why there is none.
    pub fn served(&self, function: &str) -> Result<&Arc<EmbedService>> {
        match self {
            FunctionModel::Served(service) => Ok(service),
            FunctionModel::Planned(spec) => Err(Error::Internal(format!(
                "{function} over {} runs on the cluster's executors; this process only plans it",
                spec.model
            ))),
            FunctionModel::Mismatched { planned, served }
                if served.same_weights(&planned.model) =>
            {
                Err(Error::DtypeMismatch {
                    planned: planned.model.dtype.clone(),
                    served: served.dtype.clone(),
                })
            }
            FunctionModel::Mismatched { planned, served } => Err(Error::ModelMismatch {
                planned: planned.model.to_string(),
                served: served.to_string(),
            }),
        }
    }

    /// Identity for the functions' `PartialEq`/`Hash`: the service or the spec object.
    pub fn address(&self) -> usize {
        match self {
            FunctionModel::Served(service) => Arc::as_ptr(service) as usize,
            FunctionModel::Planned(spec) | FunctionModel::Mismatched { planned: spec, .. } => {
                Arc::as_ptr(spec) as usize
            }
        }
    }
}

/// A spec for unit tests.
#[cfg(test)]
pub(crate) fn example() -> FunctionSpec {
    tests::spec()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn spec() -> FunctionSpec {
        FunctionSpec {
            model: ModelIdentity {
                name: "tiny".into(),
                fingerprint: "sha256:ab".into(),
                hidden: 16,
                layers: 2,
                dtype: "auto".into(),
            },
            policy: RowPolicy {
                unknown: UnknownResidue::MapToX,
                max_length: 100,
                long: LongPolicy::Window,
                bad_rows: BadRows::Null,
            },
        }
    }

    #[test]
    fn spec_round_trips_through_field_metadata() {
        let spec = spec();
        let back = FunctionSpec::from_metadata(&spec.metadata())
            .unwrap()
            .unwrap();
        assert_eq!(back, spec);
        assert!(FunctionSpec::from_metadata(&HashMap::new()).is_none());
    }

    #[test]
    fn a_garbled_spec_is_an_error_not_a_panic() {
        let err = FunctionSpec::decode(b"{not json").unwrap_err();
        assert!(err.to_string().contains("same esmbed version"), "{err}");
    }

    #[test]
    fn identities_compare_by_weights() {
        let a = spec().model;
        let mut b = a.clone();
        b.name = "/elsewhere/tiny".into();
        assert!(a.same_weights(&b));
        b.fingerprint = "sha256:cd".into();
        assert!(!a.same_weights(&b));
        assert_eq!(a.to_string(), "tiny (sha256:ab)");
    }

    #[test]
    fn an_executor_serves_the_planned_dtype_or_its_default_for_auto() {
        let planned = spec().model;
        let mut served = planned.clone();
        served.dtype = "bf16".into();
        assert!(
            served.serves(&planned, true),
            "auto takes the device's default"
        );
        assert!(
            !served.serves(&planned, false),
            "auto refuses a dtype chosen by hand"
        );
        let mut fp8 = planned.clone();
        fp8.dtype = "f8e4m3".into();
        assert!(!served.serves(&fp8, true));
        served.dtype = "f8e4m3".into();
        assert!(served.serves(&fp8, false));
        served.fingerprint = "sha256:cd".into();
        assert!(!served.serves(&fp8, false), "other weights never serve");
    }

    #[test]
    fn a_spec_written_before_dtypes_reads_as_auto() {
        let mut json: serde_json::Value = serde_json::from_slice(&spec().encode()).unwrap();
        json["model"].as_object_mut().unwrap().remove("dtype");
        let old = serde_json::to_vec(&json).unwrap();
        let spec = FunctionSpec::decode(&old).unwrap();
        assert_eq!(spec.model.dtype, "auto");
    }
}
