//! Differentiable building blocks shared by the model files.
//!
//! candle's fused `softmax_last_dim`, `layer_norm`, `rms_norm`, `rope` and `sdpa` have no backward
//! and drop gradients silently, so the models use these compositions of differentiable ops
//! (`*_composed`) or the fused kernels with a backward of [`crate::kernels`]: on the CPU in
//! f32/f64 ([`kernels::supports`]), and on CUDA in f32/bf16/f16 for the ops that have CUDA
//! kernels ([`kernels::supports_with_cuda`]: norms, softmax, rotary, dense layers, activations,
//! and attention where the head dim fits [`kernels::attention::cuda_head_dim_fits`]). The output
//! layer has CPU kernels only so far.

use super::lora::Adapter;
use crate::kernels;
use crate::kernels::attention::QkvPacking;
use crate::kernels::dense::{Activation, WeightLayout};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use std::sync::OnceLock;

/// The dtype to do reductions in: f32 for half-precision inputs (as PyTorch upcasts), else the
/// input's own (so f64 gradient checks stay f64).
pub fn accum_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if kernels::supports_with_cuda(&[xs]) {
        return kernels::softmax::softmax_last_dim(xs);
    }
    softmax_last_dim_composed(xs)
}

/// Softmax as a composition. The max is detached: softmax is shift-invariant, so the gradient
/// through it is exactly zero and not worth computing.
pub fn softmax_last_dim_composed(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last_dim`]).
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let diff = xs.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}

/// LayerNorm over the last dimension.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::supports_with_cuda(&[xs, weight, bias]) {
        return kernels::norm::layer_norm(xs, weight, bias, eps);
    }
    layer_norm_composed(xs, weight, bias, eps)
}

/// LayerNorm as a composition (statistics in [`accum_dtype`]).
pub fn layer_norm_composed(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(accum_dtype(dtype))?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// RMSNorm over the last dimension (Llama/Mistral): x / sqrt(mean(x²) + eps) · weight.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::supports_with_cuda(&[xs, weight]) {
        return kernels::norm::rms_norm(xs, weight, eps);
    }
    rms_norm_composed(xs, weight, eps)
}

/// RMSNorm as a composition (statistics in [`accum_dtype`]).
pub fn rms_norm_composed(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(accum_dtype(dtype))?;
    let ms = xs.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xs.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// Additive causal mask [t, t]: 0 on and below the diagonal, a large negative value above it;
/// with `window`, keys more than `window - 1` positions back are masked too (Mistral's sliding
/// window, as `transformers` builds it). Built once per shape and device ([`cached`]).
pub fn causal_mask(
    t: usize,
    window: Option<usize>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let [mask] = cached(Table::Mask { t, window }, dtype, device, || {
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            for j in 0..t {
                let too_old = window.is_some_and(|w| i >= j + w);
                if j > i || too_old {
                    mask[i * t + j] = -1e9;
                }
            }
        }
        Ok([Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?])
    })?;
    Ok(mask)
}

/// What [`cached`] keeps: causal masks and rotary tables, by shape.
#[derive(Clone, Copy, PartialEq)]
enum Table {
    Mask { t: usize, window: Option<usize> },
    Rope { t: usize, rot_dim: usize, base: f64 },
}

/// Masks and rotary tables used by every forward pass of a shape, built once per (shape,
/// dtype, device) and then kept on the device: on a GPU, rebuilding them on the host and
/// uploading them each forward pass costs a transfer each; they are built in the same host
/// arithmetic as before, so CPU and GPU see the same values. The newest 32 are kept (lengths
/// vary with `group_by_length`).
fn cached<const N: usize>(
    key: Table,
    dtype: DType,
    device: &candle_core::Device,
    build: impl FnOnce() -> Result<[Tensor; N]>,
) -> Result<[Tensor; N]> {
    use std::sync::Mutex;
    type Entry = (Table, DType, Vec<Tensor>);
    static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let hit = |(k, d, t): &Entry| *k == key && *d == dtype && t[0].device().same_device(device);
    if let Some((_, _, t)) = CACHE
        .lock()
        .expect("table cache lock")
        .iter()
        .find(|e| hit(e))
    {
        if let Ok(tables) = <[Tensor; N]>::try_from(t.clone()) {
            return Ok(tables);
        }
    }
    let tables = build()?;
    let mut cache = CACHE.lock().expect("table cache lock");
    if cache.len() >= 32 {
        cache.remove(0);
    }
    cache.push((key, dtype, tables.to_vec()));
    Ok(tables)
}

/// Scaled dot-product attention of q `[b, heads, t, head_dim]` over k and v `[b, kv_heads, s,
/// head_dim]` (grouped-query attention where kv_heads < heads, as [`repeat_kv`] pairs them) with
/// an additive mask that broadcasts to `[b, heads, t, s]`. On CUDA the fused kernel takes the
/// kv heads as they are; elsewhere they are repeated first.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if kernels::attention::cuda_takes(&[q, k, v, mask], q.dim(D::Minus1)?) {
        return kernels::attention::attention(q, k, v, mask);
    }
    let rep = q.dim(1)? / k.dim(1)?.max(1);
    let (k, v) = (&repeat_kv(k.clone(), rep)?, &repeat_kv(v.clone(), rep)?);
    if kernels::supports(&[q, k, v, mask]) {
        return kernels::attention::attention(q, k, v, mask);
    }
    if kernels::supports_cuda(&[q, k, v, mask]) {
        // Heads too wide for the CUDA kernel: the composition, with the fused softmax inside.
        return attention_with(q, k, v, mask, softmax_last_dim);
    }
    attention_composed(q, k, v, mask)
}

