//! Saving models in Hugging Face format (`config.json`, `model.safetensors`, tokenizer files),
//! so that `transformers` and candle-transformers load what `dpo-sam` writes.

use crate::models::Model;
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
use std::path::Path;

/// Writes the model's current weights (HF tensor names, tied weights once), its `config.json`
/// and the tokenizer into `dir`. Each file goes to a temporary name first and is renamed into
/// place, so an interrupted save never leaves a truncated file under the final name.
pub fn save_model(model: &Model, tok: &Tok, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = model.named_tensors();
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&model.config_json)?;
    std::fs::write(dir.join("config.json"), config).with_context(|| format!("cannot write config.json in {}", dir.display()))?;
    tok.save(dir)
}
