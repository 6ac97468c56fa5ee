//! Each CUDA kernel against its CPU twin. A fused op is one public function whose dispatch picks
//! the kernel of the device its inputs are on, so the same call runs the CUDA kernel on the GPU
//! and the CPU kernel on the CPU; compared are the forward output and the gradient of every
//! trainable input of Σ y ⊙ r (r fixed and random), as relative L2 errors ‖dev − cpu‖ / ‖cpu‖:
//! in f32 at most 1e-5; in bf16 at most 1e-2, against the CPU twin run in f32 on the same
//! bf16-rounded inputs. Also the fused optimiser with the device-side gradient norm against the
//! CPU's update (f32, and mixed precision with bf16 copies), and the device's random
//! initialisation against its host reference. The tiled output layer is checked three ways: as
//! an op (token log-probs and ∂L/∂H, ∂L/∂W, ∂L/∂b, tiles recomputed and kept; the SAM gradient
//! g = Gᵀ H), as a logits-SAM pass (what e changes in the log-probs and in ∂L/∂W against the
//! CPU's, at most five lm_head-sized GEMMs), and by its memory (the device's peak beyond the
//! operands, a fraction of the N×V logits it never holds). A check whose op launched no kernel of
//! ours on the device fails: a fallback to a composition must not pass for a kernel.

use super::models::rel_err;
use crate::kernels::attention::QkvPacking;
use crate::kernels::dense::{Activation, WeightLayout};
use crate::kernels::output::{take_gemm_products, Tile};
use crate::kernels::{self, dense, norm, rotary, softmax};
use crate::models::ops as model_ops;
use crate::models::output::OutputLayer;
use crate::models::Param;
use crate::optim::{GradAccumulator, Optimizer, OptimizerKind, Rounding};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One comparison.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    pub dtype: &'static str,
    /// Relative errors: the forward output (or the weights, for the optimiser) first, then each
    /// gradient (or moment).
    pub errors: Vec<f64>,
    pub tolerance: f64,
    /// Launches of our kernels the device side made.
    pub launches: u64,
    pub pass: bool,
    /// What failed to run, if anything did.
    pub error: Option<String>,
}

type Op = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// An op under test and its inputs (f32, on the CPU); the first `trainable` get gradients.
struct Case {
    name: &'static str,
    op: Op,
    inputs: Vec<Tensor>,
    trainable: usize,
}

/// Seeded N(mean, scale²) inputs, so that a failure reproduces.
struct Inputs(rand_chacha::ChaCha8Rng);

impl Inputs {
    fn randn(&mut self, shape: &[usize], mean: f32, scale: f32) -> Result<Tensor> {
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let (u1, u2): (f32, f32) = (self.0.random(), self.0.random());
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                mean + scale * z
            })
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }
}

