//! Judge prompt templates: the DPO paper's built-in HH and TL;DR prompts, and custom template
//! files (an answer-label header, then the prompt with `{prompt}`, `{response_a}` and
//! `{response_b}` slots).

use anyhow::{bail, Context, Result};

/// Rafailov et al. (2023), appendix C.2, dialogue (Anthropic HH) judge prompt.
const HH_TEMPLATE: &str = "For the following query to a chatbot, which response is more helpful?

Query: {prompt}

Response A:
{response_a}

Response B:
{response_b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more \
helpful. SECOND, on a new line, state only \"A\" or \"B\" to indicate which response is more \
helpful. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <\"A\" or \"B\">";

/// Rafailov et al. (2023), appendix C.2, summarisation (TL;DR) judge prompt.
const TLDR_TEMPLATE: &str = "Which of the following summaries does a better job of summarizing \
the most important points in the given forum post, without including unimportant or irrelevant \
details? A good summary is both precise and concise.

Post:
{prompt}

Summary A:
{response_a}

Summary B:
{response_b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and \
why. SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your response \
should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <\"A\" or \"B\">";

/// First line of a custom template file, naming the label of the judge's answer line.
pub const LABEL_HEADER: &str = "# answer-label:";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Prompt,
    ResponseA,
    ResponseB,
}

/// A judge prompt with `{prompt}`, `{response_a}` and `{response_b}` slots.
#[derive(Debug, Clone)]
pub struct Template {
    /// `hh`, `tldr`, or the template file's path as given.
    pub task: String,
    /// The label that starts the judge's final answer line (`Preferred`, `More helpful`).
    pub answer_label: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// `hh`, `tldr`, or else the path of a custom template file.
    pub fn load(task: &str) -> Result<Self> {
        let (label, body) = match task {
            "hh" => ("More helpful".to_string(), HH_TEMPLATE.to_string()),
            "tldr" => ("Preferred".to_string(), TLDR_TEMPLATE.to_string()),
            path => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("--task `{path}`: expected `hh`, `tldr` or a readable template file")
                })?;
                let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
                let label = first
                    .trim()
                    .strip_prefix(LABEL_HEADER)
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .with_context(|| {
                        format!(
                            "template {path} line 1: expected `{LABEL_HEADER} <label>` naming \
                             the judge's answer line (e.g. `{LABEL_HEADER} Preferred`)"
                        )
                    })?;
                // Editors add a final newline; the built-in prompts have none.
                let body = rest.strip_suffix('\n').unwrap_or(rest);
                (label.to_string(), body.to_string())
            }
        };
        let pieces = parse_template(&body).with_context(|| format!("template {task}"))?;
        Ok(Self {
            task: task.to_string(),
            answer_label: label,
            pieces,
        })
    }

    /// Fills the slots; the texts are trimmed so tokenizer whitespace does not show.
    pub fn render(&self, prompt: &str, response_a: &str, response_b: &str) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            out.push_str(match piece {
                Piece::Text(t) => t,
                Piece::Prompt => prompt.trim(),
                Piece::ResponseA => response_a.trim(),
                Piece::ResponseB => response_b.trim(),
            });
        }
        out
    }
}

/// `{name}` is a slot, `{{` and `}}` are literal braces; any other brace is literal text.
fn parse_template(src: &str) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = src;
    while let Some(pos) = rest.find(['{', '}']) {
        text.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            text.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        let name_len = tail[1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len() - 1);
        if tail.starts_with('{') && name_len > 0 && tail[1 + name_len..].starts_with('}') {
            let name = &tail[1..1 + name_len];
            let piece = match name {
                "prompt" => Piece::Prompt,
                "response_a" => Piece::ResponseA,
                "response_b" => Piece::ResponseB,
                _ => {
                    let line = src[..src.len() - tail.len()].matches('\n').count() + 2;
                    bail!(
                        "unknown placeholder `{{{name}}}` on line {line}; expected {{prompt}}, \
                         {{response_a}} or {{response_b}} (write `{{{{` for a literal brace)"
                    )
                }
            };
            pieces.push(Piece::Text(std::mem::take(&mut text)));
            pieces.push(piece);
            rest = &tail[name_len + 2..];
        } else {
            text.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    text.push_str(rest);
    pieces.push(Piece::Text(text));
    pieces.retain(|p| *p != Piece::Text(String::new()));
    for (slot, piece) in [
        ("{prompt}", Piece::Prompt),
        ("{response_a}", Piece::ResponseA),
        ("{response_b}", Piece::ResponseB),
    ] {
        if !pieces.contains(&piece) {
            bail!("placeholder {slot} is missing; the judge would not see it");
        }
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_have_all_slots_and_labels() {
        let hh = Template::load("hh").unwrap();
        assert_eq!(hh.answer_label, "More helpful");
        let r = hh.render(" Q ", "RA", "RB");
        assert!(r.starts_with("For the following query to a chatbot, which response is more helpful?\n\nQuery: Q\n\nResponse A:\nRA\n\nResponse B:\nRB\n\n"));
        assert!(r.ends_with(
            "Comparison: <one-sentence comparison and explanation>\nMore helpful: <\"A\" or \"B\">"
        ));
        let tldr = Template::load("tldr").unwrap();
        assert_eq!(tldr.answer_label, "Preferred");
        let r = tldr.render("P", "SA", "SB");
        assert!(r.contains("A good summary is both precise and concise.\n\nPost:\nP\n\nSummary A:\nSA\n\nSummary B:\nSB\n\nFIRST"));
        assert!(r.ends_with("Preferred: <\"A\" or \"B\">"));
    }

    #[test]
    fn custom_template_header_placeholders_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.txt");
        std::fs::write(
            &good,
            "# answer-label: Verdict\nQ={prompt} {{literal}} {\"json\": 1}\n1) {response_a}\n2) {response_b}\n",
        )
        .unwrap();
        let t = Template::load(good.to_str().unwrap()).unwrap();
        assert_eq!(t.answer_label, "Verdict");
        assert_eq!(
            t.render("p", "a", "b"),
            "Q=p {literal} {\"json\": 1}\n1) a\n2) b"
        );

        let unknown = dir.path().join("unknown.txt");
        std::fs::write(
            &unknown,
            "# answer-label: X\n{prompt}\n{response_a} {respons_b}\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            Template::load(unknown.to_str().unwrap()).unwrap_err()
        );
        assert!(
            err.contains("unknown.txt") && err.contains("{respons_b}") && err.contains("line 3"),
            "{err}"
        );

        let missing = dir.path().join("missing.txt");
        std::fs::write(&missing, "# answer-label: X\n{prompt} {response_a}\n").unwrap();
        let err = format!(
            "{:#}",
            Template::load(missing.to_str().unwrap()).unwrap_err()
        );
        assert!(
            err.contains("missing.txt") && err.contains("{response_b}"),
            "{err}"
        );

        let no_header = dir.path().join("nohdr.txt");
        std::fs::write(&no_header, "{prompt} {response_a} {response_b}\n").unwrap();
        let err = format!(
            "{:#}",
            Template::load(no_header.to_str().unwrap()).unwrap_err()
        );
        assert!(
            err.contains("nohdr.txt line 1") && err.contains(LABEL_HEADER),
            "{err}"
        );

        let err = format!("{:#}", Template::load("tdlr").unwrap_err());
        assert!(err.contains("`hh`, `tldr`"), "{err}");
    }
}
