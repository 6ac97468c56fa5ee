//! `dpo-sam sharpness` against exact values on a GPT-2 small enough (≈500 weights, f64) that the
//! Hessian's diagonal and the logit Hessian can be taken entry by entry by finite differences
//! of the loss itself — no autograd, no closed form.

use candle_core::{DType, Device, Tensor, Var};
use dpo_sam::config::{LossType, NllReduction};
use dpo_sam::data::batch::{tokenize_pair, TokenizedPair, Truncation};
use dpo_sam::data::PreferencePair;
use dpo_sam::logps::sequence_logps;
use dpo_sam::losses::{Loss, LossParams, PairLogps};
use dpo_sam::models::ops::log_softmax_last_dim;
use dpo_sam::models::{Model, ModelSource};
use dpo_sam::score::PairArgs;
use dpo_sam::sharpness::{reference_batches, sharpness, Objective, Probes, SharpnessArgs};
use dpo_sam::tokenizer::Tok;
use std::path::{Path, PathBuf};

mod common;
use common::score_fixture;

const PAIRS: &[(&str, &str, &str)] = &[
    ("1+2=", "3", "12"),
    ("rev ab=", "ba", "ab"),
    ("sort dcb=", "bcd", "dcb"),
    ("what is 7-5?", " 2.", " it is 12"),
];

/// A one-layer GPT-2 with n_embd 4 over the built-in character vocabulary, with weights large
/// enough (std 0.5) that the loss is far from quadratic.
fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let vocab = Tok::builtin().unwrap().vocab_size();
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": vocab, "n_positions": 24, "n_embd": 4,
        "n_layer": 1, "n_head": 2, "n_inner": 8, "initializer_range": 0.5,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn model(dir: &Path, seed: u64, trainable: bool, dtype: DType) -> Model {
    let src = ModelSource::Random {
        config: serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
            .unwrap(),
        seed,
        dir: None,
    };
    Model::load(&src, trainable, dtype, &Device::Cpu).unwrap()
}

fn pairs() -> Vec<TokenizedPair> {
    let tok = Tok::builtin().unwrap();
    let trunc = Truncation {
        max_length: 24,
        max_prompt_length: None,
        mode: dpo_sam::config::TruncationMode::KeepEnd,
    };
    PAIRS
        .iter()
        .map(|(p, c, r)| {
            let pair = PreferencePair {
                prompt: p.to_string(),
                chosen: c.to_string(),
                rejected: r.to_string(),
                append_eos: true,
            };
            tokenize_pair(&tok, &pair, &trunc).unwrap().unwrap()
        })
        .collect()
}

/// The objective on [`PAIRS`] in batches of 3 (so that the mean runs across batches), with a
/// reference of another seed.
fn objective(dir: &Path, dtype: DType, loss: Loss) -> Objective {
    let reference = model(dir, 2, false, dtype);
    let pad = Tok::builtin().unwrap().pad_id;
    let batches = reference_batches(&pairs(), Some(&reference), 3, pad, &Device::Cpu).unwrap();
    Objective::new(model(dir, 1, true, dtype), batches, loss).unwrap()
}

fn dpo() -> Loss {
    Loss::single(
        LossType::Sigmoid,
        LossParams {
            beta: 0.5,
            ..Default::default()
        },
    )
}

/// θ with `delta` added to one weight.
fn nudged(theta: &[Tensor], which: usize, at: usize, delta: f64) -> Vec<Tensor> {
    let mut out = theta.to_vec();
    let t = &theta[which];
    let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[at] += delta;
    out[which] = Tensor::from_vec(v, t.shape(), t.device()).unwrap();
    out
}

fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

