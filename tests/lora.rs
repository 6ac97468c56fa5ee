//! LoRA end to end on the tiny fixtures (GPT-2, GPT-NeoX, Mistral, Llama) and stories260K:
//! adapter gradients against finite differences; step 0 is the base model and the reference
//! (adapters off) stays it, bit for bit, while only the adapters train; a reference started
//! from `model.adapter`; adapters made by `peft` load with PEFT's logits; what dpo-sam saves
//! loads back and merges exactly; every loss, both SAMs, accumulation, checkpointing and bf16;
//! `score` and `generate` on an adapter; resume bit for bit; and bad input refused, naming the
//! key or file, with nothing written. (`tests/lora_memory.rs` measures that the reference loads
//! no second copy of the weights.)

use candle_core::{DType, Device, Tensor};
use dpo_sam::data::batch::PreferenceBatch;
use dpo_sam::logps::pair_logps;
use dpo_sam::models::{lora, Model, ModelSource};
use dpo_sam::train::Trainer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::tiny_config;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// stories260K, else (with the reason printed) the Mistral fixture.
fn stories_or_fixture() -> String {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models/stories260K"
    ));
    match dir.is_dir() {
        true => dir.display().to_string(),
        false => {
            eprintln!("{} not found: using the Mistral fixture", dir.display());
            fixture("mistral-window-untied")
        }
    }
}

/// The tiny config on `base` with LoRA on every dense layer at r = 4 (or, with `model.adapter`
/// among `extra`, the adapter's settings) and `extra` overrides.
fn trainer(base: &str, extra: &[&str]) -> Trainer {
    let base = format!("model.name_or_path=\"{base}\"");
    let mut set = vec![base.as_str()];
    if !extra.iter().any(|s| s.starts_with("model.adapter")) {
        set.extend(["lora.r=4", "lora.target_modules=\"all-linear\""]);
    }
    set.extend(extra);
    Trainer::new(tiny_config(&set).unwrap()).unwrap()
}

fn batch(tr: &Trainer, n: usize) -> PreferenceBatch {
    PreferenceBatch::new(&tr.train_pairs()[..n], tr.tok().pad_id, tr.device()).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

fn load(source: &ModelSource) -> Model {
    Model::load(source, false, DType::F32, &Device::Cpu).unwrap()
}

fn dir(path: &str) -> ModelSource {
    ModelSource::Dir(PathBuf::from(path))
}

fn adapted(base: &str, adapter: &Path) -> ModelSource {
    ModelSource::Adapted {
        base: Box::new(dir(base)),
        adapter: adapter.to_path_buf(),
    }
}

/// Sets every lora_B (zero at the start) to fixed nonzero values, so that A takes gradients.
fn randomise_b(tr: &Trainer) {
    for (k, p) in tr
        .policy()
        .params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.name.contains("lora_B"))
    {
        let t = p.var.as_tensor();
        let v: Vec<f64> = (0..t.elem_count())
            .map(|i| 0.3 * (i as f64 * 0.7 + k as f64).sin())
            .collect();
        let v = Tensor::from_vec(v, t.shape(), t.device()).unwrap();
        p.var.set(&v.to_dtype(t.dtype()).unwrap()).unwrap();
    }
}

#[test]
fn adapter_gradients_match_finite_differences() {
    for base in [
        None,
        Some("gpt-neox-sequential"),
        Some("mistral-window-untied"),
        Some("llama-bias-headdim"),
    ] {
        let name = base.map(fixture).unwrap_or("builtin:tiny-gpt2".into());
        // f64 so that central differences are accurate to ~1e-8.
        let tr = trainer(
            &name,
            &[
                "model.dtype=\"f64\"",
                "model.builtin.n_embd=8",
                "model.builtin.n_head=2",
                "sam.kind=\"none\"",
            ],
        );
        assert!(tr
            .policy()
            .params
            .iter()
            .all(|p| p.name.starts_with("base_model.model.")
                && (p.name.ends_with(".lora_A.weight") || p.name.ends_with(".lora_B.weight"))));
        randomise_b(&tr);
        let b = batch(&tr, 3);
        let ms = tr.micro_step(&b, Some(1.0)).unwrap();
        let grads = ms.grads.unwrap();
        let eps = 1e-5;
        for p in &tr.policy().params {
            let g = values(grads.get(p.var.as_tensor()).expect(&p.name));
            let original = p.var.as_tensor().copy().unwrap();
            let argmax = (0..g.len())
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .unwrap();
            for idx in [0, argmax] {
                let loss_at = |delta: f64| {
                    let mut v = values(&original);
                    v[idx] += delta;
                    p.var
                        .set(&Tensor::from_vec(v, original.shape(), tr.device()).unwrap())
                        .unwrap();
                    tr.micro_step(&b, None).unwrap().loss
                };
                let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
                p.var.set(&original).unwrap();
                let tol = 1e-7 + 1e-4 * fd.abs().max(g[idx].abs());
                assert!(
                    (fd - g[idx]).abs() < tol,
                    "{name} {}[{idx}]: autograd {} vs finite difference {fd}",
                    p.name,
                    g[idx]
                );
            }
        }
    }
}

