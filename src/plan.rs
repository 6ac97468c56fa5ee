//! `dpo-sam train --dry-run`: validates a config and prints the plan — parameter counts (total,
//! lm_head share), estimated memory for weights, gradients, optimiser state, reference model and
//! the output layer's logits, and steps per epoch — without loading any weights.

use crate::config::Config;
use crate::models::{param_shapes, ModelSource};
use anyhow::Result;
use serde_json::json;

/// `config.json`s of the paper's checkpoints, used when the Hub cannot be reached so that the
/// plan for `configs/*.toml` can still be printed offline.
const KNOWN_CONFIGS: &[(&str, &str)] = &[
    ("lomahony/eleuther-pythia2.8b-hh-sft", PYTHIA_2_8B),
    ("trl-lib/pythia-2.8b-deduped-tldr-sft", PYTHIA_2_8B),
    ("EleutherAI/pythia-2.8b", PYTHIA_2_8B),
    ("alignment-handbook/zephyr-7b-sft-full", MISTRAL_7B),
    ("mistralai/Mistral-7B-v0.1", MISTRAL_7B),
];
const PYTHIA_2_8B: &str = r#"{"model_type":"gpt_neox","vocab_size":50304,"hidden_size":2560,"num_hidden_layers":32,
"num_attention_heads":32,"intermediate_size":10240,"rotary_pct":0.25,"rotary_emb_base":10000,
"max_position_embeddings":2048,"layer_norm_eps":1e-5,"use_parallel_residual":true,"hidden_act":"gelu",
"tie_word_embeddings":false,"bos_token_id":0,"eos_token_id":0}"#;
const MISTRAL_7B: &str = r#"{"model_type":"mistral","vocab_size":32000,"hidden_size":4096,"num_hidden_layers":32,
"num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,"hidden_act":"silu",
"rms_norm_eps":1e-5,"rope_theta":10000.0,"sliding_window":4096,"tie_word_embeddings":false,
"max_position_embeddings":32768,"bos_token_id":1,"eos_token_id":2}"#;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The plan as JSON (also printed by [`print`]).
pub fn plan(cfg: &Config) -> Result<serde_json::Value> {
    let spec = &cfg.model.name_or_path;
    let (config_json, config_origin) =
        match ModelSource::resolve(spec, &cfg.model.builtin, cfg.seed) {
            Ok(src) => (src.config_json()?, "resolved".to_string()),
            Err(err) => match KNOWN_CONFIGS.iter().find(|(id, _)| id == spec) {
                Some((_, text)) => (
                    serde_json::from_str(text)?,
                    format!(
                        "built-in copy of the published config.json (could not resolve: {err:#})"
                    ),
                ),
                None => return Err(err),
            },
        };
    let shapes = param_shapes(&config_json)?;
    let count = |dims: &Vec<usize>| dims.iter().product::<usize>();
    let total: usize = shapes.iter().map(|(_, d)| count(d)).sum();
    // The output layer: an untied head, or else the (tied) input embedding.
    let head = shapes
        .iter()
        .find(|(n, _)| n.ends_with("lm_head.weight") || n.ends_with("embed_out.weight"))
        .or_else(|| {
            shapes
                .iter()
                .find(|(n, _)| n.ends_with("wte.weight") || n.ends_with("embed_tokens.weight"))
        });
    let head_params = head.map(|(_, d)| count(d)).unwrap_or(0);
    let embeddings: usize = shapes
        .iter()
        .filter(|(n, d)| {
            d.len() == 2
                && ["wte", "wpe", "embed_in", "embed_tokens"]
                    .iter()
                    .any(|e| n.contains(e))
        })
        .filter(|(n, _)| Some(n) != head.map(|(h, _)| h))
        .map(|(_, d)| count(d))
        .sum();
    let body_linear: usize = shapes
        .iter()
        .filter(|(n, d)| d.len() == 2 && Some(n) != head.map(|(h, _)| h))
        .map(|(_, d)| count(d))
        .sum::<usize>()
        - embeddings;
    let linear_share = head_params as f64 / (head_params + body_linear).max(1) as f64;

    let dtype_bytes = match cfg.model.dtype.as_str() {
        "bf16" | "f16" => 2.0,
        "f64" => 8.0,
        _ => 4.0,
    };
    let loss = crate::losses::Loss::from_config(&cfg.training)?;
    let p = total as f64;
    let weights = p * dtype_bytes;
    let grads = p * 4.0; // accumulated in f32
    let optimizer = if cfg.training.optimizer == "adamw" {
        8.0 * p
    } else {
        0.0
    };
    let reference = if loss.needs_reference() {
        p * dtype_bytes
    } else {
        0.0
    };
    let vocab = config_json["vocab_size"].as_u64().unwrap_or(0) as f64;
    let tokens = (2 * cfg.micro_batch_size() * cfg.data.max_length) as f64;
    // logits, log-softmax and their gradient, f32, for every scored token of a micro-batch
    let logits = 3.0 * 4.0 * tokens * vocab;

    let tokenized = ModelSource::resolve(spec, &cfg.model.builtin, cfg.seed).and_then(|src| {
        crate::data::load_tokenized(&cfg.data, &src.tokenizer()?, cfg.seed, src.dir())
    });
    let steps = match tokenized {
        Ok(data) => json!({
            "train_pairs": data.train.len(),
            "steps_per_epoch": data.train.len().div_ceil(cfg.training.batch_size),
            "total_steps": cfg.training.max_steps.unwrap_or(((cfg.training.num_train_epochs * data.train.len() as f64) / cfg.training.batch_size as f64).ceil() as usize),
        }),
        Err(err) => json!({ "unknown": format!("data not reachable: {err:#}") }),
    };
    Ok(json!({
        "model": spec,
        "config_json": config_origin,
        "model_type": config_json["model_type"],
        "params": total,
        "lm_head_params": head_params,
        "lm_head_share_of_params": head_params as f64 / p,
        "lm_head_share_of_linear_work": linear_share,
        "logits_sam_flop_bound": 1.0 + 2.0 / 3.0 * linear_share,
        "memory_gib": {
            "weights": weights / GIB,
            "gradients_f32": grads / GIB,
            "optimizer_state": optimizer / GIB,
            "reference_model": reference / GIB,
            "logits_per_micro_batch": logits / GIB,
            "total_before_activations": (weights + grads + optimizer + reference + logits) / GIB,
        },
        "data": steps,
        "micro_batches_per_step": cfg.training.batch_size / cfg.micro_batch_size(),
        "sam": cfg.sam.kind,
    }))
}

