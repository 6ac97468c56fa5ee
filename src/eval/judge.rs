//! `eval --judge`: loading and pairing generation files, the seeded A/B order, and the
//! comparisons file (one JSON line per comparison) that the client sends and the scorer reads
//! back.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::read_lines;
use super::templates::Template;

/// Which slot of the judge prompt holds the policy's response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Position {
    A,
    B,
}

/// The policy's slot for the comparison built from policy record `index`: one ChaCha stream per
/// index, so a line's order depends only on `seed` and its own index, never on other lines.
pub fn policy_position(seed: u64, index: u64) -> Position {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    if rng.random::<bool>() {
        Position::A
    } else {
        Position::B
    }
}

/// One record of a generations (or preference data) file.
#[derive(Debug, Clone)]
pub struct Generation {
    pub line: usize,
    pub id: Option<String>,
    pub prompt: String,
    pub completion: String,
}

/// Ids may be strings or integers; both are compared as their JSON text.
pub(crate) fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads JSONL with a string `prompt`, a string `completion_field` and an optional `id`.
pub fn load_generations(path: &Path, completion_field: &str) -> Result<Vec<Generation>> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, text) in read_lines(path)? {
        let at = || format!("{} line {line}", path.display());
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", at()))?;
        let field = |name: &str| -> Result<String> {
            match value.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => bail!("{}: field `{name}` must be a string", at()),
                None => bail!(
                    "{}: expected an object with string fields `prompt` and `{completion_field}`",
                    at()
                ),
            }
        };
        let id = match value.get("id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                id_text(v)
                    .with_context(|| format!("{}: `id` must be a string or an integer", at()))?,
            ),
        };
        if let Some(id) = &id {
            if let Some(first) = seen.insert(id.clone(), line) {
                bail!("{}: id `{id}` already used on line {first}", at());
            }
        }
        out.push(Generation {
            line,
            id,
            prompt: field("prompt")?,
            completion: field(completion_field)?,
        });
    }
    Ok(out)
}

/// How policy and baseline records are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MatchBy {
    /// By `id` when every record on both sides has one (never for --baseline-data), else by
    /// prompt text.
    Auto,
    /// By `id`.
    Id,
    /// By prompt text (trimmed, exact); the first baseline record with a prompt wins.
    Prompt,
    /// By position: record i of the policy with record i of the baseline.
    Order,
}

/// Policy/baseline index pairs, plus the policy records that found no partner.
#[derive(Debug)]
pub struct Pairing {
    pub method: MatchBy,
    pub pairs: Vec<(usize, usize)>,
    pub unmatched: Vec<usize>,
}

pub fn pair(
    policy: &[Generation],
    baseline: &[Generation],
    how: MatchBy,
    ids_allowed: bool,
) -> Result<Pairing> {
    let method = match how {
        MatchBy::Auto
            if ids_allowed
                && policy.iter().chain(baseline).all(|g| g.id.is_some())
                && !baseline.is_empty() =>
        {
            MatchBy::Id
        }
        MatchBy::Auto => MatchBy::Prompt,
        other => other,
    };
    let mut pairs = Vec::new();
    let mut unmatched = Vec::new();
    match method {
        MatchBy::Order => {
            if policy.len() != baseline.len() {
                bail!(
                    "--match order needs as many baseline records as policy records ({} vs {})",
                    baseline.len(),
                    policy.len()
                );
            }
            pairs.extend((0..policy.len()).map(|i| (i, i)));
        }
        MatchBy::Id => {
            let index: HashMap<&str, usize> = baseline
                .iter()
                .enumerate()
                .filter_map(|(i, g)| g.id.as_deref().map(|id| (id, i)))
                .collect();
            for (i, g) in policy.iter().enumerate() {
                let id = g.id.as_deref().with_context(|| {
                    format!("--match id: policy record on line {} has no `id`", g.line)
                })?;
                match index.get(id) {
                    Some(&j) => pairs.push((i, j)),
                    None => unmatched.push(i),
                }
            }
        }
        _ => {
            let mut index: HashMap<&str, usize> = HashMap::new();
            for (i, g) in baseline.iter().enumerate() {
                index.entry(g.prompt.trim()).or_insert(i);
            }
            for (i, g) in policy.iter().enumerate() {
                match index.get(g.prompt.trim()) {
                    Some(&j) => pairs.push((i, j)),
                    None => unmatched.push(i),
                }
            }
        }
    }
    Ok(Pairing {
        method,
        pairs,
        unmatched,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// An OpenAI chat-completions request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: f64,
    pub max_tokens: u32,
}

/// One line of the comparisons file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    pub id: String,
    pub task: String,
    pub prompt: String,
    pub policy: String,
    pub baseline: String,
    pub policy_position: Position,
    pub answer_label: String,
    pub judge_prompt: String,
    pub request: ChatRequest,
}

/// Settings of a `--judge` run that go into every line.
pub struct JudgeSettings<'a> {
    pub template: &'a Template,
    pub seed: u64,
    pub model: &'a str,
    pub max_tokens: u32,
}

