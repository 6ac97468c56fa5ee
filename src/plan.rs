//! `dpo-sam train --dry-run`: validates a config and prints the plan — parameter counts (total,
//! lm_head share, LoRA's trainable share), estimated memory for weights (f32 masters and their
//! compute copy; with LoRA the frozen base in the compute dtype), gradients, optimiser state,
//! reference model, the output layer's logits and the policy's activations (with and without
//! `training.gradient_checkpointing`), and steps per epoch — without loading any weights. With
//! `--nproc-per-node`, the split of each batch over the ranks and the memory per GPU: every rank
//! holds the whole model, gradients and optimiser state (plain data parallelism; no ZeRO
//! sharding), plus two gradient buckets.

use crate::config::{Config, OptimizerType};
use crate::kernels::output::Tile;
use crate::models::{param_shapes, ModelSource};
use anyhow::{Context, Result};
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
/// An "80 GB" GPU (A100/H100 80GB), in bytes.
const GPU_80GB: f64 = 80e9;
/// A "141 GB" GPU (H200), in bytes.
const GPU_141GB: f64 = 141e9;

/// The plan as JSON (also printed by [`print`]) for a run over `ranks` data-parallel processes.
pub fn plan(cfg: &Config, ranks: usize) -> Result<serde_json::Value> {
    cfg.check_world_size(ranks)?;
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

    let dtype_bytes = cfg.model.dtype.dtype().size_in_bytes() as f64;
    let compute_bytes = cfg.compute_dtype().size_in_bytes() as f64;
    let p = total as f64;
    let lora = lora_plan(cfg, &config_json)?;
    let micro_batches = cfg.training.batch_size / cfg.micro_batch_size();
    let uses_reference = crate::losses::needs_reference(&cfg.loss_terms());
    let adamw = cfg.training.optimizer == OptimizerType::Adamw;
    let mem = match &lora {
        // The base is frozen and held in the compute dtype; the adapters are Vars in it with
        // f32 masters when it is half precision.
        Some(l) => {
            let t = l.params as f64;
            let masters = if compute_bytes < 4.0 { 4.0 } else { 0.0 };
            Memory {
                weights: p * compute_bytes + t * (compute_bytes + masters),
                // The f32 accumulator, the backward's own store, and the frozen output layer's
                // gradient, which the output layer's backward still computes.
                gradients: t * (4.0 + compute_bytes) + head_params as f64 * 4.0,
                optimizer: if adamw { 8.0 * t } else { 0.0 },
                reference: match (uses_reference, &cfg.model.ref_name_or_path) {
                    (false, _) => 0.0,
                    (true, Some(_)) => p * compute_bytes,
                    // Adapters off: the policy's own weights, plus the adapter it started from.
                    (true, None) if cfg.model.adapter.is_some() => t * compute_bytes,
                    (true, None) => 0.0,
                },
            }
        }
        None => {
            let stochastic = cfg.training.bf16_stochastic_rounding;
            // f32 masters beside the compute copy under mixed precision.
            let copy = if compute_bytes != dtype_bytes {
                compute_bytes
            } else {
                0.0
            };
            // The backward's gradients, beside the f32 accumulator unless they are it (f32,
            // one micro-batch).
            let store = if compute_bytes != 4.0 || micro_batches > 1 {
                compute_bytes
            } else {
                0.0
            };
            Memory {
                weights: p * (dtype_bytes + copy),
                gradients: p * (4.0 + store),
                optimizer: match (adamw, stochastic) {
                    (false, _) => 0.0,
                    (true, true) => 4.0 * p,
                    (true, false) => 8.0 * p,
                },
                reference: if uses_reference {
                    p * compute_bytes
                } else {
                    0.0
                },
            }
        }
    };
    let (weights, grads, optimizer, reference) =
        (mem.weights, mem.gradients, mem.optimizer, mem.reference);
    let vocab = config_json["vocab_size"].as_u64().unwrap_or(0) as f64;
    let kernels = Kernels::new(cfg.device.starts_with("cuda"), compute_bytes);
    let logits = logits_bytes(
        2 * cfg.micro_batch_size() * cfg.data.max_length,
        vocab as usize,
        output_tile(kernels),
    );
    let rows = 2 * cfg.micro_batch_size();
    let mut acts = activations(
        &config_json,
        rows,
        cfg.data.max_length,
        compute_bytes,
        kernels,
    )?;
    if let Some(l) = &lora {
        acts.block +=
            (rows * cfg.data.max_length) as f64 * l.per_token_per_block(compute_bytes, acts.layers);
    }
    let checkpointing = cfg.training.gradient_checkpointing;
    let before = weights + grads + optimizer + reference + logits;
    let memory = before + acts.total(checkpointing);
    // Data parallel: a bucket of gradients laid end to end, and its sum, besides the above.
    let per_gpu = match ranks {
        1 => memory,
        _ => memory + 2.0 * (cfg.training.ddp_bucket_cap_mb << 20) as f64,
    };

    // A streamed dataset is never read whole, here either: its length is unknown (as for an
    // IterableDataset), and `max_steps`, which streaming requires, is the run's length.
    let tokenized = match cfg.data.streaming {
        true => Err(anyhow::anyhow!(
            "streamed (data.streaming); the run is training.max_steps = {} steps",
            cfg.training.max_steps.unwrap_or(0)
        )),
        false => ModelSource::resolve(spec, &cfg.model.builtin, cfg.seed)
            .and_then(|src| {
                crate::data::load_tokenized(&cfg.data, &src.tokenizer()?, cfg.seed, src.dir())
            })
            .context("data not reachable"),
    };
    let steps = match tokenized {
        Ok(data) => json!({
            "train_pairs": data.train.len(),
            "steps_per_epoch": cfg.steps_per_epoch(data.train.len()),
            "total_steps": cfg.total_steps(data.train.len()),
        }),
        Err(err) => json!({ "unknown": format!("{err:#}") }),
    };
    Ok(json!({
        "model": spec,
        "config_json": config_origin,
        "model_type": config_json["model_type"],
        "params": total,
        "trainable_params": lora.as_ref().map_or(total, |l| l.params),
        "lora": lora.as_ref().map(|l| json!({
            "r": l.spec.r,
            "alpha": l.spec.alpha,
            "adapted_modules": l.modules,
            "reference": match (uses_reference, &cfg.model.ref_name_or_path, &cfg.model.adapter) {
                (false, _, _) => "none",
                (true, Some(_), _) => "ref_name_or_path",
                (true, None, Some(_)) => "the policy's frozen weights with model.adapter as it started",
                (true, None, None) => "the policy's frozen weights with the adapters off",
            },
        })),
        "lm_head_params": head_params,
        "lm_head_share_of_params": head_params as f64 / p,
        "lm_head_share_of_linear_work": linear_share,
        "logits_sam_flop_bound": 1.0 + 2.0 / 3.0 * linear_share,
        "memory_gib": {
            "weights": weights / GIB,
            "gradients": grads / GIB,
            "optimizer_state": optimizer / GIB,
            "reference_model": reference / GIB,
            "logits_per_micro_batch": logits / GIB,
            "total_before_activations": before / GIB,
            "activations_per_micro_batch": acts.total(checkpointing) / GIB,
            "activations_without_checkpointing": acts.total(false) / GIB,
            "activations_with_checkpointing": acts.total(true) / GIB,
            "total": memory / GIB,
        },
        "fits_80gb_gpu": memory <= GPU_80GB,
        "fits_141gb_gpu": memory <= GPU_141GB,
        "data_parallel": {
            "ranks": ranks,
            "micro_batches_per_rank_per_step": cfg.training.batch_size / (ranks * cfg.micro_batch_size()),
            "per_gpu_gib": per_gpu / GIB,
            "fits_80gb_gpu": per_gpu <= GPU_80GB,
            "optimizer_state_sharding": "none: each rank holds the whole model, gradients and optimizer state",
        },
        "gradient_checkpointing": checkpointing,
        "data": steps,
        "micro_batches_per_step": cfg.training.batch_size / cfg.micro_batch_size(),
        "sam": cfg.sam.kind,
    }))
}

