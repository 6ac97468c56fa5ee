//! The bad-input corpus: every case runs the binary and must exit 1 with its expected message
//! and no panic. Configs and data rows are committed under `tests/bad_inputs/`; broken model
//! files and checkpoints are made here from a valid fixture, since they are derived bytes.

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `dpo-sam train ARGS` and checks exit status 1, the message, and the absence of a panic.
fn expect_error(case: &str, args: &[String], expected: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(ROOT)
        .arg("train")
        .arg("--quiet")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: expected exit 1, stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{case}: panicked: {err}");
    for e in expected {
        assert!(err.contains(e), "{case}: expected `{e}` in: {err}");
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The tiny default config with overrides, one step, into a fresh directory.
fn tiny(out: &Path, sets: &[String]) -> Vec<String> {
    let mut v = strs(&[
        "--config",
        "configs/tiny_gpt2.toml",
        "--set",
        "training.max_steps=1",
        "--set",
        "data.builtin_pairs=16",
    ]);
    for s in sets {
        v.push("--set".into());
        v.push(s.clone());
    }
    v.push("--output-dir".into());
    v.push(out.display().to_string());
    v
}

#[test]
fn malformed_configs() {
    let cases: &[(&str, &[&str])] = &[
        (
            "not_toml.toml",
            &["not_toml.toml", "unclosed array, expected `]`"],
        ),
        (
            "not_utf8.toml",
            &["cannot read config file", "not_utf8.toml", "valid UTF-8"],
        ),
        (
            "unknown_key.toml",
            &[
                "unknown_key.toml",
                "unknown field `learnin_rate`",
                "in `training`",
            ],
        ),
        (
            "wrong_type.toml",
            &[
                "invalid type: string \"eight\", expected usize",
                "training.batch_size",
            ],
        ),
        (
            "missing_training.toml",
            &["missing_training.toml: missing field `training`"],
        ),
        (
            "bad_save_total_limit.toml",
            &["training.save_total_limit: must be > 0"],
        ),
        (
            "bad_save_dtype.toml",
            &["training.save_dtype: expected one of auto, f32, bf16, f16, got `int8`"],
        ),
        (
            "bad_max_shard_size.toml",
            &[
                "training.max_shard_size: expected bytes or a size like \"5GB\"",
                "`5XB`",
            ],
        ),
        (
            "does_not_exist.toml",
            &["cannot read config file", "does_not_exist.toml"],
        ),
    ];
    for (file, expected) in cases {
        let path = format!("tests/bad_inputs/configs/{file}");
        expect_error(file, &strs(&["--config", &path]), expected);
    }
}

#[test]
fn malformed_data_rows_stop_strict_runs_at_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "truncated_row.jsonl",
            &["truncated_row.jsonl:2: invalid JSON"],
        ),
        (
            "missing_rejected.jsonl",
            &["missing_rejected.jsonl:2: missing field `rejected`"],
        ),
        (
            "not_an_object.jsonl",
            &["not_an_object.jsonl:2: expected a JSON object, got a list"],
        ),
        (
            "number_response.jsonl",
            &["number_response.jsonl:1: field `chosen`: expected a string, got a number"],
        ),
        ("empty.jsonl", &["no usable training pairs"]),
        ("absent.jsonl", &["absent.jsonl"]),
    ];
    for (file, expected) in cases {
        let path = format!("\"tests/bad_inputs/data/{file}\"");
        let sets = [
            format!("data.train={path}"),
            format!("data.eval={path}"),
            "data.strict=true".into(),
        ];
        expect_error(file, &tiny(&dir.path().join("never"), &sets), expected);
    }
}

/// A copy of the small GPT-2 fixture (config.json + model.safetensors) to break.
fn model_copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            Path::new(ROOT).join("tests/fixtures/gpt2-random").join(f),
            to.join(f),
        )
        .unwrap();
    }
    to
}

fn with_model(out: &Path, model: &Path) -> Vec<String> {
    tiny(
        out,
        &[format!(
            "model.name_or_path={:?}",
            model.display().to_string()
        )],
    )
}

#[test]
fn broken_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");

    let truncated = model_copy(dir.path(), "truncated");
    let st = truncated.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(
        "truncated safetensors",
        &with_model(&out, &truncated),
        &["cannot read safetensors in", "truncated"],
    );

    let corrupt = model_copy(dir.path(), "corrupt");
    let st = corrupt.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes()); // header length beyond the file
    std::fs::write(&st, &bytes).unwrap();
    expect_error(
        "corrupt safetensors header",
        &with_model(&out, &corrupt),
        &["cannot read safetensors in", "corrupt"],
    );

    let empty = model_copy(dir.path(), "empty");
    std::fs::write(empty.join("model.safetensors"), b"").unwrap();
    expect_error(
        "empty safetensors",
        &with_model(&out, &empty),
        &["cannot read safetensors in", "empty"],
    );

    let missing = model_copy(dir.path(), "missing");
    std::fs::remove_file(missing.join("model.safetensors")).unwrap();
    expect_error(
        "no weights",
        &with_model(&out, &missing),
        &["no model.safetensors or model.safetensors.index.json"],
    );

    let shape = model_copy(dir.path(), "shape");
    rewrite(&shape.join("model.safetensors"), |name, t| {
        if name.ends_with("ln_f.weight") {
            Tensor::ones(t.dim(0).unwrap() + 1, DType::F32, &Device::Cpu).unwrap()
        } else {
            t
        }
    });
    expect_error(
        "wrong shape",
        &with_model(&out, &shape),
        &["ln_f.weight` has shape [33] but config.json implies [32]"],
    );

    let no_tensor = model_copy(dir.path(), "no_tensor");
    let st = no_tensor.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let gone = tensors
        .keys()
        .find(|k| k.ends_with("ln_f.bias"))
        .unwrap()
        .clone();
    tensors.remove(&gone);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    expect_error(
        "missing tensor",
        &with_model(&out, &no_tensor),
        &["ln_f.bias` is missing from the safetensors files"],
    );

    let config = model_copy(dir.path(), "bad_config");
    std::fs::write(
        config.join("config.json"),
        "{\"model_type\": \"gpt2\", \"n_embd\": ",
    )
    .unwrap();
    expect_error(
        "truncated config.json",
        &with_model(&out, &config),
        &["config.json: invalid JSON"],
    );

    // A 200-token tokenizer for this model's 96-entry vocabulary.
    let vocab = model_copy(dir.path(), "vocab");
    std::fs::copy(
        Path::new(ROOT).join("tests/bad_inputs/tokenizer_200/tokenizer.json"),
        vocab.join("tokenizer.json"),
    )
    .unwrap();
    expect_error(
        "tokenizer larger than the vocabulary",
        &with_model(&out, &vocab),
        &["the tokenizer has 200 tokens but the model's vocab_size is 96"],
    );
}

