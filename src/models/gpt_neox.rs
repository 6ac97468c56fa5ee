//! GPT-NeoX / Pythia (`model_type = "gpt_neox"`, `GPTNeoXForCausalLM`), trainable.
//!
//! Mirrors `transformers`' modeling_gpt_neox: a fused `query_key_value` projection whose output
//! is laid out per head as `[q | k | v]` (not `[all q | all k | all v]` as in GPT-2), rotary
//! embeddings on the first `rotary_pct` of each head, LayerNorm with bias, a parallel or
//! sequential residual, and an untied `embed_out` unless `tie_word_embeddings`.

use super::cache::{KvCache, Step};
use super::checkpoint::{run_blocks, GradSink};
use super::ops::LayerNorm;
use super::ops::RopeParameters;
use super::ops::{attention, causal_mask, linear, merge_heads, packed_attention, split_qkv};
use super::ops::{rope_settings, rotary, rotary_tables, Linear};
use super::output::OutputLayer;
use super::CausalLm;
use crate::kernels::attention::QkvPacking;
use crate::kernels::dense::Activation;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "activation")]
    pub hidden_act: String,
    #[serde(default = "yes")]
    pub use_parallel_residual: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// transformers ≥ 5 nests `rope_theta` and `partial_rotary_factor` here.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// Pythia's spelling of the rotary fraction; newer configs say `partial_rotary_factor`.
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Pythia's spelling of the RoPE base; newer configs say `rope_theta`.
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default = "std_init")]
    pub initializer_range: f64,
}

fn eps() -> f64 {
    1e-5
}
fn activation() -> String {
    "gelu".into()
}
fn yes() -> bool {
    true
}
fn std_init() -> f64 {
    0.02
}

struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    n_head: usize,
    parallel: bool,
    act: Activation,
}

impl Layer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (n, inner, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        let bias = cfg.attention_bias;
        Ok(Self {
            input_layernorm: LayerNorm::new(n, cfg.layer_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: LayerNorm::new(
                n,
                cfg.layer_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            query_key_value: linear(n, 3 * n, bias, std, vb.pp("attention.query_key_value"))?,
            dense: linear(n, n, bias, std, vb.pp("attention.dense"))?,
            // The MLP always has biases, whatever `attention_bias` says.
            dense_h_to_4h: linear(n, inner, true, std, vb.pp("mlp.dense_h_to_4h"))?,
            dense_4h_to_h: linear(inner, n, true, std, vb.pp("mlp.dense_4h_to_h"))?,
            n_head: cfg.num_attention_heads,
            parallel: cfg.use_parallel_residual,
            act: Activation::parse("hidden_act", &cfg.hidden_act)?,
        })
    }

    /// With `cache` (the cache and this layer's index), keys and values of earlier steps join
    /// this step's.
    fn attention(
        &self,
        x: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let qkv = self.query_key_value.forward(x)?;
        let rope = rope.map(|(cos, sin)| (cos, sin));
        let y = match cache {
            None => packed_attention(&qkv, QkvPacking::PerHead, self.n_head, rope, mask)?,
            Some((cache, layer)) => {
                let (q, k, v) = split_qkv(&qkv, QkvPacking::PerHead, self.n_head)?;
                let (q, k) = match rope {
                    Some((cos, sin)) => (rotary(&q, cos, sin)?, rotary(&k, cos, sin)?),
                    None => (q, k),
                };
                let (k, v) = cache.append(layer, &k, &v)?;
                merge_heads(&attention(&q, &k, &v, mask)?)?
            }
        };
        self.dense.forward(&y)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_4h_to_h
            .forward(&self.act.apply(&self.dense_h_to_4h.forward(x)?)?)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let attn = self.attention(&self.input_layernorm.forward(x)?, rope, mask, cache)?;
        if self.parallel {
            // Both branches read the same input: x + attn(ln1(x)) + mlp(ln2(x)).
            let mlp = self.mlp(&self.post_attention_layernorm.forward(x)?)?;
            (x + attn)? + mlp
        } else {
            let x = (x + attn)?;
            let mlp = self.mlp(&self.post_attention_layernorm.forward(&x)?)?;
            x + mlp
        }
    }
}

pub struct GptNeox {
    embed_in: Tensor,
    layers: Vec<Arc<Layer>>,
    final_layer_norm: LayerNorm,
    embed_out: Tensor,
    rotary_dim: usize,
    rope_base: f64,
    checkpoint: Option<GradSink>,
}

impl GptNeox {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        let (theta, pct) = rope_settings(
            cfg.rope_parameters.as_ref(),
            cfg.rope_scaling.as_ref(),
            cfg.rope_theta.or(cfg.rotary_emb_base),
            cfg.partial_rotary_factor.or(cfg.rotary_pct),
        )?;
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
        // `int(head_size * rotary_pct)` in transformers: truncation, not rounding.
        let rotary_dim = (head_dim as f64 * pct.unwrap_or(0.25)) as usize;
        if !rotary_dim.is_multiple_of(2) {
            candle_core::bail!(
                "rotary dimension {rotary_dim} (head_dim {head_dim} × rotary_pct) must be even"
            );
        }
        let std = cfg.initializer_range;
        let init = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let base = vb.pp("gpt_neox");
        let embed_in =
            base.get_with_hints((cfg.vocab_size, cfg.hidden_size), "embed_in.weight", init)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, base.pp(format!("layers.{i}"))).map(Arc::new))
            .collect::<Result<_>>()?;
        let final_layer_norm = LayerNorm::new(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            base.pp("final_layer_norm"),
        )?;
        let embed_out = if cfg.tie_word_embeddings {
            embed_in.clone()
        } else {
            vb.get_with_hints((cfg.vocab_size, cfg.hidden_size), "embed_out.weight", init)?
        };
        Ok(Self {
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rotary_dim,
            rope_base: theta.unwrap_or(10_000.0),
            checkpoint: None,
        })
    }
}

impl CausalLm for GptNeox {
    fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let x = candle_nn::Embedding::new(self.embed_in.clone(), self.embed_in.dim(1)?)
            .forward(input_ids)?;
        let rope = match self.rotary_dim {
            0 => None,
            d => Some(rotary_tables(t, d, self.rope_base, x.dtype(), x.device())?),
        };
        let mask = causal_mask(t, None, x.dtype(), x.device())?;
        let x = run_blocks(x, &self.layers, self.checkpoint.as_ref(), move |l, x| {
            l.forward(x, rope.as_ref(), &mask, None)
        })?;
        self.final_layer_norm.forward(&x)
    }

    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let mut x = candle_nn::Embedding::new(self.embed_in.clone(), self.embed_in.dim(1)?)
            .forward(input_ids)?;
        let step = Step::new(attention_mask, t, cache.len(), None, x.dtype(), x.device())?;
        let rope = match self.rotary_dim {
            0 => None,
            d => Some(step.rotary(d, self.rope_base, x.dtype())?),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, rope.as_ref(), &step.mask, Some((&mut *cache, i)))?;
        }
        self.final_layer_norm.forward(&x)
    }

    fn set_checkpointing(&mut self, sink: Option<GradSink>) {
        self.checkpoint = sink;
    }

    fn dense_layers(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.query_key_value,
                    &l.dense,
                    &l.dense_h_to_4h,
                    &l.dense_4h_to_h,
                ]
            })
            .collect()
    }

    fn output_layer(&self) -> OutputLayer {
        OutputLayer {
            weight: self.embed_out.clone(),
            bias: None,
        }
    }
}
