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
//!
//! On CUDA (the `gpu` module) each tile is a cuBLASLt GEMM into f32 (bf16 or f16 operands on the
//! tensor cores, f32 accumulation) followed by one row kernel of `cuda/output.cu`: the forward
//! folds the tile into the running log-sum-exp and picks the target's logit, the backward turns
//! it into G = ∂L/∂logits in the GEMMs' input type, and two GEMMs fold G into ∂L/∂H and ∂L/∂W
//! (f32 accumulators, rounded once). Where e cannot be added to the weight without rounding
//! (a bf16 weight, TF32), the perturbed logits are H Wᵀ + H eᵀ, the first product taken from the
//! SAM pre-pass's kept logits, so that a logits-SAM step still runs five lm_head-sized GEMMs.

use super::cpu::{by_dtype, par_blocks, row_max, row_sum, slice, vectorized, Real};
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
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

    /// On CUDA: 8192 × 8192 f32 logits (256 MiB) per GEMM, and up to 2 GiB kept (4 pairs ×
    /// 1024 tokens of a 50k vocabulary: Pythia-2.8B's micro-batch, Mistral-7B's 32k at 8k tokens).
    pub const CUDA: Tile = Tile {
        rows: 8192,
        vocab: 8192,
        keep_bytes: 2 << 30,
    };

    /// The default tile of a device.
    pub fn for_device(device: &Device) -> Tile {
        match device {
            Device::Cuda(_) => Tile::CUDA,
            _ => Tile::DEFAULT,
        }
    }
}

/// Whether e can be added to the weight itself: where the matmul reads the weight at e's
/// precision (f32, f64), W + e keeps e as exactly as e's own dtype does. A bf16 weight with an
/// f32 e does not, nor do f32 matmuls on TF32 tensor cores (`training.tf32`), which round their
/// inputs to a 10-bit mantissa: there H eᵀ keeps e to that relative precision, W + e not at all.
pub fn folds(weight: &Tensor, e: &Tensor) -> bool {
    // Asked only on CUDA: candle's CPU-only builds answer true.
    let tf32 = e.dtype() == DType::F32
        && weight.device().is_cuda()
        && candle_core::cuda::gemm_reduced_precision_f32();
    e.dtype() == weight.dtype() && !tf32
}

/// The log-probs of `targets` `[n]` (u32) under softmax(h wᵀ + bias), `h` `[n, hidden]`,
/// as one graph node over (h, weight[, bias]); `[n]`, f32 (f64 for f64). Under logits-SAM the
/// logits use W + e, `perturbation` e a constant. On the CPU e is in the weight's dtype and
/// added to it (f32/f64, where W + e keeps e). On CUDA e is f32 and added to an f32 weight
/// (without TF32); else the logits are H Wᵀ + H eᵀ, with H Wᵀ from `pre` (the SAM pre-pass at
/// the same h, weight and targets) when it kept its logits, and ∂L/∂H is G W: its G e term is
/// about ‖e‖/‖W‖ of it (4e-7 at Pythia-2.8B's ρ), below a 16-bit ∂L/∂H's resolution.
/// The node hangs off `weight` itself: off W + e, candle's backward would add its gradient onto
/// zero-filled `[vocab, hidden]` tensors for both W and e.
pub fn token_logps(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    perturbation: Option<&Tensor>,
    pre: Option<PrePass>,
    tile: Tile,
) -> Result<Tensor> {
    let (out, pass) = match h.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let pre = pre.and_then(|p| match p.0 {
                Pass::Cuda(pass) => Some(pass),
                Pass::Cpu(..) => None,
            });
            let (out, pass) =
                gpu::Pass::forward(h, weight, bias, targets, perturbation, pre, tile)?;
            (out, Pass::Cuda(pass))
        }
        _ => {
            drop(pre);
            let perturbed = match perturbation {
                Some(e) if !folds(weight, e) => bail!(
                    "fused output layer: the perturbation is {:?} but the weight {:?}",
                    e.dtype(),
                    weight.dtype()
                ),
                Some(e) => Some((weight.detach() + e)?),
                None => None,
            };
            let w = perturbed.as_ref().unwrap_or(weight);
            let chunked = Chunked::new(h, w, bias, targets, tile)?;
            let (out, lse) = by_dtype!(h.dtype(), T => chunked.forward::<T>()?);
            (out, Pass::Cpu(chunked, lse))
        }
    };
    let op = TokenLogps { pass, out };
    match bias {
        Some(b) => h.apply_op3(weight, b, op),
        None => h.apply_op2(weight, op),
    }
}