/// Comparison ids are the policy's ids when it has them, else its 0-based record index.
pub fn build_comparisons(
    policy: &[Generation],
    baseline: &[Generation],
    pairing: &Pairing,
    settings: &JudgeSettings,
) -> Vec<Comparison> {
    pairing
        .pairs
        .iter()
        .map(|&(i, j)| {
            let (p, b) = (&policy[i], &baseline[j]);
            let position = policy_position(settings.seed, i as u64);
            let (a, bb) = match position {
                Position::A => (&p.completion, &b.completion),
                Position::B => (&b.completion, &p.completion),
            };
            let judge_prompt = settings.template.render(&p.prompt, a, bb);
            Comparison {
                id: p.id.clone().unwrap_or_else(|| i.to_string()),
                task: settings.template.task.clone(),
                prompt: p.prompt.clone(),
                policy: p.completion.clone(),
                baseline: b.completion.clone(),
                policy_position: position,
                answer_label: settings.template.answer_label.clone(),
                request: ChatRequest {
                    model: settings.model.to_string(),
                    messages: vec![Message {
                        role: "user".into(),
                        content: judge_prompt.clone(),
                    }],
                    temperature: 0.0,
                    max_tokens: settings.max_tokens,
                },
                judge_prompt,
            }
        })
        .collect()
}

pub fn write_comparisons(path: &Path, comparisons: &[Comparison]) -> Result<()> {
    let mut out = String::new();
    for c in comparisons {
        out.push_str(&serde_json::to_string(c)?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

pub fn read_comparisons(path: &Path) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, text) in read_lines(path)? {
        let c: Comparison = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} line {line}: expected a comparison written by `dpo-sam eval --judge`",
                path.display()
            )
        })?;
        if let Some(first) = seen.insert(c.id.clone(), line) {
            bail!(
                "{} line {line}: id `{}` already used on line {first}",
                path.display(),
                c.id
            );
        }
        out.push(c);
    }
    Ok(out)
}

/// 64-bit FNV-1a of a judge prompt: stored with each reply so replies from a different
/// comparisons file (another seed flips A and B) are caught instead of silently mis-scored.
pub fn prompt_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Where the baseline's responses come from.
pub enum Baseline {
    /// Another generations file (`completion`).
    Generations(PathBuf),
    /// A preference data file (`chosen`).
    Chosen(PathBuf),
}

