//! Trainable causal language models, written for this project from differentiable ops, one file
//! per architecture (weight names mirror Hugging Face's), plus loading and saving.
//!
//! Every model returns the final hidden states for every position and keeps its output layer
//! apart ([`output::OutputLayer`]), so that the logits-SAM step can perturb it alone.

pub mod cache;
pub mod checkpoint;
pub mod gpt2;
pub mod gpt_neox;
pub mod mistral;
pub mod ops;
pub mod output;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{
    backprop::GradStore, safetensors::MmapedSafetensors, DType, Device, Shape, Tensor, Var,
};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};
use output::OutputLayer;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A causal LM as the trainer sees it.
pub trait CausalLm: Send + Sync {
    /// Hidden states after the final norm for every position: `[b, t]` ids → `[b, t, hidden]`.
    fn forward_hidden(&self, input_ids: &Tensor) -> candle_core::Result<Tensor>;
    /// The output layer (`lm_head`), which maps hidden states to vocabulary logits.
    fn output_layer(&self) -> OutputLayer;
    /// Incremental decoding: hidden states `[b, t, hidden]` of `input_ids` `[b, t]` that follow
    /// the tokens already in `cache` (whose keys and values this appends). `attention_mask` is
    /// `[b, past + t]`, 1 for real tokens and 0 for left padding; positions count real tokens
    /// only, so each row of a padded batch gives what it gives alone.
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut cache::KvCache,
    ) -> candle_core::Result<Tensor>;
    /// Activation checkpointing of [`CausalLm::forward_hidden`]'s blocks, collecting weight
    /// gradients in `sink` ([`checkpoint`]); `None` turns it off.
    fn set_checkpointing(&mut self, sink: Option<checkpoint::GradSink>);
}

/// A named trainable tensor.
#[derive(Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// f32 master weights under bf16 mixed precision: the optimiser updates these, because
    /// small updates vanish when added to bf16 weights, and copies them into `var`.
    pub master: Option<Var>,
}

/// Where a model comes from.
pub enum ModelSource {
    /// Random weights from `seed` for a `config.json`: the built-in tiny GPT-2, or
    /// `random:PATH` (a config.json or a directory holding one), e.g. for benchmarks.
    Random {
        config: serde_json::Value,
        seed: u64,
        dir: Option<PathBuf>,
    },
    /// A Hugging Face-format directory: `config.json` plus safetensors weights.
    Dir(PathBuf),
}

impl ModelSource {
    /// Resolves a `name_or_path`: `builtin:tiny-gpt2`, `random:PATH`, a local directory, or a Hub repo id
    /// (downloaded into the Hugging Face cache).
    pub fn resolve(spec: &str, builtin: &crate::config::BuiltinModel, seed: u64) -> Result<Self> {
        if let Some(name) = spec.strip_prefix("builtin:") {
            if name != "tiny-gpt2" {
                bail!("unknown built-in model `{spec}`; the only one is `builtin:tiny-gpt2`");
            }
            let vocab = crate::tokenizer::Tok::builtin()?.vocab_size();
            let config = serde_json::to_value(gpt2::Config::tiny(builtin, vocab))?;
            return Ok(ModelSource::Random {
                config,
                seed,
                dir: None,
            });
        }
        if let Some(path) = spec.strip_prefix("random:") {
            let path = Path::new(path);
            let (file, dir) = if path.is_dir() {
                (path.join("config.json"), Some(path.to_path_buf()))
            } else {
                (path.to_path_buf(), None)
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let config = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", file.display()))?;
            return Ok(ModelSource::Random { config, seed, dir });
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        if crate::hub::looks_like_repo_id(spec) {
            let repo = crate::hub::HubRepo::model(spec);
            let config = repo.get("config.json")?;
            for weights in weight_files_in_hub(&repo)? {
                repo.get(&weights)?;
            }
            for optional in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                repo.get_optional(optional);
            }
            let dir = config
                .parent()
                .expect("a cached file has a parent")
                .to_path_buf();
            return Ok(ModelSource::Dir(dir));
        }
        bail!("model `{spec}`: not `builtin:tiny-gpt2`, not a directory, and not a Hub repo id (`org/name`)")
    }

    /// The directory holding the model's files, if any.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelSource::Dir(dir) => Some(dir),
            ModelSource::Random { dir, .. } => dir.as_deref(),
        }
    }

    /// The model's tokenizer: its directory's `tokenizer.json`, else the built-in one.
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tok> {
        match self.dir() {
            Some(dir) if dir.join("tokenizer.json").is_file() => {
                crate::tokenizer::Tok::from_dir(dir)
            }
            _ => crate::tokenizer::Tok::builtin(),
        }
    }

    /// The model's `config.json` as a JSON value (generated for the built-in model).
    pub fn config_json(&self) -> Result<serde_json::Value> {
        match self {
            ModelSource::Random { config, .. } => Ok(config.clone()),
            ModelSource::Dir(dir) => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{}: invalid JSON", path.display()))
            }
        }
    }
}