#[test]
fn hutchinson_agrees_with_the_exact_parameter_hessian() {
    let dir = config_dir();
    let obj = objective(dir.path(), DType::F64, dpo());
    let theta = obj.weights().unwrap();
    let l0 = obj.loss().unwrap();
    let n: usize = theta.iter().map(Tensor::elem_count).sum();
    assert!(n > 300, "{n} weights");

    // The exact Hessian, column by column: H e_i by central differences of gradients.
    let mut hess = vec![0.0; n * n];
    let mut col = 0;
    for (j, t) in theta.iter().enumerate() {
        for i in 0..t.elem_count() {
            let zeros: Vec<Tensor> = theta.iter().map(|t| t.zeros_like().unwrap()).collect();
            let e = nudged(&zeros, j, i, 1.0);
            for (r, v) in flat(&obj.hvp(&e, 1e-5).unwrap()).into_iter().enumerate() {
                hess[r * n + col] = v;
            }
            col += 1;
        }
    }
    let big = hess.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for r in 0..n {
        for c in 0..r {
            let (a, b) = (hess[r * n + c], hess[c * n + r]);
            assert!((a - b).abs() < 1e-6 * big, "H[{r},{c}] {a} vs {b}");
        }
    }
    let trace: f64 = (0..n).map(|i| hess[i * n + i]).sum();
    // Its diagonal again, from second differences of L itself (no gradients).
    let h = 1e-4;
    let mut diag_trace = 0.0;
    for (j, t) in theta.iter().enumerate() {
        for i in 0..t.elem_count() {
            let at = |d: f64| {
                obj.set_weights(&nudged(&theta, j, i, d)).unwrap();
                obj.loss().unwrap()
            };
            diag_trace += (at(h) - 2.0 * l0 + at(-h)) / (h * h);
        }
    }
    obj.set_weights(&theta).unwrap();
    assert!(
        (trace - diag_trace).abs() < 1e-5 * trace.abs().max(1.0),
        "tr H {trace} vs Σ second differences {diag_trace}"
    );

    // Each probe's vᵀHv (default step) is vᵀ H v of the exact Hessian.
    let scale = f64::EPSILON.sqrt();
    let k = 100;
    let est = obj.hutchinson(k, 3, scale, |_, _| {}).unwrap();
    assert_eq!(
        flat(&obj.weights().unwrap()),
        flat(&theta),
        "θ restored bit for bit"
    );
    assert!((est.relative_step - scale).abs() < 1e-18);
    let mut probes = Probes::new(3);
    for sample in &est.samples {
        let v = flat(&probes.next(obj.policy()).unwrap());
        let vhv: f64 = (0..n)
            .map(|r| v[r] * (0..n).map(|c| hess[r * n + c] * v[c]).sum::<f64>())
            .sum();
        assert!(
            (sample - vhv).abs() < 1e-6 * vhv.abs().max(1.0),
            "vᵀHv {sample} vs exact {vhv}"
        );
    }
    // The estimate's spread is Hutchinson's: Var vᵀHv = 2 Σ_{i≠j} H_ij², and the mean lies
    // within 4 standard errors of tr H.
    let off: f64 = (0..n)
        .flat_map(|r| (0..n).filter(move |&c| c != r).map(move |c| (r, c)))
        .map(|(r, c)| hess[r * n + c].powi(2))
        .sum();
    let se_exact = (2.0 * off / k as f64).sqrt();
    let se = est.stderr.unwrap();
    assert!(
        se > 0.5 * se_exact && se < 2.0 * se_exact,
        "se {se} vs {se_exact}"
    );
    assert!(
        (est.mean - trace).abs() < 4.0 * se_exact,
        "Hutchinson {} ± {se} vs tr H {trace}",
        est.mean
    );

    // In f32 with its own default step, the same probes give the same vᵀHv to 1%.
    let obj32 = objective(dir.path(), DType::F32, dpo());
    let est32 = obj32
        .hutchinson(20, 3, f64::from(f32::EPSILON).sqrt(), |_, _| {})
        .unwrap();
    for (a, b) in est32.samples.iter().zip(&est.samples) {
        assert!(
            (a - b).abs() < 1e-2 * b.abs().max(1.0),
            "f32 {a} vs f64 {b}"
        );
    }
}