/// Builds and writes the comparisons file; returns a summary for stderr.
pub fn run(
    policy_path: &Path,
    baseline: &Baseline,
    how: MatchBy,
    settings: &JudgeSettings,
    out: &Path,
) -> Result<String> {
    let policy = load_generations(policy_path, "completion")?;
    let (base_path, base, ids_allowed) = match baseline {
        Baseline::Generations(p) => (p, load_generations(p, "completion")?, true),
        Baseline::Chosen(p) => (p, load_generations(p, "chosen")?, false),
    };
    let pairing = pair(&policy, &base, how, ids_allowed)?;
    if pairing.pairs.is_empty() {
        bail!(
            "no policy record of {} found a partner in {} (matched by {}); check --match",
            policy_path.display(),
            base_path.display(),
            format!("{:?}", pairing.method).to_lowercase()
        );
    }
    let comparisons = build_comparisons(&policy, &base, &pairing, settings);
    write_comparisons(out, &comparisons)?;
    let at_a = comparisons
        .iter()
        .filter(|c| c.policy_position == Position::A)
        .count();
    let mut summary = format!(
        "wrote {} comparisons to {} (task {}, matched by {}, policy shown as A in {at_a})",
        comparisons.len(),
        out.display(),
        settings.template.task,
        format!("{:?}", pairing.method).to_lowercase(),
    );
    if !pairing.unmatched.is_empty() {
        let _ = write!(
            summary,
            "\nwarning: {} policy records have no baseline in {} and were left out:",
            pairing.unmatched.len(),
            base_path.display()
        );
        for &i in pairing.unmatched.iter().take(5) {
            let g = &policy[i];
            let shown: String = g.prompt.trim().chars().take(60).collect();
            let _ = write!(
                summary,
                "\n  {} line {}: {shown:?}",
                policy_path.display(),
                g.line
            );
        }
        if pairing.unmatched.len() > 5 {
            let _ = write!(summary, "\n  … and {} more", pairing.unmatched.len() - 5);
        }
    }
    Ok(summary)
}

