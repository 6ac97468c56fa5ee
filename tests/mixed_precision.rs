//! bf16 mixed precision (`training.mixed_precision = "bf16"`) against f32 on the built-in tiny
//! GPT-2: one step agrees within bf16 tolerances, masters stay f32 and absorb updates too small
//! for bf16, and a short run learns. Pure bf16 with stochastic rounding
//! (`training.bf16_stochastic_rounding`) keeps bf16 state and resumes bit for bit.

use candle_core::{DType, Tensor};
use dpo_sam::data::batch::PreferenceBatch;
use dpo_sam::optim::GradAccumulator;
use dpo_sam::train::Trainer;

mod common;
use common::{tiny_config as config, tiny_trainer as trainer};

fn flat_grads(tr: &Trainer, store: &candle_core::backprop::GradStore) -> Tensor {
    let parts: Vec<Tensor> = tr
        .policy()
        .params
        .iter()
        .map(|p| {
            store
                .get(p.var.as_tensor())
                .expect(&p.name)
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
        })
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn config_accepts_no_and_bf16_only_with_f32_masters() {
    assert!(config(&["training.mixed_precision=\"bf16\""]).is_ok());
    let err = config(&["training.mixed_precision=\"fp16\""])
        .unwrap_err()
        .to_string();
    assert!(err.contains("training.mixed_precision"), "{err}");
    let err = config(&["training.mixed_precision=\"bf16\"", "model.dtype=\"bf16\""])
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.dtype"), "{err}");
}

#[test]
fn one_bf16_step_agrees_with_f32() {
    let full = trainer(&[]);
    let mixed = trainer(&["training.mixed_precision=\"bf16\""]);
    for p in &mixed.policy().params {
        assert_eq!(p.var.dtype(), DType::BF16, "{}", p.name);
        assert_eq!(
            p.master.as_ref().expect("a master copy").dtype(),
            DType::F32,
            "{}",
            p.name
        );
    }
    assert_eq!(
        mixed
            .reference()
            .model()
            .unwrap()
            .net
            .output_layer()
            .weight
            .dtype(),
        DType::BF16
    );

    let batch =
        PreferenceBatch::new(&full.train_pairs()[..8], full.tok().pad_id, full.device()).unwrap();
    let a = full.micro_step(&batch, Some(1.0)).unwrap();
    let b = mixed.micro_step(&batch, Some(1.0)).unwrap();
    // bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2%), compounded over two blocks.
    assert!(
        (a.loss - b.loss).abs() < 0.02 * a.loss.abs().max(0.1),
        "loss {} vs {}",
        a.loss,
        b.loss
    );
    for (x, y) in a.chosen_logps.iter().zip(&b.chosen_logps) {
        assert!(
            (x - y).abs() < 0.02 * x.abs().max(1.0),
            "log-prob {x} vs {y}"
        );
    }
    let ga = flat_grads(&full, a.grads.as_ref().unwrap());
    let gb = flat_grads(&mixed, b.grads.as_ref().unwrap());
    let cosine = dot(&ga, &gb) / (dot(&ga, &ga).sqrt() * dot(&gb, &gb).sqrt());
    assert!(cosine > 0.99, "gradient cosine {cosine}");
    let ratio = (dot(&gb, &gb) / dot(&ga, &ga)).sqrt();
    assert!((ratio - 1.0).abs() < 0.05, "gradient norm ratio {ratio}");
}

#[test]
fn masters_keep_updates_too_small_for_bf16() {
    let mut mixed = trainer(&[
        "training.mixed_precision=\"bf16\"",
        "training.optimizer=\"sgd\"",
        "training.max_grad_norm=0",
    ]);
    let batch = PreferenceBatch::new(
        &mixed.train_pairs()[..4],
        mixed.tok().pad_id,
        mixed.device(),
    )
    .unwrap();
    let ms = mixed.micro_step(&batch, Some(1.0)).unwrap();
    let mut acc = GradAccumulator::new(mixed.policy().params.len());
    acc.add(&mixed.policy().params, ms.grads.as_ref().unwrap())
        .unwrap();
    let p = &mixed.policy().params[0];
    let before_master = p.master.as_ref().unwrap().as_tensor().copy().unwrap();
    let before_var = p.var.as_tensor().copy().unwrap();
    // Far below bf16's resolution for weights of size ~0.02: the bf16 copy cannot move.
    mixed.apply_gradients(&acc, 1e-9).unwrap();
    let moved = |a: &Tensor, b: &Tensor| {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let p = &mixed.policy().params[0];
    assert!(
        moved(&before_master, p.master.as_ref().unwrap().as_tensor()) > 0.0,
        "master did not move"
    );
    assert_eq!(moved(&before_var, p.var.as_tensor()), 0.0);
    // Saved weights are the f32 masters.
    assert_eq!(mixed.policy().named_tensors()[&p.name].dtype(), DType::F32);
}

#[test]
fn a_short_bf16_run_lowers_the_loss() {
    let mut tr = trainer(&[
        "training.mixed_precision=\"bf16\"",
        "data.builtin_pairs=512",
        "training.max_steps=40",
        "training.eval_steps=0",
    ]);
    let before = tr.evaluate().unwrap();
    let summary = tr.train().unwrap();
    let after = summary.eval().unwrap();
    assert!(after.loss < before.loss - 0.05, "{before:?} → {after:?}");
    // The checkpoint holds the f32 masters.
    let saved = candle_core::safetensors::load(
        tr.config().output_dir.join("model.safetensors"),
        tr.device(),
    )
    .unwrap();
    assert!(saved.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn stochastic_rounding_needs_pure_bf16() {
    for (set, needle) in [
        (
            &["training.bf16_stochastic_rounding=true"][..],
            "model.dtype = \"f32\"",
        ),
        (
            &[
                "training.bf16_stochastic_rounding=true",
                "training.mixed_precision=\"bf16\"",
            ][..],
            "mixed_precision = \"bf16\"",
        ),
    ] {
        let err = format!("{:#}", config(set).unwrap_err());
        assert!(
            err.contains("training.bf16_stochastic_rounding") && err.contains(needle),
            "{err}"
        );
    }
    assert!(config(&[
        "model.dtype=\"bf16\"",
        "training.bf16_stochastic_rounding=true"
    ])
    .is_ok());
}

/// A pure-bf16 run with stochastic rounding, stopped at its step-3 checkpoint and resumed,
/// ends where the uninterrupted run does: the rounding streams are keyed by (seed, step,
/// parameter). Its weights and AdamW moments are bf16.
#[test]
fn stochastic_rounding_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &std::path::Path, resume: bool| {
        let mut args: Vec<String> = ["train", "--config", "configs/tiny_gpt2.toml", "--quiet"]
            .map(String::from)
            .to_vec();
        for set in [
            "training.max_steps=6",
            "data.builtin_pairs=64",
            "training.save_steps=3",
            "model.dtype=\"bf16\"",
            "training.bf16_stochastic_rounding=true",
        ] {
            args.extend(["--set".into(), set.into()]);
        }
        args.extend(["--output-dir".into(), out.display().to_string()]);
        if resume {
            args.extend(["--resume".into(), out.display().to_string()]);
        }
        let res = std::process::Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
    };
    let (straight, resumed) = (tmp.path().join("a"), tmp.path().join("b"));
    run(&straight, false);
    run(&resumed, false);
    std::fs::remove_dir_all(resumed.join("checkpoint-6")).unwrap();
    std::fs::remove_file(resumed.join("model.safetensors")).unwrap();
    run(&resumed, true);
    let read = |d: &std::path::Path, f: &str| std::fs::read(d.join(f)).unwrap();
    for file in ["model.safetensors", "checkpoint-6/optimizer.safetensors"] {
        assert!(
            read(&straight, file) == read(&resumed, file),
            "{file} differs"
        );
    }
    let state = candle_core::safetensors::load(
        straight.join("checkpoint-6/optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let moments: Vec<_> = state
        .iter()
        .filter(|(k, _)| k.starts_with("m.") || k.starts_with("v."))
        .collect();
    assert!(!moments.is_empty() && moments.iter().all(|(_, t)| t.dtype() == DType::BF16));
}
