//! Fused CPU kernels, with a backward, for the differentiable building blocks of
//! [`super::ops`]: softmax, layer norm, RMS norm and rotary embedding, plus the threading and
//! vectorising helpers the fused kernels share (`fast_attention.rs`, `fast_dense.rs`,
//! `output.rs`, the optimiser).
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

/// The float types the kernels are written for. f32 takes the vectorisable [`exp_f32`] and
/// [`erf_f32`]; f64 (the gradient checks' type) the exact functions.
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// Runs `f` compiled a second time for AVX2 + FMA, where the CPU has them: the crate targets
/// baseline x86-64 (SSE2), where the elementwise loops vectorise four lanes wide at best. `f`
/// and what it calls must be inlined into it, or they run as baseline code: LLVM leaves a large
/// closure out of line, so callers mark theirs `#[inline(always)]`, as are the helpers here.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { vectorized_avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn vectorized_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Lanes of the reductions below: independent accumulators, so that the loop vectorises
/// (a single float accumulator fixes the order of the additions and forbids it).
const LANES: usize = 16;

/// The largest value of a row (−∞ for an empty one).
#[inline(always)]
pub(crate) fn row_max<T: Real>(x: &[T]) -> T {
    let mut lanes = [T::from_f64(f64::NEG_INFINITY); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    rest.iter().chain(&lanes).fold(
        T::from_f64(f64::NEG_INFINITY),
        |m, &v| if v > m { v } else { m },
    )
}

/// Σ f(x_i) over a row, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn row_sum<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut lanes = [T::from_f64(0.0); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    lanes.iter().fold(T::from_f64(0.0), |a, &v| a + v)
        + rest.iter().fold(T::from_f64(0.0), |a, &v| a + f(v))
}

/// eˣ in f32 to within 2 ulp, branch-free so that loops over it vectorise (libm's `expf` is a
/// call per element): Cody–Waite reduction x = n ln 2 + r, Cephes' degree-6 polynomial for eʳ,
/// 2ⁿ built in the exponent bits. Exactly 0 below −87.3 (where eˣ leaves the normal range).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    // 2ⁿ from its biased exponent n + 127 (in 1..=254), read out of the mantissa of n + 127 + 2²³
    // and shifted into place: float-to-int `as` casts saturate, which does not vectorise.
    let two_n = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    let e = (p * r * r + r + 1.0) * two_n;
    if x < -87.3 {
        0.0
    } else {
        e
    }
}

/// erf in f32 to within 3e-7 absolute, branch-free like [`exp_f32`]: 1 − erfc(|x|) with
/// Numerical Recipes' Chebyshev fit of erfc (relative error below 1.2e-7), sign restored.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    (1.0 - t * exp_f32(poly - z * z)).copysign(x)
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
pub(crate) fn values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Calls `f` on a CPU tensor's values, in order, without copying them when it is contiguous.
pub(crate) fn with_values<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("fused CPU op: tensor is not on the CPU")
    };
    Ok(f(slice::<T>(cpu, layout)?))
}

/// A matrix operand: its data, column stride and row stride.
pub(crate) type Operand<'a, T> = (&'a [T], usize, usize);

/// dst (m × n, rows `dst_rs` apart) = lhs (m × k) · rhs (k × n), or dst + lhs · rhs with
/// `accumulate`; gemm on `threads` (`None`: the calling thread). Checks the operands' bounds.
///
/// # Safety
/// `dst` must be valid for writes of (m − 1) · dst_rs + n elements, initialised where
/// `accumulate` reads them; unread entries may be uninitialised (gemm writes them all).
pub(crate) unsafe fn gemm_into<T: WithDType>(
    dst: *mut T,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    accumulate: bool,
    threads: gemm::Parallelism,
) {
    let fits = |(data, cs, rs): Operand<T>, r: usize, c: usize| {
        r == 0 || c == 0 || data.len() > (r - 1) * rs + (c - 1) * cs
    };
    assert!(fits(lhs, m, k) && fits(rhs, k, n));
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the operands are bounded above; dst is the caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            threads,
        )
    }
}

/// Threads of rayon's global pool, which the fused kernels and gemm run on. (candle's
/// `get_num_threads` asks the OS, reading cgroup files, on every call.)
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
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
    use rayon::prelude::*;
    let rows = if row_len == 0 { 0 } else { out.len() / row_len };
    let Some(per) = rows_per_thread(rows, row_cost) else {
        return vec![f(0, out)];
    };
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .map(|(i, block)| f(i * per, block))
        .collect()
}

/// Rows per thread when `rows` rows of `row_cost` elements are worth splitting, else `None`.
fn rows_per_thread(rows: usize, row_cost: usize) -> Option<usize> {
    let threads = threads().clamp(1, rows.max(1));
    (threads > 1 && rows * row_cost >= PARALLEL_MIN).then(|| rows.div_ceil(threads))
}

/// Read-only companion of [`par_blocks`]: calls `f` on one range of `0..len` per thread.
pub(crate) fn par_ranges<R: Send>(
    len: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    use rayon::prelude::*;
    let Some(per) = rows_per_thread(len, 1) else {
        return vec![f(0..len)];
    };
    (0..len.div_ceil(per))
        .into_par_iter()
        .map(|i| f(i * per..((i + 1) * per).min(len)))
        .collect()
}

/// Sums per-thread partial vectors (weight and bias gradients of the norms).
pub(crate) fn sum_partials<T: WithDType>(partials: Vec<Vec<T>>, len: usize) -> Vec<T> {
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
        && cos.dims()[1] % 2 == 0
}

/// Rotary embedding (see [`rotary_applies`] for the shapes), differentiable in x.
pub fn rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rotary { transpose: false },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error in units of f32's epsilon, against the f64 functions.
    fn ulps(approx: f32, exact: f64) -> f64 {
        (approx as f64 - exact).abs()
            / (exact.abs().max(f32::MIN_POSITIVE as f64) * f32::EPSILON as f64)
    }

    #[test]
    fn exp_f32_is_within_two_ulp_and_zero_below_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp()));
        }
        assert!(worst <= 2.0, "exp_f32 is off by {worst} ulp");
        assert_eq!(exp_f32(-1e9), 0.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn erf_f32_is_within_3e7_absolute() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -6.0 + 12.0 * i as f32 / 100_000.0;
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf_f32(x) as f64 - exact).abs());
        }
        println!("erf_f32 worst {worst:e}");
        assert!(worst < 3e-7, "erf_f32 is off by {worst}");
        assert_eq!(erf_f32(0.0), 0.0);
        assert!(erf_f32(-10.0) == -1.0 && erf_f32(10.0) == 1.0);
    }

    #[test]
    fn lane_reductions_cover_remainders() {
        let x: Vec<f64> = (0..37).map(|i| ((i * 7) % 11) as f64 - 3.0).collect();
        assert_eq!(row_max(&x), 7.0);
        assert_eq!(row_sum(&x, |v| v * 2.0), 2.0 * x.iter().sum::<f64>());
        assert_eq!(row_max::<f64>(&[]), f64::NEG_INFINITY);
    }
}