#[test]
fn step_zero_is_the_base_and_the_reference_stays_it_while_only_adapters_train() {
    let base_dir = stories_or_fixture();
    let base = load(&dir(&base_dir));
    let mut tr = trainer(
        &base_dir,
        &[
            "lora.dropout=0.1",
            "training.max_steps=3",
            "training.learning_rate=0.05",
        ],
    );
    let b = batch(&tr, 4);
    let (want_c, want_r) = pair_logps(&base, &b).unwrap();
    let reference = |tr: &Trainer| {
        tr.reference_for(&b, None)
            .unwrap()
            .expect("DPO has a reference")
    };
    let (c, r) = reference(&tr);
    assert_eq!(
        (bits(&c), bits(&r)),
        (bits(&want_c), bits(&want_r)),
        "reference = base"
    );
    // B = 0: the policy is the base model bit for bit, so the rewards are 0 and the loss ln 2.
    let ms = tr.micro_step(&b, None).unwrap();
    assert_eq!(
        bits(&Tensor::new(ms.chosen_logps.as_slice(), &Device::Cpu).unwrap()),
        bits(&want_c)
    );
    assert!(ms
        .chosen_rewards
        .iter()
        .chain(&ms.rejected_rewards)
        .all(|&x| x == 0.0));
    assert!(
        (ms.loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        ms.loss
    );

    tr.train().unwrap();
    let (c, r) = reference(&tr);
    assert_eq!(
        (bits(&c), bits(&r)),
        (bits(&want_c), bits(&want_r)),
        "reference after training"
    );
    let moved = tr.micro_step(&b, None).unwrap().chosen_logps;
    let want: Vec<f32> = want_c.to_vec1().unwrap();
    assert!(
        moved.iter().zip(&want).any(|(a, b)| a != b),
        "the policy moved"
    );
    // Only the adapters are parameters, every B moved off zero, and the frozen weights are
    // exactly the base's.
    let policy = tr.policy();
    assert_eq!(
        policy.params.len(),
        2 * policy.lora.as_ref().unwrap().modules.len()
    );
    for p in policy.params.iter().filter(|p| p.name.contains("lora_B")) {
        assert!(
            values(p.var.as_tensor()).iter().any(|&x| x != 0.0),
            "{} moved",
            p.name
        );
    }
    let (ours, theirs) = (policy.net.dense_layers(), base.net.dense_layers());
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(bits(a.weight()), bits(b.weight()), "{}", a.prefix());
    }
    let head = |m: &Model| bits(&m.net.output_layer().weight);
    assert_eq!(head(policy), head(&base));
}