/// [`token_logps`] without a graph or a perturbation, for the SAM pre-pass, and the [`PrePass`]
/// (log-sum-exps, and the logits when they fit [`Tile::keep_bytes`]) that
/// [`PrePass::sam_gradient`] and the perturbed pass reuse.
pub fn token_logps_for_sam(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    tile: Tile,
) -> Result<(Tensor, PrePass)> {
    let (out, pass) = match h.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (out, pass) = gpu::Pass::forward(h, weight, bias, targets, None, None, tile)?;
            (out, Pass::Cuda(pass))
        }
        _ => {
            let chunked = Chunked::new(h, weight, bias, targets, tile)?;
            let (out, lse) = by_dtype!(h.dtype(), T => chunked.forward::<T>()?);
            (out, Pass::Cpu(chunked, lse))
        }
    };
    Ok((out, PrePass(pass)))
}

/// What the SAM pre-pass's forward leaves for line 3 of Algorithm 1 (and, on CUDA, for line 5).
pub struct PrePass(Pass);

impl PrePass {
    /// ∂L/∂W from ∂L/∂(token log-probs) `dlogp` `[n]`, without a graph: g = Gᵀ H with
    /// G = ∂L/∂logits = dlogp ⊙ (onehot(target) − softmax) (Algorithm 1, line 3), tile by tile;
    /// f32 on CUDA whatever the weight's dtype.
    pub fn sam_gradient(&self, dlogp: &Tensor) -> Result<Tensor> {
        let (_, dw, _) = self.0.backward(dlogp, false, true)?;
        Ok(dw)
    }
}

/// One forward's operands and what its backward needs, on the device they are on.
enum Pass {
    /// The operands and the forward's log-sum-exp.
    Cpu(Chunked, Tensor),
    #[cfg(feature = "cuda")]
    Cuda(gpu::Pass),
}

impl Pass {
    /// (∂L/∂H if `want_dh`, ∂L/∂W, ∂L/∂b if there is a bias) from ∂L/∂(token log-probs), in the
    /// operands' dtypes (∂L/∂W in f32 on CUDA when `f32_dw`).
    fn backward(
        &self,
        dlogp: &Tensor,
        want_dh: bool,
        f32_dw: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        match self {
            Pass::Cpu(c, lse) => {
                let _ = f32_dw;
                by_dtype!(c.h.dtype(), T => c.backward::<T>(dlogp, lse, want_dh))
            }
            #[cfg(feature = "cuda")]
            Pass::Cuda(p) => p.backward(dlogp, want_dh, f32_dw),
        }
    }
}

thread_local! {
    static LARGEST_CHUNK: Cell<usize> = const { Cell::new(0) };
    static GEMM_PRODUCTS: Cell<usize> = const { Cell::new(0) };
}

/// The most logits the fused path has held at once on this thread since the last call, in
/// elements (then reset): what the memory tests bound by the tile's size.
pub fn take_largest_logits_chunk() -> usize {
    LARGEST_CHUNK.with(|c| c.replace(0))
}

/// Records that `held` logits are alive while a tile of `tile` more is computed.
fn note_logits(held: usize, tile: usize) {
    LARGEST_CHUNK.with(|c| c.set(c.get().max(held + tile)));
}

