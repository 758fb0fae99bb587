//! `--dtype fp8`: e4m3 GEMMs whose inputs are quantized by the kernels that already write them.
//!
//! A separate quantization pass (amax, then cast) costs more than the FP8 GEMM saves (650M QKV on
//! an H200: 0.59 ms against a 0.36 ms gain), so the LayerNorm that feeds QKV and FC1 writes e4m3
//! and a per-row scale directly, as do the GELU (ESM-2's FC2 input) and SwiGLU (ESM C's down
//! projection input) passes; only the attention output is quantized on its own, by the same row
//! kernel. Weights are quantized once at load, one scale per output channel. Scales are f32
//! `amax / 448` per row (token or output channel), applied in the GEMM's epilogue by cuBLASLt's
//! outer-vector scale mode: `D[t, n] = s_x[t] · s_w[n] · Σ q_x[t, k] q_w[n, k] + b[n] (+ R)`.

use candle_core::op::BackpropOp;

use super::layer_norm::{vectors_for, warp_per_row};
use super::*;

/// Rows of e4m3 values and one f32 dequantization scale per row: `x[r, c] ≈ q[r, c] · scale[r]`.
#[derive(Clone)]
pub struct Fp8Rows {
    /// `[R, C]`, F8E4M3.
    pub q: Tensor,
    /// `[R]`, F32.
    pub scale: Tensor,
}

const MODULE_FP8: &str = "esmbed_fp8";

/// The FP8 kernels with kernels.cu's helpers, for compute_89 (e4m3 conversions need sm_89).
fn ptx_fp8() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    let source = || format!("{SOURCE}\n{}", include_str!("fp8.cu"));
    compiled(&PTX, source, "compute_89", "esmbed's FP8 kernels")
}

/// That `device` can run the FP8 path: a Hopper GPU (compute capability 9.x: H100, H200, GH200).
/// Ada (8.9) and Blackwell have e4m3 tensor cores too, but cuBLASLt's outer-vector (per-row)
/// scale mode, which the GEMMs need, is Hopper's only (PyTorch's row-wise scaled matmul does not
/// use cuBLASLt on sm_89 or sm_100 for the same reason).
pub fn check_device(device: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let candle_core::Device::Cuda(dev) = device else {
        return Err(crate::Error::InvalidOption(
            "--dtype fp8 runs on Hopper GPUs only (H100, H200, GH200); on the CPU use f32".into(),
        ));
    };
    let ctx = dev.cuda_stream().context().clone();
    let major = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let minor = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .w()?;
    if major != 9 {
        return Err(crate::Error::InvalidOption(format!(
            "--dtype fp8 runs on Hopper GPUs only (compute capability 9.x: H100, H200, GH200), \
             whose cuBLASLt has the per-row FP8 scales it needs; this GPU is {major}.{minor}: \
             use --dtype bf16"
        )));
    }
    Ok(())
}

/// The rows' op before quantization.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RowOp {
    Copy,
    Gelu,
    /// Input rows `[gate | up]` of twice the output width.
    Swiglu,
}

/// Per-thread vector counts the row kernels are instantiated for.
const ROW_VECTORS: [usize; 5] = [1, 2, 4, 8, 12];
const ROW_THREADS: usize = 256;

/// The widest row the row kernels quantize.
pub const MAX_FP8_ROW: usize = 8 * ROW_THREADS * 12;

/// Empty e4m3 and f32 buffers for `rows × cols` quantized values.
fn outputs(
    dev: &CudaDevice,
    rows: usize,
    cols: usize,
) -> candle_core::Result<(CudaSlice<float8::F8E4M3>, CudaSlice<f32>)> {
    // SAFETY: every element of both is written by the kernel before anything reads them.
    unsafe {
        Ok((
            dev.alloc::<float8::F8E4M3>(elements(rows, cols)?)?,
            dev.alloc::<f32>(rows.max(1))?,
        ))
    }
}

/// The two buffers as tensors.
fn rows_of(
    dev: &CudaDevice,
    (q, scale): (CudaSlice<float8::F8E4M3>, CudaSlice<f32>),
    rows: usize,
    cols: usize,
) -> Fp8Rows {
    let storage = |slice| {
        candle_core::Storage::Cuda(CudaStorage {
            slice,
            device: dev.clone(),
        })
    };
    let scale = Tensor::from_storage(
        storage(CudaStorageSlice::F32(scale)),
        rows.max(1),
        BackpropOp::none(),
        false,
    );
    Fp8Rows {
        q: Tensor::from_storage(
            storage(CudaStorageSlice::F8E4M3(q)),
            (rows, cols),
            BackpropOp::none(),
            false,
        ),
        scale: if rows == 0 {
            scale.narrow(0, 0, 0).expect("an empty view")
        } else {
            scale
        },
    }
}

