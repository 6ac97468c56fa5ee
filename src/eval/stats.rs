//! `eval --score`, second half: undoes the A/B order of the verdicts and reports the win rate
//! with a bootstrap interval, the split by position, the length breakdown and the
//! length-controlled win rate.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::judge::{Comparison, Position};
use super::verdict::{parse_verdict, Invalid, Replies, Skip, Verdict};

/// The policy's result in one comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// 1 for a win, 0.5 for a tie, 0 for a loss.
    pub score: f64,
    pub position: Position,
    /// Policy characters minus baseline characters (trimmed, as the judge saw them).
    pub length_diff: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Split {
    pub n: usize,
    pub win_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthBin {
    pub min_diff: i64,
    pub max_diff: i64,
    pub n: usize,
    pub win_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthReport {
    pub mean_diff: Option<f64>,
    /// Equal-count bins of the length difference, shortest policy responses first.
    pub bins: Vec<LengthBin>,
    /// Win rate at zero length difference from a logistic fit of win on length difference.
    pub length_controlled_win_rate: Option<f64>,
    pub slope_logit_per_100_chars: Option<f64>,
}

/// Everything `--score` reports (`--json` prints this object).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub comparisons: usize,
    pub valid: usize,
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    pub invalid: usize,
    pub invalid_by_reason: BTreeMap<Invalid, usize>,
    /// (wins + ties / 2) / valid.
    pub win_rate: Option<f64>,
    pub ci95: Option<[f64; 2]>,
    pub bootstrap_resamples: usize,
    pub policy_as_a: Split,
    pub policy_as_b: Split,
    /// Share of decisive verdicts that picked A, whoever was there: 0.5 means no position bias.
    pub judge_chose_a: Option<f64>,
    pub length: LengthReport,
    /// Line numbers of replies-file lines that match no comparison.
    pub reply_lines_skipped: BTreeMap<Skip, Vec<usize>>,
}

pub struct ScoreOptions {
    pub bootstrap: usize,
    pub seed: u64,
    pub length_bins: usize,
}

pub fn score(comparisons: &[Comparison], replies: Replies, opts: &ScoreOptions) -> Report {
    let mut outcomes = Vec::new();
    let mut invalid_by_reason: BTreeMap<Invalid, usize> = BTreeMap::new();
    let mut chose_a = 0usize;
    for c in comparisons {
        let verdict = match replies.by_id.get(&c.id).map(Vec::as_slice) {
            None | Some([]) => Err(Invalid::NoReply),
            Some([reply]) => reply
                .clone()
                .and_then(|text| parse_verdict(&text, &c.answer_label)),
            Some(_) => Err(Invalid::DuplicateReply),
        };
        let verdict = match verdict {
            Ok(v) => v,
            Err(reason) => {
                *invalid_by_reason.entry(reason).or_default() += 1;
                continue;
            }
        };
        chose_a += usize::from(verdict == Verdict::A);
        let score = match (verdict, c.policy_position) {
            (Verdict::Tie, _) => 0.5,
            (Verdict::A, Position::A) | (Verdict::B, Position::B) => 1.0,
            _ => 0.0,
        };
        let chars = |s: &str| s.trim().chars().count() as i64;
        outcomes.push(Outcome {
            score,
            position: c.policy_position,
            length_diff: chars(&c.policy) - chars(&c.baseline),
        });
    }
    let scores: Vec<f64> = outcomes.iter().map(|o| o.score).collect();
    let count = |s: f64| scores.iter().filter(|&&x| x == s).count();
    let (wins, ties, losses) = (count(1.0), count(0.5), count(0.0));
    let split = |p: Position| {
        let s: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.position == p)
            .map(|o| o.score)
            .collect();
        Split {
            n: s.len(),
            win_rate: mean(&s),
        }
    };
    let decisive = wins + losses;
    Report {
        comparisons: comparisons.len(),
        valid: outcomes.len(),
        wins,
        losses,
        ties,
        invalid: comparisons.len() - outcomes.len(),
        invalid_by_reason,
        win_rate: mean(&scores),
        ci95: bootstrap_ci(&scores, opts.bootstrap, opts.seed),
        bootstrap_resamples: opts.bootstrap,
        policy_as_a: split(Position::A),
        policy_as_b: split(Position::B),
        judge_chose_a: (decisive > 0).then(|| chose_a as f64 / decisive as f64),
        length: length_report(&outcomes, opts.length_bins),
        reply_lines_skipped: replies.skipped,
    }
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Percentile bootstrap of the mean score, seeded so reports are reproducible.
pub fn bootstrap_ci(scores: &[f64], resamples: usize, seed: u64) -> Option<[f64; 2]> {
    if scores.is_empty() || resamples == 0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = scores.len();
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| scores[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * resamples as f64) as usize).min(resamples - 1)];
    Some([at(0.025), at(0.975)])
}

