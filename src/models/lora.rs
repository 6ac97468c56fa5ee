//! LoRA (Hu et al. 2021) as PEFT implements it, for every architecture through its dense layers
//! ([`super::ops::Linear`]): y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ with A `[r, in]`, B `[out, r]`
//! and s = α/r (α/√r with rsLoRA). The base weights stay frozen; A starts Kaiming-uniform
//! (a = √5, i.e. U(±1/√in), `nn.Linear`'s default) and B at zero, so that step 0 is the base
//! model bit for bit.
//!
//! Which layers are adapted follows PEFT's `target_modules` ([`Targets`]); the adapters are
//! read and written in PEFT's format ([`AdapterFile`], [`Adapters::peft_config`]): tensors
//! `base_model.model.<module path>.lora_{A,B}.weight` in `adapter_model.safetensors` beside an
//! `adapter_config.json`, which `peft.PeftModel.from_pretrained(base, dir)` loads.
//!
//! One [`Switch`] per model says what the adapters do in a forward pass: the trained adapters
//! (with a dropout stream while training), or the reference — the adapters off, or the frozen
//! adapter training started from — so that the reference model is the policy's own weights.

use super::ops::Linear;
use super::{CausalLm, Param};
use crate::config::{LoraConfig, TargetModules, ALL_LINEAR};
use crate::kernels::dense::WeightLayout;
use crate::kernels::random;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor, Var};
use candle_nn::Init;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The adapter files PEFT reads and writes.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's default `target_modules` per architecture (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
fn default_targets(model_type: &str) -> Vec<String> {
    let names: &[&str] = match model_type {
        "gpt2" => &["c_attn"],
        "gpt_neox" => &["query_key_value"],
        _ => &["q_proj", "v_proj"],
    };
    names.iter().map(|n| n.to_string()).collect()
}

/// A dense layer's module path in the `transformers` model (what PEFT matches and names): its
/// weight's prefix, except that GPT-2 checkpoints often store `h.0…` for the model's
/// `transformer.h.0…`.
fn module_path(model_type: &str, layer: &Linear) -> String {
    let prefix = layer.prefix();
    match model_type == "gpt2" && !prefix.starts_with("transformer.") {
        true => format!("transformer.{prefix}"),
        false => prefix.to_string(),
    }
}

/// PEFT's tensor name of A (`lora_A`) or B (`lora_B`) of a module.
pub fn tensor_name(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.{factor}.weight")
}

/// PEFT's `target_modules`, resolved.
#[derive(Debug, Clone)]
pub enum Targets {
    /// `"all-linear"`: every dense layer but the output layer.
    AllLinear,
    /// A string: a regular expression the whole module path must match.
    Pattern(regex::Regex),
    /// Names: a module path equal to one or ending with `.` + one.
    Names(Vec<String>),
}

impl Targets {
    fn from_config(t: Option<&TargetModules>, model_type: &str) -> Result<Targets> {
        Ok(match t {
            None => Targets::Names(default_targets(model_type)),
            Some(TargetModules::One(s)) if s.eq_ignore_ascii_case(ALL_LINEAR) => Targets::AllLinear,
            Some(TargetModules::One(s)) => Targets::Pattern(
                regex::Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| anyhow!("lora.target_modules: `{s}`: {e}"))?,
            ),
            Some(TargetModules::Many(v)) => Targets::Names(v.clone()),
        })
    }

    fn matches_name(name: &str, module: &str) -> bool {
        module == name || module.ends_with(&format!(".{name}"))
    }

    /// Which of `modules` are adapted; every name (or the pattern) must match one at least,
    /// else an error naming the key and the layers there are.
    fn select(&self, modules: &[String], model_type: &str) -> Result<Vec<bool>> {
        let known = || {
            let mut short: Vec<&str> = Vec::new();
            for m in modules {
                let s = m.rsplit('.').next().unwrap_or(m);
                if !short.contains(&s) {
                    short.push(s);
                }
            }
            format!(
                "its dense layers are {}, or use \"{ALL_LINEAR}\"",
                short.join(", ")
            )
        };
        let picked: Vec<bool> = match self {
            Targets::AllLinear => vec![true; modules.len()],
            Targets::Pattern(re) => modules.iter().map(|m| re.is_match(m)).collect(),
            Targets::Names(names) => {
                if let Some(bad) = names
                    .iter()
                    .find(|n| !modules.iter().any(|m| Self::matches_name(n, m)))
                {
                    bail!(
                        "lora.target_modules: `{bad}` matches no dense layer of this {model_type} model ({})",
                        known()
                    );
                }
                modules
                    .iter()
                    .map(|m| names.iter().any(|n| Self::matches_name(n, m)))
                    .collect()
            }
        };
        if !picked.contains(&true) {
            bail!(
                "lora.target_modules: matches no dense layer of this {model_type} model ({})",
                known()
            );
        }
        Ok(picked)
    }
}

