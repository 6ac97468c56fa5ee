//! Per-pair values computed once before training and cached on disk:
//!
//! - reference log-probs (TRL's `precompute_ref_log_probs`): the frozen reference is run once
//!   over the training and eval pairs, and the trainer frees the reference model;
//! - CHES scores of the training pairs under the starting policy (`data.filter_ches_quantile`),
//!   so that a resumed run filters the same pairs without another pass.
//!
//! A cache file (`ref_logps-<fingerprint>.safetensors`, `ches-<fingerprint>.safetensors`) holds
//! f64 vectors in pair order and, in its header, its format and the [`Fingerprint`]: the list of
//! what the values depend on — the model's files (or its random-init config and seed), the
//! dtype it computes in, mixed precision, the device kind, the tokenizer, the truncation
//! settings and every tokenised pair — and its SHA-256. A file made for other inputs, or whose
//! lengths differ from the data, is reported with what differs and recomputed, never used.

use crate::config::MixedPrecision;
use crate::data::batch::{PreferenceBatch, TokenizedPair, Truncation};
use crate::data::ches::Ches;
use crate::data::Split;
use crate::dist::Collective;
use crate::logps::pair_logps;
use crate::models::{Model, ModelSource};
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Header key naming the file's format, so that other safetensors files are never mistaken for
/// a cache.
pub const FORMAT: &str = "dpo-sam ref_logps v2";
/// The same for CHES scores.
pub const CHES_FORMAT: &str = "dpo-sam ches v2";

/// One kind of cache: its file stem (`<stem>-<fingerprint>.safetensors`, kept out of Hub
/// uploads by `upload::left_out`), header format, and what it holds, for messages.
#[derive(Clone, Copy)]
struct Kind {
    stem: &'static str,
    format: &'static str,
    what: &'static str,
}

const REFERENCE: Kind = Kind {
    stem: "ref_logps",
    format: FORMAT,
    what: "reference log-probs",
};
const CHES: Kind = Kind {
    stem: "ches",
    format: CHES_FORMAT,
    what: "CHES scores",
};

/// Per-pair reference log-probs, indexed like the trainer's training and eval pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLogps {
    pub fingerprint: Fingerprint,
    pub train_chosen: Vec<f64>,
    pub train_rejected: Vec<f64>,
    pub eval_chosen: Vec<f64>,
    pub eval_rejected: Vec<f64>,
}

