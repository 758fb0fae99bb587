//! Zero-shot scores from ESM-2's masked-LM head: pseudo-log-likelihoods, wild-type and masked
//! marginals of mutants, per-residue log-probabilities. fair-esm's definitions
//! (`examples/variant-prediction/predict.py`, `label_row`), with token positions `<cls>` = 0,
//! residue k (1-based) = k, `<eos>` = L+1, and `lp(x)[k, a]` the log-softmax over the whole
//! vocabulary of the logits at position k:
//!
//! - `PLL(x) = Σ_{k=1..L} lp(x with k masked)[k, x_k]`, pseudo-perplexity `exp(−PLL / L)`;
//! - wild-type marginals: `Σ_{(k, wt→mt)} lp(x_wt)[k, mt] − lp(x_wt)[k, wt]` (one unmasked forward);
//! - masked marginals: the same with `lp(x_wt with k masked)[k, ·]` (one forward per mutated
//!   position, shared by every mutant);
//! - the `pll` strategy: `PLL(mutant) − PLL(wild type)`.
//!
//! The masked copies of a sequence ([`crate::pack::masked_copies`]) are sequences of one length:
//! they pack perfectly, and every copy gets its own token-dropout rescale (the model computes it
//! per sequence).

pub mod dry_run;
pub mod job;
pub mod mutant;
pub mod runner;

use std::collections::HashMap;

use crate::engine::{LogProbsAt, PackEmbedder, Request};
use crate::error::{Error, Result};
use crate::pack::{masked_copies, pack, MaskedCopies, PackedBatch};
use crate::tokenize::{MASK, VOCAB_SIZE};
pub use mutant::{MutantError, Mutation};
pub use runner::Runner;

/// A sequence's pseudo-log-likelihood.
#[derive(Debug, Clone, PartialEq)]
pub struct Pll {
    /// `Σ_k lp(x with k masked)[k, x_k]`.
    pub pll: f64,
    /// The terms, residue by residue.
    pub per_position: Vec<f32>,
}

impl Pll {
    /// `exp(−PLL / L)`.
    pub fn pseudo_perplexity(&self) -> f64 {
        pseudo_perplexity(self.pll, self.per_position.len())
    }

    /// The pseudo-log-likelihood of these terms (residue order): their sum in f64, in order,
    /// as every front computes it.
    pub fn from_terms(per_position: Vec<f32>) -> Self {
        Self {
            pll: per_position.iter().map(|&v| v as f64).sum(),
            per_position,
        }
    }
}

/// `exp(−PLL / L)` of a sequence of `residues` residues.
pub fn pseudo_perplexity(pll: f64, residues: usize) -> f64 {
    (-pll / residues.max(1) as f64).exp()
}

/// How a mutant is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Strategy {
    /// One unmasked forward of the wild type.
    #[default]
    WtMarginals,
    /// One forward of the wild type per mutated position, that position masked.
    MaskedMarginals,
    /// Pseudo-log-likelihood of the mutant minus the wild type's.
    Pll,
}

/// The log-probability rows of a scores request on `batch`: `rows` of them.
pub(crate) fn run_one<D: PackEmbedder + ?Sized>(
    device: &D,
    batch: &PackedBatch,
    at: LogProbsAt,
) -> Result<Vec<f32>> {
    let rows = crate::model::esm2::query_positions(batch, at, MASK).len();
    let mut layers = device.embed(batch, Request::LogProbs { at })?;
    let log_probs = layers.pop().and_then(|l| l.log_probs).unwrap_or_default();
    if log_probs.len() != rows * VOCAB_SIZE {
        return Err(Error::internal(format!(
            "a scores request returned {} log-probabilities for {rows} positions",
            log_probs.len() / VOCAB_SIZE
        )));
    }
    Ok(log_probs)
}

/// Run the masked copies `copies` on `runner`; `take` gets each copy's `(sequence, position)`
/// and its row of log-probabilities.
fn run_copies(
    runner: &dyn Runner,
    copies: MaskedCopies<&[Vec<u32>]>,
    mut take: impl FnMut(usize, usize, &[f32]),
) -> Result<()> {
    let mut pending: HashMap<usize, Vec<crate::pack::MaskedCopy>> = HashMap::new();
    let mut packs = copies.enumerate().map(|(i, (batch, which))| {
        pending.insert(i, which);
        batch
    });
    let mut done: Vec<(usize, Vec<f32>)> = Vec::new();
    runner.run_packs(&mut packs, LogProbsAt::Masked, &mut |i, rows| {
        done.push((i, rows))
    })?;
    drop(packs);
    for (i, rows) in done {
        let masked = pending[&i]
            .iter()
            .filter_map(|c| Some((c.sequence, c.masked?)));
        for (j, (s, k)) in masked.enumerate() {
            take(s, k, &rows[j * VOCAB_SIZE..(j + 1) * VOCAB_SIZE]);
        }
    }
    Ok(())
}

