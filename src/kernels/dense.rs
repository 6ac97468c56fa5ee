//! Fused CPU kernels, with a backward, for the dense layers and MLP activations of the models.
//!
//! A dense layer composed of candle ops (broadcast weight, transpose, matmul, broadcast bias) is
//! four graph nodes; candle's backward then sums the broadcast weight's gradient over the batch
//! in a strided reduction and adds every node's gradient onto a fresh tensor of zeros. Here the
//! layer is one node: the bias is written into the output before gemm accumulates onto it, and
//! the backward is two matmuls and a column sum. The activations (GELU, SiLU, ReLU) are one
//! multi-threaded pass each way, where candle's are single-threaded (and its GELU's backward is
//! a dozen elementwise ops). Composition twins: `models::ops::dense_composed` and
//! `Activation::apply_composed`.
//!
//! A frozen operand (LoRA's base weights, or the first block's input) gets no gradient here,
//! and [`frozen_dense`] is the device-independent op for a frozen weight off the fused path.

use super::cpu::{
    by_dtype, gemm_into, par_blocks, par_ranges, slice, sum_partials, threads, vectorized,
    with_values, Operand, Real,
};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage,
    Tensor, WithDType, D,
};

/// How a dense layer stores its weight: `nn.Linear`'s `[out, in]` or GPT-2 Conv1D's `[in, out]`.
#[derive(Clone, Copy, Debug)]
pub enum WeightLayout {
    OutIn,
    InOut,
}

struct Dense {
    layout: WeightLayout,
}

impl Dense {
    /// (rows, inputs, outputs) of `x · W`, checking the weight's shape.
    fn dims(&self, x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
        let n_in = x.dims().last().copied().unwrap_or(1);
        let rows = x.shape().elem_count() / n_in.max(1);
        let (w_in, n_out) = match (self.layout, w.dims()) {
            (WeightLayout::OutIn, &[o, i]) => (i, o),
            (WeightLayout::InOut, &[i, o]) => (i, o),
            (_, other) => bail!("dense layer: weight of shape {other:?} is not a matrix"),
        };
        if w_in != n_in {
            bail!("dense layer: input has {n_in} features, the weight expects {w_in}");
        }
        Ok((rows, n_in, n_out))
    }

    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n_in, n_out) = self.dims(x.1, w.1)?;
        let mut dims = x.1.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = n_out;
        let out = by_dtype!(x.0.dtype(), T => {
            let (xs, ws) = (slice::<T>(x.0, x.1)?, slice::<T>(w.0, w.1)?);
            let bias = bias.map(|(bs, bl)| slice::<T>(bs, bl)).transpose()?;
            let y = product((rows, n_out, n_in), (xs, 1, n_in), self.weight(ws, n_in, n_out, false), bias);
            T::to_cpu_storage_owned(y)
        });
        Ok((out, Shape::from(dims)))
    }

    /// W as the (column stride, row stride) operand of `x · W` (n_in × n_out), or of its
    /// transpose (n_out × n_in) for `x`'s gradient.
    fn weight<'a, T>(
        &self,
        w: &'a [T],
        n_in: usize,
        n_out: usize,
        transpose: bool,
    ) -> Operand<'a, T> {
        match (self.layout, transpose) {
            (WeightLayout::OutIn, false) => (w, n_in, 1),
            (WeightLayout::OutIn, true) => (w, 1, n_in),
            (WeightLayout::InOut, false) => (w, 1, n_out),
            (WeightLayout::InOut, true) => (w, n_out, 1),
        }
    }

    /// (dx, dW, db) from the output gradient `g`: dx = g Wᵀ, dW = gᵀ x (or xᵀ g for `[in,
    /// out]`), db = Σ rows of g; each only for an operand that takes a gradient (a frozen
    /// weight's would cost a matmul and then sit in candle's gradient store until the step ends).
    fn backward(&self, x: &Tensor, w: &Tensor, g: &Tensor, bias: Option<&Tensor>) -> Result<Grads> {
        let (n_in, n_out) = (x.dim(D::Minus1)?, g.dim(D::Minus1)?);
        let rows = x.elem_count() / n_in.max(1);
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (dx, dw) = by_dtype!(x.dtype(), T => {
            let (dx, dw) = with_values::<T, _>(g, |g| with_values::<T, _>(x, |x| with_values::<T, _>(w, |w| {
                let dx = want_dx.then(|| product((rows, n_in, n_out), (g, 1, n_out), self.weight(w, n_in, n_out, true), None));
                let dw = want_dw.then(|| match self.layout {
                    WeightLayout::OutIn => product((n_out, n_in, rows), (g, n_out, 1), (x, 1, n_in), None),
                    WeightLayout::InOut => product((n_in, n_out, rows), (x, n_in, 1), (g, 1, n_out), None),
                });
                (dx, dw)
            })))???;
            (
                dx.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?,
                dw.map(|v| Tensor::from_vec(v, w.shape(), w.device())).transpose()?,
            )
        });
        let db = match bias {
            Some(b) if b.track_op() => Some(column_sums(&g.reshape(((), n_out))?)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

/// The gradients of a dense layer's operands, `None` for those that take none.
type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// lhs (m × k) · rhs (k × n) as a new row-major m × n matrix, on rayon's pool. With a
/// `bias` row, each row starts as it and the product is added on; without, the buffer is not
/// written before gemm overwrites it (a zeroing pass would be one more trip through memory, on
/// one thread).
fn product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    bias: Option<&[T]>,
) -> Vec<T> {
    assert!(bias.is_none_or(|b| b.len() == n));
    let zero = T::from_f64(0.0);
    let mut y = match bias {
        Some(b) => {
            let mut y = vec![zero; m * n];
            par_blocks(&mut y, n, n, |_, block| {
                block.chunks_mut(n).for_each(|r| r.copy_from_slice(b))
            });
            y
        }
        None if k == 0 => vec![zero; m * n],
        None => Vec::with_capacity(m * n),
    };
    // SAFETY: y has room for m × n, which gemm writes in full (reading it first only when it
    // was filled); with k = 0 it was filled above.
    unsafe {
        gemm_into(
            y.as_mut_ptr(),
            n,
            (m, n, k),
            lhs,
            rhs,
            bias.is_some(),
            parallelism(),
        );
        y.set_len(m * n);
    }
    y
}

/// gemm's threading: rayon's pool, as in candle's own matmul.
fn parallelism() -> gemm::Parallelism {
    match threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Σ over rows of a contiguous `[rows, n]` matrix.
fn column_sums(g: &Tensor) -> Result<Tensor> {
    let n = g.dim(1)?;
    by_dtype!(g.dtype(), T => {
        let sums = with_values::<T, _>(g, |v| {
            let partials = par_ranges(v.len() / n.max(1), |rows| {
                let mut acc = vec![T::from_f64(0.0); n];
                for row in v[rows.start * n..rows.end * n].chunks(n) {
                    acc.iter_mut().zip(row).for_each(|(a, &r)| *a += r);
                }
                acc
            });
            sum_partials(partials, n)
        })?;
        Tensor::from_vec(sums, n, g.device())
    })
}

impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "fast-dense"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, g, None)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "fast-dense-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, g, Some(b))
    }
}

