//! The fused, tiled output layer against the unfused composition: token log-probs and every
//! gradient (h, W, b) with and without the logits-SAM perturbation, tied weights, the SAM
//! gradient, finite differences in f64, kept logits against recomputed ones, and the memory
//! bound (one tile of logits at a time unless all of them fit the keep budget).

use candle_core::{DType, Device, Result, Tensor, Var};
use dpo_sam::kernels::output::{take_largest_logits_chunk, Tile};
use dpo_sam::models::output::{OutputLayer, SamPrePass};

const N: usize = 37;
const HIDDEN: usize = 16;
const VOCAB: usize = 61;
/// Smaller than n and vocab and dividing neither, so that tiling and ragged last tiles run;
/// the backward recomputes the logits.
const TILE: Tile = Tile {
    rows: 8,
    vocab: 16,
    keep_bytes: 0,
};
/// [`TILE`], keeping the forward's logits for the backward.
const KEEP: Tile = Tile {
    keep_bytes: usize::MAX,
    ..TILE
};

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
        self.run_tiled(fused.then_some(TILE), e)
    }

    /// [`Case::run`], fused with `tile` when given.
    fn run_tiled(&self, tile: Option<Tile>, e: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let head = self.head();
        let logps = if let Some(tile) = tile {
            head.token_logps_tiled(self.h.as_tensor(), &self.targets, e, tile)?
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

/// The fused path is what `token_logps` uses on CPU, and a tile as large as n × vocab is fine too.
#[test]
fn dispatch_and_single_tile_agree() -> Result<()> {
    let c = case(DType::F32, true)?;
    let head = c.head();
    let a = head.token_logps(c.h.as_tensor(), &c.targets, Some(&c.e))?;
    let b = head.token_logps_tiled(
        c.h.as_tensor(),
        &c.targets,
        Some(&c.e),
        Tile {
            rows: 10 * N,
            vocab: 10 * VOCAB,
            ..Tile::DEFAULT
        },
    )?;
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
            head.token_logps_tiled(
                &h,
                &targets,
                None,
                Tile {
                    rows: 3,
                    vocab: 7,
                    keep_bytes: 0,
                },
            )?
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

/// The tiled SAM gradient (Algorithm 1, line 3) equals the unfused closed form and autograd.
#[test]
fn sam_gradient_tiled_matches_unfused() -> Result<()> {
    for bias in [false, true] {
        let c = case(DType::F32, bias)?;
        let head = c.head();
        let h = c.h.as_tensor();
        let (_, pre) = head.token_logps_for_sam_tiled(h, &c.targets, TILE)?;
        let tiled = head.sam_gradient(h, &c.targets, &c.coef, &pre)?;
        let unfused = head.sam_gradient_unfused(h, &c.targets, &c.coef)?;
        let (_, auto) = c.run(false, None)?;
        let d = max_diff(&tiled, &unfused)?;
        println!("bias {bias}: SAM g max diff {d:.2e}");
        assert!(d <= 4e-6 * scale(&unfused)?);
        assert!(max_diff(&tiled, &auto[1])? <= 4e-6 * scale(&unfused)?);
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
        let lp = head.token_logps_tiled(h, &c.targets, Some(&c.e), TILE)?;
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

/// Peak memory of the fused path does not scale with n × vocab: it holds one tile of logits at
/// most through the forward, the backward and the SAM gradient, unless all n × vocab fit the
/// keep budget, when it holds exactly those.
#[test]
fn fused_path_holds_one_tile_of_logits_at_most() -> Result<()> {
    let (n, vocab) = (300, 2000);
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
    let all = n * vocab;
    for (keep_bytes, want) in [(0, 32 * 500), (all * 4 - 1, 32 * 500), (all * 4, all)] {
        let tile = Tile {
            rows: 32,
            vocab: 500,
            keep_bytes,
        };
        take_largest_logits_chunk();
        let lp = head.token_logps_tiled(h.as_tensor(), &targets, None, tile)?;
        let grads = lp.sum_all()?.backward()?;
        assert!(grads.get(&w).is_some() && grads.get(&h).is_some());
        let training = take_largest_logits_chunk();
        let (_, pre) = head.token_logps_for_sam_tiled(h.as_tensor(), &targets, tile)?;
        head.sam_gradient(h.as_tensor(), &targets, &lp.ones_like()?, &pre)?;
        let sam = take_largest_logits_chunk();
        for largest in [training, sam] {
            assert_eq!(
                largest, want,
                "keep_bytes {keep_bytes}: held {largest} logits at once; n × vocab = {all}"
            );
        }
    }
    Ok(())
}

/// Keeping the forward's logits changes which matmuls run, not a bit of the results: log-probs,
/// every gradient (with and without a bias and the SAM perturbation) and the SAM gradient.
#[test]
fn kept_logits_give_exactly_the_recomputed_results() -> Result<()> {
    for bias in [false, true] {
        let c = case(DType::F32, bias)?;
        for e in [None, Some(&c.e)] {
            let (lp_r, grads_r) = c.run_tiled(Some(TILE), e)?;
            let (lp_k, grads_k) = c.run_tiled(Some(KEEP), e)?;
            assert_eq!(max_diff(&lp_r, &lp_k)?, 0.0);
            for (r, k) in grads_r.iter().zip(&grads_k) {
                assert_eq!(
                    max_diff(r, k)?,
                    0.0,
                    "bias {bias}, perturbed {}",
                    e.is_some()
                );
            }
        }
        let head = c.head();
        let g = |tile| -> Result<Tensor> {
            let (_, pre) = head.token_logps_for_sam_tiled(c.h.as_tensor(), &c.targets, tile)?;
            head.sam_gradient(c.h.as_tensor(), &c.targets, &c.coef, &pre)
        };
        assert_eq!(max_diff(&g(TILE)?, &g(KEEP)?)?, 0.0);
    }
    Ok(())
}

/// Off CPU-f32/f64 (here bf16 weights) `token_logps` takes the unfused path and still works.
#[test]
fn half_precision_falls_back_to_unfused() -> Result<()> {
    let c = case(DType::BF16, false)?;
    let head = c.head();
    let lp = head.token_logps(c.h.as_tensor(), &c.targets, None)?;
    assert_eq!(lp.dtype(), DType::F32);
    let (pre_lp, pre) = head.token_logps_for_sam(c.h.as_tensor(), &c.targets)?;
    assert!(matches!(pre, SamPrePass::Unfused(_)));
    assert_eq!(max_diff(&pre_lp, &lp)?, 0.0);
    // Line 3 from the pre-pass's log-softmax is the recomputed one, bit for bit.
    let coef = c.coef.to_dtype(DType::F32)?;
    let g = head.sam_gradient(c.h.as_tensor(), &c.targets, &coef, &pre)?;
    assert_eq!(g.dims(), &[VOCAB, HIDDEN]);
    let recomputed = head.sam_gradient_unfused(c.h.as_tensor(), &c.targets, &coef)?;
    assert_eq!(max_diff(&g, &recomputed)?, 0.0);
    Ok(())
}

/// The paper's cost: with the logits kept, a plain pass (forward and backward) runs three
/// lm_head-sized GEMMs and a logits-SAM pass (lines 1–7 of Algorithm 1) five; recomputing them
/// costs one more per pass over the tiles.
#[test]
fn logits_sam_runs_five_lm_head_gemms() -> anyhow::Result<()> {
    use dpo_sam::kernels::output::take_gemm_products;
    let c = case(DType::F32, false)?;
    let head = c.head();
    let loss = |lp: &Tensor| -> anyhow::Result<Tensor> { Ok((lp * &c.coef)?.sum_all()?) };
    let gemms = || take_gemm_products() as f64 / (N * VOCAB) as f64;
    take_gemm_products();
    let lp = head.token_logps(c.h.as_tensor(), &c.targets, None)?;
    loss(&lp)?.backward()?;
    assert_eq!(gemms(), 3.0);
    let mut p = dpo_sam::sam::logits_perturbation(&head, c.h.as_tensor(), &c.targets, 0.1, &loss)?;
    let lp = p.token_logps_at_w_plus_e(&head, c.h.as_tensor(), &c.targets)?;
    loss(&lp)?.backward()?;
    assert_eq!(gemms(), 5.0);
    // Recomputed: the pre-pass's g and the backward each redo the logits.
    let lp = head.token_logps_tiled(c.h.as_tensor(), &c.targets, None, TILE)?;
    loss(&lp)?.backward()?;
    assert_eq!(gemms(), 4.0);
    Ok(())
}
