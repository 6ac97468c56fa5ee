//! Preference losses: one registry of objectives, selected by `training.loss_type` and mixed by
//! `training.loss_weights` as TRL's `DPOTrainer` does.
//!
//! Every loss is a function of [`PairLogps`] (policy sequence log-probs, and where it needs them
//! the reference log-probs and response lengths). A term has a pairwise part, averaged over the
//! micro-batch's pairs, and may add λ × the chosen responses' NLL, reduced over the micro-batch
//! by `training.nll_reduction` (TRL's token mean by default). The trainer only ever calls
//! [`Loss::compute`], so logits-SAM's perturbation is shaped by whatever mix is configured. The
//! names are `config::LossType`'s.

use crate::config::{LossType, NllReduction};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Per-pair quantities, each `[b]` in the logps' dtype (f32, or f64 for gradient checks).
pub struct PairLogps {
    /// log π(y_w|x): summed over the chosen response's tokens.
    pub chosen: Tensor,
    /// log π(y_l|x).
    pub rejected: Tensor,
    pub ref_chosen: Option<Tensor>,
    pub ref_rejected: Option<Tensor>,
    /// Response tokens scored per pair (the EOS included), for the length-averaged losses.
    pub chosen_tokens: Tensor,
    pub rejected_tokens: Tensor,
}

impl PairLogps {
    /// From per-row sequence log-probs `[2b]` (chosen rows first, as in `PreferenceBatch`), the
    /// optional reference (chosen, rejected) and the batch's per-row response lengths.
    pub fn from_rows(
        seq: &Tensor,
        reference: Option<&(Tensor, Tensor)>,
        response_lens: &[usize],
    ) -> Result<PairLogps> {
        let b = response_lens.len() / 2;
        // An empty response cannot be tokenised, but a zero length must never divide.
        let lens: Vec<f64> = response_lens.iter().map(|&n| n.max(1) as f64).collect();
        let lens = Tensor::new(lens.as_slice(), seq.device())?.to_dtype(seq.dtype())?;
        Ok(PairLogps {
            chosen: seq.narrow(0, 0, b)?,
            rejected: seq.narrow(0, b, b)?,
            ref_chosen: reference.map(|r| r.0.clone()),
            ref_rejected: reference.map(|r| r.1.clone()),
            chosen_tokens: lens.narrow(0, 0, b)?,
            rejected_tokens: lens.narrow(0, b, b)?,
        })
    }

    /// The chosen responses' NLL over the whole micro-batch (a scalar): with `token_mean`
    /// −Σ log π(y_w|x) / Σ |y_w| over every chosen token, as TRL's `sft` loss and CPOTrainer's
    /// `nll_loss` (a cross-entropy mean); with `sequence_sum` the mean over pairs of
    /// −log π(y_w|x).
    pub fn chosen_nll(&self, reduction: NllReduction) -> candle_core::Result<Tensor> {
        match reduction {
            NllReduction::TokenMean => (self.chosen.sum_all()? / self.chosen_tokens.sum_all()?)?,
            NllReduction::SequenceSum => self.chosen.mean_all()?,
        }
        .neg()
    }

    /// Each pair's own NLL `[b]` under `reduction` (the micro-batch NLL of that pair alone).
    pub fn chosen_nll_per_pair(&self, reduction: NllReduction) -> candle_core::Result<Tensor> {
        match reduction {
            NllReduction::TokenMean => (&self.chosen / &self.chosen_tokens)?,
            NllReduction::SequenceSum => self.chosen.clone(),
        }
        .neg()
    }
}

/// What a configured loss gives for one micro-batch.
pub struct LossOutput {
    /// The micro-batch's loss, which is differentiated: Σ wᵢ × (the mean over pairs of term i's
    /// pairwise part + λᵢ × the micro-batch NLL). With `token_mean` that NLL is taken over all
    /// the micro-batch's chosen tokens, so this is not the mean of `losses`.
    pub loss: Tensor,
    /// Per-pair losses `[b]`: each pair scored alone (its own NLL under `nll_reduction`).
    pub losses: Tensor,
    /// The micro-batch's NLL under `nll_reduction` (logged as `nll_loss`) when a term has one.
    pub nll: Option<Tensor>,
    /// Implicit rewards `[b]`, detached.
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// One term before weighting: its pairwise part `[b]` (none for `sft`) and λ of its NLL.
struct Term {
    pairwise: Option<Tensor>,
    nll_weight: f64,
}

impl Term {
    fn pairwise(losses: Tensor) -> Result<Term> {
        Ok(Term {
            pairwise: Some(losses),
            nll_weight: 0.0,
        })
    }
}

/// What each `training.loss_type` computes.
impl LossType {
    pub fn needs_reference(self) -> bool {
        !matches!(
            self,
            LossType::Slic | LossType::Cpo | LossType::Simpo | LossType::Sft
        )
    }