/// tr ∇²_z L by central differences, in each response logit (`[n, vocab]` per batch, the hidden
/// states fixed), of ∂L/∂z from autograd through L computed from the logits as the trainer does.
fn loss_of_logits(obj: &Objective, loss: &Loss) -> f64 {
    let n_pairs = PAIRS.len() as f64;
    let head = obj.policy().net.output_layer();
    let mut trace = 0.0;
    for (batch, reference) in obj.batches() {
        let h = batch
            .response_hidden(obj.policy().net.forward_hidden(&batch.input_ids).unwrap())
            .unwrap()
            .detach();
        let logits = head.logits(&h, None).unwrap();
        let (n, vocab) = logits.dims2().unwrap();
        let z0 = logits.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let grad_at = |z: &[f64], k: usize| -> f64 {
            let z =
                Var::from_tensor(&Tensor::from_vec(z.to_vec(), (n, vocab), &Device::Cpu).unwrap())
                    .unwrap();
            let logp = log_softmax_last_dim(z.as_tensor())
                .unwrap()
                .gather(&batch.targets.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let seq = sequence_logps(batch, &logp).unwrap();
            let lp = PairLogps::from_rows(&seq, reference.as_ref(), &batch.response_lens).unwrap();
            let l = (loss.compute(&lp).unwrap().losses.sum_all().unwrap() / n_pairs).unwrap();
            let g = l
                .backward()
                .unwrap()
                .get(&z)
                .unwrap()
                .flatten_all()
                .unwrap();
            g.get(k).unwrap().to_scalar::<f64>().unwrap()
        };
        let d = 1e-5;
        for k in 0..z0.len() {
            let mut z = z0.clone();
            z[k] += d;
            let up = grad_at(&z, k);
            z[k] -= 2.0 * d;
            trace += (up - grad_at(&z, k)) / (2.0 * d);
        }
    }
    trace
}

#[test]
fn logit_hessian_trace_is_exact_for_each_loss() {
    let dir = config_dir();
    let smoothed = LossParams {
        beta: 0.5,
        label_smoothing: 0.1,
        ..Default::default()
    };
    for kind in [
        LossType::Sigmoid,
        LossType::Robust,
        LossType::Ipo,
        LossType::Cpo,
        LossType::Simpo,
        LossType::Dpop,
        LossType::Sft,
    ] {
        let loss = Loss::single(kind, smoothed.clone());
        let obj = objective(dir.path(), DType::F64, loss.clone());
        let got = obj.logit_traces().unwrap().preference;
        let want = loss_of_logits(&obj, &loss);
        assert!(
            (got - want).abs() < 1e-7 * want.abs().max(1e-2),
            "{kind:?}: closed form {got} vs finite differences {want}"
        );
    }
    // A weighted mix adds up (here with the other NLL reduction).
    let mix = Loss {
        terms: vec![(LossType::Sigmoid, 1.0), (LossType::Sft, 0.5)],
        params: LossParams {
            nll_reduction: NllReduction::SequenceSum,
            ..smoothed
        },
    };
    let obj = objective(dir.path(), DType::F64, mix.clone());
    let got = obj.logit_traces().unwrap().preference;
    let want = loss_of_logits(&obj, &mix);
    assert!(
        (got - want).abs() < 1e-7 * want.abs().max(1e-2),
        "mix: {got} vs {want}"
    );
}

fn args(dtype: &str, probes: usize) -> SharpnessArgs {
    SharpnessArgs {
        input: PairArgs {
            model: score_fixture("policy"),
            ref_model: Some(score_fixture("ref")),
            data: score_fixture("data.jsonl"),
            format: "explicit".into(),
            loss_type: "sigmoid".into(),
            beta: 0.1,
            max_length: 64,
            max_prompt_length: None,
            batch_size: 2,
            dtype: dtype.into(),
            device: "cpu".into(),
        },
        num_pairs: 64,
        probes,
        seed: 0,
        fd_scale: None,
        json: true,
    }
}

#[test]
fn the_command_reports_both_traces_and_its_step() {
    let r = sharpness(&args("f32", 4)).unwrap();
    assert_eq!(r.pairs, 3, "all of the fixture's pairs");
    assert_eq!(r.probes.len(), 4);
    assert!(r.param_hessian_trace.is_finite() && r.param_hessian_trace_stderr.unwrap() > 0.0);
    let c = f64::from(f32::EPSILON).sqrt();
    assert!((r.fd_relative_step - c).abs() < 1e-12);
    assert!((r.fd_step - c * r.param_norm / (r.params as f64).sqrt()).abs() < 1e-15);
    // The per-token trace of Diag(p) − ppᵀ lies in (0, 1 − 1/V); per response it sums tokens.
    assert!(r.ce_logit_hessian_trace_per_token > 0.0 && r.ce_logit_hessian_trace_per_token < 1.0);
    let per_seq = r.ce_logit_hessian_trace_per_token * r.response_tokens as f64 / 6.0;
    assert!((r.ce_logit_hessian_trace_per_sequence - per_seq).abs() < 1e-9);
    // f64 agrees with f32 on the exact logit trace.
    let r64 = sharpness(&args("f64", 1)).unwrap();
    assert!(
        (r64.logit_hessian_trace - r.logit_hessian_trace).abs()
            < 1e-4 * r64.logit_hessian_trace.abs(),
        "{} vs {}",
        r64.logit_hessian_trace,
        r.logit_hessian_trace
    );

    let err = |a: SharpnessArgs| format!("{:#}", sharpness(&a).unwrap_err());
    assert!(err(args("bf16", 1)).contains("--dtype"));
    assert!(err(args("f32", 0)).contains("--probes"));
    let mut a = args("f32", 1);
    a.fd_scale = Some(-1.0);
    assert!(err(a).contains("--fd-scale"));
    let mut a = args("f32", 1);
    a.num_pairs = 0;
    assert!(err(a).contains("--pairs"));
    let mut a = args("f32", 1);
    a.input.data = PathBuf::from(score_fixture("missing.jsonl"))
        .display()
        .to_string();
    assert!(err(a).contains("missing.jsonl"));
}
