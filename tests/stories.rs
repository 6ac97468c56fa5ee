//! A real pretrained model end to end: Karpathy's stories260K (Llama architecture in Mistral
//! format, from ../shared/models) trains with DPO + logits-SAM through the ordinary `Trainer`,
//! and what it saves loads back. Its logits are checked against `transformers` in parity.rs.
//! Skipped, with the reason printed, where ../shared is absent.

use dpo_sam::config::Config;
use dpo_sam::models::{Model, ModelSource};
use dpo_sam::train::Trainer;

mod common;

/// The first four of the shared story pairs: one micro-batch.
const PAIRS: &[(&str, &str, &str)] = common::STORY_PAIRS.split_at(4).0;

#[test]
fn stories260k_dpo_with_logits_sam_lowers_the_loss() {
    let Some(model) = common::stories260k() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    common::write_pairs(&data, PAIRS);
    let out = tmp.path().join("run");
    let config = format!(
        r#"
output_dir = {out:?}
seed = 1
device = "cpu"

[model]
name_or_path = {model:?}
dtype = "f32"

[data]
train = {data:?}
eval = {data:?}
max_length = 64

[training]
beta = 0.1
learning_rate = 1e-3
batch_size = 4
max_steps = 10
lr_scheduler_type = "constant"
logging_steps = 1

[sam]
kind = "logits"
rho = 0.05
"#
    );
    let mut trainer = Trainer::new(Config::parse(&config, "stories.toml", &[]).unwrap()).unwrap();
    assert_eq!(
        trainer.train_pairs().len(),
        PAIRS.len(),
        "every pair tokenizes"
    );
    // The policy starts as its own reference, so the DPO loss starts at ln 2.
    let before = trainer.evaluate().unwrap().loss;
    assert!(
        (before - std::f64::consts::LN_2).abs() < 1e-5,
        "initial eval_loss {before}"
    );
    let summary = trainer.train().unwrap();
    let eval = summary.eval().unwrap();
    let (after, accuracy) = (eval.loss, eval.rewards_accuracies);
    eprintln!("stories260K: eval_loss {before:.4} -> {after:.4}, reward accuracy {accuracy}");
    assert!(
        after < before - 0.1,
        "eval_loss did not fall: {before} -> {after}"
    );
    assert_eq!(accuracy, 1.0);

    // The saved model (tied embeddings, so no lm_head tensor) loads back.
    let saved = Model::load(
        &ModelSource::Dir(out.clone()),
        false,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    assert!(saved.is_ok(), "{:#}", saved.err().unwrap());
}
