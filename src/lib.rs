//! Tessera: OpenAI's DALL·E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation") on
//! libtorch. A discrete VAE turns images into a grid of tokens ([`dvae`]), a transformer
//! models caption and image tokens as one stream with the paper's sparse attention
//! ([`transformer`], [`attention`]), and [`sample`] draws images token by token with a KV cache.

#[cfg(feature = "app")]
pub mod app;
pub mod attention;
pub mod bench;
pub mod clip;
pub mod codes;
pub mod config;
pub mod data;
pub mod dvae;
pub mod error;
pub mod eval;
pub mod io;
pub mod judged;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod remap;
pub mod report;
pub mod sample;
pub mod shards;
pub mod shim;
pub mod store;
pub mod text;
pub mod train;
pub mod transformer;
pub mod world;

pub use config::{AttentionKind, AttentionPattern, Config};
pub use error::{Error, Result};
pub use model::Model;
pub use sample::{SampleOptions, Sampler};

/// Picks the compute device from a name: `cpu`, `cuda`, `cuda:N` or `auto`.
pub fn parse_device(name: &str) -> Result<tch::Device> {
    // the CUDA libraries are loaded before `main`; this also loads them in a binary whose
    // start-up hook did not run
    let cuda = shim::cuda_libraries();
    let unavailable = || format!("no CUDA device is available (CUDA libraries: {})", cuda.note);
    match name {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" | "gpu" => {
            if tch::Cuda::is_available() {
                Ok(tch::Device::Cuda(0))
            } else {
                Err(Error::Invalid(format!("CUDA was asked for but {}", unavailable())))
            }
        }
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(i) if (i as i64) < tch::Cuda::device_count() => Ok(tch::Device::Cuda(i)),
            Some(_) => Err(Error::Invalid(format!(
                "device {other:?} is not available: {} CUDA device(s) (CUDA libraries: {})",
                tch::Cuda::device_count(),
                cuda.note
            ))),
            None => Err(Error::Invalid(format!("unknown device {other:?} (cpu, cuda, cuda:N or auto)"))),
        },
    }
}

/// A device's name for people: `CPU`, `CUDA` or `CUDA:N` (device N > 0).
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => "CPU".into(),
        tch::Device::Cuda(0) => "CUDA".into(),
        tch::Device::Cuda(i) => format!("CUDA:{i}"),
        other => format!("{other:?}"),
    }
}

/// Whether `device` computes bf16 matrix products and convolutions natively: a CUDA device
/// (taken to be Ampere or newer; on older ones give `--dtype f32`), or an x86-64 CPU with
/// AVX-512 BF16 instructions (README, "Measured figures": on this project's 2-core machine
/// bf16 trains the dVAE about twice as fast as f32 and the S transformer about 1.5×).
pub fn native_bf16(device: tch::Device) -> bool {
    match device {
        tch::Device::Cpu => cpu_has_bf16(),
        tch::Device::Cuda(_) => true,
        _ => false,
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_bf16() -> bool {
    false
}

/// How logs, plans and messages name a training compute dtype (`None`: f32).
pub fn compute_name(compute: Option<tch::Kind>) -> &'static str {
    match compute {
        Some(tch::Kind::BFloat16) => "bf16",
        None | Some(tch::Kind::Float) => "f32",
        Some(_) => "other",
    }
}

/// Picks the training compute dtype from a name: `f32`, `bf16` (bf16 matrix products and
/// convolutions with f32 master weights, losses and hard codes), or `auto`: bf16 where the
/// device computes it natively ([`native_bf16`]), f32 elsewhere.
pub fn parse_train_dtype(name: &str, device: tch::Device) -> Result<tch::Kind> {
    match name {
        "auto" if native_bf16(device) => Ok(tch::Kind::BFloat16),
        "auto" => Ok(tch::Kind::Float),
        other => parse_dtype(other, device),
    }
}

/// Picks the sampling dtype from a name: `f32`, `bf16`, or `auto`: f32 everywhere. On the CPU
/// the decode kernels are f32; on CUDA, with static-shape steps replayed as graphs, f32 was
/// measured faster than bf16 (an H200, 64 unguided samples of the default model: 0.72 against
/// 0.96 s of sampling; not yet measured with guidance or on a smaller GPU), the small products
/// of a decode step being launch-bound rather than compute-bound. `generate` and the app both
/// sample in this dtype.
pub fn parse_dtype(name: &str, _device: tch::Device) -> Result<tch::Kind> {
    match name {
        "auto" => Ok(tch::Kind::Float),
        "f32" | "float32" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        other => Err(Error::Invalid(format!("unknown dtype {other:?} (auto, f32 or bf16)"))),
    }
}