/// Rewrites every tensor of a safetensors file through `f`.
fn rewrite(path: &Path, f: impl Fn(&str, Tensor) -> Tensor) {
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k.clone(), f(&k, t)))
        .collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// Recomputes a checkpoint's manifest, so that a deliberately wrong file passes the checksum
/// and reaches the loader.
fn reseal(ckpt: &Path) {
    let path = ckpt.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (name, entry) in manifest["files"].as_object_mut().unwrap() {
        let bytes = std::fs::read(ckpt.join(name)).unwrap();
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        entry["size"] = serde_json::json!(bytes.len());
        entry["sha256"] = serde_json::json!(hash);
    }
    std::fs::write(&path, manifest.to_string()).unwrap();
}

#[test]
fn missing_partial_and_mismatched_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = tiny(out, &[]);
        args.extend(strs(extra));
        args
    };
    expect_error(
        "resume from a missing directory",
        &run(&dir.path().join("nowhere"), &["--resume"]),
        &["nowhere is not a directory"],
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    expect_error(
        "resume without checkpoints",
        &run(&empty, &["--resume"]),
        &["no complete checkpoint", "empty"],
    );

    let good = dir.path().join("good");
    let ok = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(ROOT)
        .arg("train")
        .arg("--quiet")
        .args(run(&good, &[]))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(to.join("checkpoint-1")).unwrap();
        for f in std::fs::read_dir(good.join("checkpoint-1")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join("checkpoint-1").join(f.file_name())).unwrap();
        }
        to
    };

    let partial = copy("partial");
    std::fs::remove_file(partial.join("checkpoint-1/manifest.json")).unwrap();
    expect_error(
        "checkpoint without manifest",
        &run(&partial, &["--resume"]),
        &["ignoring incomplete checkpoint", "no complete checkpoint"],
    );

    let flipped = copy("flipped");
    let st = flipped.join("checkpoint-1/model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&st, &bytes).unwrap();
    expect_error(
        "checksum mismatch",
        &run(&flipped, &["--resume"]),
        &[
            "checksum does not match the manifest",
            "no complete checkpoint",
        ],
    );

    let truncated = copy("truncated_opt");
    let st = truncated.join("checkpoint-1/optimizer.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    reseal(&truncated.join("checkpoint-1"));
    expect_error(
        "truncated optimizer state",
        &run(&truncated, &["--resume"]),
        &["cannot read", "optimizer.safetensors"],
    );

    let dtype = copy("dtype");
    rewrite(
        &dtype.join("checkpoint-1/optimizer.safetensors"),
        |name, t| {
            if name.starts_with("m.") {
                t.to_dtype(DType::F16).unwrap()
            } else {
                t
            }
        },
    );
    reseal(&dtype.join("checkpoint-1"));
    expect_error(
        "optimizer moments of the wrong dtype",
        &run(&dtype, &["--resume"]),
        &["optimizer.safetensors", "has dtype F16, expected F32"],
    );

    let int_weights = copy("int_weights");
    rewrite(
        &int_weights.join("checkpoint-1/model.safetensors"),
        |_, t| t.to_dtype(DType::U8).unwrap(),
    );
    reseal(&int_weights.join("checkpoint-1"));
    expect_error(
        "integer weights",
        &run(&int_weights, &["--resume"]),
        &["model.safetensors", "has dtype U8, expected a float dtype"],
    );

    let shape = copy("shape");
    let wider = [
        "--set",
        "model.builtin.n_embd=32",
        "--allow-config-drift",
        "--resume",
    ];
    expect_error(
        "checkpoint of another shape",
        &run(&shape, &wider),
        &["model.safetensors", "has shape", "the model expects"],
    );

    let bad_state = copy("bad_state");
    std::fs::write(
        bad_state.join("checkpoint-1/trainer_state.json"),
        "{\"step\": \"one\"}",
    )
    .unwrap();
    reseal(&bad_state.join("checkpoint-1"));
    expect_error(
        "corrupt trainer state",
        &run(&bad_state, &["--resume"]),
        &["trainer_state.json: not a trainer state"],
    );
}
