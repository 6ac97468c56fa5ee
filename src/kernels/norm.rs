//! LayerNorm and RMSNorm over the last dimension, with one backward for both. Composition
//! twins: `models::ops::layer_norm_composed` and `rms_norm_composed`.

use super::cpu::{by_dtype, last_dim, par_blocks, slice, sum_partials, values, with_values, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D};

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
            let (x, w, b) = (slice::<T>(s, l)?, slice::<T>(ws, wl)?, slice::<T>(bs, bl)?);
            let mut y = vec![T::from_f64(0.0); x.len()];
            let eps = T::from_f64(self.eps);
            par_blocks(&mut y, d, d, |first, block| {
                for (out, row) in block.chunks_mut(d).zip(x[first * d..].chunks(d)) {
                    let (mean, rstd) = moments(row, eps);
                    for (((y, &x), &w), &b) in out.iter_mut().zip(row).zip(w).zip(b) {
                        *y = (x - mean) * rstd * w + b;
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
        let w_v = values::<T>(w)?;
        let eps = T::from_f64(eps);
        let n = T::from_f64(d as f64);
        let mut dx = vec![T::from_f64(0.0); x.elem_count()];
        let partials = with_values::<T, _>(x, |x_v| with_values::<T, _>(g, |g_v| par_blocks(&mut dx, d, d, |first, block| {
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
        })))??;
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
            let (x, w) = (slice::<T>(s, l)?, slice::<T>(ws, wl)?);
            let mut y = vec![T::from_f64(0.0); x.len()];
            let eps = T::from_f64(self.eps);
            par_blocks(&mut y, d, d, |first, block| {
                for (out, row) in block.chunks_mut(d).zip(x[first * d..].chunks(d)) {
                    let r = rms(row, eps);
                    for ((y, &x), &w) in out.iter_mut().zip(row).zip(w) {
                        *y = x * r * w;
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
