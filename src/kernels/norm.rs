//! LayerNorm and RMSNorm over the last dimension, with one backward for both, on the CPU and (in
//! `gpu`, kernels in `cuda/norm.cu`) on CUDA. Composition twins:
//! `models::ops::layer_norm_composed` and `rms_norm_composed`.

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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward((s, l), (ws, wl), Some((bs, bl)), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = norm_bwd_on_device(x, w, g, self.eps, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// [`norm_bwd`] on the device the tensors are on.
fn norm_bwd_on_device(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    centered: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::backward(x, w, g, eps, centered);
    }
    norm_bwd(x, w, g, eps, centered)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward((s, l), (ws, wl), None, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = norm_bwd_on_device(x, w, g, self.eps, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm over the last dimension, differentiable in x and weight.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    xs.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// The CUDA side: one launch forward, two backward (dx per row, then the weight and bias
/// gradients as column sums from the saved row statistics).
#[cfg(feature = "cuda")]
mod gpu {
    use crate::kernels::cuda::{self, Arg, Held, NORM};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor, D};

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    /// LayerNorm with `bias`, RMSNorm without.
    pub fn forward(
        x: Input,
        w: Input,
        bias: Option<Input>,
        eps: f64,
    ) -> Result<(CudaStorage, Shape)> {
        let (dev, dtype) = (x.0.device().clone(), x.0.dtype());
        let d = x.1.dims().last().copied().unwrap_or(1);
        let rows = x.1.shape().elem_count() / d.max(1);
        let out = cuda::alloc(&dev, dtype, rows * d)?;
        if rows > 0 && d > 0 {
            let stream = dev.cuda_stream();
            let (xp, _x) = cuda::ptr(x.0, x.1, &stream)?;
            let (wp, _w) = cuda::ptr(w.0, w.1, &stream)?;
            let b = bias.map(|(s, l)| cuda::ptr(s, l, &stream)).transpose()?;
            let (yp, _y) = cuda::buf(&out, &stream)?;
            let args = [
                Arg::Ptr(xp),
                Arg::Ptr(wp),
                Arg::Ptr(b.as_ref().map_or(0, |(p, _)| *p)),
                Arg::Ptr(yp),
                Arg::I32(d as i32),
                Arg::F32(eps as f32),
                Arg::I32(bias.is_some() as i32),
            ];
            let name = cuda::typed("norm_fwd", dtype)?;
            // SAFETY: x and y hold rows × d elements, w (and b) d, as the kernel reads them.
            unsafe { cuda::run(&dev, &NORM, &name, cuda::rows_config(rows, d), &args)? };
        }
        Ok((out, x.1.shape().clone()))
    }

    /// (dx, dw, db) of LayerNorm (`centered`) or RMSNorm (no db).
    pub fn backward(
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        eps: f64,
        centered: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d.max(1);
        if rows == 0 || d == 0 {
            // Sums over nothing.
            let db = centered.then(|| w.zeros_like()).transpose()?;
            return Ok((x.zeros_like()?, w.zeros_like()?, db));
        }
        let g = g.contiguous()?;
        let (dev, dtype) = (cuda::device_of(x)?, x.dtype());
        let dx = cuda::alloc(&dev, dtype, rows * d)?;
        let dw = cuda::alloc(&dev, dtype, d)?;
        let db = centered.then(|| cuda::alloc(&dev, dtype, d)).transpose()?;
        let stats = cuda::alloc(&dev, DType::F32, 2 * rows)?;
        {
            let stream = dev.cuda_stream();
            let (xh, wh, gh) = (Held::new(x)?, Held::new(w)?, Held::new(&g)?);
            let ((xp, _x), (wp, _w), (gp, _g)) =
                (xh.ptr(&stream)?, wh.ptr(&stream)?, gh.ptr(&stream)?);
            let ((dxp, _dx), (sp, _s), (dwp, _dw)) = (
                cuda::buf(&dx, &stream)?,
                cuda::buf(&stats, &stream)?,
                cuda::buf(&dw, &stream)?,
            );
            let dbp = db.as_ref().map(|db| cuda::buf(db, &stream)).transpose()?;
            let (di, eps, centered) = (
                Arg::I32(d as i32),
                Arg::F32(eps as f32),
                Arg::I32(centered as i32),
            );
            let rows_args = [
                Arg::Ptr(xp),
                Arg::Ptr(wp),
                Arg::Ptr(gp),
                Arg::Ptr(dxp),
                Arg::Ptr(sp),
                di,
                eps,
                centered,
            ];
            let cols_args = [
                Arg::Ptr(xp),
                Arg::Ptr(gp),
                Arg::Ptr(sp),
                Arg::Ptr(dwp),
                Arg::Ptr(dbp.as_ref().map_or(0, |(p, _)| *p)),
                Arg::I32(rows as i32),
                di,
            ];
            // SAFETY: x, g and dx hold rows × d elements, w, dw and db d, stats 2 · rows floats.
            unsafe {
                cuda::run(
                    &dev,
                    &NORM,
                    &cuda::typed("norm_bwd_rows", dtype)?,
                    cuda::rows_config(rows, d),
                    &rows_args,
                )?;
                cuda::run(
                    &dev,
                    &NORM,
                    &cuda::typed("norm_bwd_cols", dtype)?,
                    cuda::columns_config(d),
                    &cols_args,
                )?;
            }
        }
        Ok((
            cuda::tensor(dx, x.shape()),
            cuda::tensor(dw, w.shape()),
            db.map(|db| cuda::tensor(db, w.shape())),
        ))
    }
}
