//! Batch invariance: a sequence's output does not depend on what else is in its pack, or where.
//! (A common failure of padded implementations; the packed forward must not have it.) On the CPU
//! the outputs are bitwise equal: reusing an identical sequence's result relies on it.

use crate::common::*;
use esmbed::{PackedBatch, Pooling, Tokenizer};
use proptest::prelude::*;

const RESIDUES: &[u8] = b"LAGVSERTIDPKQNFYMHWCXBUZO";

fn sequence(seed: &[u8]) -> String {
    seed.iter()
        .map(|b| RESIDUES[*b as usize % RESIDUES.len()] as char)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_sequence_embeds_the_same_alone_and_in_any_pack(
        seeds in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..120), 1..8),
        target in any::<prop::sample::Index>(),
    ) {
        let fixture = Fixture::load("tiny_h16");
        let model = fixture.hf_model();
        let tokenizer = Tokenizer::default();
        let tokens: Vec<Vec<u32>> = seeds
            .iter()
            .map(|s| tokenizer.encode(&sequence(s)).unwrap())
            .collect();
        let t = target.index(tokens.len());
        let layers = [0, 2, fixture.num_layers];
        let all = Pooling { mean: true, bos: true, per_residue: true };

        let alone = PackedBatch::from_sequences([&tokens[t][..]]);
        let packed = PackedBatch::from_sequences(tokens.iter().map(|t| &t[..]));
        let h_alone = model.forward(&alone, &layers).unwrap();
        let h_packed = model.forward(&packed, &layers).unwrap();
        for (layer, (a, p)) in layers.iter().zip(h_alone.iter().zip(&h_packed)) {
            let range = packed.range(t);
            let rows = p.narrow(0, range.start, range.len()).unwrap();
            let err = relative_error(
                &rows.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            prop_assert!(err == 0.0, "layer {layer}: hidden differs by {err:.2e}");

            let pa = esmbed::pool::pool(a, &alone, *layer, all).unwrap();
            let pp = esmbed::pool::pool(p, &packed, *layer, all).unwrap();
            let h = pa.hidden;
            let mean_p = &pp.mean.as_ref().unwrap()[t * h..(t + 1) * h];
            let err = relative_error(mean_p, pa.mean.as_ref().unwrap());
            prop_assert!(err == 0.0, "layer {layer}: mean differs by {err:.2e}");
        }
    }
}
