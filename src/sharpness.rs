//! `dpo-sam sharpness`: the curvature of the preference loss at a checkpoint, as the paper's
//! §4.3 measures it ("the traces of the parameter Hessian and the logit Hessian at the final
//! checkpoint"). The objective is the loss a training step minimises, on the first `--pairs`
//! pairs of `--data`: L(θ) = (1/N) Σ_i loss_i(θ), reference log-probs fixed, each pair scored
//! alone (the per-pair losses of [`Loss::compute`]: a pair's NLL term is its own).
//!
//! - tr ∇²_θ L, over every weight: Hutchinson's estimator, E[vᵀHv] = tr H for Rademacher v
//!   (±1 entries), as mean ± standard error over `--probes` probes. Each Hv is a central
//!   difference of autograd gradients, Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, with
//!   ε = c‖θ‖/‖v‖: the step moves the weights by the fraction c of their norm (each weight by c
//!   times their RMS, since every |vᵢ| = 1). The error is about A·c² (truncation) + B·u/c
//!   (rounding, u the dtype's machine epsilon). The textbook c = u^{1/3} balances the two when
//!   the loss curves on the scale of ‖θ‖, but a network's loss curves on a much smaller one: on
//!   stories260K (f32) c = u^{1/3} = 4.9e-3 misses vᵀHv by 5% (truncation, the same in f64),
//!   c = √u = 3.5e-4 agrees with f64 to 1e-4, and c = 1e-4 drifts again (rounding). So
//!   c = √u: 3.5e-4 in f32, 1.5e-8 in f64; `--fd-scale` overrides it.
//! - tr ∇²_z L over every response-token logit: exact, in closed form (docs/theory.md):
//!   (1/N) Σ_i Σ_{s ∈ {chosen, rejected}} [∂²ℓ/∂s² Σ_{t∈s} ‖e_{y_t} − p_t‖² − ∂ℓ/∂s Σ_{t∈s} (1 − ‖p_t‖²)]
//!   with ℓ the pair's loss as a function of its sequence log-probs ([`crate::losses::Curvature`]).
//! - the paper's H_z of §3, the softmax cross-entropy logit Hessian Diag(p) − ppᵀ, whose trace
//!   1 − ‖p‖² is summed over each response's tokens and averaged over responses (and, for
//!   reference, averaged per token): the convention that the size of the paper's Mistral figure
//!   (2.732e2) points to (docs/theory.md, "Which convention the paper's numbers use").
//!
//! The probes depend only on `--seed` and the weights' shapes, so two checkpoints of one model
//! measured with the same seed see the same probes, and the per-probe differences of their vᵀHv
//! compare them with much less noise than either trace has.

use crate::data::batch::PreferenceBatch;
use crate::diagnostics::token_probs;
use crate::logps::{pair_logps, sequence_logps};
use crate::losses::{Loss, PairLogps};
use crate::models::Model;
use crate::score::PairArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  dpo-sam sharpness --model runs/dpo --ref-model sft/ --data pairs.jsonl --pairs 64 --probes 10"
)]
pub struct SharpnessArgs {
    #[command(flatten)]
    pub input: PairArgs,
    /// Measure on the first N usable pairs of --data.
    #[arg(long = "pairs", default_value_t = 64)]
    pub num_pairs: usize,
    /// Rademacher probes of Hutchinson's estimator (two gradient passes each).
    #[arg(long, default_value_t = 10)]
    pub probes: usize,
    /// Seed of the probes (the same seed gives the same probes for every checkpoint of a model).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Central-difference step as a fraction of ‖θ‖ (default: the square root of the dtype's
    /// machine epsilon).
    #[arg(long)]
    pub fd_scale: Option<f64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Hutchinson's estimate of tr ∇²_θ L.
#[derive(Debug, Clone, Serialize)]
pub struct Hutchinson {
    pub mean: f64,
    /// Standard error of the mean over probes (null for one probe).
    pub stderr: Option<f64>,
    /// vᵀHv of each probe.
    pub samples: Vec<f64>,
    /// The central-difference step ε.
    pub step: f64,
    /// ε‖v‖/‖θ‖: the step as a fraction of the weights' norm.
    pub relative_step: f64,
    /// ‖θ‖ and the number of weights (= ‖v‖²).
    pub param_norm: f64,
    pub params: usize,
}

/// The logit-Hessian traces of [`Objective::logit_traces`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LogitTraces {
    /// tr ∇²_z L of the preference loss L (mean over pairs), over all response logits.
    pub preference: f64,
    /// Σ_t (1 − ‖p_t‖²) over a response's tokens, averaged over the 2N responses.
    pub ce_per_sequence: f64,
    /// 1 − ‖p_t‖² averaged over response tokens (`squeeze/ce_logit_hessian_trace`).
    pub ce_per_token: f64,
    pub tokens: usize,
}

