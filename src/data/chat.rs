//! Conversational records: message lists rendered with the tokenizer's `chat_template`
//! (from `tokenizer_config.json`, or a template file given in `data.chat_template`) through
//! minijinja, the way TRL's `apply_chat_template` does: the prompt is rendered with the
//! generation prompt, each response is the rest of rendering prompt + that response.

use super::format::{kind, FieldError};
use super::PreferencePair;
use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, ErrorKind};
use serde_json::Value;
use std::path::Path;

/// A compiled chat template and the special tokens its variables name.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Drop a rendered leading BOS: the tokenizer adds its own, and two would change the prompt.
    pub strip_bos: bool,
}

impl ChatTemplate {
    /// Reads a template: a `tokenizer_config.json` (its `chat_template`) or a plain Jinja file.
    /// `Ok(None)` when a tokenizer_config.json simply has no template.
    pub fn load(path: &Path) -> Result<Option<ChatTemplate>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read chat template {}", path.display()))?;
        if path.extension().is_none_or(|e| e != "json") {
            return ChatTemplate::new(&text, "", "")
                .map(Some)
                .with_context(|| path.display().to_string());
        }
        let cfg: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        let token = |key: &str| -> String {
            let v = cfg.get(key);
            v.and_then(|v| {
                v.as_str()
                    .or_else(|| v.get("content").and_then(Value::as_str))
            })
            .unwrap_or("")
            .to_string()
        };
        let template = match cfg.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            // Several named templates: the one called `default`, as transformers picks.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .ok_or_else(|| {
                    anyhow!(
                        "{}: `chat_template` is a list without a `default` entry",
                        path.display()
                    )
                })?
                .to_string(),
            Some(other) => bail!(
                "{}: `chat_template`: expected a string, got {}",
                path.display(),
                kind(other)
            ),
        };
        ChatTemplate::new(&template, &token("bos_token"), &token("eos_token"))
            .map(Some)
            .with_context(|| format!("{}: chat_template", path.display()))
    }

    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // transformers compiles chat templates with these two whitespace rules.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| anyhow!("invalid template: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            strip_bos: false,
        })
    }

    /// Renders a message list.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = tmpl.render(ctx).map_err(|e| format!("{e:#}"))?;
        if self.strip_bos && !self.bos_token.is_empty() && out.starts_with(&self.bos_token) {
            out.drain(..self.bos_token.len());
        }
        Ok(out)
    }

    /// A conversational record → pair. With a `prompt` message list, it is the prompt; without
    /// (or with a plain-string prompt, as in `ultrafeedback_binarized`), the prompt is the
    /// messages `chosen` and `rejected` share, as TRL's `maybe_extract_prompt` does.
    pub fn pair(&self, record: &Value) -> std::result::Result<PreferencePair, FieldError> {
        let list = |field: &str| -> std::result::Result<&Vec<Value>, FieldError> {
            match record.get(field) {
                None => Err((
                    "missing_field",
                    format!("missing field `{field}` (expected a list of messages)"),
                )),
                Some(Value::Array(v)) => {
                    for (i, m) in v.iter().enumerate() {
                        for key in ["role", "content"] {
                            if !m.get(key).is_some_and(Value::is_string) {
                                return Err((
                                    "bad_message",
                                    format!("field `{field}[{i}].{key}`: expected a string"),
                                ));
                            }
                        }
                    }
                    Ok(v)
                }
                Some(other) => Err((
                    "not_a_list",
                    format!(
                        "field `{field}`: expected a list of messages, got {}",
                        kind(other)
                    ),
                )),
            }
        };
        let (chosen, rejected) = (list("chosen")?, list("rejected")?);
        let (prompt, chosen, rejected): (Vec<Value>, &[Value], &[Value]) =
            match record.get("prompt") {
                Some(Value::Array(_)) => (list("prompt")?.clone(), chosen, rejected),
                _ => {
                    let shared = chosen
                        .iter()
                        .zip(rejected)
                        .take_while(|(a, b)| a == b)
                        .count();
                    (
                        chosen[..shared].to_vec(),
                        &chosen[shared..],
                        &rejected[shared..],
                    )
                }
            };
        let render_err = |e: String| ("chat_template_error", format!("chat template: {e}"));
        let prompt_text = self
            .render(&Value::Array(prompt.clone()), true)
            .map_err(render_err)?;
        let response = |side: &[Value], field: &str| -> std::result::Result<String, FieldError> {
            let full = self
                .render(
                    &Value::Array(prompt.iter().chain(side).cloned().collect()),
                    false,
                )
                .map_err(render_err)?;
            full.strip_prefix(&prompt_text).map(str::to_string).ok_or((
                "chat_template_error",
                format!("field `{field}`: the rendered conversation does not start with the rendered prompt"),
            ))
        };
        Ok(PreferencePair {
            chosen: response(chosen, "chosen")?,
            rejected: response(rejected, "rejected")?,
            prompt: prompt_text,
            // The template ends the turn itself; TRL 1.x adds no EOS to conversational data.
            append_eos: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Zephyr's template (as in HuggingFaceH4 models' tokenizer_config.json).
    const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    #[test]
    fn prompt_gets_the_generation_prompt_and_responses_the_rest() {
        let t = ChatTemplate::new(ZEPHYR, "<s>", "</s>").unwrap();
        let rec = json!({
            "prompt": "Hi?",
            "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
        });
        let p = t.pair(&rec).unwrap();
        assert_eq!(p.prompt, "<|user|>\nHi?</s>\n<|assistant|>\n");
        assert_eq!(p.chosen, "Hello.</s>\n");
        assert_eq!(p.rejected, "Go away.</s>\n");
        let bad = json!({"chosen": [{"role": "user"}], "rejected": []});
        assert_eq!(t.pair(&bad).unwrap_err().0, "bad_message");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages[0]['content'].strip() }}", "", "").unwrap();
        assert_eq!(
            t.render(&json!([{"role": "user", "content": "  x "}]), false)
                .unwrap(),
            "x"
        );
        assert!(t
            .render(&json!([{"role": "system", "content": ""}]), false)
            .unwrap_err()
            .contains("user first"));
    }
}
