//! Out of memory mid-job: the pack is split and retried down to single sequences; a sequence that
//! fails even alone becomes an error row; every row is emitted exactly once, and the rest equals a
//! run without faults. The failure is injected on the CPU by wrapping the model stage.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::*;
use esmbed::engine::PackEmbedder;
use esmbed::Embedder;

fn run(
    dir: &std::path::Path,
    name: &str,
    embedder: Arc<dyn PackEmbedder>,
    model: &Embedder,
) -> esmbed::pipeline::JobSummary {
    run_job(
        &dir.join("in.fasta"),
        &dir.join(name),
        model,
        vec![embedder],
        2000,
        30,
    )
    .unwrap()
}

#[test]
fn out_of_memory_splits_packs_and_loses_nothing() {
    let dir = scratch("oom");
    let residues = b"ACDEFGHIKLMNPQRSTVWY";
    let mut text = String::new();
    for i in 0..100usize {
        // Lengths 20..=119 residues; the poisoned one is row 57 (77 residues = 79 tokens).
        let seq: String = (0..20 + i)
            .map(|j| residues[(i * 7 + j * 3) % 20] as char)
            .collect();
        text.push_str(&format!(">s{i}\n{seq}\n"));
    }
    std::fs::write(dir.join("in.fasta"), text).unwrap();

    let load = || load_embedder("tiny_h16");
    let model = load();
    let clean = run(&dir, "clean.parquet", Arc::new(load()), &model);
    assert_eq!(clean.errors, 0);

    let faulty = Arc::new(Faulty {
        inner: load(),
        max_tokens: 700,
        poison: 79,
        failures: AtomicUsize::new(0),
    });
    let summary = run(&dir, "faulty.parquet", faulty.clone(), &model);
    assert!(
        faulty.failures.load(Ordering::SeqCst) > 10,
        "the fault must trigger splits"
    );
    assert_eq!(summary.rows, 100);
    assert_eq!(summary.embedded, 99);
    assert_eq!(summary.errors, 1);

    let a = read_parquet(&dir.join("clean.parquet"));
    let b = read_parquet(&dir.join("faulty.parquet"));
    let errors = read_parquet(&dir.join("faulty.errors.parquet"));
    assert_eq!(strings(&errors, "id"), [Some("s57".to_string())]);
    let reason = strings(&errors, "reason")[0].clone().unwrap();
    assert!(
        reason.contains("out of memory") && reason.contains("79 tokens"),
        "{reason}"
    );

    let ids_a = strings(&a, "id");
    let ids_b = strings(&b, "id");
    let expected: Vec<_> = ids_a
        .iter()
        .filter(|id| id.as_deref() != Some("s57"))
        .cloned()
        .collect();
    assert_eq!(ids_b, expected, "every other row once, in order");
    let va = vectors(&a, "embedding");
    let vb = vectors(&b, "embedding");
    let kept: Vec<_> = ids_a
        .iter()
        .zip(&va)
        .filter(|(id, _)| id.as_deref() != Some("s57"))
        .map(|(_, v)| v)
        .collect();
    for (x, y) in kept.iter().zip(&vb) {
        assert!(relative_error(y, x) <= 1e-6);
    }
}
