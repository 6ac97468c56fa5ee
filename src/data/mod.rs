//! Preference data: records (prompt, chosen, rejected) from the built-in task or from files,
//! and their tokenisation into DPO batches ([`batch`]).

pub mod batch;
pub mod builtin;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::BufRead;

/// One preference pair as text: the prompt and two responses that continue it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Training and held-out pairs.
pub struct Dataset {
    pub train: Vec<PreferencePair>,
    pub eval: Vec<PreferencePair>,
}

impl Dataset {
    /// Loads the sources named in `[data]`.
    pub fn load(cfg: &crate::config::DataConfig, seed: u64) -> Result<Dataset> {
        let train_specs = cfg.train.paths();
        if train_specs == ["builtin:arith"] {
            let (train, held_out) = builtin::arith(seed, cfg.builtin_pairs, cfg.builtin_pairs / 4);
            let eval = match &cfg.eval {
                Some(e) if e.paths() == ["builtin:arith"] => held_out,
                Some(e) => load_files(&e.paths())?,
                None => Vec::new(),
            };
            return Ok(Dataset { train, eval });
        }
        let train = load_files(&train_specs)?;
        let eval = match &cfg.eval {
            Some(e) => load_files(&e.paths())?,
            None => Vec::new(),
        };
        Ok(Dataset { train, eval })
    }
}

fn load_files(specs: &[&str]) -> Result<Vec<PreferencePair>> {
    let mut out = Vec::new();
    for spec in specs {
        if spec.starts_with("builtin:") {
            bail!("data source `{spec}`: built-in data cannot be mixed with files");
        }
        out.extend(read_jsonl(std::path::Path::new(spec))?);
    }
    Ok(out)
}

/// Reads `{"prompt", "chosen", "rejected"}` lines (plain or gzipped JSONL).
pub fn read_jsonl(path: &std::path::Path) -> Result<Vec<PreferencePair>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let pair: PreferencePair = serde_json::from_str(&line)
            .map_err(|e| anyhow!("{}:{}: expected an object with string fields prompt, chosen, rejected: {e}", path.display(), i + 1))?;
        out.push(pair);
    }
    Ok(out)
}