/// `x`, checked to be bf16, contiguous and 16-byte aligned (a copy where it was not).
fn bf16_input(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::BF16 {
        return Err(candle_core::Error::Msg(format!(
            "the FP8 path takes bf16 activations, not {:?}",
            x.dtype()
        ))
        .into());
    }
    aligned(x)
}

fn quantize(x: &Tensor, op: RowOp) -> Result<Fp8Rows> {
    let x = bf16_input(x)?;
    let (rows, in_cols) = x.dims2()?;
    let cols = if op == RowOp::Swiglu {
        in_cols / 2
    } else {
        in_cols
    };
    if !cols.is_multiple_of(8) || cols > MAX_FP8_ROW || (op == RowOp::Swiglu && in_cols != 2 * cols)
    {
        return Err(candle_core::Error::Msg(format!(
            "fp8 quantization: rows of {in_cols} ({op:?}), need a multiple of 8 up to {MAX_FP8_ROW}"
        ))
        .into());
    }
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        return Err(candle_core::Error::Msg("fp8 quantization runs on CUDA only".into()).into());
    };
    let dev = s.device().clone();
    let input = view::<half::bf16>(s, layout)?;
    let cols8 = cols / 8;
    let threads = cols8.next_multiple_of(32).min(ROW_THREADS);
    let vectors = ROW_VECTORS
        .into_iter()
        .find(|v| cols8 <= threads * v)
        .expect("checked against the widest");
    let name = match op {
        RowOp::Copy => "copy",
        RowOp::Gelu => "gelu",
        RowOp::Swiglu => "swiglu",
    };
    let func = dev.get_or_load_custom_func(
        &format!("bf16_quant_{name}{vectors}"),
        MODULE_FP8,
        ptx_fp8()?,
    )?;
    let (mut q, mut scale) = outputs(&dev, rows, cols)?;
    if rows > 0 {
        let (rows32, cols8_32) = (arg32(rows, "rows")?, arg32(cols8, "cols / 8")?);
        let mut builder = func.builder();
        builder.arg(&input);
        builder.arg(&mut q);
        builder.arg(&mut scale);
        builder.arg(&rows32);
        builder.arg(&cols8_32);
        let cfg = LaunchConfig {
            grid_dim: (rows32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (x, q, scale, rows, cols / 8): block r < rows reads the cols / 8 16-byte
        // vectors of row r of x (2 · cols / 8 for SwiGLU: a checked contiguous bf16 view of
        // [rows, in_cols], 16-byte aligned), writes row r of q (rows × cols bytes, 8 per vector)
        // and scale[r] (rows floats); threads · vectors ≥ cols / 8 covers the row, and the
        // block (a multiple of 32 threads, at most 256) fits the kernel's 8-warp reduction.
        unsafe { builder.launch(cfg) }.w()?;
    }
    Ok(rows_of(&dev, (q, scale), rows, cols))
}

/// `x`'s rows as e4m3 with per-row scales (weights at load, one scale per output channel; the
/// attention output before the output projection).
pub fn quantize_rows(x: &Tensor) -> Result<Fp8Rows> {
    quantize(x, RowOp::Copy)
}

/// `gelu_erf(x)` (ESM-2's FC1 output, its bias added), as e4m3 rows.
pub fn gelu_fp8(x: &Tensor) -> Result<Fp8Rows> {
    quantize(x, RowOp::Gelu)
}

/// `silu(gate) · up` of ESM C's fused `[T, 2I]` gate/up output, as e4m3 rows `[T, I]`.
pub fn swiglu_fp8(gate_up: &Tensor) -> Result<Fp8Rows> {
    quantize(gate_up, RowOp::Swiglu)
}

/// LayerNorm of `x`'s rows (`[T, H]`, `H` a multiple of 8 up to [`MAX_LAYER_NORM_WIDTH`]), as
/// e4m3 rows: the input of the QKV and FC1 (gate/up) GEMMs.
pub fn layer_norm_fp8(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Fp8Rows> {
    let x = bf16_input(x)?;
    let (w, b) = (bf16_input(w)?, bf16_input(b)?);
    let (rows, cols) = x.dims2()?;
    if !cols.is_multiple_of(8) || cols > MAX_LAYER_NORM_WIDTH {
        return Err(candle_core::Error::Msg(format!(
            "layer_norm_fp8: rows of {cols}, not a multiple of 8 up to {MAX_LAYER_NORM_WIDTH}"
        ))
        .into());
    }
    for p in [&w, &b] {
        if p.dims() != [cols] {
            return Err(candle_core::Error::Msg(format!(
                "layer_norm_fp8: parameters {:?} for rows of {cols}",
                p.dims()
            ))
            .into());
        }
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*xs else {
        return Err(candle_core::Error::Msg("fp8 LayerNorm runs on CUDA only".into()).into());
    };
    let dev = s.device().clone();
    let input = view::<half::bf16>(s, xl)?;
    let wv = view::<half::bf16>(cuda(&ws, &dev)?, wl)?;
    let bv = view::<half::bf16>(cuda(&bs, &dev)?, bl)?;
    let (mut q, mut scale) = outputs(&dev, rows, cols)?;
    if rows > 0 {
        let vectors = vectors_for(cols);
        let func = dev.get_or_load_custom_func(
            &format!("bf16_layer_norm_fp8_{vectors}"),
            MODULE_FP8,
            ptx_fp8()?,
        )?;
        let (rows32, cols8) = (arg32(rows, "rows")?, (cols / 8) as u32);
        let eps = eps as f32;
        let mut builder = func.builder();
        builder.arg(&input);
        builder.arg(&wv);
        builder.arg(&bv);
        builder.arg(&mut q);
        builder.arg(&mut scale);
        builder.arg(&rows32);
        builder.arg(&cols8);
        builder.arg(&eps);
        // SAFETY: (x, w, b, q, scale, rows, cols / 8, eps): warp r < rows reads row r of x (a
        // checked [rows, cols] bf16 view) and w, b ([cols], checked), all 16-byte aligned, and
        // writes row r of q (rows × cols bytes) and scale[r]; 32 · 8 · vectors ≥ cols.
        unsafe { builder.launch(warp_per_row(rows)) }.w()?;
    }
    Ok(rows_of(&dev, (q, scale), rows, cols))
}

/// The operand a storage guard holds, on `dev`.
fn guarded<'a, T: CudaDType>(
    (storage, layout): &'a (StorageRef<'_>, &Layout),
    dev: &CudaDevice,
) -> candle_core::Result<Operand<'a, T>> {
    operand(cuda(storage, dev)?, layout)
}

