//! The attention core as fused CPU ops with a backward, one rayon task per (batch, head):
//! [`attention`] over q, k and v given apart, and [`packed_attention`], which reads the heads
//! straight out of a fused q/k/v projection (GPT-NeoX's `query_key_value`, GPT-2's `c_attn`),
//! applies the rotary embedding, and writes the heads merged, `[b, t, heads · head_dim]`.
//!
//! candle's batched matmul would run the heads one after the other, each small gemm split over
//! the threads, and the composition is a graph node per step (scores, scale, mask, softmax, · v).
//! Splitting a fused projection adds a reshape, a transpose, three narrows, three copies and two
//! rotaries, and candle's backward pads each of their gradients with zeros and sums them. Here
//! a layer's whole attention is one node, whose backward writes the projection's gradient once.
//! The backward recomputes the probabilities per head (as FlashAttention does) instead of
//! keeping `[b, h, t, s]` alive. Composition twins: `models::ops::attention_composed` and
//! `packed_attention_composed`.

use super::cpu::{by_dtype, gemm_into, slice, values, vectorized, with_values, Operand, Real};
use super::rotary::RopeTables;
use super::softmax::{softmax_bwd_row, softmax_row};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D,
};
use rayon::prelude::*;

/// How a fused q/k/v projection lays out its `3 · heads · head_dim` features per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvPacking {
    /// `[q | k | v]` per head, head after head (GPT-NeoX's `query_key_value`).
    PerHead,
    /// `[all q | all k | all v]`, each `heads · head_dim` wide (GPT-2's `c_attn`).
    Blocked,
}

impl QkvPacking {
    /// Where `part` (0 q, 1 k, 2 v) of head `head` starts within a token's features.
    pub fn offset(self, part: usize, head: usize, heads: usize, head_dim: usize) -> usize {
        match self {
            QkvPacking::PerHead => (head * 3 + part) * head_dim,
            QkvPacking::Blocked => (part * heads + head) * head_dim,
        }
    }
}

/// scores = q kᵀ · scale + mask, p = softmax(scores), y = p v, per head.
struct Attention {
    /// The additive mask `[mb, mh, t, s]`, mb ∈ {1, b} and mh ∈ {1, heads}, contiguous.
    mask: Tensor,
    scale: f64,
    /// On CUDA, the forward's log-sum-exp per row (f32 `[b · heads · t, 2]`: the max and the
    /// log of the sum apart), all the backward needs besides the inputs and the output.
    #[cfg(feature = "cuda")]
    lse: std::sync::Mutex<Option<Tensor>>,
}

/// `[b, h, rows, d]` sizes of q (t rows), k and v (s rows, `kvh` heads: grouped-query attention
/// where fewer than h, on CUDA only).
#[derive(Clone, Copy)]
struct Heads {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    s: usize,
    d: usize,
}

/// Query rows per block of [`Attention::probs`].
const ROW_BLOCK: usize = 64;

impl Attention {
    /// The core for `d`-wide heads under `mask`, `[t, s]` or `[mb, mh, t, s]`.
    fn new(mask: &Tensor, t: usize, s: usize, d: usize) -> Result<Self> {
        let mask = match mask.rank() {
            2 => mask.reshape((1, 1, t, s))?,
            4 => mask.clone(),
            r => bail!("attention: a mask of rank {r} (expected [t, s] or [b, heads, t, s])"),
        };
        Ok(Self {
            mask: mask.detach().contiguous()?,
            scale: 1.0 / (d as f64).sqrt(),
            #[cfg(feature = "cuda")]
            lse: std::sync::Mutex::new(None),
        })
    }

    fn check_mask(&self, hs: &Heads) -> Result<()> {
        let Heads { b, h, t, s, .. } = *hs;
        let m = self.mask.dims();
        if m.len() != 4
            || m[2..] != [t, s]
            || !(m[0] == 1 || m[0] == b)
            || !(m[1] == 1 || m[1] == h)
        {
            bail!("attention: mask {m:?} does not broadcast to [{b}, {h}, {t}, {s}]");
        }
        Ok(())
    }