/// Every fused op with a CUDA kernel, at shapes that cover their edge cases: rows longer than a
/// block's threads and shorter than a warp, partial and full rotary, both weight layouts, and
/// the attention cases of [`attention_cases`].
fn cases() -> Result<Vec<Case>> {
    let mut x = Inputs(rand_chacha::ChaCha8Rng::seed_from_u64(17));
    let (cos4, sin4) = model_ops::rotary_tables(5, 4, 10000.0, DType::F32, &Device::Cpu)?;
    let (cos8, sin8) = model_ops::rotary_tables(5, 8, 10000.0, DType::F32, &Device::Cpu)?;
    let mut cases = vec![
        Case {
            name: "softmax (short rows)",
            op: Box::new(|t| softmax::softmax_last_dim(&t[0])),
            inputs: vec![x.randn(&[6, 7], 0.0, 2.0)?],
            trainable: 1,
        },
        Case {
            name: "softmax (rows of 3000)",
            op: Box::new(|t| softmax::softmax_last_dim(&t[0])),
            inputs: vec![x.randn(&[4, 3000], 0.0, 2.0)?],
            trainable: 1,
        },
        Case {
            name: "layer norm",
            op: Box::new(|t| norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            inputs: vec![
                x.randn(&[3, 7, 300], 0.5, 1.0)?,
                x.randn(&[300], 1.0, 0.2)?,
                x.randn(&[300], 0.0, 0.2)?,
            ],
            trainable: 3,
        },
        Case {
            name: "layer norm (rows of 2560)",
            op: Box::new(|t| norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            inputs: vec![
                x.randn(&[40, 2560], 0.5, 1.0)?,
                x.randn(&[2560], 1.0, 0.2)?,
                x.randn(&[2560], 0.0, 0.2)?,
            ],
            trainable: 3,
        },
        Case {
            name: "rms norm",
            op: Box::new(|t| norm::rms_norm(&t[0], &t[1], 1e-6)),
            inputs: vec![x.randn(&[3, 7, 300], 0.5, 1.0)?, x.randn(&[300], 1.0, 0.2)?],
            trainable: 2,
        },
        Case {
            name: "rotary (partial)",
            op: Box::new(|t| rotary::rotary(&t[0], &t[1], &t[2])),
            inputs: vec![x.randn(&[2, 3, 5, 8], 0.0, 1.0)?, cos4, sin4],
            trainable: 1,
        },
        Case {
            name: "rotary (full)",
            op: Box::new(|t| rotary::rotary(&t[0], &t[1], &t[2])),
            inputs: vec![x.randn(&[2, 3, 5, 8], 0.0, 1.0)?, cos8, sin8],
            trainable: 1,
        },
    ];
    for (name, layout, bias) in [
        ("dense [out, in] + bias", WeightLayout::OutIn, true),
        ("dense [out, in]", WeightLayout::OutIn, false),
        ("dense [in, out] + bias", WeightLayout::InOut, true),
    ] {
        let (n_in, n_out) = (48, 40);
        let w = match layout {
            WeightLayout::OutIn => x.randn(&[n_out, n_in], 0.0, 0.2)?,
            WeightLayout::InOut => x.randn(&[n_in, n_out], 0.0, 0.2)?,
        };
        let mut inputs = vec![x.randn(&[3, 5, n_in], 0.0, 1.0)?, w];
        if bias {
            inputs.push(x.randn(&[n_out], 0.0, 0.5)?);
        }
        cases.push(Case {
            name,
            op: Box::new(move |t| dense::dense(&t[0], &t[1], t.get(2), layout)),
            trainable: inputs.len(),
            inputs,
        });
    }
    for (name, kind) in [
        ("gelu (erf)", Activation::GeluErf),
        ("gelu (tanh)", Activation::GeluTanh),
        ("silu", Activation::Silu),
        ("relu", Activation::Relu),
    ] {
        cases.push(Case {
            name,
            op: Box::new(move |t| fused(dense::activation(&t[0], kind)?)),
            inputs: vec![x.randn(&[3, 333], 0.0, 3.0)?],
            trainable: 1,
        });
    }
    for (name, kind) in [
        ("silu(gate) ⊙ up", Activation::Silu),
        ("gelu(gate) ⊙ up", Activation::GeluTanh),
    ] {
        cases.push(Case {
            name,
            op: Box::new(move |t| fused(dense::gated(&t[0], &t[1], kind)?)),
            inputs: vec![x.randn(&[3, 333], 0.0, 3.0)?, x.randn(&[3, 333], 0.0, 1.0)?],
            trainable: 2,
        });
    }
    attention_cases(&mut x, &mut cases)?;
    output_cases(&mut x, &mut cases)?;
    Ok(cases)
}

/// The output layer's shapes in these checks: a vocabulary and a tile that divide nothing.
const OUT_N: usize = 300;
const OUT_VOCAB: usize = 5003;
const OUT_HIDDEN: usize = 64;
const OUT_TILE: Tile = Tile {
    rows: 128,
    vocab: 1024,
    keep_bytes: 0,
};

/// Targets `[n]` spread over the vocabulary, on `device`.
fn targets(n: usize, vocab: usize, device: &Device) -> candle_core::Result<Tensor> {
    let t: Vec<u32> = (0..n).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
    Tensor::from_vec(t, n, device)
}

fn head(t: &[Tensor], bias: bool) -> OutputLayer {
    OutputLayer {
        weight: t[1].clone(),
        bias: bias.then(|| t[2].clone()),
    }
}

/// The tiled output layer at ragged tiles: tiles recomputed in the backward (with a bias) and
/// kept from the forward (without), and the SAM gradient g = Gᵀ H from the pre-pass.
fn output_cases(x: &mut Inputs, cases: &mut Vec<Case>) -> Result<()> {
    for (name, bias, keep_bytes) in [
        ("output layer (tiles recomputed, bias)", true, 0),
        ("output layer (tiles kept)", false, usize::MAX),
    ] {
        let tile = Tile {
            keep_bytes,
            ..OUT_TILE
        };
        let mut inputs = vec![
            x.randn(&[OUT_N, OUT_HIDDEN], 0.0, 1.0)?,
            x.randn(&[OUT_VOCAB, OUT_HIDDEN], 0.0, 0.2)?,
        ];
        if bias {
            inputs.push(x.randn(&[OUT_VOCAB], 0.0, 0.5)?);
        }
        cases.push(Case {
            name,
            op: Box::new(move |t| {
                let targets = targets(OUT_N, OUT_VOCAB, t[0].device())?;
                head(t, bias).token_logps_tiled(&t[0], &targets, None, tile)
            }),
            trainable: inputs.len(),
            inputs,
        });
    }
    cases.push(Case {
        name: "output layer SAM gradient g = Gᵀ H",
        op: Box::new(|t| {
            let targets = targets(OUT_N, OUT_VOCAB, t[0].device())?;
            let head = head(t, false);
            let (_, pre) = head.token_logps_for_sam_tiled(&t[0], &targets, OUT_TILE)?;
            head.sam_gradient(&t[0], &targets, &t[2], &pre)
        }),
        inputs: vec![
            x.randn(&[OUT_N, OUT_HIDDEN], 0.0, 1.0)?,
            x.randn(&[OUT_VOCAB, OUT_HIDDEN], 0.0, 0.2)?,
            x.randn(&[OUT_N], 0.0, 1.0)?,
        ],
        trainable: 0,
    });
    Ok(())
}

/// An additive mask `[b, 1, t, s]`: 0 where query `q` of sequence `bi` sees key `k`, else −1e9.
fn mask(
    b: usize,
    t: usize,
    s: usize,
    sees: impl Fn(usize, usize, usize) -> bool,
) -> Result<Tensor> {
    let values = (0..b * t * s)
        .map(|i| match sees(i / (t * s), (i / s) % t, i % s) {
            true => 0f32,
            false => -1e9,
        })
        .collect();
    Ok(Tensor::from_vec(values, (b, 1, t, s), &Device::Cpu)?)
}

/// The fused attention (FlashAttention-2's scheme on CUDA) against the CPU packed attention:
/// each mask kind (causal, left padding with fully masked rows, right padding, a sliding
/// window shorter than t), grouped-query attention, head dims 64/80/128, lengths that are not
/// a multiple of the 16-row tile, partial rotary read from a packed projection, and the shape of
/// a cached decoding step (3 queries over 23 keys).
fn attention_cases(x: &mut Inputs, cases: &mut Vec<Case>) -> Result<()> {
    let causal = |t| model_ops::causal_mask(t, None, DType::F32, &Device::Cpu);
    let (cos, sin) = model_ops::rotary_tables(37, 20, 10000.0, DType::F32, &Device::Cpu)?;
    cases.push(Case {
        name: "packed attention (per head, d 80, rotary 20, causal)",
        op: Box::new(|t| {
            let rope = Some((&t[2], &t[3]));
            model_ops::packed_attention(&t[0], QkvPacking::PerHead, 2, rope, &t[1])
        }),
        inputs: vec![
            x.randn(&[2, 37, 3 * 2 * 80], 0.0, 1.0)?,
            causal(37)?,
            cos,
            sin,
        ],
        trainable: 1,
    });
    cases.push(Case {
        name: "packed attention (blocks, d 64, left padding)",
        op: Box::new(|t| model_ops::packed_attention(&t[0], QkvPacking::Blocked, 2, None, &t[1])),
        inputs: vec![
            x.randn(&[2, 21, 3 * 2 * 64], 0.0, 1.0)?,
            // Sequence 1 is left-padded by 5: its first 5 query rows see no key.
            mask(2, 21, 21, |bi, q, k| k <= q && k >= 5 * bi)?,
        ],
        trainable: 1,
    });
    cases.push(Case {
        name: "attention (d 80, right padding)",
        op: Box::new(|t| model_ops::attention(&t[0], &t[1], &t[2], &t[3])),
        inputs: vec![
            x.randn(&[2, 2, 21, 80], 0.0, 1.0)?,
            x.randn(&[2, 2, 21, 80], 0.0, 1.0)?,
            x.randn(&[2, 2, 21, 80], 0.0, 1.0)?,
            mask(2, 21, 21, |bi, q, k| k <= q && k < 21 - 6 * bi)?,
        ],
        trainable: 3,
    });
    cases.push(Case {
        name: "attention (GQA 4/2, d 128, sliding window 7)",
        op: Box::new(|t| model_ops::attention(&t[0], &t[1], &t[2], &t[3])),
        inputs: vec![
            x.randn(&[2, 4, 37, 128], 0.0, 1.0)?,
            x.randn(&[2, 2, 37, 128], 0.0, 1.0)?,
            x.randn(&[2, 2, 37, 128], 0.0, 1.0)?,
            model_ops::causal_mask(37, Some(7), DType::F32, &Device::Cpu)?,
        ],
        trainable: 3,
    });
    cases.push(Case {
        name: "attention (GQA 4/1, d 64, 3 queries over 23 cached keys)",
        op: Box::new(|t| model_ops::attention(&t[0], &t[1], &t[2], &t[3])),
        inputs: vec![
            x.randn(&[1, 4, 3, 64], 0.0, 1.0)?,
            x.randn(&[1, 1, 23, 64], 0.0, 1.0)?,
            x.randn(&[1, 1, 23, 64], 0.0, 1.0)?,
            mask(1, 3, 23, |_, q, k| k <= q + 20)?,
        ],
        trainable: 3,
    });
    Ok(())
}

/// A fused op's output, or an error saying the kernels did not take it.
fn fused(y: Option<Tensor>) -> candle_core::Result<Tensor> {
    y.ok_or_else(|| candle_core::Error::Msg("the fused kernels did not apply".into()))
}

/// The op's output and the gradients of its trainable inputs, all moved to the CPU in f32.
fn run(c: &Case, inputs: &[Tensor], r: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs[..c.trainable]
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
    let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    args.extend(inputs[c.trainable..].iter().cloned());
    let y = (c.op)(&args)?;
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    if vars.is_empty() {
        return Ok((host(&y)?, Vec::new()));
    }
    // The output layer's log-probs are f32 whatever its inputs' dtype.
    let grads = (&y * r.to_dtype(y.dtype())?)?.sum_all()?.backward()?;
    let g = vars
        .iter()
        .map(|v| {
            let g = grads.get(v).context("no gradient reached an input")?;
            Ok(host(g)?)
        })
        .collect::<Result<_>>()?;
    Ok((host(&y)?, g))
}

/// `t` in `dtype` on `device`, and the same values (rounded to `dtype`) in f32 on the CPU.
fn both(t: &Tensor, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let on_device = t.to_dtype(dtype)?.to_device(device)?;
    let on_cpu = on_device.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((on_device, on_cpu))
}

fn compare(c: &Case, dtype: DType, device: &Device) -> Result<(Vec<f64>, u64)> {
    let mut dev_inputs = Vec::new();
    let mut cpu_inputs = Vec::new();
    for t in &c.inputs {
        let (d, h) = both(t, dtype, device)?;
        dev_inputs.push(d);
        cpu_inputs.push(h);
    }
    let y = (c.op)(&cpu_inputs)?;
    let r = Inputs(rand_chacha::ChaCha8Rng::seed_from_u64(3)).randn(y.dims(), 0.0, 1.0)?;
    let (r_dev, r_cpu) = both(&r, dtype, device)?;
    let (y_cpu, g_cpu) = run(c, &cpu_inputs, &r_cpu)?;
    let before = kernels::launches();
    let (y_dev, g_dev) = run(c, &dev_inputs, &r_dev)?;
    device.synchronize()?;
    let launches = kernels::launches() - before;
    let mut errors = vec![rel_err(&y_cpu, &y_dev)?];
    for (a, b) in g_cpu.iter().zip(&g_dev) {
        errors.push(rel_err(a, b)?);
    }
    Ok((errors, launches))
}

fn outcome(name: &str, dtype: DType, tolerance: f64, result: Result<(Vec<f64>, u64)>) -> Outcome {
    let dtype_name = if dtype == DType::BF16 { "bf16" } else { "f32" };
    match result {
        Ok((errors, launches)) => Outcome {
            name: name.to_string(),
            dtype: dtype_name,
            pass: launches > 0 && errors.iter().all(|e| *e <= tolerance),
            error: (launches == 0).then(|| "no kernel of ours ran on the device".to_string()),
            errors,
            tolerance,
            launches,
        },
        Err(e) => Outcome {
            name: name.to_string(),
            dtype: dtype_name,
            errors: Vec::new(),
            tolerance,
            launches: 0,
            pass: false,
            error: Some(format!("{e:#}")),
        },
    }
}

/// Every op in f32 and bf16, the optimiser, and the initialisation, on `device`.
pub fn check(device: &Device) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        for c in cases()? {
            out.push(outcome(
                c.name,
                dtype,
                tolerance,
                compare(&c, dtype, device),
            ));
        }
    }
    for mixed in [false, true] {
        let name = match mixed {
            false => "AdamW + device grad norm (f32)",
            true => "AdamW + device grad norm (f32 masters, bf16 weights)",
        };
        out.push(outcome(name, DType::F32, 1e-5, optimiser(device, mixed)));
    }
    out.push(outcome("random init", DType::F32, 1e-5, init(device)));
    for (dtype, tolerance) in [(DType::F32, 1e-3), (DType::BF16, 0.05)] {
        let name = "logits-SAM: what e changes (log-probs, ∂L/∂W), ≤ 5 lm_head GEMMs";
        out.push(outcome(name, dtype, tolerance, logits_sam(device, dtype)));
    }
    let name = "output layer memory: peak beyond the operands / N×V f32 logits";
    out.push(outcome(name, DType::BF16, 0.125, output_memory(device)));
    Ok(out)
}

