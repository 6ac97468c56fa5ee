//! Mistral and Llama (`model_type = "mistral"` / `"llama"`, `MistralForCausalLM` /
//! `LlamaForCausalLM`), trainable; one implementation because Mistral is Llama plus a sliding
//! attention window.
//!
//! Mirrors `transformers`' modeling_llama / modeling_mistral: RMSNorm, rotate-half RoPE,
//! grouped-query attention (`num_key_value_heads` kv heads shared by consecutive query heads),
//! a SwiGLU MLP, and `lm_head` tied to `embed_tokens` only when `tie_word_embeddings`.
//! What each family ignores is ignored here too: Llama has no sliding window, and Mistral's
//! projections never have biases.

use super::cache::{KvCache, Step};
use super::checkpoint::{run_blocks, GradSink};
use super::ops::{attention, causal_mask, linear, rms_norm, rope_settings, rotary, rotary_tables};
use super::ops::{merge_heads, Linear, RopeParameters};
use super::output::OutputLayer;
use super::CausalLm;
use crate::kernels::dense::Activation;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent means plain multi-head attention.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Absent or null means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "activation")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// transformers ≥ 5 nests `rope_theta` here.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// Mistral only; null means full causal attention.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama only.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama only.
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "std_init")]
    pub initializer_range: f64,
}

fn activation() -> String {
    "silu".into()
}
fn eps() -> f64 {
    1e-6
}
fn std_init() -> f64 {
    0.02
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(n: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(n, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    act: Activation,
}

impl Layer {
    fn new(cfg: &Config, shape: &Shape, vb: VarBuilder) -> Result<Self> {
        let (n, inner, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        let (q_out, kv_out) = (
            shape.n_head * shape.head_dim,
            shape.n_kv_head * shape.head_dim,
        );
        let (ab, mb) = (shape.attention_bias, shape.mlp_bias);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: RmsNorm::new(n, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                n,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            q_proj: linear(n, q_out, ab, std, attn.pp("q_proj"))?,
            k_proj: linear(n, kv_out, ab, std, attn.pp("k_proj"))?,
            v_proj: linear(n, kv_out, ab, std, attn.pp("v_proj"))?,
            o_proj: linear(q_out, n, ab, std, attn.pp("o_proj"))?,
            gate_proj: linear(n, inner, mb, std, mlp.pp("gate_proj"))?,
            up_proj: linear(n, inner, mb, std, mlp.pp("up_proj"))?,
            down_proj: linear(inner, n, mb, std, mlp.pp("down_proj"))?,
            n_head: shape.n_head,
            n_kv_head: shape.n_kv_head,
            head_dim: shape.head_dim,
            act: Activation::parse("hidden_act", &cfg.hidden_act)?,
        })
    }

    /// With `cache` (the cache and this layer's index), keys and values of earlier steps join
    /// this step's; the cache keeps the `n_kv_head` heads, before they are repeated.
    fn attention(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = |proj: &Linear, n: usize| -> Result<Tensor> {
            proj.forward(x)?
                .reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rotary(&heads(&self.q_proj, self.n_head)?, cos, sin)?;
        let k = rotary(&heads(&self.k_proj, self.n_kv_head)?, cos, sin)?;
        let v = heads(&self.v_proj, self.n_kv_head)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let y = attention(&q, &k, &v, mask)?;
        self.o_proj.forward(&merge_heads(&y)?)
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let x = (x + self.attention(&self.input_layernorm.forward(x)?, cos, sin, mask, cache)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let gated = self
            .act
            .gated(&self.gate_proj.forward(&h)?, &self.up_proj.forward(&h)?)?;
        x + self.down_proj.forward(&gated)?
    }
}

/// The per-family settings resolved from the config.
struct Shape {
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    attention_bias: bool,
    mlp_bias: bool,
}

pub struct Mistral {
    embed_tokens: Tensor,
    layers: Vec<Arc<Layer>>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary_dim: usize,
    rope_base: f64,
    sliding_window: Option<usize>,
    checkpoint: Option<GradSink>,
}

impl Mistral {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let llama = match cfg.model_type.as_str() {
            "llama" => true,
            "mistral" => false,
            other => candle_core::bail!("model_type `{other}` is neither llama nor mistral"),
        };
        let n_head = cfg.num_attention_heads;
        let n_kv_head = cfg.num_key_value_heads.unwrap_or(n_head);
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            candle_core::bail!(
                "num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv_head}"
            );
        }
        let head_dim = match cfg.head_dim {
            Some(d) => d,
            None if cfg.hidden_size.is_multiple_of(n_head) => cfg.hidden_size / n_head,
            None => candle_core::bail!(
                "hidden_size {} is not divisible by num_attention_heads {n_head}",
                cfg.hidden_size
            ),
        };
        let (theta, partial) = rope_settings(
            cfg.rope_parameters.as_ref(),
            cfg.rope_scaling.as_ref(),
            cfg.rope_theta,
            cfg.partial_rotary_factor,
        )?;
        let rotary_dim = (head_dim as f64 * partial.unwrap_or(1.0)) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            candle_core::bail!("rotary dimension {rotary_dim} (head_dim {head_dim} × partial_rotary_factor) must be even and positive");
        }
        let shape = Shape {
            n_head,
            n_kv_head,
            head_dim,
            attention_bias: llama && cfg.attention_bias,
            mlp_bias: llama && cfg.mlp_bias,
        };
        let init = Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let base = vb.pp("model");
        let embed_tokens = base.get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "embed_tokens.weight",
            init,
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, &shape, base.pp(format!("layers.{i}"))).map(Arc::new))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, base.pp("norm"))?;
        // A tied checkpoint may still carry an `lm_head.weight` copy; like transformers, ignore it.
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.get_with_hints((cfg.vocab_size, cfg.hidden_size), "lm_head.weight", init)?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary_dim,
            rope_base: theta.unwrap_or(10_000.0),
            sliding_window: if llama { None } else { cfg.sliding_window },
            checkpoint: None,
        })
    }
}

impl CausalLm for Mistral {
    fn forward_hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let x = candle_nn::Embedding::new(self.embed_tokens.clone(), self.embed_tokens.dim(1)?)
            .forward(input_ids)?;
        let (cos, sin) = rotary_tables(t, self.rotary_dim, self.rope_base, x.dtype(), x.device())?;
        let mask = causal_mask(t, self.sliding_window, x.dtype(), x.device())?;
        let x = run_blocks(x, &self.layers, self.checkpoint.as_ref(), move |l, x| {
            l.forward(x, &cos, &sin, &mask, None)
        })?;
        self.norm.forward(&x)
    }

    fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        let mut x = candle_nn::Embedding::new(self.embed_tokens.clone(), self.embed_tokens.dim(1)?)
            .forward(input_ids)?;
        let step = Step::new(
            attention_mask,
            t,
            cache.len(),
            self.sliding_window,
            x.dtype(),
            x.device(),
        )?;
        let (cos, sin) = step.rotary(self.rotary_dim, self.rope_base, x.dtype())?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, &step.mask, Some((&mut *cache, i)))?;
        }
        self.norm.forward(&x)
    }

    fn set_checkpointing(&mut self, sink: Option<GradSink>) {
        self.checkpoint = sink;
    }

    fn dense_layers(&self) -> Vec<&Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
            })
            .collect()
    }

    fn output_layer(&self) -> OutputLayer {
        OutputLayer {
            weight: self.lm_head.clone(),
            bias: None,
        }
    }
}
