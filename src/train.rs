//! `dpo-sam train`: the training loop. One optimiser step = `batch_size / micro_batch_size`
//! micro-batches, each one forward pass of the policy over chosen and rejected responses
//! stacked together, the optional logits-SAM perturbation of the output layer, the loss, and a
//! single backward pass; then clipping, the learning-rate schedule and the update.

use crate::config::Config;
use crate::data::batch::{PreferenceBatch, TokenizedPair};
use crate::losses::{Loss, PairLogps};
use crate::models::{parse_dtype, Model, ModelSource};
use crate::optim::{GradAccumulator, Optimizer, Schedule};
use crate::refcache::{RefLogps, Split};
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  dpo-sam train --config configs/tiny_gpt2.toml --set sam.rho=0.05 --set training.max_steps=50"
)]
pub struct TrainArgs {
    /// TOML run configuration (see configs/ and the README's reference).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set training.beta=0.2` (repeatable; values in TOML syntax).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Override `output_dir`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Override `device` (cpu, cuda, cuda:N).
    #[arg(long)]
    pub device: Option<String>,
    /// No progress bar (metrics still go to metrics.jsonl).
    #[arg(long)]
    pub quiet: bool,
    /// Validate the config and print the plan (parameters, memory, steps) without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue from the newest complete checkpoint in DIR (default: the config's output_dir).
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Resume even though the config differs from the checkpoint's in keys that change the
    /// training trajectory.
    #[arg(long)]
    pub allow_config_drift: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.output_dir {
        overrides.push(format!(
            "output_dir={}",
            toml::Value::String(dir.display().to_string())
        ));
    }
    if let Some(dev) = &args.device {
        overrides.push(format!("device={}", toml::Value::String(dev.clone())));
    }
    let cfg = Config::load(&args.config, &overrides)?;
    if args.dry_run {
        return crate::plan::print(&cfg);
    }
    let resume_from = match &args.resume {
        Some(dir) => Some(resume_checkpoint(
            &cfg,
            dir.as_deref(),
            args.allow_config_drift,
        )?),
        None => None,
    };
    let mut trainer = Trainer::new(cfg)?;
    if let Some(ckpt) = &resume_from {
        let state = crate::checkpoint::restore(&mut trainer, ckpt)?;
        eprintln!("resuming from {} (step {})", ckpt.display(), state.step);
    }
    trainer.progress = !args.quiet;
    watch_signals(&trainer.stop)?;
    let summary = trainer.train()?;
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(step) = summary.get("interrupted_at_step") {
        let mut cmd = format!("dpo-sam train --config {}", args.config.display());
        for ov in &args.overrides {
            cmd.push_str(&format!(" --set '{ov}'"));
        }
        eprintln!(
            "interrupted after step {step}; checkpoint saved. Resume with:\n  {cmd} --output-dir {dir} --resume {dir}",
            dir = trainer.cfg.output_dir.display()
        );
    }
    Ok(())
}

/// The newest complete checkpoint in `dir` (default: `output_dir`), refusing one saved with a
/// config that differs in a key that changes the trajectory unless `allow_drift`.
fn resume_checkpoint(cfg: &Config, dir: Option<&Path>, allow_drift: bool) -> Result<PathBuf> {
    let ckpt = crate::checkpoint::latest(dir.unwrap_or(&cfg.output_dir))?;
    let saved = crate::checkpoint::load_config(&ckpt)?;
    let drift = crate::checkpoint::config_drift(&saved, cfg)?;
    if !drift.is_empty() {
        let list = drift
            .iter()
            .map(|d| format!("  {d}"))
            .collect::<Vec<_>>()
            .join("\n");
        if !allow_drift {
            anyhow::bail!(
                "--resume: the config differs from the one {} was saved with (saved -> now):\n{list}\n\
                 these keys change the training trajectory; pass --allow-config-drift to resume anyway",
                ckpt.display()
            );
        }
        eprintln!("warning: resuming with config changes (--allow-config-drift):\n{list}");
    }
    Ok(ckpt)
}

/// SIGINT/SIGTERM set `stop`, which the loop checks after each step (then saves and returns);
/// a second signal while `stop` is already set exits at once with status 130, before any
/// further write, so the last complete checkpoint stays as it was.
pub fn watch_signals(stop: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // Registered first so that it sees the flag as it was before this signal set it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(stop))?;
        signal_hook::flag::register(sig, Arc::clone(stop))?;
    }
    Ok(())
}