#[test]
fn a_start_adapter_is_the_frozen_reference() {
    let (base, start) = (fixture("gpt2-random"), fixture("peft-gpt2-random"));
    let set = format!("model.adapter=\"{start}\"");
    let mut tr = trainer(
        &base,
        &[&set, "training.max_steps=2", "training.learning_rate=0.05"],
    );
    let b = batch(&tr, 4);
    let want = pair_logps(&load(&adapted(&base, Path::new(&start))), &b).unwrap();
    let plain = pair_logps(&load(&dir(&base)), &b).unwrap();
    assert_ne!(
        bits(&want.0),
        bits(&plain.0),
        "the adapter changes the model"
    );
    let (c, _) = tr.reference_for(&b, None).unwrap().unwrap();
    assert_eq!(bits(&c), bits(&want.0), "reference = base + adapter");
    // The policy starts where the reference is: rewards 0, loss ln 2, not a wrong reference.
    let ms = tr.micro_step(&b, None).unwrap();
    assert!(ms
        .chosen_rewards
        .iter()
        .chain(&ms.rejected_rewards)
        .all(|&x| x == 0.0));
    assert!(
        (ms.loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        ms.loss
    );
    tr.train().unwrap();
    assert_eq!(
        bits(&tr.reference_for(&b, None).unwrap().unwrap().0),
        bits(&want.0)
    );
}

#[test]
fn adapters_made_by_peft_give_peft_logits() {
    for base in [
        "gpt2-random",
        "gpt-neox-sequential",
        "mistral-window-untied",
    ] {
        let adapter = PathBuf::from(fixture(&format!("peft-{base}")));
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join("expected.json")).unwrap())
                .unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
        let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(expected["logits"].clone()).unwrap();
        let model = load(&adapted(&fixture(base), &adapter));
        let ids = Tensor::new(ids, &Device::Cpu).unwrap();
        let h = model.net.forward_hidden(&ids).unwrap();
        let (b, t, d) = h.dims3().unwrap();
        let logits = model
            .net
            .output_layer()
            .logits(&h.reshape((b * t, d)).unwrap(), None)
            .unwrap();
        let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = want.into_iter().flatten().flatten().collect();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("peft-{base}: max abs logit error {err:.2e}");
        assert!(
            got.len() == want.len() && err <= 1e-4,
            "peft-{base}: logits differ by {err}"
        );
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn safetensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn saved_adapters_round_trip_merge_exactly_and_serve_score_and_generate() {
    let base = fixture("gpt2-random");
    let mut tr = trainer(
        &base,
        &[
            "training.max_steps=2",
            "training.learning_rate=0.05",
            "lora.dropout=0.1",
        ],
    );
    tr.train().unwrap();
    let out = tr.config().output_dir.clone();
    let b = batch(&tr, 4);
    let trained = tr.micro_step(&b, None).unwrap();

    // What was saved loads back (found through adapter_config.json) to the same numbers.
    let source = ModelSource::resolve(&out.display().to_string(), &Default::default(), 0).unwrap();
    assert!(matches!(source, ModelSource::Adapted { .. }));
    let reloaded = load(&source);
    let (c, _) = pair_logps(&reloaded, &b).unwrap();
    assert_eq!(
        bits(&c),
        bits(&Tensor::new(trained.chosen_logps.as_slice(), &Device::Cpu).unwrap())
    );

    // merge = base + (α/r)·B·A, per element the f64 value rounded once; every other tensor
    // as it was.
    let merged = tempfile::tempdir().unwrap();
    let merged_dir = merged.path().join("m");
    ok(&run(&[
        "merge",
        "--base",
        &base,
        "--adapter",
        &out.display().to_string(),
        "--out",
        &merged_dir.display().to_string(),
    ]));
    let (base_w, adapter, new_w) = (
        safetensors(&Path::new(&base).join("model.safetensors")),
        safetensors(&out.join(lora::WEIGHTS_FILE)),
        safetensors(&merged_dir.join("model.safetensors")),
    );
    let scale = 8.0 / 4.0;
    let mut adapted = 0;
    for (name, w) in &base_w {
        let got = bits(&new_w[name]);
        let module = name.trim_end_matches(".weight");
        let a_name = lora::tensor_name(
            &format!("transformer.{module}").replace("transformer.transformer.", "transformer."),
            "lora_A",
        );
        let Some(a) = adapter.get(&a_name) else {
            assert_eq!(got, bits(w), "{name} is not adapted");
            continue;
        };
        let b = &adapter[&a_name.replace("lora_A", "lora_B")];
        let (a, b, w) = (values(a), values(b), values(w));
        let r = 4;
        let (n_in, n_out) = (a.len() / r, b.len() / r);
        // Conv1D: W is [in, out], and the update is (B A)ᵀ.
        let want: Vec<u32> = (0..n_in * n_out)
            .map(|k| {
                let (i, o) = (k / n_out, k % n_out);
                let ba: f64 = (0..r).map(|j| b[o * r + j] * a[j * n_in + i]).sum();
                ((w[k] + scale * ba) as f32).to_bits()
            })
            .collect();
        assert_eq!(got, want, "{name}");
        adapted += 1;
    }
    assert_eq!(adapted, 8, "two layers × four dense layers");

    // score and generate take the adapter directory as a model.
    let data = merged.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"12+35=\", \"chosen\": \"47\", \"rejected\": \"48\"}\n",
    )
    .unwrap();
    let score = |model: &str| -> f64 {
        let out_file = merged.path().join("scores.jsonl");
        ok(&run(&[
            "score",
            "--model",
            model,
            "--data",
            &data.display().to_string(),
            "--out",
            &out_file.display().to_string(),
        ]));
        let line: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(&out_file)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        line["chosen_logps"].as_f64().unwrap()
    };
    let (with_adapter, with_merged, plain) = (
        score(&out.display().to_string()),
        score(&merged_dir.display().to_string()),
        score(&base),
    );
    assert!(
        (with_adapter - with_merged).abs() < 1e-5,
        "{with_adapter} vs {with_merged}"
    );
    assert!((with_adapter - plain).abs() > 1e-4, "the adapter is on");
    let generate = |model: &str| {
        let out_file = merged.path().join("gen.jsonl");
        ok(&run(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "12+35=",
            "--max-new-tokens",
            "6",
            "--out",
            &out_file.display().to_string(),
        ]));
        let line = std::fs::read_to_string(&out_file).unwrap();
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        line["completion"].as_str().unwrap().to_string()
    };
    assert_eq!(
        generate(&out.display().to_string()),
        generate(&merged_dir.display().to_string())
    );
}

