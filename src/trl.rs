//! `dpo-sam config from-trl`: a TRL / alignment-handbook recipe (YAML or JSON: the model, the
//! dataset mixture, `DPOConfig` / `CPOConfig` / `TrainingArguments` fields, and the official
//! logits-SAM script's `use_sam_trainer` / `sam_rho`) written as an equivalent dpo-sam TOML,
//! with every field that could not be carried over listed and the reason.
//!
//! Fields the recipe leaves out take TRL 1.x's defaults where they differ from dpo-sam's
//! (`DPOConfig`: learning rate 1e-6, `max_length` 1024, `logging_steps` 10, bf16, gradient
//! checkpointing; `TrainingArguments`: 8 pairs per device, 3 epochs), written out explicitly.
//! The global batch is `per_device_train_batch_size × gradient_accumulation_steps × processes`.

use crate::config::{Config, LossType};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use toml::Table;

#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Convert a TRL / alignment-handbook recipe (YAML or JSON) into a dpo-sam TOML; every
    /// field that cannot be carried over is listed on stderr.
    #[command(
        name = "from-trl",
        after_help = "The global batch is per_device_train_batch_size × gradient_accumulation_steps × \
            --num-processes; dpo-sam runs it on one device as micro-batches of \
            per_device_train_batch_size.\n\nExample:\n  dpo-sam config from-trl \
            recipes/zephyr-7b-beta/dpo/config_full.yaml --num-processes 8 --out zephyr.toml"
    )]
    FromTrl(FromTrlArgs),
}

#[derive(clap::Args, Debug)]
pub struct FromTrlArgs {
    /// The recipe: `.yaml`/`.yml` or `.json`.
    pub file: PathBuf,
    /// Write the TOML here (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Processes the recipe was launched with (`accelerate launch --num_processes`): they
    /// multiply the global batch.
    #[arg(long, default_value_t = 1)]
    pub num_processes: usize,
}

pub fn run(args: ConfigArgs) -> Result<()> {
    let ConfigCommand::FromTrl(args) = args.command;
    let converted = from_trl_file(&args.file, args.num_processes)?;
    eprintln!("{}", converted.batch_note);
    if converted.dropped.is_empty() {
        eprintln!("every field was carried over");
    } else {
        eprintln!(
            "not carried over ({} field{}):",
            converted.dropped.len(),
            if converted.dropped.len() == 1 {
                ""
            } else {
                "s"
            }
        );
        for d in &converted.dropped {
            eprintln!("  {}: {} — {}", d.key, d.value, d.reason);
        }
    }
    match &args.out {
        Some(path) => std::fs::write(path, &converted.toml)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{}", converted.toml),
    }
    Ok(())
}

/// A recipe field left behind, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub key: String,
    /// The value as written in the recipe (JSON).
    pub value: String,
    pub reason: String,
}

/// A converted recipe.
#[derive(Debug)]
pub struct Converted {
    /// The dpo-sam config, already checked by [`Config::parse`].
    pub toml: String,
    /// How the global batch was formed.
    pub batch_note: String,
    pub dropped: Vec<Dropped>,
}

/// Reads and converts a recipe file.
pub fn from_trl_file(path: &Path, num_processes: usize) -> Result<Converted> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    let recipe: Value = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?,
        Some("yaml" | "yml") => serde_norway::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid YAML: {e}", path.display()))?,
        _ => bail!("{}: expected a .yaml, .yml or .json recipe", path.display()),
    };
    let Value::Object(map) = recipe else {
        bail!("{}: expected a mapping of recipe fields", path.display());
    };
    let origin = path.display().to_string();
    convert(&map, num_processes, &origin).map_err(|e| anyhow!("{origin}: {e:#}"))
}

/// Keys that only steer logging, the Hub, process launching or preprocessing speed: nothing in
/// a dpo-sam run corresponds, and nothing about the trained model depends on them.
const NO_EFFECT: &[&str] = &[
    "dataset_num_proc",
    "preprocessing_num_workers",
    "gradient_checkpointing_kwargs",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "push_to_hub",
    "report_to",
    "run_name",
    "log_level",
    "logging_first_step",
    "logging_strategy",
    "overwrite_output_dir",
    "remove_unused_columns",
    "ddp_timeout",
    "dataloader_num_workers",
    "use_flash_attention_2",
    "attn_implementation",
    "sam_use_chunked_delta_logits",
    "sam_vocab_chunk_size",
    "disable_dropout",
];

