//! `dpo-sam train`: the training loop. One optimiser step = `batch_size / micro_batch_size`
//! micro-batches, each one forward pass of the policy over chosen and rejected responses
//! stacked together, the optional logits-SAM perturbation of the output layer, the loss, and a
//! single backward pass; then clipping, the learning-rate schedule and the update.

use crate::config::Config;
use crate::data::batch::{PreferenceBatch, TokenizedPair};
use crate::losses::{Loss, PairLogps};
use crate::models::{parse_dtype, Model, ModelSource};
use crate::optim::{GradAccumulator, Optimizer, Schedule};
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  dpo-sam train --config configs/tiny_gpt2.toml --set sam.rho=0.05 --set training.max_steps=50")]
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
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.output_dir {
        overrides.push(format!("output_dir={}", toml::Value::String(dir.display().to_string())));
    }
    if let Some(dev) = &args.device {
        overrides.push(format!("device={}", toml::Value::String(dev.clone())));
    }
    let cfg = Config::load(&args.config, &overrides)?;
    if args.dry_run {
        return crate::plan::print(&cfg);
    }
    let mut trainer = Trainer::new(cfg)?;
    trainer.progress = !args.quiet;
    let summary = trainer.train()?;
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
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
    pub loss: Loss,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub train_pairs: Vec<TokenizedPair>,
    pub eval_pairs: Vec<TokenizedPair>,
    pub skipped: BTreeMap<&'static str, usize>,
    pub progress: bool,
    /// Compute squeeze diagnostics in [`Trainer::micro_step`] (the loop turns this on for
    /// logging steps; it costs one more output-layer matmul).
    pub diagnostics: bool,
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
        let policy = Model::load(&policy_src, true, dtype, &device)?;
        let vocab = policy.net.output_layer().vocab_size()?;
        tok.check_fits(vocab, &cfg.model.name_or_path)?;
        let reference = if !loss.needs_reference() {
            None
        } else if cfg.ref_name_or_path() == cfg.model.name_or_path {
            Some(policy.frozen_copy(&device)?)
        } else {
            let ref_src = resolve_source(&cfg, cfg.ref_name_or_path())?;
            Some(Model::load(&ref_src, false, dtype, &device)?)
        };

        let model_dir = policy_src.dir();
        let data = crate::data::load_tokenized(&cfg.data, &tok, cfg.seed, model_dir)?;
        let (train_pairs, eval_pairs, skipped) = (data.train, data.eval, data.skipped);
        if train_pairs.is_empty() {
            anyhow::bail!("no usable training pairs (skipped: {skipped:?})");
        }

        let t = &cfg.training;
        let steps_per_epoch = train_pairs.len().div_ceil(t.batch_size);
        let total = t.max_steps.unwrap_or_else(|| (t.num_train_epochs * steps_per_epoch as f64).ceil() as usize);
        let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).ceil() as usize };
        let schedule = Schedule { peak: t.learning_rate, warmup, total, kind: t.lr_scheduler_type.clone() };
        let optimizer = Optimizer::from_config(t, &policy.params)?;
        Ok(Trainer {
            cfg,
            device,
            tok,
            policy,
            reference,
            loss,
            optimizer,
            schedule,
            train_pairs,
            eval_pairs,
            skipped,
            progress: false,
            diagnostics: false,
        })
    }

    /// Per-row sequence log-probs `[2b]` of the response tokens (prompt and padding excluded).
    fn sequence_logps(batch: &PreferenceBatch, token_logps: &Tensor) -> candle_core::Result<Tensor> {
        let rows = 2 * batch.num_pairs;
        Tensor::zeros(rows, token_logps.dtype(), token_logps.device())?.index_add(&batch.rows, token_logps, 0)
    }

    /// The configured loss, averaged over pairs, as a function of per-token log-probs.
    fn batch_loss(&self, batch: &PreferenceBatch, token_logps: &Tensor, reference: Option<&(Tensor, Tensor)>) -> Result<(Tensor, crate::losses::LossOutput, PairLogps)> {
        let seq = Self::sequence_logps(batch, token_logps)?;
        let b = batch.num_pairs;
        let lens: Vec<f32> = batch.response_lens.iter().map(|&n| n.max(1) as f32).collect();
        let lens = Tensor::new(lens.as_slice(), token_logps.device())?.to_dtype(token_logps.dtype())?;
        let lp = PairLogps {
            chosen: seq.narrow(0, 0, b)?,
            rejected: seq.narrow(0, b, b)?,
            ref_chosen: reference.map(|r| r.0.clone()),
            ref_rejected: reference.map(|r| r.1.clone()),
            chosen_tokens: lens.narrow(0, 0, b)?,
            rejected_tokens: lens.narrow(0, b, b)?,
        };
        let out = self.loss.compute(&lp)?;
        Ok((out.losses.mean_all()?, out, lp))
    }

    /// Reference sequence log-probs (chosen, rejected), computed without a graph.
    fn reference_logps(&self, batch: &PreferenceBatch) -> Result<Option<(Tensor, Tensor)>> {
        let Some(reference) = &self.reference else { return Ok(None) };
        let h = response_hidden(reference.net.forward_hidden(&batch.input_ids)?, &batch.positions)?;
        let token_logps = reference.net.output_layer().token_logps(&h, &batch.targets, None)?;
        let seq = Self::sequence_logps(batch, &token_logps)?.detach();
        let b = batch.num_pairs;
        Ok(Some((seq.narrow(0, 0, b)?, seq.narrow(0, b, b)?)))
    }

    /// One micro-batch. With `backward_weight`, runs the single backward pass of
    /// `backward_weight × loss` (logits-SAM's loss_post when SAM is on); without, evaluates only.
    pub fn micro_step(&self, batch: &PreferenceBatch, backward_weight: Option<f64>) -> Result<MicroStep> {
        let reference = self.reference_logps(batch)?;
        let head = self.policy.net.output_layer();
        // The one forward pass, to the final hidden states H at positions that predict response tokens.
        let h = response_hidden(self.policy.net.forward_hidden(&batch.input_ids)?, &batch.positions)?;

        // logits-SAM, Algorithm 1 lines 1–4: e from loss_pre with H and W detached.
        let rho = self.cfg.sam.rho;
        let perturbation = if self.cfg.sam.kind == "logits" && backward_weight.is_some() {
            let objective = |token_logps: &Tensor| -> Result<Tensor> {
                Ok(self.batch_loss(batch, token_logps, reference.as_ref())?.0)
            };
            Some(crate::sam::logits_perturbation(&head, &h, &batch.targets, rho, &objective)?)
        } else {
            None
        };

        // Lines 5–6: logits from H (W + e)ᵀ, e constant, bias unperturbed; loss_post.
        let token_logps = head.token_logps(&h, &batch.targets, perturbation.as_ref().map(|p| &p.e))?;
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
            Some(crate::diagnostics::squeeze(&head, &h, &batch.targets, chosen_tokens)?)
        } else {
            None
        };

        // Line 7: the single backward pass.
        let grads = match backward_weight {
            Some(w) => Some((&loss * w)?.backward()?),
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

    /// Trains to the configured number of steps; writes metrics.jsonl and the final model.
    pub fn train(&mut self) -> Result<serde_json::Value> {
        let out_dir = self.cfg.output_dir.clone();
        std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create output_dir {}", out_dir.display()))?;
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut metrics = std::fs::File::create(&metrics_path)
            .with_context(|| format!("cannot write {}", metrics_path.display()))?;
        // No `step`: a record of the data, not a point on the charts.
        let data_line = json!({"data/train_pairs": self.train_pairs.len(), "data/eval_pairs": self.eval_pairs.len(), "data/skipped": self.skipped});
        writeln!(metrics, "{data_line}")?;

        let t = self.cfg.training.clone();
        let micro = self.cfg.micro_batch_size();
        let total = self.schedule.total;
        let n = self.train_pairs.len();
        let lengths: Vec<usize> = self.train_pairs.iter().map(crate::data::stream::pair_len).collect();
        let mut order: Vec<usize> = Vec::new();
        let mut cursor = 0usize;
        let mut epoch = 0usize;

        let bar = if self.progress {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut last = json!({});
        for step in 1..=total {
            self.diagnostics = step % t.logging_steps == 0 || step == total;
            let started = Instant::now();
            let lr = self.schedule.lr(step - 1);
            let mut acc = GradAccumulator::new(self.policy.params.len());
            let mut tally = Tally::default();
            for _ in 0..t.batch_size / micro {
                let mut idx = Vec::with_capacity(micro);
                while idx.len() < micro {
                    if cursor >= order.len() {
                        if !order.is_empty() {
                            epoch += 1;
                        }
                        order = crate::data::stream::epoch_order(&lengths, micro, self.cfg.data.group_by_length, self.cfg.seed, epoch);
                        cursor = 0;
                    }
                    idx.push(order[cursor]);
                    cursor += 1;
                }
                let pairs: Vec<TokenizedPair> = idx.iter().map(|&i| self.train_pairs[i].clone()).collect();
                let batch = PreferenceBatch::new(&pairs, self.tok.pad_id, &self.device)?;
                let weight = micro as f64 / t.batch_size as f64;
                let ms = self.micro_step(&batch, Some(weight))?;
                acc.add(&self.policy.params, ms.grads.as_ref().expect("backward was requested"))?;
                tally.add(&ms, &batch);
            }
            let grad_norm = acc.clip(t.max_grad_norm)?;
            self.optimizer.apply(&self.policy.params, acc.grads(), lr)?;
            let elapsed = started.elapsed().as_secs_f64();
            if step % t.logging_steps == 0 || step == total {
                let epoch_f = (step * t.batch_size) as f64 / n as f64;
                let mut line = tally.metrics(self.cfg.sam.kind == "logits");
                line["grad_norm"] = json!(grad_norm);
                line["learning_rate"] = json!(lr);
                line["tokens_per_second"] = json!(tally.tokens as f64 / elapsed);
                line["step"] = json!(step);
                line["epoch"] = json!(epoch_f);
                writeln!(metrics, "{line}")?;
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
                writeln!(metrics, "{line}")?;
            }
            bar.inc(1);
        }
        bar.finish();
        let mut summary = json!({ "train": last, "skipped": self.skipped, "output_dir": out_dir });
        if !self.eval_pairs.is_empty() {
            let mut line = self.evaluate()?;
            line["step"] = json!(total);
            writeln!(metrics, "{line}")?;
            summary["eval"] = line;
        }
        crate::checkpoint::save_model(&self.policy, &self.tok, &out_dir)?;
        Ok(summary)
    }

    /// Loss and reward metrics over the held-out pairs, named as TRL does (`eval_loss`, …).
    pub fn evaluate(&self) -> Result<serde_json::Value> {
        let mut tally = Tally::default();
        for chunk in self.eval_pairs.chunks(self.cfg.micro_batch_size()) {
            let batch = PreferenceBatch::new(chunk, self.tok.pad_id, &self.device)?;
            tally.add(&self.micro_step(&batch, None)?, &batch);
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
        self.accuracies += ms.chosen_rewards.iter().zip(&ms.rejected_rewards).filter(|(c, r)| c > r).count() as f64;
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
            m["squeeze/top_nontarget_prob"] = json!(s.top_nontarget_prob / s.chosen_tokens.max(1) as f64);
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
