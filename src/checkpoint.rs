//! Saving models in Hugging Face format (`config.json`, `model.safetensors`, tokenizer files),
//! so that `transformers` and candle-transformers load what `dpo-sam` writes; and training
//! checkpoints that a run resumes from bit for bit.
//!
//! A checkpoint is `output_dir/checkpoint-<step>/` with the model, `optimizer.safetensors`
//! (AdamW's moments by parameter name, and the step), `trainer_state.json` (step, data
//! position, metrics lines, schedule, skip counts) and `config.toml` (the resolved config).
//! Everything is written into `checkpoint-<step>.tmp/`, synced, then `manifest.json` (sizes
//! and SHA-256 of every other file) is written last and the directory renamed into place: a
//! directory whose manifest is missing or does not match its files is incomplete and is
//! never resumed from, so a crash or a full disk at any point leaves the previous checkpoint
//! as the newest good one.

use crate::config::Config;
use crate::data::DataCursor;
use crate::models::Model;
use crate::optim::{Optimizer, Schedule};
use crate::tokenizer::Tok;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How models are written: weight dtype and shard size (`training.save_dtype`,
/// `training.max_shard_size`).
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions {
    /// `None` keeps each weight's own dtype (f32 masters under mixed precision).
    pub dtype: Option<DType>,
    pub max_shard_size: u64,
}

/// Writes the model's current weights (HF tensor names, tied weights once) in the chosen dtype,
/// as `model.safetensors` or, above `max_shard_size`, as `model-0000i-of-0000n.safetensors`
/// shards with `model.safetensors.index.json` (the layout `save_pretrained` writes); its
/// `config.json` with `torch_dtype` set to match; and the tokenizer. Each file goes to a
/// temporary name first and is renamed into place, so an interrupted save never leaves a
/// truncated file under a final name; weight files of an earlier save in `dir` that the new
/// layout does not use are removed last, so that loaders never mix the two.
pub fn save_model(model: &Model, tok: &Tok, dir: &Path, opts: &SaveOptions) -> Result<()> {
    save_weights(model, dir, opts)?;
    tok.save(dir)
}

/// [`save_model`] without the tokenizer: weights, index and `config.json`.
pub fn save_weights(model: &Model, dir: &Path, opts: &SaveOptions) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let weights: Vec<(&str, &Tensor)> = model
        .params
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.master.as_ref().unwrap_or(&p.var).as_tensor(),
            )
        })
        .collect();
    let saved_dtype = |t: &Tensor| opts.dtype.unwrap_or(t.dtype());
    // Greedy in parameter order, like `transformers`: a shard closes when the next tensor would
    // overflow it; a tensor larger than the limit gets a shard of its own.
    let mut shards: Vec<Vec<(&str, &Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for &(name, t) in &weights {
        let bytes = (t.elem_count() * saved_dtype(t).size_in_bytes()) as u64;
        if size > 0 && size + bytes > opts.max_shard_size {
            shards.push(Vec::new());
            size = 0;
        }
        shards
            .last_mut()
            .expect("one shard at least")
            .push((name, t));
        size += bytes;
        total += bytes;
    }
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            MODEL.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = file_name(i);
        // One shard converted at a time: a bf16 save of f32 weights holds one shard's copy.
        let tensors = shard
            .iter()
            .map(|&(k, t)| Ok((k.to_string(), t.to_dtype(saved_dtype(t))?)))
            .collect::<Result<HashMap<String, Tensor>>>()?;
        let tmp = dir.join(format!("{name}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(&name))
            .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        weight_map.extend(shard.iter().map(|&(k, _)| (k.to_string(), name.clone())));
    }
    let mut keep: Vec<String> = (0..n).map(file_name).collect();
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_renamed(
            &dir.join(INDEX),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
        keep.push(INDEX.to_string());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let weights_file =
            name == INDEX || (name.starts_with("model") && name.ends_with(".safetensors"));
        if weights_file && !keep.contains(&name) {
            let stale = dir.join(&name);
            std::fs::remove_file(&stale)
                .with_context(|| format!("cannot remove stale {}", stale.display()))?;
        }
    }

    let mut config = model.config_json.clone();
    if let (Some(obj), Some(d)) = (config.as_object_mut(), weights.first()) {
        let key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.into(), torch_dtype_name(saved_dtype(d.1)).into());
    }
    write_renamed(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// `transformers`' name of a dtype, as `config.json`'s `torch_dtype` holds it.
fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Writes `path` through a temporary name.
fn write_renamed(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))
}

