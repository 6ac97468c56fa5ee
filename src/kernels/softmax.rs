//! Softmax over the last dimension, and the row kernels of its forward and backward that the
//! attention core reuses. Composition twin: `models::ops::softmax_last_dim_composed`.

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

    fn bwd(&self, _x: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
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
