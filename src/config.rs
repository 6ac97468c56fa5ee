//! Run configuration: the TOML schema, `--set key=value` overrides, and validation.
//!
//! Field names follow TRL's `DPOConfig` where one exists (`beta`, `loss_type`, `learning_rate`,
//! `max_length`, …). Every table rejects unknown keys, every closed choice is an enum parsed
//! here once, and every error names the file and the dotted key, so a typo never silently falls
//! back to a default.
//!
//! This module is a leaf: it describes settings and knows nothing of the modules that act on
//! them, which take the enums defined here and their own small parameter structs.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// A closed choice: a unit enum written in configs, flags and saved files as one of its names.
/// Parsing (TOML, `--set`, command-line flags) fails with "expected one of …, got `x`", which
/// the config loader prefixes with the dotted key.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every accepted name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => bail!("expected one of {}, got `{other}`", Self::NAMES.join(", ")),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(e))
            }
        }
    };
}

choice! {
    /// `model.dtype`: the dtype the weights are held and trained in.
    Dtype { F32 = "f32", Bf16 = "bf16", F16 = "f16", F64 = "f64" }
}

impl Dtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::Bf16 => candle_core::DType::BF16,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::F64 => candle_core::DType::F64,
        }
    }
}

choice! {
    /// `training.mixed_precision` (accelerate's name).
    MixedPrecision { No = "no", Bf16 = "bf16" }
}

choice! {
    /// `training.optimizer`.
    OptimizerType { Adamw = "adamw", Sgd = "sgd" }
}

choice! {
    /// `training.lr_scheduler_type` (HF's names): `constant` ignores warmup, the others warm up
    /// linearly over `warmup_steps` / `warmup_ratio` first.
    SchedulerType {
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Linear = "linear",
        Cosine = "cosine",
    }
}

choice! {
    /// `training.nll_reduction`: how the chosen responses' NLL in `cpo`, `slic` and `sft` (and
    /// `rpo_alpha`) is reduced over a micro-batch.
    NllReduction {
        /// TRL's: the mean over every chosen-response token of the micro-batch.
        TokenMean = "token_mean",
        /// The paper's Table 5 written literally: each chosen response's summed NLL, averaged
        /// over pairs (100–300× stronger for responses of 100–300 tokens).
        SequenceSum = "sequence_sum",
    }
}

choice! {
    /// `training.save_dtype`: `auto` keeps each weight's own dtype.
    SaveDtype { Auto = "auto", F32 = "f32", Bf16 = "bf16", F16 = "f16" }
}

impl SaveDtype {
    /// The dtype weights are converted to when saved; `None` keeps theirs.
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            SaveDtype::Auto => None,
            SaveDtype::F32 => Some(candle_core::DType::F32),
            SaveDtype::Bf16 => Some(candle_core::DType::BF16),
            SaveDtype::F16 => Some(candle_core::DType::F16),
        }
    }
}

choice! {
    /// `sam.kind`.
    SamKind {
        /// Plain training.
        None = "none",
        /// The paper's logits-SAM: the output layer only, one backward.
        Logits = "logits",
        /// SAM over every trainable parameter: two forward/backward passes per micro-batch.
        Full = "full",
    }
}

choice! {
    /// `data.truncation_mode`: which end of a long prompt is kept.
    TruncationMode { KeepEnd = "keep_end", KeepStart = "keep_start" }
}

choice! {
    /// `data.format`: how a record becomes a pair (the rules are in `data::format`).
    DataFormat {
        /// Chosen per record from its fields.
        Auto = "auto",
        /// Full dialogues in `chosen`/`rejected`; prompt up to the last `\n\nAssistant:`.
        Hh = "hh",
        /// `prompt`, `chosen`, `rejected` strings.
        Explicit = "explicit",
        /// `chosen`/`rejected` strings without a prompt: the prompt is their common prefix.
        Implicit = "implicit",
        /// Lists of `{role, content}` messages rendered with the tokenizer's chat template.
        Conversational = "conversational",
        /// Reddit TL;DR: `subreddit`/`title`/`post` (top level or under `info`) → TRL's prompt.
        Tldr = "tldr",
    }
}

choice! {
    /// `training.loss_type`: the losses of `losses.rs` (TRL's names where TRL has them).
    LossType {
        /// DPO, conservative with `label_smoothing`.
        Sigmoid = "sigmoid",
        /// Robust DPO.
        Robust = "robust",
        /// DPO's hinge variant.
        Hinge = "hinge",
        /// IPO on length-averaged log-ratios.
        Ipo = "ipo",
        /// SLiC-HF (reference-free).
        Slic = "slic",
        /// CPO (reference-free).
        Cpo = "cpo",
        /// SimPO (reference-free).
        Simpo = "simpo",
        /// DPO-Positive.
        Dpop = "dpop",
        /// NLL of the chosen response (reference-free).
        Sft = "sft",
    }
}

choice! {
    /// One entry of `training.report_to` (TRL's key): where metrics go besides `metrics.jsonl`,
    /// which is always written (resume and `plot` read it).
    Integration {
        /// `metrics.jsonl` only.
        None = "none",
        /// Every integration built in: TensorBoard.
        All = "all",
        /// `metrics.jsonl` only (named for clarity).
        Jsonl = "jsonl",
        /// Event files under `output_dir/runs/<date>_<host>/`.
        Tensorboard = "tensorboard",
    }
}

/// A key that takes one name or a list of them (`loss_type`, `report_to`); saved back in the
/// same form.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(x) => vec![x.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }

    /// Reads a name or a list of names, each through `parse`; `expected` says what a value of
    /// another shape should have been.
    fn deserialize_names<'de, D: Deserializer<'de>>(
        d: D,
        expected: &str,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Names {
            One(String),
            Many(Vec<String>),
        }
        let names = Names::deserialize(d).map_err(|_| serde::de::Error::custom(expected))?;
        let parse = |name: &str| parse(name).map_err(serde::de::Error::custom);
        match names {
            Names::One(name) => Ok(OneOrMany::One(parse(&name)?)),
            Names::Many(names) => Ok(OneOrMany::Many(
                names
                    .iter()
                    .map(|n| parse(n))
                    .collect::<std::result::Result<_, _>>()?,
            )),
        }
    }
}