/// The settings of a model's adapters.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
}

impl LoraSpec {
    /// s in y = x Wᵀ + s · x Aᵀ Bᵀ: α/r, or α/√r with rsLoRA (PEFT's `scaling`).
    pub fn scaling(&self) -> f64 {
        match self.use_rslora {
            true => self.alpha / (self.r as f64).sqrt(),
            false => self.alpha / self.r as f64,
        }
    }
}

/// A PEFT LoRA adapter on disk: its settings (checked to be plain LoRA, which is what this
/// project computes) and, memory-mapped, its factors by module path.
pub struct AdapterFile {
    pub dir: PathBuf,
    pub spec: LoraSpec,
    /// `base_model_name_or_path`, as PEFT recorded it.
    pub base_model: Option<String>,
    /// Module path → (A's name, B's name) in the weights file.
    modules: BTreeMap<String, (String, String)>,
    weights: MmapedSafetensors,
}

impl AdapterFile {
    /// Reads `dir/adapter_config.json` and indexes `dir/adapter_model.safetensors`; an error
    /// names the file and what in it is not plain LoRA.
    pub fn read(dir: &Path) -> Result<AdapterFile> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "cannot read {} (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})",
                config_path.display()
            )
        })?;
        let c: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
        let at = |key: &str| c.get(key).filter(|v| !v.is_null());
        let bad = |key: &str, what: &str| anyhow!("{}: `{key}` {what}", config_path.display());
        match at("peft_type").and_then(|v| v.as_str()) {
            Some("LORA") => {}
            other => {
                return Err(bad(
                    "peft_type",
                    &format!("is {other:?}; only LoRA adapters (\"LORA\") are supported"),
                ))
            }
        }
        let off = |key: &str| {
            at(key).is_none_or(|v| {
                v == false
                    || v == "none"
                    || v == &serde_json::json!({})
                    || v == &serde_json::json!([])
            })
        };
        for key in [
            "use_dora",
            "lora_bias",
            "bias",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "trainable_token_indices",
            "target_parameters",
            "layer_replication",
            "use_qalora",
            "alora_invocation_tokens",
        ] {
            if !off(key) {
                return Err(bad(
                    key,
                    &format!(
                        "= {} is not supported (only plain LoRA on dense layers)",
                        at(key).expect("set")
                    ),
                ));
            }
        }
        let r = at("r")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r", "must be a positive integer"))? as usize;
        let alpha = at("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("lora_alpha", "must be a number"))?;
        let spec = LoraSpec {
            r,
            alpha,
            dropout: at("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
            use_rslora: at("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            let also = match dir.join("adapter_model.bin").is_file() {
                true => " (adapter_model.bin is there: only safetensors adapters are supported; save with safe_serialization=True)",
                false => "",
            };
            bail!("{}: missing{also}", weights_path.display());
        }
        // SAFETY: the file is only read.
        let weights = unsafe { MmapedSafetensors::new(&weights_path) }
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        let mut parts: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
        for (name, _) in weights.tensors() {
            let parsed = name
                .strip_prefix("base_model.model.")
                .and_then(|rest| rest.strip_suffix(".weight"))
                .and_then(|rest| rest.rsplit_once('.'));
            let slot = match parsed {
                Some((module, "lora_A")) => &mut parts.entry(module.to_string()).or_default().0,
                Some((module, "lora_B")) => &mut parts.entry(module.to_string()).or_default().1,
                _ => bail!(
                    "{}: tensor `{name}` is not a LoRA factor (`base_model.model.<module>.lora_A.weight` or `.lora_B.weight`)",
                    weights_path.display()
                ),
            };
            *slot = Some(name);
        }
        let mut modules = BTreeMap::new();
        for (module, pair) in parts {
            match pair {
                (Some(a), Some(b)) => modules.insert(module, (a, b)),
                _ => bail!(
                    "{}: module `{module}` has only one of lora_A and lora_B",
                    weights_path.display()
                ),
            };
        }
        if modules.is_empty() {
            bail!("{}: holds no LoRA factors", weights_path.display());
        }
        Ok(AdapterFile {
            dir: dir.to_path_buf(),
            spec,
            base_model: at("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            modules,
            weights,
        })
    }

    /// How many layers the adapter adapts.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether it adapts none (never, for a file that [`AdapterFile::read`] accepted).
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// The names of A and B of `module`, checked (from the file's header) against the layer's
    /// (inputs, outputs) and the rank.
    fn checked(&self, module: &str, (n_in, n_out): (usize, usize)) -> Result<[&str; 2]> {
        let (a_name, b_name) = &self.modules[module];
        let r = self.spec.r;
        for (name, want) in [(a_name, [r, n_in]), (b_name, [n_out, r])] {
            let view = self.weights.get(name)?;
            if view.shape() != want {
                bail!(
                    "{}: `{name}` has shape {:?}, but this base model's `{module}` takes {want:?} at r = {r} (an adapter for another base model?)",
                    self.weights_path().display(),
                    view.shape()
                );
            }
        }
        Ok([a_name, b_name])
    }

    /// A and B of `module`, checked as [`AdapterFile::checked`] does.
    fn factors(&self, module: &str, in_out: (usize, usize)) -> Result<(Tensor, Tensor)> {
        let [a, b] = self.checked(module, in_out)?.map(|name| {
            self.weights.load(name, &Device::Cpu).with_context(|| {
                format!(
                    "cannot read `{name}` from {}",
                    self.weights_path().display()
                )
            })
        });
        Ok((a?, b?))
    }

    /// Which of the layers at `paths` (module paths) the adapter adapts; an error names a module
    /// of the adapter that is not among them.
    fn locate(&self, paths: &[String], model_type: &str) -> Result<Vec<bool>> {
        for module in self.modules.keys() {
            if !paths.contains(module) {
                bail!(
                    "{}: adapts `{module}`, which is not a dense layer of this {model_type} model (an adapter for another base model? it names {:?})",
                    self.weights_path().display(),
                    self.base_model.as_deref().unwrap_or("no base model")
                );
            }
        }
        Ok(paths.iter().map(|p| self.modules.contains_key(p)).collect())
    }
}

/// Settings from `[lora]` and `model.adapter`: with an adapter, its `adapter_config.json`
/// decides r, α, rsLoRA and the adapted modules (a `[lora]` key that says otherwise is an
/// error); `lora.dropout` may still be set.
pub fn resolve_spec(cfg: Option<&LoraConfig>, file: Option<&AdapterFile>) -> Result<LoraSpec> {
    let default = LoraConfig::default();
    let c = cfg.unwrap_or(&default);
    let Some(file) = file else {
        return Ok(LoraSpec {
            r: c.r.unwrap_or(8),
            alpha: c.alpha.unwrap_or(8.0),
            dropout: c.dropout.unwrap_or(0.0),
            use_rslora: c.use_rslora.unwrap_or(false),
        });
    };
    let config = file.dir.join(CONFIG_FILE);
    let clash = |key: &str, ours: String, theirs: String| {
        anyhow!(
            "lora.{key} = {ours}, but the adapter of model.adapter ({}) has {theirs}: with model.adapter the adapter's settings apply; remove lora.{key}",
            config.display()
        )
    };
    let f = &file.spec;
    if let Some(r) = c.r.filter(|&r| r != f.r) {
        return Err(clash("r", r.to_string(), format!("r = {}", f.r)));
    }
    if let Some(a) = c.alpha.filter(|&a| a != f.alpha) {
        return Err(clash(
            "alpha",
            a.to_string(),
            format!("lora_alpha = {}", f.alpha),
        ));
    }
    if let Some(u) = c.use_rslora.filter(|&u| u != f.use_rslora) {
        return Err(clash(
            "use_rslora",
            u.to_string(),
            format!("use_rslora = {}", f.use_rslora),
        ));
    }
    if c.target_modules.is_some() {
        return Err(clash(
            "target_modules",
            "(set)".into(),
            "its own modules".into(),
        ));
    }
    Ok(LoraSpec {
        dropout: c.dropout.unwrap_or(f.dropout),
        ..f.clone()
    })
}

/// What the adapters do in the next forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// The trained adapters; with a key, dropout masks drawn from it (training).
    Policy { dropout: Option<u64> },
    /// The reference: the adapters training started from (frozen), or none.
    Reference,
}

