//! The `dpo-sam` binary as a user runs it: the main job on the embedded default, and errors that
//! name the file and key instead of panicking.

use std::process::Command;

fn dpo_sam() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo-sam"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

#[test]
fn train_runs_the_embedded_default_and_saves_a_loadable_model() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = dpo_sam()
        .args([
            "train",
            "--config",
            "configs/tiny_gpt2.toml",
            "--quiet",
            "--set",
            "training.max_steps=3",
        ])
        .args([
            "--set",
            "training.eval_steps=0",
            "--set",
            "data.builtin_pairs=64",
            "--output-dir",
        ])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(out_dir.path().join("metrics.jsonl")).unwrap();
    let train_lines = metrics
        .lines()
        .filter(|l| l.contains("\"rewards/accuracies\""))
        .count();
    assert_eq!(train_lines, 3);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out_dir.path().join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
}

#[test]
fn bad_configs_fail_before_any_work_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("training.beta=-0.1", "training.beta: must be > 0"),
        ("training.micro_batch_size=5", "not divisible"),
        ("training.bogus=1", "bogus"),
        ("sam.kind=\"sharp\"", "sam.kind: expected one of"),
    ];
    for (ov, expected) in cases {
        let out = dpo_sam()
            .args([
                "train",
                "--config",
                "configs/tiny_gpt2.toml",
                "--quiet",
                "--set",
                ov,
                "--output-dir",
            ])
            .arg(dir.path().join("never"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{ov}: {stderr}");
        assert!(
            stderr.contains("configs/tiny_gpt2.toml") && stderr.contains(expected),
            "{ov}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !dir.path().join("never").exists(),
            "work started despite a bad config"
        );
    }
    let out = dpo_sam()
        .args(["train", "--config", "configs/missing.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config file configs/missing.toml"));
}

#[test]
fn local_hf_gpt2_directory_trains() {
    let shared = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models/gpt2-fake-tiny"
    );
    if !std::path::Path::new(shared).is_dir() {
        eprintln!("skipping: {shared} is absent");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let rows: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"prompt": "Question {i}: is the sky blue?", "chosen": " Yes, it is.", "rejected": " No{i}."}}"#))
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let cfg = format!(
        "output_dir = {out:?}\n[model]\nname_or_path = {shared:?}\n[data]\ntrain = {data:?}\nmax_length = 64\n\
         [training]\nlearning_rate = 1e-3\nbatch_size = 4\nmax_steps = 2\n[sam]\nkind = \"logits\"\nrho = 0.01\n",
        out = dir.path().join("run").display().to_string(),
        data = data.display().to_string(),
    );
    let cfg_path = dir.path().join("run.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = dpo_sam()
        .args(["train", "--quiet", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("run/model.safetensors").is_file());
}

/// `dpo-sam bench`'s first-step memory in its own process, `--json`.
fn bench_memory(checkpointing: bool) -> serde_json::Value {
    let config = tempfile::NamedTempFile::new().unwrap();
    // Activations dominate: 8 blocks, 512 tokens, attention scores [2, 4, 256, 256] per block.
    std::fs::write(
        config.path(),
        r#"{"model_type":"gpt_neox","vocab_size":128,"hidden_size":64,"num_hidden_layers":8,
"num_attention_heads":4,"intermediate_size":256,"rotary_pct":0.25,"hidden_act":"gelu"}"#,
    )
    .unwrap();
    let mut cmd = dpo_sam();
    cmd.args(["bench", "--pairs", "1", "--seq-len", "256", "--steps", "1"])
        .args(["--variants", "none", "--json", "--shape"])
        .arg(config.path());
    if checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["memory"].clone()
}

/// The plan's activation estimate (what `--dry-run` prints) against the memory measured on one
/// training step: what checkpointing saves, measured as the difference between two processes'
/// first-step peak over resident memory, is within a factor 1.5 of what the plan says it saves
/// (measured 13.4 MiB, planned 14.6 MiB with the fused dense and attention kernels).
#[test]
fn planned_activation_memory_agrees_with_the_measured_step() {
    let (off, on) = (bench_memory(false), bench_memory(true));
    let Some(measured_off) = off["step_increase_mib"].as_f64() else {
        eprintln!("skipping: peak resident memory cannot be measured here (Linux only)");
        return;
    };
    let measured = measured_off - on["step_increase_mib"].as_f64().unwrap();
    let get = |k: &str| off[k].as_f64().unwrap();
    let planned = get("plan_activations_without_checkpointing_mib")
        - get("plan_activations_with_checkpointing_mib");
    eprintln!("checkpointing saves {measured:.1} MiB measured, {planned:.1} MiB planned; off: {off}; on: {on}");
    assert!(
        measured > planned / 1.5 && measured < planned * 1.5,
        "checkpointing saves {measured:.1} MiB measured, {planned:.1} MiB planned"
    );
    // Each step on its own, which also counts the allocator's and the backward's slack: within 2×.
    for m in [&off, &on] {
        let (got, plan) = (
            m["step_increase_mib"].as_f64().unwrap(),
            m["plan_step_mib"].as_f64().unwrap(),
        );
        assert!(
            got > plan / 2.0 && got < plan * 2.0,
            "step: {got:.1} MiB measured, {plan:.1} MiB planned"
        );
    }
}
