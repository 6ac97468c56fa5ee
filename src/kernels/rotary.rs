//! Rotate-half rotary embedding: the `RopeTables` row kernel (which packed attention applies
//! to its q and k heads) and the op over `[.., t, head_dim]` rows, on the CPU and (in `gpu`,
//! kernel in `cuda/rotary.cu`) on CUDA. Composition twin: `models::ops::rotary_composed`.

use super::cpu::{by_dtype, last_dim, par_blocks, slice, Real};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};

/// cos and sin tables `[t, rot]` of a rotary embedding.
#[derive(Clone, Copy)]
pub(crate) struct RopeTables<'a, T> {
    cos: &'a [T],
    sin: &'a [T],
    rot: usize,
}

impl<'a, T: Real> RopeTables<'a, T> {
    pub(crate) fn new(cos: &'a [T], sin: &'a [T], t: usize) -> Self {
        let rot = cos.len() / t.max(1);
        Self { cos, sin, rot }
    }

    /// Rotate-half in place on the first `rot` features of each `d`-wide row of `x`, whose first
    /// row sits at position `first` (positions wrap every t rows): for i < rot/2 = h,
    /// y_i = x_i cos_i − x_{i+h} sin_i and y_{i+h} = x_{i+h} cos_{i+h} + x_i sin_{i+h}.
    /// `transpose` applies the rotation's transpose (its backward) instead:
    /// dx_i = g_i cos_i + g_{i+h} sin_{i+h}, dx_{i+h} = g_{i+h} cos_{i+h} − g_i sin_i.
    #[inline(always)]
    pub(crate) fn rotate_rows(&self, x: &mut [T], first: usize, d: usize, transpose: bool) {
        let (rot, half) = (self.rot, self.rot / 2);
        let t = self.cos.len() / rot.max(1);
        if rot == 0 {
            return;
        }
        for (r, row) in x.chunks_mut(d).enumerate() {
            let pos = (first + r) % t;
            let (c, s) = (&self.cos[pos * rot..][..rot], &self.sin[pos * rot..][..rot]);
            for i in 0..half {
                let (x1, x2) = (row[i], row[i + half]);
                if transpose {
                    row[i] = x1 * c[i] + x2 * s[i + half];
                    row[i + half] = x2 * c[i + half] - x1 * s[i];
                } else {
                    row[i] = x1 * c[i] - x2 * s[i];
                    row[i + half] = x2 * c[i + half] + x1 * s[i + half];
                }
            }
        }
    }
}

/// Rotary embedding of `[.., t, head_dim]` rows with `[t, rot_dim]` tables (see
/// [`RopeTables::rotate_rows`]); `transpose`: the rotation's transpose, which is its backward.
struct Rotary {
    transpose: bool,
}

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
        let t = cl.dims().first().copied().unwrap_or(1);
        let out = by_dtype!(s.dtype(), T => {
            let rope = RopeTables::new(slice::<T>(cs, cl)?, slice::<T>(ss, sl)?, t);
            let mut y = slice::<T>(s, l)?.to_vec();
            par_blocks(&mut y, d, d, |first, block| rope.rotate_rows(block, first, d, self.transpose));
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::rotate((s, l), (cs, cl), (ss, sl), self.transpose)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let transpose = Rotary {
            transpose: !self.transpose,
        };
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &transpose)?;
        Ok((Some(dx), None, None))
    }
}

/// Whether [`rotary`] handles these shapes: `[t, rot_dim]` tables whose t matches the rows'
/// second-to-last dimension (per-row position tables, as in cached decoding, are not).
pub fn rotary_applies(xs: &Tensor, cos: &Tensor) -> bool {
    cos.rank() == 2
        && xs.rank() >= 2
        && xs.dims()[xs.rank() - 2] == cos.dims()[0]
        && cos.dims()[1].is_multiple_of(2)
}

/// Rotary embedding (see [`rotary_applies`] for the shapes), differentiable in x.
pub fn rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rotary { transpose: false },
    )
}

/// The CUDA side: one launch, a thread per rotated pair (or copied feature); the backward is
/// the same kernel with the rotation transposed.
#[cfg(feature = "cuda")]
mod gpu {
    use crate::kernels::cuda::{self, Arg, ROTARY};
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Layout, Result, Shape};

    type Input<'a> = (&'a CudaStorage, &'a Layout);

    pub fn rotate(
        x: Input,
        cos: Input,
        sin: Input,
        transpose: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let (dev, dtype) = (x.0.device().clone(), x.0.dtype());
        let d = x.1.dims().last().copied().unwrap_or(1);
        let rows = x.1.shape().elem_count() / d.max(1);
        let (t, rot) = match cos.1.dims() {
            &[t, rot] => (t, rot),
            other => candle_core::bail!("rotary: tables of shape {other:?}, expected [t, rot]"),
        };
        let out = cuda::alloc(&dev, dtype, rows * d)?;
        let pairs = rows * (d - rot / 2);
        if pairs > 0 {
            let stream = dev.cuda_stream();
            let ((xp, _x), (cp, _c), (sp, _s), (yp, _y)) = (
                cuda::ptr(x.0, x.1, &stream)?,
                cuda::ptr(cos.0, cos.1, &stream)?,
                cuda::ptr(sin.0, sin.1, &stream)?,
                cuda::buf(&out, &stream)?,
            );
            let args = [
                Arg::Ptr(xp),
                Arg::Ptr(cp),
                Arg::Ptr(sp),
                Arg::Ptr(yp),
                Arg::I64(rows as i64),
                Arg::I32(d as i32),
                Arg::I32(t as i32),
                Arg::I32(rot as i32),
                Arg::I32(transpose as i32),
            ];
            // SAFETY: x and y hold rows × d elements, the tables t × rot with rot ≤ d.
            unsafe {
                cuda::run(
                    &dev,
                    &ROTARY,
                    &cuda::typed("rotary", dtype)?,
                    cuda::elementwise_config(pairs),
                    &args,
                )?
            };
        }
        Ok((out, x.1.shape().clone()))
    }
}
