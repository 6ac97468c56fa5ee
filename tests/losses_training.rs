//! The loss registry inside the trainer on the built-in tiny GPT-2: reference-free losses load
//! no reference, logits-SAM runs with every loss, cached reference log-probs equal on-the-fly
//! ones and are invalidated by a changed model or data, and full SAM's gradient is the one at
//! the perturbed point with the weights restored bit for bit.

use candle_core::{DType, Tensor};
use dpo_sam::config::Config;
use dpo_sam::data::batch::PreferenceBatch;
use dpo_sam::data::Split;
use dpo_sam::refcache;
use dpo_sam::train::{Reference, Trainer};

mod common;
use common::max_abs_diff;
use std::path::Path;

fn config(dir: &Path, overrides: &[&str]) -> Config {
    let text = format!(
        r#"
output_dir = {dir:?}
[model]
name_or_path = "builtin:tiny-gpt2"
[model.builtin]
n_layer = 1
n_head = 2
n_embd = 16
n_positions = 64
[data]
train = "builtin:arith"
eval = "builtin:arith"
builtin_pairs = 16
[training]
learning_rate = 1e-3
batch_size = 4
"#
    );
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::parse(&text, "test.toml", &ov).unwrap()
}

fn trainer(dir: &Path, overrides: &[&str]) -> Trainer {
    Trainer::new(config(dir, overrides)).unwrap()
}

