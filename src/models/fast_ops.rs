//! Fused CPU kernels, with a backward, for the differentiable building blocks of
//! [`super::ops`]: softmax, layer norm, RMS norm, rotary embedding and the attention core
//! (scaled, masked softmax of the scores).
//!
//! candle's own fused versions have no backward, so the models used to compose them from
//! elementwise ops: one pass over memory (and one graph node, kept alive until the backward)
//! per op. Each kernel here does one or two passes per row and saves nothing but its inputs and
//! output. They run on CPU in f32 and f64 only; [`supports`] says when, and `ops.rs` falls back
//! to the compositions elsewhere (which stay the reference the tests compare against).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType, D,
};

/// The float types the kernels are written for.
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => bail!("fused CPU ops support f32 and f64, not {other:?}"),
        }
    };
}
pub(crate) use by_dtype;

/// Whether the fused kernels apply: every tensor on the CPU, in one dtype, f32 or f64.
pub fn supports(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let dtype = first.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// The contiguous data of a CPU storage under `layout`.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("fused CPU op: input is not contiguous")
    };
    Ok(&s.as_slice::<T>()?[start..end])
}

/// A tensor's values, in order (the backward passes read their operands this way).
fn values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Below this many elements a kernel runs on the calling thread: spawning costs more.
const PARALLEL_MIN: usize = 1 << 15;

/// Splits `out` (rows of `row_len`) into one block of whole rows per thread and calls
/// `f(first_row, block)` on each; returns each block's partial result, in row order.
/// `row_cost` (elements touched per row) decides whether threads are worth it.
pub(crate) fn par_blocks<T: Send, R: Send>(
    out: &mut [T],
    row_len: usize,
    row_cost: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let rows = if row_len == 0 { 0 } else { out.len() / row_len };
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    if threads == 1 || rows * row_cost < PARALLEL_MIN {
        return vec![f(0, out)];
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(per * row_len)
            .enumerate()
            .map(|(i, block)| {
                let f = &f;
                scope.spawn(move || f(i * per, block))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("fused op worker panicked"))
            .collect()
    })
}

/// Sums per-thread partial vectors (weight and bias gradients of the norms).
fn sum_partials<T: WithDType>(partials: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut total = vec![T::from_f64(0.0); len];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fast-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        let out = by_dtype!(s.dtype(), T => {
            let x = slice::<T>(s, l)?;
            let mut y = x.to_vec();
            par_blocks(&mut y, d, d, |_, block| {
                for row in block.chunks_mut(d) {
                    softmax_row(row);
                }
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_bwd(p, g, 1.0)?))
    }
}

/// In place: row ← softmax(row), the max subtracted first (as the composition does).
fn softmax_row<T: Real>(row: &mut [T]) {
    let max = row
        .iter()
        .copied()
        .fold(row[0], |m, v| if v > m { v } else { m });
    let mut sum = T::from_f64(0.0);
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// dx = scale · p ⊙ (g − Σ g p), per row: the softmax Jacobian applied to g.
fn softmax_bwd(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let d = p.dim(D::Minus1)?;
    by_dtype!(p.dtype(), T => {
        let p_v = values::<T>(p)?;
        let mut dx = values::<T>(g)?;
        let scale = T::from_f64(scale);
        par_blocks(&mut dx, d, d, |first, block| {
            for (r, row) in block.chunks_mut(d).enumerate() {
                let pr = &p_v[(first + r) * d..(first + r + 1) * d];
                let dot = row.iter().zip(pr).fold(T::from_f64(0.0), |acc, (&g, &p)| acc + g * p);
                for (g, &p) in row.iter_mut().zip(pr) {
                    *g = scale * p * (*g - dot);
                }
            }
        });
        Tensor::from_vec(dx, p.shape(), p.device())
    })
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Softmax)
}

/// The attention core: softmax(scale · scores + mask) over the last dimension, with the mask a
/// constant of `mask_rows` rows that repeat down the scores' rows.
struct MaskedSoftmax {
    scale: f64,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fast-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        let out = by_dtype!(s.dtype(), T => {
            let x = slice::<T>(s, l)?;
            let mask = slice::<T>(ms, ml)?;
            let mask_rows = mask.len() / d;
            let scale = T::from_f64(self.scale);
            let mut y = x.to_vec();
            par_blocks(&mut y, d, d, |first, block| {
                for (r, row) in block.chunks_mut(d).enumerate() {
                    let m = (first + r) % mask_rows;
                    for (v, &mv) in row.iter_mut().zip(&mask[m * d..(m + 1) * d]) {
                        *v = *v * scale + mv;
                    }
                    softmax_row(row);
                }
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _mask: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_bwd(p, g, self.scale)?), None))
    }
}

/// Scaled dot-product attention over `[b, heads, t, head_dim]` with an additive mask that
/// broadcasts to `[b, heads, t, s]`; the scores' scale, mask and softmax are one fused op.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = q.matmul(&k.t()?)?;
    let (t, s) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    // A [t, s] mask repeats every t rows; any other broadcast is spelled out once.
    let mask = if mask.dims() == [t, s] {
        mask.contiguous()?
    } else {
        mask.broadcast_as(scores.shape())?.contiguous()?
    };
    let probs = scores.apply_op2(&mask, MaskedSoftmax { scale })?;
    probs.matmul(v)
}