/// `x · Wᵀ + b` (or `x · W + b` for [`WeightLayout::InOut`]) over the last dimension of `x`,
/// differentiable in all three.
pub fn dense(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Dense { layout }),
        None => x.apply_op2(&w, Dense { layout }),
    }
}

/// `x · Wᵀ + b` (or `x · W + b`) where W and b are constants (LoRA's frozen base), on any
/// device and dtype: the composition's matmul would also compute ∂L/∂W in the backward, and
/// candle would keep it in the gradient store until the step ends — a second copy of every
/// frozen weight. This op is one graph node over `x` alone, whose backward is dx = g W.
pub fn frozen_dense(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let op = FrozenDense {
        w: w.detach().contiguous()?,
        bias: bias.map(|b| b.detach().contiguous()).transpose()?,
        layout,
    };
    x.contiguous()?.apply_op1(op)
}

struct FrozenDense {
    w: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
}

impl FrozenDense {
    /// The forward on one backend's storage: one matmul (the weight read transposed in place)
    /// and the bias added by broadcasting, as the composition computes them.
    fn run<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        of: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let elsewhere =
            || candle_core::Error::Msg("frozen dense layer: operands on different devices".into());
        let (rows, n_in, n_out) = Dense {
            layout: self.layout,
        }
        .dims(xl, self.w.layout())?;
        let (w, wl) = self.w.storage_and_layout();
        let w = of(&w).ok_or_else(elsewhere)?;
        let rhs = match self.layout {
            WeightLayout::OutIn => {
                Layout::new((n_in, n_out).into(), vec![1, n_in], wl.start_offset())
            }
            WeightLayout::InOut => Layout::contiguous_with_offset((n_in, n_out), wl.start_offset()),
        };
        let lhs = Layout::contiguous_with_offset((rows, n_in), xl.start_offset());
        let mut y = x.matmul(w, (1, rows, n_out, n_in), &lhs, &rhs)?;
        if let Some(b) = &self.bias {
            let (bs, bl) = b.storage_and_layout();
            let bs = of(&bs).ok_or_else(elsewhere)?;
            let out = Layout::contiguous((rows, n_out));
            y =
                y.binary_impl::<candle_core::op::Add>(bs, &out, &bl.broadcast_as((rows, n_out))?)?;
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = n_out;
        Ok((y, Shape::from(dims)))
    }
}

