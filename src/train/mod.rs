//! `dpo-sam train`: the command (resume, signals) and the training loop. One optimiser step =
//! `batch_size / micro_batch_size` micro-batches (fewer at an epoch's end, as in HF's Trainer;
//! [`step`]: forward, logits-SAM, loss, one backward), then clipping, the learning-rate
//! schedule and the update; metrics, evaluation and checkpoints on their steps.
//!
//! - [`trainer`]: what a run holds and how it is built from the config;
//! - [`step`]: one micro-step, beside the paper's Algorithm 1;
//! - [`feed`]: the training pairs, micro-batch by micro-batch, from a saveable cursor;
//! - [`metrics`]: the lines of `metrics.jsonl` and the summary;
//! - [`parallel`]: data parallelism: each rank's share of a batch, what the ranks agree on after
//!   it, the gradients' all-reduce.

mod feed;
pub mod metrics;
mod parallel;
mod step;
mod trainer;

pub use metrics::{EvalLine, PairMetrics, Summary, TrainLine};
pub use step::MicroStep;
pub use trainer::{configured_loss, Reference, Trainer};

use crate::config::{Config, SamKind};
use crate::data::batch::PreferenceBatch;
use crate::data::Split;
use crate::optim::GradAccumulator;
use anyhow::{Context, Result};
use feed::Feed;
use metrics::{DataLine, MetricsFile, StreamedDataLine, Tally};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    #[command(
        flatten,
        next_help_heading = "Data parallelism (one worker process per GPU)"
    )]
    pub launch: crate::dist::Launch,
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
    let launching = args.launch.validated()?;
    if args.dry_run {
        return crate::plan::print(&cfg, args.launch.world_size());
    }
    if launching.is_some() {
        cfg.check_world_size(args.launch.world_size())?;
        return crate::dist::launch(&args.launch, &cfg.device);
    }
    let env = crate::dist::Env::from_process()?;
    match &env {
        Some(e) if e.world_size > 1 => run_rank(&args, cfg, env.as_ref())
            .with_context(|| format!("rank {} of {}", e.rank, e.world_size)),
        _ => run_rank(&args, cfg, env.as_ref()),
    }
}

