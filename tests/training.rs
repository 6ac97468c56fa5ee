//! The training step end to end on the built-in tiny GPT-2: gradients reach every weight and
//! match finite differences, logits-SAM follows Algorithm 1, and a short run learns.

use candle_core::{DType, Tensor, Var};
use dpo_sam::data::batch::PreferenceBatch;
use dpo_sam::models::output::OutputLayer;
use dpo_sam::train::Trainer;

mod common;
use common::{max_abs_diff, tiny_trainer as trainer};

fn batch(tr: &Trainer, n: usize) -> PreferenceBatch {
    PreferenceBatch::new(&tr.train_pairs()[..n], tr.tok().pad_id, tr.device()).unwrap()
}

fn grads_by_name(tr: &Trainer, store: &candle_core::backprop::GradStore) -> Vec<(String, Tensor)> {
    tr.policy()
        .params
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                store.get(p.var.as_tensor()).expect(&p.name).clone(),
            )
        })
        .collect()
}

fn norm(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

#[test]
fn every_trainable_tensor_receives_a_gradient() {
    for sam in ["none", "logits"] {
        let tr = trainer(&[&format!("sam.kind=\"{sam}\"")]);
        let b = batch(&tr, 4);
        let ms = tr.micro_step(&b, Some(1.0)).unwrap();
        let grads = grads_by_name(&tr, ms.grads.as_ref().unwrap());
        assert_eq!(
            grads.len(),
            2 + 12 * 2 + 2,
            "every GPT-2 tensor is a parameter"
        );
        for (name, g) in grads {
            assert!(norm(&g) > 0.0, "{name} got a zero gradient with sam={sam}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    // f64 so that central differences are accurate to ~1e-8.
    let tr = trainer(&[
        "model.dtype=\"f64\"",
        "model.builtin.n_embd=8",
        "model.builtin.n_head=2",
        "sam.kind=\"none\"",
    ]);
    let b = batch(&tr, 3);
    let ms = tr.micro_step(&b, Some(1.0)).unwrap();
    let grads = grads_by_name(&tr, ms.grads.as_ref().unwrap());
    let eps = 1e-5;
    let mut checked = 0;
    for (p, (name, g)) in tr.policy().params.iter().zip(&grads) {
        let flat_g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let original = p.var.as_tensor().copy().unwrap();
        let n = flat_g.len();
        // a few coordinates per tensor, including the largest-gradient one
        let argmax = (0..n)
            .max_by(|&i, &j| flat_g[i].abs().total_cmp(&flat_g[j].abs()))
            .unwrap();
        for idx in [0, n / 2, argmax] {
            let mut values: Vec<f64> = original.flatten_all().unwrap().to_vec1().unwrap();
            let mut loss_at = |delta: f64| {
                values[idx] =
                    original.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx] + delta;
                p.var
                    .set(&Tensor::from_vec(values.clone(), original.shape(), tr.device()).unwrap())
                    .unwrap();
                tr.micro_step(&b, None).unwrap().loss
            };
            let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            p.var.set(&original).unwrap();
            let tol = 1e-6 + 1e-4 * fd.abs().max(flat_g[idx].abs());
            assert!(
                (fd - flat_g[idx]).abs() < tol,
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                flat_g[idx]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 20);
}

#[test]
fn sam_perturbation_has_norm_rho_along_the_output_gradient() {
    let tr = trainer(&[]);
    let b = batch(&tr, 4);
    let head = tr.policy().net.output_layer();
    let h = b
        .response_hidden(tr.policy().net.forward_hidden(&b.input_ids).unwrap())
        .unwrap();
    let rho = 0.05;
    // The objective: the mean DPO loss with reference log-probs of the (identical) reference.
    let objective = |token_logps: &Tensor| -> anyhow::Result<Tensor> {
        let rows = Tensor::zeros(2 * b.num_pairs, DType::F32, tr.device())?.index_add(
            &b.rows,
            token_logps,
            0,
        )?;
        let k = b.num_pairs;
        let margin = ((rows.narrow(0, 0, k)? - rows.narrow(0, k, k)?)? * 0.5)?;
        Ok(dpo_sam::losses::neg_log_sigmoid(&margin)?.mean_all()?)
    };
    let p = dpo_sam::sam::logits_perturbation(&head, &h, &b.targets, rho, &objective).unwrap();
    assert!((norm(&p.e) - rho).abs() < 1e-6, "‖e‖ = {}", norm(&p.e));
    // ∂loss/∂W by autograd on a separate copy of W.
    let w = Var::from_tensor(&head.weight.detach().copy().unwrap()).unwrap();
    let copy = OutputLayer {
        weight: w.as_tensor().clone(),
        bias: None,
    };
    let loss = objective(&copy.token_logps(&h.detach(), &b.targets, None).unwrap()).unwrap();
    let g = loss.backward().unwrap().get(&w).unwrap().clone();
    let expected = (&g * (rho / norm(&g))).unwrap();
    assert!(max_abs_diff(&p.e, &expected) < 1e-7, "e is not ρ g/‖g‖");
    let grad_norm = p.grad_norm.to_scalar::<f64>().unwrap();
    assert!((grad_norm - norm(&g)).abs() < 1e-5 * norm(&g));
}

#[test]
fn sam_step_gradient_is_the_gradient_at_the_shifted_output_weight() {
    let tr = trainer(&["sam.kind=\"logits\"", "sam.rho=0.5"]);
    let b = batch(&tr, 4);
    let sam = tr.micro_step(&b, Some(1.0)).unwrap();
    let sam_grads = grads_by_name(&tr, sam.grads.as_ref().unwrap());

    // Independently: recompute e, then evaluate the loss with a separate output weight W + e
    // (the embedding keeps using the unshifted wte) and differentiate.
    let plain = trainer(&["sam.kind=\"none\""]);
    let head = plain.policy().net.output_layer();
    let h = b
        .response_hidden(plain.policy().net.forward_hidden(&b.input_ids).unwrap())
        .unwrap();
    let reference = tr.micro_step(&b, None).unwrap();
    let (rc, rr) = (
        reference.chosen_logps.clone(),
        reference.rejected_logps.clone(),
    );
    let k = b.num_pairs;
    let objective = |token_logps: &Tensor| -> anyhow::Result<Tensor> {
        let rows =
            Tensor::zeros(2 * k, DType::F32, tr.device())?.index_add(&b.rows, token_logps, 0)?;
        let ref_c = Tensor::new(rc.as_slice(), tr.device())?;
        let ref_r = Tensor::new(rr.as_slice(), tr.device())?;
        let margin =
            (((rows.narrow(0, 0, k)? - ref_c)? - (rows.narrow(0, k, k)? - ref_r)?)? * 0.5)?;
        Ok(dpo_sam::losses::neg_log_sigmoid(&margin)?.mean_all()?)
    };
    let e = dpo_sam::sam::logits_perturbation(&head, &h, &b.targets, 0.5, &objective)
        .unwrap()
        .e;
    let shifted = Var::from_tensor(&(head.weight.detach() + &e).unwrap()).unwrap();
    let shifted_head = OutputLayer {
        weight: shifted.as_tensor().clone(),
        bias: None,
    };
    let loss = objective(&shifted_head.token_logps(&h, &b.targets, None).unwrap()).unwrap();
    assert!(
        (loss.to_scalar::<f32>().unwrap() as f64 - sam.loss).abs() < 1e-5,
        "loss_post differs"
    );
    let store = loss.backward().unwrap();
    for (p, (name, g_sam)) in plain.policy().params.iter().zip(&sam_grads) {
        let mut g = store.get(p.var.as_tensor()).unwrap().clone();
        if name == "transformer.wte.weight" {
            g = (g + store.get(shifted.as_tensor()).unwrap()).unwrap();
        }
        let err = max_abs_diff(&g, g_sam);
        assert!(err < 1e-5 * (1.0 + norm(&g)), "{name}: max abs diff {err}");
    }
    // and it is not the plain gradient
    let plain_grads = grads_by_name(
        &plain,
        plain
            .micro_step(&b, Some(1.0))
            .unwrap()
            .grads
            .as_ref()
            .unwrap(),
    );
    assert!(max_abs_diff(&plain_grads[0].1, &sam_grads[0].1) > 1e-6);
}

#[test]
fn rho_zero_is_exactly_the_plain_step() {
    let with = trainer(&["sam.kind=\"logits\"", "sam.rho=0.0"]);
    let without = trainer(&["sam.kind=\"none\""]);
    let b = batch(&with, 4);
    let a = with.micro_step(&b, Some(1.0)).unwrap();
    let c = without.micro_step(&b, Some(1.0)).unwrap();
    assert_eq!(a.loss, c.loss);
    for ((name, ga), (_, gc)) in grads_by_name(&with, a.grads.as_ref().unwrap())
        .iter()
        .zip(grads_by_name(&without, c.grads.as_ref().unwrap()))
    {
        assert_eq!(max_abs_diff(ga, &gc), 0.0, "{name}");
    }
}

#[test]
fn a_short_run_lowers_the_loss_and_raises_reward_accuracy() {
    let mut tr = trainer(&[
        "data.builtin_pairs=512",
        "training.max_steps=60",
        "training.eval_steps=0",
    ]);
    let before = tr.evaluate().unwrap();
    let summary = tr.train().unwrap();
    let after = summary.eval().unwrap();
    assert!(after.loss < before.loss - 0.05, "{before:?} → {after:?}");
    assert!(after.rewards_accuracies > 0.6, "{after:?}");
    let metrics = std::fs::read_to_string(tr.config().output_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "sam/loss_pre",
        "sam/loss_post",
        "grad_norm",
        "learning_rate",
        "tokens_per_second",
        "step",
        "epoch",
    ] {
        let first = lines
            .iter()
            .find(|l| l.get("loss").is_some())
            .expect("a training line");
        assert!(first.get(key).is_some(), "metrics line lacks {key}");
    }
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some()).count(), 60);
    // The saved model reloads to the same weights.
    let saved = dpo_sam::models::Model::load(
        &dpo_sam::models::ModelSource::Dir(tr.config().output_dir.clone()),
        false,
        DType::F32,
        tr.device(),
    )
    .unwrap();
    let h1 = saved.net.forward_hidden(&batch(&tr, 2).input_ids).unwrap();
    let h2 = tr
        .policy()
        .net
        .forward_hidden(&batch(&tr, 2).input_ids)
        .unwrap();
    assert_eq!(max_abs_diff(&h1, &h2), 0.0);
}

/// The largest |a − b| / max |b| over every parameter's gradient.
fn max_rel_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((name, ga), (nb, gb))| {
            assert_eq!(name, nb);
            let scale = gb.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            max_abs_diff(ga, gb) / scale.max(f64::MIN_POSITIVE)
        })
        .fold(0.0, f64::max)
}

const CHECKPOINTED_MODELS: &[&str] = &[
    "builtin:tiny-gpt2",
    "tests/fixtures/gpt-neox-parallel",
    "tests/fixtures/gpt-neox-sequential",
    "tests/fixtures/mistral-window-untied",
    "tests/fixtures/llama-bias-headdim",
];

#[test]
fn checkpointing_gives_the_same_gradients() {
    for model in CHECKPOINTED_MODELS {
        let path = match model.strip_prefix("tests/") {
            Some(_) => format!("{}/{model}", env!("CARGO_MANIFEST_DIR")),
            None => model.to_string(),
        };
        for (sam, mp) in [
            ("none", "no"),
            ("logits", "no"),
            ("full", "no"),
            ("logits", "bf16"),
        ] {
            let grads = |on: bool| {
                let tr = trainer(&[
                    &format!("model.name_or_path={path:?}"),
                    &format!("sam.kind={sam:?}"),
                    &format!("training.mixed_precision={mp:?}"),
                    &format!("training.gradient_checkpointing={on}"),
                ]);
                let b = batch(&tr, 4);
                // The graph the forward leaves behind: checkpointing keeps one node per block.
                let h = tr.policy().net.forward_hidden(&b.input_ids).unwrap();
                let nodes = h.sorted_nodes().len();
                let ms = tr.micro_step(&b, Some(1.0)).unwrap();
                (
                    ms.loss,
                    nodes,
                    grads_by_name(&tr, ms.grads.as_ref().unwrap()),
                )
            };
            let ((loss_off, nodes_off, off), (loss_on, nodes_on, on)) = (grads(false), grads(true));
            assert_eq!(loss_off, loss_on, "{model} sam {sam} {mp}");
            assert!(
                2 * nodes_on < nodes_off,
                "{model}: {nodes_on} graph nodes with checkpointing, {nodes_off} without"
            );
            let rel = max_rel_diff(&on, &off);
            eprintln!(
                "{model} sam={sam} mixed_precision={mp}: max relative gradient difference {rel:e}"
            );
            assert_eq!(rel, 0.0, "{model} sam {sam} {mp}");
        }
    }
}

#[test]
fn a_short_checkpointed_run_ends_at_the_same_weights() {
    for mp in ["no", "bf16"] {
        let run = |on: bool| {
            let mut tr = trainer(&[
                "training.max_steps=3",
                "training.eval_steps=0",
                "training.batch_size=8",
                "training.micro_batch_size=4",
                &format!("training.mixed_precision={mp:?}"),
                &format!("training.gradient_checkpointing={on}"),
            ]);
            tr.train().unwrap();
            tr.policy().named_tensors()
        };
        let (off, on) = (run(false), run(true));
        for (name, w) in &off {
            assert_eq!(max_abs_diff(w, &on[name]), 0.0, "{name} ({mp})");
        }
    }
}
