//! `eval --score`, first half: reads the judge's replies in any accepted shape and parses each
//! verdict from the prompt's answer line, never guessing: an unusable reply is invalid by reason.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

use super::judge::{id_text, prompt_hash, Comparison};
use super::read_lines;

/// What the judge said, in terms of the prompt's A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    A,
    B,
    Tie,
}

/// Why a comparison has no usable verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invalid {
    /// No line of the replies file carries this comparison's id.
    NoReply,
    /// Several lines carry this id; none is preferred over the others.
    DuplicateReply,
    /// The line has no `reply` string nor `choices[0].message.content`.
    NoContent,
    /// The line is an API error object.
    JudgeError,
    EmptyReply,
    Refusal,
    /// No line starts with the prompt's answer label.
    NoAnswerLine,
    /// The answer line names both A and B, or a tie and one of them.
    Ambiguous,
    /// The answer line names neither A, B nor a tie.
    Unrecognised,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let v = serde_json::to_value(self).map_err(|_| fmt::Error)?;
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// Reply-file lines that cannot be tied to any comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    BadJson,
    MissingId,
    UnknownId,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Skip::BadJson => "bad_json",
            Skip::MissingId => "missing_id",
            Skip::UnknownId => "unknown_id",
        })
    }
}

/// Words that pad an answer ("Preferred: Summary A") without changing it.
const FILLER: &[&str] = &[
    "response", "summary", "option", "answer", "choice", "output",
];
const TIE_WORDS: &[&str] = &["tie", "tied", "equal", "equally"];

/// The verdict on the LAST line that starts with `label` (case-insensitive, markdown and quotes
/// tolerated). An empty answer line takes the next non-empty line ("Preferred:\nA").
pub fn parse_verdict(reply: &str, label: &str) -> Result<Verdict, Invalid> {
    let text = reply.trim();
    if text.is_empty() {
        return Err(Invalid::EmptyReply);
    }
    let lines: Vec<&str> = text.lines().collect();
    let answer = lines.iter().enumerate().rev().find_map(|(i, line)| {
        let line = line.trim_start_matches(|c: char| c.is_whitespace() || "*_#>-`".contains(c));
        let head = line.get(..label.len())?;
        let rest = &line[label.len()..];
        let whole_word = !rest.starts_with(|c: char| c.is_alphanumeric());
        (head.eq_ignore_ascii_case(label) && whole_word).then_some((i, rest))
    });
    let Some((i, rest)) = answer else {
        return Err(if looks_like_refusal(text) {
            Invalid::Refusal
        } else {
            Invalid::NoAnswerLine
        });
    };
    let mut tokens = words(rest);
    if tokens.is_empty() {
        if let Some(next) = lines[i + 1..].iter().find(|l| !words(l).is_empty()) {
            tokens = words(next);
        }
    }
    classify(&tokens)
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn classify(tokens: &[String]) -> Result<Verdict, Invalid> {
    let start = tokens
        .iter()
        .position(|t| !FILLER.contains(&t.as_str()))
        .unwrap_or(tokens.len());
    let tokens = &tokens[start..];
    let has = |w: &str| tokens.iter().any(|t| t == w);
    let (a, b) = (has("a"), has("b"));
    if TIE_WORDS.iter().any(|w| has(w)) {
        return if a != b {
            Err(Invalid::Ambiguous)
        } else {
            Ok(Verdict::Tie)
        };
    }
    match tokens.first().map(String::as_str) {
        _ if a && b => Err(Invalid::Ambiguous),
        Some("a") => Ok(Verdict::A),
        Some("b") => Ok(Verdict::B),
        _ => Err(Invalid::Unrecognised),
    }
}

fn looks_like_refusal(text: &str) -> bool {
    let head: String = text.chars().take(200).collect::<String>().to_lowercase();
    [
        "i'm sorry",
        "i am sorry",
        "i cannot",
        "i can't",
        "i can not",
        "as an ai",
    ]
    .iter()
    .any(|p| head.contains(p))
}

/// The reply text of one replies-file line, in any of the accepted shapes.
fn reply_text(v: &Value) -> Result<String, Invalid> {
    if let Some(reply) = v.get("reply") {
        return match reply {
            Value::String(s) => Ok(s.clone()),
            Value::Null if v.get("refusal").is_some_and(Value::is_string) => Err(Invalid::Refusal),
            Value::Null => Err(Invalid::EmptyReply),
            _ => Err(Invalid::NoContent),
        };
    }
    // OpenAI Batch API output nests the completion under `response.body`.
    let body = v.pointer("/response/body").unwrap_or(v);
    let Some(message) = body.pointer("/choices/0/message") else {
        let error = |x: &Value| x.get("error").is_some_and(|e| !e.is_null());
        return Err(if error(v) || error(body) {
            Invalid::JudgeError
        } else {
            Invalid::NoContent
        });
    };
    match message.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ if message.get("refusal").is_some_and(Value::is_string) => Err(Invalid::Refusal),
        Some(Value::Null) | None => Err(Invalid::EmptyReply),
        Some(_) => Err(Invalid::NoContent),
    }
}