#[test]
fn every_loss_and_both_sams_train_the_adapters_alone() {
    let base = fixture("mistral-window-untied");
    for loss in [
        "sigmoid", "robust", "hinge", "ipo", "dpop", "slic", "cpo", "simpo", "sft",
    ] {
        let set = format!("training.loss_type=\"{loss}\"");
        let tr = trainer(&base, &[&set, "sam.kind=\"logits\"", "sam.rho=0.05"]);
        let ms = tr.micro_step(&batch(&tr, 4), Some(1.0)).unwrap();
        let grads = ms.grads.unwrap();
        assert!(
            ms.loss.is_finite() && ms.sam_grad_norm.unwrap() > 0.0,
            "{loss}"
        );
        for p in tr
            .policy()
            .params
            .iter()
            .filter(|p| p.name.contains("lora_B"))
        {
            let g = values(grads.get(p.var.as_tensor()).expect(&p.name));
            assert!(
                g.iter().any(|&x| x != 0.0) && g.iter().all(|x| x.is_finite()),
                "{loss}: {}",
                p.name
            );
        }
    }
    // Full SAM moves the trainable weights — the adapters — and puts them back exactly.
    let tr = trainer(&base, &["sam.kind=\"full\"", "sam.rho=0.05"]);
    randomise_b(&tr);
    let before: Vec<Vec<u32>> = tr
        .policy()
        .params
        .iter()
        .map(|p| bits(p.var.as_tensor()))
        .collect();
    let ms = tr.micro_step(&batch(&tr, 4), Some(1.0)).unwrap();
    assert!(ms.sam_grad_norm.unwrap() > 0.0 && ms.loss != ms.loss_pre.unwrap());
    let after: Vec<Vec<u32>> = tr
        .policy()
        .params
        .iter()
        .map(|p| bits(p.var.as_tensor()))
        .collect();
    assert_eq!(before, after);
}

fn grads_of(tr: &Trainer, store: &candle_core::backprop::GradStore) -> Vec<Tensor> {
    tr.policy()
        .params
        .iter()
        .map(|p| store.get(p.var.as_tensor()).expect(&p.name).clone())
        .collect()
}

