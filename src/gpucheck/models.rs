//! Whole models, CUDA against CPU: one random-weight model per architecture (GPT-2, GPT-NeoX,
//! Mistral) built on the CPU, saved, and loaded again on the device (GPU initialisation draws
//! other values), then compared on logits, per-sequence log-probs, the DPO loss and one
//! logits-SAM training step's gradients.

use super::GpuCheckArgs;
use crate::config::Config;
use crate::train::Trainer;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

/// Tiny configs that still exercise each architecture's distinctive parts: tied embeddings
/// (GPT-2), partial rotary with parallel residual (GPT-NeoX), grouped-query attention with a
/// sliding window shorter than the sequence (Mistral).
pub(super) fn configs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "gpt2",
            json!({"model_type": "gpt2", "vocab_size": 1024, "n_embd": 64, "n_head": 4, "n_layer": 2,
                   "n_positions": 128, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                   "tie_word_embeddings": true}),
        ),
        (
            "gpt_neox",
            json!({"model_type": "gpt_neox", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "intermediate_size": 256, "rotary_pct": 0.25,
                   "rotary_emb_base": 10000, "max_position_embeddings": 128, "layer_norm_eps": 1e-5,
                   "use_parallel_residual": true, "hidden_act": "gelu", "tie_word_embeddings": false}),
        ),
        (
            "mistral",
            json!({"model_type": "mistral", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                   "sliding_window": 16, "hidden_act": "silu", "tie_word_embeddings": false}),
        ),
    ]
}

/// One model's outputs on one device, all moved to the CPU.
struct Outputs {
    logits: Tensor,
    logps: Vec<f32>,
    loss: f64,
    grads: Vec<(String, Option<Tensor>)>,
}

/// A trainer of `model` (a `name_or_path`) on `device`.
fn trainer(
    model: &str,
    device: &str,
    scratch: &std::path::Path,
    args: &GpuCheckArgs,
) -> Result<Trainer> {
    let toml = format!(
        "output_dir = {out:?}\ndevice = {device:?}\n[model]\nname_or_path = {model:?}\n\
         [data]\ntrain = \"builtin:arith\"\nbuiltin_pairs = 8\n[training]\nlearning_rate = 1e-6\nbatch_size = {pairs}\n[sam]\nkind = \"logits\"\nrho = 0.05\n",
        out = scratch.display().to_string(),
        pairs = args.pairs,
    );
    Trainer::new(Config::parse(&toml, "gpu-check", &[])?)
}

fn outputs(trainer: &Trainer, args: &GpuCheckArgs) -> Result<Outputs> {
    let head = trainer.policy().net.output_layer();
    let batch = crate::bench::random_batch(
        args.pairs,
        args.seq_len,
        head.vocab_size()?,
        trainer.tok().pad_id,
        trainer.device(),
    )?;
    let h = trainer.policy().net.forward_hidden(&batch.input_ids)?;
    let (rows, t, hidden) = h.dims3()?;
    let logits = head
        .logits(&h.reshape((rows * t, hidden))?, None)?
        .to_device(&Device::Cpu)?;
    let ms = trainer.micro_step(&batch, Some(1.0))?;
    let store = ms.grads.as_ref().expect("backward requested");
    let grads = trainer
        .policy()
        .params
        .iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                store
                    .get(p.var.as_tensor())
                    .map(|g| g.to_device(&Device::Cpu))
                    .transpose()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let logps = ms
        .chosen_logps
        .iter()
        .chain(&ms.rejected_logps)
        .copied()
        .collect();
    Ok(Outputs {
        logits,
        logps,
        loss: ms.loss,
        grads,
    })
}

/// ‖a − b‖ / ‖a‖ (‖a − b‖ when a is zero).
pub(super) fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

/// Every architecture's comparison, and whether all pass.
pub fn check(args: &GpuCheckArgs) -> Result<Value> {
    let mut models = Vec::new();
    let mut all_pass = true;
    for (arch, config) in configs() {
        let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
        let config_path = scratch.path().join("config.json");
        std::fs::write(&config_path, config.to_string())?;
        let random = format!("random:{}", config_path.display());
        let on_cpu = trainer(&random, "cpu", scratch.path(), args)?;
        let cpu = outputs(&on_cpu, args).with_context(|| format!("{arch} on cpu"))?;
        // The same weights on the device: saved from the CPU model and loaded there.
        let saved = scratch.path().join("weights");
        let whole = crate::checkpoint::SaveOptions {
            dtype: None,
            max_shard_size: u64::MAX,
        };
        crate::checkpoint::save_model(on_cpu.policy(), on_cpu.tok(), &saved, &whole)?;
        let on_device = trainer(
            &saved.display().to_string(),
            &args.device,
            scratch.path(),
            args,
        )?;
        let dev =
            outputs(&on_device, args).with_context(|| format!("{arch} on {}", args.device))?;
        let logits = rel_err(&cpu.logits, &dev.logits)?;
        let logps = rel_err(
            &Tensor::new(cpu.logps.as_slice(), &Device::Cpu)?,
            &Tensor::new(dev.logps.as_slice(), &Device::Cpu)?,
        )?;
        let loss = (cpu.loss - dev.loss).abs() / cpu.loss.abs().max(1e-12);
        let mut worst = (String::new(), 0f64);
        let mut missing = Vec::new();
        for ((name, a), (_, b)) in cpu.grads.iter().zip(&dev.grads) {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let e = rel_err(a, b)?;
                    if e > worst.1 || e.is_nan() {
                        worst = (name.clone(), e);
                    }
                }
                (None, None) => {}
                _ => missing.push(name.clone()),
            }
        }
        let pass = [logits, logps, loss, worst.1]
            .iter()
            .all(|e| *e <= args.tolerance)
            && missing.is_empty();
        all_pass &= pass;
        models.push(json!({
            "arch": arch,
            "pass": pass,
            "logits_rel_err": logits,
            "logps_rel_err": logps,
            "loss_cpu": cpu.loss,
            "loss_device": dev.loss,
            "loss_rel_err": loss,
            "grad_worst_rel_err": worst.1,
            "grad_worst_param": worst.0,
            "grads_present_on_one_side_only": missing,
        }));
    }
    Ok(json!({
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "tolerance": args.tolerance,
        "pass": all_pass,
        "models": models,
    }))
}
