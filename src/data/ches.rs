//! CHES, the centered hidden embedding similarity of a preference pair (Razin et al. 2024,
//! "Unintentional Unalignment", Definition 2): a score, from one forward pass of the model
//! about to be trained, of how likely a pair is to displace likelihood — to push the chosen
//! response's probability down under DPO. Pairs whose chosen and rejected responses look alike
//! to the model's last hidden layer score high.
//!
//! With h⁺_k the final hidden state (after the last norm) at the position that predicts the k-th
//! token of y⁺ — the last prompt position through the second-to-last token, k = 1..|y⁺| — and
//! h⁻_k likewise for y⁻:
//!
//!   CHES    = ⟨Σ_k h⁺_k, Σ_k h⁻_k⟩ − ‖Σ_k h⁺_k‖²
//!   LN-CHES = ⟨Σ_k h⁺_k / |y⁺|, Σ_k h⁻_k / |y⁻|⟩ − ‖Σ_k h⁺_k / |y⁺|‖²
//!
//! as the authors' `ches/ches.py` (princeton-nlp/unintentional-unalignment) computes them.
//! Those positions are exactly [`PreferenceBatch::positions`] (the response includes the EOS that
//! TRL appends), so CHES comes from the hidden states that score the response tokens.
//! `data.filter_ches_quantile` drops the pairs with the highest LN-CHES, the variant the authors
//! filter by (their §6).

use super::batch::{PreferenceBatch, TokenizedPair};
use crate::models::Model;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// One pair's scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ches {
    pub ches: f64,
    pub ln_ches: f64,
}

/// The scores of a batch's pairs from its response hidden states `h` `[n, d]`
/// ([`PreferenceBatch::response_hidden`]); sums and products in f64.
pub fn batch_ches(batch: &PreferenceBatch, h: &Tensor) -> Result<Vec<Ches>> {
    let (_, d) = h.dims2()?;
    let b = batch.num_pairs;
    let sums = Tensor::zeros((2 * b, d), DType::F64, h.device())?
        .index_add(&batch.rows, &h.detach().to_dtype(DType::F64)?, 0)?
        .to_vec2::<f64>()?;
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    Ok((0..b)
        .map(|i| {
            let (w, l) = (&sums[i], &sums[b + i]);
            let (nw, nl) = (
                batch.response_lens[i].max(1) as f64,
                batch.response_lens[b + i].max(1) as f64,
            );
            let (wl, ww) = (dot(w, l), dot(w, w));
            Ches {
                ches: wl - ww,
                ln_ches: wl / (nw * nl) - ww / (nw * nw),
            }
        })
        .collect())
}

/// The scores of `pairs` under `model`, in pair order, `batch_size` pairs per forward pass.
pub fn ches_scores(
    model: &Model,
    pairs: &[TokenizedPair],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Ches>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let batch = PreferenceBatch::new(chunk, pad_id, device)?;
        let h = batch.response_hidden(model.net.forward_hidden(&batch.input_ids)?)?;
        out.extend(batch_ches(&batch, &h)?);
    }
    Ok(out)
}

/// Which pairs `data.filter_ches_quantile = q` drops, from their length-normalised CHES
/// `ln_ches`: the ⌊q·n⌋ highest (ties broken by position), returned as a keep-mask, with the
/// lowest score dropped (the threshold; `None` when nothing is dropped).
pub fn filter_mask(ln_ches: &[f64], quantile: f64) -> (Vec<bool>, Option<f64>) {
    let n = ln_ches.len();
    let drop = ((quantile * n as f64).floor() as usize).min(n);
    let mut order: Vec<usize> = (0..n).collect();
    // Highest first; a NaN score (a broken model) counts as the most displacement-prone.
    order.sort_by(|&a, &b| {
        let key = |i: usize| {
            let v = ln_ches[i];
            if v.is_nan() {
                f64::INFINITY
            } else {
                v
            }
        };
        key(b).total_cmp(&key(a)).then(a.cmp(&b))
    });
    let mut keep = vec![true; n];
    for &i in &order[..drop] {
        keep[i] = false;
    }
    let threshold = drop.checked_sub(1).map(|last| ln_ches[order[last]]);
    (keep, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_drops_the_highest_scores_and_keeps_order() {
        let scores = [0.5, -1.0, 2.0, 0.1, 2.0, -3.0, 1.0, 0.0, 0.2, -0.5];
        let (keep, t) = filter_mask(&scores, 0.25);
        // ⌊2.5⌋ = 2 dropped: the two 2.0s.
        assert_eq!(keep.iter().filter(|k| !**k).count(), 2);
        assert!(!keep[2] && !keep[4], "{keep:?}");
        assert_eq!(t, Some(2.0));
        let (keep, t) = filter_mask(&scores, 0.0);
        assert!(keep.iter().all(|k| *k) && t.is_none());
        // Razin et al. keep the 5% lowest: q = 0.95 of 378 pairs keeps 19.
        let many: Vec<f64> = (0..378).map(f64::from).collect();
        let (keep, t) = filter_mask(&many, 0.95);
        assert_eq!(keep.iter().filter(|k| **k).count(), 19);
        assert!(keep[..19].iter().all(|k| *k));
        assert_eq!(t, Some(19.0));
    }
}
