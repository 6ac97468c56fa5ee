//! Differentiable building blocks shared by the model files.
//!
//! candle's fused `softmax_last_dim`, `layer_norm`, `rms_norm`, `rope` and `sdpa` have no backward
//! and drop gradients silently, so the models use these compositions of differentiable ops.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension. The max is detached: softmax is shift-invariant, so the
/// gradient through it is exactly zero and not worth computing.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
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

/// LayerNorm over the last dimension, computed in f32 as PyTorch does for half inputs.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// RMSNorm over the last dimension (Llama/Mistral): x / sqrt(mean(x²) + eps) · weight.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let ms = xs.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xs.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// Additive causal mask [t, t]: 0 on and below the diagonal, a large negative value above it;
/// with `window`, keys more than `window - 1` positions back are masked too (Mistral's sliding
/// window, as `transformers` builds it).
pub fn causal_mask(
    t: usize,
    window: Option<usize>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let too_old = window.is_some_and(|w| i >= j + w);
            if j > i || too_old {
                mask[i * t + j] = -1e9;
            }
        }
    }
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// Scaled dot-product attention over [b, heads, t, head_dim] tensors with an additive mask that
/// broadcasts to [b, heads, t, t].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
    probs.matmul(v)
}

/// Rotate-half rotary embedding on the first `rot_dim` features of the last dimension (GPT-NeoX
/// and Llama layout). `cos`/`sin` are [t, rot_dim].
pub fn rotary(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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

/// cos/sin tables [t, rot_dim] for rotate-half RoPE with frequencies base^(-2i/rot_dim).
pub fn rotary_tables(
    t: usize,
    rot_dim: usize,
    base: f64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
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
    let cos = Tensor::from_vec(cos, (t, rot_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, rot_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
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
        assert!(diff(&softmax_last_dim(&x)?, &candle_nn::ops::softmax_last_dim(&x)?)? < 1e-6);
        assert!(diff(&layer_norm(&x, &w, &b, 1e-5)?, &candle_nn::ops::layer_norm(&x, &w, &b, 1e-5)?)? < 1e-5);
        assert!(diff(&rms_norm(&x, &w, 1e-5)?, &candle_nn::ops::rms_norm(&x, &w, 1e-5)?)? < 1e-5);
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
