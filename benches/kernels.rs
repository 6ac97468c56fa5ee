//! Forward + backward of each fused CPU kernel against the composition of candle ops it
//! replaces, at Pythia-160M's per-layer shapes (4 sequences × 256 tokens, hidden 768, 12 heads).
//! Fused and composed runs alternate so that machine noise hits both alike; prints medians and
//! the speed-up. Both sides include candle's backward bookkeeping around the op (the gradient
//! of `sum_all`, ~8 ms at [1024, 3072]).
//!
//! `cargo bench --profile dev --bench kernels` (dependencies are optimised in the dev profile too;
//! `--release` times this crate's kernels optimised as well).

use candle_core::{DType, Device, Result, Tensor, Var};
use dpo_sam::kernels::{attention, dense, norm};
use dpo_sam::kernels::{attention::QkvPacking, dense::Activation, dense::WeightLayout};
use dpo_sam::models::ops;
use std::time::Instant;

const ROUNDS: usize = 7;

type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

struct Case {
    name: &'static str,
    fused: Box<Op>,
    composed: Box<Op>,
    inputs: Vec<Tensor>,
    /// The first `trainable` inputs get gradients; the rest are constants (masks, tables).
    trainable: usize,
}

/// Seconds for one forward and backward of `f`.
fn time(f: &Op, inputs: &[Tensor], trainable: usize) -> Result<f64> {
    let vars = inputs[..trainable]
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    args.extend(inputs[trainable..].iter().cloned());
    let started = Instant::now();
    let y = f(&args)?;
    let grads = y.sum_all()?.backward()?;
    for v in &vars {
        grads.get(v).expect("every trainable input gets a gradient");
    }
    Ok(started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cases() -> Result<Vec<Case>> {
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    let (b, t, n, heads, inner) = (4, 256, 768, 12, 3072);
    let (cos, sin) = ops::rotary_tables(t, 16, 10000.0, DType::F32, &dev)?;
    let mask = ops::causal_mask(t, None, DType::F32, &dev)?;
    let d = n / heads;
    Ok(vec![
        Case {
            name: "dense 768→3072 + bias",
            fused: Box::new(|x| dense::dense(&x[0], &x[1], Some(&x[2]), WeightLayout::OutIn)),
            composed: Box::new(|x| {
                ops::dense_composed(&x[0], &x[1], Some(&x[2]), WeightLayout::OutIn)
            }),
            inputs: vec![randn(&[b, t, n])?, randn(&[inner, n])?, randn(&[inner])?],
            trainable: 3,
        },
        Case {
            name: "gelu [1024, 3072]",
            fused: Box::new(|x| {
                dense::activation(&x[0], Activation::GeluErf).map(|y| y.expect("f32 on the CPU"))
            }),
            composed: Box::new(|x| Activation::GeluErf.apply_composed(&x[0])),
            inputs: vec![randn(&[b * t, inner])?],
            trainable: 1,
        },
        Case {
            name: "layer norm [1024, 768]",
            fused: Box::new(|x| norm::layer_norm(&x[0], &x[1], &x[2], 1e-5)),
            composed: Box::new(|x| ops::layer_norm_composed(&x[0], &x[1], &x[2], 1e-5)),
            inputs: vec![randn(&[b * t, n])?, randn(&[n])?, randn(&[n])?],
            trainable: 3,
        },
        Case {
            name: "attention core [4, 12, 256, 64]",
            fused: Box::new(|x| attention::attention(&x[0], &x[1], &x[2], &x[3])),
            composed: Box::new(|x| ops::attention_composed(&x[0], &x[1], &x[2], &x[3])),
            inputs: vec![
                randn(&[b, heads, t, d])?,
                randn(&[b, heads, t, d])?,
                randn(&[b, heads, t, d])?,
                mask.clone(),
            ],
            trainable: 3,
        },
        Case {
            name: "attention from q/k/v [4, 256, 2304], rotary 16",
            fused: Box::new(move |x| {
                let rope = Some((&x[2], &x[3]));
                attention::packed_attention(&x[0], QkvPacking::PerHead, heads, rope, &x[1])
            }),
            composed: Box::new(move |x| {
                let rope = Some((&x[2], &x[3]));
                ops::packed_attention_composed(&x[0], QkvPacking::PerHead, heads, rope, &x[1])
            }),
            inputs: vec![randn(&[b, t, 3 * n])?, mask, cos, sin],
            trainable: 1,
        },
    ])
}

fn main() -> Result<()> {
    // The heap setting `dpo-sam` runs with: freed buffers are reused, not unmapped and faulted in.
    dpo_sam::device::keep_freed_memory();
    println!(
        "{:<48} {:>12} {:>14} {:>9}",
        "kernel (forward + backward)", "fused ms", "composed ms", "speed-up"
    );
    // `cargo bench --bench kernels -- gelu` times the kernels whose name contains "gelu".
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let chosen = cases()?
        .into_iter()
        .filter(|c| filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())));
    for c in chosen {
        let (mut fused, mut composed) = (Vec::new(), Vec::new());
        for round in 0..=ROUNDS {
            let f = time(c.fused.as_ref(), &c.inputs, c.trainable)?;
            let k = time(c.composed.as_ref(), &c.inputs, c.trainable)?;
            // Round 0 warms the allocator and the thread pool.
            if round > 0 {
                fused.push(f);
                composed.push(k);
            }
        }
        let (f, k) = (median(fused), median(composed));
        println!(
            "{:<48} {:>12.2} {:>14.2} {:>8.2}×",
            c.name,
            1e3 * f,
            1e3 * k,
            k / f
        );
    }
    Ok(())
}
