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
}

/// `[b, h, rows, d]` sizes of q (t rows), k and v (s rows).
#[derive(Clone, Copy)]
struct Heads {
    b: usize,
    h: usize,
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

    fn heads(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Heads> {
        let (&[b, h, t, d], &[kb, kh, s, kd]) = (q.dims(), k.dims()) else {
            bail!("attention: q and k must be [b, heads, t, head_dim]")
        };
        if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() {
            bail!(
                "attention: q {:?}, k {:?} and v {:?} do not match",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let hs = Heads { b, h, t, s, d };
        self.check_mask(&hs)?;
        Ok(hs)
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
        let hs = self.heads(ql, kl, vl)?;
        let Heads { b, h, t, s, d } = hs;
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

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let hs = self.heads(q.layout(), k.layout(), v.layout())?;
        let Heads { b, h, t, s, d } = hs;
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

    /// Per head: q, k and v gathered again, the core's backward, the rotation's transpose on
    /// dq and dk; the gradients land in one `[b, t, 3 · heads · d]` tensor.
    fn bwd(&self, qkv: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let hs = self.heads(qkv.layout())?;
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
