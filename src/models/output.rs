//! The output layer beside the models: hidden states → per-token log-probs of the target
//! tokens, optionally with the logits-SAM perturbation e added to its weight.
//!
//! The losses only ever see per-token log-probs, so this is the one place that touches the N×V
//! logits. On the CPU in f32/f64 and on CUDA in f32/bf16/f16 it runs the tiled kernel of
//! [`crate::kernels::output`], which never holds more than one [`Tile`] of them beyond the kept
//! logits; elsewhere, and as the reference the tests compare against, the unfused composition
//! here.
//!
//! e stays in f32 on every path. Where the weight is f32 (or f64) the logits are H (W + e)ᵀ, the
//! paper's line 5; where it is a low-precision copy (bf16 under mixed precision), W + e would
//! round back to W at the paper's ρ (`docs/precision.md`), so the logits are H Wᵀ + H eᵀ with
//! the second product accumulated in f32 (on CUDA's tiled path H Wᵀ is the SAM pre-pass's, see
//! [`OutputLayer::token_logps_perturbed`]).

use super::ops::{accum_dtype, log_softmax_last_dim};
use crate::kernels::{
    self,
    output::{PrePass, Tile},
};
use candle_core::{Result, Tensor, D};

/// `lm_head`: logits = H Wᵀ (+ b). `weight` is `[vocab, hidden]` (HF's layout).
#[derive(Clone)]
pub struct OutputLayer {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl OutputLayer {
    /// Logits `[n, vocab]` (f32 for half-precision weights) for hidden states `[n, hidden]`;
    /// `perturbation` (the SAM e, a constant) shifts the weight only, never the bias. The
    /// gradient flows to H and W as through H (W + e)ᵀ: ∂L/∂W = Gᵀ H, ∂L/∂H = G (W + e).
    pub fn logits(&self, h: &Tensor, perturbation: Option<&Tensor>) -> Result<Tensor> {
        let (folded, apart) = match perturbation {
            Some(e) if kernels::output::folds(&self.weight, e) => (Some(e), None),
            e => (None, e),
        };
        let weight = match folded {
            Some(e) => (&self.weight + e)?,
            None => self.weight.clone(),
        };
        let mut logits = h.matmul(&weight.t()?)?;
        if let Some(b) = &self.bias {
            logits = logits.broadcast_add(b)?;
        }
        let logits = logits.to_dtype(accum_dtype(logits.dtype()))?;
        match apart {
            Some(e) => logits + h.to_dtype(e.dtype())?.matmul(&e.t()?)?,
            None => Ok(logits),
        }
    }

    /// Whether the tiled path applies (CPU in f32/f64, CUDA in f32/bf16/f16, one dtype).
    fn fuses(&self, h: &Tensor) -> bool {
        let mut tensors = vec![h, &self.weight];
        tensors.extend(self.bias.as_ref());
        kernels::supports_with_cuda(&tensors)
    }

    /// Whether the tiled path takes this perturbation: CUDA's adds e apart where it cannot fold
    /// it, the CPU's only folds.
    fn fuses_with(&self, h: &Tensor, perturbation: Option<&Tensor>) -> bool {
        self.fuses(h)
            && (h.device().is_cuda()
                || perturbation.is_none_or(|e| kernels::output::folds(&self.weight, e)))
    }

    /// log π(target_i | h_i) for each row: `[n, hidden]`, `[n]` u32 → `[n]` f32 (f64 for f64),
    /// differentiable in h, weight and bias; tiled where [`OutputLayer::token_logps_tiled`]
    /// applies.
    pub fn token_logps(
        &self,
        h: &Tensor,
        targets: &Tensor,
        perturbation: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.fuses_with(h, perturbation) {
            self.token_logps_tiled(h, targets, perturbation, Tile::for_device(h.device()))
        } else {
            self.token_logps_unfused(h, targets, perturbation)
        }
    }

    /// [`OutputLayer::token_logps`] at W + e (Algorithm 1, line 5), given the SAM pre-pass at
    /// the same h and targets: on CUDA, where e is added apart (bf16, TF32), the perturbed logits
    /// start from the pre-pass's kept H Wᵀ and cost one lm_head GEMM, H eᵀ.
    pub fn token_logps_perturbed(
        &self,
        h: &Tensor,
        targets: &Tensor,
        e: &Tensor,
        pre: PrePass,
    ) -> Result<Tensor> {
        if !self.fuses_with(h, Some(e)) {
            drop(pre);
            return self.token_logps_unfused(h, targets, Some(e));
        }
        let tile = Tile::for_device(h.device());
        let bias = self.bias.as_ref();
        kernels::output::token_logps(h, &self.weight, bias, targets, Some(e), Some(pre), tile)
    }

