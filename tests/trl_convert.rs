//! `dpo-sam config from-trl` on recipes written like the paper's official ones (the Zephyr
//! alignment-handbook recipe with the logits-SAM flags, and a Pythia-2.8B HH recipe in the
//! earlier handbook's `dataset_mixer` form, as JSON): the TOML it writes loads with
//! `Config::load`, `train --dry-run` accepts it, and every field left behind is listed.

use dpo_sam::config::{
    Config, LossType, MixedPrecision, SamKind, SchedulerType, Sources, TargetModules,
};
use dpo_sam::trl::{convert, from_trl_file};
use std::path::Path;
use std::process::Command;

const ZEPHYR: &str = "tests/fixtures/trl/zephyr-7b-dpo-logits-sam.yaml";
const PYTHIA: &str = "tests/fixtures/trl/pythia-2.8b-hh-dpo.json";

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn dropped_keys(c: &dpo_sam::trl::Converted) -> Vec<&str> {
    c.dropped.iter().map(|d| d.key.as_str()).collect()
}

#[test]
fn zephyr_recipe_with_logits_sam_converts_field_by_field() {
    let c = from_trl_file(&fixture(ZEPHYR), 8).unwrap();
    let cfg = Config::parse(&c.toml, "converted", &[]).unwrap();
    assert_eq!(
        cfg.model.name_or_path,
        "alignment-handbook/zephyr-7b-sft-full"
    );
    assert_eq!(
        cfg.data.train,
        Sources::One("hub:HuggingFaceH4/ultrafeedback_binarized:train_prefs".into())
    );
    let t = &cfg.training;
    // 8 per device × 2 accumulation × 8 processes.
    assert_eq!((t.batch_size, cfg.micro_batch_size()), (128, 8));
    assert!(
        c.batch_note.contains("= training.batch_size 128"),
        "{}",
        c.batch_note
    );
    assert_eq!((t.beta, t.learning_rate), (0.01, 5e-7));
    assert_eq!(t.lr_scheduler_type, SchedulerType::Cosine);
    assert_eq!((t.warmup_ratio, t.num_train_epochs), (0.1, 1.0));
    assert_eq!(
        (cfg.data.max_length, cfg.data.max_prompt_length),
        (1024, Some(512))
    );
    assert_eq!(t.mixed_precision, MixedPrecision::Bf16);
    assert!(t.gradient_checkpointing);
    assert_eq!(
        (t.logging_steps, t.eval_steps, t.save_steps),
        (10, 100, 100)
    );
    assert_eq!((t.save_total_limit, cfg.seed), (Some(1), 42));
    assert_eq!(t.loss_type.to_vec(), vec![LossType::Sigmoid]);
    assert_eq!((cfg.sam.kind, cfg.sam.rho), (SamKind::Logits, 1e-5));
    assert_eq!(cfg.output_dir, Path::new("data/zephyr-7b-dpo-full"));
    // A held-out count (2000 rows) has no dpo-sam form; the rest only steer logging or the Hub.
    let dropped = dropped_keys(&c);
    for key in [
        "dataset_mixture.test_split_size",
        "dataset_mixture.seed",
        "dataset_num_proc",
        "gradient_checkpointing_kwargs",
        "hub_model_id",
        "log_level",
        "push_to_hub",
    ] {
        assert!(dropped.contains(&key), "{key} not listed in {dropped:?}");
    }
    assert_eq!(dropped.len(), 7, "{dropped:?}");
    assert!(cfg.data.eval.is_none() && cfg.data.eval_fraction == 0.0);
    assert!(c
        .toml
        .starts_with("# Converted by `dpo-sam config from-trl`"));
}