/// A batch with its fixed reference log-probs (chosen, rejected), none for reference-free losses.
pub type ReferencedBatch = (PreferenceBatch, Option<(Tensor, Tensor)>);

/// L(θ) on fixed pairs, with its gradient and curvature.
pub struct Objective {
    policy: Model,
    batches: Vec<ReferencedBatch>,
    loss: Loss,
    pairs: usize,
}

impl Objective {
    /// `policy` must have trainable weights; `batches` carry their fixed reference log-probs
    /// (see [`reference_batches`]).
    pub fn new(policy: Model, batches: Vec<ReferencedBatch>, loss: Loss) -> Result<Objective> {
        if policy.params.is_empty() {
            bail!("sharpness needs the policy's weights as trainable parameters");
        }
        let pairs = batches.iter().map(|(b, _)| b.num_pairs).sum();
        if pairs == 0 {
            bail!("no pairs to measure on");
        }
        Ok(Objective {
            policy,
            batches,
            loss,
            pairs,
        })
    }

    pub fn policy(&self) -> &Model {
        &self.policy
    }

    /// The batches and their reference log-probs.
    pub fn batches(&self) -> &[ReferencedBatch] {
        &self.batches
    }

    /// Σ of one batch's per-pair losses, and its log-probs.
    fn batch_loss(
        &self,
        batch: &PreferenceBatch,
        reference: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, PairLogps)> {
        let h = batch.response_hidden(self.policy.net.forward_hidden(&batch.input_ids)?)?;
        let head = self.policy.net.output_layer();
        let token_logps = head.token_logps(&h, &batch.targets, None)?;
        let seq = sequence_logps(batch, &token_logps)?;
        let lp = PairLogps::from_rows(&seq, reference, &batch.response_lens)?;
        Ok((self.loss.compute(&lp)?.losses.sum_all()?, lp))
    }

    /// L at the current weights.
    pub fn loss(&self) -> Result<f64> {
        let mut total = 0.0;
        for (batch, reference) in &self.batches {
            total += scalar(&self.batch_loss(batch, reference.as_ref())?.0)?;
        }
        Ok(total / self.pairs as f64)
    }