    /// [`OutputLayer::token_logps`] through the full `[n, vocab]` log-softmax.
    pub fn token_logps_unfused(
        &self,
        h: &Tensor,
        targets: &Tensor,
        perturbation: Option<&Tensor>,
    ) -> Result<Tensor> {
        let logp = log_softmax_last_dim(&self.logits(h, perturbation)?)?;
        logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
    }

    /// [`OutputLayer::token_logps`] one tile of logits at a time (CPU in f32/f64, CUDA).
    pub fn token_logps_tiled(
        &self,
        h: &Tensor,
        targets: &Tensor,
        perturbation: Option<&Tensor>,
        tile: Tile,
    ) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        kernels::output::token_logps(h, &self.weight, bias, targets, perturbation, None, tile)
    }

    /// Token log-probs at the unperturbed weight without a graph, for the SAM pre-pass, and
    /// the [`SamPrePass`] that lets [`OutputLayer::sam_gradient`] skip recomputing the logits.
    pub fn token_logps_for_sam(
        &self,
        h: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, SamPrePass)> {
        self.token_logps_for_sam_tiled(h, targets, Tile::for_device(h.device()))
    }

    /// [`OutputLayer::token_logps_for_sam`] with a given tile.
    pub fn token_logps_for_sam_tiled(
        &self,
        h: &Tensor,
        targets: &Tensor,
        tile: Tile,
    ) -> Result<(Tensor, SamPrePass)> {
        let frozen = OutputLayer {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
        };
        let h = h.detach();
        if !frozen.fuses(&h) {
            let logp = log_softmax_last_dim(&frozen.logits(&h, None)?)?;
            let out = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            return Ok((out, SamPrePass::Unfused(logp)));
        }
        let bias = frozen.bias.as_ref();
        let (out, pre) =
            kernels::output::token_logps_for_sam(&h, &frozen.weight, bias, targets, tile)?;
        Ok((out, SamPrePass::Tiled(pre)))
    }

    /// ∂L/∂W at the unperturbed weight from ∂L/∂(token log-probs) `dlogp` `[n]`, without a
    /// graph: g = Gᵀ H with G = ∂L/∂logits = dlogp ⊙ (onehot(target) − softmax) (Algorithm 1,
    /// line 3), from the [`SamPrePass`] of [`OutputLayer::token_logps_for_sam`] for the same
    /// `h` and `targets`: one GEMM over lm_head, none to recompute the logits.
    pub fn sam_gradient(
        &self,
        h: &Tensor,
        targets: &Tensor,
        dlogp: &Tensor,
        pre: &SamPrePass,
    ) -> Result<Tensor> {
        match pre {
            SamPrePass::Tiled(pre) => pre.sam_gradient(dlogp),
            SamPrePass::Unfused(logp) => sam_gradient_from(logp, h, targets, dlogp),
        }
    }

    /// [`OutputLayer::sam_gradient`] recomputing the full `[n, vocab]` softmax: the reference.
    pub fn sam_gradient_unfused(
        &self,
        h: &Tensor,
        targets: &Tensor,
        dlogp: &Tensor,
    ) -> Result<Tensor> {
        let logp = log_softmax_last_dim(&self.logits(&h.detach(), None)?.detach())?;
        sam_gradient_from(&logp, h, targets, dlogp)
    }