/// `report_to = "tensorboard"` or a list of [`Integration`]s.
pub type ReportTo = OneOrMany<Integration>;

impl ReportTo {
    /// Whether TensorBoard event files are written.
    pub fn tensorboard(&self) -> bool {
        self.to_vec()
            .iter()
            .any(|i| matches!(i, Integration::All | Integration::Tensorboard))
    }
}

impl<'de> Deserialize<'de> for ReportTo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let expected = format!(
            "expected one of {} or a list of them",
            Integration::NAMES.join(", ")
        );
        Self::deserialize_names(d, &expected, |name| {
            name.parse::<Integration>().map_err(|e| {
                format!(
                    "{e} (dpo-sam writes TensorBoard event files; W&B, MLflow and others read \
                     them: see docs/tracking.md)"
                )
            })
        })
    }
}

/// `[generate]`: how evaluation samples (`training.eval_generate`) are decoded; the same
/// settings as `dpo-sam generate`'s flags of these names. Greedy by default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// New tokens per prompt at most (fewer where the model's context ends first).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 is greedy; otherwise logits are divided by it before `top_k` and `top_p`.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Seed of the sampling streams (one per prompt; the same at every evaluation).
    #[serde(default)]
    pub seed: u64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl GenerateConfig {
    /// The first setting that cannot decode, as (its name, what is wrong).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Some((
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Some(("top_k", "must be at least 1".into()));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Some(("top_p", format!("must be in (0, 1], got {p}")));
        }
        if self.max_new_tokens == 0 {
            return Some(("max_new_tokens", "must be at least 1".into()));
        }
        None
    }
}

fn default_max_new_tokens() -> usize {
    64
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where metrics, checkpoints and the final model go.
    pub output_dir: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub training: TrainingConfig,
    #[serde(default)]
    pub sam: SamConfig,
    /// LoRA adapters instead of full fine-tuning (PEFT's `LoraConfig`); on when this table or
    /// `model.adapter` is present.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Decoding of the evaluation samples (`training.eval_generate`).
    #[serde(default)]
    pub generate: GenerateConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `builtin:tiny-gpt2`, a local Hugging Face model directory, or a Hub repo id.
    pub name_or_path: String,
    /// The frozen reference model; defaults to `name_or_path` (TRL's behaviour when `ref_model` is None).
    #[serde(default)]
    pub ref_name_or_path: Option<String>,
    /// Training dtype: `f32`, `bf16` or `f16` (`f64` for gradient checks).
    #[serde(default = "default_dtype")]
    pub dtype: Dtype,
    /// Shape of the built-in GPT-2 (used only with `builtin:tiny-gpt2`).
    #[serde(default)]
    pub builtin: BuiltinModel,
    /// A PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`) to
    /// start from: LoRA training continues it, and the reference is the base with it, frozen.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

/// `[lora]`: PEFT's `LoraConfig` under shorter names (`lora_alpha` and `lora_dropout` are
/// accepted too). Unset keys take PEFT's defaults, or, with `model.adapter`, the adapter's.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// The adapters' rank (PEFT's default 8).
    #[serde(default)]
    pub r: Option<usize>,
    /// The update is scaled by alpha / r (alpha / √r with `use_rslora`); PEFT's default 8.
    #[serde(default, alias = "lora_alpha")]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input while training (PEFT's default 0).
    #[serde(default, alias = "lora_dropout")]
    pub dropout: Option<f64>,
    /// PEFT's `target_modules`: a list of module names, each matching a dense layer whose path
    /// is the name or ends with `.name`; `"all-linear"` (every dense layer but the output
    /// layer); or another string, a regular expression the whole path must match. Unset: PEFT's
    /// default for the architecture.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Rank-stabilised scaling alpha / √r.
    #[serde(default)]
    pub use_rslora: Option<bool>,
}

/// `lora.target_modules`: one string or a list (saved back in the same form).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BuiltinModel {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_positions: usize,
}