/// The mode shared by a model's adapters, and how many dropout streams training has drawn
/// (saved in checkpoints, so that a resumed run draws the same masks).
#[derive(Clone)]
pub struct Switch(Arc<Mutex<(Mode, u64)>>);

impl Switch {
    fn new() -> Self {
        Switch(Arc::new(Mutex::new((Mode::Policy { dropout: None }, 0))))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (Mode, u64)> {
        self.0.lock().expect("lora switch lock poisoned")
    }

    fn mode(&self) -> Mode {
        self.state().0
    }

    fn set(&self, mode: Mode) -> Mode {
        std::mem::replace(&mut self.state().0, mode)
    }
}

/// One dense layer's adapter.
pub struct Adapter {
    a: Tensor,
    b: Tensor,
    /// The frozen adapter training started from (`model.adapter`), for the reference.
    reference: Option<(Tensor, Tensor)>,
    scaling: f64,
    dropout: f64,
    /// This adapter's place among the model's: its dropout stream within a forward pass.
    index: u64,
    switch: Switch,
}

impl Adapter {
    /// `y` (the base layer's output for `x`) plus the adapter's update, as the switch says.
    pub fn add(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let (a, b, dropout) = match self.switch.mode() {
            Mode::Policy { dropout } => (&self.a, &self.b, dropout.filter(|_| self.dropout > 0.0)),
            Mode::Reference => match &self.reference {
                Some((a, b)) => (a, b, None),
                None => return Ok(y),
            },
        };
        let x = match dropout {
            Some(key) => {
                let key = random::key(&[key, self.index]);
                let mask =
                    random::dropout_mask(x.shape(), self.dropout, key, x.dtype(), x.device())?;
                x.mul(&mask)?
            }
            None => x.clone(),
        };
        let down = super::ops::dense(&x, a, None, WeightLayout::OutIn)?;
        let up = super::ops::dense(&down, b, None, WeightLayout::OutIn)?;
        y + up.affine(self.scaling, 0.0)?
    }
}

/// A model's adapters: their settings, the modules they adapt, and the switch.
pub struct Adapters {
    pub spec: LoraSpec,
    /// Module paths of the adapted layers, in model order.
    pub modules: Vec<String>,
    pub model_type: String,
    /// What `adapter_config.json` names as the base model.
    pub base_model: String,
    /// Whether the reference is an adapter (training started from `model.adapter`) rather
    /// than the base alone.
    pub reference_adapter: bool,
    switch: Switch,
    seed: u64,
}

impl Adapters {
    /// Runs `f` with the reference in place of the trained adapters (the switch is shared by
    /// the whole model, so `f` sees the reference in every layer).
    pub fn with_reference<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore<'a>(&'a Switch, Mode);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let _restore = Restore(&self.switch, self.switch.set(Mode::Reference));
        f()
    }

    /// Sets the trained adapters for the next forward pass: training draws that pass's dropout
    /// stream (one per pass, keyed by the run's seed and the number drawn so far), evaluation
    /// uses none. A checkpointed block recomputed in the backward sees the same key.
    pub fn begin_forward(&self, training: bool) {
        let mut state = self.switch.state();
        let dropout = match training {
            true => {
                state.1 += 1;
                Some(random::key(&[self.seed, state.1]))
            }
            false => None,
        };
        state.0 = Mode::Policy { dropout };
    }

    /// Dropout streams drawn so far (the resumable state of the masks).
    pub fn draws(&self) -> u64 {
        self.switch.state().1
    }

    pub fn set_draws(&self, draws: u64) {
        self.switch.state().1 = draws;
    }

    /// `adapter_config.json` as PEFT writes it for these adapters.
    pub fn peft_config(&self) -> serde_json::Value {
        let s = &self.spec;
        let alpha = match s.alpha.fract() == 0.0 && s.alpha.abs() < 1e15 {
            true => serde_json::json!(s.alpha as i64),
            false => serde_json::json!(s.alpha),
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": s.r,
            "lora_alpha": alpha,
            "lora_dropout": s.dropout,
            "use_rslora": s.use_rslora,
            "target_modules": self.modules,
            // GPT-2's Conv1D stores its weight [in, out]; PEFT sets this for it.
            "fan_in_fan_out": self.model_type == "gpt2",
            "bias": "none",
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }
}