    pub fn vocab_size(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    pub fn hidden_size(&self) -> Result<usize> {
        self.weight.dim(D::Minus1)
    }
}

/// What the SAM pre-pass leaves for line 3 of Algorithm 1: the tiled kernel's [`PrePass`], or
/// the unfused path's log-softmax `[n, vocab]` (in the logits' f32 or wider).
pub enum SamPrePass {
    Tiled(PrePass),
    Unfused(Tensor),
}

impl SamPrePass {
    /// What line 5 can start from ([`OutputLayer::token_logps_perturbed`]): the tiled pass; the
    /// unfused log-softmax is of no use there and is dropped here rather than held through it.
    pub fn for_perturbed_pass(self) -> Option<PrePass> {
        match self {
            SamPrePass::Tiled(pre) => Some(pre),
            SamPrePass::Unfused(_) => None,
        }
    }
}

/// g = Gᵀ H from the log-softmax `logp` of the unperturbed logits.
fn sam_gradient_from(
    logp: &Tensor,
    h: &Tensor,
    targets: &Tensor,
    dlogp: &Tensor,
) -> Result<Tensor> {
    let probs = logp.exp()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    const TINY: Tile = Tile {
        rows: 2,
        vocab: 3,
        keep_bytes: 0,
    };

    #[test]
    fn sam_gradient_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (7, 4), &dev)?)?;
        let b = Tensor::randn(0f32, 0.5, 7, &dev)?;
        let head = OutputLayer {
            weight: w.as_tensor().clone(),
            bias: Some(b),
        };
        let targets = Tensor::new(&[1u32, 0, 6, 3, 3], &dev)?;
        let coef = Tensor::new(&[0.3f32, -1.0, 2.0, 0.5, -0.7], &dev)?;
        let loss = (head.token_logps_unfused(&h, &targets, None)? * &coef)?.sum_all()?;
        let auto = loss.backward()?.get(&w).unwrap().clone();
        for manual in [head.sam_gradient_unfused(&h, &targets, &coef)?, {
            let (_, pre) = head.token_logps_for_sam_tiled(&h, &targets, TINY)?;
            assert!(matches!(pre, SamPrePass::Tiled(_)));
            head.sam_gradient(&h, &targets, &coef, &pre)?
        }] {
            let err = (&auto - manual)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "max abs err {err}");
        }
        Ok(())
    }

    #[test]
    fn perturbation_shifts_weight_but_not_bias() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (6, 4), &dev)?;
        let b = Tensor::randn(0f32, 0.5, 6, &dev)?;
        let e = Tensor::randn(0f32, 0.1, (6, 4), &dev)?;
        let head = OutputLayer {
            weight: w.clone(),
            bias: Some(b.clone()),
        };
        let shifted = OutputLayer {
            weight: (&w + &e)?,
            bias: Some(b),
        };
        let a = head.logits(&h, Some(&e))?;
        let c = shifted.logits(&h, None)?;
        assert!((a - c)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }

    #[test]
    fn e_stays_in_f32_beside_a_bf16_weight() -> Result<()> {
        let dev = Device::Cpu;
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16);
        let h = bf16(Tensor::randn(0f32, 1.0, (3, 4), &dev)?)?;
        let w = Var::from_tensor(&bf16(Tensor::rand(0.25f32, 0.5, (6, 4), &dev)?)?)?;
        let b = bf16(Tensor::randn(0f32, 0.5, 6, &dev)?)?;
        // Far below half a bf16 step at |w| ≥ 0.25 (2⁻¹⁰ ≈ 1e-3): no entry of e survives W + e.
        let e = (Tensor::randn(0f32, 1.0, (6, 4), &dev)? * 1e-4)?;
        let head = OutputLayer {
            weight: w.as_tensor().clone(),
            bias: Some(b),
        };
        let plain = head.logits(&h, None)?;
        let shifted = head.logits(&h, Some(&e))?;
        assert_eq!(shifted.dtype(), DType::F32);
        let exact = h.to_dtype(DType::F32)?.matmul(&e.t()?)?;
        let err = ((&shifted - &plain)? - &exact)?.abs()?.max_all()?;
        let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err.to_scalar::<f32>()? < 1e-2 * scale, "{err} vs {scale}");
        // Added to the bf16 weight, the same e rounds away.
        let rounded = head.logits(&h, Some(&bf16(e.clone())?))?;
        assert_eq!(
            (rounded - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        // ∂L/∂W is Gᵀ H, as at W: e is a constant.
        let coef = Tensor::randn(0f32, 1.0, (3, 6), &dev)?;
        let dw = |logits: &Tensor| -> Result<Tensor> {
            let grads = (logits * &coef)?.sum_all()?.backward()?;
            Ok(grads.get(&w).expect("a weight gradient").clone())
        };
        let diff = (dw(&shifted)? - dw(&plain)?)?.abs()?.max_all()?;
        assert_eq!(diff.to_dtype(DType::F32)?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