/// The memory a run holds besides logits and activations, in bytes.
struct Memory {
    weights: f64,
    gradients: f64,
    optimizer: f64,
    reference: f64,
}

/// What LoRA adds to the plan: its settings, the adapted modules and their parameters.
struct LoraPlan {
    spec: crate::models::lora::LoraSpec,
    /// (module path, inputs, outputs).
    modules: Vec<(String, usize, usize)>,
    params: usize,
    dropout: bool,
}

impl LoraPlan {
    /// What the adapters keep for the backward per token of one block, in `e`-byte floats:
    /// per adapted layer, x A ᵀ (r), its product with Bᵀ, that scaled, and the sum with the
    /// base output (3 × out); with dropout, the mask and the masked input (2 × in).
    fn per_token_per_block(&self, e: f64, layers: usize) -> f64 {
        let per_layer: usize = self
            .modules
            .iter()
            .map(|(_, i, o)| self.spec.r + 3 * o + if self.dropout { 2 * i } else { 0 })
            .sum();
        e * per_layer as f64 / layers.max(1) as f64
    }
}

/// The LoRA part of the plan (`[lora]` or `model.adapter`), reading only the adapter's config
/// and header; an unknown `lora.target_modules` entry is an error here too.
fn lora_plan(cfg: &Config, config_json: &serde_json::Value) -> Result<Option<LoraPlan>> {
    use crate::models::lora::{self, AdapterFile};
    if !cfg.lora_enabled() {
        return Ok(None);
    }
    let start = cfg
        .model
        .adapter
        .as_deref()
        .map(AdapterFile::read)
        .transpose()?;
    let spec = lora::resolve_spec(cfg.lora.as_ref(), start.as_ref())?;
    let targets = cfg.lora.as_ref().and_then(|l| l.target_modules.as_ref());
    let modules = crate::models::lora_shapes(config_json, targets, start.as_ref())?;
    let params = modules.iter().map(|(_, i, o)| spec.r * (i + o)).sum();
    Ok(Some(LoraPlan {
        dropout: spec.dropout > 0.0,
        spec,
        modules,
        params,
    }))
}