/// How [`attach`] builds the adapters.
pub struct Setup<'a> {
    pub spec: LoraSpec,
    /// `lora.target_modules` (ignored when starting from `start`, whose modules are adapted).
    pub targets: Option<&'a TargetModules>,
    /// The adapter to start from (`model.adapter`), else A Kaiming-uniform and B zero.
    pub start: Option<&'a AdapterFile>,
    /// Trainable adapters are Vars (f32 masters when computing in half precision) and, when
    /// starting from a file, keep it frozen as the reference; otherwise plain tensors.
    pub trainable: bool,
    /// Initialises fresh A's (by tensor name) and keys the dropout streams.
    pub seed: u64,
    pub base_model: String,
}

/// The module paths of `net`'s dense layers.
fn paths(net: &dyn CausalLm, model_type: &str) -> Vec<String> {
    net.dense_layers()
        .into_iter()
        .map(|l| module_path(model_type, l))
        .collect()
}

/// Which dense layers of `net` a setup adapts.
fn selected(
    net: &dyn CausalLm,
    model_type: &str,
    targets: Option<&TargetModules>,
    start: Option<&AdapterFile>,
) -> Result<Vec<bool>> {
    let paths = paths(net, model_type);
    match start {
        Some(file) => file.locate(&paths, model_type),
        None => Targets::from_config(targets, model_type)?.select(&paths, model_type),
    }
}

