//! The output layer: hidden states → per-token log-probs of the target tokens, optionally with
//! the logits-SAM perturbation added to its weight.
//!
//! The losses only ever see per-token log-probs, so this is the one place that touches the N×V
//! logits. On CPU in f32/f64 it never holds more than [`CHUNK_ROWS`] rows of them: the forward
//! keeps only each token's log-sum-exp, and the backward (a custom op) recomputes a chunk's
//! logits, turns them into ∂L/∂logits and folds them into ∂L/∂H, ∂L/∂W and ∂L/∂b at once. The
//! trade is one more H Wᵀ matmul in the backward for memory that no longer grows with N×V.
//! Elsewhere, and as the reference the tests compare against, the unfused composition runs.

use crate::models::fast_ops::{self, by_dtype, par_blocks, slice, Real};
use crate::models::ops::{accum_dtype, log_softmax_last_dim};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use std::cell::Cell;

/// Rows of hidden states per chunk of the fused path: it holds at most this many × vocab logits.
pub const CHUNK_ROWS: usize = 256;

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
        let mut logits = h.matmul(&self.perturbed_weight(perturbation)?.t()?)?;
        if let Some(b) = &self.bias {
            logits = logits.broadcast_add(b)?;
        }
        logits.to_dtype(accum_dtype(logits.dtype()))
    }

    /// W + e, or W.
    fn perturbed_weight(&self, perturbation: Option<&Tensor>) -> Result<Tensor> {
        match perturbation {
            Some(e) => &self.weight + e.to_dtype(self.weight.dtype())?,
            None => Ok(self.weight.clone()),
        }
    }

    /// Whether the fused, chunked path applies (CPU, f32 or f64 throughout).
    fn fuses(&self, h: &Tensor) -> bool {
        let mut tensors = vec![h, &self.weight];
        tensors.extend(self.bias.as_ref());
        fast_ops::supports(&tensors)
    }

    /// log π(target_i | h_i) for each row: `[n, hidden]`, `[n]` u32 → `[n]` f32 (f64 for f64),
    /// differentiable in h, weight and bias; chunked where [`OutputLayer::token_logps_chunked`]
    /// applies.
    pub fn token_logps(
        &self,
        h: &Tensor,
        targets: &Tensor,
        perturbation: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.fuses(h) {
            self.token_logps_chunked(h, targets, perturbation, CHUNK_ROWS)
        } else {
            self.token_logps_unfused(h, targets, perturbation)
        }
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

    /// [`OutputLayer::token_logps`] `chunk_rows` rows at a time (CPU, f32/f64 only).
    pub fn token_logps_chunked(
        &self,
        h: &Tensor,
        targets: &Tensor,
        perturbation: Option<&Tensor>,
        chunk_rows: usize,
    ) -> Result<Tensor> {
        let chunk = Chunked::new(self, h, targets, perturbation, chunk_rows)?;
        let (out, lse) = by_dtype!(h.dtype(), T => chunk.forward::<T>()?);
        let op = TokenLogps { chunk, lse, out };
        match &self.bias {
            Some(b) => h.apply_op3(&self.weight, b, op),
            None => h.apply_op2(&self.weight, op),
        }
    }

    /// ∂L/∂W at the unperturbed weight from ∂L/∂(token log-probs) `dlogp` `[n]`, without a
    /// graph: g = Gᵀ H with G = ∂L/∂logits = dlogp ⊙ (onehot(target) − softmax) (Algorithm 1,
    /// line 3); chunked where [`OutputLayer::token_logps`] is.
    pub fn sam_gradient(&self, h: &Tensor, targets: &Tensor, dlogp: &Tensor) -> Result<Tensor> {
        if self.fuses(h) {
            self.sam_gradient_chunked(h, targets, dlogp, CHUNK_ROWS)
        } else {
            self.sam_gradient_unfused(h, targets, dlogp)
        }
    }

    /// [`OutputLayer::sam_gradient`] through the full `[n, vocab]` softmax.
    pub fn sam_gradient_unfused(
        &self,
        h: &Tensor,
        targets: &Tensor,
        dlogp: &Tensor,
    ) -> Result<Tensor> {
        let probs = log_softmax_last_dim(&self.logits(&h.detach(), None)?.detach())?.exp()?;
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

    /// [`OutputLayer::sam_gradient`] `chunk_rows` rows at a time (CPU, f32/f64 only).
    pub fn sam_gradient_chunked(
        &self,
        h: &Tensor,
        targets: &Tensor,
        dlogp: &Tensor,
        chunk_rows: usize,
    ) -> Result<Tensor> {
        let chunk = Chunked::new(self, h, targets, None, chunk_rows)?;
        let (_, dw, _) = by_dtype!(h.dtype(), T => chunk.backward::<T>(dlogp, None, false)?);
        Ok(dw)
    }

    pub fn vocab_size(&self) -> Result<usize> {
        self.weight.dim(0)
    }

    pub fn hidden_size(&self) -> Result<usize> {
        self.weight.dim(D::Minus1)
    }
}

thread_local! {
    static LARGEST_CHUNK: Cell<usize> = const { Cell::new(0) };
}

/// The most logits one chunk of the fused path has held on this thread since the last call,
/// in elements (then reset): what the memory tests bound by `chunk_rows × vocab`.
pub fn take_largest_logits_chunk() -> usize {
    LARGEST_CHUNK.with(|c| c.replace(0))
}

/// The constant operands of the fused path, detached.
struct Chunked {
    h: Tensor,
    /// W + e: the weight the logits are computed with.
    w: Tensor,
    bias: Option<Tensor>,
    targets: Vec<u32>,
    rows: usize,
}

impl Chunked {
    fn new(
        head: &OutputLayer,
        h: &Tensor,
        targets: &Tensor,
        e: Option<&Tensor>,
        rows: usize,
    ) -> Result<Self> {
        let (n, _) = h.dims2()?;
        let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if targets.len() != n {
            bail!(
                "output layer: {} targets for {n} hidden states",
                targets.len()
            );
        }
        let vocab = head.vocab_size()?;
        if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("output layer: target {t} outside the vocabulary of {vocab}");
        }
        Ok(Chunked {
            h: h.detach().contiguous()?,
            w: head.perturbed_weight(e)?.detach().contiguous()?,
            bias: head
                .bias
                .as_ref()
                .map(|b| b.detach().contiguous())
                .transpose()?,
            targets,
            rows: rows.max(1),
        })
    }

    fn vocab(&self) -> usize {
        self.w.dims()[0]
    }

    /// Row ranges `(start, len)` of the chunks.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let n = self.targets.len();
        (0..n)
            .step_by(self.rows)
            .map(move |s| (s, self.rows.min(n - s)))
    }

    /// Logits H[start..start+len] Wᵀ, bias not added (the row kernels add it as they read).
    fn logits(&self, start: usize, len: usize) -> Result<Tensor> {
        LARGEST_CHUNK.with(|c| c.set(c.get().max(len * self.vocab())));
        self.h
            .narrow(0, start, len)?
            .matmul(&self.w.t()?)?
            .contiguous()
    }

    /// Token log-probs and each token's log-sum-exp, both `[n]`.
    fn forward<T: Real>(&self) -> Result<(Tensor, Tensor)> {
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<T>()).transpose()?;
        let vocab = self.vocab();
        let mut out = Vec::with_capacity(self.targets.len());
        let mut lse = Vec::with_capacity(self.targets.len());
        for (start, len) in self.chunks() {
            let logits = self.logits(start, len)?;
            let (storage, layout) = logits.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("fused output layer: CPU only")
            };
            let x = slice::<T>(cpu, layout)?;
            // Per row: (max, ln Σ exp(z − max)) with z = logits + bias.
            let mut stats = vec![(T::zero(), T::zero()); len];
            par_blocks(&mut stats, 1, vocab, |first, block| {
                for (r, s) in block.iter_mut().enumerate() {
                    *s = row_stats(
                        &x[(first + r) * vocab..(first + r + 1) * vocab],
                        bias.as_deref(),
                    );
                }
            });
            for (r, (max, ln_sum)) in stats.into_iter().enumerate() {
                let t = self.targets[start + r] as usize;
                let z = x[r * vocab + t] + bias.as_ref().map_or(T::zero(), |b| b[t]);
                // The unfused path's rounding: (z_t − max) − ln Σ.
                out.push((z - max) - ln_sum);
                lse.push(max + ln_sum);
            }
        }
        let n = out.len();
        let dev = self.h.device();
        Ok((
            Tensor::from_vec(out, n, dev)?,
            Tensor::from_vec(lse, n, dev)?,
        ))
    }

    /// From ∂L/∂(token log-probs) `dlogp`: (∂L/∂H if `want_dh`, ∂L/∂W, ∂L/∂b if there is a
    /// bias), chunk by chunk with G = dlogp ⊙ (onehot − exp(z − lse)). `lse` from the forward,
    /// or recomputed from each chunk's logits.
    fn backward<T: Real>(
        &self,
        dlogp: &Tensor,
        lse: Option<&Tensor>,
        want_dh: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let dlogp = dlogp.to_dtype(self.h.dtype())?.to_vec1::<T>()?;
        let lse = lse.map(|l| l.to_vec1::<T>()).transpose()?;
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<T>()).transpose()?;
        let vocab = self.vocab();
        let dev = self.h.device();
        let mut dh = Vec::new();
        let mut dw: Option<Tensor> = None;
        let mut db = bias.as_ref().map(|_| vec![T::zero(); vocab]);
        for (start, len) in self.chunks() {
            let logits = self.logits(start, len)?;
            let mut g = {
                let (storage, layout) = logits.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    bail!("fused output layer: CPU only")
                };
                slice::<T>(cpu, layout)?.to_vec()
            };
            drop(logits);
            let partials = par_blocks(&mut g, vocab, vocab, |first, block| {
                let mut db = bias.as_ref().map(|_| vec![T::zero(); vocab]);
                for (r, row) in block.chunks_mut(vocab).enumerate() {
                    let i = start + first + r;
                    let lse = match &lse {
                        Some(l) => l[i],
                        None => {
                            let (max, ln_sum) = row_stats(row, bias.as_deref());
                            max + ln_sum
                        }
                    };
                    let coef = dlogp[i];
                    for (v, z) in row.iter_mut().enumerate() {
                        let b = bias.as_ref().map_or(T::zero(), |b| b[v]);
                        *z = T::zero() - coef * (*z + b - lse).exp();
                    }
                    row[self.targets[i] as usize] += coef;
                    if let Some(db) = &mut db {
                        for (d, &z) in db.iter_mut().zip(row.iter()) {
                            *d += z;
                        }
                    }
                }
                db
            });
            if let Some(db) = &mut db {
                for p in partials.into_iter().flatten() {
                    for (d, v) in db.iter_mut().zip(p) {
                        *d += v;
                    }
                }
            }
            let g = Tensor::from_vec(g, (len, vocab), dev)?;
            if want_dh {
                dh.push(g.matmul(&self.w)?);
            }
            let dw_chunk = g.t()?.matmul(&self.h.narrow(0, start, len)?)?;
            dw = Some(match dw {
                Some(acc) => (acc + dw_chunk)?,
                None => dw_chunk,
            });
        }
        let dw = match dw {
            Some(dw) => dw,
            None => self.w.zeros_like()?,
        };
        let dh = match want_dh {
            true if dh.is_empty() => Some(self.h.zeros_like()?),
            true => Some(Tensor::cat(&dh, 0)?),
            false => None,
        };
        let db = db.map(|db| Tensor::from_vec(db, vocab, dev)).transpose()?;
        Ok((dh, dw, db))
    }
}

