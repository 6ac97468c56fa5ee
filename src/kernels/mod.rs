//! The hand-written kernels: fused ops with a backward for the models and the output layer, and
//! the optimiser's in-place updates.
//!
//! A fused op is four parts:
//! - a forward and a backward, as one candle custom op (`cpu_fwd` and `bwd`): one graph node
//!   that keeps little alive beyond its inputs and output. candle's own fused softmax, norms,
//!   rotary and sdpa have no backward, and composing them from elementwise ops costs a pass over
//!   memory and a graph node (kept until the backward) per op;
//! - its composition twin: the differentiable composition of candle ops it replaces
//!   (`*_composed` in `models/ops.rs`, `OutputLayer::token_logps_unfused` in
//!   `models/output.rs`), which runs wherever the kernel does not and is its reference;
//! - the dispatch between the two, beside the twin: the kernel where [`supports`] holds (every
//!   tensor on the CPU, in one dtype, f32 or f64), else the composition;
//! - its test: fused against composed, forward and every gradient, and central finite
//!   differences in f64 (`tests/fast_ops.rs`, `tests/output_layer.rs`).
//!
//! The optimiser's kernels ([`adamw`]) update tensors in place and have no backward; their twin
//! is the tensor path of `optim.rs`, which runs where [`adamw::applies`] does not. [`random`]
//! holds the counter-based random streams of LoRA dropout and stochastic rounding.
//!
//! Imports run one way, `models` → `kernels` and `optim` → `kernels`: the types a kernel takes
//! ([`dense::Activation`], [`dense::WeightLayout`], [`attention::QkvPacking`]) are defined here.
//! CUDA versions will sit beside their CPU twins with the same interface, so that the dispatch
//! and the tests carry over.

pub mod adamw;
pub mod attention;
mod cpu;
pub mod dense;
pub mod norm;
pub mod output;
pub mod random;
pub mod rotary;
pub mod softmax;

use candle_core::{DType, Tensor};

/// Whether the fused kernels apply: every tensor on the CPU, in one dtype, f32 or f64.
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