/// The (module path, inputs, outputs) of the layers a setup adapts, for `--dry-run`.
pub fn adapted_shapes(
    net: &dyn CausalLm,
    model_type: &str,
    targets: Option<&TargetModules>,
    start: Option<&AdapterFile>,
) -> Result<Vec<(String, usize, usize)>> {
    let picked = selected(net, model_type, targets, start)?;
    net.dense_layers()
        .into_iter()
        .zip(picked)
        .filter(|(_, on)| *on)
        .map(|(l, _)| {
            let (i, o) = l.in_out()?;
            let module = module_path(model_type, l);
            if let Some(file) = start {
                file.checked(&module, (i, o))?;
            }
            Ok((module, i, o))
        })
        .collect()
}

/// Gives `net`'s targeted dense layers adapters computing in `dtype`; returns them and, when
/// trainable, their parameters (A then B per layer, PEFT's names).
pub fn attach(
    net: &dyn CausalLm,
    model_type: &str,
    setup: &Setup,
    dtype: DType,
    device: &Device,
) -> Result<(Adapters, Vec<Param>)> {
    let picked = selected(net, model_type, setup.targets, setup.start)?;
    let switch = Switch::new();
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let (mut modules, mut params) = (Vec::new(), Vec::new());
    for (layer, _) in net
        .dense_layers()
        .into_iter()
        .zip(picked)
        .filter(|(_, on)| *on)
    {
        let module = module_path(model_type, layer);
        let (n_in, n_out) = layer.in_out()?;
        let r = setup.spec.r;
        let (a0, b0) = match setup.start {
            Some(file) => file.factors(&module, (n_in, n_out))?,
            None => {
                // Kaiming-uniform with a = √5 on [r, in]: U(±1/√in).
                let bound = 1.0 / (n_in as f64).sqrt();
                let init = Init::Uniform {
                    lo: -bound,
                    up: bound,
                };
                let name = tensor_name(&module, "lora_A");
                let a =
                    super::seeded_init(setup.seed, &name, &(r, n_in).into(), init, &Device::Cpu)?;
                (a, Tensor::zeros((n_out, r), DType::F32, &Device::Cpu)?)
            }
        };
        let (a0, b0) = (a0.to_device(device)?, b0.to_device(device)?);
        let mut factors = Vec::new();
        for (factor, t) in [("lora_A", &a0), ("lora_B", &b0)] {
            let value = t.to_dtype(dtype)?;
            if !setup.trainable {
                factors.push(value);
                continue;
            }
            let var = Var::from_tensor(&value)?;
            factors.push(var.as_tensor().clone());
            let master = half
                .then(|| Var::from_tensor(&t.to_dtype(DType::F32)?))
                .transpose()?;
            params.push(Param {
                name: tensor_name(&module, factor),
                var,
                master,
            });
        }
        let reference = match (setup.trainable, setup.start) {
            (true, Some(_)) => Some((a0.to_dtype(dtype)?, b0.to_dtype(dtype)?)),
            _ => None,
        };
        let b = factors.pop().expect("two factors");
        layer.attach(Adapter {
            a: factors.pop().expect("two factors"),
            b,
            reference,
            scaling: setup.spec.scaling(),
            dropout: setup.spec.dropout,
            index: modules.len() as u64,
            switch: switch.clone(),
        })?;
        modules.push(module);
    }
    let adapters = Adapters {
        spec: setup.spec.clone(),
        modules,
        model_type: model_type.to_string(),
        base_model: setup.base_model.clone(),
        reference_adapter: setup.trainable && setup.start.is_some(),
        switch,
        seed: setup.seed,
    };
    Ok((adapters, params))
}

