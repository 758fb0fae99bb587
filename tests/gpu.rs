//! The CUDA path against the exact CPU f32 path, on the fixture models. Runs only with the `cuda`
//! feature on a machine with a GPU: `cargo test --features cuda --test gpu`.
//! (The same checks are `esmbed verify --model tests/fixtures/tiny_h64 --device cuda`.)
#![cfg(feature = "cuda")]

mod common;

use common::fixture_dir;
use esmbed::{bench, verify, Checkpoint, DType, Device, ModelSource};

/// Documented tolerances (README, "GPU numerics"); measured on an H200: bf16 0.99994 and 0.013,
/// f16 0.999999 and 0.0017.
fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (0.9995, 0.03),
        _ => (0.99999, 0.005),
    }
}

#[test]
fn cuda_matches_cpu_f32_on_every_fixture() {
    let device = Device::new_cuda(0).expect("a CUDA GPU");
    let mut lengths = vec![1, 2, 3, 50, 1022];
    lengths.extend(bench::synthetic_lengths(40, 7, 1022));
    let sequences = bench::random_sequences(&lengths, 7);
    for name in ["tiny_h16", "tiny_h64", "tiny_h16_bf16"] {
        let checkpoint = Checkpoint::open(&ModelSource::HfDir(fixture_dir(name))).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let a = verify::compare(&checkpoint, &device, dtype, &sequences).unwrap();
            eprintln!("{name} {a:?}");
            let (min_cosine, max_rel) = tolerance(dtype);
            assert!(
                a.min_cosine >= min_cosine,
                "{name} {dtype:?}: cosine {}",
                a.min_cosine
            );
            assert!(
                a.mean_max_rel_error <= max_rel,
                "{name} {dtype:?}: {}",
                a.mean_max_rel_error
            );
            // Packing may change rounding (other matmul shapes) but no more than precision does.
            assert!(
                a.invariance_max_abs <= 2.0 * a.mean_max_abs_error.max(1e-3),
                "{name} {dtype:?}: batch invariance {}",
                a.invariance_max_abs
            );
        }
    }
}