fn batch(tr: &Trainer, n: usize) -> PreferenceBatch {
    PreferenceBatch::new(&tr.train_pairs()[..n], tr.tok().pad_id, tr.device()).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn reference_free_losses_create_no_reference_model() {
    let dir = tempfile::tempdir().unwrap();
    for lt in [
        "\"slic\"",
        "\"cpo\"",
        "\"simpo\"",
        "\"sft\"",
        "[\"cpo\", \"sft\"]",
    ] {
        let tr = trainer(dir.path(), &[&format!("training.loss_type={lt}")]);
        assert!(matches!(tr.reference(), Reference::None), "{lt}");
    }
    for lt in ["\"sigmoid\"", "[\"simpo\", \"dpop\"]"] {
        assert!(
            trainer(dir.path(), &[&format!("training.loss_type={lt}")])
                .reference()
                .model()
                .is_some(),
            "{lt}"
        );
    }
}

#[test]
fn logits_sam_runs_with_every_loss_and_mix() {
    let dir = tempfile::tempdir().unwrap();
    for lt in [
        "\"sigmoid\"",
        "\"robust\"",
        "\"hinge\"",
        "\"ipo\"",
        "\"slic\"",
        "\"cpo\"",
        "\"simpo\"",
        "\"dpop\"",
        "\"sft\"",
        "[\"sigmoid\", \"sft\"]",
    ] {
        let lt = format!("training.loss_type={lt}");
        let tr = trainer(
            dir.path(),
            &[
                &lt,
                "training.label_smoothing=0.1",
                "sam.kind=\"logits\"",
                "sam.rho=0.05",
            ],
        );
        let b = batch(&tr, 4);
        let ms = tr.micro_step(&b, Some(1.0)).unwrap();
        let (pre, post) = (ms.loss_pre.unwrap(), ms.loss);
        assert!(
            pre.is_finite() && post.is_finite() && ms.sam_grad_norm.unwrap() > 0.0,
            "{lt}"
        );
        // e ascends the configured objective, so the loss at W + e is not below the loss at W.
        assert!(post >= pre - 1e-6, "{lt}: pre {pre} post {post}");
        // Adaptive logits-SAM too.
        let tr = trainer(
            dir.path(),
            &[
                &lt,
                "sam.kind=\"logits\"",
                "sam.rho=0.05",
                "sam.adaptive=true",
            ],
        );
        assert!(
            tr.micro_step(&b, Some(1.0)).unwrap().loss.is_finite(),
            "{lt}"
        );
    }
}

#[test]
fn cached_reference_log_probs_equal_on_the_fly_ones() {
    let dir = tempfile::tempdir().unwrap();
    let live = trainer(dir.path(), &[]);
    let cached = trainer(dir.path(), &["training.precompute_ref_log_probs=true"]);
    let Reference::Cache(cache) = cached.reference() else {
        panic!("the reference model is freed after caching")
    };
    assert_eq!(cache.train_chosen.len(), live.train_pairs().len());
    assert_eq!(cache.eval_chosen.len(), live.eval_pairs().len());
    for (split, pairs) in [
        (Split::Train, live.train_pairs()),
        (Split::Eval, live.eval_pairs()),
    ] {
        let idx: Vec<usize> = (0..pairs.len()).collect();
        let b = PreferenceBatch::new(pairs, live.tok().pad_id, live.device()).unwrap();
        let (c, r) = live.reference_for(&b, None).unwrap().unwrap();
        let (cc, cr) = cached
            .reference_for(&b, Some((split, &idx)))
            .unwrap()
            .unwrap();
        assert!(
            max_abs_diff(&c, &cc) < 1e-4 && max_abs_diff(&r, &cr) < 1e-4,
            "{split:?}"
        );
    }
    // The same micro-step either way.
    let b = batch(&live, 4);
    let idx = [0, 1, 2, 3];
    let a = live.micro_step(&b, None).unwrap();
    let c = cached
        .micro_step_with(
            &b,
            cached
                .reference_for(&b, Some((Split::Train, &idx)))
                .unwrap(),
            None,
        )
        .unwrap();
    assert!((a.loss - c.loss).abs() < 1e-5, "{} vs {}", a.loss, c.loss);
    // Without pair indices there is nothing to read the cache by: an error, not a silent zero.
    assert!(cached.micro_step(&b, None).is_err());

    // A second run loads the file instead of recomputing: identical values.
    let again = trainer(dir.path(), &["training.precompute_ref_log_probs=true"]);
    assert_eq!(again.reference().cache().unwrap(), cache);
    // Training and evaluation run on the cache alone.
    let mut run = trainer(
        dir.path(),
        &[
            "training.precompute_ref_log_probs=true",
            "training.max_steps=2",
        ],
    );
    run.train().unwrap();
}

#[test]
fn changed_model_or_data_invalidates_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let on = "training.precompute_ref_log_probs=true";
    let fp = |tr: &Trainer| tr.reference().cache().unwrap().fingerprint.clone();
    let base = fp(&trainer(dir.path(), &[on]));
    let other_model = fp(&trainer(dir.path(), &[on, "model.builtin.n_embd=32"]));
    let other_data = fp(&trainer(dir.path(), &[on, "data.builtin_pairs=20"]));
    let other_trunc = fp(&trainer(dir.path(), &[on, "data.max_length=12"]));
    let other_dtype = fp(&trainer(dir.path(), &[on, "model.dtype=\"f64\""]));
    let mixed = "training.mixed_precision=\"bf16\"";
    let other_precision = fp(&trainer(dir.path(), &[on, mixed]));
    // Each names what changed.
    for (other, change) in [
        (&other_model, "model config.json: sha256:"),
        (&other_data, "train pairs: 16 pairs"),
        (
            &other_trunc,
            "truncation: max_length 512, max_prompt_length None, keep_end -> max_length 12",
        ),
        (&other_dtype, "dtype: f32 -> f64"),
        (&other_precision, "mixed_precision: no -> bf16"),
    ] {
        assert_ne!(base.hash, other.hash);
        let changes = other.changes_from(&base.inputs).join("; ");
        assert!(changes.contains(change), "{changes}");
    }
    assert_eq!(
        other_precision.changes_from(&base.inputs),
        ["dtype: f32 -> bf16", "mixed_precision: no -> bf16"],
        "mixed precision changes the dtype the reference computes in, and nothing else"
    );
    assert_eq!(
        base,
        fp(&trainer(dir.path(), &[on])),
        "the fingerprint is deterministic"
    );

    // A cache made under another precision is refused, naming the difference.
    let n = trainer(dir.path(), &[]).train_pairs().len();
    let bf16_cache = refcache::cache_path(dir.path(), &other_precision.hash);
    let err = refcache::load(&bf16_cache, &base, n, n / 4).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!(
            "{}: made for other inputs: dtype: bf16 -> f32; mixed_precision: bf16 -> no",
            bf16_cache.display()
        )
    );
    // Every other cache in the directory is reported so when the run's own is missing.
    std::fs::remove_file(refcache::cache_path(dir.path(), &base.hash)).unwrap();
    let unfit = refcache::unfit_caches(dir.path(), &base);
    assert_eq!(unfit.len(), 5, "{unfit:?}");
    let (_, why) = unfit.iter().find(|(p, _)| p == &bf16_cache).unwrap();
    assert!(why.contains("mixed_precision: bf16 -> no"), "{why}");

    // A file under the right name made for other inputs is refused, then replaced.
    let fresh = trainer(dir.path(), &[on]);
    let path = refcache::cache_path(dir.path(), &base.hash);
    let stale_path = refcache::cache_path(dir.path(), &other_data.hash);
    std::fs::copy(&stale_path, &path).unwrap();
    let err = refcache::load(&path, &base, n, n / 4).unwrap_err();
    assert!(
        format!("{err:#}").contains("train pairs: 20 pairs"),
        "{err:#}"
    );
    let again = trainer(dir.path(), &[on]);
    assert_eq!(fp(&again), base);
    assert!(
        refcache::load(
            &path,
            &base,
            again.train_pairs().len(),
            again.eval_pairs().len()
        )
        .is_ok(),
        "recomputed and rewritten"
    );
    assert_eq!(again.reference().cache(), fresh.reference().cache());
    // Garbage is refused too.
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(refcache::load(&path, &base, n, n / 4).is_err());
    let again = trainer(dir.path(), &[on]);
    assert_eq!(again.reference().cache(), fresh.reference().cache());
}