impl RefLogps {
    /// (chosen, rejected) `[idx.len()]` for the given pair indices, in `dtype` on `device`.
    pub fn get(
        &self,
        split: Split,
        idx: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (chosen, rejected) = match split {
            Split::Train => (&self.train_chosen, &self.train_rejected),
            Split::Eval => (&self.eval_chosen, &self.eval_rejected),
        };
        let pick = |v: &[f64]| -> Result<Tensor> {
            let vals = idx
                .iter()
                .map(|&i| {
                    v.get(i).copied().with_context(|| {
                        format!(
                            "pair {i} is not in the reference cache ({split:?}: {} pairs)",
                            v.len()
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            Ok(Tensor::new(vals.as_slice(), device)?.to_dtype(dtype)?)
        };
        Ok((pick(chosen)?, pick(rejected)?))
    }
}

/// What the cached values depend on.
pub struct FingerprintInputs<'a> {
    /// The model that computes them: the reference, or the starting policy for CHES.
    pub model: &'a ModelSource,
    /// The dtype it computes in: `model.dtype`, or bf16 under mixed precision.
    pub dtype: DType,
    pub mixed_precision: MixedPrecision,
    /// Its kind only (`cpu`, `cuda`): the kernels, and so the rounding, differ between kinds,
    /// not between two GPUs of one kind.
    pub device: &'a Device,
    pub tok: &'a Tok,
    pub truncation: &'a Truncation,
    pub train: &'a [TokenizedPair],
    pub eval: &'a [TokenizedPair],
}

/// The identity of a cache: a readable list of everything its values depend on
/// (large inputs by their SHA-256), kept in the cache's header so that a mismatch can say what
/// changed, and the SHA-256 of that list, which names the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub hash: String,
    pub inputs: Vec<(String, String)>,
}

impl Fingerprint {
    /// The fingerprint of `inputs` for a cache in `format`.
    pub fn new(format: &str, inputs: &FingerprintInputs) -> Result<Fingerprint> {
        let mut list = vec![("format".to_string(), format.to_string())];
        let mut add = |key: &str, value: String| list.push((key.to_string(), value));
        describe_source(&mut add, inputs.model)?;
        add("dtype", inputs.dtype.as_str().into());
        add("mixed_precision", inputs.mixed_precision.to_string());
        add(
            "device",
            match inputs.device {
                Device::Cpu => "cpu",
                Device::Cuda(_) => "cuda",
                Device::Metal(_) => "metal",
            }
            .into(),
        );
        let tok = inputs.tok;
        let tokenizer = tok
            .inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
        add("tokenizer", digest(&[tokenizer.as_bytes()]));
        add(
            "special ids",
            format!("eos {}, pad {}", tok.eos_id, tok.pad_id),
        );
        let t = inputs.truncation;
        add(
            "truncation",
            format!(
                "max_length {}, max_prompt_length {:?}, {}",
                t.max_length, t.max_prompt_length, t.mode
            ),
        );
        for (name, pairs) in [("train pairs", inputs.train), ("eval pairs", inputs.eval)] {
            add(
                name,
                format!("{} pairs, {}", pairs.len(), pairs_digest(pairs)),
            );
        }
        Ok(Fingerprint::from_inputs(list))
    }

    /// The fingerprint of a list of inputs (as [`Fingerprint::new`] makes it, and rank 0 sends
    /// it to the other ranks).
    pub fn from_inputs(inputs: Vec<(String, String)>) -> Fingerprint {
        let mut h = Sha256::new();
        for (key, value) in &inputs {
            // Length-prefixed, so that moving bytes between fields changes the hash.
            for part in [key, value] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        Fingerprint {
            hash: hex(&h.finalize()),
            inputs,
        }
    }

    /// What changed from `cached` (the inputs a cache was made for) to these, one
    /// `key: cached -> current` per difference.
    pub fn changes_from(&self, cached: &[(String, String)]) -> Vec<String> {
        let find = |list: &[(String, String)], key: &str| {
            list.iter()
                .find(|(k, _)| k == key)
                .map_or("(none)".to_string(), |(_, v)| v.clone())
        };
        let mut keys: Vec<&str> = self.inputs.iter().map(|(k, _)| k.as_str()).collect();
        keys.extend(cached.iter().map(|(k, _)| k.as_str()));
        let mut seen = std::collections::HashSet::new();
        keys.into_iter()
            .filter(|k| seen.insert(*k))
            .filter_map(|k| {
                let (was, now) = (find(cached, k), find(&self.inputs, k));
                (was != now).then(|| format!("{k}: {was} -> {now}"))
            })
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:` and the first 16 hex digits of the SHA-256 of `parts`, each length-prefixed.
fn digest(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    short(&h.finalize())
}

fn short(hash: &[u8]) -> String {
    format!("sha256:{}", &hex(hash)[..16])
}

/// The tokenised pairs: each sequence's prompt length and token ids.
fn pairs_digest(pairs: &[TokenizedPair]) -> String {
    let mut h = Sha256::new();
    for p in pairs {
        for seq in [&p.chosen, &p.rejected] {
            h.update((seq.prompt_len as u64).to_le_bytes());
            h.update((seq.ids.len() as u64).to_le_bytes());
            for id in &seq.ids {
                h.update(id.to_le_bytes());
            }
        }
    }
    short(&h.finalize())
}

/// The model's weights: its files' digest, or its random-init config and seed; an
/// adapter's files after its base's.
fn describe_source(add: &mut impl FnMut(&str, String), source: &ModelSource) -> Result<()> {
    match source {
        ModelSource::Random { config, seed, .. } => {
            add("model", format!("random initialisation, seed {seed}"));
            add(
                "model config.json",
                digest(&[config.to_string().as_bytes()]),
            );
        }
        ModelSource::Dir(dir) => {
            add("model", "weights from a directory".into());
            add(
                "model config.json",
                digest(&[&read(&dir.join("config.json"))?]),
            );
            add(
                "model weights",
                files_digest(&crate::models::weight_files(dir)?)?,
            );
        }
        ModelSource::Adapted { base, adapter } => {
            describe_source(add, base)?;
            let config = adapter.join(crate::models::lora::CONFIG_FILE);
            add("model adapter_config.json", digest(&[&read(&config)?]));
            add(
                "model adapter weights",
                files_digest(&[adapter.join(crate::models::lora::WEIGHTS_FILE)])?,
            );
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The weight files' bytes, streamed (they may be many GB). Remembered for files unchanged
/// since (same size and modification time): a run fingerprints its model for the CHES scores
/// and again for the reference log-probs, and would otherwise read every weight twice.
fn files_digest(files: &[PathBuf]) -> Result<String> {
    type Stamp = Vec<(PathBuf, u64, std::time::SystemTime)>;
    static SEEN: std::sync::Mutex<Vec<(Stamp, String)>> = std::sync::Mutex::new(Vec::new());
    let stamp = files
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Ok((path.clone(), meta.len(), meta.modified()?))
        })
        .collect::<Result<Stamp>>()?;
    let seen = |stamp: &Stamp| {
        let list = SEEN.lock().expect("digest memo lock");
        list.iter()
            .find(|(s, _)| s == stamp)
            .map(|(_, d)| d.clone())
    };
    if let Some(digest) = seen(&stamp) {
        return Ok(digest);
    }
    let mut h = Sha256::new();
    for path in files {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let digest = format!("{} ({} files)", short(&h.finalize()), files.len());
    SEEN.lock()
        .expect("digest memo lock")
        .push((stamp, digest.clone()));
    Ok(digest)
}

/// `dir/ref_logps-<first 16 hex digits>.safetensors`.
pub fn cache_path(dir: &Path, fingerprint: &str) -> PathBuf {
    named_path(dir, REFERENCE.stem, fingerprint)
}

fn named_path(dir: &Path, stem: &str, fingerprint: &str) -> PathBuf {
    dir.join(format!(
        "{stem}-{}.safetensors",
        &fingerprint[..16.min(fingerprint.len())]
    ))
}

/// This rank's contiguous share of the batches of `split`.
fn my_batches<'a>(
    split: &'a [TokenizedPair],
    batch_size: usize,
    world: &dyn Collective,
) -> Vec<&'a [TokenizedPair]> {
    let chunks: Vec<&[TokenizedPair]> = split.chunks(batch_size.max(1)).collect();
    let mine = crate::dist::shard(chunks.len(), world.rank(), world.world_size());
    chunks[mine].to_vec()
}

/// CHES scores (both forms) of the training `pairs` under `model` ([`crate::data::ches`]),
/// cached as `dir/ches-<fingerprint>.safetensors` as [`cached_columns`] does. Returns the scores,
/// the file, and whether they came from disk.
#[allow(clippy::too_many_arguments)]
pub fn ches_cached(
    dir: &Path,
    fingerprint: &Fingerprint,
    model: &Model,
    pairs: &[TokenizedPair],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    world: &dyn Collective,
) -> Result<(Vec<Ches>, PathBuf, bool)> {
    let score = |chunk: &[TokenizedPair]| -> Result<Vec<Vec<f64>>> {
        let scores = crate::data::ches::ches_scores(model, chunk, chunk.len(), pad_id, device)?;
        Ok(vec![
            scores.iter().map(|c| c.ches).collect(),
            scores.iter().map(|c| c.ln_ches).collect(),
        ])
    };
    let splits: [(&[TokenizedPair], &[&str]); 1] = [(pairs, &["train_ches", "train_ln_ches"])];
    let (columns, cached) =
        cached_columns(dir, CHES, fingerprint, &splits, batch_size, world, &score)?;
    let scores = columns[0]
        .iter()
        .zip(&columns[1])
        .map(|(&ches, &ln_ches)| Ches { ches, ln_ches })
        .collect();
    Ok((
        scores,
        named_path(dir, CHES.stem, &fingerprint.hash),
        cached,
    ))
}

/// Loads the reference cache for `fingerprint` from `dir` if a valid one is there; otherwise
/// runs `reference` over the pairs in batches of `batch_size` and writes the cache, saying why
/// each other cache in `dir` does not fit ([`cached_columns`]). Returns the values and whether
/// they came from disk.
#[allow(clippy::too_many_arguments)]
pub fn load_or_compute(
    dir: &Path,
    fingerprint: &Fingerprint,
    reference: &Model,
    pairs: (&[TokenizedPair], &[TokenizedPair]),
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    world: &dyn Collective,
) -> Result<(RefLogps, bool)> {
    let score = |chunk: &[TokenizedPair]| -> Result<Vec<Vec<f64>>> {
        let batch = PreferenceBatch::new(chunk, pad_id, device)?;
        let (c, r) = pair_logps(reference, &batch)?;
        Ok(vec![
            c.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            r.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        ])
    };
    let splits = [(pairs.0, &NAMES[..2]), (pairs.1, &NAMES[2..])];
    let (columns, cached) = cached_columns(
        dir,
        REFERENCE,
        fingerprint,
        &splits,
        batch_size,
        world,
        &score,
    )?;
    Ok((ref_logps(fingerprint, columns), cached))
}

/// Scores a batch of pairs: one vector per column, a value per pair.
type Scorer<'a> = dyn Fn(&[TokenizedPair]) -> Result<Vec<Vec<f64>>> + 'a;

/// Per-pair f64 columns: for each split, its pairs and its columns' names. Read from `dir`'s
/// cache of `kind` for `fingerprint` when a valid one is there, else computed by `score` (a
/// batch of pairs → one vector per column, a value per pair) in batches of `batch_size`, and
/// written. Returns the columns in order and whether they came from disk.
///
/// In a data-parallel run, rank 0 alone reads and writes the file: it sends a valid cache to the
/// other ranks, or else each rank scores its contiguous share of each split's batches and the
/// shares are gathered, in batch order, on every rank. Batches are the same as in one process,
/// so are the values.
fn cached_columns(
    dir: &Path,
    kind: Kind,
    fingerprint: &Fingerprint,
    splits: &[(&[TokenizedPair], &[&str])],
    batch_size: usize,
    world: &dyn Collective,
    score: &Scorer,
) -> Result<(Vec<Vec<f64>>, bool)> {
    let path = named_path(dir, kind.stem, &fingerprint.hash);
    let names: Vec<(&str, usize)> = splits
        .iter()
        .flat_map(|(pairs, cols)| cols.iter().map(|c| (*c, pairs.len())))
        .collect();
    let parse = |bytes: &[u8]| parse_vectors(bytes, kind.format, fingerprint, &names);
    let mut cached = Vec::new();
    if world.rank() == 0 && path.is_file() {
        let bytes = read(&path)?;
        match parse(&bytes) {
            Ok(_) => cached = bytes,
            Err(e) => eprintln!(
                "warning: not using the {} cache {}: {e:#}; recomputing",
                kind.what,
                path.display()
            ),
        }
    } else if world.rank() == 0 {
        for (other, why) in unfit(dir, kind, fingerprint) {
            let (what, other) = (kind.what, other.display());
            eprintln!("note: not using the {what} cache {other}: {why}");
        }
    }
    let cached = world.broadcast(&cached)?;
    if !cached.is_empty() {
        return Ok((parse(&cached)?, true));
    }
    // Rank 0 shows its own share's progress.
    let bar = match world.rank() {
        0 => crate::progress::bar(
            kind.what,
            splits
                .iter()
                .flat_map(|(pairs, _)| my_batches(pairs, batch_size, world))
                .map(|c| c.len() as u64)
                .sum(),
            crate::progress::Unit::Items("pairs"),
        ),
        _ => indicatif::ProgressBar::hidden(),
    };
    let mut out = Vec::with_capacity(names.len());
    for (pairs, cols) in splits {
        let mut mine = vec![Vec::new(); cols.len()];
        for chunk in my_batches(pairs, batch_size, world) {
            bar.inc(chunk.len() as u64);
            let values = score(chunk)?;
            if values.len() != cols.len() || values.iter().any(|v| v.len() != chunk.len()) {
                bail!(
                    "{}: a batch of {} pairs gave the wrong number of values",
                    kind.what,
                    chunk.len()
                );
            }
            for (col, v) in mine.iter_mut().zip(values) {
                col.extend(v);
            }
        }
        // Each rank's share as its first column's values, then its second's, ….
        let share: Vec<u8> = mine
            .iter()
            .flatten()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut whole = vec![Vec::with_capacity(pairs.len()); cols.len()];
        for part in world.all_gather(&share)? {
            let values: Vec<f64> = part
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .collect();
            if values.is_empty() {
                continue; // a rank with no batches of this split
            }
            for (col, v) in whole
                .iter_mut()
                .zip(values.chunks(values.len() / cols.len()))
            {
                col.extend_from_slice(v);
            }
        }
        if whole.iter().any(|col| col.len() != pairs.len()) {
            bail!(
                "{}: the ranks returned {} pairs of {}",
                kind.what,
                whole[0].len(),
                pairs.len()
            );
        }
        out.extend(whole);
    }
    bar.finish_and_clear();
    if world.rank() == 0 {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let named: Vec<(&str, &[f64])> = names
            .iter()
            .zip(&out)
            .map(|((n, _), v)| (*n, v.as_slice()))
            .collect();
        save_vectors(&path, kind.format, fingerprint, &named)?;
    }
    Ok((out, false))
}

/// The reference caches in `dir` made for other inputs than `fingerprint`'s, each with what
/// differs (`mixed_precision: no -> bf16`, …).
pub fn unfit_caches(dir: &Path, fingerprint: &Fingerprint) -> Vec<(PathBuf, String)> {
    unfit(dir, REFERENCE, fingerprint)
}

/// [`unfit_caches`] for caches of `kind`.
fn unfit(dir: &Path, kind: Kind, fingerprint: &Fingerprint) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{}-", kind.stem);
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".safetensors"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let why = read(&p)
                .and_then(|bytes| metadata(&bytes))
                .and_then(|meta| check(&meta, kind.format, fingerprint))
                .err()?;
            Some((p, format!("{why:#}")))
        })
        .collect()
}

/// The reference cache's columns, in this order.
const NAMES: [&str; 4] = [
    "train_chosen",
    "train_rejected",
    "eval_chosen",
    "eval_rejected",
];

/// [`RefLogps`] from its four columns in [`NAMES`]' order.
fn ref_logps(fingerprint: &Fingerprint, columns: Vec<Vec<f64>>) -> RefLogps {
    let mut it = columns.into_iter();
    let mut next = || it.next().expect("four columns");
    RefLogps {
        fingerprint: fingerprint.clone(),
        train_chosen: next(),
        train_rejected: next(),
        eval_chosen: next(),
        eval_rejected: next(),
    }
}

/// Writes named f64 vectors with the format and fingerprint in the header.
fn save_vectors(
    path: &Path,
    format: &str,
    fingerprint: &Fingerprint,
    vectors: &[(&str, &[f64])],
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = vectors
        .iter()
        .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = vectors
        .iter()
        .zip(&bytes)
        .map(|((name, _), b)| {
            Ok((
                *name,
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F64,
                    vec![b.len() / 8],
                    b,
                )?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([
        ("format".to_string(), format.to_string()),
        ("fingerprint".to_string(), fingerprint.hash.clone()),
        (
            "inputs".to_string(),
            serde_json::to_string(&fingerprint.inputs)?,
        ),
    ]);
    // Written to a temporary name first so that an interrupted run never leaves a truncated cache.
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A safetensors file's `__metadata__`.
fn metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).context("not a safetensors file")?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Whether a cache's header is `format` and made for `fingerprint`'s inputs; if not, what
/// differs.
fn check(meta: &HashMap<String, String>, format: &str, fingerprint: &Fingerprint) -> Result<()> {
    match meta.get("format") {
        Some(f) if f == format => {}
        Some(f) => bail!("written in another format (`{f}`; this dpo-sam reads `{format}`)"),
        None => bail!("not a dpo-sam cache of this kind (no `{format}` header)"),
    }
    if meta.get("fingerprint") == Some(&fingerprint.hash) {
        return Ok(());
    }
    let cached: Vec<(String, String)> = meta
        .get("inputs")
        .and_then(|s| serde_json::from_str(s).ok())
        .context("stale: another fingerprint, and no readable list of inputs")?;
    match fingerprint.changes_from(&cached) {
        changes if changes.is_empty() => {
            bail!("stale: its fingerprint does not match the inputs it lists")
        }
        changes => bail!("made for other inputs: {}", changes.join("; ")),
    }
}

/// Reads a reference cache file, checking its format, fingerprint and lengths.
pub fn load(
    path: &Path,
    fingerprint: &Fingerprint,
    n_train: usize,
    n_eval: usize,
) -> Result<RefLogps> {
    parse(&read(path)?, fingerprint, n_train, n_eval).with_context(|| format!("{}", path.display()))
}

/// [`load`] from the file's bytes.
fn parse(
    bytes: &[u8],
    fingerprint: &Fingerprint,
    n_train: usize,
    n_eval: usize,
) -> Result<RefLogps> {
    let lens = [n_train, n_train, n_eval, n_eval];
    let named: Vec<(&str, usize)> = NAMES.iter().copied().zip(lens).collect();
    let columns = parse_vectors(bytes, FORMAT, fingerprint, &named)?;
    Ok(ref_logps(fingerprint, columns))
}

/// Named f64 vectors of the given lengths from a cache file's bytes, checking the header's
/// format and fingerprint.
fn parse_vectors(
    bytes: &[u8],
    format: &str,
    fingerprint: &Fingerprint,
    names: &[(&str, usize)],
) -> Result<Vec<Vec<f64>>> {
    check(&metadata(bytes)?, format, fingerprint)?;
    let st = safetensors::SafeTensors::deserialize(bytes).context("not a safetensors file")?;
    names
        .iter()
        .map(|&(name, want)| {
            let view = st
                .tensor(name)
                .with_context(|| format!("missing tensor `{name}`"))?;
            if view.dtype() != safetensors::Dtype::F64 || view.shape() != [want] {
                bail!(
                    "tensor `{name}`: expected f64 [{want}], got {:?} {:?}",
                    view.dtype(),
                    view.shape()
                );
            }
            Ok(view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cache_files_stay_out_of_hub_uploads() {
        for kind in [super::REFERENCE, super::CHES] {
            let path =
                super::named_path(std::path::Path::new("run"), kind.stem, "0123456789abcdef01");
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(crate::upload::left_out(&name), "{name} would be uploaded");
        }
    }
}
