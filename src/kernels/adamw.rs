//! The optimiser's fast paths. On the CPU: f32 weights and moments updated in place, each by one
//! multi-threaded pass, with the clipping factor folded into the gradient reads. On CUDA
//! ([`Fused`], kernels in `cuda/adamw.cu`): every parameter in one launch per pass — Σ g² per
//! chunk, then the global norm and clipping factor on the device, then the update, which also
//! writes the bf16 copy of each f32 master under mixed precision — so a step reads one number
//! back (the norm, for the metrics and the finiteness check) instead of one per parameter. The
//! tensor path of `optim.rs` (their twin, which runs elsewhere) allocates a new tensor per
//! elementwise op — about ten passes over every parameter per step, which cost a quarter of a
//! Pythia-160M step on CPU.

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

/// One parameter of a [`Fused`] update.
pub struct Slot<'a> {
    /// The f32 weights updated: the master copy, or the parameter itself.
    pub w: &'a Tensor,
    /// AdamW's moments (f32); `None` for SGD.
    pub moments: Option<(&'a Tensor, &'a Tensor)>,
    /// The accumulated f32 gradient.
    pub g: &'a Tensor,
    /// The half-precision parameter to write after the update, under mixed precision.
    pub copy: Option<&'a Tensor>,
    /// Decoupled weight decay (0 for biases and norm weights).
    pub decay: f64,
}

/// The CUDA optimiser over all parameters at once: [`Fused::clip`] then [`Fused::update`].
pub struct Fused<'a> {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    slots: &'a [Slot<'a>],
}

