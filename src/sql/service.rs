//! The model behind `esm_embed`: a thin front over the engine's [`DevicePool`], shared by every
//! SQL partition.
//!
//! A UDF call (a batch of rows of one partition) is prepared with the same [`InputPolicy`] as
//! `esmbed embed` (`--unknown`, `--max-length`, `--long truncate|error|window`), packed with the
//! same [`pack`] helper, and submitted to the pool, where the device workers take its packs
//! alongside those of other partitions, so every GPU stays busy while DataFusion reads and
//! writes. Results come back to the caller, which restores row order (and averages the windows
//! of long sequences, as the job's writer does). Rows of a call whose sequence is identical to
//! an earlier row's (after the input policy) are embedded once, as in a job
//! ([`crate::pipeline::reuse`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use crate::embed::Embedder;
use crate::engine::{DevicePool, DeviceSummary, PackEmbedder, PackOutcome, PoolOptions};
use crate::engine::{Request, Submission};
use crate::error::{Error, Result};
use crate::model::EsmConfig;
use crate::pack::{pack, Group};
use crate::pipeline::reuse::sequence_key;
use crate::prepare::{InputPolicy, LongPolicy, WindowSums};
use crate::sql::spec::{FunctionSpec, ModelIdentity, RowPolicy};
use crate::tokenize::Tokenizer;

/// How `esm_embed` treats rows it cannot embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Longest sequence embedded whole, in residues.
    pub max_length: usize,
    /// Beyond `max_length`: keep the first residues (default, as `esmbed embed`), fail the row,
    /// or average windows.
    pub long: LongPolicy,
    /// What invalid sequences become.
    pub bad_rows: BadRows,
    /// Run a full pack on every device at start (GPU sessions), so a budget that does not fit
    /// fails at once.
    pub warm_up: bool,
    /// Embed identical sequences of a call once (the result is the same either way).
    pub reuse: bool,
    /// The model's name and weights fingerprint, as the functions' specs state them
    /// ([`FunctionSpec`]); the hidden width and layers come from the model itself.
    pub name: String,
    /// See `name`.
    pub fingerprint: String,
    /// The dtype the devices compute in ([`crate::devices::dtype_label`]; [`EmbedService::start`]
    /// takes it from the model).
    pub dtype: String,
    /// Whether `dtype` is the devices' `--dtype auto`, which is what a cluster plan made with
    /// `auto` accepts.
    pub default_dtype: bool,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            tokens_per_batch: 4096,
            max_length: 1022,
            long: LongPolicy::Truncate,
            bad_rows: BadRows::Error,
            warm_up: false,
            reuse: true,
            name: "unnamed".into(),
            fingerprint: String::new(),
            dtype: "f32".into(),
            default_dtype: true,
        }
    }
}

/// Which pack of a call a result belongs to.
type CallPack = usize;

/// One model replica per device behind the engine's pool; see the module docs.
pub struct EmbedService {
    /// Shared by the services of every row policy ([`EmbedService::with_policy`]).
    pool: Arc<DevicePool<CallPack>>,
    policy: InputPolicy,
    options: ServiceOptions,
    /// The model's hyper-parameters (width, layers).
    config: EsmConfig,
    /// Rows that copied an identical row's result, over all calls (and policies).
    reused: Arc<AtomicU64>,
}

impl std::fmt::Debug for EmbedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedService")
            .field("devices", &self.pool.devices())
            .field("hidden", &self.config.hidden_size)
            .finish()
    }
}

/// One model input of a call: its row, and where its window starts.
#[derive(Debug, Clone, Copy)]
struct Segment {
    row: usize,
    offset: usize,
}

/// The model inputs of a call.
#[derive(Debug, Default)]
struct CallInputs {
    segments: Vec<Segment>,
    tokens: Vec<Vec<u32>>,
    /// Residues of each row embedded in windows.
    windows: HashMap<usize, usize>,
    /// `(row, earlier row with the identical sequence)`.
    copies: Vec<(usize, usize)>,
}

impl EmbedService {
    /// Start one worker per embedder (replicas of one model, e.g. from
    /// [`crate::Model::replicate_to`]).
    pub fn start(embedders: Vec<Embedder>, mut options: ServiceOptions) -> Result<Self> {
        let first = embedders
            .first()
            .ok_or_else(|| Error::NoDevice("the SQL service needs at least one device".into()))?;
        let dtype = first.model().dtype();
        options.dtype = crate::devices::dtype_label(dtype);
        options.default_dtype = dtype == crate::devices::default_dtype(first.model().device());
        let (config, tokenizer) = (first.model().config().clone(), *first.tokenizer());
        let devices = embedders
            .into_iter()
            .map(|e| Arc::new(e) as Arc<dyn PackEmbedder>)
            .collect();
        Self::start_devices(devices, config, tokenizer, options)
    }

