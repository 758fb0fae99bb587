//! Embed the sequences of a FASTA file with the library API and print each one's nearest
//! neighbour by cosine similarity of the mean embeddings.
//!
//!     cargo run --release --example similarity -- examples/data/some_proteins.fasta tests/fixtures/tiny_h64
//!
//! (The second argument is any `--model` value: a hub id, a size such as 650M, a directory.)

use esmbed::input::fasta::FastaBatches;
use esmbed::{DType, Device, EmbedOptions, Embedder};

use arrow::array::AsArray;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let fasta = args
        .next()
        .unwrap_or_else(|| "examples/data/some_proteins.fasta".into());
    let model = args
        .next()
        .unwrap_or_else(|| "facebook/esm2_t33_650M_UR50D".into());

    let mut ids = Vec::new();
    let mut sequences = Vec::new();
    for batch in FastaBatches::new(std::fs::File::open(&fasta)?, &fasta, 1024)? {
        let batch = batch?.batch;
        let (id, seq) = (
            batch.column(0).as_string::<i32>(),
            batch.column(2).as_string::<i32>(),
        );
        for i in 0..batch.num_rows() {
            ids.push(id.value(i).to_string());
            sequences.push(seq.value(i).to_string());
        }
    }

    let embedder = Embedder::load(&model, &Device::Cpu, DType::F32, &EmbedOptions::default())?;
    let embeddings = embedder.embed(&sequences)?;
    let vectors: Vec<&Vec<f32>> = embeddings
        .iter()
        .map(|e| e.layers[0].mean.as_ref().unwrap())
        .collect();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    for (i, a) in vectors.iter().enumerate() {
        let best = vectors
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(j, b)| {
                (
                    j,
                    a.iter().zip(b.iter()).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b)),
                )
            })
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap();
        println!(
            "{:<28} nearest {:<28} cosine {:.4}",
            ids[i], ids[best.0], best.1
        );
    }
    Ok(())
}
