//! `dpo-sam score` on tiny GPT-2 models against the log-probs Python `transformers` computed
//! for the same pairs (tests/fixtures/score, written by scripts/make_score_fixture.py), and its
//! CHES scores against Razin et al.'s formula on `transformers`' hidden states
//! (scripts/make_ches_fixture.py) and against a direct computation.

use candle_core::{DType, Device, Tensor};
use dpo_sam::config::TruncationMode;
use dpo_sam::data::batch::{tokenize_pair, Sequence, Truncation};
use dpo_sam::data::PreferencePair;
use dpo_sam::models::{Model, ModelSource};
use dpo_sam::score::{score, PairArgs, ScoreArgs};
use dpo_sam::tokenizer::Tok;
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{lines, score_fixture};

fn input(ref_model: Option<String>, loss_type: &str) -> PairArgs {
    PairArgs {
        model: score_fixture("policy"),
        ref_model,
        data: score_fixture("data.jsonl"),
        format: "explicit".into(),
        loss_type: loss_type.into(),
        beta: 0.1,
        max_length: 64,
        max_prompt_length: None,
        batch_size: 2,
        dtype: "f32".into(),
        device: "cpu".into(),
    }
}

fn args(out: PathBuf, ref_model: Option<String>, loss_type: &str) -> ScoreArgs {
    ScoreArgs {
        input: input(ref_model, loss_type),
        out,
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn score_agrees_with_transformers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(score_fixture("expected.json")).unwrap())
            .unwrap();
    let expected = expected["pairs"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.jsonl");
    let summary = score(&args(out.clone(), Some(score_fixture("ref")), "sigmoid")).unwrap();
    let got = lines(&out);
    assert_eq!(got.len(), expected.len());
    let (mut loss_sum, mut correct, mut margin_sum) = (0.0, 0.0, 0.0);
    for (g, e) in got.iter().zip(expected) {
        for key in [
            "chosen_logps",
            "rejected_logps",
            "ref_chosen_logps",
            "ref_rejected_logps",
        ] {
            assert!((f(g, key) - f(e, key)).abs() < 1e-4, "{key}: {g} vs {e}");
        }
        assert_eq!(g["chosen_tokens"], e["chosen_tokens"]);
        assert_eq!(g["rejected_tokens"], e["rejected_tokens"]);
        let rc = 0.1 * (f(e, "chosen_logps") - f(e, "ref_chosen_logps"));
        let rr = 0.1 * (f(e, "rejected_logps") - f(e, "ref_rejected_logps"));
        assert!(
            (f(g, "reward_chosen") - rc).abs() < 1e-5
                && (f(g, "reward_rejected") - rr).abs() < 1e-5,
            "{g}"
        );
        let loss = (-(rc - rr)).exp().ln_1p();
        assert!((f(g, "loss") - loss).abs() < 1e-5, "{g}");
        loss_sum += loss;
        correct += f64::from(u8::from(rc > rr));
        margin_sum += rc - rr;
    }
    let n = expected.len() as f64;
    assert_eq!(summary["pairs_scored"], 3);
    assert_eq!(summary["pairs_skipped"], 0);
    assert!(
        (f(&summary, "mean_loss") - loss_sum / n).abs() < 1e-5,
        "{summary}"
    );
    assert!(
        (f(&summary, "reward_accuracy") - correct / n).abs() < 1e-12,
        "{summary}"
    );
    assert!(
        (f(&summary, "mean_margin") - margin_sum / n).abs() < 1e-5,
        "{summary}"
    );
}

#[test]
fn reference_free_loss_scores_without_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.jsonl");
    score(&args(out.clone(), None, "cpo")).unwrap();
    for g in lines(&out) {
        assert!(
            g["ref_chosen_logps"].is_null() && g["ref_rejected_logps"].is_null(),
            "{g}"
        );
        // CPO with β = 0.1, λ = 1 and TRL's token-mean NLL, the pair scored alone:
        // −log σ(0.1(c − r)) − c / |y_w|
        let (c, r) = (f(&g, "chosen_logps"), f(&g, "rejected_logps"));
        let want = (-(0.1 * (c - r))).exp().ln_1p() - c / f(&g, "chosen_tokens");
        assert!((f(&g, "loss") - want).abs() < 1e-4, "{g}");
    }
}