/// Everything a run holds.
pub struct Trainer {
    pub cfg: Config,
    pub device: Device,
    pub tok: Tok,
    pub policy: Model,
    /// The frozen reference; `None` for reference-free losses.
    pub reference: Option<Model>,
    /// Reference log-probs computed once before training (`precompute_ref_log_probs`); when
    /// set, `reference` has been freed.
    pub ref_cache: Option<RefLogps>,
    pub loss: Loss,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub train_pairs: Vec<TokenizedPair>,
    pub eval_pairs: Vec<TokenizedPair>,
    pub skipped: BTreeMap<&'static str, usize>,
    /// With `data.streaming`, the converter of the training records, which are read as
    /// training goes (`train_pairs` stays empty); `None` keeps them in memory.
    pub stream: Option<Arc<crate::data::format::Converter>>,
    pub progress: bool,
    /// Compute squeeze diagnostics in [`Trainer::micro_step`] (the loop turns this on for
    /// logging steps; it costs one more output-layer matmul).
    pub diagnostics: bool,
    /// Optimiser steps completed (restored on resume).
    pub step: usize,
    /// Where the next micro-batch comes from.
    pub data_pos: DataCursor,
    /// Lines in metrics.jsonl so far (a checkpoint records it; resuming cuts the file there).
    pub metrics_lines: usize,
    /// Steps whose update was skipped for a non-finite loss or gradient norm.
    pub nonfinite_skipped: usize,
    /// Set (by a signal) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

/// The loop's position in the data: the epoch, whose permutation is
/// [`crate::data::stream::epoch_order`] of (seed, epoch), and the next index into it; streamed
/// (`data.streaming`), the pairs drawn so far from the epoch's stream, which a resumed run
/// re-reads and discards.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataCursor {
    pub epoch: usize,
    pub cursor: usize,
    /// Streamed training rows skipped, by reason, among the rows read in epoch 0 (later epochs
    /// re-read the same rows). Saved because a resumed run in a later epoch never re-reads
    /// epoch 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped: BTreeMap<String, usize>,
}

/// Where the loop's training pairs come from.
enum Feed {
    /// `train_pairs`, epoch by epoch in [`crate::data::stream::epoch_order`].
    Memory {
        lengths: Vec<usize>,
        order: Vec<usize>,
    },
    /// `data.streaming`: the current epoch's micro-batches ([`crate::data::train_batches`],
    /// opened on first use) and what is left of the one being drawn from.
    Stream {
        tok: Arc<Tok>,
        batches: Option<Box<crate::data::stream::Batches>>,
        ready: std::vec::IntoIter<TokenizedPair>,
    },
}

/// Sums of per-pair quantities over the micro-batches of one step.
#[derive(Default)]
struct Tally {
    pairs: f64,
    loss: f64,
    chosen_rewards: f64,
    rejected_rewards: f64,
    accuracies: f64,
    chosen_logps: f64,
    rejected_logps: f64,
    loss_pre: f64,
    sam_grad_norm: f64,
    /// Σ(policy − reference) log-probs; `None` without a reference.
    chosen_delta: Option<f64>,
    rejected_delta: Option<f64>,
    squeeze: Option<crate::diagnostics::Squeeze>,
    tokens: usize,
    padding: f64,
    micro_batches: f64,
}

/// What one micro-batch's forward/backward produced.
pub struct MicroStep {
    pub grads: Option<GradStore>,
    pub loss: f64,
    pub loss_pre: Option<f64>,
    pub sam_grad_norm: Option<f64>,
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    pub chosen_logps: Vec<f32>,
    pub rejected_logps: Vec<f32>,
    /// Reference log-probs, when the loss uses a reference.
    pub ref_chosen_logps: Option<Vec<f32>>,
    pub ref_rejected_logps: Option<Vec<f32>>,
    /// Squeeze diagnostics, when [`Trainer::diagnostics`] is on.
    pub squeeze: Option<crate::diagnostics::Squeeze>,
}