#[test]
fn checkpointing_and_accumulation_give_the_same_adapter_gradients() {
    let base = fixture("gpt-neox-sequential");
    // Dropout on: the recomputed blocks must draw the forward's masks.
    let with_dropout = |extra: &[&str]| {
        let mut set = vec!["lora.dropout=0.2", "sam.kind=\"logits\"", "sam.rho=0.05"];
        set.extend(extra);
        let tr = trainer(&base, &set);
        randomise_b(&tr);
        let ms = tr.micro_step(&batch(&tr, 4), Some(1.0)).unwrap();
        grads_of(&tr, ms.grads.as_ref().unwrap())
    };
    let (plain, checkpointed) = (
        with_dropout(&[]),
        with_dropout(&["training.gradient_checkpointing=true"]),
    );
    for (a, b) in plain.iter().zip(&checkpointed) {
        assert_eq!(bits(a), bits(b));
    }
    // One micro-batch of 4 pairs against two of 2 (each weighted ½); without SAM, whose
    // perturbation depends on the micro-batch.
    let tr = trainer(&base, &["sam.kind=\"none\""]);
    randomise_b(&tr);
    let pairs = &tr.train_pairs()[..4];
    let step = |p: &[_], w: f64| {
        let b = PreferenceBatch::new(p, tr.tok().pad_id, tr.device()).unwrap();
        let ms = tr.micro_step(&b, Some(w)).unwrap();
        grads_of(&tr, ms.grads.as_ref().unwrap())
    };
    let whole = step(pairs, 1.0);
    let halves: Vec<Tensor> = step(&pairs[..2], 0.5)
        .iter()
        .zip(step(&pairs[2..], 0.5))
        .map(|(a, b)| (a + b).unwrap())
        .collect();
    for (a, b) in whole.iter().zip(&halves) {
        let (a, b) = (values(a), values(b));
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale.max(1e-12), "{err} vs {scale}");
    }
}

#[test]
fn bf16_base_keeps_f32_adapter_masters_and_learns() {
    let base = fixture("mistral-window-untied");
    for set in [
        &["model.dtype=\"bf16\""][..],
        &["training.mixed_precision=\"bf16\""][..],
    ] {
        let mut all = vec!["training.max_steps=4", "training.learning_rate=0.05"];
        all.extend(set);
        let mut tr = trainer(&base, &all);
        let policy = tr.policy();
        assert!(policy
            .net
            .dense_layers()
            .iter()
            .all(|l| l.weight().dtype() == DType::BF16));
        for p in &policy.params {
            assert_eq!(p.var.dtype(), DType::BF16, "{}", p.name);
            assert_eq!(
                p.master.as_ref().expect("an f32 master").dtype(),
                DType::F32
            );
        }
        let summary = serde_json::to_value(tr.train().unwrap()).unwrap();
        assert!(
            summary["train"]["loss"].as_f64().unwrap().is_finite(),
            "{summary}"
        );
        let masters_moved = tr
            .policy()
            .params
            .iter()
            .filter(|p| p.name.contains("lora_B"))
            .all(|p| {
                values(p.master.as_ref().unwrap().as_tensor())
                    .iter()
                    .any(|&x| x != 0.0)
            });
        assert!(masters_moved, "{set:?}");
    }
}

/// metrics.jsonl without the wall-clock throughput.
fn metrics(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_second");
            v.to_string()
        })
        .collect()
}

#[test]
fn resume_is_bit_identical_with_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path, steps: usize| -> Vec<String> {
        let mut v: Vec<String> = ["train", "--config", "configs/tiny_gpt2.toml", "--quiet"]
            .map(String::from)
            .to_vec();
        for set in [
            format!("training.max_steps={steps}"),
            "data.builtin_pairs=64".into(),
            "training.save_steps=3".into(),
            "training.eval_steps=0".into(),
            "training.gradient_checkpointing=true".into(),
            "lora.r=4".into(),
            "lora.dropout=0.1".into(),
            "lora.target_modules=[\"c_attn\", \"mlp.c_proj\"]".into(),
        ] {
            v.extend(["--set".into(), set]);
        }
        v.extend(["--output-dir".into(), out.display().to_string()]);
        v
    };
    let run_args = |a: Vec<String>| ok(&run(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    run_args(args(&straight, 6));
    // The same run, taken back to its step-3 checkpoint and resumed from there.
    run_args(args(&resumed, 6));
    for stale in ["checkpoint-6", lora::WEIGHTS_FILE, lora::CONFIG_FILE] {
        let path = resumed.join(stale);
        match path.is_dir() {
            true => std::fs::remove_dir_all(path).unwrap(),
            false => std::fs::remove_file(path).unwrap(),
        }
    }
    let mut again = args(&resumed, 6);
    again.extend(["--resume".into(), resumed.display().to_string()]);
    run_args(again);
    for file in [
        lora::WEIGHTS_FILE,
        lora::CONFIG_FILE,
        "checkpoint-6/optimizer.safetensors",
    ] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert!(read(&straight) == read(&resumed), "{file} differs");
    }
    assert_eq!(metrics(&straight), metrics(&resumed));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(resumed.join("checkpoint-6/trainer_state.json")).unwrap(),
    )
    .unwrap();
    // One dropout stream per training forward: 6 steps × 2 micro-batches.
    assert_eq!(state["lora_dropout_draws"], 12);
}

