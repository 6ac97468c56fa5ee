//! `dpo-sam merge`: a PEFT LoRA adapter folded into its base model's weights, W + s · B A (what
//! PEFT's `merge_and_unload` leaves), saved as a full Hugging Face model directory that
//! `AutoModelForCausalLM` loads without `peft`.

use crate::checkpoint::{save_model, SaveOptions};
use crate::config::{parse_size, BuiltinModel, SaveDtype};
use crate::models::lora::{self, AdapterFile};
use crate::models::{Model, ModelSource};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  dpo-sam merge --base alignment-handbook/zephyr-7b-sft-full --adapter runs/ultrafeedback_mistral_lora --out zephyr-dpo-lora-merged"
)]
pub struct MergeArgs {
    /// The base model the adapter was trained on: a Hugging Face directory, a Hub repo id, or
    /// `builtin:tiny-gpt2`.
    #[arg(long)]
    pub base: String,
    /// The adapter: a directory with adapter_config.json and adapter_model.safetensors (what
    /// `dpo-sam train` with LoRA and PEFT's `save_pretrained` write).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where the merged model goes: config.json, safetensors weights and the tokenizer.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the merged weights: auto (the base's as stored), f32, bf16 or f16. Each merged
    /// weight W + s·BA is computed in f64 from W in this dtype and rounded once.
    #[arg(long, default_value = "auto")]
    pub dtype: SaveDtype,
    /// Largest safetensors shard, as `training.max_shard_size`.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let max_shard_size = parse_size(&args.max_shard_size).context("--max-shard-size")?;
    let base = ModelSource::resolve(&args.base, &BuiltinModel::default(), 42).context("--base")?;
    if let ModelSource::Adapted { adapter, .. } = &base {
        bail!(
            "--base: {} is a LoRA adapter; give the model it adapts",
            adapter.display()
        );
    }
    let file = AdapterFile::read(&args.adapter).context("--adapter")?;
    let same = |a: &std::path::Path, b: &std::path::Path| {
        std::fs::canonicalize(a)
            .ok()
            .is_some_and(|a| Some(a) == std::fs::canonicalize(b).ok())
    };
    if same(&args.out, &args.adapter) {
        bail!("--out: a full model saved into the adapter's own directory would replace the adapter; choose another directory");
    }
    let dtype = match args.dtype.dtype() {
        Some(d) => d,
        None => crate::models::stored_dtype(&base)?.unwrap_or(DType::F32),
    };
    // Loaded in the output dtype, so that each merged weight is rounded once.
    let model = Model::load(&base, true, dtype, &Device::Cpu)?;
    let model_type = model.config_json["model_type"].as_str().unwrap_or("");
    lora::merge(&*model.net, model_type, &model.params, &file)
        .with_context(|| format!("merging {} into {}", args.adapter.display(), args.base))?;
    // The adapter's tokenizer when it saved one, else the base's.
    let tok = ModelSource::Adapted {
        base: Box::new(base),
        adapter: args.adapter.clone(),
    }
    .tokenizer()?;
    let opts = SaveOptions {
        dtype: Some(dtype),
        max_shard_size,
    };
    let card = crate::card::merged(&args.base, &args.adapter);
    save_model(&model, &tok, &args.out, &opts, &card)?;
    eprintln!(
        "merged {} ({} layers, scale {}) into {}: {}",
        args.adapter.display(),
        file.len(),
        file.spec.scaling(),
        args.base,
        args.out.display()
    );
    Ok(())
}
