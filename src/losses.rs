//! Preference losses. Each loss is a function of per-pair sequence log-probs (policy and, where
//! needed, reference) returning per-pair losses and the implicit rewards that TRL logs.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// Per-pair sequence log-probs, each `[b]` f32.
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub ref_chosen: Option<Tensor>,
    pub ref_rejected: Option<Tensor>,
}

/// Per-pair losses `[b]` and (detached) implicit rewards `[b]`.
pub struct LossOutput {
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// A configured loss.
#[derive(Debug, Clone)]
pub struct Loss {
    pub kind: LossKind,
    pub beta: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    Sigmoid,
}

impl Loss {
    pub fn from_config(t: &crate::config::TrainingConfig) -> Result<Loss> {
        let kind = match t.loss_type.as_str() {
            "sigmoid" => LossKind::Sigmoid,
            other => bail!("training.loss_type: unknown loss `{other}`"),
        };
        Ok(Loss { kind, beta: t.beta })
    }

    /// Whether the loss needs reference-model log-probs.
    pub fn needs_reference(&self) -> bool {
        match self.kind {
            LossKind::Sigmoid => true,
        }
    }

    pub fn compute(&self, lp: &PairLogps) -> Result<LossOutput> {
        match self.kind {
            LossKind::Sigmoid => sigmoid(lp, self.beta),
        }
    }
}

/// −log σ(x), computed as softplus(−x) = max(−x, 0) + log(1 + e^{−|x|}) so that large margins
/// neither overflow nor lose their gradient.
pub fn neg_log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let relu = x.neg()?.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    relu + tail
}

fn ref_logratios(lp: &PairLogps) -> Result<(Tensor, Tensor)> {
    match (&lp.ref_chosen, &lp.ref_rejected) {
        (Some(rc), Some(rr)) => Ok(((&lp.chosen - rc)?, (&lp.rejected - rr)?)),
        _ => bail!("this loss needs reference log-probs"),
    }
}

/// DPO (Rafailov et al. 2023, eq. 7; the paper's eq. 2):
/// −log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]).
fn sigmoid(lp: &PairLogps, beta: f64) -> Result<LossOutput> {
    let (chosen_ratio, rejected_ratio) = ref_logratios(lp)?;
    let logits = ((&chosen_ratio - &rejected_ratio)? * beta)?;
    Ok(LossOutput {
        losses: neg_log_sigmoid(&logits)?,
        chosen_rewards: (chosen_ratio * beta)?.detach(),
        rejected_rewards: (rejected_ratio * beta)?.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn dpo_matches_hand_computed_values() -> Result<()> {
        // chosen ratio = -10 - (-12) = 2, rejected ratio = -15 - (-14) = -1; β = 0.5
        // logits = 0.5 * 3 = 1.5; loss = log(1 + e^-1.5) = 0.201413
        let lp = PairLogps {
            chosen: t(&[-10.0, -3.0]),
            rejected: t(&[-15.0, -3.0]),
            ref_chosen: Some(t(&[-12.0, -3.0])),
            ref_rejected: Some(t(&[-14.0, -3.0])),
        };
        let out = Loss { kind: LossKind::Sigmoid, beta: 0.5 }.compute(&lp)?;
        let losses = out.losses.to_vec1::<f32>()?;
        assert!((losses[0] - 0.201_413).abs() < 1e-5, "{losses:?}");
        // equal log-probs: loss = log 2
        assert!((losses[1] - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.chosen_rewards.to_vec1::<f32>()?, vec![1.0, 0.0]);
        assert_eq!(out.rejected_rewards.to_vec1::<f32>()?, vec![-0.5, 0.0]);
        Ok(())
    }

    #[test]
    fn neg_log_sigmoid_is_stable_for_huge_margins() -> Result<()> {
        let v = neg_log_sigmoid(&t(&[1000.0, -1000.0, 0.0]))?.to_vec1::<f32>()?;
        assert_eq!(v[0], 0.0);
        assert!((v[1] - 1000.0).abs() < 1e-3);
        assert!((v[2] - std::f32::consts::LN_2).abs() < 1e-6);
        Ok(())
    }
}