/// Pseudo-log-likelihoods of `tokens` (each with `<cls>` and `<eos>`), every masked copy run on
/// `runner` in packs of at most `budget` tokens.
pub fn pseudo_log_likelihoods(
    runner: &dyn Runner,
    tokens: &[Vec<u32>],
    budget: usize,
) -> Result<Vec<Pll>> {
    let positions = tokens.iter().map(|t| (1..t.len() - 1).collect()).collect();
    let mut out: Vec<Pll> = tokens
        .iter()
        .map(|t| Pll {
            pll: 0.0,
            per_position: vec![0.0; t.len() - 2],
        })
        .collect();
    run_copies(
        runner,
        masked_copies(tokens, positions, budget, false),
        |s, k, row| {
            out[s].per_position[k - 1] = row[tokens[s][k] as usize];
        },
    )?;
    for p in &mut out {
        *p = Pll::from_terms(std::mem::take(&mut p.per_position));
    }
    Ok(out)
}

/// Per-residue log-probabilities (`[L × V]` per sequence) of one unmasked forward of each
/// sequence, packed.
pub fn residue_log_probs(
    runner: &dyn Runner,
    tokens: &[Vec<u32>],
    budget: usize,
) -> Result<Vec<Vec<f32>>> {
    let groups = pack(tokens, budget);
    let mut out = vec![Vec::new(); tokens.len()];
    let mut packs = groups.iter().map(|g| g.batch.clone());
    runner.run_packs(&mut packs, LogProbsAt::Residues, &mut |i, rows| {
        let mut offset = 0;
        for &member in &groups[i].members {
            let n = (tokens[member].len() - 2) * VOCAB_SIZE;
            out[member] = rows[offset..offset + n].to_vec();
            offset += n;
        }
    })?;
    Ok(out)
}

/// Scores of `mutants` (each a set of substitutions of the wild type `wt`, with `<cls>` and
/// `<eos>`) by `strategy`; multi-mutants are summed, as ProteinGym sums them.
pub fn mutant_scores(
    runner: &dyn Runner,
    wt: &[u32],
    mutants: &[Vec<Mutation>],
    strategy: Strategy,
    budget: usize,
) -> Result<Vec<f64>> {
    let id = |c: char| token_of(c);
    match strategy {
        Strategy::WtMarginals => {
            let lp = residue_log_probs(runner, &[wt.to_vec()], budget)?.remove(0);
            Ok(summed(mutants, |k, t| lp[(k - 1) * VOCAB_SIZE + t] as f64))
        }
        Strategy::MaskedMarginals => {
            let mut positions: Vec<usize> = mutants.iter().flatten().map(|m| m.index).collect();
            positions.sort_unstable();
            positions.dedup();
            let wt = [wt.to_vec()];
            let mut lp: HashMap<usize, Vec<f32>> = HashMap::new();
            run_copies(
                runner,
                masked_copies(&wt[..], vec![positions], budget, false),
                |_, k, row| {
                    lp.insert(k, row.to_vec());
                },
            )?;
            Ok(summed(mutants, |k, t| lp[&k][t] as f64))
        }
        Strategy::Pll => {
            let mut sequences = vec![wt.to_vec()];
            for m in mutants {
                let mut s = wt.to_vec();
                for x in m {
                    s[x.index] = id(x.mt) as u32;
                }
                sequences.push(s);
            }
            let plls = pseudo_log_likelihoods(runner, &sequences, budget)?;
            Ok(plls[1..].iter().map(|p| p.pll - plls[0].pll).collect())
        }
    }
}

/// Per mutant, `Σ lp(k, mt) − lp(k, wt)` over its substitutions.
fn summed(mutants: &[Vec<Mutation>], lp: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    mutants
        .iter()
        .map(|m| {
            m.iter()
                .map(|x| lp(x.index, token_of(x.mt)) - lp(x.index, token_of(x.wt)))
                .sum()
        })
        .collect()
}

/// The token of a standard amino-acid letter.
fn token_of(c: char) -> usize {
    crate::tokenize::residue_token(c)
        .expect("mutant letters are checked to be standard amino acids") as usize
}

/// Columns of [`residue_log_probs`] restricted to the 20 standard amino acids, in
/// [`mutant::STANDARD`] order: `[L × 20]`.
pub fn standard_columns(log_probs: &[f32]) -> Vec<f32> {
    let columns: Vec<usize> = mutant::STANDARD.chars().map(token_of).collect();
    log_probs
        .chunks(VOCAB_SIZE)
        .flat_map(|row| columns.iter().map(move |&c| row[c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_columns_follow_the_documented_order() {
        let mut row = vec![0f32; VOCAB_SIZE];
        for (i, v) in row.iter_mut().enumerate() {
            *v = i as f32;
        }
        let cols = standard_columns(&row);
        assert_eq!(cols.len(), 20);
        assert_eq!(cols[0], token_of('A') as f32);
        assert_eq!(cols[19], token_of('Y') as f32);
    }
}
