//! The output layer: hidden states → per-token log-probs of the target tokens, optionally with
//! the logits-SAM perturbation added to its weight.
//!
//! The losses only ever see per-token log-probs, so this is the one place that touches the N×V
//! logits; a fused, vocabulary-chunked version can replace it without touching the losses.

use crate::models::ops::{accum_dtype, log_softmax_last_dim};
use candle_core::{Result, Tensor, D};

/// `lm_head`: logits = H Wᵀ (+ b). `weight` is `[vocab, hidden]` (HF's layout).
#[derive(Clone)]
pub struct OutputLayer {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl OutputLayer {
    /// Logits `[n, vocab]` (f32 for half-precision weights) for hidden states `[n, hidden]`; `perturbation` (the SAM e, a
    /// constant) is added to the weight only, never to the bias.
    pub fn logits(&self, h: &Tensor, perturbation: Option<&Tensor>) -> Result<Tensor> {
        let w = match perturbation {
            Some(e) => (&self.weight + e.to_dtype(self.weight.dtype())?)?,
            None => self.weight.clone(),
        };
        let mut logits = h.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            logits = logits.broadcast_add(b)?;
        }
        logits.to_dtype(accum_dtype(logits.dtype()))
    }

    /// log π(target_i | h_i) for each row: `[n, hidden]`, `[n]` u32 → `[n]` f32.
    pub fn token_logps(&self, h: &Tensor, targets: &Tensor, perturbation: Option<&Tensor>) -> Result<Tensor> {
        let logp = log_softmax_last_dim(&self.logits(h, perturbation)?)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
    }

    /// Token log-probs `[n]` and the full softmax `[n, vocab]`, for the no-graph SAM pre-pass.
    pub fn token_logps_and_probs(&self, h: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        let logp = log_softmax_last_dim(&self.logits(h, None)?)?;
        let token = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        Ok((token, logp.exp()?))
    }

    /// ∂L/∂W from ∂L/∂(token log-probs), without autograd: G = ∂L/∂logits =
    /// dlogp ⊙ (onehot(target) − softmax), then g = Gᵀ H (Algorithm 1, line 3).
    pub fn weight_grad(&self, h: &Tensor, targets: &Tensor, probs: &Tensor, dlogp: &Tensor) -> Result<Tensor> {
        let (n, vocab) = probs.dims2()?;
        let dt = probs.dtype();
        let onehot = Tensor::zeros((n, vocab), dt, probs.device())?.scatter_add(
            &targets.unsqueeze(1)?,
            &Tensor::ones((n, 1), dt, probs.device())?,
            1,
        )?;
        let g_logits = (onehot - probs)?.broadcast_mul(&dlogp.to_dtype(dt)?.unsqueeze(1)?)?;
        g_logits.t()?.matmul(&h.detach().to_dtype(dt)?)
    }

    pub fn vocab_size(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    pub fn hidden_size(&self) -> Result<usize> {
        self.weight.dim(D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn weight_grad_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (7, 4), &dev)?)?;
        let b = Tensor::randn(0f32, 0.5, 7, &dev)?;
        let head = OutputLayer { weight: w.as_tensor().clone(), bias: Some(b) };
        let targets = Tensor::new(&[1u32, 0, 6, 3, 3], &dev)?;
        let coef = Tensor::new(&[0.3f32, -1.0, 2.0, 0.5, -0.7], &dev)?;
        let loss = (head.token_logps(&h, &targets, None)? * &coef)?.sum_all()?;
        let auto = loss.backward()?.get(&w).unwrap().clone();
        let (_, probs) = head.token_logps_and_probs(&h, &targets)?;
        let manual = head.weight_grad(&h, &targets, &probs, &coef)?;
        let err = (auto - manual)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs err {err}");
        Ok(())
    }

    #[test]
    fn perturbation_shifts_weight_but_not_bias() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (6, 4), &dev)?;
        let b = Tensor::randn(0f32, 0.5, 6, &dev)?;
        let e = Tensor::randn(0f32, 0.1, (6, 4), &dev)?;
        let head = OutputLayer { weight: w.clone(), bias: Some(b.clone()) };
        let shifted = OutputLayer { weight: (&w + &e)?, bias: Some(b) };
        let a = head.logits(&h, Some(&e))?;
        let c = shifted.logits(&h, None)?;
        assert!((a - c)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