/// Prints the plan for a person.
pub fn print(cfg: &Config) -> Result<()> {
    let plan = plan(cfg)?;
    let g = |k: &str| plan["memory_gib"][k].as_f64().unwrap_or(0.0);
    println!(
        "model        {} ({}; config.json {})",
        plan["model"].as_str().unwrap_or(""),
        plan["model_type"].as_str().unwrap_or("?"),
        plan["config_json"].as_str().unwrap_or("")
    );
    println!(
        "parameters   {} (lm_head {} = {:.2}% of parameters, {:.1}% of linear-layer work)",
        plan["params"],
        plan["lm_head_params"],
        100.0 * plan["lm_head_share_of_params"].as_f64().unwrap_or(0.0),
        100.0 * plan["lm_head_share_of_linear_work"].as_f64().unwrap_or(0.0)
    );
    println!(
        "logits-SAM   FLOP bound {:.3}× a plain step",
        plan["logits_sam_flop_bound"].as_f64().unwrap_or(1.0)
    );
    println!("memory (GiB) weights {:.2}, gradients {:.2}, optimizer {:.2}, reference {:.2}, logits/micro-batch {:.2}; total {:.2} + activations", g("weights"), g("gradients_f32"), g("optimizer_state"), g("reference_model"), g("logits_per_micro_batch"), g("total_before_activations"));
    match plan["data"].get("steps_per_epoch") {
        Some(steps) => println!(
            "data         {} pairs, {} steps per epoch, {} steps in all, {} micro-batches per step",
            plan["data"]["train_pairs"],
            steps,
            plan["data"]["total_steps"],
            plan["micro_batches_per_step"]
        ),
        None => println!(
            "data         {}",
            plan["data"]["unknown"].as_str().unwrap_or("")
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_configs_plan_offline_with_known_shapes() {
        for (file, params, share) in [
            ("configs/hh_pythia.toml", 2_775_208_960usize, 0.0464),
            ("configs/ultrafeedback_mistral.toml", 7_241_732_096, 0.0181),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let cfg = Config::load(&path, &["device=\"cpu\"".into()]).unwrap();
            let plan = plan(&cfg).unwrap();
            assert_eq!(plan["params"].as_u64().unwrap() as usize, params, "{file}");
            let got = plan["lm_head_share_of_params"].as_f64().unwrap();
            assert!(
                (got - share).abs() < 5e-4,
                "{file}: lm_head share {got}, the paper says {share}"
            );
        }
    }

    #[test]
    fn builtin_plan_counts_loaded_parameters_and_data() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/tiny_gpt2.toml"
        ))
        .unwrap();
        let cfg = Config::parse(&text, "tiny_gpt2.toml", &[]).unwrap();
        let plan = plan(&cfg).unwrap();
        let src = ModelSource::resolve("builtin:tiny-gpt2", &cfg.model.builtin, 0).unwrap();
        let model = crate::models::Model::load(
            &src,
            true,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let loaded: usize = model.params.iter().map(|p| p.var.elem_count()).sum();
        assert_eq!(plan["params"].as_u64().unwrap() as usize, loaded);
        assert_eq!(plan["data"]["steps_per_epoch"], 1024usize.div_ceil(32));
    }
}
