//! The [`Trainer`]: everything a run holds, built from its config — the policy (with f32 masters
//! under mixed precision), the reference (a model, precomputed log-probs, or none), the
//! tokenised data, the loss, the optimiser and the schedule — and the narrow view of it that
//! benchmarks and tests use.

use crate::checkpoint::{SaveOptions, Snapshot, TrainerState};
use crate::config::{Config, OptimizerType, SamKind, TrainingConfig};
use crate::data::batch::{TokenizedPair, Truncation};
use crate::data::format::Converter;
use crate::data::{DataCursor, Split};
use crate::dist::{Collective, Solo};
use crate::losses::{Loss, LossParams};
use crate::models::{Model, ModelSource};
use crate::optim::{Optimizer, OptimizerKind, Schedule};
use crate::refcache::RefLogps;
use crate::tokenizer::Tok;
use anyhow::Result;
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Where reference log-probs come from.
pub enum Reference {
    /// Reference-free losses: none.
    None,
    /// The frozen reference model, run on every batch.
    Model(Model),
    /// Computed once before training (`precompute_ref_log_probs`); the model has been freed.
    Cache(RefLogps),
}

impl Reference {
    pub fn model(&self) -> Option<&Model> {
        match self {
            Reference::Model(m) => Some(m),
            _ => None,
        }
    }

    pub fn cache(&self) -> Option<&RefLogps> {
        match self {
            Reference::Cache(c) => Some(c),
            _ => None,
        }
    }
}

/// Everything a run holds.
pub struct Trainer {
    pub(super) cfg: Config,
    pub(super) device: Device,
    pub(super) tok: Tok,
    pub(super) policy: Model,
    pub(super) reference: Reference,
    pub(super) loss: Loss,
    pub(super) optimizer: Optimizer,
    /// Empty with `data.streaming`: the loop reads the training records through `stream`.
    pub(super) train_pairs: Arc<Vec<TokenizedPair>>,
    pub(super) eval_pairs: Vec<TokenizedPair>,
    /// Rows skipped by reason while loading the in-memory splits.
    pub(super) skipped: BTreeMap<&'static str, usize>,
    /// With `data.streaming`, the converter of the training records.
    pub(super) stream: Option<Arc<Converter>>,
    /// The loop's position and counters, and the schedule: what `trainer_state.json` saves.
    pub(super) state: TrainerState,
    pub(super) progress: bool,
    /// Compute squeeze diagnostics in the micro-step (the loop turns this on for logging
    /// steps; it costs one more output-layer matmul).
    pub(super) diagnostics: bool,
    /// Set (by a signal) to stop after the current step with a checkpoint.
    pub(super) stop: Arc<AtomicBool>,
    /// The other ranks of a data-parallel run ([`Solo`] for one process).
    pub(super) world: Box<dyn Collective>,
}

impl Trainer {
    /// A single-process run.
    pub fn new(cfg: Config) -> Result<Trainer> {
        Trainer::new_in(cfg, Box::new(Solo))
    }

