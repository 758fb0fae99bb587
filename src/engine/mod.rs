//! The engine every front runs on: one model replica per device behind one shared pack queue.
//!
//! ```text
//!   front (embed job, SQL call, bench) ──submit(pack, reply)──> queue ─┬─> worker cuda:0 ─┐
//!                                                                      ├─> worker cuda:1 ─┼─> reply
//!                                                                      └─> worker …      ─┘
//! ```
//! - `queue`: the bounded queue with retry bookkeeping (failover, refusals);
//! - [`split`]: out of memory → halve the pack and retry, down to single sequences;
//! - [`pool`]: [`DevicePool`], the one worker loop per device, warm-up and per-device accounting.
//!
//! A front submits packs with a reply callback and gets each pack's results back (or, for a
//! sequence that ran out of memory alone on every device, its error); what it does with them
//! (assemble a part, fill a UDF's output, count tokens) is its own business.

pub mod pool;
pub(crate) mod queue;
pub mod split;

pub use pool::{DevicePool, DeviceSummary, PackOutcome, PoolOptions, Submission};

use crate::error::Result;
use crate::pack::PackedBatch;
use crate::pool::PooledLayer;

/// What a pack's results must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The embedder's layers and pooling; per-residue outputs forced on when `residues` (long
    /// sequences embedded in windows are averaged per residue). With `log_probs` the pack
    /// holds masked copies (`embed --pll`): the results end with one more entry holding only
    /// the log-probabilities at every `<mask>` (as [`Request::LogProbs`] with
    /// [`LogProbsAt::Masked`]), and per-residue vectors cover only the sequences without one.
    Configured {
        /// Force per-residue outputs.
        residues: bool,
        /// Also the masked-LM log-probabilities at the masks.
        log_probs: bool,
    },
    /// The mean embedding of one layer (resolved number) only, whatever the embedder was built
    /// for (SQL picks the layer per call); per-residue outputs too when `residues`.
    Layer {
        /// The layer.
        layer: usize,
        /// Also per-residue outputs.
        residues: bool,
    },
    /// Log-probabilities of the masked-LM head over the vocabulary (scores), at the positions
    /// `at` picks in every sequence of the pack. The model must have its head.
    LogProbs {
        /// Which positions.
        at: LogProbsAt,
    },
}

/// The positions of each sequence a [`Request::LogProbs`] returns, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogProbsAt {
    /// Every `<mask>` token (masked copies: pseudo-likelihoods, masked marginals).
    Masked,
    /// Every residue, `<cls>` and `<eos>` excluded (one unmasked forward: wild-type marginals,
    /// per-residue log-probabilities).
    Residues,
}

/// One device's model: embed one pack. Implemented by [`crate::Embedder`]; tests wrap it to
/// inject failures.
pub trait PackEmbedder: Send + Sync {
    /// Pooled outputs of the layers `request` asks for.
    fn embed(&self, batch: &PackedBatch, request: Request) -> Result<Vec<PooledLayer>>;

    /// The device, for summaries and logs (`cuda:1`).
    fn label(&self) -> String {
        "device".into()
    }

    /// Wait for the device's queued work (GPU timing); a no-op on the CPU.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Activation bytes a pack of one sequence of `tokens` tokens needs, and the memory free for
    /// it now; `None` when unknown. Checked before a job's first pack.
    fn memory_for(&self, tokens: usize) -> Option<(u64, u64)> {
        let _ = tokens;
        None
    }
}

impl PackEmbedder for crate::Embedder {
    fn embed(&self, batch: &PackedBatch, request: Request) -> Result<Vec<PooledLayer>> {
        self.embed_request(batch, request)
    }

    fn label(&self) -> String {
        self.device_label()
    }

    fn synchronize(&self) -> Result<()> {
        Ok(self.model().device().synchronize()?)
    }

    fn memory_for(&self, tokens: usize) -> Option<(u64, u64)> {
        use crate::model::memory;
        let model = self.model();
        let cpu = model.device().is_cpu();
        let needed = memory::activations(
            model.config(),
            model.dtype(),
            cpu,
            tokens,
            tokens,
            self.layers().len(),
        );
        let free = if cpu {
            memory::available_host_memory()?
        } else {
            crate::embed::free_device_memory(model.device())? as u64
        };
        Some((needed, free))
    }
}
