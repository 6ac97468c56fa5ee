//! The fused, chunked output layer against the unfused composition: token log-probs and every
//! gradient (h, W, b) with and without the logits-SAM perturbation, tied weights, the SAM
//! gradient, finite differences in f64, and the memory bound (no chunk of more than
//! `chunk_rows × vocab` logits).

use candle_core::{DType, Device, Result, Tensor, Var};
use dpo_sam::output::{take_largest_logits_chunk, OutputLayer};

const N: usize = 37;
const HIDDEN: usize = 16;
const VOCAB: usize = 61;
/// Smaller than N and not a divisor of it, so that chunking and the ragged last chunk run.
const CHUNK: usize = 8;

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

fn scale(a: &Tensor) -> Result<f64> {
    Ok(a.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0))
}

struct Case {
    h: Var,
    w: Var,
    b: Option<Var>,
    targets: Tensor,
    coef: Tensor,
    e: Tensor,
}

fn case(dtype: DType, bias: bool) -> Result<Case> {
    let dev = Device::Cpu;
    let var = |shape: &[usize], std: f32| -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, std, shape, &dev)?.to_dtype(dtype)?)
    };
    let targets: Vec<u32> = (0..N).map(|i| ((i * 17 + 3) % VOCAB) as u32).collect();
    Ok(Case {
        h: var(&[N, HIDDEN], 1.0)?,
        w: var(&[VOCAB, HIDDEN], 0.5)?,
        b: if bias {
            Some(var(&[VOCAB], 0.5)?)
        } else {
            None
        },
        targets: Tensor::new(targets.as_slice(), &dev)?,
        // A non-uniform ∂L/∂logp, as DPO's per-sequence weights give.
        coef: Tensor::randn(0f32, 1.0, N, &dev)?.to_dtype(dtype)?,
        e: Tensor::randn(0f32, 0.05, (VOCAB, HIDDEN), &dev)?.to_dtype(dtype)?,
    })
}

impl Case {
    fn head(&self) -> OutputLayer {
        OutputLayer {
            weight: self.w.as_tensor().clone(),
            bias: self.b.as_ref().map(|b| b.as_tensor().clone()),
        }
    }

    /// (token log-probs, [dh, dW, db]) of Σ coef · logp through the fused or unfused path.
    fn run(&self, fused: bool, e: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let head = self.head();
        let logps = if fused {
            head.token_logps_chunked(self.h.as_tensor(), &self.targets, e, CHUNK)?
        } else {
            head.token_logps_unfused(self.h.as_tensor(), &self.targets, e)?
        };
        let grads = (&logps * &self.coef)?.sum_all()?.backward()?;
        let mut out = vec![
            grads.get(&self.h).unwrap().clone(),
            grads.get(&self.w).unwrap().clone(),
        ];
        out.extend(self.b.as_ref().map(|b| grads.get(b).unwrap().clone()));
        Ok((logps.detach(), out))
    }
}

/// Fused vs unfused: every output and gradient equal within f32 rounding.
#[test]
fn fused_matches_unfused_with_and_without_perturbation() -> Result<()> {
    for bias in [false, true] {
        let c = case(DType::F32, bias)?;
        for e in [None, Some(&c.e)] {
            let (lp_f, g_f) = c.run(true, e)?;
            let (lp_u, g_u) = c.run(false, e)?;
            let d = max_diff(&lp_f, &lp_u)?;
            println!(
                "bias {bias} perturbed {}: logp max diff {d:.2e}",
                e.is_some()
            );
            assert!(d <= 4e-6 * scale(&lp_u)?, "log-probs differ by {d}");
            for (name, (a, b)) in ["h", "W", "b"].iter().zip(g_f.iter().zip(&g_u)) {
                let d = max_diff(a, b)?;
                println!("  d{name} max diff {d:.2e}");
                assert!(d <= 4e-6 * scale(b)?, "d{name} differs by {d}");
            }
        }
    }
    Ok(())
}

/// The fused path is what `token_logps` uses on CPU, and a chunk as large as n is fine too.
#[test]
fn dispatch_and_single_chunk_agree() -> Result<()> {
    let c = case(DType::F32, true)?;
    let head = c.head();
    let a = head.token_logps(c.h.as_tensor(), &c.targets, Some(&c.e))?;
    let b = head.token_logps_chunked(c.h.as_tensor(), &c.targets, Some(&c.e), 10 * N)?;
    let u = head.token_logps_unfused(c.h.as_tensor(), &c.targets, Some(&c.e))?;
    assert!(max_diff(&a, &b)? == 0.0);
    assert!(max_diff(&a, &u)? < 1e-5);
    Ok(())
}

