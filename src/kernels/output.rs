//! The tiled output layer: the log-probs of the target tokens from hidden states and the output
//! weight and bias, never holding more than one [`Tile`] of the N×V logits.
//!
//! The forward streams a log-sum-exp over vocabulary slices and keeps only that (n floats), and
//! the backward (a custom op) recomputes each tile's logits, turns them into ∂L/∂logits and folds
//! them into ∂L/∂H, ∂L/∂W and ∂L/∂b at once. The trade is one more H Wᵀ matmul per backward for
//! memory that no longer grows with N×V. When all N×V logits fit in [`Tile::keep_bytes`] the
//! forward keeps its tiles and the backward reuses them instead, so a plain step costs the three
//! lm_head matmuls of the unfused path and logits-SAM two more, the paper's bound. Composition
//! twins: `OutputLayer::token_logps_unfused` and `sam_gradient_unfused` in `models/output.rs`.

use super::cpu::{by_dtype, par_blocks, row_max, row_sum, slice, vectorized, Real};
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use std::cell::Cell;
use std::sync::Mutex;

/// The shape of one tile of logits on the fused path, which computes `rows × vocab` of them at
/// a time, and how many bytes of logits it may keep from the forward for the backward.
#[derive(Clone, Copy, Debug)]
pub struct Tile {
    pub rows: usize,
    pub vocab: usize,
    /// Keep every tile of the forward (and skip the backward's recomputation) when all N×V
    /// logits fit in this many bytes; 0 always recomputes.
    pub keep_bytes: usize,
}

impl Tile {
    /// 1024 × 8192 f32 logits: 32 MiB, large enough that the matmuls run at full speed. Up to
    /// 256 MiB of logits are kept (1024 tokens of a 50k vocabulary: Pythia at 2 pairs × 256).
    pub const DEFAULT: Tile = Tile {
        rows: 1024,
        vocab: 8192,
        keep_bytes: 256 << 20,
    };
}

/// The log-probs of `targets` `[n]` (u32) under softmax(h wᵀ + bias), `h` `[n, hidden]`,
/// as one graph node over (h, weight[, bias]); `[n]` in h's dtype. Under logits-SAM the logits
/// use W + e, `perturbation` e (a constant) in the weight's dtype: this path is f32/f64 only,
/// where W + e keeps e (a bf16 weight takes the unfused path, which adds H eᵀ in f32). The node
/// hangs off `weight` itself: off W + e, candle's backward would add its gradient onto
/// zero-filled `[vocab, hidden]` tensors for both W and e.
pub fn token_logps(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    perturbation: Option<&Tensor>,
    tile: Tile,
) -> Result<Tensor> {
    let perturbed = match perturbation {
        Some(e) if e.dtype() != weight.dtype() => bail!(
            "fused output layer: the perturbation is {:?} but the weight {:?}",
            e.dtype(),
            weight.dtype()
        ),
        Some(e) => Some((weight.detach() + e)?),
        None => None,
    };
    let chunked = Chunked::new(h, perturbed.as_ref().unwrap_or(weight), bias, targets, tile)?;
    let (out, lse) = by_dtype!(h.dtype(), T => chunked.forward::<T>()?);
    let op = TokenLogps { chunked, lse, out };
    match bias {
        Some(b) => h.apply_op3(weight, b, op),
        None => h.apply_op2(weight, op),
    }
}

/// [`token_logps`] without a graph, for the SAM pre-pass, and the [`PrePass`] (log-sum-exps,
/// and the logits when they fit [`Tile::keep_bytes`]) that [`PrePass::sam_gradient`] reuses.
pub fn token_logps_for_sam(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    tile: Tile,
) -> Result<(Tensor, PrePass)> {
    let chunked = Chunked::new(h, weight, bias, targets, tile)?;
    let (out, lse) = by_dtype!(h.dtype(), T => chunked.forward::<T>()?);
    Ok((out, PrePass { chunked, lse }))
}

/// What the SAM pre-pass's forward leaves for line 3 of Algorithm 1.
pub struct PrePass {
    chunked: Chunked,
    lse: Tensor,
}

impl PrePass {
    /// ∂L/∂W from ∂L/∂(token log-probs) `dlogp` `[n]`, without a graph: g = Gᵀ H with
    /// G = ∂L/∂logits = dlogp ⊙ (onehot(target) − softmax) (Algorithm 1, line 3), tile by tile.
    pub fn sam_gradient(&self, dlogp: &Tensor) -> Result<Tensor> {
        let c = &self.chunked;
        let (_, dw, _) = by_dtype!(c.h.dtype(), T => c.backward::<T>(dlogp, &self.lse, false)?);
        Ok(dw)
    }
}

thread_local! {
    static LARGEST_CHUNK: Cell<usize> = const { Cell::new(0) };
}

/// The most logits the fused path has held at once on this thread since the last call, in
/// elements (then reset): what the memory tests bound by the tile's size.
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
    tile: Tile,
    /// Whether the forward keeps its tiles of logits (they fit `tile.keep_bytes`).
    keep: bool,
    /// The forward's tiles in [`Chunked::tiles`] order, when `keep`.
    kept: Mutex<Vec<Tensor>>,
}

