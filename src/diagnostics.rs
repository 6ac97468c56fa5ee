//! Squeeze diagnostics: what the paper's section 3 says to watch in a DPO run.
//!
//! - the most likely non-target token y* along chosen responses: the squeezing effect moves
//!   probability mass onto it (Lemma 3.5);
//! - tr(Diag(p) − ppᵀ) = 1 − ‖p‖² per response token: the trace of the softmax cross-entropy
//!   logit Hessian H_z of the paper's section 3, one token at a time — the curvature that SAM's
//!   correction term is scaled by (Theorem 3.2). It is *not* the Hessian of the preference loss:
//!   `dpo-sam sharpness` (src/sharpness.rs) measures that.
//!
//! Computed without a graph from the hidden states the step already has; the trainer asks for
//! them only on logging steps, since they cost one more output-layer matmul.

use crate::models::ops::softmax_last_dim;
use crate::models::output::OutputLayer;
use candle_core::{DType, Result, Tensor, D};

/// Sums over tokens, so micro-batches add up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Squeeze {
    /// Σ over chosen-response tokens of max_{v ≠ target} p_v.
    pub top_nontarget_prob: f64,
    pub chosen_tokens: usize,
    /// Σ over all response tokens of tr(Diag(p) − ppᵀ) = 1 − ‖p‖².
    pub ce_logit_hessian_trace: f64,
    pub tokens: usize,
}

impl Squeeze {
    pub fn add(&mut self, other: &Squeeze) {
        self.top_nontarget_prob += other.top_nontarget_prob;
        self.chosen_tokens += other.chosen_tokens;
        self.ce_logit_hessian_trace += other.ce_logit_hessian_trace;
        self.tokens += other.tokens;
    }
}

/// The softmax p of each response token's logits, summarised: p at the target, ‖p‖², and the
/// largest p at any other token (y*'s probability).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenProbs {
    pub target: Vec<f64>,
    pub sq_norm: Vec<f64>,
    pub top_nontarget: Vec<f64>,
}

/// [`TokenProbs`] for hidden states `h` `[n, hidden]` with `targets` `[n]`, without a graph.
pub fn token_probs(head: &OutputLayer, h: &Tensor, targets: &Tensor) -> Result<TokenProbs> {
    // In the logits' dtype: f32, or f64 where the exact traces of `sharpness` are checked.
    let probs = softmax_last_dim(&head.logits(&h.detach(), None)?)?;
    let (n, vocab) = probs.dims2()?;
    let dt = probs.dtype();
    let target_mask = Tensor::zeros((n, vocab), dt, probs.device())?.scatter_add(
        &targets.unsqueeze(1)?,
        &Tensor::ones((n, 1), dt, probs.device())?,
        1,
    )?;
    let col = |t: Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.to_vec1::<f64>() };
    Ok(TokenProbs {
        target: col((&probs * &target_mask)?.sum(D::Minus1)?)?,
        sq_norm: col(probs.sqr()?.sum(D::Minus1)?)?,
        // With the target's probability zeroed, the row max is y*'s probability.
        top_nontarget: col((&probs * (1.0 - target_mask)?)?.max(D::Minus1)?)?,
    })
}

/// Diagnostics for response tokens `h` `[n, hidden]` with `targets` `[n]`, of which the first
/// `chosen_tokens` belong to chosen responses.
pub fn squeeze(
    head: &OutputLayer,
    h: &Tensor,
    targets: &Tensor,
    chosen_tokens: usize,
) -> Result<Squeeze> {
    let p = token_probs(head, h, targets)?;
    let chosen_tokens = chosen_tokens.min(p.target.len());
    Ok(Squeeze {
        top_nontarget_prob: p.top_nontarget[..chosen_tokens].iter().sum(),
        chosen_tokens,
        ce_logit_hessian_trace: p.sq_norm.iter().map(|s| 1.0 - s).sum(),
        tokens: p.target.len(),
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
            (s.ce_logit_hessian_trace - (0.625 + 2.0 / 3.0)).abs() < 1e-6,
            "{s:?}"
        );
        assert_eq!(s.tokens, 2);
        let p = token_probs(&head, &h, &targets)?;
        assert!((p.target[0] - 0.25).abs() < 1e-6 && (p.target[1] - 1.0 / 3.0).abs() < 1e-6);
        assert!((p.sq_norm[0] - 0.375).abs() < 1e-6, "{p:?}");
        Ok(())
    }
}