/// q, k and v `[b, heads, t, head_dim]` (contiguous) out of a fused projection `[b, t, 3 · heads
/// · head_dim]`.
pub fn split_qkv(
    qkv: &Tensor,
    packing: QkvPacking,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, w) = qkv.dims3()?;
    let d = w / (3 * heads);
    let part = |i: usize| -> Result<Tensor> {
        match packing {
            QkvPacking::PerHead => qkv.reshape((b, t, heads, 3 * d))?.narrow(3, i * d, d)?,
            QkvPacking::Blocked => qkv
                .narrow(2, i * heads * d, heads * d)?
                .reshape((b, t, heads, d))?,
        }
        .transpose(1, 2)?
        .contiguous()
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// `[b, heads, t, head_dim]` → `[b, t, heads · head_dim]`.
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = y.dims4()?;
    y.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Self-attention from a fused q/k/v projection `[b, t, 3 · heads · head_dim]` to the merged
/// heads `[b, t, heads · head_dim]`, with rotary tables `[t, rot_dim]` (cos, sin) on q and k and
/// a mask that broadcasts to `[b, heads, t, t]`: one fused op on CPU in f32/f64 and on CUDA
/// where the head dim fits ([`kernels::attention::packed_attention`]), else the composition.
pub fn packed_attention(
    qkv: &Tensor,
    packing: QkvPacking,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    mask: &Tensor,
) -> Result<Tensor> {
    let mut tensors = vec![qkv, mask];
    tensors.extend(rope.iter().flat_map(|(c, s)| [*c, *s]));
    let tables_fit = rope.is_none_or(|(c, _)| c.rank() == 2 && c.dim(0).ok() == qkv.dim(1).ok());
    let cuda_fits = kernels::attention::cuda_takes(&tensors, qkv.dim(2)? / (3 * heads).max(1));
    if (kernels::supports(&tensors) || cuda_fits) && tables_fit {
        return kernels::attention::packed_attention(qkv, packing, heads, rope, mask);
    }
    if kernels::supports_cuda(&tensors) {
        // Heads the CUDA kernel does not take: the composition, with the fused rotary and
        // softmax kernels in place of theirs.
        let (q, k, v) = split_qkv(qkv, packing, heads)?;
        let (q, k) = match rope {
            Some((cos, sin)) => (rotary(&q, cos, sin)?, rotary(&k, cos, sin)?),
            None => (q, k),
        };
        return merge_heads(&attention(&q, &k, &v, mask)?);
    }
    packed_attention_composed(qkv, packing, heads, rope, mask)
}

/// [`packed_attention`] as a composition (the reference the fused op is tested against).
pub fn packed_attention_composed(
    qkv: &Tensor,
    packing: QkvPacking,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    mask: &Tensor,
) -> Result<Tensor> {
    let (q, k, v) = split_qkv(qkv, packing, heads)?;
    let (q, k) = match rope {
        Some((cos, sin)) => (
            rotary_composed(&q, cos, sin)?,
            rotary_composed(&k, cos, sin)?,
        ),
        None => (q, k),
    };
    merge_heads(&attention_composed(&q, &k, &v, mask)?)
}

/// Attention as a composition (scores and softmax in [`accum_dtype`]).
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    attention_with(q, k, v, mask, softmax_last_dim_composed)
}

/// The attention composition with the given softmax: the composed one (the reference, and
/// where no kernel applies), or the dispatching one (on CUDA, the fused kernel).
fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let probs = softmax(&scores.to_dtype(accum_dtype(scores.dtype()))?)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// Rotate-half rotary embedding on the first `rot_dim` features of the last dimension (GPT-NeoX
/// and Llama layout). `cos`/`sin` are [t, rot_dim] (or broadcast to `xs`' rows, as in cached decoding).
pub fn rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if kernels::supports_with_cuda(&[xs, cos, sin]) && kernels::rotary::rotary_applies(xs, cos) {
        return kernels::rotary::rotary(xs, cos, sin);
    }
    rotary_composed(xs, cos, sin)
}

