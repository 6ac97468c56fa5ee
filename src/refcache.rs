//! Precomputed reference log-probs (TRL's `precompute_ref_log_probs`): the frozen reference is
//! run once over the training and eval pairs, its per-pair sequence log-probs are cached on disk,
//! and the trainer frees the reference model.
//!
//! The cache file `ref_logps-<fingerprint>.safetensors` holds four f64 vectors (train/eval ×
//! chosen/rejected, in pair order) and, in its header, the full fingerprint: a SHA-256 of the
//! reference model's files (or its random-init config and seed), its dtype, the tokenizer, the
//! truncation settings and every tokenised pair. A file whose header does not match, or whose
//! lengths differ from the data, is reported and recomputed, never used.

use crate::data::batch::{PreferenceBatch, TokenizedPair, Truncation};
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
const FORMAT: &str = "dpo-sam ref_logps v1";

/// Per-pair reference log-probs, indexed like the trainer's training and eval pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLogps {
    pub fingerprint: String,
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
    pub reference: &'a ModelSource,
    pub dtype: DType,
    pub tok: &'a Tok,
    pub truncation: &'a Truncation,
    pub train: &'a [TokenizedPair],
    pub eval: &'a [TokenizedPair],
}

/// SHA-256 (hex) over everything the reference log-probs depend on.
pub fn fingerprint(inputs: &FingerprintInputs) -> Result<String> {
    let mut h = Sha256::new();
    let mut field = |name: &str, bytes: &[u8]| {
        // Length-prefixed, so that moving bytes between fields changes the hash.
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("format", FORMAT.as_bytes());
    match inputs.reference {
        ModelSource::Random { config, seed, .. } => {
            field("random_config", config.to_string().as_bytes());
            field("random_seed", &seed.to_le_bytes());
        }
        ModelSource::Dir(dir) => {
            field("config.json", &read(&dir.join("config.json"))?);
            for file in crate::models::weight_files(dir)? {
                hash_file(&mut field, &file)?;
            }
        }
    }
    field("dtype", inputs.dtype.as_str().as_bytes());
    let tok = inputs.tok;
    field(
        "tokenizer",
        tok.inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?
            .as_bytes(),
    );
    field(
        "special_ids",
        &[tok.eos_id, tok.pad_id].map(u32::to_le_bytes).concat(),
    );
    let t = inputs.truncation;
    let trunc = format!("{} {:?} {}", t.max_length, t.max_prompt_length, t.mode);
    field("truncation", trunc.as_bytes());
    for (name, pairs) in [("train", inputs.train), ("eval", inputs.eval)] {
        field(name, &(pairs.len() as u64).to_le_bytes());
        for p in pairs {
            for seq in [&p.chosen, &p.rejected] {
                field("prompt_len", &(seq.prompt_len as u64).to_le_bytes());
                let ids: Vec<u8> = seq.ids.iter().flat_map(|i| i.to_le_bytes()).collect();
                field("ids", &ids);
            }
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Streams a (possibly multi-GB) weight file into the hash.
fn hash_file(field: &mut impl FnMut(&str, &[u8]), path: &Path) -> Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        field("weights", &buf[..n]);
    }
}

/// `dir/ref_logps-<first 16 hex digits>.safetensors`.
pub fn cache_path(dir: &Path, fingerprint: &str) -> PathBuf {
    dir.join(format!(
        "ref_logps-{}.safetensors",
        &fingerprint[..16.min(fingerprint.len())]
    ))
}

/// Loads the cache for `fingerprint` from `dir` if a valid one is there; otherwise runs
/// `reference` over the pairs in batches of `batch_size` and writes the cache. Returns the
/// values and whether they came from disk.
///
/// In a data-parallel run, rank 0 alone reads and writes the file: it sends a valid cache to the
/// other ranks, or else each rank runs its contiguous share of the batches and the shares are
/// gathered, in batch order, on every rank. Batches are the same as in one process, so are the
/// values.
#[allow(clippy::too_many_arguments)]
pub fn load_or_compute(
    dir: &Path,
    fingerprint: &str,
    reference: &Model,
    pairs: (&[TokenizedPair], &[TokenizedPair]),
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    world: &dyn Collective,
) -> Result<(RefLogps, bool)> {
    let path = cache_path(dir, fingerprint);
    let (n_train, n_eval) = (pairs.0.len(), pairs.1.len());
    let mut cached = Vec::new();
    if world.rank() == 0 && path.is_file() {
        let bytes = read(&path)?;
        match parse(&bytes, fingerprint, n_train, n_eval) {
            Ok(_) => cached = bytes,
            Err(e) => eprintln!(
                "warning: not using reference cache {}: {e:#}; recomputing",
                path.display()
            ),
        }
    }
    let cached = world.broadcast(&cached)?;
    if !cached.is_empty() {
        return Ok((parse(&cached, fingerprint, n_train, n_eval)?, true));
    }
    let run = |split: &[TokenizedPair]| -> Result<(Vec<f64>, Vec<f64>)> {
        let chunks: Vec<&[TokenizedPair]> = split.chunks(batch_size.max(1)).collect();
        let mine = crate::dist::shard(chunks.len(), world.rank(), world.world_size());
        let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
        for chunk in &chunks[mine] {
            let batch = PreferenceBatch::new(chunk, pad_id, device)?;
            let (c, r) = pair_logps(reference, &batch)?;
            chosen.extend(c.to_dtype(DType::F64)?.to_vec1::<f64>()?);
            rejected.extend(r.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        // Each rank's share as its chosen values, then its rejected ones.
        let share: Vec<u8> = chosen
            .iter()
            .chain(&rejected)
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let (mut chosen, mut rejected) = (
            Vec::with_capacity(split.len()),
            Vec::with_capacity(split.len()),
        );
        for part in world.all_gather(&share)? {
            let values: Vec<f64> = part
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .collect();
            let (c, r) = values.split_at(values.len() / 2);
            chosen.extend_from_slice(c);
            rejected.extend_from_slice(r);
        }
        if chosen.len() != split.len() {
            bail!(
                "reference log-probs: the ranks returned {} pairs of {}",
                chosen.len(),
                split.len()
            );
        }
        Ok((chosen, rejected))
    };
    let (train_chosen, train_rejected) = run(pairs.0)?;
    let (eval_chosen, eval_rejected) = run(pairs.1)?;
    let out = RefLogps {
        fingerprint: fingerprint.to_string(),
        train_chosen,
        train_rejected,
        eval_chosen,
        eval_rejected,
    };
    if world.rank() == 0 {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        save(&out, &path)?;
    }
    Ok((out, false))
}

const NAMES: [&str; 4] = [
    "train_chosen",
    "train_rejected",
    "eval_chosen",
    "eval_rejected",
];

fn save(r: &RefLogps, path: &Path) -> Result<()> {
    let bytes: Vec<Vec<u8>> = [
        &r.train_chosen,
        &r.train_rejected,
        &r.eval_chosen,
        &r.eval_rejected,
    ]
    .iter()
    .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
    .collect();
    let views = NAMES
        .iter()
        .zip(&bytes)
        .map(|(name, b)| {
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
        ("format".to_string(), FORMAT.to_string()),
        ("fingerprint".to_string(), r.fingerprint.clone()),
    ]);
    // Written to a temporary name first so that an interrupted run never leaves a truncated cache.
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads a cache file, checking its format, fingerprint and lengths.
pub fn load(path: &Path, fingerprint: &str, n_train: usize, n_eval: usize) -> Result<RefLogps> {
    parse(&read(path)?, fingerprint, n_train, n_eval).with_context(|| format!("{}", path.display()))
}

/// [`load`] from the file's bytes.
fn parse(bytes: &[u8], fingerprint: &str, n_train: usize, n_eval: usize) -> Result<RefLogps> {
    let st = safetensors::SafeTensors::deserialize(bytes).context("not a safetensors file")?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("not a dpo-sam reference cache (no `{FORMAT}` header)");
    }
    match meta.get("fingerprint") {
        Some(f) if f == fingerprint => {}
        Some(f) => bail!("stale: fingerprint {f} does not match the current reference model and data ({fingerprint})"),
        None => bail!("no fingerprint in the header"),
    }
    let mut vecs = Vec::with_capacity(4);
    for (name, want) in NAMES.iter().zip([n_train, n_train, n_eval, n_eval]) {
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
        vecs.push(
            view.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .collect::<Vec<f64>>(),
        );
    }
    let mut it = vecs.into_iter();
    let mut next = || it.next().expect("four tensors were read");
    Ok(RefLogps {
        fingerprint: fingerprint.to_string(),
        train_chosen: next(),
        train_rejected: next(),
        eval_chosen: next(),
        eval_rejected: next(),
    })
}
