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

/// Largest absolute difference between a device result and an f32 reference on the CPU, and the
/// reference's largest magnitude.
fn worst(got: &candle_core::Tensor, want: &candle_core::Tensor) -> (f32, f32) {
    let got = got
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let max = |t: candle_core::Tensor| -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    (max((got - want).unwrap()), max(want.clone()))
}

/// Each fused kernel against f32 arithmetic on the CPU, at ESM-2's real widths (the fixtures'
/// hidden sizes of 16 and 64 leave most of each kernel's vector lanes and loops idle). Inputs are
/// rounded to the dtype first, so the differences are the kernels' own roundings (and, after a
/// GEMM, cuBLAS's summation order): a few ulps of the output's scale at most.
#[test]
fn fused_kernels_match_f32_at_esm2_widths() {
    use candle_core::{Module, Tensor};
    use candle_nn::{LayerNorm, Linear};
    use esmbed::model::kernels;

    let gpu = Device::new_cuda(0).expect("a CUDA GPU");
    let cpu = Device::Cpu;
    let randn = |std: f64, shape: &[usize]| Tensor::randn(0f32, std as f32, shape, &cpu).unwrap();
    // (hidden, heads): 8M, 650M, 3B, 15B (the widest LayerNorm row the kernel takes).
    for (hidden, heads) in [(320, 20), (1280, 20), (2560, 40), (5120, 40)] {
        for dtype in [DType::BF16, DType::F16] {
            let ulp = if dtype == DType::BF16 {
                2f32.powi(-8)
            } else {
                2f32.powi(-11)
            };
            let rounded = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let on_gpu = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap();
            let check = |what: &str, got: &Tensor, want: &Tensor| {
                let (worst, scale) = worst(got, want);
                assert!(
                    worst <= 4.0 * ulp * scale,
                    "{what} {hidden} {dtype:?}: off by {worst} at scale {scale}"
                );
            };
            let tokens = 37;
            let x = rounded(randn(1.0, &[tokens, hidden]));
            let linear = |out: usize| {
                let w = rounded((randn(1.0, &[out, hidden]) / (hidden as f64).sqrt()).unwrap());
                let b = rounded(randn(0.1, &[out]));
                let gpu_layer = Linear::new(on_gpu(&w), Some(on_gpu(&b)));
                (Linear::new(w, Some(b)), gpu_layer)
            };

            // LayerNorm.
            let w = rounded((randn(0.2, &[hidden]) + 1.0).unwrap());
            let b = rounded(randn(0.2, &[hidden]));
            let want = LayerNorm::new(w.clone(), b.clone(), 1e-5)
                .forward(&x)
                .unwrap();
            let got = kernels::layer_norm(&on_gpu(&x), &on_gpu(&w), &on_gpu(&b), 1e-5).unwrap();
            check("layer_norm", &got, &want);

            // FC1 with bias, then the exact GELU on its rounded output (HF's order).
            let (cpu_fc1, gpu_fc1) = linear(4 * hidden);
            let want = rounded(cpu_fc1.forward(&x).unwrap()).gelu_erf().unwrap();
            let got = kernels::linear_gelu(&on_gpu(&x), &gpu_fc1).unwrap();
            check("linear_gelu", &got, &want);

            // Q/K/V with rotary on the query and key heads, f32 tables at arbitrary angles.
            let d = hidden / heads;
            let half = d / 2;
            let (cpu_qkv, gpu_qkv) = linear(3 * hidden);
            let qkv = rounded(cpu_qkv.forward(&x).unwrap());
            let angles = randn(3.0, &[tokens, half]);
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let qk = qkv
                .narrow(1, 0, 2 * hidden)
                .unwrap()
                .reshape((tokens, 2 * heads, d))
                .unwrap();
            let x1 = qk.narrow(2, 0, half).unwrap();
            let x2 = qk.narrow(2, half, half).unwrap();
            let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
            let r1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
            let r2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
            let rotated = Tensor::cat(&[r1, r2], 2)
                .unwrap()
                .reshape((tokens, 2 * hidden))
                .unwrap();
            let v = qkv.narrow(1, 2 * hidden, hidden).unwrap();
            let want = Tensor::cat(&[rotated, v], 1).unwrap();
            let (cos, sin) = (cos.to_device(&gpu).unwrap(), sin.to_device(&gpu).unwrap());
            let got = kernels::linear_rotary(&on_gpu(&x), &gpu_qkv, (&cos, &sin), 2 * heads, half)
                .unwrap();
            check("linear_rotary", &got, &want);
        }
    }
}

/// The device running out of memory is found by the error's type: the driver's
/// `CUDA_ERROR_OUT_OF_MEMORY` and esmbed's own [`esmbed::model::DeviceOutOfMemory`] (cuBLASLt),
/// wrapped in context or not; other driver errors are device failures.
#[test]
fn out_of_memory_errors_are_typed() {
    use candle_core::cuda_backend::cudarc::cublaslt::{result::CublasError, sys::cublasStatus_t};
    use candle_core::cuda_backend::cudarc::driver::{sys::CUresult, DriverError};
    use candle_core::cuda_backend::CudaError;

    let driver = |r| candle_core::Error::from(CudaError::Cuda(DriverError(r)));
    let oom = driver(CUresult::CUDA_ERROR_OUT_OF_MEMORY).context("a pack");
    assert!(esmbed::Error::from(oom).is_out_of_memory());
    let other = esmbed::Error::from(driver(CUresult::CUDA_ERROR_INVALID_VALUE));
    assert!(!other.is_out_of_memory());
    let lt = esmbed::model::DeviceOutOfMemory {
        operation: "a GEMM".into(),
        status: CublasError(cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED),
    };
    let lt = candle_core::Error::Cuda(Box::new(lt));
    assert!(esmbed::Error::from(lt).is_out_of_memory());
}