    /// p = softmax(q kᵀ · scale + mask) of head `i` into `p` (t × s), block of [`ROW_BLOCK`]
    /// rows by block; returns each block's rows and the keys it attends to, `0..end`. Keys
    /// past `end` are masked for every row of the block (≤ −1e8: their probability is exactly
    /// 0), so neither their scores nor anything after is computed — half the work under a
    /// causal mask. Those entries of `p` are left unwritten.
    fn probs<T: Real>(
        &self,
        hs: &Heads,
        i: usize,
        q: &[T],
        k: &[T],
        mask: &[T],
        p: &mut [T],
    ) -> Vec<(std::ops::Range<usize>, usize)> {
        let Heads { h, t, s, d, .. } = *hs;
        let (mb, mh) = (self.mask.dims()[0], self.mask.dims()[1]);
        let m = ((i / h) % mb) * mh + (i % h) % mh;
        let mask = &mask[m * t * s..(m + 1) * t * s];
        let masked = T::from_f64(-1e8);
        let scale = T::from_f64(self.scale);
        let mut blocks = Vec::with_capacity(t.div_ceil(ROW_BLOCK));
        for r0 in (0..t).step_by(ROW_BLOCK) {
            let rows = r0..(r0 + ROW_BLOCK).min(t);
            let end = mask[rows.start * s..rows.end * s]
                .chunks(s)
                .map(|row| match row.iter().rposition(|&v| v > masked) {
                    Some(j) => j + 1,
                    None => s, // a fully masked row: softmax spreads over every key
                })
                .max()
                .unwrap_or(s);
            // q rows · kᵀ: k is s × d, so kᵀ's (row, col) = k[col, row].
            let n = rows.len();
            gemm_head(
                (&mut p[r0 * s..], s),
                (n, end, d),
                (&q[r0 * d..], 1, d),
                (k, d, 1),
                false,
            );
            vectorized(
                #[inline(always)]
                || {
                    let rows = p[r0 * s..]
                        .chunks_mut(s)
                        .zip(mask[r0 * s..].chunks(s))
                        .take(n);
                    for (row, mrow) in rows {
                        let row = &mut row[..end];
                        for (v, &mv) in row.iter_mut().zip(mrow) {
                            *v = *v * scale + mv;
                        }
                        softmax_row(row);
                    }
                },
            );
            blocks.push((rows, end));
        }
        blocks
    }

    /// Head `i`'s output `y` (t × d) from its q (t × d), k and v (s × d).
    fn head_forward<T: Real>(
        &self,
        hs: &Heads,
        i: usize,
        (q, k, v): (&[T], &[T], &[T]),
        mask: &[T],
        y: &mut [T],
    ) {
        let Heads { t, s, d, .. } = *hs;
        let mut p = vec![T::from_f64(0.0); t * s];
        for (rows, end) in self.probs(hs, i, q, k, mask, &mut p) {
            let (r0, n) = (rows.start, rows.len());
            // y rows = p rows (· × end) · v (end × d)
            let (pb, yb) = (&p[r0 * s..], &mut y[r0 * d..]);
            gemm_head((yb, d), (n, d, end), (pb, 1, s), (v, 1, d), false);
        }
    }