/// (max, ln Σ exp(z − max)) of a row of logits, z = x + bias.
fn row_stats<T: Real>(x: &[T], bias: Option<&[T]>) -> (T, T) {
    let z = |v: usize| x[v] + bias.map_or(T::zero(), |b| b[v]);
    let mut max = z(0);
    for v in 1..x.len() {
        let zv = z(v);
        if zv > max {
            max = zv;
        }
    }
    let mut sum = T::zero();
    for v in 0..x.len() {
        sum += (z(v) - max).exp();
    }
    (max, sum.ln())
}

/// Token log-probs as one graph node over (h, weight[, bias]). The chunked forward is written
/// with tensor ops (candle's matmul), so it runs before the op is applied; `cpu_fwd` only hands
/// its result to the graph, and the backward recomputes the logits chunk by chunk.
struct TokenLogps {
    chunk: Chunked,
    lse: Tensor,
    out: Tensor,
}

impl TokenLogps {
    fn result(&self) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) => Ok((cpu.clone(), layout.shape().clone())),
            _ => bail!("fused output layer: CPU only; use OutputLayer::token_logps_unfused"),
        }
    }

    fn grads(&self, grad: &Tensor) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        by_dtype!(self.chunk.h.dtype(), T => self.chunk.backward::<T>(grad, Some(&self.lse), true))
    }
}

impl CustomOp2 for TokenLogps {
    fn name(&self) -> &'static str {
        "fused-token-logps"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.result()
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dw, _) = self.grads(grad)?;
        Ok((dh, Some(dw)))
    }
}

impl CustomOp3 for TokenLogps {
    fn name(&self) -> &'static str {
        "fused-token-logps"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.result()
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, dw, db) = self.grads(grad)?;
        Ok((dh, Some(dw), db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
        for manual in [
            head.sam_gradient_unfused(&h, &targets, &coef)?,
            head.sam_gradient_chunked(&h, &targets, &coef, 2)?,
        ] {
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
}