fn weight_files_in_hub(repo: &crate::hub::HubRepo) -> Result<Vec<String>> {
    if let Some(index) = repo.get_optional("model.safetensors.index.json") {
        return Ok(shard_names(&index)?.into_iter().collect());
    }
    Ok(vec!["model.safetensors".to_string()])
}

/// Shard file names listed by a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> Result<std::collections::BTreeSet<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: expected a `weight_map` object", index.display()))?;
    map.values()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{}: weight_map values must be file names", index.display()))
        })
        .collect()
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(shard_names(&index)?
            .into_iter()
            .map(|n| dir.join(n))
            .collect());
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json (only safetensors weights are supported)",
        dir.display()
    )
}

/// A built model with its trainable parameters (empty when loaded frozen).
pub struct Model {
    pub net: Box<dyn CausalLm>,
    pub params: Vec<Param>,
    pub config_json: serde_json::Value,
    /// Set while activation checkpointing is on: where the blocks' weight gradients wait for
    /// [`Model::backward`].
    grad_sink: Option<checkpoint::GradSink>,
}

impl Model {
    /// Builds the architecture named by `config.json`'s `model_type`. With `trainable`, every
    /// weight becomes a [`Var`]; otherwise weights are plain tensors and record no graph.
    pub fn load(
        source: &ModelSource,
        trainable: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Model> {
        let config_json = source.config_json()?;
        let (weights, origin) = match source {
            ModelSource::Random { seed, .. } => {
                (Weights::Seeded(*seed), "random initialisation".to_string())
            }
            ModelSource::Dir(dir) => {
                let files = weight_files(dir)?;
                for f in &files {
                    if !f.is_file() {
                        bail!("{}: weight file missing", f.display());
                    }
                }
                // SAFETY: the files are only read; memory-mapping avoids holding a second copy.
                let st = unsafe { MmapedSafetensors::multi(&files) }
                    .with_context(|| format!("cannot read safetensors in {}", dir.display()))?;
                (Weights::Files(st), dir.display().to_string())
            }
        };
        let loader = Loader {
            weights,
            trainable,
            origin,
            params: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
        };
        let net = build_net(
            &config_json,
            VarBuilder::from_backend(Box::new(&loader), dtype, device.clone()),
        )
        .map_err(|e| anyhow!("loading weights from {}: {e:#}", loader.origin))?;
        let params = loader.params.into_inner().expect("loader lock poisoned");
        Ok(Model {
            net,
            params,
            config_json,
            grad_sink: None,
        })
    }

    /// The current weights by Hugging Face name (tied weights appear once); the f32 masters
    /// under mixed precision.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.master.as_ref().unwrap_or(&p.var).as_tensor().clone(),
                )
            })
            .collect()
    }

    /// Mixed precision: the same trainable model computing in `compute` dtype, with the current
    /// weights kept as f32 masters.
    pub fn with_master_weights(self, compute: DType, device: &Device) -> Result<Model> {
        let masters: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let loader = Loader {
            weights: Weights::Tensors(masters.clone()),
            trainable: true,
            origin: "master weights".into(),
            params: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
        };
        let net = build_net(
            &self.config_json,
            VarBuilder::from_backend(Box::new(&loader), compute, device.clone()),
        )?;
        let mut params = loader.params.into_inner().expect("loader lock poisoned");
        for p in &mut params {
            p.master = Some(Var::from_tensor(&masters[&p.name])?);
        }
        let mut model = Model {
            net,
            params,
            config_json: self.config_json,
            grad_sink: None,
        };
        model.set_gradient_checkpointing(self.grad_sink.is_some());
        Ok(model)
    }

    /// A frozen copy of the current weights (for the reference model): same values, no graph.
    pub fn frozen_copy(&self, device: &Device) -> Result<Model> {
        let dtype = self
            .params
            .first()
            .map(|p| p.var.dtype())
            .unwrap_or(DType::F32);
        let tensors = self
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().detach().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let loader = Loader {
            weights: Weights::Tensors(tensors),
            trainable: false,
            origin: "policy copy".into(),
            params: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
        };
        let net = build_net(
            &self.config_json,
            VarBuilder::from_backend(Box::new(&loader), dtype, device.clone()),
        )?;
        Ok(Model {
            net,
            params: Vec::new(),
            config_json: self.config_json.clone(),
            grad_sink: None,
        })
    }

    /// Turns activation checkpointing per block on or off (`training.gradient_checkpointing`);
    /// it needs trainable weights, and gradients must then come from [`Model::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.grad_sink = (on && !self.params.is_empty())
            .then(|| checkpoint::GradSink::new(self.params.iter().map(|p| p.var.id())));
        self.net.set_checkpointing(self.grad_sink.clone());
    }

    /// The gradients of `loss`: `loss.backward()`, plus, under checkpointing, the block
    /// weights' gradients that the recomputations collected.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        let Some(sink) = &self.grad_sink else {
            return loss.backward();
        };
        // Leftovers of a backward that failed half-way must not leak into this one.
        sink.drain();
        let mut grads = loss.backward()?;
        let mut collected = sink.drain();
        for p in &self.params {
            if let Some(g) = collected.remove(&p.var.id()) {
                let sum = match grads.get(p.var.as_tensor()) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                grads.insert(p.var.as_tensor(), sum);
            }
        }
        Ok(grads)
    }
}