impl Default for BuiltinModel {
    fn default() -> Self {
        Self {
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            n_positions: 128,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data: `builtin:arith`, or one or more local files.
    pub train: Sources,
    /// Held-out pairs evaluated every `eval_steps`; `builtin:arith` takes a disjoint split.
    #[serde(default)]
    pub eval: Option<Sources>,
    /// Pairs generated for built-in data (train; eval gets a quarter of this).
    #[serde(default = "default_builtin_pairs")]
    pub builtin_pairs: usize,
    /// Maximum tokens of prompt + response (TRL `max_length`).
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Maximum prompt tokens; longer prompts are cut first (TRL `max_prompt_length`).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// `keep_end` cuts prompts from the left (default), `keep_start` from the right.
    #[serde(default = "default_truncation_mode")]
    pub truncation_mode: TruncationMode,
    /// Record format: `auto` (detected per record), `hh`, `explicit`, `implicit`,
    /// `conversational` or `tldr` (see `dpo-sam data inspect --help`).
    #[serde(default = "default_format")]
    pub format: DataFormat,
    /// Without `eval`, hold out this fraction of the training rows (by a seeded hash of each
    /// row's file and line) as the eval split; 0 holds out nothing.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Before training, drop this fraction of the training pairs: those with the highest
    /// length-normalised CHES under the starting policy (Razin et al. 2024, `data::ches`), the
    /// pairs most likely to push the chosen response's probability down; 0 keeps every pair.
    #[serde(default)]
    pub filter_ches_quantile: f64,
    /// Records in the streaming shuffle buffer (`data.streaming`; 0 keeps file order).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Read `train` lazily, re-opening it each epoch with the shuffle buffer, instead of
    /// tokenising it all into memory first (HF datasets' `streaming`); needs
    /// `training.max_steps`, since a stream's length is unknown until it has been read.
    #[serde(default)]
    pub streaming: bool,
    /// Stop at the first bad row (with its file and line) instead of skipping and counting it.
    #[serde(default)]
    pub strict: bool,
    /// Group pairs of similar length into micro-batches within windows of this many pairs,
    /// to cut padding; 0 (or at most the micro-batch size) disables.
    #[serde(default)]
    pub group_by_length: usize,
    /// Split read from Hub dataset sources (`hub:ORG/NAME`) in `train`, e.g. `train_prefs`;
    /// a `:SPLIT` suffix on the source overrides it.
    #[serde(default = "default_split")]
    pub split: String,
    /// Split read from Hub dataset sources in `eval`, e.g. `test_prefs`.
    #[serde(default = "default_eval_split")]
    pub eval_split: String,
    /// Chat template for conversational records: a Jinja file or a tokenizer_config.json
    /// (default: the model's tokenizer_config.json).
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
}

/// One source or a list: a file (`.jsonl`, `.jsonl.gz`, `.json`, `.parquet`), a glob, or a Hub
/// dataset `hub:ORG/NAME[@REV][:SPLIT]` (plain `ORG/NAME` too when no such path exists).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Sources {
    One(String),
    Many(Vec<String>),
}

impl Sources {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            Sources::One(s) => vec![s.as_str()],
            Sources::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// One loss name or a list (combined with `loss_weights`): sigmoid, robust, ipo, hinge,
    /// dpop, slic, cpo, simpo, sft (see `src/losses.rs`).
    #[serde(default = "default_loss_type")]
    pub loss_type: LossTypes,
    /// Weights of the `loss_type` list (default: all 1), as TRL's `loss_weights`.
    #[serde(default)]
    pub loss_weights: Option<Vec<f64>>,
    /// Adds `rpo_alpha` × the chosen responses' NLL (TRL's RPO term).
    #[serde(default)]
    pub rpo_alpha: Option<f64>,
    /// Conservative DPO's ε (TRL `label_smoothing`), also used by `robust`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target margin γ (TRL `simpo_gamma`).
    #[serde(default = "default_simpo_gamma")]
    pub simpo_gamma: f64,
    /// CPO's λ on the chosen NLL (TRL `cpo_alpha`).
    #[serde(default = "default_one_f")]
    pub cpo_alpha: f64,
    /// SLiC-HF's margin δ (paper Table 5).
    #[serde(default = "default_one_f")]
    pub slic_delta: f64,
    /// SLiC-HF's λ on the chosen NLL (paper Table 5).
    #[serde(default = "default_one_f")]
    pub slic_lambda: f64,
    /// DPO-Positive's λ (Pal et al. 2024).
    #[serde(default = "default_dpop_lambda")]
    pub dpop_lambda: f64,
    /// How the NLL of `cpo`, `slic`, `sft` and `rpo_alpha` is reduced: `token_mean` (TRL's: over
    /// every chosen-response token of a micro-batch) or `sequence_sum` (the paper's Table 5:
    /// summed per response, averaged over pairs).
    #[serde(default = "default_nll_reduction")]
    pub nll_reduction: NllReduction,
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Compute the reference log-probs once over train + eval before training, cache them in
    /// `output_dir/ref_logps-<fingerprint>.safetensors` and free the reference model (TRL's
    /// `precompute_ref_log_probs`).
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
    pub learning_rate: f64,
    /// Pairs per optimizer step (global batch).
    pub batch_size: usize,
    /// Pairs per forward/backward; `batch_size / micro_batch_size` micro-batches are accumulated.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Drop each epoch's last micro-batch when it has fewer than `micro_batch_size` pairs (HF's
    /// `dataloader_drop_last`); by default it is kept, smaller, as HF's DataLoader does.
    #[serde(default)]
    pub dataloader_drop_last: bool,
    /// Stop after this many optimizer steps (takes precedence over `num_train_epochs`).
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "default_epochs")]
    pub num_train_epochs: f64,
    /// `adamw` or `sgd`.
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerType,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// `constant` (no warmup), `constant_with_warmup`, `linear` or `cosine` (HF's names).
    #[serde(default = "default_scheduler")]
    pub lr_scheduler_type: SchedulerType,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "default_one")]
    pub logging_steps: usize,
    /// Evaluate on `data.eval` every this many steps (0 = only at the end).
    #[serde(default)]
    pub eval_steps: usize,
    /// `no` or `bf16` (accelerate's name): bf16 weights and matmuls, with f32 master weights,
    /// optimiser state, log-softmax and loss. Needs `model.dtype = "f32"` (the masters' dtype).
    #[serde(default = "default_mixed_precision")]
    pub mixed_precision: MixedPrecision,
    /// With `model.dtype = "bf16"` (pure bf16, no f32 masters): round every update written into
    /// the bf16 weights and the (then bf16) AdamW moments stochastically, so that updates below
    /// half a bf16 step still move the weights in expectation instead of rounding away.
    #[serde(default)]
    pub bf16_stochastic_rounding: bool,
    /// TF32 tensor cores for f32 matmuls on Ampere and newer GPUs (HF's `tf32`): several times
    /// the f32 matmul throughput, with products rounded to a 10-bit mantissa. bf16 and f16
    /// matmuls are unaffected. Off by default, as in transformers and PyTorch.
    #[serde(default)]
    pub tf32: bool,
    /// Activation checkpointing per transformer block (TRL's name): keep only each block's
    /// input and recompute the block in the backward, trading about one more forward of
    /// compute for most of the activation memory. Gradients are the same as without.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Save a resumable checkpoint (`output_dir/checkpoint-<step>/`) every this many steps, and
    /// always at the end; 0 saves only at the end (TRL's `save_steps`).
    #[serde(default)]
    pub save_steps: usize,
    /// Keep only the newest this many checkpoints (TRL's `save_total_limit`); unset keeps all.
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    /// A non-finite loss or gradient norm skips that step's update and counts it
    /// (`nonfinite_skipped` in metrics) instead of stopping the run with an error.
    #[serde(default)]
    pub skip_nonfinite: bool,
    /// dtype of saved model weights (checkpoints and the final model): `auto` (the training
    /// weights' dtype; f32 masters under mixed precision), `f32`, `bf16` or `f16`.
    #[serde(default = "default_save_dtype")]
    pub save_dtype: SaveDtype,
    /// Largest safetensors shard (`save_pretrained`'s `max_shard_size`): bytes, or a size such
    /// as `"5GB"` (10⁹) or `"4GiB"` (2³⁰). Bigger models are split into
    /// `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    #[serde(default = "default_max_shard_size")]
    pub max_shard_size: ByteSize,
    /// Where metrics go besides `metrics.jsonl` (always written): `"tensorboard"` or `"all"`
    /// (event files under `output_dir/runs/`, the default), `"none"` or `"jsonl"`
    /// (metrics.jsonl only); a name or a list (TRL's `report_to`).
    #[serde(default = "default_report_to")]
    pub report_to: ReportTo,
    /// At every evaluation, generate completions for the first this many eval prompts with
    /// the `[generate]` settings and append them to `output_dir/samples.jsonl` (and
    /// TensorBoard); 0 generates none.
    #[serde(default)]
    pub eval_generate: usize,
    /// Upload the final model directory to the Hub at the end of the run (TRL's name), as
    /// `dpo-sam push` does; needs `HF_TOKEN` (checked before training starts).
    #[serde(default)]
    pub push_to_hub: bool,
    /// The Hub repository: `ORG/NAME`, or `NAME` under the token's user; default: the name of
    /// `output_dir` (TRL's `hub_model_id`).
    #[serde(default)]
    pub hub_model_id: Option<String>,
    /// Create the repository as private (TRL's `hub_private_repo`).
    #[serde(default)]
    pub hub_private_repo: bool,
    /// The branch to push to, created if missing (default `main`; TRL's `hub_revision`).
    #[serde(default)]
    pub hub_revision: Option<String>,
    /// Seconds a rank of a data-parallel run waits for the others (the rendezvous, each
    /// exchange) before failing (HF TrainingArguments' `ddp_timeout`).
    #[serde(default = "default_ddp_timeout")]
    pub ddp_timeout: u64,
    /// Gradients are summed over ranks in buckets of about this many MiB (HF's
    /// `ddp_bucket_cap_mb`).
    #[serde(default = "default_ddp_bucket_cap_mb")]
    pub ddp_bucket_cap_mb: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamConfig {
    /// `none`, `logits` (the paper's logits-SAM: output layer only, one backward) or `full`
    /// (SAM over every trainable parameter: two forward/backward passes per micro-batch).
    #[serde(default = "default_sam_kind")]
    pub kind: SamKind,
    /// Perturbation radius ρ (paper's Table 6: 1e-4 for Pythia-2.8B, 1e-5 for Mistral-7B).
    #[serde(default)]
    pub rho: f64,
    /// Adaptive SAM (ASAM, Kwon et al. 2021): e = ρ |W|² ⊙ g / ‖|W| ⊙ g‖, for either kind.
    #[serde(default)]
    pub adaptive: bool,
}

