//! The hand-written kernels: fused ops with a backward for the models and the output layer, and
//! the optimiser's in-place updates.
//!
//! A fused op is four parts:
//! - a forward and a backward, as one candle custom op (`cpu_fwd`, `cuda_fwd` and `bwd`): one
//!   graph node that keeps little alive beyond its inputs and output. candle's own fused softmax,
//!   norms, rotary and sdpa have no backward, and composing them from elementwise ops costs a pass
//!   over memory and a graph node (kept until the backward) per op. `bwd` runs the backward
//!   kernels of the device the tensors are on;
//! - its composition twin: the differentiable composition of candle ops it replaces
//!   (`*_composed` in `models/ops.rs`, `OutputLayer::token_logps_unfused` in
//!   `models/output.rs`), which runs wherever the kernel does not and is its reference;
//! - the dispatch between the two, beside the twin: the kernel where [`supports`] (CPU kernels
//!   only) or [`supports_with_cuda`] (ops with CUDA kernels too) holds, else the composition;
//! - its tests: fused against composed, forward and every gradient, and central finite
//!   differences in f64 (`tests/fast_ops.rs`, `tests/output_layer.rs`); each CUDA kernel against
//!   its CPU twin (`tests/cuda_ops.rs` and `dpo-sam gpu-check`, where a GPU is present).
//!
//! The CUDA side of an op sits beside its CPU side, in a `gpu` submodule of the same file (the
//! `cuda` feature only), launching kernels from `cuda/*.cu` (`build.rs` compiles them to PTX;
//! [`cuda`] holds what they share). Its CPU twin is the CPU kernel of the same op, so the
//! interface, the dispatch and the tests carry over; kernels compute in f32 whatever the storage
//! type (f32, bf16, f16).
//!
//! The optimiser's kernels ([`adamw`]) update tensors in place and have no backward; their twin
//! is the tensor path of `optim.rs`, which runs where neither the CPU nor the CUDA kernels apply.
//! [`random`] holds the counter-based random streams of LoRA dropout and stochastic rounding.
//!
//! Imports run one way, `models` → `kernels` and `optim` → `kernels`: the types a kernel takes
//! ([`dense::Activation`], [`dense::WeightLayout`], [`attention::QkvPacking`]) are defined here.

pub mod adamw;
pub mod attention;
mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod dense;
#[cfg(any(feature = "cuda", test))]
mod gemm;
pub mod init;
pub mod norm;
pub mod output;
pub mod random;
pub mod rotary;
pub mod softmax;

use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether the CPU kernels apply: every tensor on the CPU, in one dtype, f32 or f64.
pub fn supports(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let dtype = first.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// Whether the CUDA kernels apply: a binary built with `cuda`, every tensor on one CUDA device,
/// in one dtype, f32, bf16 or f16.
pub fn supports_cuda(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let dtype = first.dtype();
    cfg!(feature = "cuda")
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && tensors
            .iter()
            .all(|t| t.device().same_device(first.device()) && t.dtype() == dtype)
        && first.device().is_cuda()
}

/// Whether an op with both CPU and CUDA kernels applies (see [`supports`], [`supports_cuda`]).
pub fn supports_with_cuda(tensors: &[&Tensor]) -> bool {
    supports(tensors) || supports_cuda(tensors)
}

/// Turns TF32 for f32 matmuls on or off for the whole process (`training.tf32`): candle's
/// switch for its cuBLAS matmuls, which the dense layers' cuBLASLt GEMMs read too. On needs a
/// CUDA GPU of compute capability 8.0 (Ampere) or newer.
pub fn set_tf32(device: &Device, on: bool) -> candle_core::Result<()> {
    if on {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let (major, minor) = cuda::compute_capability(dev)?;
                if major < 8 {
                    candle_core::bail!("training.tf32 needs an Ampere or newer GPU (compute capability ≥ 8.0); this one is {major}.{minor}");
                }
            }
            _ => candle_core::bail!("training.tf32 needs a CUDA device"),
        }
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    Ok(())
}

/// Launches of our CUDA kernels and cuBLASLt GEMMs since the process started (0 on the CPU).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// See [`LAUNCHES`]; `dpo-sam bench` reports the difference over a step.
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// GPU memory held by tensors: bytes allocated now and the most at once since the last
/// [`reset_peak_device_memory`] (see `cuda::memory` for what is counted); `None` on the CPU.
pub fn device_memory(device: &Device) -> candle_core::Result<Option<(u64, u64)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::memory(dev).map(Some),
        _ => Ok(None),
    }
}

/// Starts the peak of [`device_memory`] afresh from what is allocated now (nothing on the CPU).
pub fn reset_peak_device_memory(device: &Device) -> candle_core::Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::reset_peak_memory(dev),
        _ => Ok(()),
    }
}