/// `trainer_state.json`: everything besides tensors that the loop needs to continue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps completed (skipped non-finite steps included).
    pub step: usize,
    /// Epoch and position in that epoch's permutation. The permutation is a pure function of
    /// (seed, epoch), and nothing else in the loop draws random numbers, so this is the whole
    /// RNG state.
    pub data: DataCursor,
    /// Lines of `metrics.jsonl` written up to this step; a resumed run cuts the file here.
    pub metrics_lines: usize,
    /// Steps skipped for a non-finite loss or gradient norm (`training.skip_nonfinite`).
    pub nonfinite_skipped: usize,
    /// Training tokens (prompt and responses, both rows of each pair, no padding) seen so far:
    /// TRL's cumulative `num_tokens` metric.
    #[serde(default)]
    pub num_tokens: usize,
    /// The learning-rate schedule in force (recomputed from the config on resume; recorded so
    /// that a reader of the checkpoint sees it).
    pub schedule: Schedule,
}

/// What a checkpoint holds: the policy (with its f32 masters), its tokenizer, the optimiser's
/// state, the loop's state and the resolved config.
pub struct Snapshot<'a> {
    pub model: &'a Model,
    pub tok: &'a Tok,
    pub optimizer: &'a Optimizer,
    pub state: &'a TrainerState,
    pub config: &'a Config,
}

/// `manifest.json`: written last, so its presence and agreement with the files is what makes a
/// checkpoint complete.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: usize,
    files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileEntry {
    size: u64,
    sha256: String,
}

const MANIFEST: &str = "manifest.json";
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";
const CONFIG: &str = "config.toml";
const MODEL: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Full-precision weights, written only when `save_dtype` rounds the model's weights, so that
/// resuming stays exact.
const EXACT_WEIGHTS: &str = "exact_weights.safetensors";

/// The directory name of the checkpoint after `step` optimiser steps.
pub fn dir_name(step: usize) -> String {
    format!("checkpoint-{step}")
}

/// Saves `snap` at its step under `out_dir` with the model written as `opts` says, then deletes
/// the oldest complete checkpoints beyond the newest `keep` (`training.save_total_limit`).
/// Returns the checkpoint directory.
pub fn save(
    snap: &Snapshot,
    out_dir: &Path,
    opts: &SaveOptions,
    keep: Option<usize>,
) -> Result<PathBuf> {
    let step = snap.state.step;
    let final_dir = out_dir.join(dir_name(step));
    let tmp = out_dir.join(format!("{}.tmp", dir_name(step)));
    let written = write_tmp(snap, opts, &tmp).and_then(|()| {
        // A complete checkpoint of the same step exists when a run resumed from an earlier one
        // reaches this step again; it is replaced only once the new one is whole.
        let old = out_dir.join(format!("{}.old", dir_name(step)));
        if final_dir.exists() {
            remove_path(&old)?;
            std::fs::rename(&final_dir, &old)
                .with_context(|| format!("cannot move aside {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp, &final_dir).with_context(|| {
            format!("cannot rename {} to {}", tmp.display(), final_dir.display())
        })?;
        sync_dir(out_dir)?;
        remove_path(&old)
    });
    if let Err(e) = written {
        // Best effort: the error that matters is the one being returned.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "saving checkpoint at step {step} in {} failed; earlier checkpoints are untouched",
            out_dir.display()
        )));
    }
    if let Some(limit) = keep {
        let (complete, _) = list(out_dir)?;
        for (_, old) in complete.iter().rev().skip(limit) {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("cannot delete old checkpoint {}", old.display()))?;
        }
    }
    Ok(final_dir)
}