    /// One rank of the data-parallel run `world` (from [`crate::dist::join`]), on the device
    /// of `cfg` (this rank's).
    pub fn new_in(cfg: Config, world: Box<dyn Collective>) -> Result<Trainer> {
        cfg.check_world_size(world.world_size())?;
        let device = crate::device::parse(&cfg.device)?;
        crate::kernels::set_tf32(&device, cfg.training.tf32)?;
        let timeout = Duration::from_secs(cfg.training.ddp_timeout);
        let world = crate::dist::on_device(world, &device, timeout)?;
        let dtype = cfg.model.dtype.dtype();
        let loss = configured_loss(&cfg);

        let policy_src = resolve_source(&cfg, &cfg.model.name_or_path)?;
        let tok = policy_src.tokenizer()?;
        let mut policy = Model::load(&policy_src, true, dtype, &device)?;
        let compute_dtype = cfg.compute_dtype();
        if compute_dtype != dtype {
            policy = policy.with_master_weights(compute_dtype, &device)?;
        }
        policy.set_gradient_checkpointing(cfg.training.gradient_checkpointing);
        let vocab = policy.net.output_layer().vocab_size()?;
        tok.check_fits(vocab, &cfg.model.name_or_path)?;

        let model_dir = policy_src.dir();
        // Streamed, only the (small) eval split is loaded; the loop reads the training split.
        let (splits, stream) = if cfg.data.streaming {
            let conv = crate::data::converter(&cfg.data, &tok, model_dir)?;
            (&[Split::Eval][..], Some(conv))
        } else {
            (&[Split::Train, Split::Eval][..], None)
        };
        let data = crate::data::load_splits(&cfg.data, &tok, cfg.seed, model_dir, splits)?;
        let (train_pairs, eval_pairs, skipped) = (data.train, data.eval, data.skipped);
        if train_pairs.is_empty() && stream.is_none() {
            anyhow::bail!("no usable training pairs (skipped: {skipped:?})");
        }

        let reference = if !loss.needs_reference() {
            Reference::None
        } else {
            let model = if cfg.ref_name_or_path() == cfg.model.name_or_path {
                policy.frozen_copy(&device)?
            } else {
                let ref_src = resolve_source(&cfg, cfg.ref_name_or_path())?;
                Model::load(&ref_src, false, compute_dtype, &device)?
            };
            if cfg.training.precompute_ref_log_probs {
                // The model is dropped once its log-probs are cached.
                let ref_src = resolve_source(&cfg, cfg.ref_name_or_path())?;
                let inputs = crate::refcache::FingerprintInputs {
                    reference: &ref_src,
                    dtype,
                    tok: &tok,
                    truncation: &Truncation::from_config(&cfg.data),
                    train: &train_pairs,
                    eval: &eval_pairs,
                };
                // Rank 0 alone hashes the model files.
                let fingerprint = super::parallel::from_rank_0(&*world, || {
                    crate::refcache::fingerprint(&inputs)
                })?;
                let (cache, _) = crate::refcache::load_or_compute(
                    &cfg.output_dir,
                    &fingerprint,
                    &model,
                    (&train_pairs, &eval_pairs),
                    cfg.micro_batch_size(),
                    tok.pad_id,
                    &device,
                    &*world,
                )?;
                Reference::Cache(cache)
            } else {
                Reference::Model(model)
            }
        };

        let t = &cfg.training;
        if !cfg.data.streaming && cfg.micro_batches_per_epoch(train_pairs.len()) == 0 {
            anyhow::bail!(
                "data.train: {} training pairs make no micro-batch of {} with training.dataloader_drop_last = true",
                train_pairs.len(),
                cfg.micro_batch_size()
            );
        }
        let total = cfg.total_steps(train_pairs.len());
        let warmup = if t.warmup_steps > 0 {
            t.warmup_steps
        } else {
            (t.warmup_ratio * total as f64).ceil() as usize
        };
        let schedule = Schedule {
            peak: t.learning_rate,
            warmup,
            total,
            kind: t.lr_scheduler_type,
        };
        let optimizer = Optimizer::new(optimizer_kind(t), &policy.params)?;
        Ok(Trainer {
            cfg,
            device,
            tok,
            policy,
            reference,
            loss,
            optimizer,
            train_pairs: Arc::new(train_pairs),
            eval_pairs,
            skipped,
            stream,
            state: TrainerState {
                step: 0,
                data: DataCursor::default(),
                metrics_lines: 0,
                nonfinite_skipped: 0,
                num_tokens: 0,
                schedule,
            },
            progress: false,
            diagnostics: false,
            stop: Arc::new(AtomicBool::new(false)),
            world,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn tok(&self) -> &Tok {
        &self.tok
    }

    pub fn policy(&self) -> &Model {
        &self.policy
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The tokenised training pairs (empty with `data.streaming`).
    pub fn train_pairs(&self) -> &[TokenizedPair] {
        &self.train_pairs
    }

    pub fn eval_pairs(&self) -> &[TokenizedPair] {
        &self.eval_pairs
    }

    /// Optimiser steps completed.
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Setting this flag stops the loop after the current step, with a checkpoint.
    pub fn stop_flag(&self) -> &Arc<AtomicBool> {
        &self.stop
    }

    /// A progress bar on stderr while training.
    pub fn set_progress(&mut self, on: bool) {
        self.progress = on;
    }

    /// Switches SAM on or off between steps (`bench` interleaves the variants on one model).
    pub fn set_sam_kind(&mut self, kind: SamKind) {
        self.cfg.sam.kind = kind;
    }

    /// How models are saved (`training.save_dtype`, `training.max_shard_size`).
    pub(super) fn save_options(&self) -> SaveOptions {
        SaveOptions {
            dtype: self.cfg.training.save_dtype.dtype(),
            max_shard_size: self.cfg.training.max_shard_size.bytes,
        }
    }

    /// Saves a resumable checkpoint of the current step under `out_dir` (and prunes the oldest
    /// beyond `training.save_total_limit`); returns its directory.
    pub fn save_checkpoint(&self, out_dir: &Path) -> Result<PathBuf> {
        let snapshot = Snapshot {
            model: &self.policy,
            tok: &self.tok,
            optimizer: &self.optimizer,
            state: &self.state,
            config: &self.cfg,
        };
        crate::checkpoint::save(
            &snapshot,
            out_dir,
            &self.save_options(),
            self.cfg.training.save_total_limit,
        )
    }

    /// Continues from a verified checkpoint: its weights, optimiser state, data position and
    /// counters (the schedule stays the one this config gives).
    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        let saved =
            crate::checkpoint::restore(dir, &self.policy, &mut self.optimizer, &self.device)?;
        self.state = TrainerState {
            schedule: self.state.schedule.clone(),
            ..saved
        };
        Ok(())
    }
}

/// The loss `[training]` configures: `loss_type` × `loss_weights` (+ `rpo_alpha` × sft) with
/// the losses' hyper-parameters under TRL's names.
pub fn configured_loss(cfg: &Config) -> Loss {
    let t = &cfg.training;
    let params = LossParams {
        beta: t.beta,
        label_smoothing: t.label_smoothing,
        simpo_gamma: t.simpo_gamma,
        cpo_alpha: t.cpo_alpha,
        slic_delta: t.slic_delta,
        slic_lambda: t.slic_lambda,
        dpop_lambda: t.dpop_lambda,
        nll_reduction: t.nll_reduction,
    };
    Loss {
        terms: cfg.loss_terms(),
        params,
    }
}

fn optimizer_kind(t: &TrainingConfig) -> OptimizerKind {
    match t.optimizer {
        OptimizerType::Adamw => OptimizerKind::AdamW {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
        OptimizerType::Sgd => OptimizerKind::Sgd {
            weight_decay: t.weight_decay,
        },
    }
}

fn resolve_source(cfg: &Config, spec: &str) -> Result<ModelSource> {
    ModelSource::resolve(spec, &cfg.model.builtin, cfg.seed)
}
