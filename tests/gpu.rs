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

/// `--dtype fp8` on the fixtures it was measured on (README, "FP8"; H200, 2026-12-03: min cosine
/// 0.9964 and 0.9901, mean 0.9985 and 0.9952): guard rails a little below those figures, and batch
/// invariance exact (each token's row is quantized on its own, so a pack changes nothing).
#[test]
fn fp8_fidelity_on_the_fixtures_stays_where_measured() {
    let device = Device::new_cuda(0).expect("a CUDA GPU");
    let mut lengths = vec![1, 2, 3, 50, 1022];
    lengths.extend(bench::synthetic_lengths(8, 7, 1022));
    let sequences = bench::random_sequences(&lengths, 7);
    for (name, min_cosine, mean_cosine) in
        [("tiny_h16", 0.995, 0.998), ("tiny_esmc_h16", 0.985, 0.994)]
    {
        let checkpoint = Checkpoint::open(&ModelSource::HfDir(fixture_dir(name))).unwrap();
        let a = verify::compare(&checkpoint, &device, DType::F8E4M3, &sequences).unwrap();
        eprintln!("{name} {a:?}");
        assert!(
            a.min_cosine >= min_cosine,
            "{name} fp8: min cosine {}",
            a.min_cosine
        );
        assert!(
            a.mean_cosine >= mean_cosine,
            "{name} fp8: mean cosine {}",
            a.mean_cosine
        );
        assert_eq!(a.invariance_max_abs, 0.0, "{name} fp8: batch invariance");
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

/// The FP8 kernels against f32 arithmetic on the CPU at ESM-2's widths, on rows with a few ×50
/// outlier channels: quantized rows dequantize to the bf16 values within e4m3's rounding (half a
/// step: 2⁻⁴ relative for normal values, `scale · 2⁻¹⁰` absolute for subnormal ones), each row's
/// largest magnitude to ±448 · scale; the FP8 GEMM equals the f32 product of the dequantized
/// operands (plus bias and residual) within bf16's rounding of the output and FP8 accumulation.
#[test]
fn fp8_kernels_match_f32() {
    use candle_core::{Module, Tensor};
    use candle_nn::LayerNorm;
    use esmbed::model::kernels;

    let gpu = Device::new_cuda(0).expect("a CUDA GPU");
    kernels::check_fp8_device(&gpu).expect("a GPU that takes FP8 (compute capability 8.9+)");
    let cpu = Device::Cpu;
    let randn = |std: f64, shape: &[usize]| Tensor::randn(0f32, std as f32, shape, &cpu).unwrap();
    let bf16 = |t: Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let on_gpu = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_device(&gpu).unwrap();
    // To the host first: candle's CUDA casts have no e4m3 kernels.
    let host = |t: &Tensor| t.to_device(&cpu).unwrap().to_dtype(DType::F32).unwrap();
    let dequantized = |r: &kernels::Fp8Rows| -> Tensor {
        host(&r.q)
            .broadcast_mul(&host(&r.scale).unsqueeze(1).unwrap())
            .unwrap()
    };
    let check_rows = |what: &str, r: &kernels::Fp8Rows, want: &Tensor| {
        let (rows, cols) = want.dims2().unwrap();
        assert_eq!(r.q.dims(), [rows, cols], "{what}");
        let deq: Vec<Vec<f32>> = dequantized(r).to_vec2().unwrap();
        let want: Vec<Vec<f32>> = want.to_vec2().unwrap();
        let scales: Vec<f32> = host(&r.scale).to_vec1().unwrap();
        for (i, (d, w)) in deq.iter().zip(&want).enumerate() {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = scales[i];
            assert!(
                (s - amax / 448.0).abs() <= 1e-6 * s,
                "{what} row {i}: scale {s}, amax {amax}"
            );
            for (x, y) in d.iter().zip(w) {
                let bound = y.abs() / 16.0 + s / 1024.0 + 1e-6 * amax;
                assert!(
                    (x - y).abs() <= bound,
                    "{what} row {i}: {x} for {y} (scale {s})"
                );
            }
        }
    };
    let outliers = |t: Tensor| {
        let cols = t.dim(1).unwrap();
        let mut m = vec![1f32; cols];
        for c in [3, cols / 3, cols - 1] {
            m[c] = 50.0;
        }
        t.broadcast_mul(&Tensor::new(m, &cpu).unwrap()).unwrap()
    };
    for hidden in [320, 1280, 2560, 5120] {
        let tokens = 37;
        let x = bf16(outliers(randn(1.0, &[tokens, hidden])));

        let q = kernels::quantize_rows(&on_gpu(&x)).unwrap();
        check_rows("quantize_rows", &q, &x);

        let w = bf16((randn(1.0, &[hidden, hidden]) / (hidden as f64).sqrt()).unwrap());
        let b = bf16(randn(0.1, &[hidden]));
        let lw = LayerNorm::new(
            w.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(),
            b.clone(),
            1e-5,
        );
        let want = bf16(lw.forward(&x).unwrap());
        let (gamma, beta) = (lw.weight().clone(), b.clone());
        let got =
            kernels::layer_norm_fp8(&on_gpu(&x), &on_gpu(&gamma), &on_gpu(&beta), 1e-5).unwrap();
        check_rows("layer_norm_fp8", &got, &want);

        let h = bf16(randn(2.0, &[tokens, 4 * hidden]));
        check_rows(
            "gelu_fp8",
            &kernels::gelu_fp8(&on_gpu(&h)).unwrap(),
            &bf16(h.gelu_erf().unwrap()),
        );
        let ffn = 4 * hidden / 2;
        let (g, u) = (h.narrow(1, 0, ffn).unwrap(), h.narrow(1, ffn, ffn).unwrap());
        let want = bf16((g.silu().unwrap() * u).unwrap());
        check_rows(
            "swiglu_fp8",
            &kernels::swiglu_fp8(&on_gpu(&h)).unwrap(),
            &want,
        );

        // The GEMM: y = deq(x) · deq(w)ᵀ + b + r.
        let wq = kernels::quantize_rows(&on_gpu(&w)).unwrap();
        let r = bf16(randn(1.0, &[tokens, hidden]));
        let want = (dequantized(&q)
            .matmul(&dequantized(&wq).t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            + &r)
            .unwrap();
        let got = kernels::linear_fp8(&q, &wq, &on_gpu(&b), Some(&on_gpu(&r))).unwrap();
        let (worst, scale) = worst(&got, &want);
        assert!(
            worst <= 2f32.powi(-7) * scale,
            "linear_fp8 {hidden}: off by {worst} at scale {scale}"
        );
        eprintln!("fp8 {hidden}: GEMM off by {worst:.3e} at scale {scale:.3e}");
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

/// The packed attention (FlashAttention 2, or cuDNN's fused SDPA with the `cudnn` feature and
/// `ESMBED_ATTENTION=cudnn`) against the exact per-sequence f32 path, on the fused Q/K/V layout
/// the models use (strided views of one `[T, 3H, d]` buffer), at ESM-2 8M's, 650M's and 15B's
/// head dims (16, 64, 128) and ESM C 600M's head count; then a sequence alone against the same
/// sequence inside a pack (bitwise). The pack of 9 sequences runs cuDNN's graph for 16 (7 empty ones).
#[test]
fn packed_attention_matches_f32_and_is_batch_invariant() {
    use candle_core::Tensor;
    use esmbed::model::attention::{attend_fused_qkv, PackLayout};
    use esmbed::PackedBatch;

    let gpu = Device::new_cuda(0).expect("a CUDA GPU");
    #[cfg(feature = "cudnn")]
    {
        let asked = std::env::var("ESMBED_ATTENTION").as_deref() == Ok("cudnn");
        eprintln!("cuDNN in use: {}", esmbed::model::cudnn::in_use());
        assert_eq!(
            esmbed::model::cudnn::in_use(),
            asked,
            "ESMBED_ATTENTION=cudnn decides"
        );
    }
    let lens = [1usize, 3, 50, 270, 1022, 7, 129, 64, 65];
    let ids: Vec<Vec<u32>> = lens.iter().map(|&l| vec![4; l]).collect();
    let pack = PackedBatch::from_sequences(ids.iter().map(|v| v.as_slice()));
    let tokens: usize = lens.iter().sum();
    for (heads, d) in [(20, 64), (18, 64), (20, 16), (8, 128)] {
        for dtype in [DType::BF16, DType::F16] {
            eprintln!("attention {heads}x{d} {dtype:?} ...");
            // Scores of unit variance, as for a trained model's scaled queries.
            let std = (d as f32).powf(-0.25);
            let qkv = Tensor::randn(0f32, std, (tokens, 3 * heads * d), &Device::Cpu).unwrap();
            let qkv = qkv.to_dtype(dtype).unwrap();
            let want = attend_fused_qkv(
                &qkv.to_dtype(DType::F32).unwrap(),
                heads,
                d,
                &PackLayout::new(&pack, &Device::Cpu).unwrap(),
            )
            .unwrap();
            let on_gpu = qkv.to_device(&gpu).unwrap();
            let layout = PackLayout::new(&pack, &gpu).unwrap();
            let got = attend_fused_qkv(&on_gpu, heads, d, &layout).unwrap();
            let (off, scale) = worst(&got, &want);
            let ulp = if dtype == DType::BF16 {
                2f32.powi(-8)
            } else {
                2f32.powi(-11)
            };
            eprintln!("attention {heads}x{d} {dtype:?}: worst {off:.3e} at scale {scale:.3}");
            assert!(
                off <= 8.0 * ulp * scale,
                "{heads}x{d} {dtype:?}: {off} at {scale}"
            );
            // The 270-residue sequence (rows 54..324) alone, in a pack of its own.
            let (start, len) = (54, 270);
            let alone = PackedBatch::from_sequences([ids[3].as_slice()]);
            let one = attend_fused_qkv(
                &on_gpu.narrow(0, start, len).unwrap(),
                heads,
                d,
                &PackLayout::new(&alone, &gpu).unwrap(),
            )
            .unwrap();
            let packed = got.narrow(0, start, len).unwrap();
            let (diff, _) = worst(
                &one,
                &packed
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap(),
            );
            eprintln!("attention {heads}x{d} {dtype:?}: alone vs packed {diff:e}");
            assert_eq!(
                diff, 0.0,
                "{heads}x{d} {dtype:?}: a sequence alone differs from packed"
            );
        }
    }
    #[cfg(feature = "cudnn")]
    if esmbed::model::cudnn::in_use() {
        // Two pack shapes (16 and 1 sequences) for each of 4 head layouts and 2 dtypes.
        let graphs = esmbed::model::cudnn::graphs();
        eprintln!("cuDNN graphs on this thread: {graphs}");
        assert_eq!(graphs, 16);
    }
}
