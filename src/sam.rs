//! logits-SAM (the paper's Algorithm 1): sharpness-aware minimisation applied to the output
//! layer only, from hidden states the training step has already computed.
//!
//! | Algorithm 1                                   | here                                         |
//! |-----------------------------------------------|----------------------------------------------|
//! | 1: W ← lm_head.weight                         | `head.weight` (detached)                     |
//! | 2: forward → loss_pre, hidden states H        | `h` from the step's forward; `loss_pre`      |
//! | 3: g ← grad(loss_pre, W)                      | G = ∂loss_pre/∂logits, g = Gᵀ H              |
//! | 4: e ← ρ g / ‖g‖₂                             | [`Perturbation::e`]                          |
//! | 5: logits_perturbed ← linear(H, W + e)        | `OutputLayer::token_logps(h, _, Some(e))`    |
//! | 6–7: loss_post, backward                      | in `train::step`                             |

use crate::output::OutputLayer;
use anyhow::Result;
use candle_core::{Tensor, Var};

/// The perturbation e and the loss before it was applied.
pub struct Perturbation {
    /// e = ρ g/‖g‖_F, shaped like the output weight; a constant (no graph).
    pub e: Tensor,
    pub loss_pre: f64,
    pub grad_norm: f64,
    /// Per-token log-probs at the unperturbed W (no graph), for metrics of the actual model.
    pub token_logps: Tensor,
}

/// Lines 1–4 of Algorithm 1. `objective` maps per-token log-probs `[n]` to the scalar loss; it is
/// the same function the step minimises, so any configured loss (or mix) shapes e.
pub fn logits_perturbation(
    head: &OutputLayer,
    h: &Tensor,
    targets: &Tensor,
    rho: f64,
    objective: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Perturbation> {
    // W and H detached: this pass only measures the gradient, it must not enter the backward.
    let frozen = OutputLayer { weight: head.weight.detach(), bias: head.bias.as_ref().map(Tensor::detach) };
    let h = h.detach();
    let (token_logps, probs) = frozen.token_logps_and_probs(&h, targets)?;
    // ∂loss/∂(token log-probs) is cheap (n values); G and g follow in closed form.
    let token_logps = Var::from_tensor(&token_logps)?;
    let loss_pre = objective(token_logps.as_tensor())?;
    let grads = loss_pre.backward()?;
    let dlogp = match grads.get(&token_logps) {
        Some(g) => g.clone(),
        None => token_logps.zeros_like()?,
    };
    let g = frozen.weight_grad(&h, targets, &probs, &dlogp)?;
    let grad_norm = g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?.sqrt();
    // Clamped so that a zero gradient gives a zero perturbation rather than NaN.
    let e = (g * (rho / grad_norm.max(1e-12)))?;
    let loss_pre = loss_pre.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    Ok(Perturbation { e, loss_pre, grad_norm, token_logps: token_logps.as_tensor().detach() })
}
