//! What bf16 does to the logits-SAM perturbation at the paper's output-layer shapes and ρ
//! (Pythia-2.8B: vocabulary 50304 × hidden 2560, ρ = 1e-4; Mistral-7B: 32000 × 4096, ρ = 1e-5):
//! the numbers behind `docs/precision.md`. Not a timing.
//!
//! The inputs are random but shaped like a training step's: W ~ N(0, 0.02²) (rounded to bf16
//! where the weights are bf16), hidden states H ~ N(0, 1) (a layer norm's output) for 4 pairs ×
//! 2 × 128 response tokens, targets drawn from softmax(H Wᵀ), and the DPO shape of
//! G = ∂L/∂logits: c (onehot(target) − softmax) with c = +1 on chosen and −1 on rejected tokens.
//! Then g = Gᵀ H and e = ρ g/‖g‖ as in Algorithm 1, and e is applied five ways: added to bf16
//! weights (dpo-sam before this fix; the paper's official code where the head is bf16), added to
//! f32 weights that a bf16 matmul then rounds (autocast), added to f32 weights (f32 training), as
//! bf16 delta-logits added to bf16 logits, and as dpo-sam applies it
//! now (H eᵀ in f32 added to the f32 logits). The logits are measured on the first 256 tokens.
//!
//! `cargo bench --profile dev --bench precision`

use candle_core::{DType, Device, Result, Tensor, D};
use dpo_sam::models::output::OutputLayer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOKENS: usize = 1024;
const MEASURED: usize = 256;
/// Rows of [vocab, hidden] tensors reduced at a time (bounds the f64 temporaries).
const CHUNK: usize = 4096;

struct Shape {
    name: &'static str,
    vocab: usize,
    hidden: usize,
    rho: f64,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "Pythia-2.8B",
        vocab: 50304,
        hidden: 2560,
        rho: 1e-4,
    },
    Shape {
        name: "Mistral-7B",
        vocab: 32000,
        hidden: 4096,
        rho: 1e-5,
    },
];

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64, shape: (usize, usize)) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let u1 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn bf16(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

/// Σ f(a, b) over two equally shaped `[rows, cols]` tensors, in f64, `CHUNK` rows at a time.
fn reduce(a: &Tensor, b: &Tensor, f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>) -> Result<f64> {
    let rows = a.dim(0)?;
    let mut total = 0.0;
    for start in (0..rows).step_by(CHUNK) {
        let len = CHUNK.min(rows - start);
        let a = a.narrow(0, start, len)?.to_dtype(DType::F64)?;
        let b = b.narrow(0, start, len)?.to_dtype(DType::F64)?;
        total += f(&a, &b)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total)
}

fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    reduce(a, b, |a, b| a * b)
}

/// How much of e a weight step `delta` (what W actually moved by) carries.
struct Kept {
    /// Share of e's nonzero entries whose weight moved at all.
    entries: f64,
    /// ‖Δ‖ / ‖e‖.
    norm: f64,
    /// ⟨Δ, e⟩ / ‖e‖²: the part of e that Δ carries (1 when Δ = e).
    along: f64,
    /// ‖Δ − e‖ / ‖e‖.
    error: f64,
}

fn kept(delta: &Tensor, e: &Tensor) -> Result<Kept> {
    let ee = dot(e, e)?;
    let moved = reduce(delta, e, |d, e| {
        d.ne(0.0)?.to_dtype(DType::F64)? * e.ne(0.0)?.to_dtype(DType::F64)?
    })?;
    let nonzero = reduce(e, e, |e, _| e.ne(0.0)?.to_dtype(DType::F64))?;
    Ok(Kept {
        entries: moved / nonzero,
        norm: (dot(delta, delta)? / ee).sqrt(),
        along: dot(delta, e)? / ee,
        error: (reduce(delta, e, |d, e| (d - e)?.sqr())? / ee).sqrt(),
    })
}

/// How perturbed logits `moved` (minus the unperturbed ones) compare with the exact H eᵀ, and
/// the share of the first-order loss ascent ⟨G, Δz⟩ they keep.
struct Moved {
    rms: f64,
    cosine: f64,
    ascent: f64,
}