/// The output layer's working memory for `tokens` scored tokens, in bytes: on the tiled path
/// (`tile`, see `kernels::output`) the forward's f32 logits when they fit its keep budget and a
/// tile of ∂L/∂logits, else a tile of each; on the unfused path logits, log-softmax and their
/// gradient, f32.
pub fn logits_bytes(tokens: usize, vocab: usize, tile: Option<Tile>) -> f64 {
    let all = 4.0 * (tokens * vocab) as f64;
    match tile {
        None => 3.0 * all,
        Some(t) => {
            let one = 4.0 * (t.rows.min(tokens) * t.vocab.min(vocab)) as f64;
            match all <= t.keep_bytes as f64 {
                true => all + one,
                false => 2.0 * one,
            }
        }
    }
}

/// Which kernels a run's ops use, which decides what they keep for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// candle's compositions (see models::ops): the CPU in half precision.
    Composed,
    /// The fused CPU kernels of [`crate::kernels`] (f32, f64), which keep only their outputs.
    CpuFused,
    /// The CUDA kernels: among them the tiled output layer, and the fused attention at the head
    /// dims it takes ([`crate::kernels::attention::cuda_head_dim_fits`]), which keeps no
    /// `[t, t]` scores.
    Cuda,
}

impl Kernels {
    /// On CUDA, or on the CPU computing in `compute_bytes`-byte floats.
    pub fn new(cuda: bool, compute_bytes: f64) -> Kernels {
        match (cuda, compute_bytes >= 4.0) {
            (true, _) => Kernels::Cuda,
            (false, true) => Kernels::CpuFused,
            (false, false) => Kernels::Composed,
        }
    }
}

/// The output layer's tile where its tiled path runs: on CUDA, and on the CPU in f32/f64.
pub fn output_tile(kernels: Kernels) -> Option<Tile> {
    match kernels {
        Kernels::Cuda => Some(Tile::CUDA),
        Kernels::CpuFused => Some(Tile::DEFAULT),
        Kernels::Composed => None,
    }
}

/// What the policy's forward pass keeps alive for its backward, per micro-batch, in bytes:
/// candle's graph holds every op's output that is not a view, so this counts them op by op, as
/// the model files compute (one place to update when they change).
pub struct Activations {
    /// One block's saved tensors.
    pub block: f64,
    /// One block's input, `[rows, t, hidden]`.
    pub block_input: f64,
    pub layers: usize,
    /// The embedding's output and the final norm's.
    pub outside: f64,
}

