//! Zero-shot scores against transformers' `EsmForMaskedLM` with fair-esm's definitions
//! (`tests/fixtures/*/scores.json`, written by `make_reference.py`): pseudo-log-likelihoods,
//! per-residue log-probabilities, wild-type and masked marginals of single and double mutants,
//! within 1e-4 relative (CPU f32); the head from safetensors, a fair-esm `.pt` and the other
//! namings; a checkpoint without a head refused by name; masked copies packed together equal to
//! one at a time (each copy its own token-dropout rescale).

use std::path::Path;

use crate::common::*;
use esmbed::engine::{LogProbsAt, Request};
use esmbed::score::{self, mutant, Strategy};
use esmbed::{
    Checkpoint, DType, Device, EmbedOptions, Embedder, Model, ModelSource, PackedBatch, Tokenizer,
};

#[derive(serde::Deserialize)]
struct Scores {
    sequences: Vec<SequenceScores>,
    dms: Dms,
}

#[derive(serde::Deserialize)]
struct SequenceScores {
    id: String,
    sequence: String,
    pll: f64,
    per_position: Vec<f64>,
    pseudo_perplexity: f64,
    log_probs20: Vec<Vec<f64>>,
}

#[derive(serde::Deserialize)]
struct Dms {
    wt: String,
    offset: i64,
    scores: Vec<MutantScores>,
}

#[derive(serde::Deserialize)]
struct MutantScores {
    mutant: String,
    wt_marginals: f64,
    masked_marginals: f64,
}