/// Row and vocabulary ranges `(start, len)` of one tile of logits.
type Span = ((usize, usize), (usize, usize));

impl Chunked {
    /// The operands, `w` the weight the logits are computed with.
    fn new(
        h: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        targets: &Tensor,
        tile: Tile,
    ) -> Result<Self> {
        let (n, _) = h.dims2()?;
        let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if targets.len() != n {
            bail!(
                "output layer: {} targets for {n} hidden states",
                targets.len()
            );
        }
        let vocab = w.dim(0)?;
        let keep = n * vocab * h.dtype().size_in_bytes() <= tile.keep_bytes;
        if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("output layer: target {t} outside the vocabulary of {vocab}");
        }
        Ok(Chunked {
            h: h.detach().contiguous()?,
            w: w.detach().contiguous()?,
            bias: bias.map(|b| b.detach().contiguous()).transpose()?,
            targets,
            tile: Tile {
                rows: tile.rows.max(1),
                vocab: tile.vocab.max(1),
                ..tile
            },
            keep,
            kept: Mutex::new(Vec::new()),
        })
    }

    /// The tiles, vocabulary-major: each slice of W is packed for the matmul once per row
    /// block, and its rows of ∂L/∂W are finished before the next slice starts.
    fn tiles(&self) -> Vec<Span> {
        let ranges = |n: usize, step: usize| -> Vec<(usize, usize)> {
            (0..n).step_by(step).map(|s| (s, step.min(n - s))).collect()
        };
        let rows = ranges(self.targets.len(), self.tile.rows);
        let vocab = ranges(self.w.dims()[0], self.tile.vocab);
        vocab
            .iter()
            .flat_map(|&v| rows.iter().map(move |&r| (r, v)))
            .collect()
    }

    /// Tile `index`'s logits H[rows] W[vocab]ᵀ `[rows, vocab]`, bias not added (the row kernels
    /// add it as they read): kept from the forward, or computed (and kept, in the forward,
    /// when `keep`).
    fn logits(&self, index: usize, ((r0, rn), (v0, vn)): Span) -> Result<Tensor> {
        let mut kept = self.kept.lock().expect("kept logits lock");
        if let Some(t) = kept.get(index) {
            return Ok(t.clone());
        }
        let held: usize = kept.iter().map(Tensor::elem_count).sum();
        LARGEST_CHUNK.with(|c| c.set(c.get().max(held + rn * vn)));
        let logits = self
            .h
            .narrow(0, r0, rn)?
            .matmul(&self.w.narrow(0, v0, vn)?.t()?)?
            .contiguous()?;
        if self.keep && kept.len() == index {
            kept.push(logits.clone());
        }
        Ok(logits)
    }

    /// Token log-probs and each token's log-sum-exp, both `[n]`: a streaming log-sum-exp over
    /// the vocabulary tiles (running max m and Σ exp(z − m), rescaled when m grows).
    fn forward<T: Real>(&self) -> Result<(Tensor, Tensor)> {
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<T>()).transpose()?;
        let n = self.targets.len();
        let mut max = vec![T::from_f64(f64::NEG_INFINITY); n];
        let mut sum = vec![T::zero(); n];
        let mut target = vec![T::zero(); n];
        for (index, span) in self.tiles().into_iter().enumerate() {
            let ((r0, rn), (v0, vn)) = span;
            let logits = self.logits(index, span)?;
            let (storage, layout) = logits.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("fused output layer: CPU only")
            };
            let x = slice::<T>(cpu, layout)?;
            let b = bias.as_ref().map(|b| &b[v0..v0 + vn]);
            let mut stats: Vec<(T, T)> = (r0..r0 + rn).map(|i| (max[i], sum[i])).collect();
            par_blocks(&mut stats, 1, vn, |first, block| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (r, (m, s)) in block.iter_mut().enumerate() {
                            let (tile_max, tile_sum) =
                                row_stats(&x[(first + r) * vn..(first + r + 1) * vn], b);
                            let new_max = if tile_max > *m { tile_max } else { *m };
                            *s = *s * (*m - new_max).exp() + tile_sum * (tile_max - new_max).exp();
                            *m = new_max;
                        }
                    },
                )
            });
            for (r, (m, s)) in stats.into_iter().enumerate() {
                let i = r0 + r;
                (max[i], sum[i]) = (m, s);
                let t = self.targets[i] as usize;
                if (v0..v0 + vn).contains(&t) {
                    target[i] = x[r * vn + t - v0] + b.map_or(T::zero(), |b| b[t - v0]);
                }
            }
        }
        // The unfused path's rounding: (z_t − max) − ln Σ.
        let out: Vec<T> = (0..n).map(|i| (target[i] - max[i]) - sum[i].ln()).collect();
        let lse: Vec<T> = (0..n).map(|i| max[i] + sum[i].ln()).collect();
        let dev = self.h.device();
        Ok((
            Tensor::from_vec(out, n, dev)?,
            Tensor::from_vec(lse, n, dev)?,
        ))
    }

    /// From ∂L/∂(token log-probs) `dlogp` and the forward's log-sum-exp: (∂L/∂H if `want_dh`,
    /// ∂L/∂W, ∂L/∂b if there is a bias), tile by tile with G = dlogp ⊙ (onehot − exp(z − lse)).
    fn backward<T: Real>(
        &self,
        dlogp: &Tensor,
        lse: &Tensor,
        want_dh: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let dlogp = dlogp.to_dtype(self.h.dtype())?.to_vec1::<T>()?;
        let lse = lse.to_vec1::<T>()?;
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<T>()).transpose()?;
        let (n, hidden) = self.h.dims2()?;
        let vocab = self.w.dims()[0];
        let dev = self.h.device();
        // ∂L/∂H per block of rows, summed over the vocabulary slices.
        let mut dh: Vec<Option<Tensor>> = vec![None; n.div_ceil(self.tile.rows)];
        let mut dw_rows: Vec<Tensor> = Vec::new();
        let mut db = bias.as_ref().map(|_| vec![T::zero(); vocab]);
        for (index, span) in self.tiles().into_iter().enumerate() {
            let ((r0, rn), (v0, vn)) = span;
            let mut g = {
                let logits = self.logits(index, span)?;
                let (storage, layout) = logits.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    bail!("fused output layer: CPU only")
                };
                slice::<T>(cpu, layout)?.to_vec()
            };
            let b = bias.as_ref().map(|b| &b[v0..v0 + vn]);
            let partials = par_blocks(&mut g, vn, vn, |first, block| {
                vectorized(
                    #[inline(always)]
                    || {
                        let mut db = b.map(|_| vec![T::zero(); vn]);
                        for (r, row) in block.chunks_mut(vn).enumerate() {
                            let i = r0 + first + r;
                            let (coef, lse) = (dlogp[i], lse[i]);
                            match b {
                                Some(b) => {
                                    for (z, &b) in row.iter_mut().zip(b) {
                                        *z = T::zero() - coef * (*z + b - lse).exp()
                                    }
                                }
                                None => {
                                    for z in row.iter_mut() {
                                        *z = T::zero() - coef * (*z - lse).exp()
                                    }
                                }
                            }
                            let t = self.targets[i] as usize;
                            if (v0..v0 + vn).contains(&t) {
                                row[t - v0] += coef;
                            }
                            if let Some(db) = &mut db {
                                for (d, &z) in db.iter_mut().zip(row.iter()) {
                                    *d += z;
                                }
                            }
                        }
                        db
                    },
                )
            });
            if let Some(db) = &mut db {
                for p in partials.into_iter().flatten() {
                    db[v0..v0 + vn].iter_mut().zip(p).for_each(|(d, v)| *d += v);
                }
            }
            let g = Tensor::from_vec(g, (rn, vn), dev)?;
            if want_dh {
                let part = g.matmul(&self.w.narrow(0, v0, vn)?)?;
                let block = &mut dh[r0 / self.tile.rows];
                *block = Some(match block.take() {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
            let part = g.t()?.matmul(&self.h.narrow(0, r0, rn)?)?;
            // Tiles are vocabulary-major: a new slice starts a new block of ∂L/∂W's rows.
            match dw_rows.last_mut() {
                Some(last) if r0 > 0 => *last = (&*last + part)?,
                _ => dw_rows.push(part),
            }
        }
        let dw = match dw_rows.is_empty() {
            true => self.w.zeros_like()?,
            false => Tensor::cat(&dw_rows, 0)?,
        };
        let dh = match want_dh {
            true if n == 0 => Some(Tensor::zeros((0, hidden), self.h.dtype(), dev)?),
            true => Some(Tensor::cat(
                &dh.into_iter().flatten().collect::<Vec<_>>(),
                0,
            )?),
            false => None,
        };
        let db = db.map(|db| Tensor::from_vec(db, vocab, dev)).transpose()?;
        Ok((dh, dw, db))
    }
}

/// (max, Σ exp(z − max)) of a row of logits, z = x + bias.
#[inline(always)]
fn row_stats<T: Real>(x: &[T], bias: Option<&[T]>) -> (T, T) {
    let stats = |z: &[T]| {
        let max = row_max(z);
        (max, row_sum(z, |v| (v - max).exp()))
    };
    match bias {
        Some(b) => stats(&x.iter().zip(b).map(|(&x, &b)| x + b).collect::<Vec<T>>()),
        None => stats(x),
    }
}

/// Token log-probs as one graph node over (h, weight[, bias]). The chunked forward is written
/// with tensor ops (candle's matmul), so it runs before the op is applied; `cpu_fwd` only hands
/// its result to the graph, and the backward recomputes the logits chunk by chunk.
struct TokenLogps {
    chunked: Chunked,
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
        by_dtype!(self.chunked.h.dtype(), T => self.chunked.backward::<T>(grad, &self.lse, true))
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
