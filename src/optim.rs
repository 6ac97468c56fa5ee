//! Optimisers (AdamW, SGD) whose state is ours to save, the learning-rate schedule, global
//! gradient-norm clipping, and gradient accumulation across micro-batches.
//!
//! candle-nn's AdamW keeps its moments private and decays every tensor; this one follows
//! `transformers`' Trainer: no weight decay on biases and norm weights (rank-1 tensors).

use crate::config::SchedulerType;
use crate::kernels::adamw;
use crate::models::Param;
use anyhow::{anyhow, bail, Result};
use candle_core::{backprop::GradStore, DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Sum of per-micro-batch gradients, one slot per parameter.
pub struct GradAccumulator {
    grads: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        Self {
            grads: vec![None; n],
        }
    }

    /// Adds this micro-batch's gradients (already scaled by the caller's loss weighting).
    pub fn add(&mut self, params: &[Param], store: &GradStore) -> Result<()> {
        for (slot, p) in self.grads.iter_mut().zip(params) {
            if let Some(g) = store.get(p.var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Global L2 norm of the accumulated gradients. Off the CPU, the per-gradient sums stay on
    /// the device and only the total is read back.
    pub fn norm(&self) -> Result<f64> {
        let mut total = 0f64;
        let mut on_device = Vec::new();
        for g in self.grads.iter().flatten() {
            match (adamw::applies(&[g]), g.device().is_cpu()) {
                (true, _) => total += adamw::sum_of_squares(g)?,
                (false, true) => total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64,
                (false, false) => on_device.push(g.sqr()?.sum_all()?.to_dtype(DType::F64)?),
            }
        }
        if !on_device.is_empty() {
            total += Tensor::stack(&on_device, 0)?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(total.sqrt())
    }

    /// Global-norm clipping as `torch.nn.utils.clip_grad_norm_`: returns the norm before clipping
    /// and the factor min(1, max_norm / (norm + 1e-6)) by which the gradients are to be scaled
    /// (1 when `max_norm` is 0, which HF's Trainer reads as no clipping). Like torch's, the
    /// factor is applied whenever it is below 1, so a norm within 1e-6 of `max_norm` is scaled
    /// too. [`Optimizer::apply`] takes the factor rather than this rewriting every gradient.
    pub fn clip(&self, max_norm: f64) -> Result<(f64, f64)> {
        let norm = self.norm()?;
        let scale = match max_norm > 0.0 {
            true => (max_norm / (norm + 1e-6)).min(1.0),
            false => 1.0,
        };
        Ok((norm, scale))
    }

    pub fn grads(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// The slots themselves: a data-parallel run replaces them with their sums over ranks.
    pub fn grads_mut(&mut self) -> &mut [Option<Tensor>] {
        &mut self.grads
    }
}

/// Optimiser hyper-parameters.
#[derive(Debug, Clone)]
pub enum OptimizerKind {
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    Sgd {
        weight_decay: f64,
    },
}

/// An optimiser with explicit, saveable state.
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// Steps taken (Adam's bias correction uses it).
    pub step: usize,
    /// Adam's first and second moments, per parameter (f32).
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &[Param]) -> Result<Self> {
        let zeros = |p: &Param| p.var.as_tensor().zeros_like()?.to_dtype(DType::F32);
        let (m, v) = match kind {
            OptimizerKind::AdamW { .. } => (
                params
                    .iter()
                    .map(zeros)
                    .collect::<candle_core::Result<Vec<_>>>()?,
                params
                    .iter()
                    .map(zeros)
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            OptimizerKind::Sgd { .. } => (Vec::new(), Vec::new()),
        };
        Ok(Self {
            kind,
            step: 0,
            m,
            v,
        })
    }

    /// The state to save: `m.<param>` and `v.<param>` (AdamW) and `step`.
    pub fn state_tensors(&self, params: &[Param]) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            if let (Some(m), Some(v)) = (self.m.get(i), self.v.get(i)) {
                out.insert(format!("m.{}", p.name), m.clone());
                out.insert(format!("v.{}", p.name), v.clone());
            }
        }
        out.insert(
            "step".into(),
            Tensor::new(self.step as i64, &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores what [`Optimizer::state_tensors`] saved; every moment must be present with its
    /// parameter's shape.
    pub fn load_state(
        &mut self,
        params: &[Param],
        tensors: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let step = tensors
            .get("step")
            .ok_or_else(|| anyhow!("tensor `step` is missing"))?;
        self.step = usize::try_from(step.to_dtype(DType::I64)?.to_scalar::<i64>()?)
            .map_err(|_| anyhow!("tensor `step` is negative"))?;
        for (i, p) in params.iter().enumerate() {
            if i >= self.m.len() {
                break;
            }
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let name = format!("{prefix}.{}", p.name);
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| anyhow!("tensor `{name}` is missing"))?;
                if t.dims() != slot.dims() {
                    bail!(
                        "tensor `{name}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        slot.dims()
                    );
                }
                if t.dtype() != DType::F32 {
                    bail!("tensor `{name}` has dtype {:?}, expected F32", t.dtype());
                }
                *slot = t.to_dtype(DType::F32)?.to_device(slot.device())?;
            }
        }
        Ok(())
    }

    /// Clips the accumulated gradients to the global norm `max_norm` (0: no clipping) and
    /// applies one update at learning rate `lr`, unless their norm is not finite (then nothing
    /// changes). Returns the norm before clipping. On CUDA, where [`adamw::Fused`] applies, the
    /// norm and the clipping factor are computed on the device and the norm is the step's one
    /// read back to the host.
    pub fn clip_and_apply(
        &mut self,
        params: &[Param],
        acc: &GradAccumulator,
        max_norm: f64,
        lr: f64,
    ) -> Result<f64> {
        let slots: Vec<adamw::Slot> = params
            .iter()
            .zip(acc.grads())
            .enumerate()
            .filter_map(|(i, (p, g))| {
                Some(adamw::Slot {
                    w: p.master.as_ref().unwrap_or(&p.var).as_tensor(),
                    moments: self.m.get(i).zip(self.v.get(i)),
                    g: g.as_ref()?,
                    copy: p.master.as_ref().map(|_| p.var.as_tensor()),
                    decay: self.decay(p),
                })
            })
            .collect();
        if let Some(fused) = adamw::Fused::new(&slots) {
            let clip = fused.clip(max_norm)?;
            let norm = clip.to_vec1::<f32>()?[0] as f64;
            if norm.is_finite() {
                let update = adamw::Update {
                    lr,
                    decay: 0.0,
                    grad_scale: 1.0,
                    rule: self.rule(),
                    step: self.step + 1,
                };
                fused.update(&update, &clip)?;
                self.step += 1;
            }
            return Ok(norm);
        }
        let (norm, scale) = acc.clip(max_norm)?;
        if norm.is_finite() {
            self.apply(params, acc.grads(), scale, lr)?;
        }
        Ok(norm)
    }

    /// The kernels' update rule.
    fn rule(&self) -> adamw::Rule {
        match self.kind {
            OptimizerKind::AdamW {
                beta1, beta2, eps, ..
            } => adamw::Rule::AdamW { beta1, beta2, eps },
            OptimizerKind::Sgd { .. } => adamw::Rule::Sgd,
        }
    }

    /// Decoupled weight decay of a parameter: none on biases and norm weights (rank 1).
    fn decay(&self, p: &Param) -> f64 {
        match (p.var.rank() >= 2, &self.kind) {
            (false, _) => 0.0,
            (true, OptimizerKind::AdamW { weight_decay, .. })
            | (true, OptimizerKind::Sgd { weight_decay }) => *weight_decay,
        }
    }

    /// One update with learning rate `lr`, each gradient multiplied by `grad_scale` (the clipping
    /// factor). Parameters without a gradient are left alone.
    pub fn apply(
        &mut self,
        params: &[Param],
        grads: &[Option<Tensor>],
        grad_scale: f64,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let rule = self.rule();
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            let decay = self.decay(p);
            let update = adamw::Update {
                lr,
                decay,
                grad_scale,
                rule,
                step: self.step,
            };
            // The f32 weights the update applies to: the master copy, or the parameter itself.
            let target = p.master.as_ref().unwrap_or(&p.var).as_tensor();
            let (m, v) = (self.m.get(i), self.v.get(i));
            let fused = target.dtype() == DType::F32
                && adamw::applies(&[target, g])
                && [m, v].iter().flatten().all(|t| adamw::applies(&[t]));
            if fused {
                update.run(target, g, m.zip(v))?;
                if p.master.is_some() {
                    p.var.set(&target.to_dtype(p.var.dtype())?)?;
                }
                continue;
            }
            let w = target.to_dtype(DType::F32)?;
            let g = (g.to_dtype(DType::F32)? * grad_scale)?;
            let w = if decay > 0.0 {
                (&w * (1.0 - lr * decay))?
            } else {
                w
            };
            let new = match self.kind {
                OptimizerKind::AdamW {
                    beta1, beta2, eps, ..
                } => {
                    self.m[i] = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
                    self.v[i] = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let (bc1, bc2) = update.bias_corrections();
                    let m_hat = (&self.m[i] / bc1)?;
                    let v_hat = (&self.v[i] / bc2)?;
                    (w - (m_hat / (v_hat.sqrt()? + eps)?)?.affine(lr, 0.0)?)?
                }
                OptimizerKind::Sgd { .. } => (w - (g * lr)?)?,
            };
            p.var.set(&new.to_dtype(p.var.dtype())?)?;
            if let Some(master) = &p.master {
                master.set(&new)?;
            }
        }
        Ok(())
    }
}

/// Learning rate at an optimiser step, as `transformers`' schedulers of the same names: `linear`,
/// `cosine` and `constant_with_warmup` warm up linearly from 0 over `warmup` steps, then decay
/// linearly to 0, decay along a half cosine to 0, or stay at the peak; `constant` ignores
/// `warmup`, as `get_constant_schedule` does. A checkpoint's `trainer_state.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: usize,
    pub total: usize,
    pub kind: SchedulerType,
}

impl Schedule {
    pub fn lr(&self, step: usize) -> f64 {
        if self.kind == SchedulerType::Constant {
            return self.peak;
        }
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.kind {
            SchedulerType::Linear => self.peak * (1.0 - progress),
            SchedulerType::Cosine => {
                self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => self.peak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
            kind: SchedulerType::Linear,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        let c = Schedule {
            kind: SchedulerType::Cosine,
            ..s.clone()
        };
        assert!((c.lr(60) - 0.5).abs() < 1e-12);
        assert!(c.lr(110).abs() < 1e-12);
        let k = Schedule {
            kind: SchedulerType::ConstantWithWarmup,
            ..s.clone()
        };
        assert_eq!((k.lr(0), k.lr(5), k.lr(100)), (0.0, 0.5, 1.0));
        // HF's `constant` ignores warmup.
        let c = Schedule {
            kind: SchedulerType::Constant,
            ..s
        };
        assert_eq!((c.lr(0), c.lr(5), c.lr(100)), (1.0, 1.0, 1.0));
    }

    /// `transformers`' LambdaLR factors, written out independently: `get_linear_schedule_with_warmup`,
    /// `get_cosine_schedule_with_warmup` (num_cycles 0.5) and `get_constant_schedule_with_warmup`.
    #[test]
    fn schedules_match_transformers_lambdas() {
        let (warmup, total) = (7usize, 40usize);
        let hf = |kind: SchedulerType, step: usize| -> f64 {
            let s = step as f64;
            let (w, t) = (warmup as f64, total as f64);
            match kind {
                SchedulerType::Constant => 1.0,
                _ if step < warmup => s / w.max(1.0),
                SchedulerType::ConstantWithWarmup => 1.0,
                SchedulerType::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
                SchedulerType::Cosine => {
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
        };
        for kind in [
            SchedulerType::Constant,
            SchedulerType::ConstantWithWarmup,
            SchedulerType::Linear,
            SchedulerType::Cosine,
        ] {
            let s = Schedule {
                peak: 3e-4,
                warmup,
                total,
                kind,
            };
            for step in 0..total {
                let want = 3e-4 * hf(kind, step);
                assert!((s.lr(step) - want).abs() < 1e-15, "{kind} step {step}");
            }
        }
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_skips_decay_on_vectors() -> Result<()> {
        let dev = Device::Cpu;
        let w = Param {
            name: "w".into(),
            var: Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &dev)?)?,
            master: None,
        };
        let b = Param {
            name: "b".into(),
            var: Var::from_tensor(&Tensor::ones(2, DType::F32, &dev)?)?,
            master: None,
        };
        let params = vec![w, b];
        let kind = OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = Optimizer::new(kind, &params)?;
        let grads = vec![
            Some(Tensor::new(&[[2f32, -3.0], [0.5, 1.0]], &dev)?),
            Some(Tensor::new(&[4f32, -1.0], &dev)?),
        ];
        opt.apply(&params, &grads, 1.0, 0.01)?;
        // step 1: m̂ = g, v̂ = g², update = lr·sign(g); decay: w·(1 − lr·wd) for the matrix only
        let w = params[0].var.as_tensor().to_vec2::<f32>()?;
        assert!((w[0][0] - (0.999 - 0.01)).abs() < 1e-6, "{w:?}");
        assert!((w[0][1] - (0.999 + 0.01)).abs() < 1e-6, "{w:?}");
        let b = params[1].var.as_tensor().to_vec1::<f32>()?;
        assert!(
            (b[0] - 0.99).abs() < 1e-6 && (b[1] - 1.01).abs() < 1e-6,
            "{b:?}"
        );
        Ok(())
    }

    /// The in-place CPU kernels and the tensor path (CUDA, non-contiguous gradients) agree.
    #[test]
    fn in_place_and_tensor_updates_agree() -> Result<()> {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let b0 = Tensor::randn(0f32, 1.0, 4, &dev)?;
        let params = || -> Result<Vec<Param>> {
            Ok(vec![
                Param {
                    name: "w".into(),
                    var: Var::from_tensor(&w0)?,
                    master: None,
                },
                Param {
                    name: "b".into(),
                    var: Var::from_tensor(&b0)?,
                    master: None,
                },
            ])
        };
        for kind in [
            OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            OptimizerKind::Sgd { weight_decay: 0.1 },
        ] {
            let (fused, plain) = (params()?, params()?);
            let mut opt_f = Optimizer::new(kind.clone(), &fused)?;
            let mut opt_p = Optimizer::new(kind.clone(), &plain)?;
            for step in 0..3 {
                let g = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
                let gb = Tensor::randn(0f32, 1.0, 4, &dev)?;
                // A transposed view is not contiguous: it takes the tensor path.
                assert!(adamw::applies(&[&g.t()?.contiguous()?]) && !adamw::applies(&[&g.t()?]));
                opt_f.apply(
                    &fused,
                    &[Some(g.t()?.contiguous()?), Some(gb.clone())],
                    0.5,
                    0.01,
                )?;
                opt_p.apply(&plain, &[Some(g.t()?), Some(gb)], 0.5, 0.01)?;
                for (a, b) in fused.iter().zip(&plain) {
                    let d = (a.var.as_tensor() - b.var.as_tensor())?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    assert!(d < 1e-6, "{kind:?} step {step} {}: differ by {d}", a.name);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let acc = GradAccumulator {
            grads: vec![Some(Tensor::new(&[3f32, 4.0], &dev)?), None],
        };
        // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.
        let (norm, scale) = acc.clip(1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        assert_eq!(scale, 1.0 / (norm + 1e-6));
        assert_eq!(acc.clip(10.0)?.1, 1.0);
        // At the bound the factor is just below 1 and applied, as in torch.
        assert_eq!(acc.clip(norm)?.1, norm / (norm + 1e-6));
        assert_eq!(acc.clip(0.0)?.1, 1.0);
        Ok(())
    }
}