/// Rotary embedding as a composition.
pub fn rotary_composed(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rot_dim = cos.dim(D::Minus1)?;
    let head_dim = xs.dim(D::Minus1)?;
    let (x_rot, x_pass) = if rot_dim == head_dim {
        (xs.clone(), None)
    } else {
        (
            xs.narrow(D::Minus1, 0, rot_dim)?,
            Some(xs.narrow(D::Minus1, rot_dim, head_dim - rot_dim)?),
        )
    };
    let half = rot_dim / 2;
    let x1 = x_rot.narrow(D::Minus1, 0, half)?;
    let x2 = x_rot.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = (x_rot.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    match x_pass {
        Some(pass) => Tensor::cat(&[&out, &pass], D::Minus1),
        None => Ok(out),
    }
}

/// cos/sin tables [t, rot_dim] for rotate-half RoPE with frequencies base^(-2i/rot_dim), built
/// once per shape and device (see [`causal_mask`]).
pub fn rotary_tables(
    t: usize,
    rot_dim: usize,
    base: f64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let [cos, sin] = cached(Table::Rope { t, rot_dim, base }, dtype, device, || {
        let half = rot_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / base.powf(2.0 * i as f64 / rot_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(t * rot_dim);
        let mut sin = Vec::with_capacity(t * rot_dim);
        for pos in 0..t {
            // rotate-half layout: the frequency list is repeated for both halves
            for _ in 0..2 {
                for f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok([
            Tensor::from_vec(cos, (t, rot_dim), device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (t, rot_dim), device)?.to_dtype(dtype)?,
        ])
    })?;
    Ok((cos, sin))
}

/// Grouped-query attention: repeats each of the `n_kv` heads of `[b, n_kv, t, d]` `n_rep` times
/// in place (kv head h serves query heads h·n_rep .. (h+1)·n_rep, as `transformers`' repeat_kv).
pub fn repeat_kv(xs: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs);
    }
    let (b, n_kv, t, d) = xs.dims4()?;
    // cat along the time axis then reshape gives the interleaving above, without a strided copy.
    Tensor::cat(&vec![&xs; n_rep], 2)?.reshape((b, n_kv * n_rep, t, d))
}

/// A dense layer over the last dimension, weight in Hugging Face's `nn.Linear` layout
/// (`[out, in]`) or GPT-2 Conv1D's (`[in, out]`), built from plain tensors so that it stays
/// differentiable when they are Vars; LoRA plugs in here ([`Adapter`]): y = x Wᵀ + b +
/// (α/r)·dropout(x) Aᵀ Bᵀ, the base matmul staying on the fused path.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
    /// The weight's name without `.weight` (`transformer.h.0.attn.c_attn`).
    prefix: String,
    adapter: OnceLock<Adapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, layout: WeightLayout, prefix: String) -> Self {
        Self {
            weight,
            bias,
            layout,
            prefix,
            adapter: OnceLock::new(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = dense(x, &self.weight, self.bias.as_ref(), self.layout)?;
        match self.adapter.get() {
            Some(adapter) => adapter.add(x, y),
            None => Ok(y),
        }
    }

    /// Where the weight is stored: `<prefix>.weight`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// (inputs, outputs).
    pub fn in_out(&self) -> Result<(usize, usize)> {
        let (d0, d1) = self.weight.dims2()?;
        Ok(match self.layout {
            WeightLayout::OutIn => (d1, d0),
            WeightLayout::InOut => (d0, d1),
        })
    }

    /// Gives the layer a LoRA adapter (once).
    pub fn attach(&self, adapter: Adapter) -> Result<()> {
        self.adapter.set(adapter).map_err(|_| {
            candle_core::Error::Msg(format!("{}: already has an adapter", self.prefix))
        })
    }
}

/// `x · Wᵀ + b` over the last dimension: the CPU's fused kernel where [`kernels::supports`]
/// holds (it computes no gradient for a frozen operand); for a constant weight under a graph
/// (LoRA's frozen base) elsewhere, the op that computes none for it — the CUDA kernel's
/// backward computes dW unconditionally; else the fused CUDA kernel, or the composition.
pub fn dense(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    if kernels::supports(&tensors) {
        return kernels::dense::dense(x, weight, bias, layout);
    }
    let frozen = !weight.track_op() && bias.is_none_or(|b| !b.track_op());
    if frozen && x.track_op() {
        return kernels::dense::frozen_dense(x, weight, bias, layout);
    }
    if kernels::supports_cuda(&tensors) {
        return kernels::dense::dense(x, weight, bias, layout);
    }
    dense_composed(x, weight, bias, layout)
}

/// A dense layer as a composition. The leading dimensions fold into rows, so that the weight is
/// not broadcast over them (whose gradient candle would then sum in a strided reduction).
pub fn dense_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let n_in = x.dim(D::Minus1)?;
    let rows = x.reshape(((), n_in))?;
    let y = match layout {
        WeightLayout::OutIn => rows.matmul(&weight.t()?)?,
        WeightLayout::InOut => rows.matmul(weight)?,
    };
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = y.dim(1)?;
    y.reshape(dims)
}

/// An `nn.Linear` (weight `[out, in]`, bias `[out]`) named like Hugging Face's, initialised as
/// `transformers` does (normal weights of `std`, zero bias).
pub fn linear(n_in: usize, n_out: usize, bias: bool, std: f64, vb: VarBuilder) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: std,
    };
    let weight = vb.get_with_hints((n_out, n_in), "weight", init)?;
    let bias = match bias {
        true => Some(vb.get_with_hints(n_out, "bias", Init::Const(0.0))?),
        false => None,
    };
    Ok(Linear::new(weight, bias, WeightLayout::OutIn, vb.prefix()))
}