impl Trainer {
    pub fn new(cfg: Config) -> Result<Trainer> {
        let device = crate::device::parse(&cfg.device)?;
        let dtype = parse_dtype(&cfg.model.dtype)?;
        let loss = Loss::from_config(&cfg.training)?;

        let policy_src = resolve_source(&cfg, &cfg.model.name_or_path)?;
        let tok = policy_src.tokenizer()?;
        let mut policy = Model::load(&policy_src, true, dtype, &device)?;
        let compute_dtype = if cfg.training.mixed_precision == "bf16" {
            DType::BF16
        } else {
            dtype
        };
        if compute_dtype != dtype {
            policy = policy.with_master_weights(compute_dtype, &device)?;
        }
        policy.set_gradient_checkpointing(cfg.training.gradient_checkpointing);
        let vocab = policy.net.output_layer().vocab_size()?;
        tok.check_fits(vocab, &cfg.model.name_or_path)?;
        let mut reference = if !loss.needs_reference() {
            None
        } else if cfg.ref_name_or_path() == cfg.model.name_or_path {
            Some(policy.frozen_copy(&device)?)
        } else {
            let ref_src = resolve_source(&cfg, cfg.ref_name_or_path())?;
            Some(Model::load(&ref_src, false, compute_dtype, &device)?)
        };

        let model_dir = policy_src.dir();
        // Streamed, only the (small) eval split is loaded; the loop reads the training split.
        let (splits, stream) = if cfg.data.streaming {
            let conv = crate::data::converter(&cfg.data, &tok, model_dir)?;
            (&[crate::data::Split::Eval][..], Some(conv))
        } else {
            (
                &[crate::data::Split::Train, crate::data::Split::Eval][..],
                None,
            )
        };
        let data = crate::data::load_splits(&cfg.data, &tok, cfg.seed, model_dir, splits)?;
        let (train_pairs, eval_pairs, skipped) = (data.train, data.eval, data.skipped);
        if train_pairs.is_empty() && stream.is_none() {
            anyhow::bail!("no usable training pairs (skipped: {skipped:?})");
        }
        // Precomputing frees the reference model: `take` drops it at the end of this block.
        let ref_cache = match reference.take() {
            Some(model) if cfg.training.precompute_ref_log_probs => {
                let ref_src = resolve_source(&cfg, cfg.ref_name_or_path())?;
                let inputs = crate::refcache::FingerprintInputs {
                    reference: &ref_src,
                    dtype,
                    tok: &tok,
                    data: &cfg.data,
                    train: &train_pairs,
                    eval: &eval_pairs,
                };
                let fingerprint = crate::refcache::fingerprint(&inputs)?;
                let pairs = (train_pairs.as_slice(), eval_pairs.as_slice());
                let (cache, _) = crate::refcache::load_or_compute(
                    &cfg.output_dir,
                    &fingerprint,
                    &model,
                    pairs,
                    cfg.micro_batch_size(),
                    tok.pad_id,
                    &device,
                )?;
                Some(cache)
            }
            other => {
                reference = other;
                None
            }
        };

        let t = &cfg.training;
        let steps_per_epoch = train_pairs.len().div_ceil(t.batch_size);
        let total = t
            .max_steps
            .unwrap_or_else(|| (t.num_train_epochs * steps_per_epoch as f64).ceil() as usize);
        let warmup = if t.warmup_steps > 0 {
            t.warmup_steps
        } else {
            (t.warmup_ratio * total as f64).ceil() as usize
        };
        let schedule = Schedule {
            peak: t.learning_rate,
            warmup,
            total,
            kind: t.lr_scheduler_type.clone(),
        };
        let optimizer = Optimizer::from_config(t, &policy.params)?;
        Ok(Trainer {
            cfg,
            device,
            tok,
            policy,
            reference,
            ref_cache,
            loss,
            optimizer,
            schedule,
            train_pairs,
            eval_pairs,
            skipped,
            stream,
            progress: false,
            diagnostics: false,
            step: 0,
            data_pos: DataCursor::default(),
            metrics_lines: 0,
            nonfinite_skipped: 0,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Per-row sequence log-probs `[2b]` of the response tokens (prompt and padding excluded).
    fn sequence_logps(
        batch: &PreferenceBatch,
        token_logps: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let rows = 2 * batch.num_pairs;
        Tensor::zeros(rows, token_logps.dtype(), token_logps.device())?.index_add(
            &batch.rows,
            token_logps,
            0,
        )
    }

    /// The configured loss, averaged over pairs, as a function of per-token log-probs.
    fn batch_loss(
        &self,
        batch: &PreferenceBatch,
        token_logps: &Tensor,
        reference: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, crate::losses::LossOutput, PairLogps)> {
        let seq = Self::sequence_logps(batch, token_logps)?;
        let lp = PairLogps::from_rows(&seq, reference, &batch.response_lens)?;
        let out = self.loss.compute(&lp)?;
        Ok((out.losses.mean_all()?, out, lp))
    }

    /// Reference sequence log-probs (chosen, rejected) of a batch: from the precomputed cache
    /// when `pairs` names the batch's pairs, else from the reference model; `None` for
    /// reference-free losses.
    pub fn reference_for(
        &self,
        batch: &PreferenceBatch,
        pairs: Option<(Split, &[usize])>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        match (&self.ref_cache, pairs, &self.reference) {
            (Some(cache), Some((split, idx)), _) => {
                let dtype = crate::models::ops::accum_dtype(parse_dtype(&self.cfg.model.dtype)?);
                Ok(Some(cache.get(split, idx, dtype, &self.device)?))
            }
            (_, _, Some(reference)) => Ok(Some(crate::refcache::pair_logps(reference, batch)?)),
            (Some(_), None, None) => {
                anyhow::bail!("reference log-probs were precomputed (training.precompute_ref_log_probs): pass the batch's pair indices")
            }
            (None, _, None) => Ok(None),
        }
    }

    /// One micro-batch, with reference log-probs from the reference model. With
    /// `backward_weight`, backpropagates `backward_weight × loss` (logits-SAM's loss_post, or
    /// full SAM's loss at W + e); without, evaluates only.
    pub fn micro_step(
        &self,
        batch: &PreferenceBatch,
        backward_weight: Option<f64>,
    ) -> Result<MicroStep> {
        let reference = self.reference_for(batch, None)?;
        self.micro_step_with(batch, reference, backward_weight)
    }

    /// [`Trainer::micro_step`] with the reference log-probs given (see [`Trainer::reference_for`]).
    pub fn micro_step_with(
        &self,
        batch: &PreferenceBatch,
        reference: Option<(Tensor, Tensor)>,
        backward_weight: Option<f64>,
    ) -> Result<MicroStep> {
        match backward_weight {
            Some(w) if self.cfg.sam.kind == "full" => self.full_sam_step(batch, reference, w),
            _ => self.single_pass(batch, reference, backward_weight),
        }
    }

    /// Full SAM (`sam.kind = "full"`), the paper's expensive baseline: a forward/backward at W
    /// for g, every parameter moved to W + e, the ordinary pass there (whose gradients are
    /// returned), then W restored bit for bit. Rewards and log-probs are those at W.
    fn full_sam_step(
        &self,
        batch: &PreferenceBatch,
        reference: Option<(Tensor, Tensor)>,
        weight: f64,
    ) -> Result<MicroStep> {
        let at_w = self.single_pass(batch, reference.clone(), Some(1.0))?;
        let grads = at_w.grads.as_ref().expect("backward was requested");
        let sam = &self.cfg.sam;
        let e = crate::sam::perturb_params(&self.policy.params, grads, sam.rho, sam.adaptive)?;
        let grad_norm = e.grad_norm;
        // Restored before the result is looked at, so that an error never leaves W + e behind.
        let at_perturbed = self.single_pass(batch, reference, Some(weight));
        e.restore()?;
        let at_perturbed = at_perturbed?;
        Ok(MicroStep {
            grads: at_perturbed.grads,
            loss: at_perturbed.loss,
            loss_pre: Some(at_w.loss),
            sam_grad_norm: Some(grad_norm),
            ..at_w
        })
    }

    /// One forward pass, logits-SAM when configured, the loss, and the backward pass.
    fn single_pass(
        &self,
        batch: &PreferenceBatch,
        reference: Option<(Tensor, Tensor)>,
        backward_weight: Option<f64>,
    ) -> Result<MicroStep> {
        let head = self.policy.net.output_layer();
        // The one forward pass, to the final hidden states H at positions that predict response tokens.
        let h = response_hidden(
            self.policy.net.forward_hidden(&batch.input_ids)?,
            &batch.positions,
        )?;

        // logits-SAM, Algorithm 1 lines 1–4: e from loss_pre with H and W detached.
        let rho = self.cfg.sam.rho;
        let perturbation = if self.cfg.sam.kind == "logits" && backward_weight.is_some() {
            let objective = |token_logps: &Tensor| -> Result<Tensor> {
                Ok(self.batch_loss(batch, token_logps, reference.as_ref())?.0)
            };
            Some(crate::sam::logits_perturbation_with(
                &head,
                &h,
                &batch.targets,
                rho,
                self.cfg.sam.adaptive,
                &objective,
            )?)
        } else {
            None
        };

        // Lines 5–6: logits from H (W + e)ᵀ, e constant, bias unperturbed; loss_post.
        let token_logps =
            head.token_logps(&h, &batch.targets, perturbation.as_ref().map(|p| &p.e))?;
        let (loss, post, post_lp) = self.batch_loss(batch, &token_logps, reference.as_ref())?;
        // Rewards and log-probs describe the model itself (W), not the perturbed point W + e.
        let (out, lp) = match &perturbation {
            Some(p) => {
                let (_, out, lp) = self.batch_loss(batch, &p.token_logps, reference.as_ref())?;
                (out, lp)
            }
            None => (post, post_lp),
        };

        let squeeze = if self.diagnostics {
            let chosen_tokens = batch.response_lens[..batch.num_pairs].iter().sum();
            Some(crate::diagnostics::squeeze(
                &head,
                &h,
                &batch.targets,
                chosen_tokens,
            )?)
        } else {
            None
        };

        // Line 7: the single backward pass.
        let grads = match backward_weight {
            Some(w) => Some(self.policy.backward(&(&loss * w)?)?),
            None => None,
        };
        Ok(MicroStep {
            grads,
            loss: scalar(&loss)?,
            loss_pre: perturbation.as_ref().map(|p| p.loss_pre),
            sam_grad_norm: perturbation.as_ref().map(|p| p.grad_norm),
            chosen_rewards: to_f32s(&out.chosen_rewards)?,
            rejected_rewards: to_f32s(&out.rejected_rewards)?,
            chosen_logps: to_f32s(&lp.chosen)?,
            rejected_logps: to_f32s(&lp.rejected)?,
            ref_chosen_logps: lp.ref_chosen.as_ref().map(to_f32s).transpose()?,
            ref_rejected_logps: lp.ref_rejected.as_ref().map(to_f32s).transpose()?,
            squeeze,
        })
    }

    /// Trains from [`Trainer::step`] (0, or a restored checkpoint's) to the configured number
    /// of steps; writes metrics.jsonl, checkpoints every `save_steps` and at the end, and the
    /// final model. Stops early, with a checkpoint, when [`Trainer::stop`] is set.
    pub fn train(&mut self) -> Result<serde_json::Value> {
        let out_dir = self.cfg.output_dir.clone();
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("cannot create output_dir {}", out_dir.display()))?;
        let mut metrics = self.open_metrics(&out_dir.join("metrics.jsonl"))?;

        let t = self.cfg.training.clone();
        let micro = self.cfg.micro_batch_size();
        let total = self.schedule.total;
        let n = self.train_pairs.len();
        let mut feed = self.open_feed()?;

        let bar = if self.progress {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_position(self.step as u64);
        let mut last = json!({});
        while self.step < total {
            let step = self.step + 1;
            self.diagnostics = step % t.logging_steps == 0 || step == total;
            let started = Instant::now();
            let lr = self.schedule.lr(step - 1);
            let mut acc = GradAccumulator::new(self.policy.params.len());
            let mut tally = Tally::default();
            // Set by a non-finite loss under `skip_nonfinite`: the rest of the step's batch is
            // still drawn, so that later steps see the same data as without the skip.
            let mut nonfinite: Option<String> = None;
            let micro_batches = t.batch_size / micro;
            for mb in 0..micro_batches {
                let (mut idx, mut pairs) = (Vec::with_capacity(micro), Vec::with_capacity(micro));
                while idx.len() < micro {
                    let (i, pair) = self.next_pair(&mut feed)?;
                    idx.push(i);
                    pairs.push(pair);
                }
                if nonfinite.is_some() {
                    continue;
                }
                let batch = PreferenceBatch::new(&pairs, self.tok.pad_id, &self.device)?;
                let weight = micro as f64 / t.batch_size as f64;
                let reference = self.reference_for(&batch, Some((Split::Train, &idx)))?;
                let ms = self.micro_step_with(&batch, reference, Some(weight))?;
                if !ms.loss.is_finite() {
                    nonfinite = Some(format!(
                        "non-finite loss ({}) at step {step}, micro-batch {mb} of {micro_batches} (train pairs {idx:?})",
                        ms.loss
                    ));
                    continue;
                }
                acc.add(
                    &self.policy.params,
                    ms.grads.as_ref().expect("backward was requested"),
                )?;
                tally.add(&ms, &batch);
            }
            let (grad_norm, grad_scale) = if nonfinite.is_some() {
                (f64::NAN, 1.0)
            } else {
                acc.clip(t.max_grad_norm)?
            };
            if nonfinite.is_none() && !grad_norm.is_finite() {
                nonfinite = Some(format!("non-finite gradient norm ({grad_norm}) at step {step} (micro-batches 0..{micro_batches})"));
            }
            match &nonfinite {
                Some(what) if !t.skip_nonfinite => anyhow::bail!(
                    "{what}; stopped without updating, so the last checkpoint in {} is the last good state \
                     (training.skip_nonfinite = true skips such steps instead)",
                    out_dir.display()
                ),
                Some(what) => {
                    self.nonfinite_skipped += 1;
                    bar.suspend(|| eprintln!("warning: {what}: update skipped"));
                }
                None => self
                    .optimizer
                    .apply(&self.policy.params, acc.grads(), grad_scale, lr)?,
            }
            self.step = step;
            let elapsed = started.elapsed().as_secs_f64();
            if step % t.logging_steps == 0 || step == total {
                // A stream's length is unknown: its lines carry the epoch being read.
                let epoch_f = match self.stream {
                    Some(_) => self.data_pos.epoch as f64,
                    None => (step * t.batch_size) as f64 / n as f64,
                };
                let mut line = tally.metrics(self.cfg.sam.kind != "none");
                line["grad_norm"] = json!(grad_norm);
                line["learning_rate"] = json!(lr);
                line["tokens_per_second"] = json!(tally.tokens as f64 / elapsed);
                line["step"] = json!(step);
                line["epoch"] = json!(epoch_f);
                if t.skip_nonfinite {
                    line["nonfinite_skipped"] = json!(self.nonfinite_skipped);
                }
                self.write_metrics(&mut metrics, &line)?;
                bar.set_message(format!(
                    "loss {:.4} acc {:.2} margin {:.3}",
                    line["loss"].as_f64().unwrap_or(f64::NAN),
                    line["rewards/accuracies"].as_f64().unwrap_or(f64::NAN),
                    line["rewards/margins"].as_f64().unwrap_or(f64::NAN)
                ));
                last = line;
            }
            let eval_due = t.eval_steps > 0 && step % t.eval_steps == 0 && step != total;
            if eval_due && !self.eval_pairs.is_empty() {
                let mut line = self.evaluate()?;
                line["step"] = json!(step);
                self.write_metrics(&mut metrics, &line)?;
            }
            bar.inc(1);
            let stop = self.stop.load(Ordering::SeqCst);
            if (t.save_steps > 0 && step % t.save_steps == 0) || step == total || stop {
                let dir = crate::checkpoint::save(self, &out_dir)?;
                if stop {
                    bar.abandon();
                    return Ok(
                        json!({ "train": last, "interrupted_at_step": step, "checkpoint": dir }),
                    );
                }
            }
        }
        bar.finish();
        let skipped = self.skipped_total();
        if self.stream.is_some() {
            // The streamed rows' skips are known only now (no `step`: a record of the data).
            let line = json!({"data/skipped": skipped, "data/epoch": self.data_pos.epoch});
            self.write_metrics(&mut metrics, &line)?;
        }
        let mut summary = json!({ "train": last, "skipped": skipped, "output_dir": out_dir });
        if t.skip_nonfinite {
            summary["nonfinite_skipped"] = json!(self.nonfinite_skipped);
        }
        if !self.eval_pairs.is_empty() {
            // As after the last step, also when a run resumed from the final checkpoint.
            self.diagnostics = true;
            let mut line = self.evaluate()?;
            line["step"] = json!(total);
            self.write_metrics(&mut metrics, &line)?;
            summary["eval"] = line;
        }
        let opts = crate::checkpoint::SaveOptions::from_config(&self.cfg.training)?;
        crate::checkpoint::save_model(&self.policy, &self.tok, &out_dir, &opts)?;
        Ok(summary)
    }

    /// metrics.jsonl for appending: a fresh file starting with the data line, or, resumed, the
    /// file cut to the lines the checkpoint had seen (so there is one line per step).
    fn open_metrics(&mut self, path: &Path) -> Result<std::fs::File> {
        let cannot = || format!("cannot write {}", path.display());
        if self.step == 0 {
            let mut f = std::fs::File::create(path).with_context(cannot)?;
            // No `step`: a record of the data, not a point on the charts.
            let mut data_line = json!({"data/train_pairs": self.train_pairs.len(), "data/eval_pairs": self.eval_pairs.len(), "data/skipped": self.skipped});
            if self.stream.is_some() {
                // Streamed: eval skips only so far; the training rows' come in a last line.
                data_line["data/streaming"] = json!(true);
                data_line["data/train_pairs"] = serde_json::Value::Null;
            }
            self.metrics_lines = 0;
            self.write_metrics(&mut f, &data_line)?;
            return Ok(f);
        }
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kept: Vec<&str> = text.lines().take(self.metrics_lines).collect();
        self.metrics_lines = kept.len();
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(
            &tmp,
            kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .with_context(cannot)?;
        std::fs::rename(&tmp, path).with_context(cannot)?;
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(cannot)
    }

    fn write_metrics(&mut self, f: &mut std::fs::File, line: &serde_json::Value) -> Result<()> {
        writeln!(f, "{line}").context("cannot write metrics.jsonl")?;
        self.metrics_lines += 1;
        Ok(())
    }

    /// Skipped rows by reason: the in-memory splits' and the streamed training rows'.
    pub fn skipped_total(&self) -> BTreeMap<String, usize> {
        let mut all = self.data_pos.skipped.clone();
        for (k, v) in &self.skipped {
            *all.entry(k.to_string()).or_default() += v;
        }
        all
    }

    /// The training data positioned at [`Trainer::data_pos`]. A stream cannot seek, so a
    /// resumed one re-reads its epoch up to the cursor; the skips it meets again are already
    /// in the restored cursor's counts.
    fn open_feed(&mut self) -> Result<Feed> {
        if self.stream.is_none() {
            let lengths: Vec<usize> = self
                .train_pairs
                .iter()
                .map(crate::data::stream::pair_len)
                .collect();
            let (micro, window) = (self.cfg.micro_batch_size(), self.cfg.data.group_by_length);
            let order = crate::data::stream::epoch_order(
                &lengths,
                micro,
                window,
                self.cfg.seed,
                self.data_pos.epoch,
            );
            return Ok(Feed::Memory { lengths, order });
        }
        let mut feed = Feed::Stream {
            tok: Arc::new(self.tok.clone()),
            batches: None,
            ready: Vec::new().into_iter(),
        };
        let saved = std::mem::take(&mut self.data_pos);
        self.data_pos.epoch = saved.epoch;
        while self.data_pos.cursor < saved.cursor {
            self.next_pair(&mut feed)?;
        }
        self.data_pos = saved;
        Ok(feed)
    }

    /// The next training pair and its index (into `train_pairs`, or streamed, its position in
    /// the epoch), moving [`Trainer::data_pos`] on, into the next epoch at the end of one.
    fn next_pair(&mut self, feed: &mut Feed) -> Result<(usize, TokenizedPair)> {
        let (micro, seed) = (self.cfg.micro_batch_size(), self.cfg.seed);
        let pos = &mut self.data_pos;
        match feed {
            Feed::Memory { lengths, order } => {
                if pos.cursor >= order.len() {
                    pos.epoch += 1;
                    pos.cursor = 0;
                    let window = self.cfg.data.group_by_length;
                    *order =
                        crate::data::stream::epoch_order(lengths, micro, window, seed, pos.epoch);
                }
                let i = order[pos.cursor];
                pos.cursor += 1;
                Ok((i, self.train_pairs[i].clone()))
            }
            Feed::Stream {
                tok,
                batches,
                ready,
            } => loop {
                if let Some(pair) = ready.next() {
                    pos.cursor += 1;
                    return Ok((pos.cursor - 1, pair));
                }
                let b = match batches {
                    Some(b) => b,
                    None => batches.insert(Box::new(crate::data::train_batches(
                        &self.cfg.data,
                        self.stream.clone().expect("a stream feed has a converter"),
                        tok.clone(),
                        seed,
                        pos.epoch,
                        micro,
                    )?)),
                };
                let next = b.next().transpose()?;
                let skips = std::mem::take(&mut b.skips.counts);
                if pos.epoch == 0 {
                    for (reason, count) in skips {
                        *pos.skipped.entry(reason.to_string()).or_default() += count;
                    }
                }
                match next {
                    Some(pairs) => *ready = pairs.into_iter(),
                    None if pos.cursor == 0 => anyhow::bail!(
                        "no usable training pairs in data.train (skipped: {:?})",
                        pos.skipped
                    ),
                    None => {
                        *batches = None;
                        pos.epoch += 1;
                        pos.cursor = 0;
                    }
                }
            },
        }
    }

    /// Loss and reward metrics over the held-out pairs, named as TRL does (`eval_loss`, …).
    pub fn evaluate(&self) -> Result<serde_json::Value> {
        let mut tally = Tally::default();
        let micro = self.cfg.micro_batch_size();
        for (c, chunk) in self.eval_pairs.chunks(micro).enumerate() {
            let batch = PreferenceBatch::new(chunk, self.tok.pad_id, &self.device)?;
            let idx: Vec<usize> = (c * micro..c * micro + chunk.len()).collect();
            let reference = self.reference_for(&batch, Some((Split::Eval, &idx)))?;
            tally.add(&self.micro_step_with(&batch, reference, None)?, &batch);
        }
        let m = tally.metrics(false);
        let mut out = serde_json::Map::new();
        for (k, v) in m.as_object().expect("metrics are an object") {
            if !k.starts_with("sam/") {
                out.insert(format!("eval_{k}"), v.clone());
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}

impl Tally {
    fn add(&mut self, ms: &MicroStep, batch: &PreferenceBatch) {
        let b = ms.chosen_rewards.len() as f64;
        self.pairs += b;
        self.micro_batches += 1.0;
        self.loss += ms.loss * b;
        let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
        self.chosen_rewards += sum(&ms.chosen_rewards);
        self.rejected_rewards += sum(&ms.rejected_rewards);
        self.accuracies += ms
            .chosen_rewards
            .iter()
            .zip(&ms.rejected_rewards)
            .filter(|(c, r)| c > r)
            .count() as f64;
        self.chosen_logps += sum(&ms.chosen_logps);
        self.rejected_logps += sum(&ms.rejected_logps);
        self.loss_pre += ms.loss_pre.unwrap_or(0.0) * b;
        self.sam_grad_norm += ms.sam_grad_norm.unwrap_or(0.0);
        self.tokens += batch.num_tokens;
        self.padding += batch.padding_fraction;
        if let (Some(rc), Some(rr)) = (&ms.ref_chosen_logps, &ms.ref_rejected_logps) {
            *self.chosen_delta.get_or_insert(0.0) += sum(&ms.chosen_logps) - sum(rc);
            *self.rejected_delta.get_or_insert(0.0) += sum(&ms.rejected_logps) - sum(rr);
        }
        if let Some(s) = &ms.squeeze {
            self.squeeze.get_or_insert_with(Default::default).add(s);
        }
    }

    fn metrics(&self, sam: bool) -> serde_json::Value {
        let p = self.pairs.max(1.0);
        let mut m = json!({
            "loss": self.loss / p,
            "rewards/chosen": self.chosen_rewards / p,
            "rewards/rejected": self.rejected_rewards / p,
            "rewards/accuracies": self.accuracies / p,
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards) / p,
            "logps/chosen": self.chosen_logps / p,
            "logps/rejected": self.rejected_logps / p,
            "padding_fraction": self.padding / self.micro_batches.max(1.0),
        });
        if sam {
            m["sam/loss_pre"] = json!(self.loss_pre / p);
            m["sam/loss_post"] = json!(self.loss / p);
            m["sam/grad_norm"] = json!(self.sam_grad_norm / self.micro_batches.max(1.0));
        }
        // Squeeze diagnostics (README: "Metrics"): how far chosen and rejected log-probs moved
        // from the reference, y*'s probability along chosen responses, and tr(H_z).
        if let (Some(c), Some(r)) = (self.chosen_delta, self.rejected_delta) {
            m["squeeze/chosen_logps_delta"] = json!(c / p);
            m["squeeze/rejected_logps_delta"] = json!(r / p);
        }
        if let Some(s) = &self.squeeze {
            m["squeeze/top_nontarget_prob"] =
                json!(s.top_nontarget_prob / s.chosen_tokens.max(1) as f64);
            m["squeeze/hessian_trace"] = json!(s.hessian_trace / s.tokens.max(1) as f64);
        }
        m
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

fn to_f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.to_vec1()
}

/// Hidden states `[rows, t, d]` → `[n, d]` at the flat positions that predict response tokens.
pub fn response_hidden(h: Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, t, d) = h.dims3()?;
    h.reshape((rows * t, d))?.index_select(positions, 0)
}

fn resolve_source(cfg: &Config, spec: &str) -> Result<ModelSource> {
    ModelSource::resolve(spec, &cfg.model.builtin, cfg.seed)
}
