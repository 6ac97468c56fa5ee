//! What a run leaves for watching and sharing it: TensorBoard event files (read back record by
//! record, CRCs checked) holding every metrics line under TRL's tags, the config and the eval
//! samples; samples.jsonl; a model card in every saved directory, listed in checkpoint
//! manifests; `report_to = "none"`; and the settings' errors.

mod common;

use common::{lines, train_tiny as train};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 8 steps, evaluation with 2 greedy samples of up to 6 tokens every 4, checkpoints every 4.
fn run() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("run");
        ok(&train(
            &dir,
            &[
                "training.max_steps=8",
                "training.eval_steps=4",
                "training.save_steps=4",
                "training.eval_generate=2",
                "generate.max_new_tokens=6",
            ],
        ));
        dir
    })
}

#[test]
fn tensorboard_holds_every_metric_line_the_config_and_the_samples() {
    let out = run();
    let runs: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    // transformers' default logging dir: runs/<Mon><dd>_<hh>-<mm>-<ss>_<host>.
    let name = runs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.len() > 16 && &name[5..6] == "_" && &name[8..9] == "-" && &name[14..15] == "_",
        "{name}"
    );
    let files: Vec<PathBuf> = std::fs::read_dir(&runs[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    assert!(file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    assert_eq!(*file, common::events_file(out), "the checkpoint records it");

    // Every record's CRCs (read_events), the file version first.
    let raw = dpo_sam::tensorboard::read_events(file).unwrap();
    assert_eq!(
        raw[0].what,
        Some(dpo_sam::tensorboard::What::FileVersion(
            "brain.Event:2".into()
        ))
    );
    let events = common::read_events(file);

    // Each numeric field of each line with a step is one scalar, under TRL's tags.
    let mut expected = 0;
    for line in lines(&out.join("metrics.jsonl")) {
        let Some(step) = line.get("step").and_then(Value::as_i64) else {
            continue;
        };
        for (key, v) in line.as_object().unwrap() {
            let Some(x) = v.as_f64().filter(|_| key != "step") else {
                continue;
            };
            let tag = match key.strip_prefix("eval_") {
                Some(rest) => format!("eval/{rest}"),
                None => format!("train/{key}"),
            };
            let got = events.scalars.get(&(tag.clone(), step));
            assert_eq!(got, Some(&(x as f32)), "{tag} at step {step}");
            expected += 1;
        }
    }
    assert_eq!(
        events.scalars.len(),
        expected,
        "no scalar beyond metrics.jsonl's"
    );
    for tag in [
        "train/loss",
        "train/rewards/accuracies",
        "eval/loss",
        "train/epoch",
    ] {
        assert!(
            events.scalars.keys().any(|(t, _)| t == tag),
            "{tag} missing"
        );
    }
    assert!(events
        .scalars
        .contains_key(&("eval/rewards/margins".into(), 4)));

    // The config and the model's config.json as text at step 0.
    let args = &events.texts[&("args/text_summary".to_string(), 0)];
    assert!(args.contains("learning_rate = 0.005"), "{args}");
    let model = &events.texts[&("model_config/text_summary".to_string(), 0)];
    assert!(model.contains("\"n_embd\": 64"), "{model}");

    // Two samples at each evaluation (step 4, and the final one at 8), in both places.
    let samples = lines(&out.join("samples.jsonl"));
    let at: Vec<(u64, u64)> = samples
        .iter()
        .map(|s| (s["step"].as_u64().unwrap(), s["index"].as_u64().unwrap()))
        .collect();
    assert_eq!(at, [(4, 0), (4, 1), (8, 0), (8, 1)]);
    for s in &samples {
        let prompt = s["prompt"].as_str().unwrap();
        assert!(prompt.ends_with('='), "a built-in task prompt: {prompt:?}");
        let n = s["completion_tokens"].as_u64().unwrap();
        let reason = s["finish_reason"].as_str().unwrap();
        assert!(
            (n == 6 && reason == "length") || (n < 6 && reason == "eos"),
            "{s}"
        );
        let text = &events.texts[&(
            format!("samples/{}/text_summary", s["index"]),
            s["step"].as_i64().unwrap(),
        )];
        let completion = s["completion"].as_str().unwrap();
        assert!(
            text.contains(prompt) && text.contains(&format!("    {completion}")),
            "{text}"
        );
    }
}

#[test]
fn every_saved_directory_has_a_model_card_listed_in_checkpoint_manifests() {
    let out = run();
    for dir in ["checkpoint-4", "checkpoint-8"] {
        let ckpt = out.join(dir);
        dpo_sam::checkpoint::verify(&ckpt).unwrap();
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("manifest.json")).unwrap())
                .unwrap();
        assert!(
            manifest["files"]["README.md"]["sha256"].is_string(),
            "{manifest}"
        );
    }
    let mid = std::fs::read_to_string(out.join("checkpoint-4/README.md")).unwrap();
    assert!(
        mid.contains("A checkpoint after 4 of 8 optimiser steps"),
        "{mid}"
    );
    assert!(
        mid.contains("| metric | train (step 4) | eval (step 4) |"),
        "{mid}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let (yaml, body) = card
        .strip_prefix("---\n")
        .unwrap()
        .split_once("\n---\n")
        .unwrap();
    assert!(
        yaml.contains("library_name: transformers")
            && yaml.contains("- dpo\n")
            && yaml.contains("- logits-sam")
            && yaml.contains("- dpo-sam"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("base_model"),
        "a random built-in model has no base on the Hub: {yaml}"
    );
    assert!(
        body.contains("Training finished after 8 optimiser steps"),
        "{body}"
    );
    // The final eval's values, as metrics.jsonl has them.
    let final_eval = lines(&out.join("metrics.jsonl"))
        .into_iter()
        .rfind(|l| l.get("eval_loss").is_some())
        .unwrap();
    assert_eq!(final_eval["step"], 8);
    let loss = final_eval["eval_loss"].as_f64().unwrap();
    let row = body.lines().find(|l| l.starts_with("| loss |")).unwrap();
    let shown: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap();
    assert!((shown - loss).abs() < 1e-4, "{row} vs {loss}");
    for want in [
        "| beta | 0.5 |",
        "| sam.rho | 0.05 |",
        "AutoModelForCausalLM.from_pretrained(model_id)",
        "[training]",
    ] {
        assert!(body.contains(want), "{want} missing:\n{body}");
    }
    // The run's config beside its outputs, for `report`.
    let cfg = std::fs::read_to_string(out.join("training_config.toml")).unwrap();
    assert!(cfg.contains("eval_generate = 2"), "{cfg}");
}

#[test]
fn report_to_none_or_jsonl_writes_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    for (i, setting) in [
        "training.report_to=\"none\"",
        "training.report_to=[\"jsonl\"]",
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("r{i}"));
        ok(&train(&out, &["training.max_steps=2", setting]));
        assert!(!out.join("runs").exists(), "{setting}");
        assert!(out.join("metrics.jsonl").is_file());
        let state =
            dpo_sam::checkpoint::load_state(&dpo_sam::checkpoint::latest(&out).unwrap()).unwrap();
        assert_eq!(state.tensorboard, None);
        assert!(!out.join("samples.jsonl").exists());
    }
}

#[test]
fn bad_reporting_and_sampling_settings_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    for (set, want) in [
        (
            "training.report_to=\"wandb\"",
            "training.report_to: expected one of none, all, jsonl, tensorboard, got `wandb`",
        ),
        (
            "training.report_to=[\"none\", \"tensorboard\"]",
            "\"none\" cannot be combined",
        ),
        (
            "generate.top_p=1.5",
            "generate.top_p: must be in (0, 1], got 1.5",
        ),
        (
            "generate.max_new_tokens=0",
            "generate.max_new_tokens: must be at least 1",
        ),
        (
            "training.hub_model_id=\"a/b/c\"",
            "training.hub_model_id: expected `NAME` or `ORG/NAME`",
        ),
        (
            "training.hub_revision=\"a b\"",
            "training.hub_revision: expected a branch name",
        ),
    ] {
        let res = train(&out, &[set]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{set}: {err}");
        assert!(err.contains(want), "{set}: {err}");
        assert!(
            !out.exists(),
            "{set}: nothing is written before the config is valid"
        );
    }
    let res = train(&out, &["training.report_to=\"wandb\""]);
    assert!(String::from_utf8_lossy(&res.stderr).contains("docs/tracking.md"));
}