/// TRL's `loss_type` names that dpo-sam computes identically.
const DPO_LOSSES: &[&str] = &["sigmoid", "robust", "hinge", "ipo", "sft"];

/// The conversion proper; `origin` names the recipe in messages.
pub fn convert(
    recipe: &Map<String, Value>,
    num_processes: usize,
    origin: &str,
) -> Result<Converted> {
    if num_processes == 0 {
        bail!("--num-processes: must be >= 1");
    }
    let mut r = Recipe {
        fields: recipe.clone(),
        dropped: Vec::new(),
    };
    let (mut top, mut model, mut data, mut training, mut sam) = (
        Table::new(),
        Table::new(),
        Table::new(),
        Table::new(),
        Table::new(),
    );

    top.insert(
        "output_dir".into(),
        r.take_str("output_dir")?
            .unwrap_or_else(|| "trainer_output".into())
            .into(),
    );
    top.insert("seed".into(), r.take_int("seed")?.unwrap_or(42).into());
    // TRL trains on the accelerator.
    top.insert("device".into(), "cuda".into());

    // The model.
    let name = r
        .take_str("model_name_or_path")?
        .ok_or_else(|| anyhow!("model_name_or_path: missing (the policy to train)"))?;
    model.insert("name_or_path".into(), name.into());
    if let Some(rev) = r.take_str("model_revision")? {
        if rev != "main" {
            r.drop_value("model_revision", &rev, "dpo-sam loads a model's default revision; download this one and give its directory as model.name_or_path");
        }
    }
    let dtype = r.take_str("torch_dtype")?.or(r.take_str("dtype")?);
    let bf16 = r.take_bool("bf16")?;
    let fp16 = r.take_bool("fp16")?.unwrap_or(false);
    match dtype.as_deref() {
        None | Some("auto" | "float32" | "null") => {
            // DPOConfig's bf16 defaults to true unless fp16 is set: autocast over f32 weights.
            if bf16.unwrap_or(!fp16) {
                training.insert("mixed_precision".into(), "bf16".into());
            }
        }
        Some("bfloat16") => {
            model.insert("dtype".into(), "bf16".into());
        }
        Some(other) => {
            r.drop_value("torch_dtype", other, "dpo-sam trains in f32, bf16, or f32 masters with training.mixed_precision = \"bf16\"");
        }
    }
    if fp16 {
        r.drop_value("fp16", &true, "fp16 autocast is not supported; use bf16");
    }

    // The data.
    let (train, eval) = datasets(&mut r)?;
    let do_eval = r.take_bool("do_eval")?;
    let strategy = r
        .take_str("eval_strategy")?
        .or(r.take_str("evaluation_strategy")?);
    let evaluate = match strategy.as_deref() {
        Some("no") => false,
        Some("steps") => true,
        Some(other) => {
            r.drop_value(
                "eval_strategy",
                other,
                "dpo-sam evaluates every training.eval_steps steps and at the end",
            );
            true
        }
        None => do_eval.unwrap_or(false),
    };
    data.insert("train".into(), sources(train));
    match eval {
        Eval::Sources(list) if evaluate => {
            data.insert("eval".into(), sources(list));
        }
        Eval::Fraction(f) if evaluate => {
            data.insert("eval_fraction".into(), f.into());
        }
        _ => {}
    }
    data.insert(
        "max_length".into(),
        r.take_int("max_length")?.unwrap_or(1024).into(),
    );
    let max_prompt = r.take_int("max_prompt_length")?;
    if let Some(p) = max_prompt {
        data.insert("max_prompt_length".into(), p.into());
    }
    if let Some(mode) = r.take_str("truncation_mode")? {
        match (max_prompt, mode.as_str()) {
            // TRL 0.x: the mode says which end of a long prompt is kept, as dpo-sam's does.
            (Some(_), "keep_end" | "keep_start") => {
                data.insert("truncation_mode".into(), mode.into());
            }
            // TRL 1.x keep_start: the first max_length tokens, which is what dpo-sam keeps.
            (None, "keep_start") => {}
            _ => r.drop_value("truncation_mode", &mode, "TRL 1.x's keep_end keeps the sequence's last max_length tokens; dpo-sam keeps the prompt's end only when it cuts it to data.max_prompt_length"),
        }
    }
    if let Some(template) = r.take("chat_template") {
        r.dropped.push(Dropped {
            key: "chat_template".into(),
            value: short(&template),
            reason: "write the template to a .jinja file and set data.chat_template to its path"
                .into(),
        });
    }

    // The batch.
    let per_device = r.take_int("per_device_train_batch_size")?.unwrap_or(8);
    let accumulation = r.take_int("gradient_accumulation_steps")?.unwrap_or(1);
    if per_device < 1 || accumulation < 1 {
        bail!("per_device_train_batch_size and gradient_accumulation_steps must be >= 1");
    }
    let global = per_device * accumulation * num_processes as i64;
    training.insert("batch_size".into(), global.into());
    training.insert("micro_batch_size".into(), per_device.into());
    let batch_note = format!(
        "global batch: per_device_train_batch_size {per_device} × gradient_accumulation_steps {accumulation} × {num_processes} process{} = training.batch_size {global}, run as micro-batches of {per_device} on one device",
        if num_processes == 1 { "" } else { "es" }
    );
    if let Some(eval_batch) = r.take("per_device_eval_batch_size") {
        if eval_batch.as_i64() != Some(per_device) {
            r.dropped.push(Dropped {
                key: "per_device_eval_batch_size".into(),
                value: short(&eval_batch),
                reason: format!("dpo-sam evaluates in micro-batches of {per_device}; the eval metrics are means, so only the grouping differs"),
            });
        }
    }

    // The loss.
    losses(&mut r, &mut training)?;
    for key in [
        "beta",
        "label_smoothing",
        "rpo_alpha",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "warmup_ratio",
    ] {
        if let Some(v) = r.take_float(key)? {
            training.insert(key.into(), v.into());
        }
    }
    training.insert(
        "learning_rate".into(),
        r.take_float("learning_rate")?.unwrap_or(1e-6).into(),
    );
    if let Some(w) = r.take_float("warmup_steps")? {
        // transformers 5 reads a value below 1 as a ratio.
        match w < 1.0 {
            true if w > 0.0 => training.insert("warmup_ratio".into(), w.into()),
            _ => training.insert("warmup_steps".into(), (w as i64).into()),
        };
    }
    match r.take_int("max_steps")? {
        Some(s) if s > 0 => {
            training.insert("max_steps".into(), s.into());
        }
        _ => {}
    }
    training.insert(
        "num_train_epochs".into(),
        r.take_float("num_train_epochs")?.unwrap_or(3.0).into(),
    );
    if let Some(kind) = r.take_str("lr_scheduler_type")? {
        match kind.as_str() {
            "linear" | "cosine" | "constant" | "constant_with_warmup" => {
                training.insert("lr_scheduler_type".into(), kind.into());
            }
            _ => r.drop_value("lr_scheduler_type", &kind, "not supported; dpo-sam has linear (the default used here), cosine, constant and constant_with_warmup"),
        }
    }
    if let Some(opt) = r.take_str("optim")? {
        match opt.as_str() {
            "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "adamw_apex_fused" => {
                training.insert("optimizer".into(), "adamw".into());
            }
            "sgd" => {
                training.insert("optimizer".into(), "sgd".into());
            }
            _ => r.drop_value(
                "optim",
                &opt,
                "not supported; dpo-sam has adamw (the default used here) and sgd",
            ),
        }
    }
    training.insert(
        "logging_steps".into(),
        r.take_int("logging_steps")?.unwrap_or(10).into(),
    );
    if evaluate {
        // HF evaluates every logging_steps when eval_steps is unset.
        let every = r.take_int("eval_steps")?.or(training
            .get("logging_steps")
            .and_then(toml::Value::as_integer));
        training.insert("eval_steps".into(), every.unwrap_or(0).into());
    } else if let Some(v) = r.take("eval_steps") {
        r.dropped.push(Dropped {
            key: "eval_steps".into(),
            value: short(&v),
            reason: "evaluation is off (eval_strategy / do_eval)".into(),
        });
    }
    let save = r.take_str("save_strategy")?;
    match save.as_deref() {
        None | Some("steps") => {
            if let Some(s) = r.take_int("save_steps")? {
                training.insert("save_steps".into(), s.into());
            } else if save.is_some() {
                training.insert("save_steps".into(), 500.into());
            }
        }
        Some(other) => r.drop_value(
            "save_strategy",
            other,
            "dpo-sam checkpoints every training.save_steps steps (0: none) and always at the end",
        ),
    }
    if let Some(n) = r.take_int("save_total_limit")? {
        training.insert("save_total_limit".into(), n.into());
    }
    training.insert(
        "gradient_checkpointing".into(),
        r.take_bool("gradient_checkpointing")?
            .unwrap_or(true)
            .into(),
    );
    for key in ["precompute_ref_log_probs", "dataloader_drop_last"] {
        if let Some(v) = r.take_bool(key)? {
            training.insert(key.into(), v.into());
        }
    }

    // The official logits-SAM script's flags.
    let use_sam = r.take_bool("use_sam_trainer")?.unwrap_or(false);
    let rho = r.take_float("sam_rho")?;
    if use_sam {
        sam.insert("kind".into(), "logits".into());
        // scripts/dpo.py's default.
        sam.insert("rho".into(), rho.unwrap_or(0.05).into());
    } else if let Some(rho) = rho {
        r.drop_value("sam_rho", &rho, "use_sam_trainer is not set");
    }

    for key in NO_EFFECT {
        if let Some(v) = r.take(key) {
            r.dropped.push(Dropped {
                key: (*key).into(),
                value: short(&v),
                reason: "no effect on the trained model in dpo-sam".into(),
            });
        }
    }
    let rest: Vec<(String, Value)> = std::mem::take(&mut r.fields).into_iter().collect();
    for (key, value) in rest {
        r.dropped.push(Dropped {
            key,
            value: short(&value),
            reason: "no dpo-sam equivalent".into(),
        });
    }

    top.insert("model".into(), model.into());
    top.insert("data".into(), data.into());
    top.insert("training".into(), training.into());
    if !sam.is_empty() {
        top.insert("sam".into(), sam.into());
    }
    let body = toml::to_string(&top).context("writing the TOML")?;
    let toml = format!(
        "# Converted by `dpo-sam config from-trl` from {origin}.\n# {batch_note}.\n{}\n{body}",
        match r.dropped.len() {
            0 => "# Every field was carried over.".to_string(),
            n => format!(
                "# {n} recipe field(s) not carried over: {}.",
                r.dropped
                    .iter()
                    .map(|d| d.key.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    );
    Config::parse(&toml, "the converted config", &[])
        .context("the converted config does not load (please report this)")?;
    Ok(Converted {
        toml,
        batch_note,
        dropped: r.dropped,
    })
}

/// The recipe's fields not yet used, and those given up.
struct Recipe {
    fields: Map<String, Value>,
    dropped: Vec<Dropped>,
}

impl Recipe {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.fields.remove(key).filter(|v| !v.is_null())
    }

    fn drop_value<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T, reason: &str) {
        self.dropped.push(Dropped {
            key: key.into(),
            value: serde_json::to_string(value).unwrap_or_default(),
            reason: reason.into(),
        });
    }

    fn take_str(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => bail!("{key}: expected a string, got {other}"),
        }
    }

    /// HfArgumentParser reads YAML scalars by the field's type, so `1e-6` (a string to YAML 1.1)
    /// is a float there: strings that parse as numbers are accepted.
    fn take_float(&mut self, key: &str) -> Result<Option<f64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| anyhow!("{key}: expected a number, got \"{s}\"")),
            Some(other) => bail!("{key}: expected a number, got {other}"),
        }
    }

    fn take_int(&mut self, key: &str) -> Result<Option<i64>> {
        match self.take_float(key)? {
            Some(x) if x.fract() == 0.0 => Ok(Some(x as i64)),
            Some(x) => bail!("{key}: expected an integer, got {x}"),
            None => Ok(None),
        }
    }

    fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => bail!("{key}: expected true or false, got {other}"),
        }
    }
}