    /// [`EmbedService::start`] on any [`PackEmbedder`]s (tests wrap the model to inject
    /// failures) of a model with `config`.
    pub fn start_devices(
        devices: Vec<Arc<dyn PackEmbedder>>,
        config: EsmConfig,
        tokenizer: Tokenizer,
        options: ServiceOptions,
    ) -> Result<Self> {
        let warm_up = if options.warm_up {
            vec![crate::embed::warm_up_pack(
                options.tokens_per_batch,
                options.max_length,
            )]
        } else {
            Vec::new()
        };
        let n = devices.len();
        let pool_options = PoolOptions {
            capacity: Some(4 * n + 4),
            warm_up,
        };
        let pool = DevicePool::start(devices, pool_options, Arc::new(AtomicBool::new(false)))?;
        let policy = InputPolicy {
            tokenizer,
            max_length: options.max_length,
            long: options.long,
        };
        Ok(Self {
            pool: Arc::new(pool),
            policy,
            options,
            config,
            reused: Arc::new(AtomicU64::new(0)),
        })
    }

    /// What the functions over this service stand for: the model and this service's row policy.
    pub fn spec(&self) -> FunctionSpec {
        FunctionSpec {
            model: self.identity(),
            policy: RowPolicy {
                unknown: self.policy.tokenizer.unknown,
                max_length: self.policy.max_length,
                long: self.policy.long,
                bad_rows: self.options.bad_rows,
            },
        }
    }

    /// The model's identity.
    pub fn identity(&self) -> ModelIdentity {
        ModelIdentity {
            name: self.options.name.clone(),
            fingerprint: self.options.fingerprint.clone(),
            hidden: self.config.hidden_size,
            layers: self.config.num_hidden_layers,
            dtype: self.options.dtype.clone(),
        }
    }

    /// Whether this service runs what `planned` asks for (its weights, its dtype).
    pub fn serves(&self, planned: &ModelIdentity) -> bool {
        self.identity().serves(planned, self.options.default_dtype)
    }

    /// The same devices and model under another row policy (a cluster executor serves each
    /// query with its client's policy).
    pub fn with_policy(&self, policy: &RowPolicy) -> EmbedService {
        let mut tokenizer = self.policy.tokenizer;
        tokenizer.unknown = policy.unknown;
        EmbedService {
            pool: self.pool.clone(),
            policy: InputPolicy {
                tokenizer,
                max_length: policy.max_length,
                long: policy.long,
            },
            options: ServiceOptions {
                max_length: policy.max_length,
                long: policy.long,
                bad_rows: policy.bad_rows,
                ..self.options.clone()
            },
            config: self.config.clone(),
            reused: self.reused.clone(),
        }
    }

    /// Rows that copied the result of an identical sequence in the same call, so far.
    pub fn reused_rows(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
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
        self.pool.device_stats()
    }

