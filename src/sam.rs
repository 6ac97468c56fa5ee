//! logits-SAM (the paper's Algorithm 1): sharpness-aware minimisation applied to the output
//! layer only, from hidden states the training step has already computed.
//!
//! | Algorithm 1                                   | here                                         |
//! |-----------------------------------------------|----------------------------------------------|
//! | 1: W ← lm_head.weight                         | `head.weight` (detached)                     |
//! | 2: forward → loss_pre, hidden states H        | `h` from the step's forward; `loss_pre`      |
//! | 3: g ← grad(loss_pre, W)                      | g = Gᵀ H, `OutputLayer::sam_gradient`        |
//! | 4: e ← ρ g / ‖g‖₂                             | [`Perturbation::e`]                          |
//! | 5: logits_perturbed ← linear(H, W + e)        | [`Perturbation::token_logps_at_w_plus_e`]    |
//! | 6–7: loss_post, backward                      | in `train::step`                             |
//!
//! Also full SAM (`sam.kind = "full"`, [`perturb_params`]), the two-pass baseline the paper
//! compares against, and the adaptive (ASAM) variant of both (`sam.adaptive`).

use crate::kernels::output::PrePass;
use crate::models::ops::accum_dtype;
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
    /// The tiled pre-pass, until line 5 reuses its logits.
    pre: Option<PrePass>,
}

impl Perturbation {
    /// Line 5: the per-token log-probs at W + e, differentiable in H and W (e a constant, the
    /// bias unperturbed), for the same `h` and `targets` as lines 1–4. The first call reuses the
    /// pre-pass's logits where the output layer can (see `OutputLayer::token_logps_perturbed`).
    pub fn token_logps_at_w_plus_e(
        &mut self,
        head: &OutputLayer,
        h: &Tensor,
        targets: &Tensor,
    ) -> Result<Tensor> {
        Ok(match self.pre.take() {
            Some(pre) => head.token_logps_perturbed(h, targets, &self.e, pre)?,
            None => head.token_logps(h, targets, Some(&self.e))?,
        })
    }
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
    let g = frozen.sam_gradient(&h, targets, &dlogp, &pre)?;
    let grad_norm = sq_norm(&scaled_grad(&g, &frozen.weight, adaptive)?)?.sqrt()?;
    let e = ascent_step(&g, &frozen.weight, rho, &grad_norm, adaptive)?;
    Ok(Perturbation {
        e,
        loss_pre: loss_pre.detach().to_dtype(DType::F64)?,
        grad_norm,
        token_logps: token_logps.as_tensor().detach(),
        pre: pre.for_perturbed_pass(),
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

/// Σ t², an f64 scalar on t's device, summed in f32 or wider (a bf16 sum of squares over
/// millions of entries rounds away most of them).
fn sq_norm(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(accum_dtype(t.dtype()))?
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?)
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
    moved: Vec<Moved>,
    /// ‖T g‖ over all parameters (T as in `ascent_step`), an f64 scalar on the device.
    pub grad_norm: Tensor,
}

/// One moved parameter: the weights e was added to (the f32 master under mixed precision) and
/// their original value, and the bf16 copy the forward reads, which is always its master
/// rounded (set-up, every update, resume) and so is restored from it rather than kept.
struct Moved {
    weights: Var,
    copy: Option<Var>,
    original: Tensor,
}

/// Moves every parameter that has a gradient in `grads` to W + e, e = ρ T² g/‖T g‖ with one
/// global norm over all of them, summed in f32. Under mixed precision e is added to the f32
/// master, whose sum then refreshes the bf16 copy the forward reads: added to the bf16 copy
/// itself, an e below half a bf16 step would round away every time, while the master (off
/// bf16's grid once training has moved it) carries it into the copy wherever W + e crosses a
/// rounding boundary, e on average.
pub fn perturb_params(
    params: &[Param],
    grads: &GradStore,
    rho: f64,
    adaptive: bool,
) -> Result<FullPerturbation> {
    // (the parameter, the f32 weights e is added to, g in f32 or wider)
    let mut with_grad = Vec::new();
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let w = p.master.as_ref().unwrap_or(&p.var);
            with_grad.push((p, w, g.to_dtype(accum_dtype(g.dtype()))?));
        }
    }
    // Summed on the device in parameter order (no read per parameter).
    let mut total: Option<Tensor> = None;
    for (_, w, g) in &with_grad {
        let sq = sq_norm(&scaled_grad(g, w.as_tensor(), adaptive)?)?;
        total = Some(match total {
            Some(t) => (t + sq)?,
            None => sq,
        });
    }
    let grad_norm = match total {
        Some(t) => t.sqrt()?,
        None => Tensor::new(0f64, &candle_core::Device::Cpu)?,
    };
    let mut moved = Vec::with_capacity(with_grad.len());
    for (p, w, g) in with_grad {
        let e = ascent_step(&g, w.as_tensor(), rho, &grad_norm, adaptive)?;
        let original = w.as_tensor().detach().copy()?;
        let sum = (&original + e.to_dtype(original.dtype())?)?;
        w.set(&sum)?;
        let copy = p.master.as_ref().map(|_| p.var.clone());
        if let Some(copy) = &copy {
            copy.set(&sum.to_dtype(copy.dtype())?)?;
        }
        moved.push(Moved {
            weights: w.clone(),
            copy,
            original,
        });
    }
    Ok(FullPerturbation { moved, grad_norm })
}

impl FullPerturbation {
    /// Puts the original weights (and masters) back, bit for bit.
    pub fn restore(self) -> Result<()> {
        for m in self.moved {
            if let Some(copy) = &m.copy {
                copy.set(&m.original.to_dtype(copy.dtype())?)?;
            }
            m.weights.set(&m.original)?;
        }
        Ok(())
    }
}