impl Default for SamConfig {
    fn default() -> Self {
        Self {
            kind: default_sam_kind(),
            rho: 0.0,
            adaptive: false,
        }
    }
}

fn default_report_to() -> ReportTo {
    OneOrMany::One(Integration::All)
}
fn default_save_dtype() -> SaveDtype {
    SaveDtype::Auto
}
fn default_max_shard_size() -> ByteSize {
    ByteSize {
        bytes: 5_000_000_000,
        text: "5GB".into(),
    }
}
fn default_ddp_timeout() -> u64 {
    1800
}
fn default_ddp_bucket_cap_mb() -> usize {
    25
}
fn default_seed() -> u64 {
    42
}
fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> Dtype {
    Dtype::F32
}
fn default_builtin_pairs() -> usize {
    1024
}
fn default_max_length() -> usize {
    512
}
fn default_truncation_mode() -> TruncationMode {
    TruncationMode::KeepEnd
}
fn default_format() -> DataFormat {
    DataFormat::Auto
}
fn default_shuffle_buffer() -> usize {
    10_000
}
fn default_split() -> String {
    "train".into()
}
fn default_eval_split() -> String {
    "test".into()
}
fn default_loss_type() -> LossTypes {
    OneOrMany::One(LossType::Sigmoid)
}
fn default_simpo_gamma() -> f64 {
    0.5
}
fn default_one_f() -> f64 {
    1.0
}
fn default_dpop_lambda() -> f64 {
    50.0
}
fn default_nll_reduction() -> NllReduction {
    NllReduction::TokenMean
}

impl LossType {
    /// A `loss_type` name, or an error listing the losses.
    pub fn from_name(name: &str) -> Result<LossType> {
        name.parse().map_err(|_| {
            anyhow!(
                "unknown loss `{name}`; expected one of {}",
                Self::NAMES.join(", ")
            )
        })
    }
}

/// `loss_type = "sigmoid"` or `loss_type = ["sigmoid", "sft"]`.
pub type LossTypes = OneOrMany<LossType>;

