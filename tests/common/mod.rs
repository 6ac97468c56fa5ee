//! Helpers shared by integration tests: the built-in tiny GPT-2 config and trainer, the real
//! stories260K and pairs for it, the `dpo-sam` binary, JSON-lines files, tensor diffs.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Tensor};
use dpo_sam::config::Config;
use dpo_sam::train::Trainer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// configs/tiny_gpt2.toml with 64 built-in pairs, a fresh output directory and `overrides`.
pub fn tiny_config(overrides: &[&str]) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/tiny_gpt2.toml"
    ))?;
    let dir = tempfile::tempdir()?.keep();
    let mut ov: Vec<String> = vec![
        format!("output_dir=\"{}\"", dir.display()),
        "data.builtin_pairs=64".into(),
    ];
    ov.extend(overrides.iter().map(|s| s.to_string()));
    Config::parse(&text, "tiny_gpt2.toml", &ov)
}

/// A trainer for [`tiny_config`].
pub fn tiny_trainer(overrides: &[&str]) -> Trainer {
    Trainer::new(tiny_config(overrides).unwrap()).unwrap()
}

/// Largest absolute elementwise difference, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// What a TensorBoard events file holds, read back record by record with both CRCs checked:
/// scalars and texts by (tag, step). A second value for one tag at one step fails the test.
pub struct Events {
    pub scalars: std::collections::BTreeMap<(String, i64), f32>,
    pub texts: std::collections::BTreeMap<(String, i64), String>,
}

pub fn read_events(path: &std::path::Path) -> Events {
    use dpo_sam::tensorboard::{Kind, What};
    let mut out = Events {
        scalars: Default::default(),
        texts: Default::default(),
    };
    for event in dpo_sam::tensorboard::read_events(path).unwrap() {
        let Some(What::Summary(summary)) = event.what else {
            continue;
        };
        for v in summary.value {
            let key = (v.tag.clone(), event.step);
            let fresh = match v.kind {
                Some(Kind::SimpleValue(x)) => out.scalars.insert(key, x).is_none(),
                Some(Kind::Tensor(t)) => {
                    let text = String::from_utf8(t.string_val[0].clone()).unwrap();
                    out.texts.insert(key, text).is_none()
                }
                None => panic!("{}: a value without data", v.tag),
            };
            assert!(fresh, "{}: two values at step {}", v.tag, event.step);
        }
    }
    out
}

/// The events file a run's newest checkpoint recorded (the one its TensorBoard run appends to).
pub fn events_file(out: &std::path::Path) -> std::path::PathBuf {
    let ckpt = dpo_sam::checkpoint::latest(out).unwrap();
    let state = dpo_sam::checkpoint::load_state(&ckpt).unwrap();
    out.join(
        state
            .tensorboard
            .expect("the checkpoint records the events file")
            .file,
    )
}

/// The `dpo-sam` binary, run in the crate root.
pub fn dpo_sam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

/// `dpo-sam train` of configs/tiny_gpt2.toml on 64 built-in pairs into `out`, with `sets` as
/// `--set` overrides.
pub fn train_tiny(out: &Path, sets: &[&str]) -> Output {
    let out = out.display().to_string();
    let mut args = vec![
        "train",
        "--config",
        "configs/tiny_gpt2.toml",
        "--quiet",
        "--output-dir",
        &out,
        "--set",
        "data.builtin_pairs=64",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    dpo_sam(&args)
}

/// A JSON-lines file, one value per line.
pub fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A file of tests/fixtures/score.
pub fn score_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/score")
        .join(name)
        .display()
        .to_string()
}

/// The real stories260K (../shared/models), or `None` with the reason printed.
pub fn stories260k() -> Option<PathBuf> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K");
    if !model.is_dir() {
        eprintln!("skipping stories260K: {} not found", model.display());
        return None;
    }
    Some(model)
}

/// Story openings, each with a fluent chosen and a degenerate rejected continuation.
pub const STORY_PAIRS: &[(&str, &str, &str)] = &[
    (
        "Once upon a time, there was a little",
        " girl named Lily.",
        " the the the the.",
    ),
    (
        "One day, Tom went to the",
        " park to play.",
        " park park park park.",
    ),
    ("The cat was very", " happy and sleepy.", " a a a a."),
    (
        "Lily saw a big",
        " red ball in the garden.",
        " big big big big.",
    ),
    (
        "The sun was shining and the birds",
        " were singing in the trees.",
        " was was was.",
    ),
    (
        "Tim had a new toy car. He",
        " liked to play with it every day.",
        " car car car car.",
    ),
    (
        "Mom said it was time for",
        " bed, so Sue brushed her teeth.",
        " time time time.",
    ),
    (
        "The little dog found a",
        " bone under the old tree.",
        " dog dog dog dog.",
    ),
];

/// `pairs` as a prompt/chosen/rejected JSON-lines file at `path`.
pub fn write_pairs(path: &Path, pairs: &[(&str, &str, &str)]) {
    let lines: Vec<String> = pairs
        .iter()
        .map(|(p, c, r)| serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}