fn write_tmp(snap: &Snapshot, opts: &SaveOptions, tmp: &Path) -> Result<()> {
    remove_path(tmp)?;
    std::fs::create_dir_all(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_model(snap.model, snap.tok, tmp, opts)?;
    let rounded: HashMap<String, Tensor> = snap
        .model
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.master.as_ref().unwrap_or(&p.var).as_tensor(),
            )
        })
        .filter(|(_, t)| opts.dtype.is_some_and(|d| d != t.dtype()))
        .map(|(k, t)| (k, t.clone()))
        .collect();
    if !rounded.is_empty() {
        let path = tmp.join(EXACT_WEIGHTS);
        candle_core::safetensors::save(&rounded, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let opt = tmp.join(OPTIMIZER);
    candle_core::safetensors::save(&snap.optimizer.state_tensors(&snap.model.params)?, &opt)
        .with_context(|| format!("cannot write {}", opt.display()))?;
    write_file(
        &tmp.join(STATE),
        serde_json::to_string_pretty(snap.state)?.as_bytes(),
    )?;
    let config = toml::to_string(snap.config).context("cannot serialise the config")?;
    write_file(&tmp.join(CONFIG), config.as_bytes())?;

    let mut files = BTreeMap::new();
    let mut names: Vec<String> = std::fs::read_dir(tmp)
        .with_context(|| format!("cannot list {}", tmp.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = tmp.join(&name);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", path.display()))?;
        files.insert(name, hash_file(&path)?);
    }
    let manifest = Manifest {
        step: snap.state.step,
        files,
    };
    write_file(
        &tmp.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    sync_dir(tmp)
}

/// Writes and fsyncs one file.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

fn remove_path(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        return Ok(());
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}

fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let size = std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let sha256 = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileEntry { size, sha256 })
}

/// Checks a checkpoint directory against its manifest: every listed file present with the
/// recorded size and checksum. The error says what is missing or wrong.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no manifest.json (the save did not finish)",
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{}: manifest is not valid JSON", path.display()))?;
    if !manifest.files.contains_key(MODEL) && !manifest.files.contains_key(INDEX) {
        bail!("{}: manifest lists no {MODEL} or {INDEX}", path.display());
    }
    for required in [OPTIMIZER, STATE, CONFIG] {
        if !manifest.files.contains_key(required) {
            bail!("{}: manifest does not list {required}", path.display());
        }
    }
    for (name, want) in &manifest.files {
        let file = dir.join(name);
        let size = std::fs::metadata(&file)
            .map(|m| m.len())
            .map_err(|_| anyhow!("{}: missing", file.display()))?;
        if size != want.size {
            bail!(
                "{}: {size} bytes, manifest says {}",
                file.display(),
                want.size
            );
        }
        if hash_file(&file)?.sha256 != want.sha256 {
            bail!("{}: checksum does not match the manifest", file.display());
        }
    }
    Ok(())
}

/// The complete checkpoints of a directory as (step, path), and the incomplete ones' paths.
pub type Listing = (Vec<(usize, PathBuf)>, Vec<PathBuf>);

