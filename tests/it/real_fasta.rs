//! The 15 real UniRef50 sequences of `examples/data/some_proteins.fasta` through the library API.

use crate::common::*;
use esmbed::{DType, Device, EmbedOptions, Embedder, Pooling};

fn read_fasta(path: &std::path::Path) -> Vec<(String, String)> {
    let mut reader = std::fs::File::open(path)
        .map(std::io::BufReader::new)
        .map(noodles_fasta::io::Reader::new)
        .unwrap();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (
                String::from_utf8_lossy(r.name()).into_owned(),
                String::from_utf8_lossy(r.sequence().as_ref()).into_owned(),
            )
        })
        .collect()
}

#[test]
fn real_sequences_embed_through_the_library_api() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/some_proteins.fasta");
    let records = read_fasta(&path);
    assert_eq!(records.len(), 15);
    let options = EmbedOptions {
        layers: vec![-1, 1],
        pooling: Pooling {
            mean: true,
            bos: true,
            per_residue: false,
        },
        tokens_per_batch: 2048,
        ..EmbedOptions::default()
    };
    let dir = fixture_dir("tiny_h64");
    let embedder =
        Embedder::load(dir.to_str().unwrap(), &Device::Cpu, DType::F32, &options).unwrap();
    let sequences: Vec<&str> = records.iter().map(|(_, s)| s.as_str()).collect();
    let out = embedder.embed(&sequences).unwrap();
    assert_eq!(out.len(), 15);
    for ((id, seq), emb) in records.iter().zip(&out) {
        assert_eq!(emb.length, seq.len(), "{id}");
        assert_eq!(emb.layers.len(), 2);
        assert_eq!(emb.layers[0].layer, 2, "-1 resolves to the last layer");
        assert_eq!(emb.layers[1].layer, 1);
        for layer in &emb.layers {
            let mean = layer.mean.as_ref().unwrap();
            assert_eq!(mean.len(), 128);
            assert!(mean.iter().all(|x| x.is_finite()), "{id}");
        }
    }
    // The convenience API sorts and packs; each result must equal the sequence embedded alone.
    for (i, seq) in sequences.iter().enumerate().step_by(5) {
        let alone = embedder.embed(&[seq]).unwrap();
        let err = relative_error(
            alone[0].layers[0].mean.as_ref().unwrap(),
            out[i].layers[0].mean.as_ref().unwrap(),
        );
        assert!(err <= 1e-6, "record {i}: {err:.2e}");
    }
}
