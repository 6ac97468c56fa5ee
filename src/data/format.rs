//! Record formats: how one JSON record becomes a [`PreferencePair`], following the rules TRL
//! and the original DPO code use for each dataset family, so the same file gives the same
//! prompt/response split here as in Python.

use super::chat::ChatTemplate;
use super::source::{Origin, RowError};
use super::PreferencePair;
use crate::config::DataFormat;
use anyhow::{bail, Result};
use serde_json::Value;

/// The separator of Anthropic HH dialogues; the prompt ends with its last occurrence.
const HH_ASSISTANT: &str = "\n\nAssistant:";

/// The format a record's fields imply (what `data.format = "auto"` uses): message lists →
/// conversational; TL;DR fields → tldr; a `prompt` string → explicit; HH dialogue markers → hh;
/// otherwise implicit.
pub fn detect(record: &Value) -> DataFormat {
    let chosen = record.get("chosen");
    if chosen.is_some_and(Value::is_array) {
        DataFormat::Conversational
    } else if record.get("post").is_some()
        || record.get("info").is_some_and(|i| i.get("post").is_some())
    {
        DataFormat::Tldr
    } else if record.get("prompt").is_some() {
        DataFormat::Explicit
    } else if chosen
        .and_then(Value::as_str)
        .is_some_and(|c| c.contains(HH_ASSISTANT))
    {
        DataFormat::Hh
    } else {
        DataFormat::Implicit
    }
}

/// Turns records into pairs; holds the chat template for conversational records.
pub struct Converter {
    pub format: DataFormat,
    pub chat: Option<ChatTemplate>,
}

/// A row problem (`Ok(Err)`) or a fatal configuration problem (`Err`), e.g. no chat template.
pub type Converted = Result<std::result::Result<PreferencePair, RowError>>;

impl Converter {
    pub fn convert(&self, origin: &Origin, record: &Value) -> Converted {
        let bad = |reason: &'static str, detail: String| {
            Ok(Err(RowError {
                origin: origin.clone(),
                reason,
                detail,
            }))
        };
        if !record.is_object() {
            return bad(
                "not_an_object",
                format!("expected a JSON object, got {}", kind(record)),
            );
        }
        let format = match self.format {
            DataFormat::Auto => detect(record),
            f => f,
        };
        let pair = match format {
            DataFormat::Auto => unreachable!("detect never returns Auto"),
            DataFormat::Explicit => {
                let (p, c, r) = (
                    text(record, "prompt"),
                    text(record, "chosen"),
                    text(record, "rejected"),
                );
                match (p, c, r) {
                    (Ok(p), Ok(c), Ok(r)) => PreferencePair {
                        prompt: p.into(),
                        chosen: c.into(),
                        rejected: r.into(),
                        append_eos: true,
                    },
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return bad(e.0, e.1),
                }
            }
            DataFormat::Implicit => match (text(record, "chosen"), text(record, "rejected")) {
                (Ok(c), Ok(r)) => implicit(c, r),
                (Err(e), _) | (_, Err(e)) => return bad(e.0, e.1),
            },
            DataFormat::Hh => match (text(record, "chosen"), text(record, "rejected")) {
                (Ok(c), Ok(r)) => match hh(c, r) {
                    Ok(p) => p,
                    Err((reason, detail)) => return bad(reason, detail),
                },
                (Err(e), _) | (_, Err(e)) => return bad(e.0, e.1),
            },
            DataFormat::Tldr => match tldr(record) {
                Ok(p) => p,
                Err((reason, detail)) => return bad(reason, detail),
            },
            DataFormat::Conversational => {
                let Some(chat) = &self.chat else {
                    if self.format == DataFormat::Auto {
                        return bad(
                            "no_chat_template",
                            "message lists, but no chat template (set data.chat_template)".into(),
                        );
                    }
                    bail!(
                        "{origin}: conversational record (message lists) but no chat template: the tokenizer's \
                         tokenizer_config.json has no `chat_template`; set data.chat_template to a template file"
                    );
                };
                match chat.pair(record) {
                    Ok(p) => p,
                    Err((reason, detail)) => return bad(reason, detail),
                }
            }
        };
        if pair.chosen.trim().is_empty() || pair.rejected.trim().is_empty() {
            let side = if pair.chosen.trim().is_empty() {
                "chosen"
            } else {
                "rejected"
            };
            return bad("empty_response", format!("the {side} response is empty"));
        }
        if pair.chosen == pair.rejected {
            return bad(
                "chosen_equals_rejected",
                "chosen and rejected are the same text".into(),
            );
        }
        Ok(Ok(pair))
    }
}