/// Checkpoints under `out_dir` by step, oldest first: the complete ones (manifest present;
/// checksums are checked by [`latest`]), and the paths of incomplete ones (`.tmp` leftovers,
/// directories without a manifest).
pub fn list(out_dir: &Path) -> Result<Listing> {
    let mut complete = Vec::new();
    let mut incomplete = Vec::new();
    let entries =
        std::fs::read_dir(out_dir).with_context(|| format!("cannot list {}", out_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix("checkpoint-") else {
            continue;
        };
        match rest.parse::<usize>() {
            Ok(step) if path.join(MANIFEST).is_file() => complete.push((step, path)),
            _ if path.is_dir() => incomplete.push(path),
            _ => {}
        }
    }
    complete.sort();
    incomplete.sort();
    Ok((complete, incomplete))
}

/// The newest checkpoint under `out_dir` that passes [`verify`]; every incomplete or corrupt
/// one newer than it is named in a warning on stderr.
pub fn latest(out_dir: &Path) -> Result<PathBuf> {
    if !out_dir.is_dir() {
        bail!("--resume: {} is not a directory", out_dir.display());
    }
    let (complete, incomplete) = list(out_dir)?;
    for path in &incomplete {
        eprintln!(
            "warning: ignoring incomplete checkpoint {} (no manifest; an interrupted save)",
            path.display()
        );
    }
    for (_, path) in complete.iter().rev() {
        match verify(path) {
            Ok(()) => return Ok(path.clone()),
            Err(e) => eprintln!("warning: ignoring checkpoint {}: {e:#}", path.display()),
        }
    }
    bail!(
        "--resume: no complete checkpoint (checkpoint-<step>/ with a valid manifest.json) in {}",
        out_dir.display()
    )
}

/// The resolved config a checkpoint was saved with.
pub fn load_config(dir: &Path) -> Result<Config> {
    let path = dir.join(CONFIG);
    Config::load(&path, &[])
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", path.display()))
}

/// Config keys that may change between a run and its resumption: where output goes, what is
/// logged, evaluated and saved, the device, the non-finite guard, activation checkpointing
/// (same gradients), and data parallelism's timeout and bucket size. Every other key changes
/// the sequence of updates (data, model, loss, optimiser, schedule via `max_steps`, seed). The
/// number of ranks is not a key: a run resumes on any.
pub const DRIFT_ALLOWED: &[&str] = &[
    "output_dir",
    "device",
    "training.logging_steps",
    "training.eval_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.skip_nonfinite",
    "training.gradient_checkpointing",
    "training.ddp_timeout",
    "training.ddp_bucket_cap_mb",
];

/// Keys whose values differ between the saved and the current config and that affect the
/// trajectory, as `key: saved -> now` lines.
pub fn config_drift(saved: &Config, now: &Config) -> Result<Vec<String>> {
    Ok(saved
        .differences(now)?
        .into_iter()
        .filter(|(key, _)| !DRIFT_ALLOWED.contains(&key.as_str()))
        .map(|(_, line)| line)
        .collect())
}

/// Loads a verified checkpoint's weights into `model` (and its f32 masters) and its moments and
/// step into `optimizer`; returns the loop's state for the caller to continue from.
pub fn restore(
    dir: &Path,
    model: &Model,
    optimizer: &mut Optimizer,
    device: &Device,
) -> Result<TrainerState> {
    let state = load_state(dir)?;
    let mut weights = HashMap::new();
    let mut from = HashMap::new();
    let exact = dir.join(EXACT_WEIGHTS);
    let files = crate::models::weight_files(dir)?;
    // Exact weights last: they replace the rounded copies of the same tensors.
    for path in files.iter().chain(exact.is_file().then_some(&exact)) {
        let loaded = candle_core::safetensors::load(path, device)
            .with_context(|| format!("cannot read {}", path.display()))?;
        from.extend(loaded.keys().map(|k| (k.clone(), path.clone())));
        weights.extend(loaded);
    }
    for p in &model.params {
        let t = weights.get(&p.name).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{}` is missing from the model weights",
                dir.display(),
                p.name
            )
        })?;
        let model_path = &from[&p.name];
        if t.dims() != p.var.dims() {
            bail!(
                "{}: tensor `{}` has shape {:?}, the model expects {:?}",
                model_path.display(),
                p.name,
                t.dims(),
                p.var.dims()
            );
        }
        if !t.dtype().is_float() {
            bail!(
                "{}: tensor `{}` has dtype {:?}, expected a float dtype",
                model_path.display(),
                p.name,
                t.dtype()
            );
        }
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
        if let Some(master) = &p.master {
            master.set(&t.to_dtype(master.dtype())?)?;
        }
    }
    let opt_path = dir.join(OPTIMIZER);
    let tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(&opt_path, device)
            .with_context(|| format!("cannot read {}", opt_path.display()))?;
    optimizer
        .load_state(&model.params, &tensors)
        .with_context(|| format!("{}", opt_path.display()))?;
    Ok(state)
}
