//! `dpo-sam train` against real TRL (`DPOTrainer`, TRL 1.x) on the same tiny GPT-2, the same
//! pairs (two cut at `max_length`, one dropped for a prompt that fills it) and the same settings:
//! the tokenised pairs, each pair's log-probs, and then, step by step, TRL's logged metrics (loss
//! with a token-mean `sft` term, gradient norm before clipping, learning rate, rewards, log-probs,
//! `logits/*`, `entropy`, `mean_token_accuracy`, cumulative `num_tokens`, `epoch`) and the
//! weights after each AdamW update. Step 2 is HF's partial last step: the epoch's one pair left.
//! `scripts/make_trl_fixture.py` writes `tests/fixtures/trl_step/` with TRL installed; this test
//! only reads it.

use candle_core::{Device, Tensor};
use dpo_sam::config::Config;
use dpo_sam::data::batch::PreferenceBatch;
use dpo_sam::data::stream::epoch_order;
use dpo_sam::train::Trainer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_step")
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: dpo-sam {got}, TRL {want}"
    );
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn one_epoch_matches_trl_dpo_trainer_step_by_step() {
    let fx = fixture();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap()).unwrap();
    let args = &expected["args"];
    let trl_pairs = expected["pairs"].as_array().unwrap();
    let seed = args["seed"].as_u64().unwrap();
    let (micro, max_length) = (2usize, args["max_length"].as_u64().unwrap() as usize);

    // TRL drew the kept pairs in file order; dpo-sam draws train_pairs[order[k]] k-th in epoch 0,
    // so the file puts TRL's k-th kept pair at position order[k], the dropped one last.
    let lines: Vec<Value> = std::fs::read_to_string(fx.join("data.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let dropped = 3;
    let kept: Vec<&Value> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dropped)
        .map(|(_, l)| l)
        .collect();
    assert_eq!(kept.len(), trl_pairs.len(), "TRL kept all but one pair");
    let order = epoch_order(&vec![0; kept.len()], micro, 0, seed, 0);
    let mut file = vec![String::new(); kept.len()];
    for (k, &at) in order.iter().enumerate() {
        file[at] = kept[k].to_string();
    }
    file.push(lines[dropped].to_string());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(&data, file.join("\n") + "\n").unwrap();
    let out = tmp.path().join("run");
    let config = format!(
        r#"
output_dir = {out:?}
seed = {seed}
[model]
name_or_path = {model:?}
[data]
train = {data:?}
max_length = {max_length}
[training]
loss_type = ["sigmoid", "sft"]
loss_weights = [1.0, 0.3]
beta = {beta}
learning_rate = {lr}
batch_size = 4
micro_batch_size = {micro}
num_train_epochs = 1
lr_scheduler_type = "linear"
warmup_steps = 0
weight_decay = {wd}
max_grad_norm = {clip}
logging_steps = 1
save_steps = 1
"#,
        model = fx.join("model"),
        beta = args["beta"],
        lr = args["learning_rate"],
        wd = args["weight_decay"],
        clip = args["max_grad_norm"],
    );
    let mut trainer = Trainer::new(Config::parse(&config, "parity.toml", &[]).unwrap()).unwrap();

    // Tokenisation: TRL's prompt/response split, EOS, keep_start truncation at max_length.
    let ours = trainer.train_pairs().to_vec();
    assert_eq!(ours.len(), trl_pairs.len(), "the long prompt is skipped");
    for (k, trl) in trl_pairs.iter().enumerate() {
        let tp = &ours[order[k]];
        let prompt = ids(&trl["prompt_ids"]);
        for (seq, side) in [(&tp.chosen, "chosen_ids"), (&tp.rejected, "rejected_ids")] {
            let mut full = prompt.clone();
            full.extend(ids(&trl[side]));
            full.truncate(max_length);
            assert_eq!(seq.ids, full, "pair {k} {side}");
            assert_eq!(seq.prompt_len, prompt.len(), "pair {k}");
        }
        // Each pair's log-probs under the initial policy (TRL's compute_ref_log_probs).
        let batch =
            PreferenceBatch::new(std::slice::from_ref(tp), trainer.tok().pad_id, &Device::Cpu)
                .unwrap();
        let ms = trainer.micro_step(&batch, None).unwrap();
        close(
            &format!("pair {k} chosen logps"),
            ms.chosen_logps[0] as f64,
            trl["chosen_logps"].as_f64().unwrap(),
            1e-5,
        );
        close(
            &format!("pair {k} rejected logps"),
            ms.rejected_logps[0] as f64,
            trl["rejected_logps"].as_f64().unwrap(),
            1e-5,
        );
    }
    assert!(
        ours.iter()
            .any(|tp| tp.chosen.ids.len() == max_length || tp.rejected.ids.len() == max_length),
        "truncation applies"
    );

    trainer.train().unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l.get("step").is_some())
        .collect();
    let steps = expected["steps"].as_array().unwrap();
    assert_eq!(lines.len(), steps.len(), "{metrics}");
    for (line, trl) in lines.iter().zip(steps) {
        let step = trl["step"].as_u64().unwrap();
        assert_eq!(line["step"].as_u64(), Some(step));
        for key in [
            "loss",
            "grad_norm",
            "learning_rate",
            "entropy",
            "num_tokens",
            "logits/chosen",
            "logits/rejected",
            "mean_token_accuracy",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "epoch",
        ] {
            let got = line[key]
                .as_f64()
                .unwrap_or_else(|| panic!("step {step}: no {key} in {line}"));
            close(
                &format!("step {step} {key}"),
                got,
                trl[key].as_f64().unwrap(),
                2e-5,
            );
        }
        // The updated weights, every tensor TRL saved.
        let want = candle_core::safetensors::load(
            fx.join(format!("step{step}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let got: HashMap<String, Tensor> = candle_core::safetensors::load(
            out.join(format!("checkpoint-{step}/model.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(got.len(), want.len(), "step {step}: tensors");
        for (name, w) in &want {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("step {step}: {name} not saved"));
            // The key bias adds q·b_k to every score of a query, which softmax ignores: its
            // gradient is 0 up to rounding, and Adam's g / (|g| + ε) turns that rounding into
            // updates anywhere in ±lr on both sides. Compare the query and value biases only.
            let (g, w) = match name.ends_with("attn.c_attn.bias") {
                true => {
                    let n = w.dim(0).unwrap() / 3;
                    let qv = |t: &Tensor| {
                        Tensor::cat(
                            &[t.narrow(0, 0, n).unwrap(), t.narrow(0, 2 * n, n).unwrap()],
                            0,
                        )
                        .unwrap()
                    };
                    (qv(g), qv(w))
                }
                false => (g.clone(), w.clone()),
            };
            let diff = (g - w)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 2e-6,
                "step {step}: {name} differs from TRL's by {diff}"
            );
        }
    }
}
