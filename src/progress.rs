//! Progress bars for long work outside the training loop (reference precompute, `score`,
//! `generate`, `data inspect`, uploads): position, rate and ETA on stderr. indicatif draws
//! nothing when stderr is not a terminal, so logs and pipes stay clean.

use indicatif::{ProgressBar, ProgressStyle};

/// What a bar counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Items, named (`pairs`, `prompts`).
    Items(&'static str),
    /// Bytes (input files read, uploads).
    Bytes,
}

/// A bar of `len` units labelled `what`, with rate and ETA; hidden when stderr is not a
/// terminal, or when there is nothing to count (`len` 0).
pub fn bar(what: &str, len: u64, unit: Unit) -> ProgressBar {
    if len == 0 {
        return ProgressBar::hidden();
    }
    let counts = match unit {
        Unit::Items(name) => format!("{{human_pos}}/{{human_len}} {name} {{rate}}"),
        Unit::Bytes => "{bytes}/{total_bytes} {bytes_per_sec}".to_string(),
    };
    let template = format!("{{msg}} [{{bar:30}}] {counts} ETA {{eta}}");
    let bar = ProgressBar::new(len).with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    write!(w, "{:.1}/s", s.per_sec()).unwrap()
                },
            )
            .progress_chars("=> "),
    );
    bar
}
