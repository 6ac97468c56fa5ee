//! `dpo-sam score` on tiny GPT-2 models against the log-probs Python `transformers` computed
//! for the same pairs (tests/fixtures/score, written by scripts/make_score_fixture.py).

use dpo_sam::score::{score, ScoreArgs};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/score")
        .join(name)
        .display()
        .to_string()
}

fn args(out: PathBuf, ref_model: Option<String>, loss_type: &str) -> ScoreArgs {
    ScoreArgs {
        model: fixture("policy"),
        ref_model,
        data: fixture("data.jsonl"),
        format: "explicit".into(),
        loss_type: loss_type.into(),
        beta: 0.1,
        max_length: 64,
        batch_size: 2,
        dtype: "f32".into(),
        device: "cpu".into(),
        out,
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn score_agrees_with_transformers() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let expected = expected["pairs"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scores.jsonl");
    let summary = score(&args(out.clone(), Some(fixture("ref")), "sigmoid")).unwrap();
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
            format: "csv".into(),
            ..args(out.clone(), None, "sigmoid")
        })
        .unwrap_err()
    );
    assert!(e.contains("--format"), "{e}");
    let e = format!(
        "{:#}",
        score(&ScoreArgs {
            beta: 0.0,
            ..args(out, None, "sigmoid")
        })
        .unwrap_err()
    );
    assert!(e.contains("--beta"), "{e}");
}