    /// Resolve a fair-esm layer number (negative from the end).
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        self.config.resolve_layer(layer)
    }

    /// The tokens the model sees for a sequence (all its windows, for a long one under `--long
    /// window`), or why the row cannot be embedded.
    pub fn tokens(&self, row: usize, sequence: &str) -> Result<Option<usize>> {
        match self.policy.prepare(sequence) {
            Ok(p) => Ok(Some(p.segments.iter().map(|(_, t)| t.len()).sum())),
            Err(_) if self.options.bad_rows == BadRows::Null => Ok(None),
            Err(e) => Err(row_error(row, sequence, &e.reason)),
        }
    }

    /// Mean embeddings of `layer` for `sequences` (`None` = null row), `[n × H]` row-major with
    /// zeros where the result is null, and the validity of each row. Blocks until the devices are
    /// done: call it from a blocking thread.
    pub fn embed(&self, sequences: &[Option<&str>], layer: usize) -> Result<(Vec<f32>, Vec<bool>)> {
        let CallInputs {
            segments,
            tokens,
            windows,
            copies,
        } = self.prepare(sequences)?;
        let groups = pack(&tokens, self.options.tokens_per_batch);
        // Per-residue outputs only for the packs that hold a window of a long row.
        let residues: Vec<bool> = groups
            .iter()
            .map(|g| {
                g.members
                    .iter()
                    .any(|&m| windows.contains_key(&segments[m].row))
            })
            .collect();
        let results = self.run(&groups, layer, &residues)?;
        let h = self.config.hidden_size;
        let mut out = vec![0f32; sequences.len() * h];
        let mut valid = vec![false; sequences.len()];
        let mut sums: HashMap<usize, WindowSums> = HashMap::new();
        for (group, outcome) in results {
            let PackOutcome::Done {
                range,
                batch,
                layers,
                ..
            } = outcome
            else {
                unreachable!("failed packs end the call in run()")
            };
            let pooled = &layers[0];
            let mean = pooled.mean.as_ref().expect("means are always computed");
            let mut residue = 0;
            for (k, member) in groups[group].members[range].iter().enumerate() {
                let Segment { row, offset } = segments[*member];
                let n = batch.range(k).len() - 2;
                valid[row] = true;
                if let Some(&length) = windows.get(&row) {
                    let residues = pooled.residues.as_ref().expect("windows carry residues");
                    sums.entry(row)
                        .or_insert_with(|| WindowSums::new(length, h))
                        .add(offset, &residues[residue * h..(residue + n) * h]);
                } else {
                    out[row * h..(row + 1) * h].copy_from_slice(&mean[k * h..(k + 1) * h]);
                }
                residue += n;
            }
        }
        for (row, sums) in sums {
            out[row * h..(row + 1) * h].copy_from_slice(&sums.finish().1);
        }
        for &(row, source) in &copies {
            out.copy_within(source * h..(source + 1) * h, row * h);
            valid[row] = valid[source];
        }
        self.reused
            .fetch_add(copies.len() as u64, Ordering::Relaxed);
        Ok((out, valid))
    }

    /// The model inputs of a call: each segment's row and offset, its tokens, the length of
    /// each row embedded in windows, and the rows that repeat an earlier row's sequence.
    fn prepare(&self, sequences: &[Option<&str>]) -> Result<CallInputs> {
        let mut inputs = CallInputs::default();
        let mut first: HashMap<u128, usize> = HashMap::new();
        for (row, sequence) in sequences.iter().enumerate() {
            let Some(sequence) = sequence else { continue };
            let prepared = match self.policy.prepare(sequence) {
                Ok(p) => p,
                Err(_) if self.options.bad_rows == BadRows::Null => continue,
                Err(e) => return Err(row_error(row, sequence, &e.reason)),
            };
            if self.options.reuse {
                match first.entry(sequence_key(&prepared)) {
                    std::collections::hash_map::Entry::Occupied(source) => {
                        inputs.copies.push((row, *source.get()));
                        continue;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(row);
                    }
                }
            }
            if prepared.segments.len() > 1 {
                inputs.windows.insert(row, prepared.length);
            }
            for (offset, t) in prepared.segments {
                inputs.segments.push(Segment { row, offset });
                inputs.tokens.push(t);
            }
        }
        Ok(inputs)
    }

    /// Submit the packs and collect every result; a sequence that does not fit even alone fails
    /// the call.
    fn run(
        &self,
        groups: &[Group],
        layer: usize,
        residues: &[bool],
    ) -> Result<Vec<(CallPack, PackOutcome<CallPack>)>> {
        let (tx, rx) = mpsc::channel();
        let reply: crate::engine::pool::Reply<CallPack> = Arc::new(move |outcome| {
            let _ = tx.send(outcome); // a dropped receiver is a cancelled query, not a stop
            true
        });
        for (index, group) in groups.iter().enumerate() {
            let submission = Submission {
                batch: group.batch.clone(),
                request: Request::Layer {
                    layer,
                    residues: residues[index],
                },
                context: Arc::new(index),
                reply: reply.clone(),
            };
            if !self.pool.submit(submission) {
                return Err(no_device_left());
            }
        }
        drop(reply);
        let expected: usize = groups.iter().map(|g| g.members.len()).sum();
        let mut received = 0;
        let mut results = Vec::with_capacity(groups.len());
        while received < expected {
            let outcome = rx.recv().map_err(|_| no_device_left())?;
            match outcome {
                PackOutcome::Done {
                    ref context,
                    ref range,
                    ..
                } => {
                    received += range.len();
                    results.push((**context, outcome));
                }
                PackOutcome::Failed { batch, .. } => {
                    return Err(Error::OutOfMemory {
                        detail: format!(
                            "esm_embed: a single sequence of {} tokens does not fit even alone: \
                             lower --max-length or --tokens-per-batch, or use a device with more memory",
                            batch.total_tokens()
                        ),
                    })
                }
            }
        }
        Ok(results)
    }
}