impl<'de> Deserialize<'de> for LossTypes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Self::deserialize_names(d, "expected a loss name or a list of loss names", |name| {
            LossType::from_name(name).map_err(|e| e.to_string())
        })
    }
}
fn default_beta() -> f64 {
    0.1
}
fn default_epochs() -> f64 {
    1.0
}
fn default_optimizer() -> OptimizerType {
    OptimizerType::Adamw
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_mixed_precision() -> MixedPrecision {
    MixedPrecision::No
}
fn default_scheduler() -> SchedulerType {
    SchedulerType::Linear
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_one() -> usize {
    1
}
fn default_sam_kind() -> SamKind {
    SamKind::None
}

impl Config {
    /// Reads a TOML file, applies `key=value` overrides (values in TOML syntax; bare words are
    /// strings), deserialises and validates. Nothing else happens before this succeeds.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// As [`Config::load`], from text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| anyhow!("{origin}: {}", e.to_string().trim_end()))?;
        for ov in overrides {
            apply_override(&mut value, ov).with_context(|| format!("--set {ov}"))?;
        }
        let cfg: Config =
            Config::deserialize(value).map_err(|e| anyhow!("{origin}: {}", keyed(&e)))?;
        cfg.validate().map_err(|e| anyhow!("{origin}: {e}"))?;
        Ok(cfg)
    }

    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<()> {
        let t = &self.training;
        let d = &self.data;
        check(
            t.beta > 0.0 && t.beta.is_finite(),
            "training.beta",
            "must be > 0",
            t.beta,
        )?;
        check(
            t.learning_rate >= 0.0,
            "training.learning_rate",
            "must be >= 0",
            t.learning_rate,
        )?;
        check(
            t.batch_size > 0,
            "training.batch_size",
            "must be > 0",
            t.batch_size,
        )?;
        if let Some(m) = t.micro_batch_size {
            check(m > 0, "training.micro_batch_size", "must be > 0", m)?;
            if !t.batch_size.is_multiple_of(m) {
                bail!(
                    "training.micro_batch_size: batch_size {} is not divisible by micro_batch_size {m}",
                    t.batch_size
                );
            }
        }
        if let Some(s) = t.max_steps {
            check(s > 0, "training.max_steps", "must be > 0", s)?;
        }
        check(
            t.num_train_epochs > 0.0,
            "training.num_train_epochs",
            "must be > 0",
            t.num_train_epochs,
        )?;
        let kinds = t.loss_type.to_vec();
        match &t.loss_weights {
            Some(w) if w.len() != kinds.len() => bail!(
                "training.loss_weights: {} weights for {} loss types",
                w.len(),
                kinds.len()
            ),
            _ => {}
        }
        if let Some(w) = t.loss_weights.iter().flatten().find(|w| !w.is_finite()) {
            bail!("training.loss_weights: must be finite, got {w}");
        }
        if let Some(a) = t.rpo_alpha {
            check(
                a >= 0.0 && a.is_finite(),
                "training.rpo_alpha",
                "must be >= 0",
                a,
            )?;
        }
        check(
            (0.0..0.5).contains(&t.label_smoothing),
            "training.label_smoothing",
            "must be in [0, 0.5)",
            t.label_smoothing,
        )?;
        check(
            t.simpo_gamma.is_finite(),
            "training.simpo_gamma",
            "must be finite",
            t.simpo_gamma,
        )?;
        check(
            t.cpo_alpha >= 0.0 && t.cpo_alpha.is_finite(),
            "training.cpo_alpha",
            "must be >= 0",
            t.cpo_alpha,
        )?;
        check(
            t.slic_delta >= 0.0 && t.slic_delta.is_finite(),
            "training.slic_delta",
            "must be >= 0",
            t.slic_delta,
        )?;
        check(
            t.slic_lambda >= 0.0 && t.slic_lambda.is_finite(),
            "training.slic_lambda",
            "must be >= 0",
            t.slic_lambda,
        )?;
        check(
            t.dpop_lambda >= 0.0 && t.dpop_lambda.is_finite(),
            "training.dpop_lambda",
            "must be >= 0",
            t.dpop_lambda,
        )?;
        if t.mixed_precision == MixedPrecision::Bf16
            && self.model.dtype != Dtype::F32
            && !self.lora_enabled()
        {
            bail!(
                "training.mixed_precision = \"bf16\" keeps f32 master weights, so model.dtype must be \"f32\" (got \"{}\")",
                self.model.dtype
            );
        }
        if t.bf16_stochastic_rounding {
            if self.model.dtype != Dtype::Bf16 || t.mixed_precision != MixedPrecision::No {
                bail!("training.bf16_stochastic_rounding: rounds updates into bf16 weights, so it needs model.dtype = \"bf16\" and training.mixed_precision = \"no\" (got model.dtype = \"{}\", mixed_precision = \"{}\")", self.model.dtype, t.mixed_precision);
            }
            if self.lora_enabled() {
                bail!("training.bf16_stochastic_rounding: with LoRA only the adapters are updated, and they are kept in f32 already; remove one of them");
            }
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        check(
            t.weight_decay >= 0.0,
            "training.weight_decay",
            "must be >= 0",
            t.weight_decay,
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta1),
            "training.adam_beta1",
            "must be in [0, 1)",
            t.adam_beta1,
        )?;
        check(
            (0.0..1.0).contains(&t.adam_beta2),
            "training.adam_beta2",
            "must be in [0, 1)",
            t.adam_beta2,
        )?;
        check(
            t.adam_epsilon > 0.0,
            "training.adam_epsilon",
            "must be > 0",
            t.adam_epsilon,
        )?;
        check(
            (0.0..1.0).contains(&t.warmup_ratio),
            "training.warmup_ratio",
            "must be in [0, 1)",
            t.warmup_ratio,
        )?;
        check(
            t.max_grad_norm >= 0.0,
            "training.max_grad_norm",
            "must be >= 0 (0 disables)",
            t.max_grad_norm,
        )?;
        check(
            t.logging_steps > 0,
            "training.logging_steps",
            "must be > 0",
            t.logging_steps,
        )?;
        if let Some(n) = t.save_total_limit {
            check(
                n > 0,
                "training.save_total_limit",
                "must be > 0 (leave it unset to keep every checkpoint)",
                n,
            )?;
        }
        check(
            d.max_length >= 2,
            "data.max_length",
            "must be >= 2",
            d.max_length,
        )?;
        if let Some(p) = d.max_prompt_length {
            check(
                p >= 1 && p < d.max_length,
                "data.max_prompt_length",
                "must be in [1, max_length)",
                p,
            )?;
        }
        check(
            d.builtin_pairs >= 8,
            "data.builtin_pairs",
            "must be >= 8",
            d.builtin_pairs,
        )?;
        if d.train.paths().is_empty() {
            bail!("data.train: expected at least one source");
        }
        check(
            (0.0..1.0).contains(&d.eval_fraction),
            "data.eval_fraction",
            "must be in [0, 1)",
            d.eval_fraction,
        )?;
        if d.streaming && t.max_steps.is_none() {
            bail!("data.streaming = true needs training.max_steps: a stream's length is unknown until it has been read, so training.num_train_epochs cannot fix the run length (as with HF Trainer on an IterableDataset)");
        }
        if d.streaming && t.precompute_ref_log_probs {
            bail!("data.streaming = true cannot be combined with training.precompute_ref_log_probs = true: the cache holds reference log-probs for every training pair, which streaming never keeps in memory; set one of them to false");
        }
        check(
            (0.0..1.0).contains(&d.filter_ches_quantile),
            "data.filter_ches_quantile",
            "must be in [0, 1) (the fraction of training pairs dropped)",
            d.filter_ches_quantile,
        )?;
        if d.streaming && d.filter_ches_quantile > 0.0 {
            bail!("data.streaming = true cannot be combined with data.filter_ches_quantile > 0: ranking pairs by CHES needs every training pair in memory; set one of them off");
        }
        if d.eval_fraction > 0.0 && d.eval.is_some() {
            bail!("data.eval_fraction: holds out part of data.train, so it cannot be combined with data.eval");
        }
        check(
            !d.split.is_empty(),
            "data.split",
            "must not be empty",
            "\"\"",
        )?;
        check(
            !d.eval_split.is_empty(),
            "data.eval_split",
            "must not be empty",
            "\"\"",
        )?;
        let b = &self.model.builtin;
        check(
            b.n_layer > 0,
            "model.builtin.n_layer",
            "must be > 0",
            b.n_layer,
        )?;
        check(
            b.n_head > 0,
            "model.builtin.n_head",
            "must be > 0",
            b.n_head,
        )?;
        if b.n_embd == 0 || !b.n_embd.is_multiple_of(b.n_head) {
            bail!(
                "model.builtin.n_embd: must be a positive multiple of n_head ({}), got {}",
                b.n_head,
                b.n_embd
            );
        }
        check(
            b.n_positions >= 2,
            "model.builtin.n_positions",
            "must be >= 2",
            b.n_positions,
        )?;
        check(
            self.sam.rho >= 0.0 && self.sam.rho.is_finite(),
            "sam.rho",
            "must be >= 0",
            self.sam.rho,
        )?;
        let integrations = t.report_to.to_vec();
        if integrations.len() > 1 && integrations.contains(&Integration::None) {
            bail!("training.report_to: \"none\" cannot be combined with other integrations");
        }
        if let Some((field, what)) = self.generate.problem() {
            bail!("generate.{field}: {what}");
        }
        if let Some(id) = &t.hub_model_id {
            crate::hub::check_repo_name(id, true)
                .map_err(|e| anyhow!("training.hub_model_id: {e}"))?;
        }
        if let Some(branch) = &t.hub_revision {
            crate::hub::check_branch(branch).map_err(|e| anyhow!("training.hub_revision: {e}"))?;
        }
        check(
            t.ddp_timeout > 0,
            "training.ddp_timeout",
            "must be > 0 (seconds)",
            t.ddp_timeout,
        )?;
        check(
            t.ddp_bucket_cap_mb > 0,
            "training.ddp_bucket_cap_mb",
            "must be > 0",
            t.ddp_bucket_cap_mb,
        )?;
        let ordinal =
            crate::device::parse_name(&self.device).map_err(|e| anyhow!("device: {e}"))?;
        if t.tf32 && ordinal.is_none() {
            bail!(
                "training.tf32 = true needs a CUDA device (Ampere or newer), but device is \"{}\"",
                self.device
            );
        }
        Ok(())
    }

    /// The keys whose values differ from `other`'s, in key order, each with its line
    /// `key: self's -> other's` (dotted keys; `(unset)` for an absent optional key).
    pub fn differences(&self, other: &Config) -> Result<Vec<(String, String)>> {
        let (a, b) = (self.flatten()?, other.flatten()?);
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
        Ok(keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                (
                    k.clone(),
                    format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k))),
                )
            })
            .collect())
    }

    /// Every set value under its dotted key.
    fn flatten(&self) -> Result<std::collections::BTreeMap<String, toml::Value>> {
        let value = toml::Value::try_from(self).context("cannot serialise the config")?;
        Ok(flatten(value))
    }

    /// Refuses a global batch that does not split evenly over `world_size` ranks' micro-batches
    /// (data parallelism: every rank runs the same number per step).
    pub fn check_world_size(&self, world_size: usize) -> Result<()> {
        let (batch, micro) = (self.training.batch_size, self.micro_batch_size());
        if !batch.is_multiple_of(world_size * micro) {
            bail!(
                "training.batch_size = {batch} (pairs per optimiser step, over all ranks) must be divisible by \
                 ranks × training.micro_batch_size = {world_size} × {micro} = {}, so that every rank runs the same \
                 number of micro-batches per step",
                world_size * micro
            );
        }
        Ok(())
    }

    /// Pairs per forward/backward pass.
    pub fn micro_batch_size(&self) -> usize {
        self.training
            .micro_batch_size
            .unwrap_or(self.training.batch_size)
    }

    /// Micro-batches in an epoch of `pairs` training pairs, as HF's `len(dataloader)`: the last
    /// one smaller, or dropped with `training.dataloader_drop_last`.
    pub fn micro_batches_per_epoch(&self, pairs: usize) -> usize {
        let micro = self.micro_batch_size();
        match self.training.dataloader_drop_last {
            true => pairs / micro,
            false => pairs.div_ceil(micro),
        }
    }

    /// Optimiser steps in an epoch of `pairs` training pairs, as HF's Trainer counts them:
    /// its micro-batches in groups of `batch_size / micro_batch_size`, the last group smaller.
    pub fn steps_per_epoch(&self, pairs: usize) -> usize {
        let accumulation = self.training.batch_size / self.micro_batch_size();
        self.micro_batches_per_epoch(pairs)
            .div_ceil(accumulation)
            .max(1)
    }

    /// The run's optimiser steps: `max_steps`, else ⌈num_train_epochs × steps per epoch⌉.
    pub fn total_steps(&self, pairs: usize) -> usize {
        let t = &self.training;
        t.max_steps.unwrap_or_else(|| {
            (t.num_train_epochs * self.steps_per_epoch(pairs) as f64).ceil() as usize
        })
    }

    /// The configured losses and their weights: `loss_type` × `loss_weights` (default all 1),
    /// plus `rpo_alpha` × sft when set, as in TRL.
    pub fn loss_terms(&self) -> Vec<(LossType, f64)> {
        let t = &self.training;
        let kinds = t.loss_type.to_vec();
        let weights = t.loss_weights.clone().unwrap_or(vec![1.0; kinds.len()]);
        let mut terms: Vec<(LossType, f64)> = kinds.into_iter().zip(weights).collect();
        terms.extend(t.rpo_alpha.map(|alpha| (LossType::Sft, alpha)));
        terms
    }

    /// The dtype the policy computes in: bf16 under mixed precision, else the weights'.
    pub fn compute_dtype(&self) -> candle_core::DType {
        match self.training.mixed_precision {
            MixedPrecision::Bf16 => candle_core::DType::BF16,
            MixedPrecision::No => self.model.dtype.dtype(),
        }
    }

    /// Whether LoRA adapters are trained (a `[lora]` table or `model.adapter`).
    pub fn lora_enabled(&self) -> bool {
        self.lora.is_some() || self.model.adapter.is_some()
    }

    /// The reference model's source (the policy's when not set).
    pub fn ref_name_or_path(&self) -> &str {
        self.model
            .ref_name_or_path
            .as_deref()
            .unwrap_or(&self.model.name_or_path)
    }
}