/// Tied embeddings: the same W also feeds an embedding lookup; autograd must sum both paths.
#[test]
fn tied_weight_gradients_sum() -> Result<()> {
    let c = case(DType::F32, false)?;
    let ids = Tensor::new(&[3u32, 5, 5, 60], &Device::Cpu)?;
    let grad_w = |fused: bool| -> Result<Tensor> {
        let emb = c.w.as_tensor().index_select(&ids, 0)?;
        let h = c.h.as_tensor().narrow(0, 0, 4)?.add(&emb)?;
        let head = c.head();
        let targets = c.targets.narrow(0, 0, 4)?;
        let lp = if fused {
            head.token_logps_chunked(&h, &targets, None, 3)?
        } else {
            head.token_logps_unfused(&h, &targets, None)?
        };
        Ok(lp.sum_all()?.backward()?.get(&c.w).unwrap().clone())
    };
    let (f, u) = (grad_w(true)?, grad_w(false)?);
    let d = max_diff(&f, &u)?;
    println!("tied dW max diff {d:.2e}");
    assert!(d < 1e-5 * scale(&u)?);
    Ok(())
}

/// The chunked SAM gradient (Algorithm 1, line 3) equals the unfused closed form and autograd.
#[test]
fn sam_gradient_chunked_matches_unfused() -> Result<()> {
    for bias in [false, true] {
        let c = case(DType::F32, bias)?;
        let head = c.head();
        let h = c.h.as_tensor();
        let chunked = head.sam_gradient_chunked(h, &c.targets, &c.coef, CHUNK)?;
        let unfused = head.sam_gradient_unfused(h, &c.targets, &c.coef)?;
        let (_, auto) = c.run(false, None)?;
        let d = max_diff(&chunked, &unfused)?;
        println!("bias {bias}: SAM g max diff {d:.2e}");
        assert!(d <= 4e-6 * scale(&unfused)?);
        assert!(max_diff(&chunked, &auto[1])? <= 4e-6 * scale(&unfused)?);
    }
    Ok(())
}

/// Central differences in f64 for every input of the fused op, with a perturbation.
#[test]
fn fused_gradients_match_finite_differences_f64() -> Result<()> {
    let c = case(DType::F64, true)?;
    let (_, grads) = c.run(true, Some(&c.e))?;
    let objective = |h: &Tensor, w: &Tensor, b: &Tensor| -> Result<f64> {
        let head = OutputLayer {
            weight: w.clone(),
            bias: Some(b.clone()),
        };
        let lp = head.token_logps_chunked(h, &c.targets, Some(&c.e), CHUNK)?;
        (lp * &c.coef)?.sum_all()?.to_scalar::<f64>()
    };
    let base = [
        c.h.as_tensor().detach(),
        c.w.as_tensor().detach(),
        c.b.as_ref().unwrap().as_tensor().detach(),
    ];
    let eps = 1e-6;
    for (which, grad) in grads.iter().enumerate() {
        let flat = base[which].flatten_all()?.to_vec1::<f64>()?;
        let analytic = grad.flatten_all()?.to_vec1::<f64>()?;
        // A spread of entries, the first and last included.
        for idx in (0..flat.len())
            .step_by(flat.len() / 7)
            .chain([flat.len() - 1])
        {
            let shifted = |delta: f64| -> Result<f64> {
                let mut v = flat.clone();
                v[idx] += delta;
                let mut args = base.clone();
                args[which] = Tensor::from_vec(v, base[which].shape(), &Device::Cpu)?;
                objective(&args[0], &args[1], &args[2])
            };
            let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
            let err = (numeric - analytic[idx]).abs();
            assert!(
                err < 1e-6 * (1.0 + numeric.abs()),
                "input {which} [{idx}]: numeric {numeric} analytic {}",
                analytic[idx]
            );
        }
    }
    Ok(())
}

/// Peak memory of the fused path does not scale with n × vocab: no chunk of logits exceeds
/// chunk_rows × vocab, through the forward, the backward and the SAM gradient.
#[test]
fn fused_path_holds_one_chunk_of_logits_at_most() -> Result<()> {
    let (n, vocab, chunk) = (300, 2000, 32);
    let dev = Device::Cpu;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, HIDDEN), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, HIDDEN), &dev)?)?;
    let targets = Tensor::new(
        (0..n as u32)
            .map(|i| i * 7 % vocab as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &dev,
    )?;
    let head = OutputLayer {
        weight: w.as_tensor().clone(),
        bias: None,
    };
    take_largest_logits_chunk();
    let lp = head.token_logps_chunked(h.as_tensor(), &targets, None, chunk)?;
    let grads = lp.sum_all()?.backward()?;
    assert!(grads.get(&w).is_some() && grads.get(&h).is_some());
    head.sam_gradient_chunked(h.as_tensor(), &targets, &lp.ones_like()?, chunk)?;
    let largest = take_largest_logits_chunk();
    assert_eq!(
        largest,
        chunk * vocab,
        "largest logits chunk {largest} elements; n × vocab = {}",
        n * vocab
    );
    Ok(())
}

/// Off CPU-f32/f64 (here bf16 weights) `token_logps` takes the unfused path and still works.
#[test]
fn half_precision_falls_back_to_unfused() -> Result<()> {
    let c = case(DType::BF16, false)?;
    let head = c.head();
    let lp = head.token_logps(c.h.as_tensor(), &c.targets, None)?;
    assert_eq!(lp.dtype(), DType::F32);
    let g = head.sam_gradient(c.h.as_tensor(), &c.targets, &c.coef.to_dtype(DType::F32)?)?;
    assert_eq!(g.dims(), &[VOCAB, HIDDEN]);
    Ok(())
}