    /// Head `i`'s gradients from the output's `g` (t × d), with p recomputed: dv = pᵀ g,
    /// dp = g vᵀ, ds = scale · p ⊙ (dp − Σ dp p), dq = ds k, dk = dsᵀ q. `dk` and `dv` must
    /// start at zero (keys no row attends to get none).
    #[allow(clippy::too_many_arguments)]
    fn head_backward<T: Real>(
        &self,
        hs: &Heads,
        i: usize,
        (q, k, v): (&[T], &[T], &[T]),
        g: &[T],
        mask: &[T],
        (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    ) {
        let Heads { t, s, d, .. } = *hs;
        let scale = T::from_f64(self.scale);
        let (mut p, mut ds) = (vec![T::from_f64(0.0); t * s], vec![T::from_f64(0.0); t * s]);
        for (rows, end) in self.probs(hs, i, q, k, mask, &mut p) {
            let (r0, n) = (rows.start, rows.len());
            let (pb, gb, qb) = (&p[r0 * s..], &g[r0 * d..], &q[r0 * d..]);
            // dv[..end] += pᵀ (end × n) · g rows (n × d)
            gemm_head((&mut *dv, d), (end, d, n), (pb, s, 1), (gb, 1, d), true);
            // dp (n × end) = g rows (n × d) · vᵀ (d × end), then ds in place
            gemm_head(
                (&mut ds[r0 * s..], s),
                (n, end, d),
                (gb, 1, d),
                (v, d, 1),
                false,
            );
            vectorized(
                #[inline(always)]
                || {
                    let rows = ds[r0 * s..].chunks_mut(s).zip(pb.chunks(s)).take(n);
                    for (dsr, pr) in rows {
                        softmax_bwd_row(&mut dsr[..end], &pr[..end], scale);
                    }
                },
            );
            let dsb = &ds[r0 * s..];
            // dq rows = ds (n × end) · k[..end]; dk[..end] += dsᵀ (end × n) · q rows
            gemm_head(
                (&mut dq[r0 * d..], d),
                (n, d, end),
                (dsb, 1, s),
                (k, 1, d),
                false,
            );
            gemm_head((&mut *dk, d), (end, d, n), (dsb, s, 1), (qb, 1, d), true);
        }
    }

    /// The sizes of q `[b, h, t, d]`, k and v `[b, kvh, s, d]` (kvh dividing h).
    fn heads(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Heads> {
        let (&[b, h, t, d], &[kb, kvh, s, kd]) = (q.dims(), k.dims()) else {
            bail!("attention: q and k must be [b, heads, t, head_dim]")
        };
        if (kb, kd) != (b, d) || kvh == 0 || h % kvh != 0 || v.dims() != k.dims() {
            bail!(
                "attention: q {:?}, k {:?} and v {:?} do not match",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let hs = Heads { b, h, kvh, t, s, d };
        self.check_mask(&hs)?;
        Ok(hs)
    }

    /// [`Self::heads`] for the CPU kernel, which takes k and v with every query head's.
    fn cpu_heads(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Heads> {
        let hs = self.heads(q, k, v)?;
        if hs.kvh != hs.h {
            bail!(
                "attention: the CPU kernel takes k and v repeated to all {} heads (models::ops::attention repeats them)",
                hs.h
            );
        }
        Ok(hs)
    }
}

#[cfg(feature = "cuda")]
impl Attention {
    /// Keeps the forward's log-sum-exp for the backward.
    fn keep_lse(&self, lse: candle_core::CudaStorage, hs: &Heads) {
        let lse = super::cuda::tensor(lse, (hs.b * hs.h * hs.t, 2));
        *self.lse.lock().expect("attention lse lock") = Some(lse);
    }

    fn lse(&self) -> Result<Tensor> {
        match &*self.lse.lock().expect("attention lse lock") {
            Some(lse) => Ok(lse.clone()),
            None => bail!("attention: backward on CUDA without the forward's log-sum-exp"),
        }
    }

    fn cuda_bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let hs = self.heads(q.layout(), k.layout(), v.layout())?;
        let problem = gpu::Problem::apart(&hs, self);
        let (dq, dkv) = problem.backward(q, Some((k, v)), y, g, &self.lse()?)?;
        let (dk, dv) = dkv.expect("dk and dv when k and v are apart");
        Ok((dq, dk, dv))
    }
}

/// dst (m × n) = lhs (m × k) · rhs (k × n) on the calling thread; dst as (data, row stride);
/// `accumulate` adds onto dst. k = 0 leaves dst as it is (callers accumulate or fill it anew).
fn gemm_head<T: WithDType>(
    dst: (&mut [T], usize),
    shape: (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    accumulate: bool,
) {
    let (m, n, _) = shape;
    assert!(m == 0 || n == 0 || dst.0.len() >= (m - 1) * dst.1 + n);
    // SAFETY: dst holds every entry written, and it is initialised (a slice).
    unsafe {
        gemm_into(
            dst.0.as_mut_ptr(),
            dst.1,
            shape,
            lhs,
            rhs,
            accumulate,
            gemm::Parallelism::None,
        )
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fast-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hs = self.cpu_heads(ql, kl, vl)?;
        let Heads { b, h, t, s, d, .. } = hs;
        let out = by_dtype!(qs.dtype(), T => {
            let (q, k, v) = (slice::<T>(qs, ql)?, slice::<T>(ks, kl)?, slice::<T>(vs, vl)?);
            let mut y = vec![T::from_f64(0.0); b * h * t * d];
            with_values::<T, _>(&self.mask, |mask| {
                y.par_chunks_mut((t * d).max(1)).enumerate().for_each(|(i, y)| {
                    let (q, kv) = (&q[i * t * d..(i + 1) * t * d], i * s * d..(i + 1) * s * d);
                    self.head_forward(&hs, i, (q, &k[kv.clone()], &v[kv]), mask, y);
                })
            })?;
            T::to_cpu_storage_owned(y)
        });
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let hs = self.heads(ql, kl, vl)?;
        let (dev, stream) = (qs.device().clone(), qs.device().cuda_stream());
        let ((qp, _q), (kp, _k), (vp, _v)) = (
            super::cuda::ptr(qs, ql, &stream)?,
            super::cuda::ptr(ks, kl, &stream)?,
            super::cuda::ptr(vs, vl, &stream)?,
        );
        let problem = gpu::Problem::apart(&hs, self);
        let (o, lse) = problem.forward(&dev, qs.dtype(), [qp, kp, vp])?;
        self.keep_lse(lse, &hs);
        Ok((o, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let (dq, dk, dv) = self.cuda_bwd(q, k, v, y, g)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let _ = y;
        let hs = self.cpu_heads(q.layout(), k.layout(), v.layout())?;
        let Heads { b, h, t, s, d, .. } = hs;
        by_dtype!(q.dtype(), T => {
            let zeros = |n: usize| vec![T::from_f64(0.0); n];
            let (mut dq, mut dk, mut dv) = (zeros(b * h * t * d), zeros(b * h * s * d), zeros(b * h * s * d));
            // Copies of the operands (a few MiB) keep the borrows simple; the work is the gemms.
            let (qv, kv, vv, g) = (values::<T>(q)?, values::<T>(k)?, values::<T>(v)?, values::<T>(g)?);
            let mask = values::<T>(&self.mask)?;
            dq.par_chunks_mut((t * d).max(1))
                .zip(dk.par_chunks_mut((s * d).max(1)))
                .zip(dv.par_chunks_mut((s * d).max(1)))
                .enumerate()
                .for_each(|(i, ((dq, dk), dv))| {
                    let (rows, keys) = (i * t * d..(i + 1) * t * d, i * s * d..(i + 1) * s * d);
                    let qkv = (&qv[rows.clone()], &kv[keys.clone()], &vv[keys]);
                    self.head_backward(&hs, i, qkv, &g[rows], &mask, (dq, dk, dv));
                });
            let dev = q.device();
            Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ))
        })
    }
}

/// Scaled dot-product attention over `[b, heads, t, head_dim]` with an additive mask that
/// broadcasts to `[b, heads, t, s]`, differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (t, s, d) = (q.dim(D::Minus2)?, k.dim(D::Minus2)?, q.dim(D::Minus1)?);
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention::new(mask, t, s, d)?,
    )
}

/// Self-attention whose q, k and v heads are read out of one fused projection.
struct PackedAttention {
    core: Attention,
    heads: usize,
    packing: QkvPacking,
    /// cos and sin `[t, rot_dim]`, applied to q and k.
    rope: Option<(Tensor, Tensor)>,
}

impl PackedAttention {
    /// The head sizes of a `[b, t, 3 · heads · d]` projection, checked against mask and tables.
    fn heads(&self, l: &Layout) -> Result<Heads> {
        let &[b, t, w] = l.dims() else {
            bail!(
                "attention: the q/k/v projection {:?} is not [b, t, features]",
                l.dims()
            )
        };
        let h = self.heads;
        if h == 0 || w % (3 * h) != 0 {
            bail!("attention: {w} q/k/v features do not split into 3 × {h} heads");
        }
        let hs = Heads {
            b,
            h,
            kvh: h,
            t,
            s: t,
            d: w / (3 * h),
        };
        self.core.check_mask(&hs)?;
        if let Some((cos, sin)) = &self.rope {
            let rot = cos.dim(D::Minus1)?;
            if cos.dims() != [t, rot] || sin.dims() != cos.dims() || rot % 2 != 0 || rot > hs.d {
                bail!(
                    "attention: rotary tables {:?} do not fit {t} positions of {}-wide heads",
                    cos.dims(),
                    hs.d
                );
            }
        }
        Ok(hs)
    }

    fn tables<T: WithDType>(&self) -> Result<Option<(Vec<T>, Vec<T>)>> {
        self.rope
            .as_ref()
            .map(|(cos, sin)| Ok((values::<T>(cos)?, values::<T>(sin)?)))
            .transpose()
    }

    /// Rows `t` of head `i`'s `part` (0 q, 1 k, 2 v) copied out of `rows` (tokens of the
    /// projection or, for `width` = heads · d, of the merged output's gradient).
    fn gather<T: Real>(
        &self,
        hs: &Heads,
        i: usize,
        x: &[T],
        offset: usize,
        width: usize,
    ) -> Vec<T> {
        let Heads { t, d, .. } = *hs;
        let first = (i / hs.h) * t;
        let mut out = Vec::with_capacity(t * d);
        for r in first..first + t {
            out.extend_from_slice(&x[r * width + offset..][..d]);
        }
        out
    }

    /// Head `i`'s q, k (rotated) and v, t × d each.
    fn head_qkv<T: Real>(
        &self,
        hs: &Heads,
        i: usize,
        qkv: &[T],
        rope: Option<RopeTables<T>>,
    ) -> [Vec<T>; 3] {
        let (h, d) = (hs.h, hs.d);
        std::array::from_fn(|part| {
            let offset = self.packing.offset(part, i % h, h, d);
            let mut x = self.gather(hs, i, qkv, offset, 3 * h * d);
            if let (0 | 1, Some(rope)) = (part, rope) {
                rope.rotate_rows(&mut x, 0, d, false);
            }
            x
        })
    }
}

/// `per_head[bi · h + head]` (t × d each, or `parts` of them back to back) scattered into rows
/// `bi · t + r` of `out`, head `head`'s part at `offset(part, head)`.
fn scatter_heads<T: WithDType>(
    out: &mut [T],
    hs: &Heads,
    per_head: &[Vec<Vec<T>>],
    offset: impl Fn(usize, usize) -> usize + Sync,
) {
    let Heads { h, t, d, .. } = *hs;
    let width = out.len() / (hs.b * t).max(1);
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, r) = (row / t, row % t);
            for head in 0..h {
                for (part, x) in per_head[bi * h + head].iter().enumerate() {
                    o[offset(part, head)..][..d].copy_from_slice(&x[r * d..(r + 1) * d]);
                }
            }
        });
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "fast-packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hs = self.heads(l)?;
        let Heads { b, h, t, d, .. } = hs;
        let out = by_dtype!(s.dtype(), T => {
            let qkv = slice::<T>(s, l)?;
            let tables = self.tables::<T>()?;
            let rope = tables.as_ref().map(|(cos, sin)| RopeTables::new(cos, sin, t));
            let ys = with_values::<T, _>(&self.core.mask, |mask| {
                (0..b * h).into_par_iter().map(|i| {
                    let [q, k, v] = self.head_qkv(&hs, i, qkv, rope);
                    let mut y = vec![T::from_f64(0.0); t * d];
                    self.core.head_forward(&hs, i, (&q, &k, &v), mask, &mut y);
                    vec![y]
                }).collect::<Vec<_>>()
            })?;
            let mut out = vec![T::from_f64(0.0); b * t * h * d];
            scatter_heads(&mut out, &hs, &ys, |_, head| head * d);
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((b, t, h * d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let hs = self.heads(l)?;
        let (dev, stream) = (s.device().clone(), s.device().cuda_stream());
        let (p, _p) = super::cuda::ptr(s, l, &stream)?;
        let problem = gpu::Problem::packed(&hs, &self.core, self.packing, self.rope.as_ref());
        let (o, lse) = problem.forward(&dev, s.dtype(), [p; 3])?;
        self.core.keep_lse(lse, &hs);
        Ok((o, Shape::from((hs.b, hs.t, hs.h * hs.d))))
    }

    /// Per head: q, k and v gathered again, the core's backward, the rotation's transpose on
    /// dq and dk; the gradients land in one `[b, t, 3 · heads · d]` tensor.
    fn bwd(&self, qkv: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let hs = self.heads(qkv.layout())?;
        #[cfg(feature = "cuda")]
        if qkv.device().is_cuda() {
            let problem = gpu::Problem::packed(&hs, &self.core, self.packing, self.rope.as_ref());
            let dqkv = problem.backward(qkv, None, y, g, &self.core.lse()?)?;
            return Ok(Some(dqkv.0));
        }
        let _ = y;
        let Heads { b, h, t, d, .. } = hs;
        by_dtype!(qkv.dtype(), T => {
            let tables = self.tables::<T>()?;
            let rope = tables.as_ref().map(|(cos, sin)| RopeTables::new(cos, sin, t));
            let mask = values::<T>(&self.core.mask)?;
            let grads = with_values::<T, _>(qkv, |qkv| with_values::<T, _>(g, |g| {
                (0..b * h).into_par_iter().map(|i| {
                    let [q, k, v] = self.head_qkv(&hs, i, qkv, rope);
                    let gi = self.gather(&hs, i, g, (i % h) * d, h * d);
                    let mut grads: [Vec<T>; 3] = std::array::from_fn(|_| vec![T::from_f64(0.0); t * d]);
                    let [dq, dk, dv] = &mut grads;
                    self.core.head_backward(&hs, i, (&q, &k, &v), &gi, &mask, (dq, dk, dv));
                    if let Some(rope) = rope {
                        rope.rotate_rows(dq, 0, d, true);
                        rope.rotate_rows(dk, 0, d, true);
                    }
                    Vec::from(grads)
                }).collect::<Vec<_>>()
            }))??;
            let mut dqkv = vec![T::from_f64(0.0); b * t * 3 * h * d];
            scatter_heads(&mut dqkv, &hs, &grads, |part, head| self.packing.offset(part, head, h, d));
            Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
        })
    }
}

/// Self-attention from a fused q/k/v projection `[b, t, 3 · heads · head_dim]`, packed as
/// `packing` says, to the merged heads `[b, t, heads · head_dim]`; the rotary tables (cos, sin
/// `[t, rot_dim]`) apply to q and k, and the mask broadcasts to `[b, heads, t, t]`.
/// Differentiable in `qkv`.
pub fn packed_attention(
    qkv: &Tensor,
    packing: QkvPacking,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    mask: &Tensor,
) -> Result<Tensor> {
    let (_, t, w) = qkv.dims3()?;
    let core = Attention::new(mask, t, t, w / (3 * heads).max(1))?;
    let rope = rope
        .map(|(c, s)| Result::Ok((c.detach().contiguous()?, s.detach().contiguous()?)))
        .transpose()?;
    qkv.contiguous()?.apply_op1(PackedAttention {
        core,
        heads,
        packing,
        rope,
    })
}

/// Whether the CUDA kernels take heads `head_dim` wide: a multiple of 8 (the threads per row)
/// up to 128 (`ATT_MAXD` in `cuda/attention.cu`): Pythia's 80, Mistral's 128, GPT-2's 64.
pub fn cuda_head_dim_fits(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(8) && head_dim <= 128
}

/// Whether the CUDA kernels take `tensors` (on a GPU, in a dtype they support) with heads
/// `head_dim` wide.
pub fn cuda_takes(tensors: &[&Tensor], head_dim: usize) -> bool {
    super::supports_cuda(tensors) && cuda_head_dim_fits(head_dim)
}

/// The CUDA side (kernels in `cuda/attention.cu`, FlashAttention-2's scheme): the forward
/// keeps the log-sum-exp per row and nothing `[t, s]`-sized; the backward recomputes the
/// probabilities tile by tile, dq in one launch and dk, dv in another.
#[cfg(feature = "cuda")]
mod gpu {
    use super::{Attention, Heads, QkvPacking};
    use crate::kernels::cuda::{self, Arg, Held, ATTENTION};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaDevice, CudaStorage, DType, Result, Tensor};

    /// Query rows and keys per tile (`ATT_B` in attention.cu).
    const TILE: usize = 16;

    /// The (batch, head, row) strides of the q, k/v and output views, and the offsets of q, k
    /// and v in their buffers: the kernels' view of q, k and v apart (`[b, heads, rows, d]`)
    /// or of one fused projection (`[b, t, 3 · heads · d]`, the output merged `[b, t, heads ·
    /// d]`). The gradients have the inputs' views.
    #[derive(Clone, Copy)]
    struct Views {
        q: [i64; 3],
        kv: [i64; 3],
        o: [i64; 3],
        starts: [usize; 3],
    }

    pub(super) struct Problem<'a> {
        hs: Heads,
        views: Views,
        mask: &'a Tensor,
        rope: Option<&'a (Tensor, Tensor)>,
        scale: f64,
    }

    fn grid(x: usize, y: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (x as u32, y as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    impl<'a> Problem<'a> {
        /// q `[b, h, t, d]`, k and v `[b, kvh, s, d]`, contiguous; the output as q.
        pub fn apart(hs: &Heads, core: &'a Attention) -> Self {
            let Heads {
                h, kvh, t, s, d, ..
            } = *hs;
            let q = [(h * t * d) as i64, (t * d) as i64, d as i64];
            let views = Views {
                q,
                kv: [(kvh * s * d) as i64, (s * d) as i64, d as i64],
                o: q,
                starts: [0; 3],
            };
            Self {
                hs: *hs,
                views,
                mask: &core.mask,
                rope: None,
                scale: core.scale,
            }
        }

        /// Heads read out of a `[b, t, 3 · h · d]` projection packed as `packing` says.
        pub fn packed(
            hs: &Heads,
            core: &'a Attention,
            packing: QkvPacking,
            rope: Option<&'a (Tensor, Tensor)>,
        ) -> Self {
            let Heads { h, t, d, .. } = *hs;
            let w = 3 * h * d;
            let at = |part, head| packing.offset(part, head, h, d);
            let qkv = [(t * w) as i64, (at(0, 1) - at(0, 0)) as i64, w as i64];
            let views = Views {
                q: qkv,
                kv: qkv,
                o: [(t * h * d) as i64, d as i64, (h * d) as i64],
                starts: [at(0, 0), at(1, 0), at(2, 0)],
            };
            Self {
                hs: *hs,
                views,
                mask: &core.mask,
                rope,
                scale: core.scale,
            }
        }

        /// The kernels' `AttnShape` arguments.
        fn shape_args(&self) -> Vec<Arg> {
            let Heads {
                h, kvh, t, s, d, ..
            } = self.hs;
            let (m, rot) = (self.mask.dims(), self.rope.map_or(0, |(c, _)| c.dims()[1]));
            let v = &self.views;
            let mut args: Vec<Arg> = [v.q, v.kv, v.o]
                .iter()
                .flatten()
                .map(|&x| Arg::I64(x))
                .collect();
            args.extend([h, kvh, t, s, d, rot, m[0], m[1]].map(|x| Arg::I32(x as i32)));
            args.push(Arg::F32(self.scale as f32));
            args
        }

        /// Addresses of q, k and v (or of their gradients) in buffers at `bufs`.
        fn at(&self, bufs: [u64; 3], dtype: DType) -> [u64; 3] {
            let size = dtype.size_in_bytes() as u64;
            std::array::from_fn(|i| bufs[i] + self.views.starts[i] as u64 * size)
        }

        /// The keys each query tile attends to, per mask slice (`attn_ranges`).
        fn ranges(&self, dev: &CudaDevice, dtype: DType, mask: u64) -> Result<CudaStorage> {
            let Heads { t, s, .. } = self.hs;
            let slices = self.mask.dims()[0] * self.mask.dims()[1];
            let tiles = t.div_ceil(TILE);
            let ranges = cuda::alloc(dev, DType::U32, 2 * tiles * slices)?;
            let stream = dev.cuda_stream();
            let (rp, r) = cuda::buf(&ranges, &stream)?;
            let args = [
                Arg::Ptr(mask),
                Arg::Ptr(rp),
                Arg::I32(t as i32),
                Arg::I32(s as i32),
            ];
            // SAFETY: the mask holds slices × t × s values, ranges 2 per tile and slice.
            unsafe {
                cuda::run(
                    dev,
                    &ATTENTION,
                    &cuda::typed("attn_ranges", dtype)?,
                    grid(tiles, slices, 32),
                    &args,
                )?
            };
            drop(r);
            Ok(ranges)
        }

        /// Runs `f` with the addresses of the mask, the rotary tables (0 without) and the
        /// ranges of this problem.
        fn with_common<R>(
            &self,
            dev: &CudaDevice,
            dtype: DType,
            f: impl FnOnce([u64; 4]) -> Result<R>,
        ) -> Result<R> {
            let stream = dev.cuda_stream();
            let mask = Held::new(self.mask)?;
            let (mp, _m) = mask.ptr(&stream)?;
            let tables = match self.rope {
                Some((c, s)) => Some((Held::new(c)?, Held::new(s)?)),
                None => None,
            };
            let (cos, sin) = match &tables {
                Some((c, s)) => (Some(c.ptr(&stream)?), Some(s.ptr(&stream)?)),
                None => (None, None),
            };
            let ranges = self.ranges(dev, dtype, mp)?;
            let (rp, _r) = cuda::buf(&ranges, &stream)?;
            let addr = |p: &Option<(u64, _)>| p.as_ref().map_or(0, |(a, _)| *a);
            f([mp, addr(&cos), addr(&sin), rp])
        }

        /// The output (in the output view) and the log-sum-exp of each row (f32 `[b, h, t, 2]`),
        /// from q, k and v in buffers at `bufs` (the same buffer three times when packed).
        pub fn forward(
            &self,
            dev: &CudaDevice,
            dtype: DType,
            bufs: [u64; 3],
        ) -> Result<(CudaStorage, CudaStorage)> {
            let Heads { b, h, t, d, .. } = self.hs;
            let o = cuda::alloc(dev, dtype, b * h * t * d)?;
            let lse = cuda::alloc(dev, DType::F32, 2 * b * h * t)?;
            self.with_common(dev, dtype, |[mask, cos, sin, ranges]| {
                let stream = dev.cuda_stream();
                let ((op, _o), (lp, _l)) = (cuda::buf(&o, &stream)?, cuda::buf(&lse, &stream)?);
                let [q, k, v] = self.at(bufs, dtype);
                let mut args = [q, k, v, cos, sin, mask, ranges, op, lp]
                    .map(Arg::Ptr)
                    .to_vec();
                args.extend(self.shape_args());
                // SAFETY: the views address b × h × t × d (q, output) and b × kvh × s × d (k,
                // v) elements of their buffers; mask, tables and ranges as `ranges` made them.
                unsafe {
                    cuda::run(
                        dev,
                        &ATTENTION,
                        &cuda::typed("attn_fwd", dtype)?,
                        grid(t.div_ceil(TILE), b * h, 128),
                        &args,
                    )
                }
            })?;
            Ok((o, lse))
        }

        /// The gradients of q and (when given apart) of k and v, from the inputs, the output
        /// `y`, its gradient `g` and the forward's `lse`. Packed, `q` is the projection and the
        /// one gradient is the projection's, every element written by one of the two launches.
        pub fn backward(
            &self,
            q: &Tensor,
            kv: Option<(&Tensor, &Tensor)>,
            y: &Tensor,
            g: &Tensor,
            lse: &Tensor,
        ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
            let Heads { b, h, kvh, t, s, d } = self.hs;
            let (dev, dtype) = (cuda::device_of(q)?, q.dtype());
            let stream = dev.cuda_stream();
            let g = g.contiguous()?;
            let held: Vec<Held> = [
                Some(q),
                kv.map(|p| p.0),
                kv.map(|p| p.1),
                Some(y),
                Some(&g),
                Some(lse),
            ]
            .into_iter()
            .flatten()
            .map(Held::new)
            .collect::<Result<_>>()?;
            let ptrs = held
                .iter()
                .map(|x| x.ptr(&stream))
                .collect::<Result<Vec<_>>>()?;
            let p: Vec<u64> = ptrs.iter().map(|(a, _)| *a).collect();
            let (bufs, [yp, gp, lp]) = match kv {
                Some(_) => ([p[0], p[1], p[2]], [p[3], p[4], p[5]]),
                None => ([p[0]; 3], [p[1], p[2], p[3]]),
            };
            let grads: Vec<CudaStorage> = match kv {
                Some(_) => vec![
                    cuda::alloc(&dev, dtype, b * h * t * d)?,
                    cuda::alloc(&dev, dtype, b * kvh * s * d)?,
                    cuda::alloc(&dev, dtype, b * kvh * s * d)?,
                ],
                None => vec![cuda::alloc(&dev, dtype, q.elem_count())?],
            };
            let delta = cuda::alloc(&dev, DType::F32, b * h * t)?;
            self.with_common(&dev, dtype, |[mask, cos, sin, ranges]| {
                let gptrs = grads
                    .iter()
                    .map(|x| cuda::buf(x, &stream))
                    .collect::<Result<Vec<_>>>()?;
                let gaddr: Vec<u64> = gptrs.iter().map(|(a, _)| *a).collect();
                let (dp, _d) = cuda::buf(&delta, &stream)?;
                let [q, k, v] = self.at(bufs, dtype);
                let [dq, dk, dv] = self.at(
                    if gaddr.len() == 3 {
                        [gaddr[0], gaddr[1], gaddr[2]]
                    } else {
                        [gaddr[0]; 3]
                    },
                    dtype,
                );
                let mut dq_args = [q, k, v, cos, sin, mask, ranges, yp, gp, lp, dq, dp]
                    .map(Arg::Ptr)
                    .to_vec();
                dq_args.extend(self.shape_args());
                let mut dkv_args = [q, k, v, cos, sin, mask, ranges, gp, lp, dp, dk, dv]
                    .map(Arg::Ptr)
                    .to_vec();
                dkv_args.extend(self.shape_args());
                // SAFETY: as in `forward`; dq has q's view, dk and dv k's, δ b × h × t floats.
                unsafe {
                    cuda::run(
                        &dev,
                        &ATTENTION,
                        &cuda::typed("attn_bwd_dq", dtype)?,
                        grid(t.div_ceil(TILE), b * h, 128),
                        &dq_args,
                    )?;
                    cuda::run(
                        &dev,
                        &ATTENTION,
                        &cuda::typed("attn_bwd_dkv", dtype)?,
                        grid(s.div_ceil(TILE), b * kvh, 128),
                        &dkv_args,
                    )
                }
            })?;
            let mut grads = grads.into_iter();
            let dq = grads.next().expect("a gradient for q");
            Ok(match kv {
                Some((k, _)) => {
                    let (dk, dv) = (grads.next().expect("dk"), grads.next().expect("dv"));
                    (
                        cuda::tensor(dq, q.shape()),
                        Some((cuda::tensor(dk, k.shape()), cuda::tensor(dv, k.shape()))),
                    )
                }
                None => (cuda::tensor(dq, q.shape()), None),
            })
        }
    }
}
