//! GPT-2 (`model_type = "gpt2"`, `GPT2LMHeadModel`), trainable.
//!
//! Mirrors `transformers`' modeling_gpt2: learned positions, pre-LayerNorm blocks, Conv1D
//! projections stored `[in, out]` (so y = x W + b, no transpose), and `lm_head` tied to `wte`.

use super::cache::{KvCache, Step};
use super::checkpoint::{run_blocks, GradSink};
use super::ops::{attention, causal_mask, merge_heads, packed_attention, split_qkv};
use super::ops::{LayerNorm, Linear};
use super::output::OutputLayer;
use super::CausalLm;
use crate::kernels::attention::QkvPacking;
use crate::kernels::dense::{Activation, WeightLayout};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    #[serde(default = "model_type")]
    pub model_type: String,
    #[serde(default = "architectures")]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "activation")]
    pub activation_function: String,
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default = "std_init")]
    pub initializer_range: f64,
}

fn model_type() -> String {
    "gpt2".into()
}
fn architectures() -> Vec<String> {
    vec!["GPT2LMHeadModel".into()]
}
fn activation() -> String {
    "gelu_new".into()
}
fn eps() -> f64 {
    1e-5
}
fn std_init() -> f64 {
    0.02
}

impl Config {
    /// The built-in tiny model's config for a tokenizer of `vocab` tokens (id 0 is EOS/BOS).
    pub fn tiny(shape: &crate::config::BuiltinModel, vocab: usize) -> Self {
        Config {
            model_type: model_type(),
            architectures: architectures(),
            vocab_size: vocab,
            n_positions: shape.n_positions,
            n_embd: shape.n_embd,
            n_layer: shape.n_layer,
            n_head: shape.n_head,
            n_inner: None,
            activation_function: activation(),
            layer_norm_epsilon: eps(),
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: Some(0),
            eos_token_id: Some(0),
            initializer_range: std_init(),
        }
    }
}

/// HF's Conv1D: a dense layer with weight `[in, out]`.
fn conv1d(n_in: usize, n_out: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: std,
    };
    let weight = vb.get_with_hints((n_in, n_out), "weight", init)?;
    let bias = vb.get_with_hints(n_out, "bias", Init::Const(0.0))?;
    Ok(Linear::new(
        weight,
        Some(bias),
        WeightLayout::InOut,
        vb.prefix(),
    ))
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    n_head: usize,
    act: Activation,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let n = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * n);
        let std = cfg.initializer_range;
        // GPT-2 scales residual projections by 1/sqrt(2·n_layer) at init.
        let proj_std = std / (2.0 * cfg.n_layer as f64).sqrt();
        Ok(Self {
            ln_1: LayerNorm::new(n, cfg.layer_norm_epsilon, vb.pp("ln_1"))?,
            c_attn: conv1d(n, 3 * n, std, vb.pp("attn.c_attn"))?,
            attn_proj: conv1d(n, n, proj_std, vb.pp("attn.c_proj"))?,
            ln_2: LayerNorm::new(n, cfg.layer_norm_epsilon, vb.pp("ln_2"))?,
            c_fc: conv1d(n, inner, std, vb.pp("mlp.c_fc"))?,
            mlp_proj: conv1d(inner, n, proj_std, vb.pp("mlp.c_proj"))?,
            n_head: cfg.n_head,
            act: Activation::parse("activation_function", &cfg.activation_function)?,
        })
    }

    /// With `cache` (the cache and this block's index), keys and values of earlier steps join
    /// this step's.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)?)?;
        let y = match cache {
            None => packed_attention(&qkv, QkvPacking::Blocked, self.n_head, None, mask)?,
            Some((cache, layer)) => {
                let (q, k, v) = split_qkv(&qkv, QkvPacking::Blocked, self.n_head)?;
                let (k, v) = cache.append(layer, &k, &v)?;
                merge_heads(&attention(&q, &k, &v, mask)?)?
            }
        };
        let x = (x + self.attn_proj.forward(&y)?)?;
        let h = self
            .act
            .apply(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        x + self.mlp_proj.forward(&h)?
    }
}

pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Arc<Block>>,
    ln_f: LayerNorm,
    checkpoint: Option<GradSink>,
}

impl Gpt2 {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            candle_core::bail!(
                "n_embd {} is not divisible by n_head {}",
                cfg.n_embd,
                cfg.n_head
            );
        }
        if cfg.scale_attn_by_inverse_layer_idx {
            candle_core::bail!("scale_attn_by_inverse_layer_idx = true is not supported");
        }
        // Checkpoints saved by `transformers` sometimes drop the `transformer.` prefix.
        let vb =
            if vb.contains_tensor("transformer.wte.weight") || !vb.contains_tensor("wte.weight") {
                vb.pp("transformer")
            } else {
                vb
            };
        let std = cfg.initializer_range;
        let wte = vb.get_with_hints(
            (cfg.vocab_size, cfg.n_embd),
            "wte.weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let wpe = vb.get_with_hints(
            (cfg.n_positions, cfg.n_embd),
            "wpe.weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, vb.pp(format!("h.{i}"))).map(Arc::new))
            .collect::<Result<_>>()?;
        let ln_f = LayerNorm::new(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))?;
        Ok(Self {
            wte,
            wpe,
            blocks,
            ln_f,
            checkpoint: None,
        })
    }
}

impl CausalLm for Gpt2 {
    fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let max_pos = self.wpe.dim(0)?;
        if t > max_pos {
            candle_core::bail!("sequence of {t} tokens exceeds n_positions {max_pos}");
        }
        let tok =
            candle_nn::Embedding::new(self.wte.clone(), self.wte.dim(1)?).forward(input_ids)?;
        let pos = self.wpe.narrow(0, 0, t)?;
        let x = tok.broadcast_add(&pos)?;
        let mask = causal_mask(t, None, x.dtype(), x.device())?;
        let x = run_blocks(x, &self.blocks, self.checkpoint.as_ref(), move |b, x| {
            b.forward(x, &mask, None)
        })?;
        self.ln_f.forward(&x)
    }

    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let step = Step::new(
            attention_mask,
            t,
            cache.len(),
            None,
            self.wte.dtype(),
            self.wte.device(),
        )?;
        let max_pos = self.wpe.dim(0)?;
        if step.max_position >= max_pos {
            candle_core::bail!(
                "position {} exceeds n_positions {max_pos}",
                step.max_position
            );
        }
        let n = self.wte.dim(1)?;
        let tok = candle_nn::Embedding::new(self.wte.clone(), n).forward(input_ids)?;
        let pos = candle_nn::Embedding::new(self.wpe.clone(), n).forward(&step.positions)?;
        let mut x = (tok + pos)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &step.mask, Some((&mut *cache, i)))?;
        }
        self.ln_f.forward(&x)
    }

    fn set_checkpointing(&mut self, sink: Option<GradSink>) {
        self.checkpoint = sink;
    }

    fn dense_layers(&self) -> Vec<&Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.c_attn, &b.attn_proj, &b.c_fc, &b.mlp_proj])
            .collect()
    }

    fn output_layer(&self) -> OutputLayer {
        OutputLayer {
            weight: self.wte.clone(),
            bias: None,
        }
    }
}