#[test]
fn bad_arguments_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.jsonl");
    let e = format!(
        "{:#}",
        score(&args(out.clone(), None, "sigmoid,nope")).unwrap_err()
    );
    assert!(e.contains("--loss-type") && e.contains("nope"), "{e}");
    let e = format!(
        "{:#}",
        score(&ScoreArgs {
            input: PairArgs {
                format: "csv".into(),
                ..input(None, "sigmoid")
            },
            out: out.clone(),
        })
        .unwrap_err()
    );
    assert!(e.contains("--format"), "{e}");
    let e = format!(
        "{:#}",
        score(&ScoreArgs {
            input: PairArgs {
                beta: 0.0,
                ..input(None, "sigmoid")
            },
            out,
        })
        .unwrap_err()
    );
    assert!(e.contains("--beta"), "{e}");
}

/// Σ of the final hidden states that predict a sequence's response tokens, computed alone
/// (batch of one, no padding), in f64.
fn response_sum(model: &Model, seq: &Sequence) -> (Vec<f64>, usize) {
    let ids = Tensor::new(seq.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = model.net.forward_hidden(&ids).unwrap().squeeze(0).unwrap();
    let rows = h.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let used = &rows[seq.prompt_len - 1..seq.ids.len() - 1];
    let mut sum = vec![0.0; rows[0].len()];
    for r in used {
        for (s, x) in sum.iter_mut().zip(r) {
            *s += x;
        }
    }
    (sum, used.len())
}

#[test]
fn ches_agrees_with_transformers_and_with_a_direct_computation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.jsonl");
    score(&args(out.clone(), Some(score_fixture("ref")), "sigmoid")).unwrap();
    let got = lines(&out);
    // Razin et al.'s formula on transformers' hidden states (scripts/make_ches_fixture.py).
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(score_fixture("ches.json")).unwrap())
            .unwrap();
    let expected = expected["pairs"].as_array().unwrap();
    assert_eq!(got.len(), expected.len());
    let close = |a: f64, b: f64| (a - b).abs() < 1e-4 * b.abs().max(1.0);
    for (g, e) in got.iter().zip(expected) {
        for key in ["ches", "ln_ches"] {
            assert!(close(f(g, key), f(e, key)), "{key}: {g} vs {e}");
        }
    }
    // The same from each sequence run alone, summed by hand.
    let policy = Model::load(
        &ModelSource::Dir(score_fixture("policy").into()),
        false,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tok = Tok::from_dir(Path::new(&score_fixture("policy"))).unwrap();
    let trunc = Truncation {
        max_length: 64,
        max_prompt_length: None,
        mode: TruncationMode::KeepEnd,
    };
    let data = std::fs::read_to_string(score_fixture("data.jsonl")).unwrap();
    for (line, g) in data.lines().zip(&got) {
        let pair: PreferencePair = serde_json::from_str(line).unwrap();
        let tp = tokenize_pair(&tok, &pair, &trunc).unwrap().unwrap();
        let (w, nw) = response_sum(&policy, &tp.chosen);
        let (l, nl) = response_sum(&policy, &tp.rejected);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let ches = dot(&w, &l) - dot(&w, &w);
        let (nw, nl) = (nw as f64, nl as f64);
        let ln_ches = dot(&w, &l) / (nw * nl) - dot(&w, &w) / (nw * nw);
        assert!(close(f(g, "ches"), ches), "{g}: direct CHES {ches}");
        assert!(
            close(f(g, "ln_ches"), ln_ches),
            "{g}: direct LN-CHES {ln_ches}"
        );
    }
}

#[test]
fn data_inspect_summarises_ches_and_lists_the_top_pairs() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
            .args(["data", "inspect", "--data", &score_fixture("data.jsonl")])
            .args([
                "--format",
                "explicit",
                "--model",
                &score_fixture("policy"),
                "--top",
                "2",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let summary: Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let c = &summary["ches"];
    assert_eq!(c["pairs"], 3);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(score_fixture("ches.json")).unwrap())
            .unwrap();
    let mut ln: Vec<f64> = expected["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| f(p, "ln_ches"))
        .collect();
    ln.sort_by(|a, b| b.total_cmp(a));
    let top = c["top"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    for (t, want) in top.iter().zip(&ln) {
        assert!((f(t, "ln_ches") - want).abs() < 1e-4, "{t} vs {want}");
    }
    assert!((f(&c["ln_ches"], "max") - ln[0]).abs() < 1e-4);
    assert!((f(&c["ln_ches"], "min") - ln[2]).abs() < 1e-4);
    assert!(top[0]["origin"].as_str().unwrap().contains("data.jsonl:"));
    let text = run(&[]);
    assert!(
        text.contains("CHES under") && text.contains("#2 "),
        "{text}"
    );
}
