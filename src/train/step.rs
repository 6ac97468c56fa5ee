//! One micro-step: the forward pass, logits-SAM, the loss and the single backward pass. Read it
//! beside the paper's Algorithm 1 (and `sam.rs`, which holds lines 1–4):
//!
//! | Algorithm 1                             | here, in `Trainer::single_pass`          |
//! |-----------------------------------------|------------------------------------------|
//! | 2: forward → hidden states H            | `forward_hidden`, then `response_hidden` |
//! | 1–4: W, loss_pre, g = Gᵀ H, e = ρ g/‖g‖ | `sam::logits_perturbation_with`          |
//! | 5: logits_perturbed ← linear(H, W + e)  | `p.token_logps_at_w_plus_e(&head, &h, …)` |
//! | 6: loss_post                            | `batch_loss`                             |
//! | 7: loss_post.backward()                 | `policy.backward`                        |
//!
//! Full SAM (`sam.kind = "full"`) wraps two such passes in [`Trainer::full_sam_step`].

use super::{Reference, Trainer};
use crate::config::SamKind;
use crate::data::batch::PreferenceBatch;
use crate::data::Split;
use crate::diagnostics::Diagnostics;
use crate::logps::{pair_logps, sequence_logps};
use crate::losses::{LossOutput, PairLogps};
use crate::models::ops::accum_dtype;
use crate::optim::GradAccumulator;
use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Tensor};

/// What one micro-batch's forward/backward produced.
pub struct MicroStep {
    pub grads: Option<GradStore>,
    /// The micro-batch's loss (at W + e under SAM).
    pub loss: f64,
    /// The chosen responses' NLL, when a loss term has one (TRL's `nll_loss`).
    pub nll: Option<f64>,
    pub loss_pre: Option<f64>,
    pub sam_grad_norm: Option<f64>,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    /// Reference log-probs, when the loss uses a reference.
    pub ref_chosen_logps: Option<Vec<f32>>,
    pub ref_rejected_logps: Option<Vec<f32>>,
    /// Squeeze diagnostics and TRL's token metrics, on logging steps.
    pub diagnostics: Option<Diagnostics>,
}

impl Trainer {
    /// One micro-batch, with reference log-probs from the reference model. With
    /// `backward_weight`, backpropagates `backward_weight × loss` (logits-SAM's loss_post, or
    /// full SAM's loss at W + e); without, evaluates only.
    pub fn micro_step(
        &self,
        batch: &PreferenceBatch,
        backward_weight: Option<f64>,
    ) -> Result<MicroStep> {
        let reference = self.reference_for(batch, None)?;
        self.micro_step_with(batch, reference, backward_weight)
    }

    /// [`Trainer::micro_step`] with the reference log-probs given (see [`Trainer::reference_for`]).
    pub fn micro_step_with(
        &self,
        batch: &PreferenceBatch,
        reference: Option<(Tensor, Tensor)>,
        backward_weight: Option<f64>,
    ) -> Result<MicroStep> {
        match backward_weight {
            Some(w) if self.cfg.sam.kind == SamKind::Full => {
                self.full_sam_step(batch, reference, w)
            }
            _ => self.single_pass(batch, reference, backward_weight),
        }
    }