/// This process's part of the run: all of it, or one rank of a data-parallel run (`env`).
fn run_rank(args: &TrainArgs, mut cfg: Config, env: Option<&crate::dist::Env>) -> Result<()> {
    let world_size = env.map_or(1, |e| e.world_size);
    let world = crate::dist::join(env, Duration::from_secs(cfg.training.ddp_timeout))?;
    // Compared first, so that a rank with another batch size is named rather than left alone.
    parallel::check_same_config(&*world, &cfg)?;
    cfg.check_world_size(world_size)?;
    if let Some(env) = env {
        cfg.device = env.device_name(&cfg.device)?;
    }
    let main = world.rank() == 0;
    // Rank 0 picks the checkpoint; every rank reads it.
    let resume_from = match &args.resume {
        Some(dir) => Some(PathBuf::from(parallel::from_rank_0(&*world, || {
            let ckpt = resume_checkpoint(&cfg, dir.as_deref(), args.allow_config_drift)?;
            Ok(ckpt.display().to_string())
        })?)),
        None => None,
    };
    let mut trainer = Trainer::new_in(cfg, world)?;
    if let Some(ckpt) = &resume_from {
        trainer.restore(ckpt).with_context(|| match world_size {
            1 => String::new(),
            _ => "every rank reads the checkpoint: output_dir must be on a filesystem all nodes share".into(),
        })?;
        if main {
            eprintln!("resuming from {} (step {})", ckpt.display(), trainer.step());
        }
    }
    trainer.set_progress(!args.quiet && main);
    watch_signals(trainer.stop_flag())?;
    let summary = trainer.train()?;
    if !main {
        return Ok(());
    }
    eprintln!("{}", metrics::to_sorted_json(&summary, true)?);
    if let Summary::Interrupted {
        interrupted_at_step: step,
        ..
    } = summary
    {
        let mut cmd = format!("dpo-sam train --config {}", args.config.display());
        for ov in &args.overrides {
            cmd.push_str(&format!(" --set '{ov}'"));
        }
        if world_size > 1 {
            cmd.push_str(" <launcher flags: any number of ranks>");
        }
        eprintln!(
            "interrupted after step {step}; checkpoint saved. Resume with:\n  {cmd} --output-dir {dir} --resume {dir}",
            dir = trainer.config().output_dir.display()
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

impl Trainer {
    /// Trains from the current step (0, or a restored checkpoint's) to the configured number of
    /// steps; writes metrics.jsonl, checkpoints every `save_steps` and at the end, and the
    /// final model. Stops early, with a checkpoint, when the stop flag is set.
    pub fn train(&mut self) -> Result<Summary> {
        let out_dir = self.cfg.output_dir.clone();
        // Data parallel: rank 0 alone writes metrics, checkpoints and the model.
        let main = self.world.rank() == 0;
        if main {
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("cannot create output_dir {}", out_dir.display()))?;
        }
        parallel::check_same_weights(&*self.world, &self.policy.params)?;
        let mut metrics = self.open_metrics(&out_dir.join("metrics.jsonl"))?;

        let t = self.cfg.training.clone();
        let accumulation = t.batch_size / self.cfg.micro_batch_size();
        let total = self.state.schedule.total;
        let mut feed = Feed::open(self)?;
        let bar = self.progress_bar(total);
        let mut last: Option<TrainLine> = None;
        while self.state.step < total {
            let step = self.state.step + 1;
            self.diagnostics = step.is_multiple_of(t.logging_steps) || step == total;
            let started = Instant::now();
            let lr = self.state.schedule.lr(step - 1);
            let micro_batches = feed.next_step(accumulation)?;
            let n = micro_batches.len();
            // HF divides each micro-batch's loss by the step's micro-batch count (fewer at an
            // epoch's end), so every micro-batch weighs the same, however many pairs it has.
            let weight = 1.0 / n as f64;
            let mut acc = GradAccumulator::new(self.policy.params.len());
            let mut tally = Tally::default();
            // Set by a non-finite loss under `skip_nonfinite`: the rest of the step's batch is
            // still drawn, so that later steps see the same data as without the skip.
            let mut nonfinite: Option<String> = None;
            // Data parallel: this rank's share of the step's micro-batches (all are drawn and
            // counted on every rank, so that the cursor and `num_tokens` agree).
            let mine = crate::dist::shard(n, self.world.rank(), self.world.world_size());
            for (mb, (idx, pairs)) in micro_batches.iter().enumerate() {
                let batch = PreferenceBatch::new(pairs, self.tok.pad_id, &self.device)?;
                self.state.num_tokens += batch.num_tokens;
                if nonfinite.is_some() || !mine.contains(&mb) {
                    continue;
                }
                let reference = self.reference_for(&batch, Some((Split::Train, idx)))?;
                let ms = self.micro_step_with(&batch, reference, Some(weight))?;
                if !ms.loss.is_finite() {
                    nonfinite = Some(format!(
                        "non-finite loss ({}) at step {step}, micro-batch {mb} of {n} (train pairs {idx:?})",
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
            // Data parallel: every rank's view of the step, then the gradients summed over ranks.
            let stop = self.stop.load(Ordering::SeqCst);
            let agreed = parallel::agree(&*self.world, nonfinite, stop, tally, &acc)?;
            let (mut nonfinite, tally) = (agreed.nonfinite.clone(), &agreed.tally);
            let grad_norm = match nonfinite {
                Some(_) => f64::NAN,
                None => {
                    let bucket = t.ddp_bucket_cap_mb;
                    parallel::all_reduce_grads(
                        &*self.world,
                        &mut acc,
                        &agreed,
                        &self.policy.params,
                        bucket,
                    )?;
                    self.apply_gradients(&acc, lr)?
                }
            };
            if nonfinite.is_none() && !grad_norm.is_finite() {
                nonfinite = Some(format!(
                    "non-finite gradient norm ({grad_norm}) at step {step} (micro-batches 0..{n})"
                ));
            }
            match &nonfinite {
                Some(what) if !t.skip_nonfinite => anyhow::bail!(
                    "{what}; stopped without updating, so the last checkpoint in {} is the last good state \
                     (training.skip_nonfinite = true skips such steps instead)",
                    out_dir.display()
                ),
                Some(what) => {
                    self.state.nonfinite_skipped += 1;
                    if main {
                        bar.suspend(|| eprintln!("warning: {what}: update skipped"));
                    }
                }
                None => {}
            }
            self.state.step = step;
            self.state.data = feed.cursor().clone();
            let elapsed = started.elapsed().as_secs_f64();
            if step.is_multiple_of(t.logging_steps) || step == total {
                let line = TrainLine {
                    metrics: tally.metrics(self.cfg.sam.kind != SamKind::None, false),
                    grad_norm,
                    learning_rate: lr,
                    tokens_per_second: tally.tokens as f64 / elapsed,
                    num_tokens: self.state.num_tokens,
                    step,
                    // A stream's length is unknown: its lines carry the epoch being read.
                    epoch: feed
                        .epoch_progress()
                        .unwrap_or(self.state.data.epoch as f64),
                    nonfinite_skipped: t.skip_nonfinite.then_some(self.state.nonfinite_skipped),
                };
                metrics.write(&line)?;
                let m = &line.metrics;
                bar.set_message(format!(
                    "loss {:.4} acc {:.2} margin {:.3}",
                    m.loss, m.rewards_accuracies, m.rewards_margins
                ));
                last = Some(line);
            }
            let eval_due = t.eval_steps > 0 && step.is_multiple_of(t.eval_steps) && step != total;
            if eval_due && !self.eval_pairs.is_empty() {
                self.diagnostics = true;
                let metrics_line = EvalLine {
                    metrics: self.evaluate()?,
                    num_tokens: self.state.num_tokens,
                    step,
                };
                metrics.write(&metrics_line)?;
            }
            bar.inc(1);
            let stop = agreed.stop;
            if (t.save_steps > 0 && step.is_multiple_of(t.save_steps)) || step == total || stop {
                self.state.metrics_lines = metrics.lines();
                let checkpoint = match main {
                    true => self.save_checkpoint(&out_dir)?,
                    false => out_dir.join(crate::checkpoint::dir_name(step)),
                };
                if stop {
                    bar.abandon();
                    return Ok(Summary::Interrupted {
                        train: last,
                        interrupted_at_step: step,
                        checkpoint,
                    });
                }
            }
        }
        bar.finish();
        let skipped = self.skipped_total();
        if self.stream.is_some() {
            metrics.write(&StreamedDataLine {
                skipped: &skipped,
                epoch: self.state.data.epoch,
            })?;
        }
        let eval = if self.eval_pairs.is_empty() {
            None
        } else {
            // As after the last step, also when a run resumed from the final checkpoint.
            self.diagnostics = true;
            let line = EvalLine {
                metrics: self.evaluate()?,
                num_tokens: self.state.num_tokens,
                step: total,
            };
            metrics.write(&line)?;
            Some(Box::new(line))
        };
        if main {
            crate::checkpoint::save_model(&self.policy, &self.tok, &out_dir, &self.save_options())?;
        }
        // Every rank returns once the model is saved (or fails with rank 0).
        self.world.barrier()?;
        Ok(Summary::Finished {
            train: last,
            skipped,
            output_dir: out_dir,
            nonfinite_skipped: t.skip_nonfinite.then_some(self.state.nonfinite_skipped),
            eval,
        })
    }

    /// Loss, reward and token metrics over the held-out pairs (logged with TRL's `eval_`
    /// prefix; the token metrics when `diagnostics` is on, as the loop sets it for evaluations).
    pub fn evaluate(&self) -> Result<PairMetrics> {
        let micro = self.cfg.micro_batch_size();
        let chunks: Vec<&[_]> = self.eval_pairs.chunks(micro).collect();
        // Data parallel: each rank its share of the batches, the tallies summed.
        let mine = crate::dist::shard(chunks.len(), self.world.rank(), self.world.world_size());
        let mut tallies = Vec::with_capacity(mine.len());
        for (c, chunk) in chunks.iter().enumerate().take(mine.end).skip(mine.start) {
            let batch = PreferenceBatch::new(chunk, self.tok.pad_id, &self.device)?;
            let idx: Vec<usize> = (c * micro..c * micro + chunk.len()).collect();
            let reference = self.reference_for(&batch, Some((Split::Eval, &idx)))?;
            let mut tally = Tally::default();
            tally.add(&self.micro_step_with(&batch, reference, None)?, &batch);
            tallies.push(tally);
        }
        Ok(parallel::sum_tallies(&*self.world, tallies)?.metrics(false, true))
    }

    /// metrics.jsonl for appending: a fresh file starting with the data line, or, resumed, the
    /// file cut to the lines the checkpoint had seen.
    fn open_metrics(&mut self, path: &Path) -> Result<MetricsFile> {
        let mut file = match (self.world.rank(), self.state.step) {
            (0, 0) => MetricsFile::open(path, None)?,
            (0, _) => return MetricsFile::open(path, Some(self.state.metrics_lines)),
            (_, 0) => MetricsFile::discard(0),
            (_, _) => return Ok(MetricsFile::discard(self.state.metrics_lines)),
        };
        file.write(&DataLine {
            train_pairs: self.stream.is_none().then_some(self.train_pairs.len()),
            eval_pairs: self.eval_pairs.len(),
            skipped: &self.skipped,
            streaming: self.stream.is_some().then_some(true),
        })?;
        Ok(file)
    }

    fn progress_bar(&self, total: usize) -> indicatif::ProgressBar {
        let bar = match self.progress {
            true => indicatif::ProgressBar::new(total as u64),
            false => return indicatif::ProgressBar::hidden(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(self.state.step as u64);
        bar
    }

    /// Skipped rows by reason: the in-memory splits' and the streamed training rows'.
    pub fn skipped_total(&self) -> BTreeMap<String, usize> {
        let mut all = self.state.data.skipped.clone();
        for (k, v) in &self.skipped {
            *all.entry(k.to_string()).or_default() += v;
        }
        all
    }
}