    fn term(self, lp: &PairLogps, p: &LossParams) -> Result<Term> {
        match self {
            LossType::Sigmoid => sigmoid(lp, p),
            LossType::Robust => robust(lp, p),
            LossType::Hinge => hinge(lp, p),
            LossType::Ipo => ipo(lp, p),
            LossType::Slic => slic(lp, p),
            LossType::Cpo => cpo(lp, p),
            LossType::Simpo => simpo(lp, p),
            LossType::Dpop => dpop(lp, p),
            // `sft`: the chosen responses' NLL alone (TRL's `sft` loss type; `rpo_alpha` adds
            // it with that weight, RPO, Pang et al. 2024), see [`PairLogps::chosen_nll`].
            LossType::Sft => Ok(Term {
                pairwise: None,
                nll_weight: 1.0,
            }),
        }
    }

    /// Whether the term adds an NLL of the chosen responses (`nll_loss` is then logged).
    pub fn has_nll(self) -> bool {
        matches!(self, LossType::Slic | LossType::Cpo | LossType::Sft)
    }
}

/// Whether any of these terms needs reference-model log-probs (if not, no reference is loaded).
pub fn needs_reference(terms: &[(LossType, f64)]) -> bool {
    terms.iter().any(|(k, _)| k.needs_reference())
}

/// Hyper-parameters shared by the registry; each loss reads only its own (see its doc).
#[derive(Debug, Clone, PartialEq)]
pub struct LossParams {
    /// β (τ for IPO).
    pub beta: f64,
    /// ε of conservative / robust DPO (also smooths cpo, simpo and dpop as TRL does).
    pub label_smoothing: f64,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// λ of CPO's NLL term.
    pub cpo_alpha: f64,
    /// SLiC-HF's margin δ.
    pub slic_delta: f64,
    /// λ of SLiC-HF's NLL term.
    pub slic_lambda: f64,
    /// DPO-Positive's λ.
    pub dpop_lambda: f64,
    /// How the NLL of cpo, slic and sft is reduced over a micro-batch.
    pub nll_reduction: NllReduction,
}

impl Default for LossParams {
    /// TRL's defaults (`DPOConfig`, `CPOConfig`, the token-mean NLL); SLiC-HF's λ = δ = 1 from
    /// the paper's grid; DPOP's λ = 50 from Pal et al.
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            cpo_alpha: 1.0,
            slic_delta: 1.0,
            slic_lambda: 1.0,
            dpop_lambda: 50.0,
            nll_reduction: NllReduction::TokenMean,
        }
    }
}

/// A configured loss: a weighted sum of registry terms.
#[derive(Debug, Clone)]
pub struct Loss {
    pub terms: Vec<(LossType, f64)>,
    pub params: LossParams,
}

impl Loss {
    /// One unweighted term.
    pub fn single(kind: LossType, params: LossParams) -> Loss {
        Loss {
            terms: vec![(kind, 1.0)],
            params,
        }
    }

    /// Whether any term needs reference-model log-probs (if not, no reference is loaded).
    pub fn needs_reference(&self) -> bool {
        needs_reference(&self.terms)
    }

    /// Whether any term adds the chosen responses' NLL.
    pub fn has_nll(&self) -> bool {
        self.terms.iter().any(|(k, _)| k.has_nll())
    }

    /// Σ wᵢ · termᵢ as TRL combines `loss_type` lists: `loss += per_sequence_loss.mean() × w`.
    /// Rewards are TRL 1.x's: β × the summed log-ratio whenever a reference is in play, for any
    /// mix (IPO included); without one, CPOTrainer's β × log π (β × the length-averaged log π
    /// when the first term is `simpo`).
    pub fn compute(&self, lp: &PairLogps) -> Result<LossOutput> {
        let Some(&(first, _)) = self.terms.first() else {
            bail!("training.loss_type: no loss configured");
        };
        let p = &self.params;
        let (mut pairwise, mut nll_weight): (Option<Tensor>, f64) = (None, 0.0);
        for (kind, weight) in &self.terms {
            let term = kind.term(lp, p)?;
            if let Some(part) = term.pairwise {
                let part = (part * *weight)?;
                pairwise = Some(match pairwise {
                    Some(sum) => (sum + part)?,
                    None => part,
                });
            }
            nll_weight += weight * term.nll_weight;
        }
        let nll = match self.has_nll() {
            true => Some(lp.chosen_nll(p.nll_reduction)?),
            false => None,
        };
        let mut losses = match &pairwise {
            Some(t) => t.clone(),
            None => lp.chosen.zeros_like()?,
        };
        let mut loss = losses.mean_all()?;
        if let Some(nll) = &nll {
            loss = (loss + (nll * nll_weight)?)?;
            losses = (losses + (lp.chosen_nll_per_pair(p.nll_reduction)? * nll_weight)?)?;
        }
        let (chosen_rewards, rejected_rewards) = if self.needs_reference() {
            let (cr, rr) = ref_logratios(lp)?;
            rewards(&cr, &rr, p.beta)?
        } else if first == LossType::Simpo {
            let (c, r) = length_averaged(lp)?;
            rewards(&c, &r, p.beta)?
        } else {
            rewards(&lp.chosen, &lp.rejected, p.beta)?
        };
        Ok(LossOutput {
            loss,
            losses,
            nll,
            chosen_rewards,
            rejected_rewards,
        })
    }
}