/// Full SAM against a hand-made perturbation: plain gradient g at W, e = ρ T²g/‖Tg‖ (T = |W|
/// when adaptive, else 1), plain gradient at W + e.
fn check_full_sam(adaptive: bool) {
    let dir = tempfile::tempdir().unwrap();
    let rho = 0.05;
    let adaptive_ov = format!("sam.adaptive={adaptive}");
    let sam = trainer(
        dir.path(),
        &[
            "model.dtype=\"f64\"",
            "sam.kind=\"full\"",
            "sam.rho=0.05",
            &adaptive_ov,
        ],
    );
    let plain = trainer(dir.path(), &["model.dtype=\"f64\""]);
    let b = batch(&sam, 4);
    let before: Vec<Vec<u8>> = sam
        .policy()
        .params
        .iter()
        .map(|p| bytes(p.var.as_tensor()))
        .collect();
    let ms = sam.micro_step(&b, Some(0.5)).unwrap();
    let after: Vec<Vec<u8>> = sam
        .policy()
        .params
        .iter()
        .map(|p| bytes(p.var.as_tensor()))
        .collect();
    assert!(before == after, "weights restored bit for bit");

    let g = plain.micro_step(&b, Some(1.0)).unwrap().grads.unwrap();
    let scaled = |p: &dpo_sam::models::Param, x: &Tensor| -> Tensor {
        if adaptive {
            (x * p.var.as_tensor().abs().unwrap()).unwrap()
        } else {
            x.clone()
        }
    };
    let norm: f64 = plain
        .policy()
        .params
        .iter()
        .map(|p| {
            scaled(p, g.get(p.var.as_tensor()).unwrap())
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum::<f64>()
        .sqrt();
    assert!((ms.sam_grad_norm.unwrap() - norm).abs() < 1e-9 * norm);
    for p in &plain.policy().params {
        let gp = g.get(p.var.as_tensor()).unwrap();
        let e = (scaled(p, &scaled(p, gp)) * (rho / norm)).unwrap();
        p.var.set(&(p.var.as_tensor() + e).unwrap()).unwrap();
    }
    let at_perturbed = plain.micro_step(&b, Some(0.5)).unwrap();
    assert!(
        (at_perturbed.loss - ms.loss).abs() < 1e-12,
        "loss is the one at W + e"
    );
    let (ga, gb) = (ms.grads.unwrap(), at_perturbed.grads.unwrap());
    for (p, q) in sam.policy().params.iter().zip(&plain.policy().params) {
        let (a, b) = (
            ga.get(p.var.as_tensor()).unwrap(),
            gb.get(q.var.as_tensor()).unwrap(),
        );
        let scale = vals(&a.abs().unwrap().flatten_all().unwrap())
            .into_iter()
            .fold(1e-12, f64::max);
        assert!(max_abs_diff(a, b) < 1e-9 * scale.max(1.0), "{}", p.name);
    }
}

fn bytes(t: &Tensor) -> Vec<u8> {
    vals(&t.flatten_all().unwrap())
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

#[test]
fn full_sam_gradient_is_the_gradient_at_the_perturbed_point() {
    check_full_sam(false);
}

#[test]
fn adaptive_full_sam_scales_by_weight_magnitude() {
    check_full_sam(true);
}