#[test]
fn pythia_json_recipe_in_the_dataset_mixer_form() {
    let c = from_trl_file(&fixture(PYTHIA), 1).unwrap();
    let cfg = Config::parse(&c.toml, "converted", &[]).unwrap();
    assert_eq!(
        (
            cfg.data.train.paths(),
            cfg.data.eval.as_ref().unwrap().paths()
        ),
        (
            vec!["hub:Anthropic/hh-rlhf:train"],
            vec!["hub:Anthropic/hh-rlhf:test"]
        )
    );
    let t = &cfg.training;
    assert_eq!((t.batch_size, cfg.micro_batch_size()), (32, 4));
    assert_eq!(t.lr_scheduler_type, SchedulerType::ConstantWithWarmup);
    assert_eq!((t.warmup_steps, t.max_grad_norm), (150, 10.0));
    assert_eq!(t.mixed_precision, MixedPrecision::No);
    assert_eq!(cfg.data.truncation_mode.as_str(), "keep_end");
    assert_eq!((cfg.sam.kind, cfg.sam.rho), (SamKind::Logits, 1e-4));
    let dropped = dropped_keys(&c);
    assert_eq!(
        {
            let mut d = dropped.clone();
            d.sort();
            d
        },
        vec![
            "optim",
            "preprocessing_num_workers",
            "ref_model_mixup_alpha",
            "report_to",
            "save_strategy"
        ]
    );
    let optim = &c.dropped[dropped.iter().position(|k| *k == "optim").unwrap()];
    assert_eq!(optim.value, "\"rmsprop\"");
    assert!(optim.reason.contains("adamw"), "{}", optim.reason);
}

#[test]
fn trl_defaults_fill_what_the_recipe_leaves_out() {
    let recipe = serde_json::json!({
        "model_name_or_path": "EleutherAI/pythia-2.8b",
        "dataset_name": "trl-lib/ultrafeedback_binarized",
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 0.05],
        "learning_rate": "1e-6",
    });
    let c = convert(recipe.as_object().unwrap(), 1, "recipe").unwrap();
    let cfg = Config::parse(&c.toml, "converted", &[]).unwrap();
    let t = &cfg.training;
    // DPOConfig 1.x / TrainingArguments defaults.
    assert_eq!(
        (t.batch_size, t.num_train_epochs, t.logging_steps),
        (8, 3.0, 10)
    );
    assert_eq!(cfg.data.max_length, 1024);
    assert!(t.gradient_checkpointing && t.mixed_precision == MixedPrecision::Bf16);
    assert_eq!(
        t.learning_rate, 1e-6,
        "a YAML 1.1 string is read as HF reads it"
    );
    assert_eq!(t.loss_type.to_vec(), vec![LossType::Sigmoid, LossType::Sft]);
    assert_eq!(t.loss_weights, Some(vec![1.0, 0.05]));
    assert_eq!(
        cfg.data.train.paths(),
        vec!["hub:trl-lib/ultrafeedback_binarized:train"]
    );
    assert!(c.dropped.is_empty(), "{:?}", c.dropped);

    // CPOConfig: CPOTrainer's sigmoid is CPO, its simpo adds cpo_alpha × the NLL.
    let cpo = serde_json::json!({
        "model_name_or_path": "m", "dataset_name": "d", "loss_type": "simpo",
        "cpo_alpha": 0.5, "simpo_gamma": 1.0,
    });
    let c = convert(cpo.as_object().unwrap(), 1, "recipe").unwrap();
    let cfg = Config::parse(&c.toml, "converted", &[]).unwrap();
    assert_eq!(
        cfg.training.loss_type.to_vec(),
        vec![LossType::Simpo, LossType::Sft]
    );
    assert_eq!(cfg.training.loss_weights, Some(vec![1.0, 0.5]));
}