fn length_report(outcomes: &[Outcome], bins: usize) -> LengthReport {
    let mut sorted: Vec<(i64, f64)> = outcomes.iter().map(|o| (o.length_diff, o.score)).collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let n = sorted.len();
    let k = bins.min(n);
    let bins = (0..k)
        .map(|i| {
            let chunk = &sorted[i * n / k..(i + 1) * n / k];
            LengthBin {
                min_diff: chunk[0].0,
                max_diff: chunk[chunk.len() - 1].0,
                n: chunk.len(),
                win_rate: chunk.iter().map(|x| x.1).sum::<f64>() / chunk.len() as f64,
            }
        })
        .collect();
    let x: Vec<f64> = sorted.iter().map(|p| p.0 as f64).collect();
    let y: Vec<f64> = sorted.iter().map(|p| p.1).collect();
    let fit = logistic_fit(&x, &y);
    LengthReport {
        mean_diff: mean(&x),
        bins,
        length_controlled_win_rate: fit.map(|(b0, _)| sigmoid(b0)),
        slope_logit_per_100_chars: fit.map(|(_, b1)| b1 * 100.0),
    }
}

fn sigmoid(t: f64) -> f64 {
    1.0 / (1.0 + (-t).exp())
}

/// Logistic regression of y (0, ½ or 1) on x by Newton's method; returns (intercept, slope).
/// A light ridge keeps it finite when the data separate perfectly. None when x is constant.
pub fn logistic_fit(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let n = x.len() as f64;
    // Scaling (not centring) keeps the intercept at x = 0, the point we report.
    let scale = (x.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    let spread = x.iter().any(|&v| v != x[0]);
    if x.len() < 2 || !spread || !scale.is_finite() || scale == 0.0 {
        return None;
    }
    const RIDGE: f64 = 1e-2;
    let (mut b0, mut b1) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut g0, mut g1) = (-RIDGE * b0, -RIDGE * b1);
        let (mut h00, mut h01, mut h11) = (RIDGE, 0.0, RIDGE);
        for (&xi, &yi) in x.iter().zip(y) {
            let z = xi / scale;
            let p = sigmoid(b0 + b1 * z);
            let w = p * (1.0 - p);
            g0 += yi - p;
            g1 += (yi - p) * z;
            h00 += w;
            h01 += w * z;
            h11 += w * z * z;
        }
        let det = h00 * h11 - h01 * h01;
        if det <= 0.0 || !det.is_finite() {
            return None;
        }
        let d0 = ((h11 * g0 - h01 * g1) / det).clamp(-5.0, 5.0);
        let d1 = ((h00 * g1 - h01 * g0) / det).clamp(-5.0, 5.0);
        b0 += d0;
        b1 += d1;
        if d0.abs() + d1.abs() < 1e-10 {
            break;
        }
    }
    Some((b0, b1 / scale))
}

