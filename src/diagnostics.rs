//! What the logging-step pass over the output layer measures, from the hidden states the step
//! already has (one more output-layer matmul, without a graph, only on logging steps):
//!
//! - the squeeze diagnostics of the paper's section 3: the most likely non-target token y*
//!   along chosen responses, onto which the squeezing effect moves probability mass (Lemma
//!   3.5), and tr(Diag(p) − ppᵀ) = 1 − ‖p‖² per response token, the trace of the softmax
//!   cross-entropy logit Hessian H_z one token at a time — the curvature that SAM's correction
//!   term is scaled by (Theorem 3.2). It is *not* the Hessian of the preference loss:
//!   `dpo-sam sharpness` (src/sharpness.rs) measures that, from [`token_probs`];
//! - TRL 1.x's token metrics, as its fused LM head defines them: the mean over the vocabulary
//!   of each response token's logits (`logits/chosen`, `logits/rejected`), the entropy of the
//!   next-token distribution over response tokens (`entropy`), and the share of chosen tokens
//!   whose target is the most likely token, ties to the lowest id (`mean_token_accuracy`).

use crate::models::ops::softmax_last_dim;
use crate::models::output::OutputLayer;
use candle_core::{DType, Result, Tensor, D};

/// Sums over one micro-batch's response tokens (so micro-batches add up) and their counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostics {
    /// Σ over chosen-response tokens of max_{v ≠ target} p_v.
    pub top_nontarget_prob: f64,
    pub chosen_tokens: usize,
    /// Σ over all response tokens of tr(Diag(p) − ppᵀ) = 1 − ‖p‖².
    pub ce_logit_hessian_trace: f64,
    pub tokens: usize,
    /// Σ over chosen-response tokens of the mean logit over the vocabulary.
    pub chosen_mean_logits: f64,
    /// Σ over rejected-response tokens of the mean logit over the vocabulary.
    pub rejected_mean_logits: f64,
    /// Σ over all response tokens of the entropy −Σ_v p_v log p_v (nats).
    pub entropy: f64,
    /// Chosen-response tokens whose target is the most likely token.
    pub chosen_top1: usize,
}

impl Diagnostics {
    pub fn add(&mut self, other: &Diagnostics) {
        self.top_nontarget_prob += other.top_nontarget_prob;
        self.chosen_tokens += other.chosen_tokens;
        self.ce_logit_hessian_trace += other.ce_logit_hessian_trace;
        self.tokens += other.tokens;
        self.chosen_mean_logits += other.chosen_mean_logits;
        self.rejected_mean_logits += other.rejected_mean_logits;
        self.entropy += other.entropy;
        self.chosen_top1 += other.chosen_top1;
    }

    pub fn rejected_tokens(&self) -> usize {
        self.tokens - self.chosen_tokens
    }
}

/// The softmax p of each response token's logits, summarised: p at the target and ‖p‖².
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenProbs {
    pub target: Vec<f64>,
    pub sq_norm: Vec<f64>,
}

/// [`TokenProbs`] for hidden states `h` `[n, hidden]` with `targets` `[n]`, without a graph.
pub fn token_probs(head: &OutputLayer, h: &Tensor, targets: &Tensor) -> Result<TokenProbs> {
    // In the logits' dtype: f32, or f64 where the exact traces of `sharpness` are checked.
    let probs = softmax_last_dim(&head.logits(&h.detach(), None)?)?;
    let col = |t: Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.to_vec1::<f64>() };
    Ok(TokenProbs {
        target: col(probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)?,
        sq_norm: col(probs.sqr()?.sum(D::Minus1)?)?,
    })
}

/// For probabilities `probs` `[n, vocab]`: each row's largest probability at a token other than
/// its target (y*'s), `[n]`.
fn top_other(probs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, vocab) = probs.dims2()?;
    let dt = probs.dtype();
    let target_mask = Tensor::zeros((n, vocab), dt, probs.device())?.scatter_add(
        &targets.unsqueeze(1)?,
        &Tensor::ones((n, 1), dt, probs.device())?,
        1,
    )?;
    // With the target's probability zeroed, the row max is y*'s probability.
    (probs * (1.0 - target_mask)?)?.max(D::Minus1)
}

/// Diagnostics for response tokens `h` `[n, hidden]` with `targets` `[n]`, of which the first
/// `chosen_tokens` belong to chosen responses.
pub fn diagnostics(
    head: &OutputLayer,
    h: &Tensor,
    targets: &Tensor,
    chosen_tokens: usize,
) -> Result<Diagnostics> {
    let logits = head.logits(&h.detach(), None)?.to_dtype(DType::F32)?;
    let probs = softmax_last_dim(&logits)?;
    let n = probs.dim(0)?;
    let chosen = chosen_tokens.min(n);
    let trace = (1.0 - probs.sqr()?.sum(D::Minus1)?)?;
    let others = top_other(&probs, targets)?;
    // H(p) = log Σ e^z − Σ p z, with the log-sum-exp taken from the row max.
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    let entropy = (lse.squeeze(1)? - (&probs * &logits)?.sum(D::Minus1)?)?;
    let mean_logits = logits.mean(D::Minus1)?;
    // candle's argmax keeps the first of equal maxima, as TRL's `is_top1` does.
    let top1 = logits
        .narrow(0, 0, chosen)?
        .argmax(D::Minus1)?
        .eq(&targets.narrow(0, 0, chosen)?)?;
    let sum = |t: &Tensor| -> Result<f64> { t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>() };
    Ok(Diagnostics {
        top_nontarget_prob: sum(&others.narrow(0, 0, chosen)?)?,
        chosen_tokens: chosen,
        ce_logit_hessian_trace: sum(&trace)?,
        tokens: n,
        chosen_mean_logits: sum(&mean_logits.narrow(0, 0, chosen)?)?,
        rejected_mean_logits: sum(&mean_logits.narrow(0, chosen, n - chosen)?)?,
        entropy: sum(&entropy)?,
        chosen_top1: top1.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn diagnostics_match_hand_values() -> Result<()> {
        let dev = Device::Cpu;
        // identity weight: logits = h; pick h so p is known
        let head = OutputLayer {
            weight: Tensor::eye(3, DType::F32, &dev)?,
            bias: None,
        };
        let logits = [[2f32.ln(), 1f32.ln(), 1f32.ln()], [0.0, 0.0, 0.0]];
        let h = Tensor::new(&logits, &dev)?;
        let targets = Tensor::new(&[1u32, 0], &dev)?;
        let s = diagnostics(&head, &h, &targets, 1)?;
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
        // mean logits: row 0 (ln 2)/3 (chosen), row 1 0 (rejected)
        assert!(
            (s.chosen_mean_logits - 2f64.ln() / 3.0).abs() < 1e-6,
            "{s:?}"
        );
        assert_eq!(s.rejected_mean_logits, 0.0);
        // entropy: −Σ p ln p = 1.5 ln 2 for (.5, .25, .25), ln 3 for uniform
        assert!(
            (s.entropy - (1.5 * 2f64.ln() + 3f64.ln())).abs() < 1e-6,
            "{s:?}"
        );
        // the chosen token's target 1 is not the argmax 0
        assert_eq!(s.chosen_top1, 0);
        let s = diagnostics(&head, &h, &Tensor::new(&[0u32, 0], &dev)?, 2)?;
        // row 0: target 0 is the argmax; row 1: all tie, and the first (0) counts as top
        assert_eq!(s.chosen_top1, 2);
        Ok(())
    }
}