pub(crate) type FieldError = (&'static str, String);

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A required string field.
pub(crate) fn text<'a>(record: &'a Value, field: &str) -> std::result::Result<&'a str, FieldError> {
    match record.get(field) {
        None => Err((
            "missing_field",
            format!("missing field `{field}` (expected a string)"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err((
            "not_a_string",
            format!("field `{field}`: expected a string, got {}", kind(other)),
        )),
    }
}

/// TRL's `extract_prompt`: the longest common prefix, minus a trailing space that then starts
/// both responses.
pub fn implicit(chosen: &str, rejected: &str) -> PreferencePair {
    let mut idx = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| chosen.len().min(rejected.len()));
    if idx > 0 && chosen.as_bytes()[idx - 1] == b' ' {
        idx -= 1;
    }
    PreferencePair {
        prompt: chosen[..idx].into(),
        chosen: chosen[idx..].into(),
        rejected: rejected[idx..].into(),
        append_eos: true,
    }
}

/// The DPO reference's `extract_anthropic_prompt`: the chosen dialogue up to and including its
/// last `\n\nAssistant:`; the rejected dialogue must share that prompt.
pub fn hh(chosen: &str, rejected: &str) -> std::result::Result<PreferencePair, FieldError> {
    let Some(at) = chosen.rfind(HH_ASSISTANT) else {
        return Err((
            "no_assistant_turn",
            format!("field `chosen`: no `{}` turn", HH_ASSISTANT.escape_debug()),
        ));
    };
    let prompt = &chosen[..at + HH_ASSISTANT.len()];
    let Some(rejected) = rejected.strip_prefix(prompt) else {
        return Err((
            "prompts_differ",
            "field `rejected`: does not continue the chosen dialogue's prompt".into(),
        ));
    };
    Ok(PreferencePair {
        prompt: prompt.into(),
        chosen: chosen[prompt.len()..].into(),
        rejected: rejected.into(),
        append_eos: true,
    })
}

/// TRL's TL;DR prompt, `SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:`,
/// from top-level fields or OpenAI's `info`; a missing subreddit or title drops its line, and a
/// plain `prompt` stands for the post. Responses: `chosen`/`rejected`, or OpenAI's
/// `summaries[choice]` vs the other; each starts with a space, as in TRL's conversion.
pub fn tldr(record: &Value) -> std::result::Result<PreferencePair, FieldError> {
    let info = record
        .get("info")
        .filter(|i| i.is_object())
        .unwrap_or(record);
    let optional = |field: &str| -> std::result::Result<Option<&str>, FieldError> {
        match info.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => text(info, field).map(Some),
        }
    };
    let post = match optional("post")? {
        Some(p) => p,
        None => text(record, "prompt").map_err(|_| {
            (
                "missing_field",
                "missing field `post` (expected a string)".into(),
            )
        })?,
    };
    let mut prompt = String::new();
    if let Some(s) = optional("subreddit")? {
        prompt.push_str(&format!("SUBREDDIT: r/{s}\n\n"));
    }
    if let Some(t) = optional("title")? {
        prompt.push_str(&format!("TITLE: {t}\n\n"));
    }
    prompt.push_str(&format!("POST: {post}\n\nTL;DR:"));
    let (chosen, rejected) = match record.get("summaries") {
        Some(summaries) => {
            let choice = record
                .get("choice")
                .and_then(Value::as_u64)
                .filter(|c| *c <= 1)
                .ok_or((
                    "missing_field",
                    "field `choice`: expected 0 or 1 beside `summaries`".to_string(),
                ))? as usize;
            let summary = |i: usize| -> std::result::Result<&str, FieldError> {
                summaries
                    .get(i)
                    .and_then(|s| s.get("text"))
                    .and_then(Value::as_str)
                    .ok_or((
                        "missing_field",
                        format!("field `summaries[{i}].text`: expected a string"),
                    ))
            };
            (summary(choice)?, summary(1 - choice)?)
        }
        None => (text(record, "chosen")?, text(record, "rejected")?),
    };
    let spaced = |s: &str| {
        if s.starts_with(char::is_whitespace) {
            s.to_string()
        } else {
            format!(" {s}")
        }
    };
    Ok(PreferencePair {
        prompt,
        chosen: spaced(chosen),
        rejected: spaced(rejected),
        append_eos: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn implicit_prompt_is_the_common_prefix_minus_a_space() {
        let p = implicit("The sky is blue.", "The sky is green.");
        assert_eq!(
            (p.prompt.as_str(), p.chosen.as_str(), p.rejected.as_str()),
            ("The sky is", " blue.", " green.")
        );
        let p = implicit("héllo wörld", "héllo wärld");
        assert_eq!(p.prompt, "héllo w");
    }

    #[test]
    fn hh_prompt_ends_with_the_last_assistant_turn() {
        let c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4";
        let r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5";
        let p = hh(c, r).unwrap();
        assert!(p.prompt.ends_with("2+2?\n\nAssistant:"));
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), (" 4", " 5"));
        assert_eq!(hh("no turns", r).unwrap_err().0, "no_assistant_turn");
        assert_eq!(
            hh(c, "\n\nHuman: other\n\nAssistant: 5").unwrap_err().0,
            "prompts_differ"
        );
    }

    #[test]
    fn tldr_prompt_matches_trl() {
        let rec = json!({"info": {"subreddit": "AskReddit", "title": "T", "post": "P"},
                         "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1});
        let p = tldr(&rec).unwrap();
        assert_eq!(
            p.prompt,
            "SUBREDDIT: r/AskReddit\n\nTITLE: T\n\nPOST: P\n\nTL;DR:"
        );
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), (" b", " a"));
        assert_eq!(detect(&rec), DataFormat::Tldr);
    }

    #[test]
    fn detection_and_row_errors() {
        let conv = Converter {
            format: DataFormat::Auto,
            chat: None,
        };
        let o = Origin {
            file: "f.jsonl".into(),
            line: 3,
        };
        let e = conv
            .convert(&o, &json!({"prompt": "p", "chosen": 1, "rejected": "r"}))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.reason, "not_a_string");
        assert!(
            e.to_string()
                .starts_with("f.jsonl:3: field `chosen`: expected a string, got a number"),
            "{e}"
        );
        let e = conv
            .convert(&o, &json!({"prompt": "p", "rejected": "r"}))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.reason, "missing_field");
        let e = conv
            .convert(&o, &json!({"prompt": "p", "chosen": " ", "rejected": "r"}))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.reason, "empty_response");
        let e = conv
            .convert(&o, &json!({"chosen": "same", "rejected": "same"}))
            .unwrap()
            .unwrap_err();
        assert_eq!(
            e.reason, "empty_response",
            "an implicit prompt of the whole text leaves nothing"
        );
        let e = conv
            .convert(&o, &json!({"chosen": [], "rejected": []}))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.reason, "no_chat_template");
        let conv = Converter {
            format: DataFormat::Conversational,
            chat: None,
        };
        let fatal = conv
            .convert(&o, &json!({"chosen": [], "rejected": []}))
            .unwrap_err()
            .to_string();
        assert!(
            fatal.contains("f.jsonl:3") && fatal.contains("chat_template"),
            "{fatal}"
        );
    }
}