#[test]
fn what_cannot_be_converted_is_an_error_naming_the_field() {
    let err = |v: serde_json::Value| {
        format!(
            "{:#}",
            convert(v.as_object().unwrap(), 1, "r.yaml").unwrap_err()
        )
    };
    let e = err(
        serde_json::json!({"model_name_or_path": "m", "dataset_name": "d", "loss_type": "apo_zero"}),
    );
    assert!(e.contains("loss_type: `apo_zero` is not computed"), "{e}");
    let e = err(serde_json::json!({"dataset_name": "d"}));
    assert!(e.contains("model_name_or_path: missing"), "{e}");
    let e = err(serde_json::json!({"model_name_or_path": "m"}));
    assert!(e.contains("no dataset"), "{e}");
    let e =
        err(serde_json::json!({"model_name_or_path": "m", "dataset_name": "d", "beta": "high"}));
    assert!(e.contains("beta: expected a number"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "beta: [1, 2\n").unwrap();
    let e = format!("{:#}", from_trl_file(&bad, 1).unwrap_err());
    assert!(e.contains("bad.yaml: invalid YAML"), "{e}");
}

#[test]
fn cli_writes_a_config_that_loads_and_dry_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("zephyr.toml");
    let run = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "config",
            "from-trl",
            ZEPHYR,
            "--num-processes",
            "8",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("not carried over (7 fields)"), "{stderr}");
    assert!(
        stderr.contains("hub_model_id: \"zephyr-7b-dpo-full\" — no effect"),
        "{stderr}"
    );
    let cfg = Config::load(&out, &[]).unwrap();
    assert_eq!(cfg.training.batch_size, 128);
    let dry = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["train", "--dry-run", "--config"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains("zephyr-7b-sft-full (mistral;") && plan.contains("logits-SAM"),
        "{plan}"
    );
}

/// `use_peft` and ModelConfig's LoRA fields become `[lora]` (the Zephyr QLoRA recipe's
/// settings): ModelConfig's defaults where left out, LoRA's dropout 0 under DPOConfig's
/// `disable_dropout` (TRL zeroes every `nn.Dropout` of the PEFT model), quantisation listed as
/// not carried over; without `use_peft` the LoRA fields are listed and no `[lora]` is written.
#[test]
fn peft_fields_become_the_lora_table() {
    let recipe = |extra: serde_json::Value| {
        let mut r = serde_json::json!({
            "model_name_or_path": "alignment-handbook/zephyr-7b-sft-qlora",
            "dataset_name": "HuggingFaceH4/ultrafeedback_binarized",
        });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let c = convert(r.as_object().unwrap(), 1, "recipe").unwrap();
        let cfg = Config::parse(&c.toml, "converted", &[]).unwrap();
        (c, cfg)
    };
    let (c, cfg) = recipe(serde_json::json!({
        "use_peft": true,
        "load_in_4bit": true,
        "lora_r": 128,
        "lora_alpha": 128,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }));
    let lora = cfg.lora.as_ref().unwrap();
    assert_eq!(
        (lora.r, lora.alpha, lora.dropout),
        (Some(128), Some(128.0), Some(0.0))
    );
    assert_eq!(
        lora.target_modules,
        Some(TargetModules::Many(
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]
            .map(String::from)
            .to_vec()
        ))
    );
    let mut dropped = dropped_keys(&c);
    dropped.sort();
    assert_eq!(dropped, vec!["load_in_4bit", "lora_dropout"]);

    // ModelConfig's defaults; dropout kept when TRL keeps it; a regex or "all-linear" string.
    let (c, cfg) = recipe(serde_json::json!({
        "use_peft": true,
        "disable_dropout": false,
        "lora_target_modules": "all-linear",
        "use_rslora": true,
    }));
    let lora = cfg.lora.as_ref().unwrap();
    assert_eq!(
        (lora.r, lora.alpha, lora.dropout, lora.use_rslora),
        (Some(16), Some(32.0), Some(0.05), Some(true))
    );
    assert_eq!(
        lora.target_modules,
        Some(TargetModules::One("all-linear".into()))
    );
    assert!(c.dropped.is_empty(), "{:?}", dropped_keys(&c));

    let (c, cfg) = recipe(serde_json::json!({ "lora_r": 64, "disable_dropout": true }));
    assert!(cfg.lora.is_none() && !c.toml.contains("[lora]"));
    let mut dropped = dropped_keys(&c);
    dropped.sort();
    assert_eq!(dropped, vec!["disable_dropout", "lora_r"]);
    let r = &c.dropped[c.dropped.iter().position(|d| d.key == "lora_r").unwrap()];
    assert!(r.reason.contains("use_peft"), "{}", r.reason);

    let bad = serde_json::json!({
        "model_name_or_path": "m",
        "dataset_name": "d",
        "use_peft": true,
        "lora_target_modules": [1, 2],
    });
    let err = convert(bad.as_object().unwrap(), 1, "recipe").unwrap_err();
    assert!(
        format!("{err:#}").contains("lora_target_modules"),
        "{err:#}"
    );
}