    /// Reference sequence log-probs (chosen, rejected) of a batch: from the precomputed cache
    /// when `pairs` names the batch's pairs, else from the reference model; `None` for
    /// reference-free losses.
    pub fn reference_for(
        &self,
        batch: &PreferenceBatch,
        pairs: Option<(Split, &[usize])>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.reference, pairs) {
            (Reference::None, _) => Ok(None),
            (Reference::Model(model), _) => Ok(Some(pair_logps(model, batch)?)),
            (Reference::PolicyBase, _) => {
                let lora = self.policy.lora.as_ref().expect("PolicyBase needs adapters");
                Ok(Some(lora.with_reference(|| pair_logps(&self.policy, batch))?))
            }
            (Reference::Cache(cache), Some((split, idx))) => {
                let dtype = accum_dtype(self.cfg.model.dtype.dtype());
                Ok(Some(cache.get(split, idx, dtype, &self.device)?))
            }
            (Reference::Cache(_), None) => anyhow::bail!(
                "reference log-probs were precomputed (training.precompute_ref_log_probs): pass the batch's pair indices"
            ),
        }
    }

    /// Clips the accumulated gradients by `training.max_grad_norm` and applies the optimiser at
    /// learning rate `lr`, unless their norm is not finite (then the weights stay as they are).
    /// Returns the norm before clipping.
    pub fn apply_gradients(&mut self, acc: &GradAccumulator, lr: f64) -> Result<f64> {
        let max_norm = self.cfg.training.max_grad_norm;
        self.optimizer
            .clip_and_apply(&self.policy.params, acc, max_norm, lr)
    }

    /// Full SAM (`sam.kind = "full"`), the paper's expensive baseline: a forward/backward at W
    /// for g, every parameter moved to W + e, the ordinary pass there (whose gradients are
    /// returned), then W restored bit for bit. Rewards and log-probs are those at W.
    fn full_sam_step(
        &self,
        batch: &PreferenceBatch,
        reference: Option<(Tensor, Tensor)>,
        weight: f64,
    ) -> Result<MicroStep> {
        let at_w = self.single_pass(batch, reference.clone(), Some(1.0))?;
        let grads = at_w.grads.as_ref().expect("backward was requested");
        let sam = &self.cfg.sam;
        let e = crate::sam::perturb_params(&self.policy.params, grads, sam.rho, sam.adaptive)?;
        let grad_norm = e.grad_norm.clone();
        // Restored before the result is looked at, so that an error never leaves W + e behind.
        let at_perturbed = self.single_pass(batch, reference, Some(weight));
        e.restore()?;
        let at_perturbed = at_perturbed?;
        Ok(MicroStep {
            grads: at_perturbed.grads,
            loss: at_perturbed.loss,
            loss_pre: Some(at_w.loss),
            sam_grad_norm: Some(scalar(&grad_norm)?),
            ..at_w
        })
    }

    /// One forward pass, logits-SAM when configured, the loss, and the backward pass.
    fn single_pass(
        &self,
        batch: &PreferenceBatch,
        reference: Option<(Tensor, Tensor)>,
        backward_weight: Option<f64>,
    ) -> Result<MicroStep> {
        let head = self.policy.net.output_layer();
        if let Some(lora) = &self.policy.lora {
            // LoRA dropout while training (a fresh stream per pass), none when evaluating.
            lora.begin_forward(backward_weight.is_some());
        }
        // The one forward pass, to the final hidden states H at positions that predict response tokens.
        let h = batch.response_hidden(self.policy.net.forward_hidden(&batch.input_ids)?)?;

        // logits-SAM, Algorithm 1 lines 1–4: e from loss_pre with H and W detached.
        let mut perturbation = if self.cfg.sam.kind == SamKind::Logits && backward_weight.is_some()
        {
            let objective = |token_logps: &Tensor| -> Result<Tensor> {
                Ok(self.batch_loss(batch, token_logps, reference.as_ref())?.0)
            };
            Some(crate::sam::logits_perturbation_with(
                &head,
                &h,
                &batch.targets,
                self.cfg.sam.rho,
                self.cfg.sam.adaptive,
                &objective,
            )?)
        } else {
            None
        };

        // Lines 5–6: logits from H (W + e)ᵀ, e constant, bias unperturbed; loss_post.
        let token_logps = match perturbation.as_mut() {
            Some(p) => p.token_logps_at_w_plus_e(&head, &h, &batch.targets)?,
            None => head.token_logps(&h, &batch.targets, None)?,
        };
        let (loss, post, post_lp) = self.batch_loss(batch, &token_logps, reference.as_ref())?;
        // Rewards and log-probs describe the model itself (W), not the perturbed point W + e.
        let (out, lp) = match &perturbation {
            Some(p) => {
                let (_, out, lp) = self.batch_loss(batch, &p.token_logps, reference.as_ref())?;
                (out, lp)
            }
            None => (post, post_lp),
        };

        let diagnostics = if self.diagnostics {
            let chosen_tokens = batch.response_lens[..batch.num_pairs].iter().sum();
            Some(crate::diagnostics::diagnostics(
                &head,
                &h,
                &batch.targets,
                chosen_tokens,
            )?)
        } else {
            None
        };

        // Line 7: the single backward pass.
        let grads = match backward_weight {
            Some(w) => Some(self.policy.backward(&(&loss * w)?)?),
            None => None,
        };
        Ok(MicroStep {
            grads,
            loss: scalar(&loss)?,
            nll: out.nll.as_ref().map(scalar).transpose()?,
            loss_pre: perturbation
                .as_ref()
                .map(|p| scalar(&p.loss_pre))
                .transpose()?,
            sam_grad_norm: perturbation
                .as_ref()
                .map(|p| scalar(&p.grad_norm))
                .transpose()?,
            chosen_rewards: to_f32s(&out.chosen_rewards)?,
            rejected_rewards: to_f32s(&out.rejected_rewards)?,
            chosen_logps: to_f32s(&lp.chosen)?,
            rejected_logps: to_f32s(&lp.rejected)?,
            ref_chosen_logps: lp.ref_chosen.as_ref().map(to_f32s).transpose()?,
            ref_rejected_logps: lp.ref_rejected.as_ref().map(to_f32s).transpose()?,
            diagnostics,
        })
    }

    /// The configured loss of the micro-batch as a function of per-token log-probs.
    fn batch_loss(
        &self,
        batch: &PreferenceBatch,
        token_logps: &Tensor,
        reference: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, LossOutput, PairLogps)> {
        let seq = sequence_logps(batch, token_logps)?;
        let lp = PairLogps::from_rows(&seq, reference, &batch.response_lens)?;
        let out = self.loss.compute(&lp)?;
        Ok((out.loss.clone(), out, lp))
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

fn to_f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.to_vec1()
}