impl Activations {
    /// Without checkpointing, every block's tensors; with it, the blocks' inputs and output plus
    /// one block's tensors, alive while it is recomputed in the backward. Either way the
    /// backward through a block holds gradients about the size of its tensors: one more block.
    pub fn total(&self, checkpointing: bool) -> f64 {
        let blocks = if checkpointing {
            (self.layers + 1) as f64 * self.block_input + self.block
        } else {
            self.layers as f64 * self.block
        };
        blocks + self.block + self.outside
    }
}

/// The attention op a plan counts (the one `models::ops::attention` picks).
#[derive(Clone, Copy, PartialEq, Debug)]
enum AttentionOp {
    /// The composition: scores, scale, mask and softmax kept per element of `[t, t]`.
    Composed,
    /// The fused CPU op: its output only; k and v repeated to every head before it.
    FusedCpu,
    /// The fused CUDA op: its output and a log-sum-exp per row and head (two f32: the max and
    /// the log of the sum); k and v as they are under grouped-query attention.
    FusedCuda,
}

/// [`Activations`] of the model `config_json` describes for `rows` sequences of `t` tokens,
/// computing in `e`-byte floats with `kernels`.
pub fn activations(
    config_json: &serde_json::Value,
    rows: usize,
    t: usize,
    e: f64,
    kernels: Kernels,
) -> Result<Activations> {
    let (fused, cuda) = (kernels == Kernels::CpuFused, kernels == Kernels::Cuda);
    let attention_op = |head_dim: usize| {
        if fused {
            AttentionOp::FusedCpu
        } else if cuda && crate::kernels::attention::cuda_head_dim_fits(head_dim) {
            AttentionOp::FusedCuda
        } else {
            AttentionOp::Composed
        }
    };
    use crate::models::{gpt2, gpt_neox, mistral, ops::rope_settings};
    // Reductions run in f32 for half-precision inputs (models::ops::accum_dtype).
    let half = e < 4.0;
    let f = if half { 4.0 } else { e };
    let casts = if half { f + e } else { 0.0 };
    // Bytes per token of one tensor `w` wide, and of the ops built from several.
    let layer_norm = |w: f64| {
        if fused {
            e * w
        } else {
            (casts + 3.0 * f + 2.0 * e) * w
        }
    };
    let rms_norm = |w: f64| {
        if fused {
            e * w
        } else {
            (casts + 2.0 * f + e) * w
        }
    };
    // rotate-half on a fraction `r` of the features: neg, cat, two products, a sum (+ a cat).
    let rotary = |w: f64, r: f64| {
        if fused {
            e * w
        } else {
            4.5 * r * w * e + if r < 1.0 { e * w } else { 0.0 }
        }
    };
    // The fused dense layer adds its bias inside the matmul; composed, the sum is a second tensor.
    let linear = |w: f64, bias: bool| if bias && !fused { 2.0 * e * w } else { e * w };
    // Per head and element of the [t, t] scores: none fused (the backward recomputes them);
    // composed, each step of scale, mask and softmax (in f32 for half inputs).
    let core = |op: AttentionOp| match op {
        AttentionOp::Composed => 3.0 * e + 3.0 * f + casts,
        AttentionOp::FusedCpu | AttentionOp::FusedCuda => 0.0,
    };
    // Per token and head: the fused CUDA op's log-sum-exp (two f32).
    let lse = |op: AttentionOp| {
        if op == AttentionOp::FusedCuda {
            8.0
        } else {
            0.0
        }
    };
    let json = config_json.clone();
    let (hidden, layers, heads, per_token, core) = match config_json["model_type"].as_str() {
        Some("gpt2") => {
            let c: gpt2::Config = serde_json::from_value(json)?;
            let (h, i) = (c.n_embd as f64, c.n_inner.unwrap_or(4 * c.n_embd) as f64);
            // c_attn (+bias), then the merged attention output (fused) or q/k/v copied
            // twice (reshaping a narrowed tensor copies), the attention output and its merged
            // copy; c_proj (+bias), residual; c_fc (+bias), activation, c_proj (+bias), residual.
            let op = attention_op(c.n_embd / c.n_head);
            let attention = match op {
                AttentionOp::Composed => e * (6.0 + 2.0) * h,
                _ => e * h + lse(op) * c.n_head as f64,
            };
            let tok = 2.0 * layer_norm(h)
                + linear(3.0 * h, true)
                + attention
                + linear(h, true)
                + e * h
                + linear(i, true)
                + e * i
                + linear(h, true)
                + e * h;
            (c.n_embd, c.n_layer, c.n_head, tok, core(op))
        }
        Some("gpt_neox") => {
            let c: gpt_neox::Config = serde_json::from_value(json)?;
            let (_, pct) = rope_settings(
                c.rope_parameters.as_ref(),
                c.rope_scaling.as_ref(),
                None,
                c.partial_rotary_factor.or(c.rotary_pct),
            )?;
            let (h, i, bias) = (
                c.hidden_size as f64,
                c.intermediate_size as f64,
                c.attention_bias,
            );
            // query_key_value, then the merged attention output (fused) or q/k/v copies,
            // rotary on q and k, the attention output and its merged copy; dense; the MLP
            // (biased) and its activation; two residual sums.
            let op = attention_op(c.hidden_size / c.num_attention_heads);
            let attention = match op {
                AttentionOp::Composed => {
                    3.0 * e * h + 2.0 * rotary(h, pct.unwrap_or(0.25)) + 2.0 * e * h
                }
                _ => e * h + lse(op) * c.num_attention_heads as f64,
            };
            let tok = 2.0 * layer_norm(h)
                + linear(3.0 * h, bias)
                + attention
                + linear(h, bias)
                + linear(i, true)
                + e * i
                + linear(h, true)
                + 2.0 * e * h;
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                tok,
                core(op),
            )
        }
        Some("mistral" | "llama") => {
            let c: mistral::Config = serde_json::from_value(json)?;
            let llama = c.model_type == "llama";
            let n_head = c.num_attention_heads;
            let n_kv = c.num_key_value_heads.unwrap_or(n_head);
            let hd = c.head_dim.unwrap_or(c.hidden_size / n_head);
            let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
            let (q, kv) = ((n_head * hd) as f64, (n_kv * hd) as f64);
            let (ab, mb) = (llama && c.attention_bias, llama && c.mlp_bias);
            // q/k/v projections and their copies, rotary on q and k, the repeated k and v,
            // attention output and its copy, o_proj, residual; gate, up, activation, product,
            // down, residual. The fused CUDA attention takes k and v unrepeated.
            let op = attention_op(hd);
            let repeated = if n_kv < n_head && op != AttentionOp::FusedCuda {
                2.0 * e * q
            } else {
                0.0
            };
            let tok = 2.0 * rms_norm(h)
                + linear(q, ab)
                + 2.0 * linear(kv, ab)
                + e * (q + 2.0 * kv)
                + rotary(q, 1.0)
                + rotary(kv, 1.0)
                + repeated
                + 2.0 * e * q
                + lse(op) * n_head as f64
                + linear(h, ab)
                + 2.0 * linear(i, mb)
                + 2.0 * e * i
                + linear(h, mb)
                + 2.0 * e * h;
            (c.hidden_size, c.num_hidden_layers, n_head, tok, core(op))
        }
        other => anyhow::bail!("no activation estimate for model_type {other:?}"),
    };
    let tokens = (rows * t) as f64;
    let h = hidden as f64;
    Ok(Activations {
        block: tokens * per_token + (rows * heads * t * t) as f64 * core,
        block_input: tokens * e * h,
        layers,
        outside: tokens * (e * h + layer_norm(h)),
    })
}