impl LoraConfig {
    fn validate(&self) -> Result<()> {
        if let Some(r) = self.r {
            check(r > 0, "lora.r", "must be > 0", r)?;
        }
        if let Some(a) = self.alpha {
            check(a > 0.0 && a.is_finite(), "lora.alpha", "must be > 0", a)?;
        }
        if let Some(p) = self.dropout {
            check(
                (0.0..1.0).contains(&p),
                "lora.dropout",
                "must be in [0, 1)",
                p,
            )?;
        }
        match &self.target_modules {
            Some(TargetModules::Many(names)) if names.is_empty() => {
                bail!("lora.target_modules: expected at least one module name, or \"all-linear\"")
            }
            Some(TargetModules::Many(names)) => {
                if let Some(bad) = names.iter().find(|n| n.trim().is_empty()) {
                    bail!("lora.target_modules: module names must not be empty, got {bad:?}");
                }
            }
            Some(TargetModules::One(pattern)) if !pattern.eq_ignore_ascii_case(ALL_LINEAR) => {
                regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                    anyhow!("lora.target_modules: `{pattern}` is neither \"all-linear\" nor a valid regular expression: {e}")
                })?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// PEFT's shorthand for every dense layer but the output layer (matched case-insensitively).
pub const ALL_LINEAR: &str = "all-linear";

/// A config (or any TOML value) as dotted keys → leaf values (`training.beta` → 0.1); arrays
/// are leaves.
pub fn flatten(value: toml::Value) -> std::collections::BTreeMap<String, toml::Value> {
    fn walk(
        prefix: &str,
        v: toml::Value,
        out: &mut std::collections::BTreeMap<String, toml::Value>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = match prefix.is_empty() {
                        true => k,
                        false => format!("{prefix}.{k}"),
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", value, &mut out);
    out
}

fn check<T: std::fmt::Display>(ok: bool, key: &str, what: &str, got: T) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("{key}: {what}, got {got}")
    }
}

/// A deserialisation error as the user has always seen it: this module's own parsers (closed
/// choices, loss lists, sizes) read `key: message`, like [`Config::validate`]'s errors; serde's
/// (unknown keys, wrong types) keep toml's layout, the message then "in `key`".
fn keyed(e: &toml::de::Error) -> String {
    const OURS: &[&str] = &[
        "expected one of ",
        "unknown loss ",
        "expected a loss name",
        "expected bytes ",
        "expected a positive size ",
    ];
    let text = e.to_string();
    let text = text.trim_end();
    match text.rsplit_once("\nin `") {
        Some((msg, key)) if key.ends_with('`') && OURS.iter().any(|o| msg.starts_with(o)) => {
            format!("{}: {}", &key[..key.len() - 1], msg.trim_end())
        }
        _ => text.to_string(),
    }
}

/// A byte size as `transformers` writes `max_shard_size`: parsed when the config is read, and
/// saved back as it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct ByteSize {
    pub bytes: u64,
    text: String,
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = parse_size(&text).map_err(serde::de::Error::custom)?;
        Ok(ByteSize { bytes, text })
    }
}

