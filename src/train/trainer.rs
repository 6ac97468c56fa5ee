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
use crate::models::lora::{self, AdapterFile};
use crate::models::{Model, ModelSource};
use crate::optim::{Optimizer, OptimizerKind, Rounding, Schedule};
use crate::refcache::RefLogps;
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
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
    /// LoRA without `ref_name_or_path`: the policy's own frozen weights with its adapters off
    /// (or, from `model.adapter`, with that adapter as it started), run on every batch; no
    /// second copy of the weights.
    PolicyBase,
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
    /// The base model card's license lines, copied into every card this run writes.
    base_license: Vec<(String, String)>,
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
        // What the policy's starting weights are: the model, and the adapter LoRA training
        // starts from (`model.adapter`); the caches of scores it computes are keyed by this.
        let policy_as_loaded = match &cfg.model.adapter {
            Some(adapter) => ModelSource::Adapted {
                base: Box::new(policy_src.clone()),
                adapter: adapter.clone(),
            },
            None => policy_src.clone(),
        };
        let tok = policy_src.tokenizer()?;
        let compute_dtype = cfg.compute_dtype();
        let start = cfg
            .model
            .adapter
            .as_deref()
            .map(AdapterFile::read)
            .transpose()?;
        let mut policy = if cfg.lora_enabled() {
            load_lora_policy(&cfg, &policy_src, start.as_ref(), compute_dtype, &device)?
        } else {
            let policy = Model::load(&policy_src, true, dtype, &device)?;
            match compute_dtype != dtype {
                true => policy.with_master_weights(compute_dtype, &device)?,
                false => policy,
            }
        };
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
        let (mut train_pairs, eval_pairs, mut skipped) = (data.train, data.eval, data.skipped);
        if train_pairs.is_empty() && stream.is_none() {
            anyhow::bail!("no usable training pairs (skipped: {skipped:?})");
        }
        let quantile = cfg.data.filter_ches_quantile;
        if quantile > 0.0 {
            // Scored by the policy as loaded (the SFT model), before any checkpoint is restored,
            // so a resumed run keeps the same pairs; cached beside the run. In a data-parallel
            // run each rank scores its share and every rank gets all the scores, bit for bit,
            // so every rank drops the same pairs.
            let inputs = crate::refcache::FingerprintInputs {
                model: &policy_as_loaded,
                dtype: compute_dtype,
                mixed_precision: cfg.training.mixed_precision,
                device: &device,
                tok: &tok,
                truncation: &Truncation::from_config(&cfg.data),
                train: &train_pairs,
                eval: &[],
            };
            let fingerprint = shared_fingerprint(&*world, crate::refcache::CHES_FORMAT, &inputs)?;
            let (scores, path, cached) = crate::refcache::ches_cached(
                &cfg.output_dir,
                &fingerprint,
                &policy,
                &train_pairs,
                cfg.micro_batch_size(),
                tok.pad_id,
                &device,
                &*world,
            )?;
            if world.rank() == 0 {
                eprintln!(
                    "data.filter_ches_quantile = {quantile}: CHES of {} training pairs {} {}",
                    scores.len(),
                    if cached { "read from" } else { "written to" },
                    path.display()
                );
            }
            let ln_ches: Vec<f64> = scores.iter().map(|c| c.ln_ches).collect();
            let (keep, threshold) = crate::data::ches::filter_mask(&ln_ches, quantile);
            let before = train_pairs.len();
            train_pairs = train_pairs
                .into_iter()
                .zip(keep)
                .filter_map(|(pair, keep)| keep.then_some(pair))
                .collect();
            let dropped = before - train_pairs.len();
            skipped.insert("ches_filter", dropped);
            if world.rank() == 0 {
                eprintln!(
                    "data.filter_ches_quantile = {quantile}: dropped {dropped} of {before} training pairs{}",
                    threshold.map_or(String::new(), |t| format!(", length-normalised CHES >= {t:.6}")),
                );
            }
        }

        let reference = if !loss.needs_reference() {
            Reference::None
        } else {
            // With LoRA and no explicit reference, the reference is the policy's frozen base
            // (with the adapter training started from, if any).
            let policy_base = cfg.lora_enabled() && cfg.model.ref_name_or_path.is_none();
            let model = if policy_base {
                None
            } else if cfg.ref_name_or_path() == cfg.model.name_or_path && !cfg.lora_enabled() {
                Some(policy.frozen_copy(&device)?)
            } else {
                let ref_src = resolve_source(&cfg, cfg.ref_name_or_path())?;
                Some(Model::load(&ref_src, false, compute_dtype, &device)?)
            };
            if cfg.training.precompute_ref_log_probs {
                // The model is dropped once its log-probs are cached.
                let ref_src = match policy_base {
                    true => policy_as_loaded.clone(),
                    false => resolve_source(&cfg, cfg.ref_name_or_path())?,
                };
                let inputs = crate::refcache::FingerprintInputs {
                    model: &ref_src,
                    dtype: compute_dtype,
                    mixed_precision: cfg.training.mixed_precision,
                    device: &device,
                    tok: &tok,
                    truncation: &Truncation::from_config(&cfg.data),
                    train: &train_pairs,
                    eval: &eval_pairs,
                };
                let fingerprint = shared_fingerprint(&*world, crate::refcache::FORMAT, &inputs)?;
                let compute = |model: &Model| {
                    crate::refcache::load_or_compute(
                        &cfg.output_dir,
                        &fingerprint,
                        model,
                        (&train_pairs, &eval_pairs),
                        cfg.micro_batch_size(),
                        tok.pad_id,
                        &device,
                        &*world,
                    )
                };
                let (cache, _) = match (&model, &policy.lora) {
                    (Some(model), _) => compute(model)?,
                    (None, Some(lora)) => lora.with_reference(|| compute(&policy))?,
                    (None, None) => unreachable!("the policy's base is a reference only with LoRA"),
                };
                Reference::Cache(cache)
            } else {
                match model {
                    Some(model) => Reference::Model(model),
                    None => Reference::PolicyBase,
                }
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
        let rounding = match t.bf16_stochastic_rounding {
            true => Rounding::Stochastic { seed: cfg.seed },
            false => Rounding::Nearest,
        };
        let optimizer = Optimizer::new(optimizer_kind(t), &policy.params, rounding)?;
        // Only rank 0 writes model cards.
        let base_license = match world.rank() {
            0 => crate::card::base_license(&cfg.model.name_or_path),
            _ => Vec::new(),
        };
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
                samples_lines: 0,
                tensorboard: None,
                num_tokens: 0,
                schedule,
                lora_dropout_draws: 0,
            },
            progress: false,
            diagnostics: false,
            stop: Arc::new(AtomicBool::new(false)),
            base_license,
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

    /// The model card of the current step: the config, the newest train and eval lines of
    /// `metrics.jsonl`, the base model's license.
    pub fn card(&self) -> String {
        let metrics = self.cfg.output_dir.join("metrics.jsonl");
        let (train, eval) = crate::card::latest_metrics(&metrics);
        crate::card::render(&crate::card::Card {
            config: &self.cfg,
            step: self.state.step,
            total_steps: self.state.schedule.total,
            train: train.as_ref(),
            eval: eval.as_ref(),
            license: &self.base_license,
        })
    }

    /// Saves a resumable checkpoint of the current step under `out_dir` (and prunes the oldest
    /// beyond `training.save_total_limit`); returns its directory.
    pub fn save_checkpoint(&self, out_dir: &Path) -> Result<PathBuf> {
        let card = self.card();
        let snapshot = Snapshot {
            model: &self.policy,
            tok: &self.tok,
            optimizer: &self.optimizer,
            state: &self.state,
            config: &self.cfg,
            card: &card,
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
        if let Some(lora) = &self.policy.lora {
            lora.set_draws(saved.lora_dropout_draws);
        }
        self.state = TrainerState {
            schedule: self.state.schedule.clone(),
            ..saved
        };
        Ok(())
    }
}

/// The fingerprint of `inputs` for a cache in `format`: rank 0 alone hashes the model files
/// and sends the list; every rank hashes the list.
fn shared_fingerprint(
    world: &dyn Collective,
    format: &str,
    inputs: &crate::refcache::FingerprintInputs,
) -> Result<crate::refcache::Fingerprint> {
    let list = super::parallel::from_rank_0(world, || {
        let inputs = crate::refcache::Fingerprint::new(format, inputs)?.inputs;
        Ok(serde_json::to_string(&inputs)?)
    })?;
    Ok(crate::refcache::Fingerprint::from_inputs(
        serde_json::from_str(&list).context("a cache fingerprint from rank 0")?,
    ))
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

/// The LoRA policy: the frozen base computing in `dtype`, with adapters from `[lora]` or
/// continuing `start` (`model.adapter`).
fn load_lora_policy(
    cfg: &Config,
    base: &ModelSource,
    start: Option<&AdapterFile>,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<Model> {
    let spec = lora::resolve_spec(cfg.lora.as_ref(), start)?;
    // What adapter_config.json names as the base: a local directory as an absolute path, so
    // that the adapter finds it from anywhere; a Hub id or built-in name as written.
    let name = &cfg.model.name_or_path;
    let base_model = match base {
        ModelSource::Dir(dir) if Path::new(name).is_dir() => std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.clone())
            .display()
            .to_string(),
        _ => name.clone(),
    };
    let setup = lora::Setup {
        spec,
        targets: cfg.lora.as_ref().and_then(|l| l.target_modules.as_ref()),
        start,
        trainable: true,
        seed: cfg.seed,
        base_model,
    };
    let model = Model::load_lora(base, &setup, dtype, device).with_context(|| match start {
        Some(f) => format!("model.adapter {}", f.dir.display()),
        None => format!("[lora] on {name}"),
    })?;
    if let Some(theirs) = start.and_then(|f| f.base_model.as_deref()) {
        let canonical = |p: &str| std::fs::canonicalize(p).ok();
        let same = theirs == setup.base_model
            || canonical(theirs).is_some_and(|t| Some(t) == canonical(&setup.base_model));
        if !same {
            eprintln!(
                "warning: model.adapter was made for {theirs:?}, model.name_or_path is {name:?}; \
                 continuing because every adapted layer has the shape the adapter expects"
            );
        }
    }
    Ok(model)
}