impl<'a> Fused<'a> {
    /// `None` unless every tensor is contiguous, on one CUDA device, f32 (the copies one
    /// half-precision dtype), with moments for all or none: then the tensor path runs.
    pub fn new(slots: &'a [Slot<'a>]) -> Option<Self> {
        let first = slots.first()?;
        let device = first.w.device();
        let f32_here = |t: &Tensor| {
            t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(device)
        };
        let copy_dtype = first.copy.map(Tensor::dtype);
        let fits = device.is_cuda()
            && cfg!(feature = "cuda")
            && slots.iter().all(|s| {
                f32_here(s.w)
                    && f32_here(s.g)
                    && s.g.elem_count() == s.w.elem_count()
                    && s.moments.is_some() == first.moments.is_some()
                    && s.moments.is_none_or(|(m, v)| f32_here(m) && f32_here(v))
                    && s.copy.map(Tensor::dtype) == copy_dtype
                    && s.copy.is_none_or(|c| {
                        c.is_contiguous()
                            && c.device().same_device(device)
                            && c.elem_count() == s.w.elem_count()
                    })
            })
            && matches!(copy_dtype, None | Some(DType::BF16) | Some(DType::F16));
        fits.then_some(Self { slots })
    }

    /// `[‖g‖, clipping factor]` (f32, on the device) for global-norm clipping at `max_norm` (0:
    /// no clipping), computed without leaving the device.
    pub fn clip(&self, max_norm: f64) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return gpu::clip(self.slots, max_norm);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = max_norm;
            bail!("optimizer: built without CUDA")
        }
    }

    /// One update of every slot by `update` (its `decay` and `grad_scale` are ignored: each
    /// slot's decay applies, and the clipping factor is read from `clip` on the device).
    pub fn update(&self, update: &Update, clip: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        return gpu::update(self.slots, update, clip);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (update, clip);
            bail!("optimizer: built without CUDA")
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{Rule, Slot, Update};
    use crate::kernels::cuda::{self, Arg, Held, ADAMW};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaDevice, DType, Result, Tensor};

    /// Elements per block of the multi-tensor kernels.
    const CHUNK: usize = 1 << 16;
    const THREADS: u32 = 256;

    /// The device-side slot table (`Slot` in `cuda/adamw.cu`: five addresses, the length, and
    /// the decay factor as f32 bits in the low half of the last word) and the chunk prefix sums.
    struct Table {
        slots: Tensor,
        chunk_start: Tensor,
        chunks: usize,
    }

    fn table(dev: &CudaDevice, slots: &[Slot], keep: impl Fn(&Slot) -> f32) -> Result<Table> {
        let stream = dev.cuda_stream();
        let mut words: Vec<i64> = Vec::with_capacity(7 * slots.len());
        let mut chunk_start = vec![0u32];
        let held: Vec<[Option<Held>; 5]> = slots
            .iter()
            .map(|s| {
                Ok([
                    Some(Held::new(s.w)?),
                    s.moments.map(|(m, _)| Held::new(m)).transpose()?,
                    s.moments.map(|(_, v)| Held::new(v)).transpose()?,
                    Some(Held::new(s.g)?),
                    s.copy.map(Held::new).transpose()?,
                ])
            })
            .collect::<Result<_>>()?;
        for (s, h) in slots.iter().zip(&held) {
            for t in h {
                let p = t.as_ref().map(|h| h.ptr(&stream)).transpose()?;
                words.push(p.map_or(0, |(p, _)| p as i64));
            }
            words.push(s.w.elem_count() as i64);
            words.push(keep(s).to_bits() as i64);
            let last = *chunk_start.last().expect("starts with 0");
            chunk_start.push(last + s.w.elem_count().div_ceil(CHUNK) as u32);
        }
        let device = candle_core::Device::Cuda(dev.clone());
        let chunks = *chunk_start.last().expect("starts with 0") as usize;
        Ok(Table {
            slots: Tensor::from_vec(words, 7 * slots.len(), &device)?,
            chunk_start: Tensor::from_vec(chunk_start, slots.len() + 1, &device)?,
            chunks,
        })
    }

    fn grid(blocks: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn clip(slots: &[Slot], max_norm: f64) -> Result<Tensor> {
        let dev = cuda::device_of(slots[0].w)?;
        let t = table(&dev, slots, |_| 1.0)?;
        let partials = cuda::alloc(&dev, DType::F64, t.chunks.max(1))?;
        let out = cuda::alloc(&dev, DType::F32, 2)?;
        {
            let stream = dev.cuda_stream();
            let (sh, ch) = (Held::new(&t.slots)?, Held::new(&t.chunk_start)?);
            let ((sp, _s), (cp, _c)) = (sh.ptr(&stream)?, ch.ptr(&stream)?);
            let ((pp, _p), (op, _o)) = (cuda::buf(&partials, &stream)?, cuda::buf(&out, &stream)?);
            let n = Arg::I32(slots.len() as i32);
            // SAFETY: the tables describe live f32 buffers of the lengths given; partials holds
            // one double per chunk and out two floats.
            unsafe {
                if t.chunks > 0 {
                    let args = [
                        Arg::Ptr(sp),
                        Arg::Ptr(cp),
                        n,
                        Arg::I32(CHUNK as i32),
                        Arg::Ptr(pp),
                    ];
                    cuda::run(&dev, &ADAMW, "sumsq", grid(t.chunks), &args)?;
                }
                let args = [
                    Arg::Ptr(pp),
                    Arg::I32(t.chunks as i32),
                    Arg::F64(max_norm),
                    Arg::Ptr(op),
                ];
                cuda::run(&dev, &ADAMW, "clip_factor", grid(1), &args)?;
            }
        }
        Ok(cuda::tensor(out, 2))
    }

    pub fn update(slots: &[Slot], update: &Update, clip: &Tensor) -> Result<()> {
        let dev = cuda::device_of(slots[0].w)?;
        let t = table(&dev, slots, |s| (1.0 - update.lr * s.decay) as f32)?;
        if t.chunks == 0 {
            return Ok(());
        }
        let copy_kind = match slots[0].copy.map(Tensor::dtype) {
            None => 0,
            Some(DType::BF16) => 1,
            Some(_) => 2,
        };
        let stream = dev.cuda_stream();
        let (sh, ch, kh) = (
            Held::new(&t.slots)?,
            Held::new(&t.chunk_start)?,
            Held::new(clip)?,
        );
        let ((sp, _s), (cp, _c), (kp, _k)) = (sh.ptr(&stream)?, ch.ptr(&stream)?, kh.ptr(&stream)?);
        let head = [
            Arg::Ptr(sp),
            Arg::Ptr(cp),
            Arg::I32(slots.len() as i32),
            Arg::I32(CHUNK as i32),
            Arg::Ptr(kp),
            Arg::F32(update.lr as f32),
        ];
        let copy = Arg::I32(copy_kind);
        // SAFETY: as in `clip`; the kernel writes w, m, v and the copies in place, which nothing
        // else on the stream touches meanwhile.
        unsafe {
            match update.rule {
                Rule::AdamW { beta1, beta2, eps } => {
                    let (bc1, bc2) = update.bias_corrections();
                    let mut args = head.to_vec();
                    args.extend([
                        Arg::F32(beta1 as f32),
                        Arg::F32((1.0 - beta1) as f32),
                        Arg::F32(beta2 as f32),
                        Arg::F32((1.0 - beta2) as f32),
                        Arg::F32(eps as f32),
                        Arg::F32((1.0 / bc1) as f32),
                        Arg::F32((1.0 / bc2) as f32),
                        copy,
                    ]);
                    cuda::run(&dev, &ADAMW, "adamw", grid(t.chunks), &args)
                }
                Rule::Sgd => {
                    let mut args = head.to_vec();
                    args.push(copy);
                    cuda::run(&dev, &ADAMW, "sgd", grid(t.chunks), &args)
                }
            }
        }
    }
}
