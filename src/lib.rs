//! # esmbed
//!
//! ESM-2 and ESM C protein embeddings and scores, exact and fast, for the Arrow/Parquet/SQL world.
//!
//! ```text
//!   text ──tokenize──> ids ──pack──> PackedBatch ──Model::forward──> [T, H] per layer ──pool──> vectors
//! ```
//! - [`tokenize`]: the ESM alphabet and the input policy;
//! - [`pack`]: sequences laid end to end with `cu_seqlens`, no padding;
//! - [`model`]: ESM-2 and ESM C ([`Model`], chosen by the checkpoint's config) loaded from HF
//!   directories, fair-esm `.pt` files or the hub, with one packed forward (exact per-segment
//!   attention on CPU, FlashAttention varlen on CUDA);
//! - [`pool`]: mean / BOS / per-residue outputs for a whole pack at once;
//! - [`prepare`]: the input policy (unknown letters, `--max-length`, `--long`), one for every front;
//! - [`embed`]: [`Embedder`], the API that ties them together;
//! - [`devices`]: `--device` lists, one model replica per GPU;
//! - [`engine`]: the device pool every front runs on (shared pack queue, one worker per device,
//!   out-of-memory splitting, failover);
//! - [`pipeline`]: the job (read → plan → device pool → write), resumable;
//! - [`sql`]: DataFusion with `esm_embed(sequence)` and FASTA tables, a thin front over the pool;
//! - [`cluster`]: the same SQL on DataFusion Ballista (scheduler, executors, client);
//! - [`score`]: zero-shot scores from the masked-LM head (likelihoods, variant effects);
//! - [`mod@bench`]: throughput on the reference benchmark's workload, through the same pool.
//!
//! ```no_run
//! use esmbed::{Embedder, EmbedOptions};
//! let embedder = Embedder::load("facebook/esm2_t33_650M_UR50D", &esmbed::Device::Cpu,
//!                               esmbed::DType::F32, &EmbedOptions::default())?;
//! let out = embedder.embed(&["MKTVRQGLAG", "MSEQ"])?;
//! println!("{} dims", out[0].layers[0].mean.as_ref().unwrap().len());
//! # Ok::<(), esmbed::Error>(())
//! ```

pub mod bench;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod devices;
pub mod embed;
pub mod engine;
pub mod error;
pub mod input;
pub mod model;
pub mod output;
pub mod pack;
pub mod pipeline;
pub mod pool;
pub mod prepare;
pub mod score;
pub mod sql;
pub mod storage;
pub mod tokenize;
pub mod verify;

pub use candle_core::{DType, Device};
pub use embed::{EmbedOptions, Embedder, LayerEmbedding, SequenceEmbedding};
pub use error::{Error, ErrorKind, Result};
pub use model::{Checkpoint, Esm2, EsmConfig, Esmc, Family, HubOptions, Model, ModelSource};
pub use pack::PackedBatch;
pub use pool::{PooledLayer, Pooling};
pub use tokenize::{Tokenizer, UnknownResidue};
