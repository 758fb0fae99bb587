//! ESM-2: configuration, weight loading (HF directories, fair-esm `.pt`, the hub), and the packed
//! forward. The model sees token ids and sequence boundaries ([`crate::pack::PackedBatch`]),
//! never Arrow.

pub mod attention;
pub mod config;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod esm2;
pub mod esm_package;
pub mod esmc;
mod fair_esm;
mod family;
#[cfg(feature = "cuda")]
pub(crate) mod flash;
pub mod fp8;
#[cfg(feature = "cuda")]
pub(crate) mod gemm;
mod head;
pub mod hub;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod memory;
pub mod names;
pub mod profile;
pub mod replicas;
mod trunk;
pub mod weights;

pub use config::EsmConfig;
pub use config::Family;
pub use esm2::Esm2;
pub use esmc::Esmc;
pub use family::Model;
#[cfg(feature = "cuda")]
pub use gemm::DeviceOutOfMemory;
pub use hub::HubOptions;
pub use replicas::{describe_model, load_model, Head, LoadedModel};
pub use weights::{Checkpoint, ModelSource};