/// Σ rows × vocab over the tiles of every lm_head-sized GEMM the fused path has run on this
/// thread since the last call (then reset): divided by n × vocab, the number of lm_head GEMMs,
/// which the paper's bound for a logits-SAM step (five) is about.
pub fn take_gemm_products() -> usize {
    GEMM_PRODUCTS.with(|c| c.replace(0))
}

/// Counts one tile GEMM of `rows × vocab` products (see [`take_gemm_products`]).
fn note_gemm(rows: usize, vocab: usize) {
    GEMM_PRODUCTS.with(|c| c.set(c.get() + rows * vocab));
}

/// The constant operands of the fused path, detached.
struct Chunked {
    h: Tensor,
    /// W + e: the weight the logits are computed with.
    w: Tensor,
    bias: Option<Tensor>,
    targets: Vec<u32>,
    tile: Tile,
    kept: KeptTiles,
}

/// The forward's tiles of logits in [`tiles`] order, kept for the backward (and the SAM pass
/// that follows) when `keep`: when they fit `tile.keep_bytes`.
struct KeptTiles {
    keep: bool,
    tiles: Mutex<Vec<Tensor>>,
}

impl KeptTiles {
    fn new(keep: bool) -> KeptTiles {
        KeptTiles {
            keep,
            tiles: Mutex::new(Vec::new()),
        }
    }

    /// Tile `index`, `elems` logits: kept, or `compute`d (and kept when `keep`, as the forward
    /// computes them in order).
    fn get_or(
        &self,
        index: usize,
        elems: usize,
        compute: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut kept = self.tiles.lock().expect("kept logits lock");
        if let Some(t) = kept.get(index) {
            return Ok(t.clone());
        }
        note_logits(kept.iter().map(Tensor::elem_count).sum(), elems);
        let logits = compute()?;
        if self.keep && kept.len() == index {
            kept.push(logits.clone());
        }
        Ok(logits)
    }
}

/// Row and vocabulary ranges `(start, len)` of one tile of logits.
type Span = ((usize, usize), (usize, usize));