/// The judge's replies keyed by comparison id, plus the lines that fit no comparison.
pub struct Replies {
    pub by_id: HashMap<String, Vec<Result<String, Invalid>>>,
    pub skipped: BTreeMap<Skip, Vec<usize>>,
}

/// Reads replies in any accepted shape: `{"id", "reply"}` (this tool's client writes these), a
/// chat-completion object with our `id`, or a Batch API line with `custom_id`.
pub fn read_replies(path: &Path, comparisons: &[Comparison]) -> Result<Replies> {
    let known: HashMap<&str, &Comparison> =
        comparisons.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut by_id: HashMap<String, Vec<Result<String, Invalid>>> = HashMap::new();
    let mut skipped: BTreeMap<Skip, Vec<usize>> = BTreeMap::new();
    for (line, text) in read_lines(path)? {
        let value = match serde_json::from_str::<Value>(&text) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                skipped.entry(Skip::BadJson).or_default().push(line);
                continue;
            }
        };
        let Some(id) = value
            .get("custom_id")
            .or_else(|| value.get("id"))
            .and_then(id_text)
        else {
            skipped.entry(Skip::MissingId).or_default().push(line);
            continue;
        };
        let Some(comparison) = known.get(id.as_str()) else {
            skipped.entry(Skip::UnknownId).or_default().push(line);
            continue;
        };
        if let Some(hash) = value.get("prompt_hash").and_then(Value::as_str) {
            if hash != prompt_hash(&comparison.judge_prompt) {
                bail!(
                    "{} line {line}: the reply for id `{id}` was made for a different judge \
                     prompt (the comparisons file was rebuilt since, e.g. with another --seed); \
                     judge again into a fresh --replies file",
                    path.display()
                );
            }
        }
        by_id.entry(id).or_default().push(reply_text(&value));
    }
    Ok(Replies { by_id, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reply: &str, expect: Result<Verdict, Invalid>) {
        assert_eq!(
            parse_verdict(reply, "Preferred"),
            expect,
            "reply: {reply:?}"
        );
    }

    #[test]
    fn verdicts_parse_from_tolerant_answer_lines() {
        use Verdict::*;
        for (reply, v) in [
            ("Comparison: A is tighter.\nPreferred: A", A),
            ("Comparison: B is tighter.\nPreferred: B", B),
            ("preferred: b", B),
            ("PREFERRED:A", A),
            ("Preferred: A.", A),
            ("Preferred: \"B\"", B),
            ("Preferred: 'A'", A),
            ("**Preferred:** B", B),
            ("**Preferred: A**", A),
            ("  - Preferred: `B`", B),
            ("### Preferred: A", A),
            ("Preferred: Summary B", B),
            ("Preferred response: A", A),
            ("Preferred: A (it keeps the key points)", A),
            ("Preferred:\n\nB", B),
            ("Preferred: A\nOn reflection:\nPreferred: B", B),
            ("Comparison: Preferred: B would be wrong\nPreferred: A", A),
            ("Comparison: close.\nPreferred: Tie", Tie),
            ("Preferred: equal", Tie),
            ("Preferred: both are equally good", Tie),
            ("Comparison: x\r\nPreferred: B\r\n", B),
        ] {
            check(reply, Ok(v));
        }
        assert_eq!(parse_verdict("More helpful: **A**", "More helpful"), Ok(A));
        assert_eq!(parse_verdict("more HELPFUL: b", "More helpful"), Ok(B));
    }

    #[test]
    fn malformed_replies_are_invalid_never_guessed() {
        use Invalid::*;
        for (reply, reason) in [
            ("", EmptyReply),
            ("   \n\t ", EmptyReply),
            ("A", NoAnswerLine),
            ("Comparison: A is better.", NoAnswerLine),
            ("Comparison: I prefer A. Preferred: A", NoAnswerLine),
            ("Preferredness: A", NoAnswerLine),
            ("{\"preferred\": \"A\"}", NoAnswerLine),
            ("I'm sorry, but I can't compare these.", Refusal),
            ("I cannot help with that request.", Refusal),
            ("Preferred: A or B", Ambiguous),
            ("Preferred: <\"A\" or \"B\">", Ambiguous),
            ("Preferred: A, B", Ambiguous),
            ("Preferred: B, because A rambles", Ambiguous),
            ("Preferred: tie, leaning A", Ambiguous),
            ("Preferred: C", Unrecognised),
            ("Preferred: neither", Unrecognised),
            ("Preferred:", Unrecognised),
            ("Preferred: I prefer A", Unrecognised),
            ("Preferred: ??", Unrecognised),
            ("Preferred: A\nPreferred: maybe", Unrecognised),
            ("Préférée: A", NoAnswerLine),
        ] {
            check(reply, Err(reason));
        }
    }
}