/// The weights a `config.json` implies, by name and shape, without allocating them (tied
/// weights appear once): what `--dry-run` counts.
pub fn param_shapes(config_json: &serde_json::Value) -> Result<Vec<(String, Vec<usize>)>> {
    let loader = Loader {
        weights: Weights::Shapes,
        trainable: false,
        origin: "config.json".into(),
        params: Mutex::new(Vec::new()),
        seen: Mutex::new(HashMap::new()),
    };
    build_net(
        config_json,
        VarBuilder::from_backend(Box::new(&loader), DType::F32, Device::Cpu),
    )?;
    let seen = loader.seen.into_inner().expect("loader lock poisoned");
    let mut shapes: Vec<(String, Vec<usize>)> = seen
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    shapes.sort();
    Ok(shapes)
}

/// Builds the architecture that `config.json`'s `model_type` names.
fn build_net(config_json: &serde_json::Value, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let model_type = config_json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    Ok(match model_type {
        "gpt2" => {
            let cfg: gpt2::Config = serde_json::from_value(config_json.clone())
                .context("config.json does not describe a GPT-2 model")?;
            Box::new(gpt2::Gpt2::new(&cfg, vb)?)
        }
        "gpt_neox" => {
            let cfg: gpt_neox::Config = serde_json::from_value(config_json.clone())
                .context("config.json does not describe a GPT-NeoX model")?;
            Box::new(gpt_neox::GptNeox::new(&cfg, vb)?)
        }
        "mistral" | "llama" => {
            let cfg: mistral::Config = serde_json::from_value(config_json.clone())
                .with_context(|| format!("config.json does not describe a {model_type} model"))?;
            Box::new(mistral::Mistral::new(&cfg, vb)?)
        }
        other => bail!(
            "unsupported model_type `{other}` in config.json; supported: {}",
            SUPPORTED.join(", ")
        ),
    })
}