/// Prints the plan for a person.
pub fn print(cfg: &Config, ranks: usize) -> Result<()> {
    let plan = plan(cfg, ranks)?;
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
    if let Some(lora) = plan["lora"].as_object() {
        println!(
            "LoRA         r {}, alpha {}, {} adapted layers, {} trainable parameters ({:.3}%) on frozen weights; reference: {}",
            lora["r"],
            lora["alpha"],
            lora["adapted_modules"].as_array().map_or(0, Vec::len),
            plan["trainable_params"],
            100.0 * plan["trainable_params"].as_f64().unwrap_or(0.0) / plan["params"].as_f64().unwrap_or(1.0),
            lora["reference"].as_str().unwrap_or("")
        );
    }
    println!(
        "logits-SAM   FLOP bound {:.3}× a plain step",
        plan["logits_sam_flop_bound"].as_f64().unwrap_or(1.0)
    );
    println!("memory (GiB) weights {:.2}, gradients {:.2}, optimizer {:.2}, reference {:.2}, logits/micro-batch {:.2}, activations/micro-batch {:.2}; total {:.2}", g("weights"), g("gradients"), g("optimizer_state"), g("reference_model"), g("logits_per_micro_batch"), g("activations_per_micro_batch"), g("total"));
    let on = plan["gradient_checkpointing"].as_bool().unwrap_or(false);
    let other = g("total") - g("activations_per_micro_batch")
        + g(if on {
            "activations_without_checkpointing"
        } else {
            "activations_with_checkpointing"
        });
    let fits = |key: &str| match plan[key].as_bool().unwrap_or(false) {
        true => "fits",
        false => "does not fit",
    };
    println!(
        "             activations estimated: {:.2} with training.gradient_checkpointing, {:.2} without; total {:.2} with it {}; {} one 80 GB GPU ({:.1} GiB), {} one 141 GB GPU ({:.1} GiB)",
        g("activations_with_checkpointing"),
        g("activations_without_checkpointing"),
        other,
        if on { "off" } else { "on" },
        fits("fits_80gb_gpu"),
        GPU_80GB / GIB,
        fits("fits_141gb_gpu"),
        GPU_141GB / GIB
    );
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
    let dp = &plan["data_parallel"];
    if ranks > 1 {
        println!(
            "parallel     {ranks} ranks, each {} micro-batch(es) of {} pairs per step; per GPU {:.2} GiB (every rank holds the whole model, gradients and optimizer state, plus two {} MiB gradient buckets; no ZeRO sharding): {} one 80 GB GPU",
            dp["micro_batches_per_rank_per_step"],
            cfg.micro_batch_size(),
            dp["per_gpu_gib"].as_f64().unwrap_or(0.0),
            cfg.training.ddp_bucket_cap_mb,
            if dp["fits_80gb_gpu"].as_bool().unwrap_or(false) { "fits" } else { "does not fit" },
        );
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
            let plan = plan(&cfg, 1).unwrap();
            assert_eq!(plan["params"].as_u64().unwrap() as usize, params, "{file}");
            let got = plan["lm_head_share_of_params"].as_f64().unwrap();
            assert!(
                (got - share).abs() < 5e-4,
                "{file}: lm_head share {got}, the paper says {share}"
            );
        }
    }

    #[test]
    fn pythia_dpo_fits_one_80gb_gpu_with_gradient_checkpointing() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hh_pythia.toml");
        // The config's own micro-batch (4 pairs × 512 tokens) in its bf16 mixed precision.
        let at = |on: bool| {
            let set = [
                "data.max_length=512".into(),
                format!("training.gradient_checkpointing={on}"),
            ];
            plan(&Config::load(&path, &set).unwrap(), 1).unwrap()
        };
        assert_eq!(at(true)["fits_80gb_gpu"], true, "{}", at(true));
        assert_eq!(at(false)["fits_80gb_gpu"], false, "{}", at(false));
    }

    fn config(file: &str, set: &[&str]) -> Config {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        Config::load(&path, &set).unwrap()
    }

    fn gib(plan: &serde_json::Value, key: &str) -> f64 {
        plan["memory_gib"][key].as_f64().unwrap()
    }

    #[test]
    fn mistral_lora_fits_one_80gb_gpu_with_margin_and_loads_no_reference() {
        let plan = plan(&config("configs/ultrafeedback_mistral_lora.toml", &[]), 1).unwrap();
        // q, k, v, o, gate, up, down in 32 layers at r = 128: r · Σ (in + out).
        let per_layer = 128 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336));
        assert_eq!(
            plan["trainable_params"].as_u64().unwrap(),
            32 * per_layer as u64
        );
        assert_eq!(
            plan["lora"]["adapted_modules"].as_array().unwrap().len(),
            32 * 7
        );
        assert_eq!(gib(&plan, "reference_model"), 0.0, "{plan}");
        // The frozen base in bf16, not f32; the adapters' f32 masters and their bf16 copy.
        let base = 7_241_732_096.0 * 2.0 / GIB;
        let adapters = (32 * per_layer) as f64 * 6.0 / GIB;
        assert!(
            (gib(&plan, "weights") - base - adapters).abs() < 0.01,
            "{plan}"
        );
        // A quarter of the GPU to spare at the config's micro-batch.
        assert!(gib(&plan, "total") < 0.75 * GPU_80GB / GIB, "{plan}");
        // An explicit reference is a second copy of the weights.
        let with_ref = config(
            "configs/ultrafeedback_mistral_lora.toml",
            &["model.ref_name_or_path=\"mistralai/Mistral-7B-v0.1\""],
        );
        let second = super::plan(&with_ref, 1).unwrap();
        assert!(
            (gib(&second, "reference_model") - base).abs() < 0.01,
            "{second}"
        );
    }

    #[test]
    fn full_mistral_dpo_fits_141gb_only_with_stochastic_rounding() {
        let mixed = plan(&config("configs/ultrafeedback_mistral.toml", &[]), 1).unwrap();
        // f32 masters + their bf16 copy; AdamW in f32.
        let p = 7_241_732_096.0;
        assert!(
            (gib(&mixed, "weights") - p * 6.0 / GIB).abs() < 0.1,
            "{mixed}"
        );
        assert!(
            (gib(&mixed, "optimizer_state") - p * 8.0 / GIB).abs() < 0.1,
            "{mixed}"
        );
        assert_eq!(mixed["fits_141gb_gpu"], false, "{mixed}");
        let sr = plan(
            &config(
                "configs/ultrafeedback_mistral.toml",
                &[
                    "model.dtype=\"bf16\"",
                    "training.mixed_precision=\"no\"",
                    "training.bf16_stochastic_rounding=true",
                ],
            ),
            1,
        )
        .unwrap();
        assert!((gib(&sr, "weights") - p * 2.0 / GIB).abs() < 0.1, "{sr}");
        assert!(
            (gib(&sr, "optimizer_state") - p * 4.0 / GIB).abs() < 0.1,
            "{sr}"
        );
        assert_eq!(sr["fits_141gb_gpu"], true, "{sr}");
        assert_eq!(sr["fits_80gb_gpu"], false, "{sr}");
    }

    /// On CUDA the fused attention keeps nothing `[t, t]`-sized: a block's activations grow
    /// linearly in t at head dims it takes (Pythia's 80, Mistral's 128), quadratically where
    /// attention is the composition (GPT-2 with 160-wide heads here).
    #[test]
    fn cuda_attention_keeps_no_scores() {
        let pythia: serde_json::Value = serde_json::from_str(PYTHIA_2_8B).unwrap();
        let mistral: serde_json::Value = serde_json::from_str(MISTRAL_7B).unwrap();
        let wide = serde_json::json!({"model_type": "gpt2", "vocab_size": 100, "n_embd": 640,
            "n_layer": 2, "n_head": 4, "n_positions": 2048});
        let block = |json: &serde_json::Value, t: usize, cuda: bool| {
            activations(json, 8, t, 2.0, Kernels::new(cuda, 2.0))
                .unwrap()
                .block
        };
        for json in [&pythia, &mistral] {
            assert_eq!(block(json, 1024, true), 2.0 * block(json, 512, true));
            assert!(block(json, 1024, false) > 2.1 * block(json, 512, false));
        }
        assert!(block(&wide, 1024, true) > 2.1 * block(&wide, 512, true));
        // What the composition kept more at Pythia-2.8B, 8 × 512 tokens, per layer: 24 bytes a
        // score (bf16 inputs, f32 softmax), 1.5 GiB, and its q/k/v copies and rotaries.
        let saved = (block(&pythia, 512, false) - block(&pythia, 512, true)) / (1u64 << 30) as f64;
        assert!((1.5..1.8).contains(&saved), "{saved} GiB");
    }

    #[test]
    fn builtin_plan_counts_loaded_parameters_and_data() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/configs/tiny_gpt2.toml"
        ))
        .unwrap();
        let cfg = Config::parse(&text, "tiny_gpt2.toml", &[]).unwrap();
        let plan = plan(&cfg, 1).unwrap();
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
        // Streamed data is not read to plan: its length is max_steps.
        let set = ["data.streaming=true".into(), "training.max_steps=7".into()];
        let streamed =
            super::plan(&Config::parse(&text, "tiny_gpt2.toml", &set).unwrap(), 1).unwrap();
        assert!(streamed["data"].get("steps_per_epoch").is_none());
        let why = streamed["data"]["unknown"].as_str().unwrap();
        assert!(
            why.contains("data.streaming") && why.contains("= 7 steps"),
            "{why}"
        );
    }
}