/// Test fixtures for the client and stats unit tests, in one place so a new `Comparison` field
/// is filled in once.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{ChatRequest, Comparison, Message, Position};

    /// A comparison whose judge prompt (and request message) is `judge {id}`.
    pub(crate) fn comparison(
        id: &str,
        position: Position,
        policy: &str,
        baseline: &str,
    ) -> Comparison {
        Comparison {
            id: id.into(),
            task: "tldr".into(),
            prompt: "p".into(),
            policy: policy.into(),
            baseline: baseline.into(),
            policy_position: position,
            answer_label: "Preferred".into(),
            judge_prompt: format!("judge {id}"),
            request: ChatRequest {
                model: "m".into(),
                messages: vec![Message {
                    role: "user".into(),
                    content: format!("judge {id}"),
                }],
                temperature: 0.0,
                max_tokens: 8,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::write_jsonl;
    use serde_json::json;

    fn gens(prefix: &str, n: usize) -> Vec<Generation> {
        (0..n)
            .map(|i| Generation {
                line: i + 1,
                id: None,
                prompt: format!("prompt {i}"),
                completion: format!("{prefix} {i}"),
            })
            .collect()
    }

    #[test]
    fn order_randomisation_is_balanced_and_independent() {
        let n = 20_000u64;
        let a = (0..n)
            .filter(|&i| policy_position(0, i) == Position::A)
            .count() as f64;
        // 4 standard deviations of a fair coin.
        assert!(
            (a - n as f64 / 2.0).abs() < 4.0 * (n as f64 / 4.0).sqrt(),
            "{a}"
        );
        // Consecutive lines agree about half the time: no alternating or sticky pattern.
        let same = (1..n)
            .filter(|&i| policy_position(0, i) == policy_position(0, i - 1))
            .count() as f64;
        assert!(
            (same - n as f64 / 2.0).abs() < 4.0 * (n as f64 / 4.0).sqrt(),
            "{same}"
        );
        // Different seeds give different orders.
        let differ = (0..200)
            .filter(|&i| policy_position(0, i) != policy_position(1, i))
            .count();
        assert!((60..140).contains(&differ), "{differ}");
    }

    #[test]
    fn comparisons_file_is_byte_stable_for_a_seed() {
        let dir = tempfile::tempdir().unwrap();
        let (policy, baseline) = (gens("policy", 40), gens("sft", 40));
        let template = Template::load("tldr").unwrap();
        let settings = JudgeSettings {
            template: &template,
            seed: 7,
            model: "judge-model",
            max_tokens: 128,
        };
        let pairing = pair(&policy, &baseline, MatchBy::Auto, true).unwrap();
        let write = |name: &str, seed: u64| {
            let s = JudgeSettings { seed, ..settings };
            let p = dir.path().join(name);
            write_comparisons(&p, &build_comparisons(&policy, &baseline, &pairing, &s)).unwrap();
            std::fs::read(p).unwrap()
        };
        let first = write("a.jsonl", 7);
        assert_eq!(first, write("b.jsonl", 7));
        assert_ne!(first, write("c.jsonl", 8));
        // Dropping other lines does not change a line's order: each depends on its own index.
        let subset = Pairing {
            method: MatchBy::Prompt,
            pairs: vec![(5, 5)],
            unmatched: vec![],
        };
        let one = &build_comparisons(&policy, &baseline, &subset, &settings)[0];
        let all = build_comparisons(&policy, &baseline, &pairing, &settings);
        assert_eq!(one, &all[5]);
        // Golden values: if these change, the same seed no longer reproduces old comparison files.
        let text = String::from_utf8(first).unwrap();
        let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "answer_label",
                "baseline",
                "id",
                "judge_prompt",
                "policy",
                "policy_position",
                "prompt",
                "request",
                "task"
            ]
        );
        assert!(text.starts_with(r#"{"id":"0","task":"tldr","prompt":"prompt 0","policy":"policy 0","baseline":"sft 0","policy_position":""#));
        assert_eq!(
            line["request"]["messages"][0]["content"],
            line["judge_prompt"]
        );
        assert_eq!(line["request"]["model"], "judge-model");
        assert_eq!(line["request"]["temperature"], 0.0);
        let positions: String = all
            .iter()
            .take(16)
            .map(|c| match c.policy_position {
                Position::A => 'A',
                Position::B => 'B',
            })
            .collect();
        assert_eq!(positions, "BAAAAAABBAABBBBA");
        assert_eq!(prompt_hash(""), "cbf29ce484222325");
    }

    #[test]
    fn pairing_by_id_prompt_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let pol = dir.path().join("pol.jsonl");
        let base = dir.path().join("base.jsonl");
        write_jsonl(
            &pol,
            &[
                json!({"id": 1, "prompt": "x", "completion": "p1"}),
                json!({"id": "2", "prompt": "y", "completion": "p2"}),
                json!({"id": 3, "prompt": "z", "completion": "p3"}),
            ],
        );
        write_jsonl(
            &base,
            &[
                json!({"id": "2", "prompt": "x", "completion": "b2"}),
                json!({"id": "1", "prompt": "y", "completion": "b1"}),
            ],
        );
        let p = load_generations(&pol, "completion").unwrap();
        let b = load_generations(&base, "completion").unwrap();
        let by_id = pair(&p, &b, MatchBy::Auto, true).unwrap();
        assert_eq!(by_id.method, MatchBy::Id);
        assert_eq!(by_id.pairs, [(0, 1), (1, 0)]);
        assert_eq!(by_id.unmatched, [2]);
        let by_prompt = pair(&p, &b, MatchBy::Auto, false).unwrap();
        assert_eq!(by_prompt.method, MatchBy::Prompt);
        assert_eq!(by_prompt.pairs, [(0, 0), (1, 1)]);
        let err = pair(&p, &b, MatchBy::Order, true).unwrap_err().to_string();
        assert!(err.contains("3") && err.contains("2"), "{err}");
    }

    #[test]
    fn bad_generation_files_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.jsonl");
        for (content, expect) in [
            ("{\"prompt\": \"p\", \"completion\": \"c\"}\nnot json\n", "g.jsonl line 2: not valid JSON"),
            ("\n{\"prompt\": \"p\"}\n", "g.jsonl line 2: expected an object with string fields `prompt` and `completion`"),
            ("{\"prompt\": 3, \"completion\": \"c\"}\n", "line 1: field `prompt` must be a string"),
            ("{\"id\": [1], \"prompt\": \"p\", \"completion\": \"c\"}\n", "line 1: `id` must be"),
            ("{\"id\": 1, \"prompt\": \"p\", \"completion\": \"c\"}\n{\"id\": \"1\", \"prompt\": \"q\", \"completion\": \"c\"}\n", "line 2: id `1` already used on line 1"),
        ] {
            std::fs::write(&f, content).unwrap();
            let err = format!("{:#}", load_generations(&f, "completion").unwrap_err());
            assert!(err.contains(expect), "{err}");
        }
    }
}