/// The SAM ascent's size here: large enough that what e changes in G stands well above bf16's
/// rounding of it. G's target entries are c (1 − p) with p ~ 1e-3 at these shapes, rounded to
/// bf16's step near |c|, so e must move p by more than that step: modelled in PyTorch with G
/// rounded to bf16, what e changes in ∂L/∂W is off by 9% at ρ = 2 and by 0.6% at ρ = 10.
const CHECK_RHO: f64 = 10.0;

/// One logits-SAM pass of the output layer (Algorithm 1, lines 1–7, with Σ c ⊙ log-probs as the
/// loss) on the device in `dtype` and on the CPU in f32 from the same rounded inputs; errors:
/// what e changes in the token log-probs and in ∂L/∂W (perturbed minus plain), device against
/// CPU. Fails if the device ran more than five lm_head-sized GEMMs for lines 1–7, the paper's
/// bound (the default tiles, which keep these logits).
fn logits_sam(device: &Device, dtype: DType) -> Result<(Vec<f64>, u64)> {
    let mut x = Inputs(rand_chacha::ChaCha8Rng::seed_from_u64(9));
    let h = x.randn(&[OUT_N, OUT_HIDDEN], 0.0, 1.0)?;
    let w = x.randn(&[OUT_VOCAB, OUT_HIDDEN], 0.0, 0.2)?;
    let c = x.randn(&[OUT_N], 0.0, 1.0)?;
    // (log-probs at W + e minus at W, ∂L/∂W likewise, lm_head GEMMs of lines 1–7) on `dev`.
    let pass = |dev: &Device, dtype: DType| -> Result<(Tensor, Tensor, f64)> {
        let h = Var::from_tensor(&h.to_dtype(dtype)?.to_device(dev)?)?;
        let w = Var::from_tensor(&w.to_dtype(dtype)?.to_device(dev)?)?;
        let c = c.to_device(dev)?;
        let head = OutputLayer {
            weight: w.as_tensor().clone(),
            bias: None,
        };
        let targets = targets(OUT_N, OUT_VOCAB, dev)?;
        let loss = |lp: &Tensor| -> Result<Tensor> { Ok((lp * &c)?.sum_all()?) };
        let dw = |lp: &Tensor| -> Result<Tensor> {
            let grads = loss(lp)?.backward()?;
            Ok(grads
                .get(&w)
                .context("no gradient reached W")?
                .to_dtype(DType::F32)?)
        };
        let plain = head.token_logps(h.as_tensor(), &targets, None)?;
        let dw_plain = dw(&plain)?;
        take_gemm_products();
        let mut p =
            crate::sam::logits_perturbation(&head, h.as_tensor(), &targets, CHECK_RHO, &loss)?;
        let perturbed = p.token_logps_at_w_plus_e(&head, h.as_tensor(), &targets)?;
        let dw_perturbed = dw(&perturbed)?;
        let gemms = take_gemm_products() as f64 / (OUT_N * OUT_VOCAB) as f64;
        let host = |t: Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        Ok((
            host((perturbed - plain)?)?,
            host((dw_perturbed - dw_plain)?)?,
            gemms,
        ))
    };
    let (lp_cpu, dw_cpu, _) = pass(&Device::Cpu, DType::F32)?;
    // Rounded to dtype first, as `both` does.
    let before = kernels::launches();
    let (lp_dev, dw_dev, gemms) = pass(device, dtype)?;
    device.synchronize()?;
    let launches = kernels::launches() - before;
    if gemms > 5.0 + 1e-9 {
        anyhow::bail!("lines 1–7 ran {gemms} lm_head-sized GEMMs; the bound is 5");
    }
    Ok((
        vec![rel_err(&lp_cpu, &lp_dev)?, rel_err(&dw_cpu, &dw_dev)?],
        launches,
    ))
}