/// Runs `dpo-sam train` on the tiny config with `set`, expecting a failure whose message holds
/// every one of `needles`, and that the output directory was never created.
fn refused(set: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let mut args = vec!["train", "--config", "configs/tiny_gpt2.toml", "--quiet"];
    for s in set {
        args.extend(["--set", s]);
    }
    let out_arg = out_dir.display().to_string();
    args.extend(["--output-dir", &out_arg]);
    for dry in [false, true] {
        let mut a = args.clone();
        if dry {
            a.push("--dry-run");
        }
        let out = run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{set:?} (dry run: {dry}) was accepted"
        );
        for n in needles {
            assert!(
                err.contains(n),
                "{set:?} (dry run: {dry}): `{n}` not in: {err}"
            );
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_dir.exists(), "{set:?}: wrote {}", out_dir.display());
    }
}

#[test]
fn bad_lora_input_names_the_key_or_file_and_writes_nothing() {
    let mistral = format!(
        "model.name_or_path=\"{}\"",
        fixture("mistral-window-untied")
    );
    refused(
        &[&mistral, "lora.target_modules=[\"q_proj\", \"q_prj\"]"],
        &["lora.target_modules", "`q_prj`", "q_proj, k_proj"],
    );
    refused(
        &[&mistral, "lora.target_modules=\"(unclosed\""],
        &["lora.target_modules", "regular expression"],
    );
    refused(&["lora.r=0"], &["lora.r: must be > 0, got 0"]);
    refused(&["lora.dropout=1.0"], &["lora.dropout: must be in [0, 1)"]);
    refused(&["lora.alpha=-1"], &["lora.alpha: must be > 0"]);
    // An adapter for another architecture, and one for the same architecture at other shapes
    // (gpt2-random's n_embd 32 on the built-in model's 64).
    let neox_adapter = format!("model.adapter=\"{}\"", fixture("peft-gpt-neox-sequential"));
    refused(
        &[&mistral, &neox_adapter],
        &[
            "adapter_model.safetensors",
            "`gpt_neox.layers.0.",
            "not a dense layer of this mistral model",
        ],
    );
    let gpt2_adapter = format!("model.adapter=\"{}\"", fixture("peft-gpt2-random"));
    refused(
        &[&gpt2_adapter],
        &["adapter_model.safetensors", "has shape [4, 32]", "[4, 64]"],
    );
    refused(
        &["model.adapter=\"tests/fixtures/gpt2-random\""],
        &["adapter_config.json"],
    );
    let rank = format!("model.adapter=\"{}\"", fixture("peft-gpt2-random"));
    refused(
        &[&rank, "lora.r=8"],
        &["lora.r = 8", "adapter_config.json", "r = 4"],
    );
    refused(
        &[
            "model.dtype=\"bf16\"",
            "training.bf16_stochastic_rounding=true",
            "lora.r=4",
        ],
        &["training.bf16_stochastic_rounding", "LoRA"],
    );

    // merge: a base the adapter does not fit; nothing written.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let res = run(&[
        "merge",
        "--base",
        &fixture("mistral-window-untied"),
        "--adapter",
        &fixture("peft-gpt2-random"),
        "--out",
        &out.display().to_string(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success()
            && err.contains("adapter_model.safetensors")
            && err.contains("c_attn"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn precomputed_reference_log_probs_are_the_adapters_off_ones() {
    let base_dir = fixture("gpt-neox-sequential");
    let tr = trainer(&base_dir, &["training.precompute_ref_log_probs=true"]);
    let b = batch(&tr, 4);
    let idx: Vec<usize> = (0..4).collect();
    let cached = tr
        .reference_for(&b, Some((dpo_sam::data::Split::Train, &idx)))
        .unwrap()
        .unwrap();
    let want = pair_logps(&load(&dir(&base_dir)), &b).unwrap();
    assert_eq!(bits(&cached.0), bits(&want.0));
    assert_eq!(bits(&cached.1), bits(&want.1));
}
