//! The model behind `esm_embed`: one worker thread per device, fed by every SQL partition.
//!
//! A UDF call (a batch of rows of one partition) is tokenized, sorted by length and packed under
//! the token budget exactly as `esmbed embed` does; its packs go to the shared
//! [`WorkQueue`](crate::pipeline::schedule::WorkQueue), where the device workers take them
//! alongside the packs of other partitions, so every GPU stays busy while DataFusion reads and
//! writes. Results come back to the caller, which restores row order.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::embed::Embedder;
use crate::error::{Error, Result};
use crate::model::EsmConfig;
use crate::pack::{first_fit_decreasing, PackedBatch};
use crate::pipeline::schedule::{Next, WorkQueue};
use crate::pipeline::DeviceSummary;
use crate::retry::{run_halving, Outcome};
use crate::tokenize::{TokenizeError, Tokenizer};

/// How `esm_embed` treats rows it cannot embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// The query fails with an error naming the row's value and what is wrong (default).
    #[default]
    Error,
    /// The row's embedding is null (`esm_embed` lenient).
    Null,
}

/// Settings of the SQL model service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Token budget of a pack.
    pub tokens_per_batch: usize,
    /// Longer sequences keep their first `max_length` residues, as `esmbed embed` does by default.
    pub max_length: usize,
    /// What invalid sequences become.
    pub bad_rows: BadRows,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            tokens_per_batch: 4096,
            max_length: 1022,
            bad_rows: BadRows::Error,
        }
    }
}

struct Request {
    batch: PackedBatch,
    layer: usize,
    /// Index of the pack within its call, and where its result goes.
    index: usize,
    reply: mpsc::Sender<(usize, Result<Vec<f32>>)>,
}

/// One model replica per device behind a shared queue; see the module docs.
pub struct EmbedService {
    queue: Arc<WorkQueue<Request>>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<Vec<DeviceSummary>>>,
    tokenizer: Tokenizer,
    options: ServiceOptions,
    /// The model's hyper-parameters (width, layers).
    config: EsmConfig,
}

impl std::fmt::Debug for EmbedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedService")
            .field("devices", &self.workers.len())
            .field("hidden", &self.config.hidden_size)
            .finish()
    }
}