impl CustomOp1 for FrozenDense {
    fn name(&self) -> &'static str {
        "frozen-dense"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.run(s, l, |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n_out = g.dim(D::Minus1)?;
        let w = match self.layout {
            WeightLayout::OutIn => self.w.clone(),
            WeightLayout::InOut => self.w.t()?,
        };
        g.reshape(((), n_out))?
            .matmul(&w)?
            .reshape(x.shape())
            .map(Some)
    }
}

/// The MLP activations of `transformers`' ACT2FN that the models accept (`hidden_act`).
#[derive(Clone, Copy, Debug)]
pub enum Activation {
    GeluTanh,
    GeluErf,
    Relu,
    Silu,
}

/// x Φ(x) and its derivative Φ(x) + x φ(x), φ(x) = exp(−x²/2) / √(2π).
#[inline(always)]
fn gelu_erf<T: Real>(x: T) -> (T, T) {
    let c = T::from_f64;
    let cdf = c(0.5) * (c(1.0) + (x * c(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (c(-0.5) * x * x).exp() * c(0.398_942_280_401_432_7);
    (x * cdf, cdf + x * pdf)
}

/// 0.5 x (1 + tanh u), u = √(2/π) (x + 0.044715 x³), and its derivative.
#[inline(always)]
fn gelu_tanh<T: Real>(x: T) -> (T, T) {
    let c = T::from_f64;
    let k = c(0.797_884_560_802_865_4);
    let u = k * (x + c(0.044715) * x * x * x);
    let th = c(1.0) - c(2.0) / ((c(2.0) * u).exp() + c(1.0));
    let du = k * (c(1.0) + c(3.0 * 0.044715) * x * x);
    let half = c(0.5) * (c(1.0) + th);
    (x * half, half + c(0.5) * x * (c(1.0) - th * th) * du)
}

/// x σ(x) and its derivative σ(x) (1 + x (1 − σ(x))).
#[inline(always)]
fn silu<T: Real>(x: T) -> (T, T) {
    let one = T::from_f64(1.0);
    let s = one / (one + (T::from_f64(0.0) - x).exp());
    (x * s, s * (one + x * (one - s)))
}

#[inline(always)]
fn relu<T: Real>(x: T) -> (T, T) {
    match x > T::from_f64(0.0) {
        true => (x, T::from_f64(1.0)),
        false => (T::from_f64(0.0), T::from_f64(0.0)),
    }
}

/// Runs `$body` with `$f` bound to the activation's (value, derivative) function, so that each
/// loop is compiled (and vectorised) for one activation.
macro_rules! by_activation {
    ($kind:expr, $t:ty, $f:ident => $body:expr) => {
        match $kind {
            Activation::GeluErf => {
                let $f = gelu_erf::<$t>;
                $body
            }
            Activation::GeluTanh => {
                let $f = gelu_tanh::<$t>;
                $body
            }
            Activation::Silu => {
                let $f = silu::<$t>;
                $body
            }
            Activation::Relu => {
                let $f = relu::<$t>;
                $body
            }
        }
    };
}

struct Act(Activation);

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "fast-activation"
    }

    // Both passes write a fresh buffer from their inputs on the threads (copying the input
    // first and working in place would be one more trip through memory, on one thread).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(s.dtype(), T => {
            let x = slice::<T>(s, l)?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            by_activation!(self.0, T, f => par_blocks(&mut y, 1, 8, |first, block| vectorized(#[inline(always)] || {
                for (y, &x) in block.iter_mut().zip(&x[first..]) {
                    *y = f(x).0
                }
            })));
            T::to_cpu_storage_owned(y)
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        by_dtype!(x.dtype(), T => {
            let mut dx = vec![T::from_f64(0.0); x.elem_count()];
            with_values::<T, _>(x, |xs| with_values::<T, _>(g, |gs| {
                by_activation!(self.0, T, f => par_blocks(&mut dx, 1, 8, |first, block| vectorized(#[inline(always)] || {
                    let (xs, gs) = (&xs[first..], &gs[first..]);
                    for ((dx, &x), &g) in block.iter_mut().zip(xs).zip(gs) {
                        *dx = g * f(x).1
                    }
                })))
            }))??;
            Tensor::from_vec(dx, x.shape(), x.device()).map(Some)
        })
    }
}

/// The activation, differentiable; `None` where the fused kernel does not apply (not on the
/// CPU, or not f32/f64).
pub fn activation(x: &Tensor, kind: Activation) -> Result<Option<Tensor>> {
    if !super::supports(&[x]) {
        return Ok(None);
    }
    x.contiguous()?.apply_op1(Act(kind)).map(Some)
}