fn moved(dz: &Tensor, exact: &Tensor, g: &Tensor) -> Result<Moved> {
    let n = dz.elem_count() as f64;
    Ok(Moved {
        rms: (dot(dz, dz)? / n).sqrt(),
        cosine: dot(dz, exact)? / (dot(dz, dz)? * dot(exact, exact)?).sqrt().max(1e-300),
        ascent: dot(dz, g)? / dot(exact, g)?,
    })
}

fn run(shape: &Shape, seed: u64) -> Result<()> {
    let (v, d) = (shape.vocab, shape.hidden);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    println!(
        "\n{}: W [{v}, {d}], ρ = {:e}, {TOKENS} tokens",
        shape.name, shape.rho
    );
    let w32 = normal(&mut rng, v * d, 0.02, (v, d))?;
    let wb = w32.to_dtype(DType::BF16)?;
    let wbf = wb.to_dtype(DType::F32)?;
    let h = bf16(&normal(&mut rng, TOKENS * d, 1.0, (TOKENS, d))?)?;

    // G = c (onehot(target) − softmax(z)), targets drawn from softmax(z).
    let z = h.matmul(&wbf.t()?)?;
    let p = candle_nn::ops::softmax_last_dim(&z)?;
    let probs = p.to_vec2::<f32>()?;
    let targets: Vec<u32> = probs
        .iter()
        .map(|row| {
            let mut u: f32 = rng.random();
            row.iter()
                .position(|&q| {
                    u -= q;
                    u <= 0.0
                })
                .unwrap_or(row.len() - 1) as u32
        })
        .collect();
    let onehot = Tensor::zeros((TOKENS, v), DType::F32, &Device::Cpu)?.scatter_add(
        &Tensor::new(targets.as_slice(), &Device::Cpu)?.unsqueeze(1)?,
        &Tensor::ones((TOKENS, 1), DType::F32, &Device::Cpu)?,
        1,
    )?;
    let sign: Vec<f32> = (0..TOKENS)
        .map(|i| if (i / 128) % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let sign = Tensor::new(sign.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
    let g_logits = (onehot - &p)?.broadcast_mul(&sign)?;
    let target_p = p
        .gather(
            &Tensor::new(targets.as_slice(), &Device::Cpu)?.unsqueeze(1)?,
            1,
        )?
        .mean_all()?
        .to_scalar::<f32>()?;
    drop(probs);

    let g = g_logits.t()?.matmul(&h)?;
    let g_norm = dot(&g, &g)?.sqrt();
    let e = (&g * (shape.rho / g_norm))?;
    drop(g);
    let e_abs = e.abs()?;
    let e_max = e_abs.max_all()?.to_scalar::<f32>()?;
    let e_rms = (dot(&e, &e)? / (v * d) as f64).sqrt();
    // Half the bf16 spacing at |w|: 2^(⌊log₂|w|⌋ − 8).
    let w_abs_mean = reduce(&w32, &w32, |w, _| w.abs())? / (v * d) as f64;
    println!(
        "mean target probability {target_p:.2e}; |w| mean {w_abs_mean:.4}, half a bf16 step there {:.1e}; e: max {e_max:.2e}, rms {e_rms:.2e}",
        2f64.powf(w_abs_mean.log2().floor() - 8.0)
    );

    let hm = h.narrow(0, 0, MEASURED)?;
    let zm = z.narrow(0, 0, MEASURED)?;
    let gm = g_logits.narrow(0, 0, MEASURED)?;
    let exact = hm.matmul(&e.t()?)?;

    // dpo-sam's own output layer with the bf16 head: the perturbed minus the plain logits.
    let head = OutputLayer {
        weight: wb.clone(),
        bias: None,
    };
    let hb = hm.to_dtype(DType::BF16)?;
    let plain = head.logits(&hb, None)?;
    let now = (head.logits(&hb, Some(&e))? - &plain)?;
    let before = (head.logits(&hb, Some(&e.to_dtype(DType::BF16)?))? - &plain)?;

    println!(
        "| e applied as | entries of e that move W | ‖ΔW‖/‖e‖ | ⟨ΔW, e⟩/‖e‖² | ‖ΔW − e‖/‖e‖ |"
    );
    println!("|---|---:|---:|---:|---:|");
    let row = |label: &str, k: &Kept| {
        println!(
            "| {label} | {:.2}% | {:.3} | {:.3} | {:.3} |",
            100.0 * k.entries,
            k.norm,
            k.along,
            k.error
        )
    };
    // bf16 weights: bf16(W + bf16(e)) − W.
    let delta_bf16 = (bf16(&(&wbf + bf16(&e)?)?)? - &wbf)?;
    row("W + e in bf16 (bf16 weights)", &kept(&delta_bf16, &e)?);
    // f32 weights rounded to bf16 by the matmul: bf16(W32 + e) − bf16(W32).
    let delta_autocast = (bf16(&(&w32 + &e)?)? - bf16(&w32)?)?;
    row(
        "W + e in f32, cast to bf16 for the matmul (autocast)",
        &kept(&delta_autocast, &e)?,
    );
    // f32 weights: fl32(W32 + e) − W32 (exact in f32: the two are within a factor of 2).
    let delta_f32 = ((&w32 + &e)? - &w32)?;
    row("W + e in f32 (f32 weights)", &kept(&delta_f32, &e)?);
    drop(delta_f32);

    println!(
        "\nlogits Δz on {MEASURED} tokens (exact: H eᵀ in f32); logit std {:.2}",
        {
            let n = zm.elem_count() as f64;
            (dot(&zm, &zm)? / n).sqrt()
        }
    );
    println!(
        "| perturbed logits from | rms Δz | cosine with H eᵀ | first-order ascent ⟨G, Δz⟩ kept |"
    );
    println!("|---|---:|---:|---:|");
    let line = |label: &str, m: &Moved| {
        println!(
            "| {label} | {:.2e} | {:.3} | {:.3} |",
            m.rms, m.cosine, m.ascent
        )
    };
    line("H eᵀ in f32 (exact)", &moved(&exact, &exact, &gm)?);
    line(
        "dpo-sam now: f32 logits + H eᵀ in f32 (OutputLayer::logits)",
        &moved(&now, &exact, &gm)?,
    );
    line(
        "dpo-sam before: H·bf16(W + e), bf16 matmul (OutputLayer::logits)",
        &moved(&before, &exact, &gm)?,
    );
    // Modelled: an f32-accumulating matmul whose output is rounded to bf16, as on tensor cores.
    let bf16_out =
        |dw: &Tensor| -> Result<Tensor> { bf16(&(&zm + hm.matmul(&dw.t()?)?)?)? - bf16(&zm)? };
    line(
        "H·bf16(W + e), bf16 weights, bf16 logits",
        &moved(&bf16_out(&delta_bf16)?, &exact, &gm)?,
    );
    line(
        "H·bf16(W32 + e), autocast, bf16 logits",
        &moved(&bf16_out(&delta_autocast)?, &exact, &gm)?,
    );
    // The tiled CUDA path: H eᵀ as a tensor-core GEMM of bf16 H and bf16 e (e rounded alone,
    // to its own relative precision) accumulated in f32 onto the f32 logits.
    let product = hb.to_dtype(DType::F32)?.matmul(&bf16(&e)?.t()?)?;
    line(
        "dpo-sam on CUDA: f32 logits + bf16(H)·bf16(e)ᵀ in f32 (tiled kernel)",
        &moved(&((&plain + product)? - &plain)?, &exact, &gm)?,
    );
    line(
        "bf16 logits + bf16(H eᵀ)",
        &moved(
            &(bf16(&(bf16(&zm)? + bf16(&exact)?)?)? - bf16(&zm)?)?,
            &exact,
            &gm,
        )?,
    );

    // The SAM correction to ∂L/∂logits next to bf16's resolution.
    let p0 = candle_nn::ops::softmax_last_dim(&zm)?;
    let p1 = candle_nn::ops::softmax_last_dim(&(&zm + &exact)?)?;
    let dg = (p0 - p1)?.broadcast_mul(&sign.narrow(0, 0, MEASURED)?)?;
    let rel = (dot(&dg, &dg)? / dot(&gm, &gm)?).sqrt();
    let rel_max = (&dg.abs()?.max_keepdim(D::Minus1)? / gm.abs()?.max_keepdim(D::Minus1)?)?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "\nSAM's change of ∂L/∂logits: ‖ΔG‖/‖G‖ = {rel:.2e} (largest per token {rel_max:.2e}); bf16 resolves 2⁻⁹ ≈ {:.1e}",
        2f64.powi(-9)
    );
    Ok(())
}

fn main() -> Result<()> {
    for (i, shape) in SHAPES.iter().enumerate() {
        run(shape, 19 + i as u64)?;
    }
    Ok(())
}