/// A value as shown in the list of dropped fields.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.chars().count() > 60 {
        true => format!("{}…", text.chars().take(60).collect::<String>()),
        false => text,
    }
}

fn sources(list: Vec<String>) -> toml::Value {
    match list.len() {
        1 => list.into_iter().next().expect("one source").into(),
        _ => list.into(),
    }
}

/// Where the eval pairs come from.
enum Eval {
    None,
    Sources(Vec<String>),
    Fraction(f64),
}

/// `data.train` and the eval pairs from `dataset_mixture` (alignment-handbook since 2025),
/// `dataset_mixer` + `dataset_splits` (earlier handbook recipes) or `dataset_name` (TRL's
/// scripts).
fn datasets(r: &mut Recipe) -> Result<(Vec<String>, Eval)> {
    let hub = |id: &str, split: &str| format!("hub:{id}:{split}");
    if let Some(mixture) = r.take("dataset_mixture") {
        let list = mixture
            .get("datasets")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("dataset_mixture.datasets: expected a list of datasets"))?;
        let mut train = Vec::new();
        for (i, d) in list.iter().enumerate() {
            let id = d.get("id").and_then(Value::as_str).ok_or_else(|| {
                anyhow!("dataset_mixture.datasets[{i}].id: expected a dataset id")
            })?;
            let split = d.get("split").and_then(Value::as_str).unwrap_or("train");
            train.push(hub(id, split));
            dataset_extras(r, &format!("dataset_mixture.datasets[{i}]"), d);
        }
        if let Some(seed) = mixture.get("seed").filter(|v| !v.is_null()) {
            r.dropped.push(Dropped {
                key: "dataset_mixture.seed".into(),
                value: short(seed),
                reason: "dpo-sam shuffles and holds out with the run's seed".into(),
            });
        }
        let eval = match mixture.get("test_split_size").and_then(Value::as_f64) {
            Some(f) if f > 0.0 && f < 1.0 => Eval::Fraction(f),
            Some(n) if n >= 1.0 => {
                r.dropped.push(Dropped {
                    key: "dataset_mixture.test_split_size".into(),
                    value: n.to_string(),
                    reason: "dpo-sam holds out a fraction (data.eval_fraction), not a count: set it to this count / the number of rows".into(),
                });
                Eval::None
            }
            _ => Eval::None,
        };
        return Ok((train, eval));
    }
    if let Some(mixer) = r.take("dataset_mixer") {
        let Value::Object(mixer) = mixer else {
            bail!("dataset_mixer: expected a mapping of dataset id to fraction");
        };
        let splits: Vec<String> = match r.take("dataset_splits") {
            Some(Value::Array(v)) => v
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("dataset_splits: expected split names"))
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("dataset_splits: expected a list of split names, got {other}"),
            None => vec!["train".into(), "test".into()],
        };
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for (id, fraction) in &mixer {
            if fraction.as_f64() != Some(1.0) {
                r.dropped.push(Dropped {
                    key: format!("dataset_mixer.{id}"),
                    value: short(fraction),
                    reason: "dpo-sam reads whole datasets: the fraction is not applied".into(),
                });
            }
            for split in &splits {
                match split.contains("test") {
                    true => eval.push(hub(id, split)),
                    false => train.push(hub(id, split)),
                }
            }
        }
        let eval = match eval.is_empty() {
            true => Eval::None,
            false => Eval::Sources(eval),
        };
        return Ok((train, eval));
    }
    if let Some(name) = r.take_str("dataset_name")? {
        if let Some(config) = r.take_str("dataset_config")? {
            r.drop_value(
                "dataset_config",
                &config,
                "dpo-sam reads a dataset's default configuration",
            );
        }
        let train_split = r
            .take_str("dataset_train_split")?
            .unwrap_or_else(|| "train".into());
        let test_split = r
            .take_str("dataset_test_split")?
            .unwrap_or_else(|| "test".into());
        return Ok((
            vec![hub(&name, &train_split)],
            Eval::Sources(vec![hub(&name, &test_split)]),
        ));
    }
    bail!("no dataset: expected dataset_mixture, dataset_mixer or dataset_name")
}

