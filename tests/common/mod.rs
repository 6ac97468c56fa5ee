//! Helpers shared by integration tests: the built-in tiny GPT-2 config and trainer, tensor diffs.
#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Tensor};
use dpo_sam::config::Config;
use dpo_sam::train::Trainer;

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