/// W + s · B A (its transpose for a Conv1D weight `[in, out]`): what `merge_and_unload` leaves in
/// the base layer, computed in f64 (one layer at a time) and rounded once to W's dtype.
pub fn merged_weight(
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    layout: WeightLayout,
) -> Result<Tensor> {
    let f64 = |t: &Tensor| t.to_dtype(DType::F64);
    let delta = (f64(b)?.matmul(&f64(a)?)? * scaling)?;
    let delta = match layout {
        WeightLayout::OutIn => delta,
        WeightLayout::InOut => delta.t()?,
    };
    Ok((f64(w)? + delta)?.to_dtype(w.dtype())?)
}

/// Merges `file` into `net`'s weights: each adapted layer's weight parameter (found by name in
/// `params`) becomes [`merged_weight`].
pub fn merge(
    net: &dyn CausalLm,
    model_type: &str,
    params: &[Param],
    file: &AdapterFile,
) -> Result<()> {
    let layers = net.dense_layers();
    let located = file.locate(&paths(net, model_type), model_type)?;
    for (layer, _) in layers.iter().zip(located).filter(|(_, on)| *on) {
        let module = module_path(model_type, layer);
        let (a, b) = file.factors(&module, layer.in_out()?)?;
        let name = format!("{}.weight", layer.prefix());
        let p = params
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("the base model has no trainable `{name}`"))?;
        let w = p.var.as_tensor();
        let merged = merged_weight(
            w,
            &a.to_device(w.device())?,
            &b.to_device(w.device())?,
            file.spec.scaling(),
            layer.layout(),
        )?;
        p.var.set(&merged)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn target_modules_match_as_in_peft() {
        let modules = names(&[
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj",
        ]);
        let pick = |t: Targets| t.select(&modules, "gpt2").unwrap();
        assert_eq!(pick(Targets::AllLinear), vec![true; 4]);
        assert_eq!(
            pick(Targets::Names(names(&["c_proj"]))),
            vec![false, true, false, true]
        );
        assert_eq!(
            pick(Targets::Names(names(&["mlp.c_proj"]))),
            vec![false, false, false, true]
        );
        // A suffix must end at a dot: `proj` is not `c_proj`.
        let err = Targets::Names(names(&["proj"]))
            .select(&modules, "gpt2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lora.target_modules: `proj` matches no dense layer")
                && err.contains("c_attn, c_proj, c_fc"),
            "{err}"
        );
        let re = Targets::from_config(Some(&TargetModules::One(r".*\.c_(fc|attn)".into())), "gpt2")
            .unwrap();
        assert_eq!(pick(re), vec![true, false, true, false]);
        let all =
            Targets::from_config(Some(&TargetModules::One("ALL-LINEAR".into())), "gpt2").unwrap();
        assert!(matches!(all, Targets::AllLinear));
        assert!(
            matches!(Targets::from_config(None, "mistral").unwrap(), Targets::Names(n) if n == names(&["q_proj", "v_proj"]))
        );
    }

    #[test]
    fn scaling_is_alpha_over_r_or_its_root() {
        let s = LoraSpec {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
        };
        assert_eq!(s.scaling(), 2.0);
        assert_eq!(
            LoraSpec {
                use_rslora: true,
                ..s
            }
            .scaling(),
            8.0
        );
    }

    #[test]
    fn merged_weight_is_base_plus_scaled_product() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev)?; // [out 2, in 3]
        let a = Tensor::new(&[[1f32, 0.0, -1.0]], &dev)?; // [r 1, in 3]
        let b = Tensor::new(&[[2f32], [0.5]], &dev)?; // [out 2, r 1]
        let m = merged_weight(&w, &a, &b, 0.5, WeightLayout::OutIn)?.to_vec2::<f32>()?;
        assert_eq!(m, vec![vec![2.0, 2.0, 2.0], vec![4.25, 5.0, 5.75]]);
        let m = merged_weight(&w.t()?.contiguous()?, &a, &b, 0.5, WeightLayout::InOut)?;
        assert_eq!(
            m.t()?.to_vec2::<f32>()?,
            vec![vec![2.0, 2.0, 2.0], vec![4.25, 5.0, 5.75]]
        );
        Ok(())
    }
}