/// `post(x · wᵀ + b (+ residual))` with e4m3 inputs: `x` quantized rows `[T, K]`, `w` e4m3
/// weights `[N, K]` with their per-channel scales, `b` bf16 `[N]`; bf16 output `[T, N]`.
pub(crate) fn linear_fp8(
    x: &Fp8Rows,
    w: &Fp8Rows,
    b: &Tensor,
    residual: Option<&Tensor>,
    post: Post<'_>,
) -> Result<Tensor> {
    let (tokens, k) = x.q.dims2()?;
    let (n, wk) = w.q.dims2()?;
    if wk != k || b.dims() != [n] || b.dtype() != DType::BF16 {
        return Err(candle_core::Error::Msg(format!(
            "linear_fp8: x [{tokens}, {k}], w [{n}, {wk}], b {:?} {:?}",
            b.dims(),
            b.dtype()
        ))
        .into());
    }
    let residual = residual.map(bf16_input).transpose()?;
    let guards = [&x.q, &x.scale, &w.q, &w.scale, b].map(|t| t.storage_and_layout());
    let r_guard = residual.as_ref().map(|r| r.storage_and_layout());
    let candle_core::Storage::Cuda(xs) = &*guards[0].0 else {
        return Err(candle_core::Error::Msg("the FP8 GEMM runs on CUDA only".into()).into());
    };
    let dev = xs.device().clone();
    let fp8 = |i: usize| guarded::<float8::F8E4M3>(&guards[i], &dev);
    let f32s = |i: usize| guarded::<f32>(&guards[i], &dev);
    let r = match &r_guard {
        Some((s, l)) => {
            if l.shape().dims2()? != (tokens, n) {
                let msg = format!("linear_fp8: residual {:?} for [{tokens}, {n}]", l.shape());
                return Err(candle_core::Error::Msg(msg).into());
            }
            Some(operand::<half::bf16>(cuda(s, &dev)?, l)?)
        }
        None => None,
    };
    // SAFETY: every element is written by the GEMM before anything reads it.
    let mut out = unsafe { dev.alloc::<half::bf16>(elements(tokens, n)?)? };
    gemm::linear_fp8(
        &dev,
        gemm::Scaled {
            q: fp8(0)?,
            scale: f32s(1)?,
        },
        gemm::Scaled {
            q: fp8(2)?,
            scale: f32s(3)?,
        },
        guarded::<half::bf16>(&guards[4], &dev)?,
        r,
        &mut out,
        (tokens, n, k),
    )?;
    match post {
        Post::None => {}
        Post::Gelu => {
            let msg = "linear_fp8: GELU runs in gelu_fp8".to_string();
            return Err(candle_core::Error::Msg(msg).into());
        }
        Post::Rotary(rot) => linear::rotary(&dev, DType::BF16, &mut out, (tokens, n), rot)?,
    }
    let storage = candle_core::Storage::Cuda(CudaStorage {
        slice: CudaStorageSlice::BF16(out),
        device: dev,
    });
    Ok(Tensor::from_storage(
        storage,
        (tokens, n),
        BackpropOp::none(),
        false,
    ))
}
