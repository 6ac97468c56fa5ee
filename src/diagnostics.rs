//! Squeeze diagnostics: what the paper's section 3 says to watch in a DPO run.
//!
//! - the most likely non-target token y* along chosen responses: the squeezing effect moves
//!   probability mass onto it (Lemma 3.5);
//! - tr(H_z) = 1 − ‖p‖², the trace of the logit Hessian H_z = Diag(p) − ppᵀ, averaged over
//!   response tokens: the curvature that SAM's correction term is scaled by (section 4.3).
//!
//! Computed without a graph from the hidden states the step already has; the trainer asks for
//! them only on logging steps, since they cost one more output-layer matmul.

use crate::models::ops::softmax_last_dim;
use crate::models::output::OutputLayer;
use candle_core::{DType, Result, Tensor, D};

/// Sums over tokens, so micro-batches add up.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Squeeze {
    /// Σ over chosen-response tokens of max_{v ≠ target} p_v.
    pub top_nontarget_prob: f64,
    pub chosen_tokens: usize,
    /// Σ over all response tokens of 1 − ‖p‖².
    pub hessian_trace: f64,
    pub tokens: usize,
}

impl Squeeze {
    pub fn add(&mut self, other: &Squeeze) {
        self.top_nontarget_prob += other.top_nontarget_prob;
        self.chosen_tokens += other.chosen_tokens;
        self.hessian_trace += other.hessian_trace;
        self.tokens += other.tokens;
    }
}

/// Diagnostics for response tokens `h` `[n, hidden]` with `targets` `[n]`, of which the first
/// `chosen_tokens` belong to chosen responses.
pub fn squeeze(
    head: &OutputLayer,
    h: &Tensor,
    targets: &Tensor,
    chosen_tokens: usize,
) -> Result<Squeeze> {
    let probs = softmax_last_dim(&head.logits(&h.detach(), None)?)?.to_dtype(DType::F32)?;
    let (n, vocab) = probs.dims2()?;
    let trace = (1.0 - probs.sqr()?.sum(D::Minus1)?)?;
    // Zero the target's probability, then the row max is y*'s probability.
    let target_mask = Tensor::zeros((n, vocab), DType::F32, probs.device())?.scatter_add(
        &targets.unsqueeze(1)?,
        &Tensor::ones((n, 1), DType::F32, probs.device())?,
        1,
    )?;
    let others = (&probs * (1.0 - target_mask)?)?.max(D::Minus1)?;
    let sum = |t: &Tensor| -> Result<f64> { t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>() };
    Ok(Squeeze {
        top_nontarget_prob: sum(&others.narrow(0, 0, chosen_tokens.min(n))?)?,
        chosen_tokens: chosen_tokens.min(n),
        hessian_trace: sum(&trace)?,
        tokens: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn trace_and_top_nontarget_match_hand_values() -> Result<()> {
        let dev = Device::Cpu;
        // identity weight: logits = h; pick h so p is known
        let head = OutputLayer {
            weight: Tensor::eye(3, DType::F32, &dev)?,
            bias: None,
        };
        let logits = [[2f32.ln(), 1f32.ln(), 1f32.ln()], [0.0, 0.0, 0.0]];
        let h = Tensor::new(&logits, &dev)?;
        let targets = Tensor::new(&[1u32, 0], &dev)?;
        let s = squeeze(&head, &h, &targets, 1)?;
        // row 0: p = (.5, .25, .25), target 1 → y* = 0 with .5; trace 1 − (.25 + .0625·2) = .625
        assert!((s.top_nontarget_prob - 0.5).abs() < 1e-6, "{s:?}");
        assert_eq!(s.chosen_tokens, 1);
        // row 1: uniform → trace 1 − 1/3
        assert!(
            (s.hessian_trace - (0.625 + 2.0 / 3.0)).abs() < 1e-6,
            "{s:?}"
        );
        assert_eq!(s.tokens, 2);
        Ok(())
    }
}
