//! Where scores run: one device in turn, or every device of the engine's pool (with its
//! out-of-memory splitting and failover), packs in flight while more are made.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};

use crate::engine::{DevicePool, LogProbsAt, PackEmbedder, PackOutcome, Request, Submission};
use crate::error::{Error, Result};
use crate::model::esm2::query_positions;
use crate::pack::PackedBatch;
use crate::tokenize::{MASK, VOCAB_SIZE};

/// Runs scores requests.
pub trait Runner {
    /// Run every pack `packs` yields (pack `i` is the `i`-th), handing `take` each pack's
    /// log-probability rows (`[Q × V]`, the pack's queried positions in order) as it finishes.
    fn run_packs(
        &self,
        packs: &mut dyn Iterator<Item = PackedBatch>,
        at: LogProbsAt,
        take: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<()>;
}

impl<T: PackEmbedder + ?Sized> Runner for T {
    fn run_packs(
        &self,
        packs: &mut dyn Iterator<Item = PackedBatch>,
        at: LogProbsAt,
        take: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<()> {
        for (i, batch) in packs.enumerate() {
            take(i, super::run_one(self, &batch, at)?);
        }
        Ok(())
    }
}

/// A pack in flight: its rows so far, and where each of its sequences' rows start.
struct Pending {
    rows: Vec<f32>,
    starts: Vec<usize>,
    sequences_left: usize,
}

impl Runner for DevicePool<usize> {
    fn run_packs(
        &self,
        packs: &mut dyn Iterator<Item = PackedBatch>,
        at: LogProbsAt,
        take: &mut dyn FnMut(usize, Vec<f32>),
    ) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let reply: crate::engine::pool::Reply<usize> = Arc::new(move |outcome| {
            let _ = tx.send(outcome);
            true
        });
        let mut pending: HashMap<usize, Pending> = HashMap::new();
        let mut settle = |outcome: PackOutcome<usize>,
                          pending: &mut HashMap<usize, Pending>|
         -> Result<()> {
            match outcome {
                PackOutcome::Done {
                    context,
                    range,
                    layers,
                    ..
                } => {
                    let i = *context;
                    let part = layers
                        .into_iter()
                        .next()
                        .and_then(|l| l.log_probs)
                        .unwrap_or_default();
                    let p = pending.get_mut(&i).expect("submitted");
                    let start = p.starts[range.start] * VOCAB_SIZE;
                    p.rows[start..start + part.len()].copy_from_slice(&part);
                    p.sequences_left -= range.len();
                    if p.sequences_left == 0 {
                        take(i, pending.remove(&i).expect("present").rows);
                    }
                    Ok(())
                }
                PackOutcome::Failed { batch, .. } => Err(Error::OutOfMemory {
                    detail: format!(
                        "scores: a sequence of {} tokens does not fit even alone on any device: \
                         lower --max-length or --tokens-per-batch, or use a device with more memory",
                        batch.total_tokens()
                    ),
                }),
            }
        };
        for (i, batch) in packs.enumerate() {
            let mut starts = Vec::with_capacity(batch.len());
            let mut rows = 0;
            for s in 0..batch.len() {
                starts.push(rows);
                let one = PackedBatch::from_sequences([batch.tokens(s)]);
                rows += query_positions(&one, at, MASK).len();
            }
            pending.insert(
                i,
                Pending {
                    rows: vec![0.0; rows * VOCAB_SIZE],
                    starts,
                    sequences_left: batch.len(),
                },
            );
            let submitted = self.submit(Submission {
                batch,
                request: Request::LogProbs { at },
                context: Arc::new(i),
                reply: reply.clone(),
            });
            if !submitted {
                return Err(no_device());
            }
            while let Ok(outcome) = rx.try_recv() {
                settle(outcome, &mut pending)?;
            }
        }
        drop(reply);
        while !pending.is_empty() {
            let outcome = rx.recv().map_err(|_| no_device())?;
            settle(outcome, &mut pending)?;
        }
        Ok(())
    }
}

fn no_device() -> Error {
    Error::NoDevice("scores: every device failed (see the log)".into())
}