/// The device's peak memory over a tiled forward and backward that keeps no logits
/// (n 4096, vocabulary 32768, hidden 64, tiles of 512 × 4096), beyond the operands and the
/// gradients, as a fraction of the 512 MiB of f32 logits an unfused layer holds (three times
/// over): at most the tiles and the f32 accumulators.
fn output_memory(device: &Device) -> Result<(Vec<f64>, u64)> {
    let (n, vocab, hidden) = (4096, 32768, 64);
    let tile = Tile {
        rows: 512,
        vocab: 4096,
        keep_bytes: 0,
    };
    let mut x = Inputs(rand_chacha::ChaCha8Rng::seed_from_u64(11));
    let h = Var::from_tensor(
        &x.randn(&[n, hidden], 0.0, 1.0)?
            .to_dtype(DType::BF16)?
            .to_device(device)?,
    )?;
    let w = Var::from_tensor(
        &x.randn(&[vocab, hidden], 0.0, 0.2)?
            .to_dtype(DType::BF16)?
            .to_device(device)?,
    )?;
    let targets = targets(n, vocab, device)?;
    let head = OutputLayer {
        weight: w.as_tensor().clone(),
        bias: None,
    };
    device.synchronize()?;
    let Some((base, _)) = kernels::device_memory(device)? else {
        anyhow::bail!("no device memory counter on {device:?}");
    };
    kernels::reset_peak_device_memory(device)?;
    let before = kernels::launches();
    let lp = head.token_logps_tiled(h.as_tensor(), &targets, None, tile)?;
    let grads = lp.sum_all()?.backward()?;
    device.synchronize()?;
    let launches = kernels::launches() - before;
    let (_, peak) = kernels::device_memory(device)?.context("device memory")?;
    // The gradients (bf16) are results, not working memory.
    let results = (grads.get(&w).context("∂L/∂W")?.elem_count()
        + grads.get(&h).context("∂L/∂H")?.elem_count())
        * 2;
    let working = peak.saturating_sub(base) as f64 - results as f64;
    Ok((vec![working.max(0.0) / (n * vocab * 4) as f64], launches))
}

