//! The fused CPU ops with a backward (softmax, layer norm, RMS norm, rotary, attention core,
//! attention from a packed q/k/v projection, dense layer, activations, the gated MLP product) against the reference compositions in `ops.rs` (forward and every
//! gradient, f32) and against central finite differences (f64).

use candle_core::{DType, Device, Result, Tensor, Var};
use dpo_sam::kernels::{self, attention, dense, norm, rotary, softmax};
use dpo_sam::kernels::{attention::QkvPacking, dense::Activation, dense::WeightLayout};
use dpo_sam::models::ops;

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// An op under test: its fused and composed forms, and random inputs (the first `trainable`
/// of which get gradients; the rest are constants such as masks and rotary tables).
struct Check {
    name: &'static str,
    fused: Box<Op>,
    composed: Box<Op>,
    inputs: Vec<Tensor>,
    trainable: usize,
}

/// Σ y ⊙ r for a fixed random r, so that every output element's gradient differs.
fn objective(f: &Op, inputs: &[Tensor], r: &Tensor) -> Result<Tensor> {
    (f(inputs)? * r)?.sum_all()
}

fn checks(dtype: DType) -> Result<Vec<Check>> {
    let dev = Device::Cpu;
    let randn = |shape: &[usize], mean: f32| -> Result<Tensor> {
        Tensor::randn(mean, 1f32, shape, &dev)?.to_dtype(dtype)
    };
    let (b, heads, t, d) = (2, 3, 5, 8);
    let (cos, sin) = ops::rotary_tables(t, 4, 10000.0, dtype, &dev)?;
    let (cos_full, sin_full) = ops::rotary_tables(t, d, 10000.0, dtype, &dev)?;
    let mask = ops::causal_mask(t, None, dtype, &dev)?;
    // A padding-style mask `[b, 1, t, t]`: causal, and key 0 of the first row is padding.
    let pad_mask: Vec<f32> = (0..b * t * t)
        .map(|k| {
            let (bi, i, j) = (k / (t * t), k / t % t, k % t);
            if j > i || (bi == 0 && j == 0 && i > 0) {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let pad_mask = Tensor::from_vec(pad_mask, (b, 1, t, t), &dev)?.to_dtype(dtype)?;
    Ok([
        Check {
            name: "softmax",
            fused: Box::new(|x| softmax::softmax_last_dim(&x[0])),
            composed: Box::new(|x| ops::softmax_last_dim_composed(&x[0])),
            inputs: vec![randn(&[4, 3, 7], 0.0)?],
            trainable: 1,
        },
        Check {
            name: "layer_norm",
            fused: Box::new(|x| norm::layer_norm(&x[0], &x[1], &x[2], 1e-5)),
            composed: Box::new(|x| ops::layer_norm_composed(&x[0], &x[1], &x[2], 1e-5)),
            inputs: vec![
                randn(&[2, 3, 6], 0.5)?,
                randn(&[6], 1.0)?,
                randn(&[6], 0.0)?,
            ],
            trainable: 3,
        },
        Check {
            name: "rms_norm",
            fused: Box::new(|x| norm::rms_norm(&x[0], &x[1], 1e-6)),
            composed: Box::new(|x| ops::rms_norm_composed(&x[0], &x[1], 1e-6)),
            inputs: vec![randn(&[2, 3, 6], 0.5)?, randn(&[6], 1.0)?],
            trainable: 2,
        },
        Check {
            name: "rotary (partial)",
            fused: Box::new(|x| rotary::rotary(&x[0], &x[1], &x[2])),
            composed: Box::new(|x| ops::rotary_composed(&x[0], &x[1], &x[2])),
            inputs: vec![randn(&[b, heads, t, d], 0.0)?, cos, sin],
            trainable: 1,
        },
        Check {
            name: "rotary (full, non-contiguous input)",
            fused: Box::new(|x| rotary::rotary(&x[0].transpose(1, 2)?, &x[1], &x[2])),
            composed: Box::new(|x| ops::rotary_composed(&x[0].transpose(1, 2)?, &x[1], &x[2])),
            inputs: vec![randn(&[b, t, heads, d], 0.0)?, cos_full, sin_full],
            trainable: 1,
        },
        Check {
            name: "attention (causal)",
            fused: Box::new(|x| attention::attention(&x[0], &x[1], &x[2], &x[3])),
            composed: Box::new(|x| ops::attention_composed(&x[0], &x[1], &x[2], &x[3])),
            inputs: vec![
                randn(&[b, heads, t, d], 0.0)?,
                randn(&[b, heads, t, d], 0.0)?,
                randn(&[b, heads, t, d], 0.0)?,
                mask,
            ],
            trainable: 3,
        },
        Check {
            // 70 query rows: two row blocks, the first of which skips the keys past row 63.
            name: "attention (causal, two row blocks)",
            fused: Box::new(|x| attention::attention(&x[0], &x[1], &x[2], &x[3])),
            composed: Box::new(|x| ops::attention_composed(&x[0], &x[1], &x[2], &x[3])),
            inputs: vec![
                randn(&[1, 1, 70, 4], 0.0)?,
                randn(&[1, 1, 70, 4], 0.0)?,
                randn(&[1, 1, 70, 4], 0.0)?,
                ops::causal_mask(70, Some(50), dtype, &dev)?,
            ],
            trainable: 3,
        },
        Check {
            name: "attention (per-row mask)",
            fused: Box::new(|x| attention::attention(&x[0], &x[1], &x[2], &x[3])),
            composed: Box::new(|x| ops::attention_composed(&x[0], &x[1], &x[2], &x[3])),
            inputs: vec![
                randn(&[b, heads, t, d], 0.0)?,
                randn(&[b, heads, t, d], 0.0)?,
                randn(&[b, heads, t, d], 0.0)?,
                pad_mask,
            ],
            trainable: 3,
        },
    ]
    .into_iter()
    .chain(packed_attention_checks(&randn, dtype)?)
    .chain(dense_checks(&randn)?)
    .chain(activation_checks(&randn)?)
    .collect())
}

/// Attention from a fused projection `[b, t, 3 · heads · d]` in both packings: GPT-NeoX's with
/// partial rotary and a causal mask, GPT-2's without rotary under a per-row padding mask, and
/// one head over 70 rows (two row blocks) with a sliding window.
fn packed_attention_checks(
    randn: &dyn Fn(&[usize], f32) -> Result<Tensor>,
    dtype: DType,
) -> Result<Vec<Check>> {
    let dev = Device::Cpu;
    let (b, heads, t, d) = (2, 3, 5, 8);
    let (cos, sin) = ops::rotary_tables(t, 4, 10000.0, dtype, &dev)?;
    let pad: Vec<f32> = (0..b * t * t)
        .map(|k| {
            let (bi, i, j) = (k / (t * t), k / t % t, k % t);
            if j > i || (bi == 1 && j < 2 && i > 1) {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let pad = Tensor::from_vec(pad, (b, 1, t, t), &dev)?.to_dtype(dtype)?;
    let cases = [
        (
            "packed attention (per head, partial rotary)",
            QkvPacking::PerHead,
            heads,
            vec![
                randn(&[b, t, 3 * heads * d], 0.0)?,
                ops::causal_mask(t, None, dtype, &dev)?,
                cos,
                sin,
            ],
        ),
        (
            "packed attention (blocked, padding mask)",
            QkvPacking::Blocked,
            heads,
            vec![randn(&[b, t, 3 * heads * d], 0.0)?, pad],
        ),
        (
            "packed attention (two row blocks, window)",
            QkvPacking::PerHead,
            1,
            vec![
                randn(&[1, 70, 12], 0.0)?,
                ops::causal_mask(70, Some(50), dtype, &dev)?,
            ],
        ),
    ];
    Ok(cases
        .into_iter()
        .map(|(name, packing, heads, inputs)| {
            let rope = |x: &[Tensor]| -> Option<(Tensor, Tensor)> {
                x.get(2).map(|cos| (cos.clone(), x[3].clone()))
            };
            Check {
                name,
                fused: Box::new(move |x| {
                    let rope = rope(x);
                    let rope = rope.as_ref().map(|(c, s)| (c, s));
                    attention::packed_attention(&x[0], packing, heads, rope, &x[1])
                }),
                composed: Box::new(move |x| {
                    let rope = rope(x);
                    let rope = rope.as_ref().map(|(c, s)| (c, s));
                    ops::packed_attention_composed(&x[0], packing, heads, rope, &x[1])
                }),
                inputs,
                trainable: 1,
            }
        })
        .collect())
}

/// The dense layer in both weight layouts, with and without bias, on a `[b, t, in]` input.
fn dense_checks(randn: &dyn Fn(&[usize], f32) -> Result<Tensor>) -> Result<Vec<Check>> {
    let (n_in, n_out) = (6, 5);
    let mut out = Vec::new();
    for (name, layout, bias) in [
        ("dense [out, in] + bias", WeightLayout::OutIn, true),
        ("dense [out, in]", WeightLayout::OutIn, false),
        ("dense [in, out] + bias", WeightLayout::InOut, true),
    ] {
        let w = match layout {
            WeightLayout::OutIn => randn(&[n_out, n_in], 0.0)?,
            WeightLayout::InOut => randn(&[n_in, n_out], 0.0)?,
        };
        let mut inputs = vec![randn(&[2, 3, n_in], 0.0)?, w];
        if bias {
            inputs.push(randn(&[n_out], 0.0)?);
        }
        out.push(Check {
            name,
            fused: Box::new(move |x| dense::dense(&x[0], &x[1], x.get(2), layout)),
            composed: Box::new(move |x| ops::dense_composed(&x[0], &x[1], x.get(2), layout)),
            trainable: inputs.len(),
            inputs,
        });
    }
    Ok(out)
}

/// Every activation against candle's, over inputs spread across the range where they bend, and
/// the gated product act(gate) ⊙ up against the activation followed by a product.
fn activation_checks(randn: &dyn Fn(&[usize], f32) -> Result<Tensor>) -> Result<Vec<Check>> {
    let kinds = [
        ("gelu (erf)", "gelu (erf)(gate) ⊙ up", Activation::GeluErf),
        (
            "gelu (tanh)",
            "gelu (tanh)(gate) ⊙ up",
            Activation::GeluTanh,
        ),
        ("silu", "silu(gate) ⊙ up", Activation::Silu),
        ("relu", "relu(gate) ⊙ up", Activation::Relu),
    ];
    let mut out = Vec::new();
    for (name, gated_name, kind) in kinds {
        out.push(Check {
            name,
            fused: Box::new(move |x| {
                dense::activation(&x[0], kind)
                    .map(|y| y.expect("f32/f64 on the CPU take the fused kernel"))
            }),
            composed: Box::new(move |x| kind.apply_composed(&x[0])),
            inputs: vec![(randn(&[4, 50], 0.0)? * 3.0)?],
            trainable: 1,
        });
        out.push(Check {
            name: gated_name,
            fused: Box::new(move |x| {
                dense::gated(&x[0], &x[1], kind)
                    .map(|y| y.expect("f32/f64 on the CPU take the fused kernel"))
            }),
            composed: Box::new(move |x| kind.gated_composed(&x[0], &x[1])),
            inputs: vec![(randn(&[4, 50], 0.0)? * 3.0)?, randn(&[4, 50], 0.0)?],
            trainable: 2,
        });
    }
    Ok(out)
}

/// Forward output and the gradients of the trainable inputs.
fn run(f: &Op, inputs: &[Tensor], trainable: usize, r: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs[..trainable]
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<_>>()?;
    let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    args.extend(inputs[trainable..].iter().cloned());
    let y = f(&args)?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let g = vars
        .iter()
        .map(|v| grads.get(v).expect("gradient present").clone())
        .collect();
    Ok((y.detach(), g))
}

#[test]
fn fused_ops_match_compositions() -> Result<()> {
    for c in checks(DType::F32)? {
        let y = (c.composed)(&c.inputs)?;
        let r = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu)?;
        let (yf, gf) = run(c.fused.as_ref(), &c.inputs, c.trainable, &r)?;
        let (yc, gc) = run(c.composed.as_ref(), &c.inputs, c.trainable, &r)?;
        let d = max_diff(&yf, &yc)?;
        println!("{}: forward max diff {d:.2e}", c.name);
        assert!(d < 1e-5, "{}: forward differs by {d}", c.name);
        for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
            let d = max_diff(a, b)?;
            println!("  grad {i}: max diff {d:.2e}");
            assert!(d < 2e-5, "{}: gradient {i} differs by {d}", c.name);
        }
    }
    Ok(())
}

#[test]
fn fused_ops_match_finite_differences_f64() -> Result<()> {
    let eps = 1e-6;
    for c in checks(DType::F64)? {
        let y = (c.fused)(&c.inputs)?;
        let r = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu)?.to_dtype(DType::F64)?;
        let (_, grads) = run(c.fused.as_ref(), &c.inputs, c.trainable, &r)?;
        for (which, grad) in grads.iter().enumerate() {
            let flat = c.inputs[which].flatten_all()?.to_vec1::<f64>()?;
            let analytic = grad.flatten_all()?.to_vec1::<f64>()?;
            for idx in 0..flat.len() {
                let shifted = |delta: f64| -> Result<f64> {
                    let mut v = flat.clone();
                    v[idx] += delta;
                    let mut args = c.inputs.clone();
                    args[which] = Tensor::from_vec(v, c.inputs[which].shape(), &Device::Cpu)?;
                    objective(c.fused.as_ref(), &args, &r)?.to_scalar::<f64>()
                };
                let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
                let err = (numeric - analytic[idx]).abs();
                assert!(
                    err < 1e-6 * (1.0 + numeric.abs()),
                    "{} input {which}[{idx}]: numeric {numeric} analytic {}",
                    c.name,
                    analytic[idx]
                );
            }
        }
    }
    Ok(())
}

/// `ops.rs` dispatches to the fused ops on CPU f32 and keeps the composition for bf16.
#[test]
fn ops_dispatch_by_dtype() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
    assert!(kernels::supports(&[&x]));
    assert!(!kernels::supports(&[&x.to_dtype(DType::BF16)?]));
    let w = Tensor::ones(8, DType::F32, &dev)?;
    let b = Tensor::zeros(8, DType::F32, &dev)?;
    assert!(
        max_diff(
            &ops::layer_norm(&x, &w, &b, 1e-5)?,
            &ops::layer_norm_composed(&x, &w, &b, 1e-5)?
        )? < 1e-5
    );
    let half = ops::rms_norm(&x.to_dtype(DType::BF16)?, &w.to_dtype(DType::BF16)?, 1e-6)?;
    assert_eq!(half.dtype(), DType::BF16);
    Ok(())
}
