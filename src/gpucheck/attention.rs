//! `gpu-check --checks attention`: the fused attention's time, forward alone and forward +
//! backward, at Pythia-2.8B's and Mistral-7B's attention shapes (bf16, 4 pairs = 8 sequences ×
//! 512 tokens, causal; Mistral with its 8 kv heads and 4096-token window), with the device's
//! peak memory over the inputs. `scripts/torch_attention.py` times PyTorch's
//! `scaled_dot_product_attention` on the same shapes, and `scripts/gpu-check.sh` puts the two
//! side by side. Only q, k and v apart are timed (no rotary, no packed projection), as SDPA sees
//! them.

use crate::kernels;
use crate::models::ops as model_ops;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;
use std::time::Instant;

/// An attention shape: sequences, query heads, kv heads, tokens, head dim, sliding window.
pub struct Shape {
    pub name: &'static str,
    pub b: usize,
    pub h: usize,
    pub kv_heads: usize,
    pub t: usize,
    pub d: usize,
    pub window: Option<usize>,
}

/// The shapes `scripts/torch_attention.py` times too (keep the two lists alike).
pub const SHAPES: [Shape; 2] = [
    Shape {
        name: "pythia-2.8b",
        b: 8,
        h: 32,
        kv_heads: 32,
        t: 512,
        d: 80,
        window: None,
    },
    Shape {
        name: "mistral-7b",
        b: 8,
        h: 32,
        kv_heads: 8,
        t: 512,
        d: 128,
        window: Some(4096),
    },
];

/// Median seconds of `f` over `reps` runs after two warm-up runs, the device synchronised
/// around each.
fn median_s(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Each of [`SHAPES`] timed on `device` in bf16.
pub fn time(device: &Device, reps: usize) -> Result<serde_json::Value> {
    let mut rows = Vec::new();
    for s in &SHAPES {
        let randn = |heads: usize| -> Result<Var> {
            let x = Tensor::randn(0f32, 1.0, (s.b, heads, s.t, s.d), device)?;
            Ok(Var::from_tensor(&x.to_dtype(DType::BF16)?)?)
        };
        let (q, k, v) = (randn(s.h)?, randn(s.kv_heads)?, randn(s.kv_heads)?);
        let r = Tensor::randn(0f32, 1.0, (s.b, s.h, s.t, s.d), device)?.to_dtype(DType::BF16)?;
        let mask = model_ops::causal_mask(s.t, s.window, DType::BF16, device)?;
        let forward = || -> Result<Tensor> {
            Ok(model_ops::attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &mask,
            )?)
        };
        kernels::reset_peak_device_memory(device)?;
        let before = kernels::device_memory(device)?.map(|m| m.0);
        let launches = kernels::launches();
        let fwd = median_s(device, reps, || forward().map(|_| ()))?;
        let fwd_launches = (kernels::launches() - launches) / (reps as u64 + 2);
        let fwd_bwd = median_s(device, reps, || {
            let grads = (forward()? * &r)?.sum_all()?.backward()?;
            anyhow::ensure!(grads.get(q.as_tensor()).is_some(), "no gradient reached q");
            Ok(())
        })?;
        let peak = kernels::device_memory(device)?.map(|m| m.1);
        let peak_mib = peak
            .zip(before)
            .map(|(p, b)| p.saturating_sub(b) as f64 / (1 << 20) as f64);
        rows.push(json!({
            "shape": s.name,
            "b": s.b, "heads": s.h, "kv_heads": s.kv_heads, "t": s.t, "head_dim": s.d,
            "window": s.window,
            "forward_ms": 1e3 * fwd,
            "forward_backward_ms": 1e3 * fwd_bwd,
            "launches_forward": fwd_launches,
            "peak_over_inputs_mib": peak_mib,
        }));
    }
    Ok(json!({ "dtype": "bf16", "reps": reps, "shapes": rows }))
}