/// LayerNorm over the last dimension: (x − mean) / sqrt(var + eps) · weight + bias.
struct LayerNorm {
    eps: f64,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fast-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        let out = by_dtype!(s.dtype(), T => {
            let (w, b) = (slice::<T>(ws, wl)?, slice::<T>(bs, bl)?);
            let mut y = slice::<T>(s, l)?.to_vec();
            let eps = T::from_f64(self.eps);
            par_blocks(&mut y, d, d, |_, block| {
                for row in block.chunks_mut(d) {
                    let (mean, rstd) = moments(row, eps);
                    for ((v, &w), &b) in row.iter_mut().zip(w).zip(b) {
                        *v = (*v - mean) * rstd * w + b;
                    }
                }
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = norm_bwd(x, w, g, self.eps, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// (mean, 1/sqrt(var + eps)) of a row.
fn moments<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(row.len() as f64);
    let mean = row.iter().fold(T::from_f64(0.0), |a, &v| a + v) / n;
    let var = row
        .iter()
        .fold(T::from_f64(0.0), |a, &v| a + (v - mean) * (v - mean))
        / n;
    (mean, T::from_f64(1.0) / (var + eps).sqrt())
}

/// 1/sqrt(mean(x²) + eps) of a row.
fn rms<T: Real>(row: &[T], eps: T) -> T {
    let n = T::from_f64(row.len() as f64);
    let ms = row.iter().fold(T::from_f64(0.0), |a, &v| a + v * v) / n;
    T::from_f64(1.0) / (ms + eps).sqrt()
}

/// The backward of LayerNorm (`centered`) or RMSNorm: with x̂ the normalised row, r its
/// 1/std and ĝ = g ⊙ w, dx = r (ĝ − mean(ĝ) − x̂ mean(ĝ x̂)) (RMSNorm drops the mean(ĝ) term),
/// dw = Σ g x̂ and db = Σ g over rows.
fn norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    centered: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let d = x.dim(D::Minus1)?;
    by_dtype!(x.dtype(), T => {
        let x_v = values::<T>(x)?;
        let w_v = values::<T>(w)?;
        let g_v = values::<T>(g)?;
        let eps = T::from_f64(eps);
        let n = T::from_f64(d as f64);
        let mut dx = vec![T::from_f64(0.0); x_v.len()];
        let partials = par_blocks(&mut dx, d, d, |first, block| {
            let mut dw = vec![T::from_f64(0.0); d];
            let mut db = vec![T::from_f64(0.0); d];
            let mut xhat = vec![T::from_f64(0.0); d];
            for (r, out) in block.chunks_mut(d).enumerate() {
                let row = &x_v[(first + r) * d..(first + r + 1) * d];
                let gr = &g_v[(first + r) * d..(first + r + 1) * d];
                let (mean, rstd) = if centered { moments(row, eps) } else { (T::from_f64(0.0), rms(row, eps)) };
                let (mut sum_g, mut sum_gx) = (T::from_f64(0.0), T::from_f64(0.0));
                for i in 0..d {
                    xhat[i] = (row[i] - mean) * rstd;
                    let gh = gr[i] * w_v[i];
                    sum_g += gh;
                    sum_gx += gh * xhat[i];
                    dw[i] += gr[i] * xhat[i];
                    db[i] += gr[i];
                }
                let mean_g = if centered { sum_g / n } else { T::from_f64(0.0) };
                let mean_gx = sum_gx / n;
                for i in 0..d {
                    out[i] = rstd * (gr[i] * w_v[i] - mean_g - xhat[i] * mean_gx);
                }
            }
            (dw, db)
        });
        let (dws, dbs): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        let dw = Tensor::from_vec(sum_partials(dws, d), w.shape(), dev)?;
        let db = if centered { Some(Tensor::from_vec(sum_partials(dbs, d), w.shape(), dev)?) } else { None };
        Ok((dx, dw, db))
    })
}

/// LayerNorm over the last dimension, differentiable in x, weight and bias.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps },
    )
}

/// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) · weight.
struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fast-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        let out = by_dtype!(s.dtype(), T => {
            let w = slice::<T>(ws, wl)?;
            let mut y = slice::<T>(s, l)?.to_vec();
            let eps = T::from_f64(self.eps);
            par_blocks(&mut y, d, d, |_, block| {
                for row in block.chunks_mut(d) {
                    let r = rms(row, eps);
                    for (v, &w) in row.iter_mut().zip(w) {
                        *v = *v * r * w;
                    }
                }
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = norm_bwd(x, w, g, self.eps, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm over the last dimension, differentiable in x and weight.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// Rotate-half rotary embedding of the first `rot_dim` features of `[.., t, head_dim]` rows
/// with `[t, rot_dim]` tables: for i < rot_dim/2 = h,
/// y_i = x_i cos_i − x_{i+h} sin_i and y_{i+h} = x_{i+h} cos_{i+h} + x_i sin_{i+h}.
struct Rotary;

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "fast-rotary"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l);
        let rot = last_dim(cl);
        let out = by_dtype!(s.dtype(), T => {
            let (cos, sin) = (slice::<T>(cs, cl)?, slice::<T>(ss, sl)?);
            let t = cos.len() / rot;
            let mut y = slice::<T>(s, l)?.to_vec();
            let half = rot / 2;
            par_blocks(&mut y, d, d, |first, block| {
                for (r, row) in block.chunks_mut(d).enumerate() {
                    let pos = (first + r) % t;
                    let (c, sn) = (&cos[pos * rot..(pos + 1) * rot], &sin[pos * rot..(pos + 1) * rot]);
                    for i in 0..half {
                        let (x1, x2) = (row[i], row[i + half]);
                        row[i] = x1 * c[i] - x2 * sn[i];
                        row[i + half] = x2 * c[i + half] + x1 * sn[i + half];
                    }
                }
            });
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    /// The rotation's transpose is the same rotation with sin ← −[sin₂, sin₁] (halves swapped):
    /// dx_i = g_i cos_i + g_{i+h} sin_{i+h}, dx_{i+h} = g_{i+h} cos_{i+h} − g_i sin_i.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let half = sin.dim(D::Minus1)? / 2;
        let sin_t = Tensor::cat(
            &[
                sin.narrow(D::Minus1, half, half)?,
                sin.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?
        .neg()?
        .contiguous()?;
        let dx = g
            .contiguous()?
            .apply_op3_no_bwd(&cos.contiguous()?, &sin_t, self)?;
        Ok((Some(dx), None, None))
    }
}

/// Whether [`rotary`] handles these shapes: `[t, rot_dim]` tables whose t matches the rows'
/// second-to-last dimension (per-row position tables, as in cached decoding, are not).
pub fn rotary_applies(xs: &Tensor, cos: &Tensor) -> bool {
    cos.rank() == 2
        && xs.rank() >= 2
        && xs.dims()[xs.rank() - 2] == cos.dims()[0]
        && cos.dims()[1] % 2 == 0
}

/// Rotary embedding (see [`rotary_applies`] for the shapes), differentiable in x.
pub fn rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rotary)
}