    /// L and ∇_θ L, one tensor per parameter (in `policy().params` order).
    pub fn gradient(&self) -> Result<(f64, Vec<Tensor>)> {
        let params = &self.policy.params;
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut total = 0.0;
        for (batch, reference) in &self.batches {
            let l = (self.batch_loss(batch, reference.as_ref())?.0 / self.pairs as f64)?;
            total += scalar(&l)?;
            let store = self.policy.backward(&l)?;
            for (acc, p) in grads.iter_mut().zip(params) {
                if let Some(g) = store.get(p.var.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let grads = grads
            .into_iter()
            .zip(params)
            .map(|(g, p)| g.map_or_else(|| p.var.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((total, grads))
    }

    /// The current weights, copied.
    pub fn weights(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .policy
            .params
            .iter()
            .map(|p| p.var.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    /// Sets the weights (one tensor per parameter).
    pub fn set_weights(&self, values: &[Tensor]) -> Result<()> {
        for (p, v) in self.policy.params.iter().zip(values) {
            p.var.set(v)?;
        }
        Ok(())
    }

    /// Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε; θ is restored bit for bit afterwards.
    pub fn hvp(&self, v: &[Tensor], step: f64) -> Result<Vec<Tensor>> {
        let theta = self.weights()?;
        let shifted = |sign: f64| -> candle_core::Result<Vec<Tensor>> {
            theta
                .iter()
                .zip(v)
                .map(|(t, v)| t + (v * (sign * step))?)
                .collect()
        };
        let at = |sign: f64| -> Result<Vec<Tensor>> {
            self.set_weights(&shifted(sign)?)?;
            Ok(self.gradient()?.1)
        };
        let (plus, minus) = (at(1.0), at(-1.0));
        self.set_weights(&theta)?;
        plus?
            .iter()
            .zip(&minus?)
            .map(|(p, m)| Ok(((p - m)? / (2.0 * step))?))
            .collect()
    }

    /// Hutchinson's estimate of tr ∇²_θ L from `probes` Rademacher vectors drawn from `seed`,
    /// with the central-difference step ε = `scale`·‖θ‖/‖v‖.
    pub fn hutchinson(
        &self,
        probes: usize,
        seed: u64,
        scale: f64,
        mut progress: impl FnMut(usize, f64),
    ) -> Result<Hutchinson> {
        let params = &self.policy.params;
        let count: usize = params.iter().map(|p| p.var.elem_count()).sum();
        let theta_norm = self
            .weights()?
            .iter()
            .map(|t| sum_f64(&t.sqr()?))
            .sum::<Result<f64>>()?
            .sqrt();
        let v_norm = (count as f64).sqrt();
        // All-zero weights (never a trained model) would make ε zero: then ‖εv‖ = c.
        let step = scale * if theta_norm > 0.0 { theta_norm } else { 1.0 } / v_norm;
        let mut draw = Probes::new(seed);
        let mut samples = Vec::with_capacity(probes);
        for k in 0..probes {
            let v = draw.next(&self.policy)?;
            let hv = self.hvp(&v, step)?;
            let vhv = v
                .iter()
                .zip(&hv)
                .map(|(a, b)| sum_f64(&(a * b)?))
                .sum::<Result<f64>>()?;
            progress(k, vhv);
            samples.push(vhv);
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let stderr = (samples.len() > 1).then(|| {
            let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0);
            (var / n).sqrt()
        });
        Ok(Hutchinson {
            mean,
            stderr,
            samples,
            step,
            relative_step: scale,
            param_norm: theta_norm,
            params: count,
        })
    }

    /// The exact logit-Hessian traces at the current weights.
    pub fn logit_traces(&self) -> Result<LogitTraces> {
        let head = self.policy.net.output_layer();
        let (mut preference, mut ce, mut tokens) = (0.0, 0.0, 0usize);
        for (batch, reference) in &self.batches {
            let h = batch
                .response_hidden(self.policy.net.forward_hidden(&batch.input_ids)?)?
                .detach();
            let probs = token_probs(&head, &h, &batch.targets)?;
            // Per response: A = Σ_t ‖e_y − p‖² = Σ_t (1 − 2p_y + ‖p‖²), B = Σ_t (1 − ‖p‖²).
            let rows = 2 * batch.num_pairs;
            let (mut a, mut b) = (vec![0.0; rows], vec![0.0; rows]);
            for (t, &r) in batch.rows.to_vec1::<u32>()?.iter().enumerate() {
                let (py, sq) = (probs.target[t], probs.sq_norm[t]);
                a[r as usize] += 1.0 - 2.0 * py + sq;
                b[r as usize] += 1.0 - sq;
            }
            let token_logps = head.token_logps(&h, &batch.targets, None)?;
            let seq = sequence_logps(batch, &token_logps)?;
            let lp = PairLogps::from_rows(&seq, reference.as_ref(), &batch.response_lens)?;
            let k = batch.num_pairs;
            for (i, x) in lp.values()?.iter().enumerate() {
                let c = self.loss.curvature(x)?;
                preference += c.dd_chosen * a[i] - c.d_chosen * b[i] + c.dd_rejected * a[k + i]
                    - c.d_rejected * b[k + i];
            }
            ce += b.iter().sum::<f64>();
            tokens += probs.target.len();
        }
        Ok(LogitTraces {
            preference: preference / self.pairs as f64,
            ce_per_sequence: ce / (2 * self.pairs) as f64,
            ce_per_token: ce / tokens.max(1) as f64,
            tokens,
        })
    }
}

/// Rademacher probes: ±1 per weight, from ChaCha8 seeded by `seed`, one probe after another.
pub struct Probes(rand_chacha::ChaCha8Rng);

impl Probes {
    pub fn new(seed: u64) -> Probes {
        Probes(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// The next probe, one tensor per parameter of `model`.
    pub fn next(&mut self, model: &Model) -> Result<Vec<Tensor>> {
        Ok(model
            .params
            .iter()
            .map(|p| {
                let signs: Vec<f64> = (0..p.var.elem_count())
                    .map(|_| if self.0.random::<bool>() { 1.0 } else { -1.0 })
                    .collect();
                Tensor::from_vec(signs, p.var.shape(), p.var.device())?.to_dtype(p.var.dtype())
            })
            .collect::<candle_core::Result<Vec<_>>>()?)
    }
}

/// Batches of `batch_size` pairs with the reference's log-probs (none for reference-free
/// losses), computed once: the reference is fixed while θ moves.
pub fn reference_batches(
    pairs: &[crate::data::batch::TokenizedPair],
    reference: Option<&Model>,
    batch_size: usize,
    pad_id: u32,
    device: &candle_core::Device,
) -> Result<Vec<ReferencedBatch>> {
    pairs
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let batch = PreferenceBatch::new(chunk, pad_id, device)?;
            let logps = reference.map(|m| pair_logps(m, &batch)).transpose()?;
            Ok((batch, logps))
        })
        .collect()
}

/// The `--json` report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub pairs: usize,
    pub response_tokens: usize,
    pub loss_type: String,
    pub beta: f64,
    pub dtype: String,
    /// L: the mean over pairs of the per-pair loss.
    pub loss: f64,
    pub params: usize,
    pub param_norm: f64,
    pub param_hessian_trace: f64,
    pub param_hessian_trace_stderr: Option<f64>,
    pub probes: Vec<f64>,
    pub fd_step: f64,
    pub fd_relative_step: f64,
    pub logit_hessian_trace: f64,
    pub ce_logit_hessian_trace_per_sequence: f64,
    pub ce_logit_hessian_trace_per_token: f64,
}

pub fn run(args: SharpnessArgs) -> Result<()> {
    let report = sharpness(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// Measures both traces.
pub fn sharpness(args: &SharpnessArgs) -> Result<Report> {
    if args.num_pairs == 0 {
        bail!("--pairs: must be > 0");
    }
    if args.probes == 0 {
        bail!("--probes: must be > 0");
    }
    let dtype = args
        .input
        .dtype
        .parse::<crate::config::Dtype>()
        .context("--dtype")?
        .dtype();
    let eps = match dtype {
        DType::F32 => f64::from(f32::EPSILON),
        DType::F64 => f64::EPSILON,
        other => bail!(
            "--dtype: central differences of gradients need f32 or f64, got {}",
            other.as_str()
        ),
    };
    let scale = args.fd_scale.unwrap_or(eps.sqrt());
    if !(scale > 0.0 && scale.is_finite()) {
        bail!("--fd-scale: must be > 0, got {scale}");
    }
    let loaded = args.input.load(true)?;
    let pairs = &loaded.data.train[..args.num_pairs.min(loaded.data.train.len())];
    if pairs.is_empty() {
        bail!(
            "--data: no usable pairs (skipped: {:?})",
            loaded.data.skipped
        );
    }
    let batches = reference_batches(
        pairs,
        loaded.reference(),
        args.input.batch_size,
        loaded.tok.pad_id,
        &loaded.device,
    )?;
    let objective = Objective::new(loaded.policy, batches, loaded.loss)?;
    let loss = objective.loss()?;
    let logit = objective.logit_traces()?;
    let started = std::time::Instant::now();
    let h = objective.hutchinson(args.probes, args.seed, scale, |k, vhv| {
        eprintln!(
            "probe {}/{}: vᵀHv = {vhv:.6e} ({:.1} s)",
            k + 1,
            args.probes,
            started.elapsed().as_secs_f64()
        )
    })?;
    Ok(Report {
        model: args.input.model.clone(),
        pairs: pairs.len(),
        response_tokens: logit.tokens,
        loss_type: args.input.loss_type.clone(),
        beta: args.input.beta,
        dtype: dtype.as_str().to_string(),
        loss,
        params: h.params,
        param_norm: h.param_norm,
        param_hessian_trace: h.mean,
        param_hessian_trace_stderr: h.stderr,
        probes: h.samples,
        fd_step: h.step,
        fd_relative_step: h.relative_step,
        logit_hessian_trace: logit.preference,
        ce_logit_hessian_trace_per_sequence: logit.ce_per_sequence,
        ce_logit_hessian_trace_per_token: logit.ce_per_token,
    })
}

fn render(r: &Report) -> String {
    let se = r
        .param_hessian_trace_stderr
        .map_or("n/a (one probe)".into(), |s| format!("{s:.4e}"));
    format!(
        "{model}: {pairs} pairs, {tokens} response tokens, {loss_type} (β {beta}), {dtype}\n\
         loss L (mean over pairs)                     {loss:.6}\n\
         tr ∇²_θ L  (Hutchinson, {k} probes)           {trace:.4e} ± {se}\n\
         \x20 central-difference step ε                  {step:.3e} (‖εv‖ = {rel:.2e} ‖θ‖, ‖θ‖ = {norm:.4e}, {params} weights)\n\
         tr ∇²_z L  (exact, all response logits)      {logit:.4e}\n\
         Σ_t tr(Diag p − ppᵀ) per response (H_z, §3)  {per_seq:.4e}\n\
         tr(Diag p − ppᵀ) per response token          {per_tok:.4e}\n",
        model = r.model,
        pairs = r.pairs,
        tokens = r.response_tokens,
        loss_type = r.loss_type,
        beta = r.beta,
        dtype = r.dtype,
        loss = r.loss,
        k = r.probes.len(),
        trace = r.param_hessian_trace,
        step = r.fd_step,
        rel = r.fd_relative_step,
        norm = r.param_norm,
        params = r.params,
        logit = r.logit_hessian_trace,
        per_seq = r.ce_logit_hessian_trace_per_sequence,
        per_tok = r.ce_logit_hessian_trace_per_token,
    )
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    scalar(&t.to_dtype(DType::F64)?.sum_all()?)
}
