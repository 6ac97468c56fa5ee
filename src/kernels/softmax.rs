//! Softmax over the last dimension, and the row kernels of its forward and backward that the
//! attention core reuses; on CUDA, `gpu` (kernels in `cuda/softmax.cu`). Composition twin:
//! `models::ops::softmax_last_dim_composed`.

use super::cpu::{
    by_dtype, last_dim, par_blocks, row_max, row_sum, slice, values, vectorized, with_values, Real,
    LANES,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType, D};

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
            par_blocks(&mut y, d, d, |_, block| vectorized(#[inline(always)] || {
                for row in block.chunks_mut(d) {
                    softmax_row(row)
                }
            }));
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward(s, l)
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if p.device().is_cuda() {
            return gpu::backward(p, g).map(Some);
        }
        Ok(Some(softmax_bwd(p, g, 1.0)?))
    }
}

/// In place: row ← softmax(row), the max subtracted first (as the composition does).
#[inline(always)]
pub(crate) fn softmax_row<T: Real>(row: &mut [T]) {
    let max = row_max(row);
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let sum = row_sum(row, |v| v);
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// In place: g ← scale · p ⊙ (g − Σ g p), the softmax Jacobian of one row applied to g (the
/// dot product in [`LANES`] partial sums).
#[inline(always)]
pub(crate) fn softmax_bwd_row<T: Real>(g: &mut [T], p: &[T], scale: T) {
    let mut lanes = [T::from_f64(0.0); LANES];
    for (gc, pc) in g.chunks(LANES).zip(p.chunks(LANES)) {
        for ((l, &g), &p) in lanes.iter_mut().zip(gc).zip(pc) {
            *l += g * p;
        }
    }
    let dot = lanes.iter().fold(T::from_f64(0.0), |a, &v| a + v);
    for (g, &p) in g.iter_mut().zip(p) {
        *g = scale * p * (*g - dot);
    }
}

/// dx = scale · p ⊙ (g − Σ g p), per row: the softmax Jacobian applied to g.
fn softmax_bwd(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let d = p.dim(D::Minus1)?;
    by_dtype!(p.dtype(), T => {
        let mut dx = values::<T>(g)?;
        let scale = T::from_f64(scale);
        with_values::<T, _>(p, |p_v| par_blocks(&mut dx, d, d, |first, block| vectorized(#[inline(always)] || {
            for (r, row) in block.chunks_mut(d).enumerate() {
                softmax_bwd_row(row, &p_v[(first + r) * d..(first + r + 1) * d], scale);
            }
        })))?;
        Tensor::from_vec(dx, p.shape(), p.device())
    })
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Softmax)
}

/// The CUDA side: one launch each way, a block per row.
#[cfg(feature = "cuda")]
mod gpu {
    use crate::kernels::cuda::{self, Arg, Held, SOFTMAX};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Layout, Result, Shape, Tensor, D};

    pub fn forward(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (dev, dtype) = (s.device().clone(), s.dtype());
        let d = l.dims().last().copied().unwrap_or(1);
        let rows = l.shape().elem_count() / d.max(1);
        let out = cuda::alloc(&dev, dtype, rows * d)?;
        if rows > 0 && d > 0 {
            let stream = dev.cuda_stream();
            let ((xp, _x), (yp, _y)) = (cuda::ptr(s, l, &stream)?, cuda::buf(&out, &stream)?);
            let args = [Arg::Ptr(xp), Arg::Ptr(yp), Arg::I32(d as i32)];
            // SAFETY: x and y hold rows × d elements.
            unsafe {
                cuda::run(
                    &dev,
                    &SOFTMAX,
                    &cuda::typed("softmax_fwd", dtype)?,
                    cuda::rows_config(rows, d),
                    &args,
                )?
            };
        }
        Ok((out, l.shape().clone()))
    }

    /// dx = p ⊙ (g − Σ g p).
    pub fn backward(p: &Tensor, g: &Tensor) -> Result<Tensor> {
        let g = g.contiguous()?;
        let (dev, dtype) = (cuda::device_of(p)?, p.dtype());
        let d = p.dim(D::Minus1)?;
        let rows = p.elem_count() / d.max(1);
        let dx = cuda::alloc(&dev, dtype, rows * d)?;
        if rows > 0 && d > 0 {
            let stream = dev.cuda_stream();
            let (ph, gh) = (Held::new(p)?, Held::new(&g)?);
            let ((pp, _p), (gp, _g), (dxp, _dx)) =
                (ph.ptr(&stream)?, gh.ptr(&stream)?, cuda::buf(&dx, &stream)?);
            let args = [
                Arg::Ptr(pp),
                Arg::Ptr(gp),
                Arg::Ptr(dxp),
                Arg::I32(d as i32),
            ];
            // SAFETY: p, g and dx hold rows × d elements.
            unsafe {
                cuda::run(
                    &dev,
                    &SOFTMAX,
                    &cuda::typed("softmax_bwd", dtype)?,
                    cuda::rows_config(rows, d),
                    &args,
                )?
            };
        }
        Ok(cuda::tensor(dx, p.shape()))
    }
}