/// Three clipped AdamW steps (weight decay on the matrices) on the device and on the CPU from
/// the same weights and gradients; errors: the norms, then each parameter's weights and
/// moments (and, mixed, the bf16 weights).
fn optimiser(device: &Device, mixed: bool) -> Result<(Vec<f64>, u64)> {
    let mut x = Inputs(rand_chacha::ChaCha8Rng::seed_from_u64(5));
    // One parameter larger than a chunk of the kernels (65536), a matrix, a bias.
    let shapes: [&[usize]; 3] = [&[3, 30_001], &[64, 48], &[48]];
    let initial: Vec<Tensor> = shapes
        .iter()
        .map(|s| x.randn(s, 0.0, 0.1))
        .collect::<Result<_>>()?;
    let kind = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let params_on = |dev: &Device| -> Result<Vec<Param>> {
        initial
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let w = w.to_device(dev)?;
                let (var, master) = match mixed {
                    true => (
                        Var::from_tensor(&w.to_dtype(DType::BF16)?)?,
                        Some(Var::from_tensor(&w)?),
                    ),
                    false => (Var::from_tensor(&w)?, None),
                };
                Ok(Param {
                    name: format!("p{i}"),
                    var,
                    master,
                })
            })
            .collect()
    };
    let (dev_params, cpu_params) = (params_on(device)?, params_on(&Device::Cpu)?);
    let mut dev_opt = Optimizer::new(kind.clone(), &dev_params, Rounding::Nearest)?;
    let mut cpu_opt = Optimizer::new(kind, &cpu_params, Rounding::Nearest)?;
    let mut errors = Vec::new();
    let mut launches = 0;
    for step in 0..3 {
        // Gradients of Σ w ⊙ r: r itself, through a real backward on both sides.
        let rs: Vec<Tensor> = shapes
            .iter()
            .map(|s| x.randn(s, 0.0, 1.0))
            .collect::<Result<_>>()?;
        let grads = |params: &[Param]| -> Result<GradAccumulator> {
            let mut loss: Option<Tensor> = None;
            for (p, r) in params.iter().zip(&rs) {
                let w = p.var.as_tensor();
                let term = (w * r.to_dtype(w.dtype())?.to_device(w.device())?)?.sum_all()?;
                loss = Some(match loss {
                    Some(l) => (l + term)?,
                    None => term,
                });
            }
            let store = loss.expect("parameters").backward()?;
            let mut acc = GradAccumulator::new(params.len());
            acc.add(params, &store)?;
            Ok(acc)
        };
        let (dev_acc, cpu_acc) = (grads(&dev_params)?, grads(&cpu_params)?);
        let before = kernels::launches();
        let dev_norm = dev_opt.clip_and_apply(&dev_params, &dev_acc, 1.0, 1e-2)?;
        device.synchronize()?;
        launches += kernels::launches() - before;
        let cpu_norm = cpu_opt.clip_and_apply(&cpu_params, &cpu_acc, 1.0, 1e-2)?;
        if step == 0 {
            errors.push((dev_norm - cpu_norm).abs() / cpu_norm);
        }
    }
    for (i, (d, c)) in dev_params.iter().zip(&cpu_params).enumerate() {
        let weights = |p: &Param| {
            p.master
                .as_ref()
                .unwrap_or(&p.var)
                .as_tensor()
                .to_device(&Device::Cpu)
        };
        errors.push(rel_err(&weights(c)?, &weights(d)?)?);
        errors.push(rel_err(
            &cpu_opt.m[i],
            &dev_opt.m[i].to_device(&Device::Cpu)?,
        )?);
        errors.push(rel_err(
            &cpu_opt.v[i],
            &dev_opt.v[i].to_device(&Device::Cpu)?,
        )?);
        if mixed {
            // The bf16 weights the kernel wrote are its f32 master rounded once (to nearest
            // even, as the CPU rounds): exactly, not merely close.
            let copy = d
                .var
                .as_tensor()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            let rounded = weights(d)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            errors.push(rel_err(&rounded, &copy)?);
        }
    }
    Ok((errors, launches))
}