/// Plain bytes, or a number with `KB`/`MB`/`GB` (powers of 10) or `KiB`/`MiB`/`GiB` (powers
/// of 2).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("expected bytes or a size like \"5GB\" or \"500MiB\", got `{text}`"),
    };
    match num.parse::<f64>() {
        Ok(n) if n * scale >= 1.0 => Ok((n * scale) as u64),
        _ => bail!("expected a positive size like \"5GB\" or \"500MiB\", got `{text}`"),
    }
}

/// `a.b.c=value`: sets a nested key, creating tables as needed.
fn apply_override(root: &mut toml::Table, ov: &str) -> Result<()> {
    let (key, raw) = ov
        .split_once('=')
        .ok_or_else(|| anyhow!("expected KEY=VALUE"))?;
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, tables) = parts.split_last().ok_or_else(|| anyhow!("empty key"))?;
    let mut table = root;
    for part in tables {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("`{part}` is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").expect("key v was just written"),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
output_dir = "runs/x"
[model]
name_or_path = "builtin:tiny-gpt2"
[data]
train = "builtin:arith"
[training]
learning_rate = 1e-3
batch_size = 8
"#;

    fn err(text: &str, overrides: &[&str]) -> String {
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Config::parse(text, "cfg.toml", &ov).unwrap_err())
    }

    #[test]
    fn minimal_config_gets_trl_defaults() {
        let cfg = Config::parse(MINIMAL, "cfg.toml", &[]).unwrap();
        assert_eq!(cfg.training.beta, 0.1);
        assert_eq!(cfg.training.loss_type.to_vec(), vec![LossType::Sigmoid]);
        assert_eq!(cfg.sam.kind, SamKind::None);
        assert_eq!(cfg.micro_batch_size(), 8);
        assert_eq!(cfg.ref_name_or_path(), "builtin:tiny-gpt2");
        assert_eq!(
            (
                cfg.data.format.as_str(),
                cfg.data.eval_fraction,
                cfg.data.strict
            ),
            ("auto", 0.0, false)
        );
        assert_eq!(
            (cfg.data.split.as_str(), cfg.data.group_by_length),
            ("train", 0)
        );
        assert_eq!(
            (
                cfg.training.save_steps,
                cfg.training.save_total_limit,
                cfg.training.skip_nonfinite
            ),
            (0, None, false)
        );
    }

    #[test]
    fn sizes_parse_like_transformers_max_shard_size() {
        for (text, want) in [
            ("5GB", 5_000_000_000),
            ("4GiB", 4 << 30),
            ("500MB", 500_000_000),
            ("10KiB", 10 << 10),
            ("1.5KB", 1500),
            ("12345", 12345),
        ] {
            assert_eq!(parse_size(text).unwrap(), want, "{text}");
        }
        for bad in ["", "GB", "0", "5 parsecs", "-1GB"] {
            assert!(parse_size(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn overrides_apply_with_toml_types() {
        let ov = vec![
            "training.beta=0.5".to_string(),
            "sam.kind=logits".to_string(),
        ];
        let cfg = Config::parse(MINIMAL, "cfg.toml", &ov).unwrap();
        assert_eq!(cfg.training.beta, 0.5);
        assert_eq!(cfg.sam.kind, SamKind::Logits);
    }

    #[test]
    fn loss_lists_and_sam_options_parse() {
        let ov: Vec<String> = [
            "training.loss_type=[\"sigmoid\", \"sft\"]",
            "training.loss_weights=[1.0, 0.5]",
            "training.precompute_ref_log_probs=true",
            "sam.kind=full",
            "sam.adaptive=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = Config::parse(MINIMAL, "cfg.toml", &ov).unwrap();
        assert_eq!(
            cfg.training.loss_type.to_vec(),
            vec![LossType::Sigmoid, LossType::Sft]
        );
        assert_eq!(cfg.training.loss_weights, Some(vec![1.0, 0.5]));
        assert!(cfg.training.precompute_ref_log_probs && cfg.sam.adaptive);
        assert_eq!(cfg.sam.kind, SamKind::Full);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = err(MINIMAL, &["training.betta=0.5"]);
        assert!(e.contains("cfg.toml") && e.contains("betta"), "{e}");
        let e = err(MINIMAL, &["training.beta=-1"]);
        assert!(e.contains("cfg.toml: training.beta: must be > 0"), "{e}");
        let e = err(MINIMAL, &["training.micro_batch_size=3"]);
        assert!(
            e.contains("training.micro_batch_size") && e.contains("not divisible"),
            "{e}"
        );
        let e = err(MINIMAL, &["training.batch_size=\"eight\""]);
        assert!(e.contains("cfg.toml") && e.contains("batch_size"), "{e}");
        let e = err(&MINIMAL.replace("learning_rate = 1e-3\n", ""), &[]);
        assert!(e.contains("learning_rate"), "{e}");
        let e = err(MINIMAL, &["sam.kind=full-ish"]);
        assert!(e.contains("sam.kind: expected one of"), "{e}");
        let e = err(MINIMAL, &["training.loss_type=[\"sigmoid\", \"dpo2\"]"]);
        assert!(e.contains("training.loss_type: unknown loss `dpo2`"), "{e}");
        let e = err(
            MINIMAL,
            &[
                "training.loss_type=[\"sigmoid\", \"sft\"]",
                "training.loss_weights=[1.0]",
            ],
        );
        assert!(
            e.contains("training.loss_weights: 1 weights for 2 loss types"),
            "{e}"
        );
        let e = err(MINIMAL, &["training.label_smoothing=0.5"]);
        assert!(
            e.contains("training.label_smoothing: must be in [0, 0.5)"),
            "{e}"
        );
        let e = err(MINIMAL, &["training.slic_delta=-1"]);
        assert!(e.contains("training.slic_delta: must be >= 0"), "{e}");
        let e = err(MINIMAL, &["data.format=jsonish"]);
        assert!(e.contains("data.format: expected one of auto, hh"), "{e}");
        let e = err(MINIMAL, &["data.eval_fraction=1.5"]);
        assert!(e.contains("data.eval_fraction: must be in [0, 1)"), "{e}");
        for q in ["1.0", "-0.1", "nan"] {
            let e = err(MINIMAL, &[&format!("data.filter_ches_quantile={q}")]);
            assert!(
                e.contains("data.filter_ches_quantile: must be in [0, 1)"),
                "{q}: {e}"
            );
        }
        let e = err(
            MINIMAL,
            &[
                "data.filter_ches_quantile=0.1",
                "data.streaming=true",
                "training.max_steps=5",
            ],
        );
        assert!(
            e.contains("data.streaming") && e.contains("data.filter_ches_quantile"),
            "{e}"
        );
        let e = err(
            MINIMAL,
            &["data.eval_fraction=0.1", "data.eval=\"x.jsonl\""],
        );
        assert!(
            e.contains("data.eval_fraction") && e.contains("data.eval"),
            "{e}"
        );
        let e = err(MINIMAL, &["training.save_total_limit=0"]);
        assert!(e.contains("training.save_total_limit: must be > 0"), "{e}");
        let e = err("output_dir = [", &[]);
        assert!(e.starts_with("cfg.toml: "), "{e}");
    }

    /// `training.tf32` defaults to off, parses as a bool, and is refused off CUDA, as HF
    /// refuses `--tf32` without an Ampere GPU.
    #[test]
    fn tf32_is_off_by_default_and_needs_cuda() {
        let cfg = Config::parse(MINIMAL, "cfg.toml", &[]).unwrap();
        assert!(!cfg.training.tf32);
        let cfg = Config::parse(
            MINIMAL,
            "cfg.toml",
            &["training.tf32=true".into(), "device=\"cuda:1\"".into()],
        )
        .unwrap();
        assert!(cfg.training.tf32);
        let e = err(MINIMAL, &["training.tf32=true"]);
        assert!(
            e.contains("cfg.toml: training.tf32 = true needs a CUDA device"),
            "{e}"
        );
        let e = err(MINIMAL, &["training.tf32=\"yes\""]);
        assert!(e.contains("training.tf32"), "{e}");
    }
}
