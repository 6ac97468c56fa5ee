//! logits-SAM (the paper's Algorithm 1): sharpness-aware minimisation applied to the output
//! layer only, from hidden states the training step has already computed.
//!
//! | Algorithm 1                                   | here                                         |
//! |-----------------------------------------------|----------------------------------------------|
//! | 1: W ← lm_head.weight                         | `head.weight` (detached)                     |
//! | 2: forward → loss_pre, hidden states H        | `h` from the step's forward; `loss_pre`      |
//! | 3: g ← grad(loss_pre, W)                      | g = Gᵀ H, `OutputLayer::sam_gradient`        |
//! | 4: e ← ρ g / ‖g‖₂                             | [`Perturbation::e`]                          |
//! | 5: logits_perturbed ← linear(H, W + e)        | `OutputLayer::token_logps(h, _, Some(e))`    |
//! | 6–7: loss_post, backward                      | in `train::step`                             |
//!
//! Also full SAM (`sam.kind = "full"`, [`perturb_params`]), the two-pass baseline the paper
//! compares against, and the adaptive (ASAM) variant of both (`sam.adaptive`).

use crate::models::output::OutputLayer;
use crate::models::Param;
use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Tensor, Var};

/// The perturbation e and the loss before it was applied. The two scalars stay on the device
/// (f64, no graph) until the step has been issued: reading one here would wait for the
/// pre-pass to finish before the perturbed pass could be queued.
pub struct Perturbation {
    /// e = ρ g/‖g‖_F, shaped like the output weight; a constant (no graph).
    pub e: Tensor,
    pub loss_pre: Tensor,
    pub grad_norm: Tensor,
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
    logits_perturbation_with(head, h, targets, rho, false, objective)
}

/// [`logits_perturbation`], optionally adaptive (`sam.adaptive`, see [`ascent_step`]).
pub fn logits_perturbation_with(
    head: &OutputLayer,
    h: &Tensor,
    targets: &Tensor,
    rho: f64,
    adaptive: bool,
    objective: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Perturbation> {
    // W and H detached: this pass only measures the gradient, it must not enter the backward.
    let frozen = OutputLayer {
        weight: head.weight.detach(),
        bias: head.bias.as_ref().map(Tensor::detach),
    };
    let h = h.detach();
    let (token_logps, pre) = frozen.token_logps_for_sam(&h, targets)?;
    let token_logps = Var::from_tensor(&token_logps)?;
    // ∂loss/∂(token log-probs) is cheap (n values); G and g follow in closed form.
    let loss_pre = objective(token_logps.as_tensor())?;
    let grads = loss_pre.backward()?;
    let dlogp = match grads.get(&token_logps) {
        Some(g) => g.clone(),
        None => token_logps.zeros_like()?,
    };
    let g = frozen.sam_gradient(&h, targets, &dlogp, pre.as_ref())?;
    let grad_norm = sq_norm(&scaled_grad(&g, &frozen.weight, adaptive)?)?.sqrt()?;
    let e = ascent_step(&g, &frozen.weight, rho, &grad_norm, adaptive)?;
    Ok(Perturbation {
        e,
        loss_pre: loss_pre.detach().to_dtype(DType::F64)?,
        grad_norm,
        token_logps: token_logps.as_tensor().detach(),
    })
}

/// T ⊙ g with T = |W| when adaptive (ASAM's normalisation operator), else g.
fn scaled_grad(g: &Tensor, w: &Tensor, adaptive: bool) -> Result<Tensor> {
    Ok(if adaptive {
        (g * w.to_dtype(g.dtype())?.abs()?)?
    } else {
        g.clone()
    })
}

/// Σ t², an f64 scalar on t's device.
fn sq_norm(t: &Tensor) -> Result<Tensor> {
    Ok(t.sqr()?.sum_all()?.to_dtype(DType::F64)?)
}

/// e = ρ T² g / ‖T g‖ with `norm` = ‖T g‖ (an f64 scalar on the device) taken over every
/// perturbed tensor together: T = 1 gives SAM's ρ g/‖g‖; T = |W| gives ASAM (Kwon et al. 2021),
/// as in the reference SAM code. The official logits-SAM code's `sam_adaptive` uses
/// ρ T g / ‖T g‖ (one factor of |W| fewer).
fn ascent_step(g: &Tensor, w: &Tensor, rho: f64, norm: &Tensor, adaptive: bool) -> Result<Tensor> {
    // Clamped so that a zero gradient gives a zero perturbation rather than NaN; in f64, then
    // rounded once to g's dtype, as a host scalar would be.
    let scale = Tensor::new(rho, norm.device())?.broadcast_div(&norm.maximum(1e-12)?)?;
    let direction = if adaptive {
        scaled_grad(&scaled_grad(g, w, true)?, w, true)?
    } else {
        g.clone()
    };
    Ok(direction.broadcast_mul(&scale.to_dtype(direction.dtype())?)?)
}

/// Full SAM's ascent (Foret et al. 2021), applied in place to every parameter with a gradient:
/// W ← W + e. Holds copies of the original values so that [`FullPerturbation::restore`] puts
/// back exactly the same bits rather than subtracting e (which rounds).
pub struct FullPerturbation {
    originals: Vec<(Var, Tensor)>,
    /// ‖T g‖ over all parameters (T as in `ascent_step`), an f64 scalar on the device.
    pub grad_norm: Tensor,
}

/// Moves every parameter that has a gradient in `grads` to W + e, e = ρ T² g/‖T g‖ with one
/// global norm over all of them.
pub fn perturb_params(
    params: &[Param],
    grads: &GradStore,
    rho: f64,
    adaptive: bool,
) -> Result<FullPerturbation> {
    let with_grad: Vec<(&Var, Tensor)> = params
        .iter()
        .filter_map(|p| grads.get(p.var.as_tensor()).map(|g| (&p.var, g.clone())))
        .collect();
    // Summed on the device in parameter order (no read per parameter).
    let mut total: Option<Tensor> = None;
    for (var, g) in &with_grad {
        let sq = sq_norm(&scaled_grad(g, var.as_tensor(), adaptive)?)?;
        total = Some(match total {
            Some(t) => (t + sq)?,
            None => sq,
        });
    }
    let grad_norm = match total {
        Some(t) => t.sqrt()?,
        None => Tensor::new(0f64, &candle_core::Device::Cpu)?,
    };
    let mut originals = Vec::with_capacity(with_grad.len());
    for (var, g) in with_grad {
        let w = var.as_tensor();
        let e = ascent_step(&g, w, rho, &grad_norm, adaptive)?;
        originals.push((var.clone(), w.detach().copy()?));
        var.set(&(w.detach() + e.to_dtype(w.dtype())?)?)?;
    }
    Ok(FullPerturbation {
        originals,
        grad_norm,
    })
}

impl FullPerturbation {
    /// Puts the original weights back, bit for bit.
    pub fn restore(self) -> Result<()> {
        for (var, original) in self.originals {
            var.set(&original)?;
        }
        Ok(())
    }
}