/// The device's random stream against its host reference, and drawn twice alike.
fn init(device: &Device) -> Result<(Vec<f64>, u64)> {
    let shape = candle_core::Shape::from((300, 257));
    let before = kernels::launches();
    let draw = || kernels::init::randn_on_device(99, &shape, 0.5, 0.02, device);
    let (a, b) = (
        draw()?.context("no device draw")?,
        draw()?.context("no device draw")?,
    );
    let launches = kernels::launches() - before;
    let host = kernels::init::randn_host(99, shape.elem_count(), 0.5, 0.02);
    let host = Tensor::from_vec(host, shape.clone(), &Device::Cpu)?;
    let (a, b) = (a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?);
    Ok((vec![rel_err(&host, &a)?, rel_err(&a, &b)?], launches))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the harness compares the CPU kernels with themselves: every gradient is
    /// found and agrees, and the launch check then fails every op (no CUDA kernel ran), which is
    /// what keeps a composition fallback from passing on a GPU.
    #[test]
    fn harness_runs_every_case_and_rejects_ops_without_device_kernels() -> Result<()> {
        for c in cases()? {
            let result = compare(&c, DType::F32, &Device::Cpu);
            let (errors, launches) = result
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", c.name))?;
            assert_eq!(errors.len(), 1 + c.trainable, "{}", c.name);
            assert!(errors.iter().all(|e| *e == 0.0), "{}: {errors:?}", c.name);
            assert_eq!(*launches, 0);
            let o = outcome(c.name, DType::F32, 1e-5, result);
            assert!(!o.pass && o.error.is_some(), "{}", c.name);
        }
        Ok(())
    }

    /// The logits-SAM check on the CPU against itself: what e changes agrees exactly, within
    /// five lm_head GEMMs.
    #[test]
    fn logits_sam_check_runs_on_the_cpu() -> Result<()> {
        let (errors, launches) = logits_sam(&Device::Cpu, DType::F32)?;
        assert_eq!(launches, 0);
        assert_eq!(errors, vec![0.0, 0.0]);
        Ok(())
    }

    /// An op that differs from its twin by more than the bound fails.
    #[test]
    fn a_wrong_kernel_fails() -> Result<()> {
        let ok = outcome("x", DType::F32, 1e-5, Ok((vec![0.0, 9e-6], 2)));
        let bad = outcome("x", DType::F32, 1e-5, Ok((vec![0.0, 2e-5], 2)));
        assert!(ok.pass && !bad.pass);
        let err = outcome("x", DType::BF16, 1e-2, Err(anyhow::anyhow!("boom")));
        assert!(!err.pass && err.error.as_deref() == Some("boom"));
        Ok(())
    }

    /// The optimiser check on the CPU against itself: the same update bit for bit.
    #[test]
    fn optimiser_check_runs_on_the_cpu() -> Result<()> {
        for mixed in [false, true] {
            let (errors, launches) = optimiser(&Device::Cpu, mixed)?;
            assert_eq!(launches, 0);
            assert_eq!(errors.len(), 1 + 3 * if mixed { 4 } else { 3 });
            assert!(errors.iter().all(|e| *e == 0.0), "{errors:?}");
        }
        Ok(())
    }
}