/// `model_type` values this project can build.
pub const SUPPORTED: &[&str] = &["gpt2", "gpt_neox", "llama", "mistral"];

enum Weights {
    /// No data: zero-stride placeholders of the right shape, for counting parameters.
    Shapes,
    Seeded(u64),
    Files(MmapedSafetensors),
    Tensors(HashMap<String, Tensor>),
}

/// A VarBuilder backend that reads (or initialises) each weight once, converts it to the
/// training dtype, and, when trainable, wraps it in a Var recorded under its HF name.
struct Loader {
    weights: Weights,
    trainable: bool,
    origin: String,
    params: Mutex<Vec<Param>>,
    seen: Mutex<HashMap<String, Tensor>>,
}

impl Loader {
    fn fetch(
        &self,
        shape: Option<&Shape>,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(t) = self.seen.lock().expect("loader lock").get(name) {
            return Ok(t.clone());
        }
        let raw = match &self.weights {
            Weights::Shapes => {
                let shape = shape
                    .ok_or_else(|| candle_core::Error::Msg(format!("no shape for `{name}`")))?;
                Tensor::zeros((), DType::F32, dev)?.broadcast_as(shape.clone())?
            }
            Weights::Seeded(seed) => {
                let shape = shape
                    .ok_or_else(|| candle_core::Error::Msg(format!("no shape for `{name}`")))?;
                seeded_init(*seed, name, shape, init, dev)?
            }
            Weights::Files(st) => st.load(name, dev).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "tensor `{name}` is missing from the safetensors files"
                ))
            })?,
            Weights::Tensors(map) => map
                .get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` is missing")))?,
        };
        if let Some(shape) = shape {
            if raw.shape() != shape {
                return Err(candle_core::Error::Msg(format!(
                    "tensor `{name}` has shape {:?} but config.json implies {:?}",
                    raw.dims(),
                    shape.dims()
                )));
            }
        }
        let mut tensor = raw.to_dtype(dtype)?;
        if self.trainable {
            let var = Var::from_tensor(&tensor)?;
            tensor = var.as_tensor().clone();
            self.params.lock().expect("loader lock").push(Param {
                name: name.to_string(),
                var,
                master: None,
            });
        }
        self.seen
            .lock()
            .expect("loader lock")
            .insert(name.to_string(), tensor.clone());
        Ok(tensor)
    }
}

impl SimpleBackend for &Loader {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(Some(&s), name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(None, name, Init::Const(0.0), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.weights {
            Weights::Seeded(_) | Weights::Shapes => true,
            Weights::Files(st) => st.get(name).is_ok(),
            Weights::Tensors(map) => map.contains_key(name),
        }
    }
}

/// Deterministic initialisation from (seed, tensor name), independent of creation order: on the
/// CPU from a ChaCha stream, on CUDA from the device's own stream (other values, same seed).
fn seeded_init(
    seed: u64,
    name: &str,
    shape: &Shape,
    init: Init,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let data: Vec<f32> = match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => {
            // FNV-1a keeps the per-tensor stream stable across runs and platforms.
            let h = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
            // On a GPU, drawn there from a stream of its own (kernels::init): the host stream
            // below takes a minute or more for billions of weights.
            if let Some(t) =
                crate::kernels::init::randn_on_device(seed ^ h, shape, mean, stdev, dev)?
            {
                return Ok(t);
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h);
            (0..n)
                .map(|_| {
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random();
                    (mean
                        + stdev * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                        as f32
                })
                .collect()
        }
        other => {
            return Err(candle_core::Error::Msg(format!(
                "unsupported init {other:?} for `{name}`"
            )))
        }
    };
    Tensor::from_vec(data, shape.clone(), dev)
}
