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
