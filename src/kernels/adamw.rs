//! The optimiser's CPU fast path: f32 weights and moments updated in place, each by one
//! multi-threaded pass, with the clipping factor folded into the gradient reads. The tensor path
//! of `optim.rs` (its twin, which runs elsewhere) allocates a new tensor per elementwise op —
//! about ten passes over every parameter per step, which cost a quarter of a Pythia-160M step
//! on CPU.

use super::cpu::{par_blocks, par_ranges, slice, with_values};
use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// The update rule, with the settings the kernels read.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    AdamW { beta1: f64, beta2: f64, eps: f64 },
    Sgd,
}

/// Whether the in-place kernels take these tensors: f32, on the CPU, contiguous.
pub fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

fn data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => bail!("optimizer: expected a contiguous f32 tensor"),
    }
}

/// Σ x², accumulated in f64 per block of 4096 so that a 40M-element gradient keeps its digits.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    with_values::<f32, _>(t, |x| {
        let partials = par_ranges(x.len(), |range| {
            x[range]
                .chunks(4096)
                .map(|c| c.iter().map(|v| v * v).sum::<f32>() as f64)
                .sum::<f64>()
        });
        partials.into_iter().sum()
    })
}

/// One parameter's update (AdamW or SGD), as the tensor path computes it.
pub struct Update {
    pub lr: f64,
    pub decay: f64,
    pub grad_scale: f64,
    pub rule: Rule,
    pub step: usize,
}

impl Update {
    /// Adam's bias corrections (1 − β₁ᵗ, 1 − β₂ᵗ); (1, 1) for SGD.
    pub fn bias_corrections(&self) -> (f64, f64) {
        match self.rule {
            Rule::AdamW { beta1, beta2, .. } => (
                1.0 - beta1.powi(self.step as i32),
                1.0 - beta2.powi(self.step as i32),
            ),
            Rule::Sgd => (1.0, 1.0),
        }
    }

    /// Updates `m` and `v` (AdamW) from `g`, then `w` from them (or from `g`, for SGD).
    pub fn run(&self, w: &Tensor, g: &Tensor, moments: Option<(&Tensor, &Tensor)>) -> Result<()> {
        match (self.rule, moments) {
            (Rule::AdamW { beta1, beta2, .. }, Some((m, v))) => {
                m.inplace_op2(
                    g,
                    &Moment {
                        beta: beta1,
                        scale: self.grad_scale,
                        square: false,
                    },
                )?;
                v.inplace_op2(
                    g,
                    &Moment {
                        beta: beta2,
                        scale: self.grad_scale,
                        square: true,
                    },
                )?;
                w.inplace_op3(m, v, self)
            }
            (Rule::Sgd, _) => w.inplace_op2(g, self),
            (Rule::AdamW { .. }, None) => bail!("optimizer: AdamW moments missing"),
        }
    }

    /// The decay factor and the learning rate, in f32 as the kernels use them.
    fn factors(&self) -> (f32, f32) {
        ((1.0 - self.lr * self.decay) as f32, self.lr as f32)
    }
}

/// An exponential moving average of the (scaled) gradient or of its square, in place.
struct Moment {
    beta: f64,
    scale: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (beta, rest, scale) = (
            self.beta as f32,
            (1.0 - self.beta) as f32,
            self.scale as f32,
        );
        update_with((s1, l1), (s2, l2), |m, g| {
            let g = g * scale;
            beta * m + rest * if self.square { g * g } else { g }
        })
    }
}

/// `dst[i] ← f(dst[i], src[i])` over two contiguous f32 tensors, split over the threads.
fn update_with(
    (s1, l1): (&mut CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    let dst = data_mut(s1, l1)?;
    let src = slice::<f32>(s2, l2)?;
    par_blocks(dst, 1, 3, |first, block| {
        for (d, &s) in block.iter_mut().zip(&src[first..]) {
            *d = f(*d, s);
        }
    });
    Ok(())
}

/// AdamW: w ← w·(1 − lr·decay) − lr · (m / bc1) / (√(v / bc2) + eps).
impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let Rule::AdamW { eps, .. } = self.rule else {
            bail!("optimizer: the AdamW update needs AdamW settings")
        };
        let w = data_mut(s1, l1)?;
        let (m, v) = (slice::<f32>(s2, l2)?, slice::<f32>(s3, l3)?);
        let (keep, lr) = self.factors();
        let (bc1, bc2) = self.bias_corrections();
        let (inv_bc1, inv_bc2, eps) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32, eps as f32);
        par_blocks(w, 1, 4, |first, block| {
            let range = first..first + block.len();
            for ((w, &m), &v) in block.iter_mut().zip(&m[range.clone()]).zip(&v[range]) {
                *w = *w * keep - lr * (m * inv_bc1) / ((v * inv_bc2).sqrt() + eps);
            }
        });
        Ok(())
    }
}

/// SGD: w ← w·(1 − lr·decay) − lr · scale · g.
impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "sgd-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (keep, lr) = self.factors();
        let step = lr * self.grad_scale as f32;
        update_with((s1, l1), (s2, l2), |w, g| w * keep - step * g)
    }
}
