//! The host side of a job, in residues/s: FASTA parsing, then parsing + tokenizing + packing
//! (parts of 10,000 rows, sorted, first-fit decreasing). These stages must outrun the GPU.
//!
//!     cargo bench --bench cpu_stages

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use esmbed::bench::{random_sequences, synthetic_lengths};
use esmbed::input::fasta::FastaBatches;
use esmbed::pipeline::plan::{LongPolicy, Origin, PartBuilder, PlanOptions};
use esmbed::tokenize::{Tokenizer, TOKENS};

/// 20,000 UniRef-like sequences as FASTA text wrapped at 60 columns.
fn fasta() -> (Vec<u8>, u64) {
    let lengths = synthetic_lengths(20_000, 3, 1022);
    let sequences = random_sequences(&lengths, 3);
    let mut text = Vec::new();
    for (i, seq) in sequences.iter().enumerate() {
        text.extend_from_slice(format!(">seq{i} some description\n").as_bytes());
        let residues: Vec<u8> = seq[1..seq.len() - 1]
            .iter()
            .map(|&t| TOKENS[t as usize].as_bytes()[0])
            .collect();
        for line in residues.chunks(60) {
            text.extend_from_slice(line);
            text.push(b'\n');
        }
    }
    (text, lengths.iter().sum::<usize>() as u64)
}

fn stages(c: &mut Criterion) {
    let (text, residues) = fasta();
    let mut group = c.benchmark_group("cpu_stages");
    group.throughput(Throughput::Elements(residues));
    group.sample_size(10);

    group.bench_function("parse", |b| {
        b.iter(|| {
            let mut rows = 0;
            for batch in FastaBatches::new(&text[..], "bench", 8192).unwrap() {
                rows += batch.unwrap().batch.num_rows();
            }
            assert_eq!(rows, 20_000);
        })
    });

    let options = PlanOptions {
        tokens_per_batch: 16384,
        max_length: 1022,
        long: LongPolicy::Truncate,
        pll: false,
    };
    let policy = options.policy(Tokenizer::default());
    group.bench_function("parse_tokenize_pack", |b| {
        b.iter(|| {
            let input: Arc<str> = Arc::from("bench");
            let mut part = PartBuilder::new(0, 0);
            let mut packs = 0;
            for batch in FastaBatches::new(&text[..], "bench", 8192).unwrap() {
                let batch = batch.unwrap().batch;
                let ids = batch.column(0).as_string::<i32>().clone();
                let sequences = batch.column(2).as_string::<i32>().clone();
                for i in 0..sequences.len() {
                    let origin = Origin {
                        id: Some(ids.value(i).to_string()),
                        input: input.clone(),
                        record: i as u64 + 1,
                    };
                    part.add_row(Some(sequences.value(i)), origin, None, &policy, None);
                    if part.len() == 10_000 {
                        let next = PartBuilder::new(part.index() + 1, part.next_position());
                        packs += std::mem::replace(&mut part, next)
                            .finish(&options)
                            .1
                            .count();
                    }
                }
            }
            if !part.is_empty() {
                packs += part.finish(&options).1.count();
            }
            assert!(packs > 0);
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