/// What a `dataset_mixture` entry may say beyond its id and split.
fn dataset_extras(r: &mut Recipe, at: &str, d: &Value) {
    if let Some(config) = d
        .get("config")
        .and_then(Value::as_str)
        .filter(|c| *c != "default")
    {
        r.drop_value(
            &format!("{at}.config"),
            &config,
            "dpo-sam reads a dataset's default configuration",
        );
    }
    if let Some(w) = d
        .get("weight")
        .filter(|w| !w.is_null() && w.as_f64() != Some(1.0))
    {
        r.dropped.push(Dropped {
            key: format!("{at}.weight"),
            value: short(w),
            reason: "dpo-sam reads whole datasets: the weight is not applied".into(),
        });
    }
    let known = ["prompt", "chosen", "rejected", "messages"];
    if let Some(cols) = d.get("columns").and_then(Value::as_array) {
        if cols
            .iter()
            .any(|c| !c.as_str().is_some_and(|c| known.contains(&c)))
        {
            r.dropped.push(Dropped {
                key: format!("{at}.columns"),
                value: short(&Value::Array(cols.clone())),
                reason:
                    "dpo-sam reads prompt/chosen/rejected (see data.format), whatever the columns"
                        .into(),
            });
        }
    }
}

/// `loss_type`, `loss_weights` and the CPO fields into `[training]`. A `CPOConfig` recipe (one
/// with `cpo_alpha` or `simpo_gamma`) maps CPOTrainer's `sigmoid` to `cpo` and its `simpo` to
/// `simpo` plus `cpo_alpha` × `sft`. A loss dpo-sam does not compute is an error, not a silent
/// change of objective.
fn losses(r: &mut Recipe, training: &mut Table) -> Result<()> {
    let names: Vec<String> = match r.take("loss_type") {
        None => vec!["sigmoid".into()],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(v)) => v
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("loss_type: expected loss names"))
            })
            .collect::<Result<_>>()?,
        Some(other) => bail!("loss_type: expected a name or a list, got {other}"),
    };
    let weights = match r.take("loss_weights") {
        None => vec![1.0; names.len()],
        Some(Value::Array(v)) => v
            .iter()
            .map(|w| {
                w.as_f64()
                    .ok_or_else(|| anyhow!("loss_weights: expected numbers"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => bail!("loss_weights: expected a list of numbers, got {other}"),
    };
    if weights.len() != names.len() {
        bail!(
            "loss_weights: {} weights for {} loss types",
            weights.len(),
            names.len()
        );
    }
    let cpo_alpha = r.take_float("cpo_alpha")?;
    let simpo_gamma = r.take_float("simpo_gamma")?;
    let cpo = cpo_alpha.is_some() || simpo_gamma.is_some();
    let mut terms: Vec<(LossType, f64)> = Vec::new();
    for (name, w) in names.iter().zip(weights) {
        match (cpo, name.as_str()) {
            (true, "sigmoid") => terms.push((LossType::Cpo, w)),
            (true, "simpo") => {
                terms.push((LossType::Simpo, w));
                // CPOTrainer adds cpo_alpha × the NLL to SimPO too (CPOConfig's default 1).
                let alpha = cpo_alpha.unwrap_or(1.0);
                if alpha > 0.0 {
                    terms.push((LossType::Sft, w * alpha));
                }
            }
            (false, n) if DPO_LOSSES.contains(&n) => terms.push((n.parse()?, w)),
            (_, n) => bail!(
                "loss_type: `{n}` is not computed by dpo-sam (TRL's DPOTrainer losses it has: {}; CPOTrainer's: sigmoid, simpo)",
                DPO_LOSSES.join(", ")
            ),
        }
    }
    if let Some(alpha) = cpo_alpha {
        training.insert("cpo_alpha".into(), alpha.into());
    }
    if let Some(gamma) = simpo_gamma {
        training.insert("simpo_gamma".into(), gamma.into());
    }
    let kinds: Vec<toml::Value> = terms.iter().map(|(k, _)| k.as_str().into()).collect();
    training.insert(
        "loss_type".into(),
        match kinds.len() {
            1 => kinds[0].clone(),
            _ => kinds.into(),
        },
    );
    if terms.iter().any(|(_, w)| *w != 1.0) {
        let w: Vec<toml::Value> = terms.iter().map(|(_, w)| (*w).into()).collect();
        training.insert("loss_weights".into(), w.into());
    }
    Ok(())
}
