//! What the CPU kernels share: the [`Real`] float types with vectorisable [`exp_f32`] and
//! [`erf_f32`], AVX2 re-compilation ([`vectorized`]), lane-wise row reductions, the dtype
//! dispatch ([`by_dtype!`]), access to CPU storage, one gemm wrapper, and the split of rows over
//! rayon's threads.

use candle_core::{bail, CpuStorage, Layout, Result, Tensor, WithDType};

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
pub(crate) const LANES: usize = 16;

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
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    (1.0 - t * exp_f32(poly - z * z)).copysign(x)
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("fused CPU ops support f32 and f64, not {other:?}"),
        }
    };
}
pub(crate) use by_dtype;

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
    let rows = out.len().checked_div(row_len).unwrap_or(0);
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

/// The length of a layout's rows (its last dimension).
pub(crate) fn last_dim(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
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