/// The tiles of `n × vocab` logits, vocabulary-major: each slice of W is read (packed for the
/// matmul) once per row block, and its rows of ∂L/∂W are finished before the next slice starts.
fn tiles(n: usize, vocab: usize, tile: Tile) -> Vec<Span> {
    let ranges = |n: usize, step: usize| -> Vec<(usize, usize)> {
        (0..n).step_by(step).map(|s| (s, step.min(n - s))).collect()
    };
    let rows = ranges(n, tile.rows.max(1));
    let vocab = ranges(vocab, tile.vocab.max(1));
    vocab
        .iter()
        .flat_map(|&v| rows.iter().map(move |&r| (r, v)))
        .collect()
}

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
            kept: KeptTiles::new(keep),
        })
    }

    fn tiles(&self) -> Vec<Span> {
        tiles(self.targets.len(), self.w.dims()[0], self.tile)
    }

    /// Tile `index`'s logits H[rows] W[vocab]ᵀ `[rows, vocab]`, bias not added (the row kernels
    /// add it as they read): kept from the forward, or computed (and kept, in the forward,
    /// when `keep`).
    fn logits(&self, index: usize, ((r0, rn), (v0, vn)): Span) -> Result<Tensor> {
        self.kept.get_or(index, rn * vn, || {
            note_gemm(rn, vn);
            self.h
                .narrow(0, r0, rn)?
                .matmul(&self.w.narrow(0, v0, vn)?.t()?)?
                .contiguous()
        })
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
                note_gemm(rn, vn);
                let part = g.matmul(&self.w.narrow(0, v0, vn)?)?;
                let block = &mut dh[r0 / self.tile.rows];
                *block = Some(match block.take() {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
            note_gemm(rn, vn);
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

/// One tile's lm_head GEMMs as cuBLASLt sees them (column-major, row-major buffers read
/// transposed), each with the offsets in elements of its operands: H `[n, hidden]`, W
/// `[vocab, hidden]`, ∂L/∂H and ∂L/∂W row-major and whole; the tile's logits Z and ∂L/∂logits G
/// `[rows, vocab]`, buffers of their own.
#[cfg(any(feature = "cuda", test))]
use super::gemm::Gemm;

#[cfg(any(feature = "cuda", test))]
struct TileGemms {
    hidden: usize,
    span: Span,
}

#[cfg(any(feature = "cuda", test))]
impl TileGemms {
    /// Z = H[r0..] W[v0..]ᵀ (also H e[v0..]ᵀ): column-major Zᵀ = op(W) · Hᵀ; (GEMM, offset of
    /// W (A), offset of H (B)).
    fn logits(&self) -> (Gemm, usize, usize) {
        let ((r0, rn), (v0, vn)) = self.span;
        let h = self.hidden;
        let g = Gemm {
            transa: true,
            transb: false,
            m: vn,
            n: rn,
            k: h,
            lda: h,
            ldb: h,
            ldd: vn,
        };
        (g, v0 * h, r0 * h)
    }

    /// ∂L/∂H[r0..] (+)= G W[v0..]: column-major ∂L/∂Hᵀ = W[v0..]ᵀ · Gᵀ; (GEMM, offset of W (A),
    /// offset of ∂L/∂H (D)).
    fn dh(&self) -> (Gemm, usize, usize) {
        let ((r0, rn), (v0, vn)) = self.span;
        let h = self.hidden;
        let g = Gemm {
            transa: false,
            transb: false,
            m: h,
            n: rn,
            k: vn,
            lda: h,
            ldb: vn,
            ldd: h,
        };
        (g, v0 * h, r0 * h)
    }

    /// ∂L/∂W[v0..] (+)= Gᵀ H[r0..]: column-major ∂L/∂W[v0..]ᵀ = H[r0..]ᵀ · G; (GEMM, offset of H
    /// (A), offset of ∂L/∂W (D)).
    fn dw(&self) -> (Gemm, usize, usize) {
        let ((r0, rn), (v0, vn)) = self.span;
        let h = self.hidden;
        let g = Gemm {
            transa: false,
            transb: true,
            m: h,
            n: vn,
            k: rn,
            lda: h,
            ldb: vn,
            ldd: h,
        };
        (g, r0 * h, v0 * h)
    }
}

/// Token log-probs as one graph node over (h, weight[, bias]). The tiled forward runs before
/// the op is applied (it is written with tensor ops and launches of its own); `cpu_fwd` and
/// `cuda_fwd` only hand its result to the graph, and the backward reuses or recomputes the
/// logits tile by tile.
struct TokenLogps {
    pass: Pass,
    out: Tensor,
}

impl TokenLogps {
    fn result(&self) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) => Ok((cpu.clone(), layout.shape().clone())),
            _ => bail!("fused output layer: the forward ran on another device"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_result(&self) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (storage, layout) = self.out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => bail!("fused output layer: the forward ran on another device"),
        }
    }

    fn grads(&self, grad: &Tensor) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        self.pass.backward(grad, true, false)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda_result()
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda_result()
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

/// The CUDA side: per tile a cuBLASLt GEMM into f32 logits and one row kernel; the backward's
/// ∂L/∂H and ∂L/∂W accumulate over tiles in f32 (cuBLASLt's β = 1) and are rounded once.
#[cfg(feature = "cuda")]
mod gpu {
    use super::{note_gemm, tiles, KeptTiles, Span, Tile, TileGemms};
    use crate::kernels::cuda::{self, Arg, Held, DENSE, OUTPUT};
    use candle_core::{bail, CudaDevice, DType, Result, Tensor};

    /// One forward's operands (detached, contiguous, on one device) and its log-sum-exps.
    pub struct Pass {
        dev: CudaDevice,
        h: Tensor,
        /// The weight the logits are computed with: W, or W + e where e folds into it.
        w: Tensor,
        /// e where it is added apart (H eᵀ), in h's dtype: a bf16 e keeps e to bf16's relative
        /// precision, where W + e in bf16 keeps none of it.
        e: Option<Tensor>,
        bias: Option<Tensor>,
        targets: Tensor,
        tile: Tile,
        /// The forward's f32 tiles of logits, bias not added.
        kept: KeptTiles,
        lse: Tensor,
    }

    /// An uninitialised f32 tensor (the kernel or GEMM writing it fills all of it).
    fn f32s(dev: &CudaDevice, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(cuda::tensor(cuda::alloc(dev, DType::F32, n)?, shape))
    }

    /// The address of element `offset` of a `dtype` buffer at `base`.
    fn at(base: u64, offset: usize, dtype: DType) -> u64 {
        base + (offset * dtype.size_in_bytes()) as u64
    }

    impl Pass {
        /// The forward: token log-probs `[n]` (f32) and the pass. See `super::token_logps` for
        /// `perturbation` and `pre`.
        pub fn forward(
            h: &Tensor,
            weight: &Tensor,
            bias: Option<&Tensor>,
            targets: &Tensor,
            perturbation: Option<&Tensor>,
            pre: Option<Pass>,
            tile: Tile,
        ) -> Result<(Tensor, Pass)> {
            let dev = cuda::device_of(h)?;
            let (n, hidden) = h.dims2()?;
            let (vocab, w_hidden) = weight.dims2()?;
            if w_hidden != hidden {
                bail!("output layer: hidden states of {hidden} features, a weight of {w_hidden}");
            }
            let targets = targets.to_dtype(DType::U32)?.contiguous()?;
            if targets.dims1()? != n {
                bail!(
                    "output layer: {} targets for {n} hidden states",
                    targets.dims1()?
                );
            }
            if n > 0 {
                let t = targets.max(0)?.to_scalar::<u32>()?;
                if t as usize >= vocab {
                    bail!("output layer: target {t} outside the vocabulary of {vocab}");
                }
            }
            let (w, e) = match perturbation {
                Some(e) if super::folds(weight, e) => ((weight.detach() + e)?, None),
                Some(e) => (weight.detach(), Some(e.to_dtype(h.dtype())?.contiguous()?)),
                None => (weight.detach(), None),
            };
            let tile = Tile {
                rows: tile.rows.max(1),
                vocab: tile.vocab.max(1),
                ..tile
            };
            // The pre-pass's logits H Wᵀ, which the perturbed logits start from when e is apart.
            // (dropped here, kept logits and all, where it is of no use)
            let base = match pre.filter(|pre| {
                e.is_some()
                    && pre.kept.keep
                    && pre.e.is_none()
                    && (pre.tile.rows, pre.tile.vocab) == (tile.rows, tile.vocab)
                    && pre.h.dims() == h.dims()
                    && pre.w.dims() == weight.dims()
            }) {
                Some(pre) => pre.kept.tiles.into_inner().expect("kept logits lock"),
                None => Vec::new(),
            };
            let pass = Pass {
                lse: f32s(&dev, &[n])?,
                dev,
                h: h.detach().contiguous()?,
                w: w.contiguous()?,
                e,
                bias: bias.map(|b| b.detach().contiguous()).transpose()?,
                targets,
                tile,
                kept: KeptTiles::new(n * vocab * 4 <= tile.keep_bytes),
            };
            let out = pass.run_forward(base)?;
            Ok((out, pass))
        }

        fn tiles(&self) -> Vec<Span> {
            tiles(self.h.dims()[0], self.w.dims()[0], self.tile)
        }

        /// Tile `index`'s f32 logits `[rows, vocab]`, bias not added: kept, or by cuBLASLt
        /// H W[vocab]ᵀ (+ H e[vocab]ᵀ), the first term `base` (the pre-pass's tile) if given.
        fn logits(&self, index: usize, span: Span, base: Option<Tensor>) -> Result<Tensor> {
            let ((_, rn), (_, vn)) = span;
            self.kept.get_or(index, rn * vn, || {
                let hidden = self.h.dims()[1];
                let dtype = self.h.dtype();
                let from_base = base.is_some();
                let z = match base {
                    Some(z) => z,
                    None => f32s(&self.dev, &[rn, vn])?,
                };
                let mut products: Vec<&Tensor> = Vec::new();
                if !from_base {
                    products.push(&self.w);
                }
                products.extend(self.e.as_ref());
                let (gemm, b_at, h_at) = TileGemms { hidden, span }.logits();
                {
                    let stream = self.dev.cuda_stream();
                    let (hh, zh) = (Held::new(&self.h)?, Held::new(&z)?);
                    let ((hp, _h), (zp, _z)) = (hh.ptr(&stream)?, zh.ptr(&stream)?);
                    for (i, b) in products.into_iter().enumerate() {
                        let bh = Held::new(b)?;
                        let (bp, _b) = bh.ptr(&stream)?;
                        note_gemm(rn, vn);
                        cuda::gemm_into(
                            &self.dev,
                            (dtype, DType::F32),
                            gemm,
                            (at(bp, b_at, dtype), at(hp, h_at, dtype), zp),
                            from_base || i > 0,
                        )?;
                    }
                }
                Ok(z)
            })
        }

        /// Token log-probs over the tiles, and the log-sum-exps into `lse` (the running max and
        /// sum per row in f32 buffers, rescaled by the row kernel as the max grows), starting
        /// each tile's logits from `base`'s tiles when given.
        fn run_forward(&self, base: Vec<Tensor>) -> Result<Tensor> {
            let n = self.h.dims()[0];
            let vocab = self.w.dims()[0];
            let dtype = self.h.dtype();
            let [max, sum, target, out] = [(); 4].map(|()| f32s(&self.dev, &[n]));
            let (max, sum, target, out, lse) = (max?, sum?, target?, out?, &self.lse);
            let mut base = base.into_iter();
            let name = cuda::typed("logps_fwd", dtype)?;
            for (index, span) in self.tiles().into_iter().enumerate() {
                let ((r0, rn), (v0, vn)) = span;
                let z = self.logits(index, span, base.next())?;
                let stream = self.dev.cuda_stream();
                let held = [&z, &self.targets, &max, &sum, &target, &out, lse]
                    .map(Held::new)
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?;
                let ptrs = held
                    .iter()
                    .map(|h| h.ptr(&stream))
                    .collect::<Result<Vec<_>>>()?;
                let bias = self.bias.as_ref().map(Held::new).transpose()?;
                let bias_ptr = bias.as_ref().map(|b| b.ptr(&stream)).transpose()?;
                let row = |i: usize| Arg::Ptr(at(ptrs[i].0, r0, DType::F32));
                let args = [
                    Arg::Ptr(ptrs[0].0),
                    Arg::Ptr(bias_ptr.as_ref().map_or(0, |(p, _)| at(*p, v0, dtype))),
                    Arg::Ptr(at(ptrs[1].0, r0, DType::U32)),
                    row(2),
                    row(3),
                    row(4),
                    row(5),
                    row(6),
                    Arg::I32(vn as i32),
                    Arg::I32(v0 as i32),
                    Arg::I32((v0 == 0) as i32),
                    Arg::I32((v0 + vn == vocab) as i32),
                ];
                // SAFETY: z holds rn × vn f32; the bias vn values from v0; targets and the five
                // row buffers rn values from r0.
                unsafe { cuda::run(&self.dev, &OUTPUT, &name, cuda::rows_config(rn, vn), &args)? };
            }
            Ok(out)
        }

        /// (∂L/∂H if `want_dh`, ∂L/∂W, ∂L/∂b if there is a bias) from ∂L/∂(token log-probs)
        /// `dlogp`, tile by tile: G = dlogp ⊙ (onehot − exp(z + b − lse)) in h's dtype, then
        /// ∂L/∂H += G W[vocab] and ∂L/∂W[vocab] += Gᵀ H in f32. ∂L/∂W stays f32 if `f32_dw`.
        pub fn backward(
            &self,
            dlogp: &Tensor,
            want_dh: bool,
            f32_dw: bool,
        ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
            let (n, hidden) = self.h.dims2()?;
            let vocab = self.w.dims()[0];
            let dtype = self.h.dtype();
            let dev = self.h.device();
            let dlogp = dlogp.to_dtype(DType::F32)?.contiguous()?;
            // Every element is written by the first tile of its rows (β = 0), if there is one.
            let dw = match n {
                0 => Tensor::zeros((vocab, hidden), DType::F32, dev)?,
                _ => f32s(&self.dev, &[vocab, hidden])?,
            };
            let dh = match (want_dh, vocab) {
                (false, _) => None,
                (true, 0) => Some(Tensor::zeros((n, hidden), DType::F32, dev)?),
                (true, _) => Some(f32s(&self.dev, &[n, hidden])?),
            };
            let db = match &self.bias {
                Some(_) => Some(Tensor::zeros(vocab, DType::F32, dev)?),
                None => None,
            };
            let bwd = cuda::typed("logps_bwd", dtype)?;
            let col_sum = cuda::typed("col_sum_add", dtype)?;
            for (index, span) in self.tiles().into_iter().enumerate() {
                let ((r0, rn), (v0, vn)) = span;
                let z = self.logits(index, span, None)?;
                let g = cuda::tensor(cuda::alloc(&self.dev, dtype, rn * vn)?, (rn, vn));
                let stream = self.dev.cuda_stream();
                let held = [&z, &self.targets, &dlogp, &self.lse, &g, &self.h, &self.w]
                    .map(Held::new)
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?;
                let p = held
                    .iter()
                    .map(|h| h.ptr(&stream))
                    .collect::<Result<Vec<_>>>()?;
                let (zp, tp, dlp, lsep, gp, hp, wp) =
                    (p[0].0, p[1].0, p[2].0, p[3].0, p[4].0, p[5].0, p[6].0);
                let bias = self.bias.as_ref().map(Held::new).transpose()?;
                let bias_ptr = bias.as_ref().map(|b| b.ptr(&stream)).transpose()?;
                let args = [
                    Arg::Ptr(zp),
                    Arg::Ptr(bias_ptr.as_ref().map_or(0, |(p, _)| at(*p, v0, dtype))),
                    Arg::Ptr(at(tp, r0, DType::U32)),
                    Arg::Ptr(at(dlp, r0, DType::F32)),
                    Arg::Ptr(at(lsep, r0, DType::F32)),
                    Arg::Ptr(gp),
                    Arg::I32(vn as i32),
                    Arg::I32(v0 as i32),
                ];
                // SAFETY: z and g hold rn × vn values; the bias vn from v0; targets, dlogp and
                // lse rn from r0.
                unsafe { cuda::run(&self.dev, &OUTPUT, &bwd, cuda::rows_config(rn, vn), &args)? };
                if let Some(db) = &db {
                    let dbh = Held::new(db)?;
                    let (dbp, _db) = dbh.ptr(&stream)?;
                    let args = [
                        Arg::Ptr(gp),
                        Arg::Ptr(at(dbp, v0, DType::F32)),
                        Arg::I32(rn as i32),
                        Arg::I32(vn as i32),
                    ];
                    // SAFETY: g holds rn × vn values, db vocab from 0.
                    unsafe {
                        cuda::run(&self.dev, &DENSE, &col_sum, cuda::columns_config(vn), &args)?
                    };
                }
                let gemms = TileGemms { hidden, span };
                if let Some(dh) = &dh {
                    let dhh = Held::new(dh)?;
                    let (dhp, _dh) = dhh.ptr(&stream)?;
                    let (gemm, w_at, dh_at) = gemms.dh();
                    note_gemm(rn, vn);
                    let ops = (at(wp, w_at, dtype), gp, at(dhp, dh_at, DType::F32));
                    cuda::gemm_into(&self.dev, (dtype, DType::F32), gemm, ops, v0 > 0)?;
                }
                let dwh = Held::new(&dw)?;
                let (dwp, _dw) = dwh.ptr(&stream)?;
                let (gemm, h_at, dw_at) = gemms.dw();
                note_gemm(rn, vn);
                let ops = (at(hp, h_at, dtype), gp, at(dwp, dw_at, DType::F32));
                cuda::gemm_into(&self.dev, (dtype, DType::F32), gemm, ops, r0 > 0)?;
            }
            let dw = match f32_dw {
                true => dw,
                false => dw.to_dtype(self.w.dtype())?,
            };
            let dh = dh.map(|dh| dh.to_dtype(dtype)).transpose()?;
            let db = match (&db, &self.bias) {
                (Some(db), Some(b)) => Some(db.to_dtype(b.dtype())?),
                _ => None,
            };
            Ok((dh, dw, db))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::reference;

    /// The CUDA path's GEMM descriptors and offsets, run through what cuBLASLt computes for
    /// them, give H Wᵀ, G W and Gᵀ H tile by tile, accumulated over tiles as the backward does:
    /// the layouts the host cannot otherwise check without a GPU.
    #[test]
    fn tile_gemms_compute_the_row_major_products() {
        let (n, vocab, hidden) = (7, 11, 5);
        let value = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
        let h: Vec<f32> = (0..n * hidden).map(value).collect();
        let w: Vec<f32> = (0..vocab * hidden).map(|i| value(i + 5)).collect();
        let g: Vec<f32> = (0..n * vocab).map(|i| value(i + 9)).collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let (mut dh, mut dw) = (vec![f32::NAN; n * hidden], vec![f32::NAN; vocab * hidden]);
        let tile = Tile {
            rows: 3,
            vocab: 4,
            keep_bytes: 0,
        };
        for span in tiles(n, vocab, tile) {
            let ((r0, rn), (v0, vn)) = span;
            let gemms = TileGemms { hidden, span };
            let mut z = vec![f32::NAN; rn * vn];
            let (lg, w_at, h_at) = gemms.logits();
            reference(&lg, &w[w_at..], &h[h_at..], &mut z, false);
            // G of this tile, a buffer of its own as on the device.
            let gt: Vec<f32> = (0..rn * vn)
                .map(|i| g[(r0 + i / vn) * vocab + v0 + i % vn])
                .collect();
            for r in 0..rn {
                for v in 0..vn {
                    let want = dot(
                        &h[(r0 + r) * hidden..][..hidden],
                        &w[(v0 + v) * hidden..][..hidden],
                    );
                    assert!((z[r * vn + v] - want).abs() < 1e-5, "logits {r0} {v0}");
                }
            }
            let (dg, w_at, dh_at) = gemms.dh();
            reference(&dg, &w[w_at..], &gt, &mut dh[dh_at..], v0 > 0);
            let (wg, h_at, dw_at) = gemms.dw();
            reference(&wg, &h[h_at..], &gt, &mut dw[dw_at..], r0 > 0);
        }
        for r in 0..n {
            for k in 0..hidden {
                let want: f32 = (0..vocab)
                    .map(|v| g[r * vocab + v] * w[v * hidden + k])
                    .sum();
                assert!((dh[r * hidden + k] - want).abs() < 1e-4, "∂L/∂H {r} {k}");
            }
        }
        for v in 0..vocab {
            for k in 0..hidden {
                let want: f32 = (0..n).map(|r| g[r * vocab + v] * h[r * hidden + k]).sum();
                assert!((dw[v * hidden + k] - want).abs() < 1e-4, "∂L/∂W {v} {k}");
            }
        }
    }
}
