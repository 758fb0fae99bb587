//! Which devices a job runs on: `--device` parsed into a list, one model replica per entry.
//!
//! `auto` is every visible GPU (or the CPU when there is none or esmbed was built without CUDA);
//! `cuda` is every visible GPU; `cuda:0,2` (or `cuda:0,cuda:2`) names them; `cpu` is the CPU.
//! Several GPUs do not shard the model: each holds a whole replica and pulls packs from a shared
//! queue, which is how ESM-2 (at most 15B parameters, 30 GB in bf16) scales on one host.

use candle_core::Device;

use crate::error::{Error, Result};

/// A short name for logs and summaries: `cpu`, `cuda:1`.
pub fn label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device's model name (`NVIDIA H200`); `None` on the CPU.
pub fn name(device: &Device) -> Option<String> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return cuda.cuda_stream().context().name().ok();
    }
    let _ = device;
    None
}

/// How many GPUs are visible (`CUDA_VISIBLE_DEVICES` applies); 0 without the `cuda` feature.
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// The compute dtype `spec` names for `device` (`auto`: f32 on the CPU, where it is exact; bf16
/// on a GPU).
pub fn parse_dtype(spec: &str, device: &Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match parse_dtype_name(spec)? {
        None => Ok(default_dtype(device)),
        // e4m3 GEMMs, bf16 activations (checked against the GPU when the model loads).
        Some(DType::F8E4M3) if device.is_cpu() => Err(Error::InvalidOption(
            "--dtype fp8 runs on CUDA GPUs (Hopper: H100, H200, GH200); on the CPU use f32".into(),
        )),
        Some(dtype) => Ok(dtype),
    }
}

/// What `--dtype auto` means on `device`.
pub fn default_dtype(device: &Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    }
}

/// The dtype `spec` names, apart from any device; `None` for `auto`.
pub fn parse_dtype_name(spec: &str) -> Result<Option<candle_core::DType>> {
    use candle_core::DType;
    Ok(Some(match spec.trim().to_ascii_lowercase().as_str() {
        "auto" => return Ok(None),
        "f32" | "fp32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "fp16" | "float16" | "half" => DType::F16,
        "fp8" | "f8" | "f8e4m3" | "e4m3" => DType::F8E4M3,
        other => {
            return Err(Error::InvalidOption(format!(
                "unknown --dtype {other:?}: use auto, f32, bf16, f16 or fp8"
            )))
        }
    }))
}

/// How metadata, reports and cluster plans write a compute dtype: `f32`, `bf16`, `f16`,
/// `f8e4m3`.
pub fn dtype_label(dtype: candle_core::DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// The GPU ordinals (or the CPU) that `spec` names, without opening them.
pub fn plan(spec: &str, visible_gpus: usize) -> Result<Vec<Option<usize>>> {
    let spec = spec.trim().to_ascii_lowercase();
    let all_gpus = || (0..visible_gpus).map(Some).collect::<Vec<_>>();
    let no_gpu = || {
        Error::InvalidOption(if cfg!(feature = "cuda") {
            "no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), or use --device cpu"
                .into()
        } else {
            "this esmbed was built without GPU support; rebuild with `cargo build --release --features cuda`, \
             or use --device cpu"
                .into()
        })
    };
    match spec.as_str() {
        "cpu" => Ok(vec![None]),
        "auto" if visible_gpus == 0 => Ok(vec![None]),
        "auto" => Ok(all_gpus()),
        "cuda" | "gpu" if visible_gpus == 0 => Err(no_gpu()),
        "cuda" | "gpu" => Ok(all_gpus()),
        list if list.starts_with("cuda:") => {
            let mut ordinals = Vec::new();
            for item in list["cuda:".len()..].split(',') {
                let item = item.trim();
                let number = item.strip_prefix("cuda:").unwrap_or(item);
                let ordinal: usize = number.parse().map_err(|_| {
                    Error::InvalidOption(format!(
                        "--device {spec}: {item:?} is not a GPU number (use cuda:0 or cuda:0,1)"
                    ))
                })?;
                if ordinals.contains(&Some(ordinal)) {
                    return Err(Error::InvalidOption(format!(
                        "--device {spec}: GPU {ordinal} is listed twice"
                    )));
                }
                if visible_gpus == 0 {
                    return Err(no_gpu());
                }
                if ordinal >= visible_gpus {
                    return Err(Error::InvalidOption(format!(
                        "--device {spec}: GPU {ordinal} does not exist ({visible_gpus} visible: cuda:0 to cuda:{})",
                        visible_gpus - 1
                    )));
                }
                ordinals.push(Some(ordinal));
            }
            Ok(ordinals)
        }
        other => Err(Error::InvalidOption(format!(
            "unknown --device {other:?}: use auto, cpu, cuda (every GPU), cuda:N or cuda:0,1,…"
        ))),
    }
}

/// Open the devices `spec` names (see the module docs).
pub fn parse(spec: &str) -> Result<Vec<Device>> {
    plan(spec, cuda_device_count())?
        .into_iter()
        .map(|ordinal| match ordinal {
            None => Ok(Device::Cpu),
            Some(n) => Device::new_cuda(n).map_err(|e| {
                Error::InvalidOption(format!(
                    "cannot open GPU {n} ({e}); check nvidia-smi, or choose others with --device cuda:N"
                ))
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        assert_eq!(plan("cpu", 4).unwrap(), vec![None]);
        assert_eq!(plan("auto", 0).unwrap(), vec![None]);
        assert_eq!(plan("auto", 2).unwrap(), vec![Some(0), Some(1)]);
        assert_eq!(plan("CUDA", 3).unwrap(), vec![Some(0), Some(1), Some(2)]);
        assert_eq!(plan("cuda:1", 2).unwrap(), vec![Some(1)]);
        assert_eq!(plan("cuda:0,2", 4).unwrap(), vec![Some(0), Some(2)]);
        assert_eq!(plan("cuda:3, cuda:1", 4).unwrap(), vec![Some(3), Some(1)]);
    }

    #[test]
    fn bad_device_lists_name_the_fix() {
        let msg = |spec: &str, n| plan(spec, n).unwrap_err().to_string();
        assert!(msg("cuda:0,0", 2).contains("listed twice"));
        assert!(msg("cuda:2", 2).contains("cuda:0 to cuda:1"));
        assert!(msg("cuda:x", 2).contains("not a GPU number"));
        assert!(msg("cuda", 0).contains("--device cpu"));
        assert!(msg("tpu", 0).contains("use auto, cpu"));
    }

    #[test]
    fn dtypes() {
        use candle_core::DType;
        let cpu = Device::Cpu;
        assert_eq!(parse_dtype("auto", &cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype("BF16", &cpu).unwrap(), DType::BF16);
        assert_eq!(parse_dtype("half", &cpu).unwrap(), DType::F16);
        let fp8 = parse_dtype("fp8", &cpu).unwrap_err().to_string();
        assert!(fp8.contains("CUDA") && fp8.contains("f32"), "{fp8}");
        let unknown = parse_dtype("int4", &cpu).unwrap_err().to_string();
        assert!(unknown.contains("bf16, f16 or fp8"), "{unknown}");
    }
}