fn scores(name: &str) -> Scores {
    let text = std::fs::read_to_string(fixture_dir(name).join("scores.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn with_head(path: &Path) -> esmbed::Result<Embedder> {
    let source = ModelSource::parse(path.to_str().unwrap())?;
    let checkpoint = Checkpoint::open(&source)?;
    let model = Model::load(&checkpoint, &Device::Cpu, DType::F32, true)?;
    Embedder::new(model, &EmbedOptions::default())
}

fn close(got: f64, want: f64, what: &str) {
    let err = (got - want).abs() / want.abs().max(1.0);
    assert!(err <= 1e-4, "{what}: {got} vs {want} (relative {err:.2e})");
}

fn tokens(seq: &str) -> Vec<u32> {
    Tokenizer::default().encode(seq).unwrap()
}

fn check_model(name: &str, model: &Embedder) {
    let want = scores(name);
    let all: Vec<Vec<u32>> = want.sequences.iter().map(|s| tokens(&s.sequence)).collect();
    // A small budget: copies of several sequences share packs, and some packs split sequences.
    let plls = score::pseudo_log_likelihoods(model, &all, 64).unwrap();
    let lps = score::residue_log_probs(model, &all, 64).unwrap();
    for ((s, pll), lp) in want.sequences.iter().zip(&plls).zip(&lps) {
        close(pll.pll, s.pll, &format!("{name} {} PLL", s.id));
        close(pll.pseudo_perplexity(), s.pseudo_perplexity, &s.id);
        for (k, (&g, &w)) in pll.per_position.iter().zip(&s.per_position).enumerate() {
            close(g as f64, w, &format!("{name} {} PLL term {}", s.id, k + 1));
        }
        let twenty = score::standard_columns(lp);
        let flat: Vec<f64> = s.log_probs20.iter().flatten().copied().collect();
        assert_eq!(twenty.len(), flat.len());
        for (&g, &w) in twenty.iter().zip(&flat) {
            close(g as f64, w, &format!("{name} {} log-probs", s.id));
        }
    }
    let wt = tokens(&want.dms.wt);
    let mutants: Vec<Vec<mutant::Mutation>> = want
        .dms
        .scores
        .iter()
        .map(|m| mutant::parse(&m.mutant, want.dms.wt.as_bytes(), want.dms.offset).unwrap())
        .collect();
    assert!(mutants.iter().any(|m| m.len() == 2), "doubles are tested");
    let wt_m = score::mutant_scores(model, &wt, &mutants, Strategy::WtMarginals, 64).unwrap();
    let mm = score::mutant_scores(model, &wt, &mutants, Strategy::MaskedMarginals, 64).unwrap();
    for ((m, a), b) in want.dms.scores.iter().zip(&wt_m).zip(&mm) {
        close(
            *a,
            m.wt_marginals,
            &format!("{name} {} wt-marginals", m.mutant),
        );
        close(
            *b,
            m.masked_marginals,
            &format!("{name} {} masked-marginals", m.mutant),
        );
    }
    // The pll strategy is PLL(mutant) − PLL(wt), from the same PLLs.
    let pll = score::mutant_scores(model, &wt, &mutants[..1], Strategy::Pll, 64).unwrap();
    let mut mutated = wt.clone();
    let m = mutants[0][0];
    mutated[m.index] = tokens(&m.mt.to_string())[1];
    let both = score::pseudo_log_likelihoods(model, &[wt, mutated], 4096).unwrap();
    close(pll[0], both[1].pll - both[0].pll, "pll strategy");
}

#[test]
fn scores_equal_transformers_masked_lm_with_fair_esm_definitions() {
    // ESM C's head: log-softmax over its 64-token vocabulary, as transformers computes it.
    for name in ["tiny_h16", "tiny_h64", "tiny_esmc"] {
        let model = with_head(&fixture_dir(name)).unwrap();
        check_model(name, &model);
    }
}

#[test]
fn the_head_loads_from_every_layout_transformers_loads() {
    // fair-esm .pt (RobertaLMHead names), and the naming variants with a head.
    check_model(
        "tiny_h16",
        &with_head(&fixture_dir("tiny_h16").join("model.pt")).unwrap(),
    );
    for variant in ["legacy_gamma_beta", "sharded_model_level"] {
        let model = with_head(&fixture_dir("naming").join(variant)).unwrap();
        check_model("tiny_h16", &model);
    }
}

#[test]
fn a_checkpoint_without_a_head_is_refused_by_name() {
    for dir in [
        fixture_dir("tiny_h16_bf16"),
        fixture_dir("naming").join("bare_bin"),
        fixture_dir("tiny_esmc_h16"),
    ] {
        let err = with_head(&dir).err().expect("no head").to_string();
        assert!(err.contains("lm_head.dense.weight"), "{err}");
        assert!(err.contains("ForMaskedLM"), "{err}");
        // The same checkpoint embeds as before.
        let source = ModelSource::parse(dir.to_str().unwrap()).unwrap();
        Model::load(
            &Checkpoint::open(&source).unwrap(),
            &Device::Cpu,
            DType::F32,
            false,
        )
        .unwrap();
    }
    let plain = load_embedder("tiny_h16");
    let batch = PackedBatch::from_sequences([&tokens("MKT")[..]]);
    let err = plain
        .embed_request(
            &batch,
            Request::LogProbs {
                at: LogProbsAt::Residues,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("load_with_head"), "{err}");
}

#[test]
fn masked_copies_packed_together_equal_the_copies_alone() {
    let model = with_head(&fixture_dir("tiny_h16")).unwrap();
    // Copies with one, two and three masks: each gets its own token-dropout rescale.
    let mut copies = Vec::new();
    for (seq, masks) in [
        ("MKTAYIAKQR", &[1][..]),
        ("GAVLIPFWY", &[2, 5]),
        ("MKT", &[1, 2, 3]),
    ] {
        let mut t = tokens(seq);
        for &m in masks {
            t[m] = esmbed::tokenize::MASK;
        }
        copies.push(t);
    }
    let packed = PackedBatch::from_sequences(copies.iter().map(|c| &c[..]));
    let request = Request::LogProbs {
        at: LogProbsAt::Masked,
    };
    let together = model
        .embed_request(&packed, request)
        .unwrap()
        .remove(0)
        .log_probs
        .unwrap();
    let mut alone = Vec::new();
    for c in &copies {
        let batch = PackedBatch::from_sequences([&c[..]]);
        alone.extend(
            model
                .embed_request(&batch, request)
                .unwrap()
                .remove(0)
                .log_probs
                .unwrap(),
        );
    }
    assert_eq!(together.len(), (1 + 2 + 3) * esmbed::tokenize::VOCAB_SIZE);
    let err = relative_error(&together, &alone);
    assert!(err <= 1e-6, "packed vs alone: {err:.2e}");
}

#[test]
fn scores_run_on_the_device_pool_with_out_of_memory_splits() {
    use esmbed::engine::{DevicePool, PackEmbedder, PoolOptions};
    use std::sync::Arc;
    let model = with_head(&fixture_dir("tiny_h16")).unwrap();
    let want = scores("tiny_h16");
    let all: Vec<Vec<u32>> = want.sequences.iter().map(|s| tokens(&s.sequence)).collect();
    // One device fails every pack over 60 tokens: its packs are halved and retried.
    let faulty = Faulty {
        inner: model.replicate(&Device::Cpu).unwrap(),
        max_tokens: 60,
        poison: usize::MAX,
        failures: Default::default(),
    };
    let faulty = Arc::new(faulty);
    let devices: Vec<Arc<dyn PackEmbedder>> = vec![faulty.clone(), Arc::new(model)];
    let pool: DevicePool<usize> = DevicePool::start(
        devices,
        PoolOptions::default(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .unwrap();
    let plls = score::pseudo_log_likelihoods(&pool, &all, 160).unwrap();
    let lps = score::residue_log_probs(&pool, &all, 160).unwrap();
    for ((s, pll), lp) in want.sequences.iter().zip(&plls).zip(&lps) {
        close(pll.pll, s.pll, &s.id);
        let twenty = score::standard_columns(lp);
        close(twenty[0] as f64, s.log_probs20[0][0], &s.id);
    }
    assert!(
        faulty.failures.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "splits happened"
    );
    pool.close();
    pool.join().unwrap();
}

#[test]
fn sql_scores_equal_the_reference() {
    use esmbed::sql::service::{BadRows, EmbedService, ServiceOptions};
    use esmbed::sql::{self, SessionOptions};
    use std::sync::Arc;
    let want = scores("tiny_h64");
    let session = |bad_rows| {
        let model = with_head(&fixture_dir("tiny_h64")).unwrap();
        let options = ServiceOptions {
            tokens_per_batch: 256,
            bad_rows,
            ..ServiceOptions::default()
        };
        let service = Arc::new(EmbedService::start(vec![model], options).unwrap());
        sql::session(Some(service), &SessionOptions::default())
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let query = |ctx: &datafusion::prelude::SessionContext, q: &str| {
        runtime.block_on(async {
            let batches = ctx.sql(q).await?.collect().await?;
            let mut out: Vec<Option<f64>> = Vec::new();
            for b in batches {
                let col = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Float64Array>()
                    .unwrap();
                out.extend(col.iter());
            }
            Ok::<_, datafusion::error::DataFusionError>(out)
        })
    };
    let ctx = session(BadRows::Error);
    let values: Vec<String> = want
        .sequences
        .iter()
        .map(|s| format!("('{}')", s.sequence))
        .collect();
    // Each sequence twice (scored once), and a NULL.
    let q = format!(
        "SELECT esm_pll(s) FROM (VALUES {}, {}, (NULL)) AS t(s)",
        values.join(", "),
        values.join(", ")
    );
    let got = query(&ctx, &q).unwrap();
    assert_eq!(got.len(), 2 * want.sequences.len() + 1);
    for (i, s) in want.sequences.iter().chain(&want.sequences).enumerate() {
        close(got[i].unwrap(), s.pll, &s.id);
    }
    assert_eq!(got.last().unwrap(), &None);

    let wt = &want.dms.wt;
    // The reference numbers positions from offset 5; SQL from 1.
    let shifted = |m: &str| -> String {
        m.split(':')
            .map(|p| {
                let pos: i64 = p[1..p.len() - 1].parse().unwrap();
                format!(
                    "{}{}{}",
                    &p[..1],
                    pos - want.dms.offset + 1,
                    &p[p.len() - 1..]
                )
            })
            .collect::<Vec<_>>()
            .join(":")
    };
    let rows: Vec<String> = want
        .dms
        .scores
        .iter()
        .map(|m| format!("('{wt}', '{}')", shifted(&m.mutant)))
        .collect();
    for (strategy, pick) in [
        (
            "'wt-marginals'",
            (|m: &MutantScores| m.wt_marginals) as fn(&MutantScores) -> f64,
        ),
        ("'masked-marginals'", |m: &MutantScores| m.masked_marginals),
    ] {
        let q = format!(
            "SELECT esm_score(w, m, {strategy}) FROM (VALUES {}) AS t(w, m)",
            rows.join(", ")
        );
        let got = query(&ctx, &q).unwrap();
        for (g, m) in got.iter().zip(&want.dms.scores) {
            close(g.unwrap(), pick(m), &format!("{strategy} {}", m.mutant));
        }
    }
    // The default strategy is wt-marginals.
    let q = format!(
        "SELECT esm_score(w, m) FROM (VALUES {}) AS t(w, m)",
        rows[0]
    );
    close(
        query(&ctx, &q).unwrap()[0].unwrap(),
        want.dms.scores[0].wt_marginals,
        "default",
    );

    // A wild-type letter that does not match fails the query naming it; lenient: NULL.
    let first = wt.chars().next().unwrap();
    let wrong = if first == 'A' { 'C' } else { 'A' };
    let q = format!(
        "SELECT esm_score(w, m) FROM (VALUES ('{wt}', '{wrong}1G'), ('{wt}', 'bad')) AS t(w, m)"
    );
    let err = query(&ctx, &q).unwrap_err().to_string();
    assert!(err.contains(&format!("has {first} at position 1")), "{err}");
    let got = query(&session(BadRows::Null), &q).unwrap();
    assert_eq!(got, [None, None]);
    let err = query(
        &ctx,
        &format!(
            "SELECT esm_score(w, m, 'nope') FROM (VALUES {}) AS t(w, m)",
            rows[0]
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("masked-marginals"), "{err}");
}

/// `esmbed score` with the fixture model, in `dir`: exit code and stderr.
fn score_cli(dir: &Path, args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = score_cli_out(dir, args);
    (code, stderr)
}

/// [`score_cli`] with stdout too.
fn score_cli_out(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let model = fixture_dir("tiny_h64");
    let mut all = vec!["score", "--model", model.to_str().unwrap(), "--no-progress"];
    all.extend_from_slice(args);
    esmbed_in(dir, &all)
}

fn floats(batch: &arrow::array::RecordBatch, name: &str) -> Vec<f64> {
    use arrow::array::AsArray;
    let col = batch.column_by_name(name).unwrap();
    col.as_primitive::<arrow::datatypes::Float64Type>()
        .values()
        .to_vec()
}

#[test]
fn esmbed_score_writes_plls_log_probs_and_dms_scores() {
    let dir = scratch("score-cli");
    let want = scores("tiny_h64");
    let mut fasta = String::new();
    for s in &want.sequences {
        fasta.push_str(&format!(
            ">{}\n{}\n>{}_again\n{}*\n",
            s.id,
            s.sequence,
            s.id,
            s.sequence.to_lowercase()
        ));
    }
    fasta.push_str(">bad\nMK1T\n");
    std::fs::write(dir.join("in.fasta"), fasta).unwrap();
    let (code, stderr) = score_cli(
        &dir,
        &[
            "in.fasta",
            "-o",
            "pll.parquet",
            "--per-residue",
            "--tokens-per-batch",
            "100",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let out = read_parquet(&dir.join("pll.parquet"));
    assert_eq!(out.num_rows(), 2 * want.sequences.len());
    let plls = floats(&out, "pll");
    let ppl = floats(&out, "pseudo_perplexity");
    for (i, s) in want.sequences.iter().enumerate() {
        for row in [2 * i, 2 * i + 1] {
            close(plls[row], s.pll, &s.id);
            close(ppl[row], s.pseudo_perplexity, &s.id);
        }
    }
    let errors = read_parquet(&dir.join("pll.errors.parquet"));
    assert_eq!(strings(&errors, "id"), [Some("bad".to_string())]);
    // One row per part: each repeat is in another part than its first, and still scored once,
    // with the same bits.
    let (code, stdout, stderr) = score_cli_out(
        &dir,
        &[
            "in.fasta",
            "-o",
            "parts.parquet",
            "--rows-per-part",
            "1",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["reused"], want.sequences.len());
    let parts = read_parquet(&dir.join("parts.parquet"));
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(floats(&parts, "pll")), bits(plls.clone()));
    assert_eq!(
        strings(&errors, "problem"),
        [Some("invalid_residue".to_string())]
    );

    let (code, stderr) = score_cli(&dir, &["in.fasta", "-o", "logits.parquet", "--logits"]);
    assert_eq!(code, 0, "{stderr}");
    let out = read_parquet(&dir.join("logits.parquet"));
    use arrow::array::{Array, AsArray};
    let lists = out.column_by_name("log_probs").unwrap().as_list::<i32>();
    let first = lists.value(0);
    let rows = first.as_fixed_size_list();
    assert_eq!(rows.len(), want.sequences[0].sequence.len());
    let values = rows
        .values()
        .as_primitive::<arrow::datatypes::Float32Type>();
    for (k, row) in want.sequences[0].log_probs20.iter().enumerate() {
        for (a, &w) in row.iter().enumerate() {
            close(values.value(k * 20 + a) as f64, w, "log_probs");
        }
    }

    // A DMS file: the reference's mutants (positions from 5) and four bad ones.
    let mut mutants: Vec<String> = want.dms.scores.iter().map(|m| m.mutant.clone()).collect();
    let wt = &want.dms.wt;
    let first_letter = wt.chars().next().unwrap();
    let wrong = if first_letter == 'A' { 'C' } else { 'A' };
    mutants.extend([
        format!("{wrong}5G"),
        "5G".into(),
        "A99G".into(),
        format!("{first_letter}5J"),
    ]);
    let batch = arrow::array::RecordBatch::try_from_iter([(
        "mutant",
        std::sync::Arc::new(arrow::array::StringArray::from(mutants.clone()))
            as arrow::array::ArrayRef,
    )])
    .unwrap();
    let file = std::fs::File::create(dir.join("dms.parquet")).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    for (strategy, pick) in [
        (
            "wt-marginals",
            (|m: &MutantScores| m.wt_marginals) as fn(&MutantScores) -> f64,
        ),
        ("masked-marginals", |m: &MutantScores| m.masked_marginals),
    ] {
        let out_name = format!("{strategy}.parquet");
        let (code, stderr) = score_cli(
            &dir,
            &[
                "--wt",
                wt,
                "--mutants",
                "dms.parquet",
                "--offset",
                "5",
                "--strategy",
                strategy,
                "-o",
                &out_name,
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        let out = read_parquet(&dir.join(&out_name));
        assert_eq!(out.num_rows(), want.dms.scores.len());
        for (got, m) in floats(&out, "esm_score").iter().zip(&want.dms.scores) {
            close(*got, pick(m), &format!("{strategy} {}", m.mutant));
        }
        let errors = read_parquet(&dir.join(format!("{strategy}.errors.parquet")));
        let reasons: Vec<String> = strings(&errors, "reason").into_iter().flatten().collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(
            reasons[0].contains(&format!("has {first_letter} at position 5")),
            "{reasons:?}"
        );
        assert!(reasons[1].contains("not in the form A23G"), "{reasons:?}");
        assert!(reasons[2].contains("outside the sequence"), "{reasons:?}");
        assert!(
            reasons[3].contains("not one of the 20 standard amino acids"),
            "{reasons:?}"
        );
        assert!(strings(&errors, "problem")
            .iter()
            .all(|p| p.as_deref() == Some("bad_mutant")));
    }
}

#[test]
fn a_killed_score_job_resumes_to_the_same_result() {
    let dir = scratch("score-resume");
    let mut fasta = String::new();
    let mut state = 7u64;
    for i in 0..60 {
        let seq: String = (0..8 + i % 13)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b"ACDEFGHIKLMNPQRSTVWY"[(state >> 33) as usize % 20] as char
            })
            .collect();
        fasta.push_str(&format!(">s{i}\n{seq}\n"));
    }
    std::fs::write(dir.join("in.fasta"), fasta).unwrap();
    let (code, stderr) = score_cli(
        &dir,
        &["in.fasta", "-o", "ref.parquet", "--rows-per-part", "6"],
    );
    assert_eq!(code, 0, "{stderr}");
    let model = fixture_dir("tiny_h64");
    let args = [
        "score",
        "in.fasta",
        "-o",
        "out.parquet",
        "--rows-per-part",
        "6",
        "--no-progress",
        "--model",
        model.to_str().unwrap(),
    ];
    kill_after_parts(&dir, &args, "out.parquet", 3);
    let (code, stderr) = score_cli(
        &dir,
        &["in.fasta", "-o", "out.parquet", "--rows-per-part", "6"],
    );
    assert_eq!(code, 2, "progress is protected: {stderr}");
    let (code, stderr) = score_cli(
        &dir,
        &[
            "in.fasta",
            "-o",
            "out.parquet",
            "--rows-per-part",
            "6",
            "--resume",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resumed:"), "{stderr}");
    let (a, b) = (
        read_parquet(&dir.join("ref.parquet")),
        read_parquet(&dir.join("out.parquet")),
    );
    assert_eq!(strings(&a, "id"), strings(&b, "id"));
    assert_eq!(floats(&a, "pll"), floats(&b, "pll"));
}

/// `esmbed embed --pll`: the PLL columns beside the embeddings, in one job whose packs mix
/// sequences and their masked copies. The PLLs are the reference's (1e-4) and bitwise those of
/// `esmbed score`; the embeddings are bitwise those of a job without `--pll`; repeats reuse.
#[test]
fn embed_pll_adds_the_score_jobs_plls_to_unchanged_embeddings() {
    let dir = scratch("embed-pll");
    let want = scores("tiny_h64");
    let mut fasta = String::new();
    for s in &want.sequences {
        fasta.push_str(&format!(
            ">{}\n{}\n>{}_again\n{}\n",
            s.id, s.sequence, s.id, s.sequence
        ));
    }
    fasta.push_str(">bad\nMK1T\n");
    std::fs::write(dir.join("in.fasta"), fasta).unwrap();
    let model = fixture_dir("tiny_h64");
    let embed = |args: &[&str]| {
        let mut all = vec!["embed", "in.fasta", "--model", model.to_str().unwrap()];
        all.extend_from_slice(&["--no-progress", "--tokens-per-batch", "100"]);
        all.extend_from_slice(args);
        let (code, _, stderr) = esmbed_in(&dir, &all);
        (code, stderr)
    };
    for args in [
        &[
            "-o",
            "pll.parquet",
            "--pll",
            "--per-residue",
            "--rows-per-part",
            "3",
        ][..],
        &["-o", "plain.parquet", "--per-residue"],
    ] {
        let (code, stderr) = embed(args);
        assert_eq!(code, 0, "{stderr}");
    }
    let (code, stderr) = score_cli(&dir, &["in.fasta", "-o", "score.parquet"]);
    assert_eq!(code, 0, "{stderr}");

    let (pll, plain) = (
        read_parquet(&dir.join("pll.parquet")),
        read_parquet(&dir.join("plain.parquet")),
    );
    assert_eq!(pll.num_rows(), 2 * want.sequences.len());
    let plls = floats(&pll, "pll");
    let ppl = floats(&pll, "pseudo_perplexity");
    for (i, s) in want.sequences.iter().enumerate() {
        for row in [2 * i, 2 * i + 1] {
            close(plls[row], s.pll, &s.id);
            close(ppl[row], s.pseudo_perplexity, &s.id);
        }
    }
    let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
    let scored = read_parquet(&dir.join("score.parquet"));
    assert_eq!(bits(plls), bits(floats(&scored, "pll")));
    for column in ["embedding", "residue_embeddings"] {
        assert_eq!(
            pll.column_by_name(column),
            plain.column_by_name(column),
            "{column}"
        );
    }
    let errors = read_parquet(&dir.join("pll.errors.parquet"));
    assert_eq!(strings(&errors, "id"), [Some("bad".to_string())]);

    // The dry run plans the same packs: each distinct sequence of L residues and its L copies,
    // L + 2 tokens each.
    let model_arg = model.to_str().unwrap();
    let dry = [
        "embed",
        "in.fasta",
        "-o",
        "d.parquet",
        "--pll",
        "--dry-run",
        "--json",
        "--model",
        model_arg,
    ];
    let (code, stdout, stderr) = esmbed_in(&dir, dry);
    assert_eq!(code, 0, "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tokens: usize = want
        .sequences
        .iter()
        .map(|s| (s.sequence.len() + 1) * (s.sequence.len() + 2))
        .sum();
    assert_eq!(plan["tokens"], tokens);

    // Refused before any work: windows, and a model without the head.
    let (code, stderr) = embed(&["-o", "w.parquet", "--pll", "--long", "window"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("--long truncate"), "{stderr}");
    let headless = fixture_dir("tiny_h16_bf16");
    let headless = [
        "embed",
        "in.fasta",
        "-o",
        "h.parquet",
        "--pll",
        "--model",
        headless.to_str().unwrap(),
    ];
    let (code, _, stderr) = esmbed_in(&dir, headless);
    assert_ne!(code, 0);
    assert!(stderr.contains("lm_head"), "{stderr}");
}

/// `--pll` on the device pool: copies of one row spread over packs that two workers return in
/// any order, packs that run out of memory split; the PLLs are still the one-device ones.
#[test]
fn embed_pll_on_several_workers_sums_in_residue_order() {
    let dir = scratch("embed-pll-pool");
    let want = scores("tiny_h64");
    let fasta: String = want
        .sequences
        .iter()
        .map(|s| format!(">{}\n{}\n", s.id, s.sequence))
        .collect();
    std::fs::write(dir.join("in.fasta"), fasta).unwrap();
    let model = with_head(&fixture_dir("tiny_h64")).unwrap();
    let run = |name: &str, workers: Vec<std::sync::Arc<dyn esmbed::engine::PackEmbedder>>| {
        let output = dir.join(name);
        run_job_with(&dir.join("in.fasta"), &output, &model, workers, |o| {
            o.plan.pll = true;
            o.plan.tokens_per_batch = 60;
        })
        .unwrap();
        floats(&read_parquet(&output), "pll")
    };
    let faulty = std::sync::Arc::new(Faulty {
        inner: with_head(&fixture_dir("tiny_h64")).unwrap(),
        max_tokens: 40,
        poison: usize::MAX,
        failures: Default::default(),
    });
    let one = run(
        "one.parquet",
        vec![std::sync::Arc::new(
            with_head(&fixture_dir("tiny_h64")).unwrap(),
        )],
    );
    let two = run(
        "two.parquet",
        vec![
            faulty.clone(),
            std::sync::Arc::new(with_head(&fixture_dir("tiny_h64")).unwrap()),
        ],
    );
    assert!(faulty.failures.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(one, two);
    for (got, s) in one.iter().zip(&want.sequences) {
        close(*got, s.pll, &s.id);
    }
}