impl EmbedService {
    /// Start one worker per embedder (replicas of one model, e.g. from
    /// [`crate::Esm2::replicate_to`]).
    pub fn start(embedders: Vec<Embedder>, options: ServiceOptions) -> Result<Self> {
        let first = embedders.first().ok_or_else(|| {
            Error::InvalidOption("the SQL service needs at least one device".into())
        })?;
        let config = first.model().config().clone();
        let tokenizer = *first.tokenizer();
        let queue = Arc::new(WorkQueue::new(embedders.len(), 4 * embedders.len() + 4));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(
            embedders
                .iter()
                .map(|e| DeviceSummary {
                    device: e.device_label(),
                    ..DeviceSummary::default()
                })
                .collect(),
        ));
        let workers = embedders
            .into_iter()
            .enumerate()
            .map(|(index, embedder)| {
                let (queue, stop, stats) = (queue.clone(), stop.clone(), stats.clone());
                std::thread::Builder::new()
                    .name(format!("esmbed-{}", embedder.device_label()))
                    .spawn(move || worker(index, &embedder, &queue, &stop, &stats))
                    .map_err(|e| Error::InvalidOption(format!("cannot start a model thread: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            queue,
            workers,
            stop,
            stats,
            tokenizer,
            options,
            config,
        })
    }

    /// Width of the embeddings.
    pub fn hidden(&self) -> usize {
        self.config.hidden_size
    }

    /// Number of layers (the last one, normalized, is the default of `esm_embed`).
    pub fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    /// The options.
    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    /// Per-device work so far.
    pub fn device_stats(&self) -> Vec<DeviceSummary> {
        self.stats.lock().unwrap().clone()
    }

    /// Resolve a fair-esm layer number (negative from the end).
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        self.config.resolve_layer(layer)
    }

    /// The tokens a sequence becomes (`<cls>`, residues cut at `max_length`, `<eos>`).
    pub fn tokenize(&self, sequence: &str) -> std::result::Result<Vec<u32>, TokenizeError> {
        let mut tokens = self.tokenizer.encode(sequence)?;
        Tokenizer::truncate(&mut tokens, self.options.max_length);
        Ok(tokens)
    }

    /// Why a row cannot be embedded, naming its value (cut to 60 characters).
    pub fn row_error(&self, row: usize, sequence: &str, error: &TokenizeError) -> Error {
        let shown: String = sequence.chars().take(60).collect();
        let more = if sequence.chars().count() > 60 {
            "…"
        } else {
            ""
        };
        Error::InvalidOption(format!(
            "esm_embed: row {row} ('{shown}{more}'): {error}. Fix or filter the row, or start esmbed sql \
             with --lenient to get NULL for such rows"
        ))
    }

    /// Mean embeddings of `layer` for `sequences` (`None` = null row), `[n × H]` row-major with
    /// zeros where the result is null, and the validity of each row. Blocks until the devices are
    /// done: call it from a blocking thread.
    pub fn embed(&self, sequences: &[Option<&str>], layer: usize) -> Result<(Vec<f32>, Vec<bool>)> {
        let h = self.config.hidden_size;
        let mut valid = vec![false; sequences.len()];
        let mut rows = Vec::with_capacity(sequences.len());
        let mut tokens = Vec::with_capacity(sequences.len());
        for (row, sequence) in sequences.iter().enumerate() {
            let Some(sequence) = sequence else { continue };
            match self.tokenize(sequence) {
                Ok(t) => {
                    rows.push(row);
                    tokens.push(t);
                }
                Err(e) if self.options.bad_rows == BadRows::Error => {
                    return Err(self.row_error(row, sequence, &e))
                }
                Err(_) => {}
            }
        }
        let mut out = vec![0f32; sequences.len() * h];
        let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let packs = first_fit_decreasing(&lengths, self.options.tokens_per_batch.max(1));
        let (reply, results) = mpsc::channel();
        for (index, group) in packs.iter().enumerate() {
            let batch = PackedBatch::from_sequences(group.iter().map(|&i| &tokens[i][..]));
            let request = Request {
                batch,
                layer,
                index,
                reply: reply.clone(),
            };
            if !self.queue.push(request, &self.stop) {
                return Err(no_device_left());
            }
        }
        drop(reply);
        for _ in 0..packs.len() {
            let (index, result) = results.recv().map_err(|_| no_device_left())?;
            let means = result?;
            for (k, &i) in packs[index].iter().enumerate() {
                let row = rows[i];
                out[row * h..(row + 1) * h].copy_from_slice(&means[k * h..(k + 1) * h]);
                valid[row] = true;
            }
        }
        Ok((out, valid))
    }
}

impl Drop for EmbedService {
    fn drop(&mut self) {
        self.queue.close();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn no_device_left() -> Error {
    Error::InvalidOption(
        "esm_embed: every device failed (see the log); restart esmbed sql, or use --device cpu"
            .into(),
    )
}

/// A device worker: take packs, embed them (splitting on out-of-memory), reply.
fn worker(
    index: usize,
    embedder: &Embedder,
    queue: &WorkQueue<Request>,
    stop: &AtomicBool,
    stats: &Mutex<Vec<DeviceSummary>>,
) {
    loop {
        let task = match queue.next(index, stop) {
            Next::Exit => return,
            Next::Work(task) | Next::Orphan(task) => task,
        };
        let request = &task.item;
        let started = Instant::now();
        match embed_splitting(embedder, &request.batch, request.layer) {
            Ok(Err(too_long)) => {
                // The device is fine, but a sequence does not fit it even alone: another device
                // (with more memory) may take the pack; when none is left, the query fails.
                let reply = request.reply.clone();
                let pack = request.index;
                if let Some(_back) = queue.refuse(index, task) {
                    let _ = reply.send((pack, Err(too_long)));
                }
                queue.finish();
            }
            Ok(Ok(means)) => {
                {
                    let mut stats = stats.lock().unwrap();
                    let s = &mut stats[index];
                    s.tokens += request.batch.total_tokens() as u64;
                    s.packs += 1;
                    s.busy_seconds += started.elapsed().as_secs_f64();
                    s.tokens_per_second = s.tokens as f64 / s.busy_seconds.max(1e-9);
                }
                let _ = request.reply.send((request.index, Ok(means)));
                queue.finish();
            }
            Err(e) => {
                tracing::error!(
                    "{} failed and leaves the SQL session; its packs go to the other devices: {e}",
                    embedder.device_label()
                );
                stats.lock().unwrap()[index].failed = Some(e.to_string());
                let reply = request.reply.clone();
                let pack = request.index;
                if !queue.fail_worker(index, task) {
                    let _ = reply.send((pack, Err(e)));
                }
                return;
            }
        }
    }
}

/// Embed a pack; on out of memory, halve it down to single sequences
/// ([`crate::retry::run_halving`]). The outer error is the device's (it leaves the session); the
/// inner one is the query's: a single sequence that does not fit even alone.
fn embed_splitting(
    embedder: &Embedder,
    batch: &PackedBatch,
    layer: usize,
) -> Result<Result<Vec<f32>>> {
    let outcomes = run_halving(
        batch,
        &mut |b| embedder.embed_packed_mean(b, layer),
        &mut |b| {
            tracing::warn!(
                "{}: out of memory on a pack of {} sequences ({} tokens): splitting it and retrying",
                embedder.device_label(),
                b.len(),
                b.total_tokens()
            )
        },
    )?;
    Ok(concat_means(outcomes))
}

/// The pack's means in order, or the query's error for a sequence that did not fit alone.
fn concat_means(outcomes: Vec<Outcome<Vec<f32>>>) -> Result<Vec<f32>> {
    let mut means = Vec::new();
    for o in outcomes {
        match o.result {
            Ok(m) => means.extend(m),
            Err(_) => {
                return Err(Error::InvalidOption(format!(
                    "esm_embed: out of memory on a single sequence of {} tokens, even alone: \
                     lower --max-length or --tokens-per-batch, or use a device with more memory",
                    o.batch.total_tokens()
                )))
            }
        }
    }
    Ok(means)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(start: usize, lengths: &[usize], result: Result<Vec<f32>>) -> Outcome<Vec<f32>> {
        let seqs: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![5; n]).collect();
        Outcome {
            range: start..start + lengths.len(),
            batch: PackedBatch::from_sequences(seqs.iter().map(|s| s.as_slice())),
            result,
        }
    }

    #[test]
    fn split_packs_give_their_means_in_order() {
        let means = concat_means(vec![
            outcome(0, &[4, 5], Ok(vec![1.0, 2.0])),
            outcome(2, &[6], Ok(vec![3.0])),
        ])
        .unwrap();
        assert_eq!(means, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_sequence_too_long_even_alone_fails_the_query_with_the_fix() {
        let oom = Error::InvalidOption("CUDA_ERROR_OUT_OF_MEMORY".into());
        let err = concat_means(vec![
            outcome(0, &[4], Ok(vec![1.0])),
            outcome(1, &[900], Err(oom)),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("900 tokens"), "{err}");
        assert!(err.contains("--max-length"), "{err}");
    }
}