/// −log σ(x) = log(1 + e^{−x}), computed as m + log(e^{−m} + e^{−x−m}) with m = max(−x, 0)
/// held constant: no exponent is positive, so large margins neither overflow nor lose their
/// gradient, and the gradient is exactly −σ(−x) everywhere — including x = 0, where every DPO run
/// starts (policy = reference) and where the max(−x, 0) + log(1 + e^{−|x|}) form picks up
/// candle's one-sided derivatives of relu and abs and triples the gradient.
pub fn neg_log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.neg()?.relu()?.detach();
    let sum = (m.neg()?.exp()? + (x.neg()? - &m)?.exp()?)?;
    m + sum.log()?
}

/// (1 − ε)·(−log σ(z)) + ε·(−log σ(−z)): the label-smoothed logistic loss of Mitchell's cDPO.
fn smoothed(z: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let loss = neg_log_sigmoid(z)?;
    if eps == 0.0 {
        return Ok(loss);
    }
    (loss * (1.0 - eps))? + (neg_log_sigmoid(&z.neg()?)? * eps)?
}

fn ref_logps(lp: &PairLogps) -> Result<(&Tensor, &Tensor)> {
    match (&lp.ref_chosen, &lp.ref_rejected) {
        (Some(rc), Some(rr)) => Ok((rc, rr)),
        _ => bail!("this loss needs reference log-probs, but none were computed"),
    }
}

/// (log π(y_w|x) − log π_ref(y_w|x), log π(y_l|x) − log π_ref(y_l|x)).
fn ref_logratios(lp: &PairLogps) -> Result<(Tensor, Tensor)> {
    let (rc, rr) = ref_logps(lp)?;
    Ok(((&lp.chosen - rc)?, (&lp.rejected - rr)?))
}

/// (l̄π(y_w), l̄π(y_l)): log-probs divided by the response lengths.
fn length_averaged(lp: &PairLogps) -> Result<(Tensor, Tensor)> {
    Ok((
        (&lp.chosen / &lp.chosen_tokens)?,
        (&lp.rejected / &lp.rejected_tokens)?,
    ))
}

/// Rewards r = β·x, detached (they are logged, never differentiated).
fn rewards(chosen: &Tensor, rejected: &Tensor, beta: f64) -> Result<(Tensor, Tensor)> {
    Ok(((chosen * beta)?.detach(), (rejected * beta)?.detach()))
}

/// `sigmoid` — DPO (Rafailov et al. 2023, eq. 7; the paper's eq. 2), with cDPO's label
/// smoothing ε (`label_smoothing`, Mitchell 2023):
/// z = β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))],
/// loss = −(1 − ε) log σ(z) − ε log σ(−z).
fn sigmoid(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let (cr, rr) = ref_logratios(lp)?;
    let z = ((&cr - &rr)? * p.beta)?;
    Term::pairwise(smoothed(&z, p.label_smoothing)?)
}

/// `robust` — robust DPO for noisy preferences (Chowdhury et al. 2024, eq. 6), TRL's form:
/// loss = [−(1 − ε) log σ(z) + ε log σ(−z)] / (1 − 2ε), z as in [`sigmoid`], ε = `label_smoothing`
/// (the assumed label-flip rate, < 0.5).
fn robust(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let eps = p.label_smoothing;
    let (cr, rr) = ref_logratios(lp)?;
    let z = ((&cr - &rr)? * p.beta)?;
    let num = ((neg_log_sigmoid(&z)? * (1.0 - eps))? - (neg_log_sigmoid(&z.neg()?)? * eps)?)?;
    Term::pairwise((num / (1.0 - 2.0 * eps))?)
}