/// RoPE settings as `config.json` nests them: `rope_parameters` (transformers ≥ 5) or the older
/// `rope_scaling` (which spells the type `type` in some checkpoints).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// (theta, partial rotary factor) of a config: `rope_parameters` wins over the older top-level
/// keys (`theta`, `partial`), as in `transformers`. Scaled variants (linear, dynamic, yarn,
/// llama3, …) are refused rather than silently computed as plain RoPE.
pub fn rope_settings(
    parameters: Option<&RopeParameters>,
    scaling: Option<&RopeParameters>,
    theta: Option<f64>,
    partial: Option<f64>,
) -> Result<(Option<f64>, Option<f64>)> {
    for p in [parameters, scaling].into_iter().flatten() {
        if let Some(kind) = p.rope_type.as_deref().filter(|k| *k != "default") {
            candle_core::bail!("rope_type `{kind}` is not supported (only the default RoPE is)");
        }
    }
    Ok((
        parameters.and_then(|p| p.rope_theta).or(theta),
        parameters.and_then(|p| p.partial_rotary_factor).or(partial),
    ))
}

impl Activation {
    /// The activation a config's `key` names.
    pub fn parse(key: &str, name: &str) -> Result<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "gelu" => Ok(Self::GeluErf),
            "relu" => Ok(Self::Relu),
            "silu" | "swish" => Ok(Self::Silu),
            other => candle_core::bail!("{key}: unsupported activation `{other}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu)"),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match kernels::dense::activation(x, self)? {
            Some(y) => Ok(y),
            None => self.apply_composed(x),
        }
    }

    /// act(gate) ⊙ up, the gated MLP of Llama/Mistral: one fused node where the kernels apply.
    pub fn gated(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match kernels::dense::gated(gate, up, self)? {
            Some(y) => Ok(y),
            None => self.gated_composed(gate, up),
        }
    }

    /// The gated product as a composition: the activation, then a product.
    pub fn gated_composed(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.apply_composed(gate)? * up
    }

    /// candle's own (single-threaded, composed backward) activations.
    pub fn apply_composed(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

/// LayerNorm with weight and bias, from the differentiable [`layer_norm`].
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(n: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(n, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(n, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn compositions_match_candle_fused_forward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 7), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 7, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 7, &dev)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(
            diff(
                &softmax_last_dim(&x)?,
                &candle_nn::ops::softmax_last_dim(&x)?
            )? < 1e-6
        );
        assert!(
            diff(
                &layer_norm(&x, &w, &b, 1e-5)?,
                &candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?
            )? < 1e-5
        );
        assert!(
            diff(
                &rms_norm(&x, &w, 1e-5)?,
                &candle_nn::ops::rms_norm(&x, &w, 1e-5)?
            )? < 1e-5
        );
        let ls = log_softmax_last_dim(&x)?;
        assert!(diff(&ls.exp()?, &softmax_last_dim(&x)?)? < 1e-6);
        Ok(())
    }

    #[test]
    fn layer_norm_passes_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5), &dev)?)?;
        let w = Var::from_tensor(&Tensor::ones(5, DType::F32, &dev)?)?;
        let b = Var::from_tensor(&Tensor::zeros(5, DType::F32, &dev)?)?;
        let y = layer_norm(&x, &w, &b, 1e-5)?;
        let target = Tensor::randn(0f32, 1.0, (2, 5), &dev)?;
        let loss = (y * target)?.sum_all()?;
        let grads = loss.backward()?;
        for v in [&x, &w, &b] {
            let g = grads.get(v).expect("gradient present");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn sliding_window_mask_masks_old_keys() -> Result<()> {
        let m = causal_mask(4, Some(2), DType::F32, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[3][3], 0.0);
        assert_eq!(m[3][2], 0.0);
        assert!(m[3][1] < -1e8);
        assert!(m[1][2] < -1e8);
        Ok(())
    }
}