impl Report {
    /// The human-readable report.
    pub fn table(&self) -> String {
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "comparisons         {}  (valid {}, invalid {})",
            self.comparisons, self.valid, self.invalid
        );
        let _ = writeln!(
            s,
            "wins / losses / ties {} / {} / {}",
            self.wins, self.losses, self.ties
        );
        let ci = self.ci95.map_or(String::new(), |[lo, hi]| {
            format!(
                "  (95% CI {}–{}, bootstrap ×{})",
                pct(Some(lo)),
                pct(Some(hi)),
                self.bootstrap_resamples
            )
        });
        let _ = writeln!(s, "win rate            {}{ci}", pct(self.win_rate));
        for (name, split) in [("A", &self.policy_as_a), ("B", &self.policy_as_b)] {
            let _ = writeln!(
                s,
                "  policy shown as {name}  {}  (n {})",
                pct(split.win_rate),
                split.n
            );
        }
        let _ = writeln!(
            s,
            "judge chose A       {}  of decisive verdicts (50% = no position bias)",
            pct(self.judge_chose_a)
        );
        if !self.invalid_by_reason.is_empty() {
            let reasons: Vec<String> = self
                .invalid_by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = writeln!(s, "invalid by reason   {}", reasons.join(", "));
        }
        let l = &self.length;
        if let Some(m) = l.mean_diff {
            let _ = writeln!(
                s,
                "length difference   mean {m:+.0} chars (policy − baseline)"
            );
        }
        if let (Some(lc), Some(slope)) = (l.length_controlled_win_rate, l.slope_logit_per_100_chars)
        {
            let _ = writeln!(
                s,
                "length-controlled   {}  (logistic fit at equal length; {slope:+.3} logit per 100 chars)",
                pct(Some(lc))
            );
        }
        if !l.bins.is_empty() {
            let _ = writeln!(s, "  length diff range       n   win rate");
            for b in &l.bins {
                let range = format!("{:+} .. {:+}", b.min_diff, b.max_diff);
                let _ = writeln!(s, "  {range:<20} {:>5}   {}", b.n, pct(Some(b.win_rate)));
            }
        }
        for (skip, lines) in &self.reply_lines_skipped {
            let shown: Vec<String> = lines.iter().take(10).map(usize::to_string).collect();
            let more = if lines.len() > 10 { ", …" } else { "" };
            let _ = writeln!(
                s,
                "skipped reply lines {skip} {} (lines {}{more})",
                lines.len(),
                shown.join(", ")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::judge::fixtures::comparison;
    use crate::eval::verdict::read_replies;
    use crate::eval::write_jsonl;
    use serde_json::{json, Value};

    #[test]
    fn reply_file_shapes_and_bad_lines() {
        use Position::*;
        let comps: Vec<Comparison> = (0..12)
            .map(|i| comparison(&i.to_string(), if i % 2 == 0 { A } else { B }, "pp", "b"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replies.jsonl");
        let chat = |content: Value| json!({"choices": [{"message": {"role": "assistant", "content": content}}]});
        let mut lines = vec![
            json!({"id": "0", "reply": "Preferred: A"}), // policy A, judge A: win
            json!({"id": 1, "reply": "Preferred: A"}),   // policy B: loss
            {
                let mut v = chat(json!("Comparison: x\nPreferred: B"));
                v["id"] = json!("2"); // policy A, judge B: loss
                v
            },
            json!({"custom_id": "3", "response": {"status_code": 200, "body": chat(json!("Preferred: B"))}}), // win
            json!({"id": "4", "reply": "Preferred: tie"}),
            json!({"id": "5", "reply": null, "refusal": "no"}),
            {
                let mut v = chat(Value::Null);
                v["id"] = json!("6");
                v
            },
            json!({"id": "7", "error": {"message": "rate limited"}}),
            json!({"custom_id": "8", "response": null, "error": {"code": "x"}}),
            json!({"id": "9", "reply": "Preferred: A"}),
            json!({"id": "9", "reply": "Preferred: A"}),
            json!({"id": "10", "reply": 5}),
            json!({"reply": "Preferred: A"}),
            json!({"id": "999", "reply": "Preferred: A"}),
            json!(["not", "an", "object"]),
        ];
        lines.push(json!({"id": "11", "something": "else"}));
        write_jsonl(&path, &lines);
        std::fs::write(
            &path,
            std::fs::read_to_string(&path).unwrap() + "{\"id\": \"3\", \"reply\": trunc\n\n",
        )
        .unwrap();
        let replies = read_replies(&path, &comps).unwrap();
        let opts = ScoreOptions {
            bootstrap: 200,
            seed: 0,
            length_bins: 2,
        };
        let r = score(&comps, replies, &opts);
        assert_eq!(
            (r.wins, r.losses, r.ties, r.valid, r.invalid),
            (2, 2, 1, 5, 7)
        );
        let reasons: Vec<(String, usize)> = r
            .invalid_by_reason
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert_eq!(
            reasons,
            [
                ("duplicate_reply".to_string(), 1),
                ("no_content".to_string(), 2),
                ("judge_error".to_string(), 2),
                ("empty_reply".to_string(), 1),
                ("refusal".to_string(), 1),
            ]
        );
        assert_eq!(r.win_rate, Some(0.5));
        assert_eq!(r.reply_lines_skipped[&Skip::BadJson], [15, 17]);
        assert_eq!(r.reply_lines_skipped[&Skip::MissingId], [13]);
        assert_eq!(r.reply_lines_skipped[&Skip::UnknownId], [14]);
        assert_eq!(r.policy_as_a.n, 3);
        assert_eq!(r.judge_chose_a, Some(0.5));
        assert_eq!(r.length.mean_diff, Some(1.0));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["invalid_by_reason"]["judge_error"], 2);
        assert_eq!(json["reply_lines_skipped"]["unknown_id"], json!([14]));
        assert!(r
            .table()
            .contains("skipped reply lines bad_json 2 (lines 15, 17)"));
    }

    #[test]
    fn missing_replies_and_stale_prompt_hash() {
        let comps = vec![comparison("x", Position::A, "a", "b")];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        std::fs::write(&path, "").unwrap();
        let r = score(
            &comps,
            read_replies(&path, &comps).unwrap(),
            &ScoreOptions {
                bootstrap: 10,
                seed: 0,
                length_bins: 4,
            },
        );
        assert_eq!(r.invalid_by_reason[&Invalid::NoReply], 1);
        assert_eq!((r.win_rate, r.ci95), (None, None));
        assert!(r.table().contains("win rate            -"));
        write_jsonl(
            &path,
            &[json!({"id": "x", "reply": "Preferred: A", "prompt_hash": "0000"})],
        );
        let err = read_replies(&path, &comps).err().unwrap().to_string();
        assert!(
            err.contains("r.jsonl line 1") && err.contains("different judge prompt"),
            "{err}"
        );
        let missing = dir.path().join("nope.jsonl");
        let err = format!("{:#}", read_replies(&missing, &comps).err().unwrap());
        assert!(err.contains("nope.jsonl"), "{err}");
    }

    #[test]
    fn bootstrap_interval_covers_the_truth() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let (trials, n, p) = (200, 150, 0.62);
        let covered = (0..trials)
            .filter(|&t| {
                let scores: Vec<f64> = (0..n)
                    .map(|_| {
                        let u: f64 = rng.random();
                        // A few ties, as judges give them.
                        if u < 0.05 {
                            0.5
                        } else if rng.random::<f64>() < p {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let truth = 0.05 * 0.5 + 0.95 * p;
                let [lo, hi] = bootstrap_ci(&scores, 1000, t).unwrap();
                lo <= truth && truth <= hi
            })
            .count();
        // Nominal 95%: binomial(200, 0.95) lies in [180, 198] with overwhelming probability.
        assert!((180..=199).contains(&covered), "covered {covered}/{trials}");
        assert_eq!(bootstrap_ci(&[1.0; 10], 100, 0), Some([1.0, 1.0]));
        assert_eq!(bootstrap_ci(&[], 100, 0), None);
    }

    #[test]
    fn length_control_recovers_the_equal_length_win_rate() {
        // Judge likes length: logit = 0.4 + 1.5 * diff/100; policy responses run long.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let outcomes: Vec<Outcome> = (0..4000)
            .map(|_| {
                let diff = rng.random_range(-50..250i64);
                let p = sigmoid(0.4 + 1.5 * diff as f64 / 100.0);
                Outcome {
                    score: if rng.random::<f64>() < p { 1.0 } else { 0.0 },
                    position: Position::A,
                    length_diff: diff,
                }
            })
            .collect();
        let l = length_report(&outcomes, 4);
        let lc = l.length_controlled_win_rate.unwrap();
        assert!((lc - sigmoid(0.4)).abs() < 0.05, "lc {lc}");
        let slope = l.slope_logit_per_100_chars.unwrap();
        assert!((slope - 1.5).abs() < 0.25, "slope {slope}");
        assert_eq!(l.bins.len(), 4);
        assert_eq!(l.bins.iter().map(|b| b.n).sum::<usize>(), 4000);
        assert!(l.bins.windows(2).all(|w| w[0].max_diff <= w[1].min_diff));
        assert!(l.bins[0].win_rate < l.bins[3].win_rate);
        // Perfect separation stays finite; constant length difference gives no fit.
        let fit = logistic_fit(&[-10.0, -5.0, 5.0, 10.0], &[0.0, 0.0, 1.0, 1.0]).unwrap();
        assert!(fit.0.is_finite() && fit.1 > 0.0);
        assert_eq!(logistic_fit(&[3.0, 3.0], &[0.0, 1.0]), None);
        assert_eq!(logistic_fit(&[], &[]), None);
        assert!(length_report(&[], 4).bins.is_empty());
    }
}