/// `hinge` — the hinge loss of RSO / SLiC on DPO's log-ratios (Liu et al. 2024; TRL "hinge"):
/// loss = max(0, 1 − z), z as in [`sigmoid`].
fn hinge(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let (cr, rr) = ref_logratios(lp)?;
    let z = ((&cr - &rr)? * p.beta)?;
    Term::pairwise(z.neg()?.affine(1.0, 1.0)?.relu()?)
}

/// `ipo` — IPO (Azar et al. 2024, eq. 17) on length-averaged log-probs as TRL computes it, with
/// τ = `beta`: h = (l̄π(y_w) − l̄_ref(y_w)) − (l̄π(y_l) − l̄_ref(y_l)), l̄ = log π / tokens;
/// loss = (h − 1/(2τ))².
fn ipo(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let (cr, rr) = ref_logratios(lp)?;
    let h = ((cr / &lp.chosen_tokens)? - (rr / &lp.rejected_tokens)?)?;
    Term::pairwise((h - 1.0 / (2.0 * p.beta))?.sqr()?)
}

/// `slic` — SLiC-HF (Zhao et al. 2023) as in the paper's Table 5, reference-free:
/// max(0, δ − log π(y_w|x) + log π(y_l|x)) per pair (sequence sums), plus λ × the chosen NLL
/// (`nll_reduction`), δ = `slic_delta`, λ = `slic_lambda`.
fn slic(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let margin = (&lp.rejected - &lp.chosen)?
        .affine(1.0, p.slic_delta)?
        .relu()?;
    Ok(Term {
        pairwise: Some(margin),
        nll_weight: p.slic_lambda,
    })
}

/// `cpo` — CPO (Xu et al. 2024), reference-free, as TRL's CPOTrainer:
/// −log σ(β log π(y_w|x) − β log π(y_l|x)) per pair (sequence sums; `label_smoothing` smooths
/// it as CPOTrainer does), plus λ × the chosen NLL (`nll_reduction`), λ = `cpo_alpha`.
fn cpo(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let z = ((&lp.chosen - &lp.rejected)? * p.beta)?;
    Ok(Term {
        pairwise: Some(smoothed(&z, p.label_smoothing)?),
        nll_weight: p.cpo_alpha,
    })
}

/// `simpo` — SimPO (Meng et al. 2024, eq. 6), reference-free on length-averaged log-probs:
/// loss = −log σ(β l̄π(y_w) − β l̄π(y_l) − γ), γ = `simpo_gamma`, with `label_smoothing` as in
/// TRL's CPOTrainer.
fn simpo(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let (c, r) = length_averaged(lp)?;
    let z = (((&c - &r)? * p.beta)? - p.simpo_gamma)?;
    Term::pairwise(smoothed(&z, p.label_smoothing)?)
}

/// `dpop` — DPO-Positive (Pal et al. 2024, eq. 3): DPO with a penalty when the chosen
/// log-prob falls below the reference's:
/// z = β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) − λ max(0, log π_ref(y_w) − log π(y_w))],
/// loss = −log σ(z) (label-smoothed as [`sigmoid`]), λ = `dpop_lambda`.
fn dpop(lp: &PairLogps, p: &LossParams) -> Result<Term> {
    let (cr, rr) = ref_logratios(lp)?;
    let penalty = (cr.neg()?.relu()? * p.dpop_lambda)?;
    let z = (((&cr - &rr)? - penalty)? * p.beta)?;
    Term::pairwise(smoothed(&z, p.label_smoothing)?)
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
            chosen_tokens: t(&[4.0, 2.0]),
            rejected_tokens: t(&[5.0, 2.0]),
        };
        let out = Loss::single(
            LossType::Sigmoid,
            LossParams {
                beta: 0.5,
                ..Default::default()
            },
        )
        .compute(&lp)?;
        let losses = out.losses.to_vec1::<f32>()?;
        assert!((losses[0] - 0.201_413).abs() < 1e-5, "{losses:?}");
        // equal log-probs: loss = log 2
        assert!((losses[1] - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.chosen_rewards.to_vec1::<f32>()?, vec![1.0, 0.0]);
        assert_eq!(out.rejected_rewards.to_vec1::<f32>()?, vec![-0.5, 0.0]);
        Ok(())
    }

    #[test]
    fn neg_log_sigmoid_gradient_is_minus_sigmoid_including_at_zero() -> Result<()> {
        let x = candle_core::Var::from_tensor(&t(&[0.0, 2.0, -3.0, 800.0, -800.0]))?;
        let g = neg_log_sigmoid(x.as_tensor())?
            .sum_all()?
            .backward()?
            .get(&x)
            .unwrap()
            .to_vec1::<f32>()?;
        let expected = [-0.5f32, -0.119_202_92, -0.952_574_1, 0.0, -1.0];
        for (a, e) in g.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{g:?}");
        }
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