impl EmbedService {
    /// Pseudo-log-likelihoods of `sequences` (`None` = null row) and the validity of each row;
    /// identical sequences of the call are scored once. Needs the model's masked-LM head.
    pub fn pll(&self, sequences: &[Option<&str>]) -> Result<(Vec<f64>, Vec<bool>)> {
        let mut out = vec![0.0; sequences.len()];
        let mut valid = vec![false; sequences.len()];
        let mut distinct: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut tokens: Vec<Vec<u32>> = Vec::new();
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (row, sequence) in sequences.iter().enumerate() {
            let Some(sequence) = sequence else { continue };
            let Some(t) = self.score_tokens(row, sequence)? else {
                continue;
            };
            let next = tokens.len();
            let index = *distinct.entry(t.clone()).or_insert(next);
            if index == next {
                tokens.push(t);
            } else {
                self.reused.fetch_add(1, Ordering::Relaxed);
            }
            rows.push((row, index));
        }
        let plls = crate::score::pseudo_log_likelihoods(
            self.pool.as_ref(),
            &tokens,
            self.options.tokens_per_batch,
        )?;
        for (row, index) in rows {
            out[row] = plls[index].pll;
            valid[row] = true;
        }
        Ok((out, valid))
    }

    /// Scores of mutants (`A23G`, `A23G:K45R`; positions from 1) of their wild types, row by
    /// row, by `strategy`; each distinct wild type's forwards are run once for all its rows.
    pub fn mutant_scores(
        &self,
        wild_types: &[Option<&str>],
        mutants: &[Option<&str>],
        strategy: crate::score::Strategy,
    ) -> Result<(Vec<f64>, Vec<bool>)> {
        let mut out = vec![0.0; wild_types.len()];
        let mut valid = vec![false; wild_types.len()];
        // Per distinct wild type: its tokens, its residues, and its rows with their mutants.
        type Rows = Vec<(usize, Vec<crate::score::Mutation>)>;
        let mut groups: HashMap<&str, (Vec<u32>, Vec<u8>, Rows)> = HashMap::new();
        for (row, (wt, mutant)) in wild_types.iter().zip(mutants).enumerate() {
            let (Some(wt), Some(mutant)) = (wt, mutant) else {
                continue;
            };
            if !groups.contains_key(wt) {
                let Some(tokens) = self.score_tokens(row, wt)? else {
                    continue;
                };
                let residues = crate::score::mutant::residues_of(&tokens);
                groups.insert(wt, (tokens, residues, Vec::new()));
            }
            let (_, residues, rows) = groups.get_mut(wt).expect("inserted");
            match crate::score::mutant::parse(mutant, residues, 1) {
                Ok(m) => rows.push((row, m)),
                Err(_) if self.options.bad_rows == BadRows::Null => {}
                Err(e) => return Err(row_error(row, mutant, &e.to_string())),
            }
        }
        for (tokens, _, rows) in groups.into_values() {
            let sets: Vec<_> = rows.iter().map(|(_, m)| m.clone()).collect();
            let scores = crate::score::mutant_scores(
                self.pool.as_ref(),
                &tokens,
                &sets,
                strategy,
                self.options.tokens_per_batch,
            )?;
            for ((row, _), score) in rows.iter().zip(scores) {
                out[*row] = score;
                valid[*row] = true;
            }
        }
        Ok((out, valid))
    }

    /// A sequence's tokens for scores (the input policy; long sequences are truncated, never
    /// windowed), `None` for a bad row in a lenient session.
    fn score_tokens(&self, row: usize, sequence: &str) -> Result<Option<Vec<u32>>> {
        match self.policy.for_scores().prepare(sequence) {
            Ok(mut p) => Ok(Some(p.segments.remove(0).1)),
            Err(_) if self.options.bad_rows == BadRows::Null => Ok(None),
            Err(e) => Err(row_error(row, sequence, &e.reason)),
        }
    }
}

/// Why a row cannot be embedded, naming its value (cut to 60 characters).
fn row_error(row: usize, sequence: &str, reason: &str) -> Error {
    let shown: String = sequence.chars().take(60).collect();
    let more = if sequence.chars().count() > 60 {
        "…"
    } else {
        ""
    };
    Error::BadInput {
        input: format!("esm_embed: row {row} ('{shown}{more}')"),
        reason: format!(
            "{reason}. Fix or filter the row, or start esmbed sql with --lenient to get NULL for such rows"
        ),
    }
}

fn no_device_left() -> Error {
    Error::NoDevice(
        "esm_embed: every device failed (see the log); restart esmbed sql, or use --device cpu"
            .into(),
    )
}
