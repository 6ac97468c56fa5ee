//! `Config::parse` on arbitrary UTF-8, with and without a `--set` override taken from the
//! input's first line: it must return an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = dpo_sam::config::Config::parse(text, "fuzz.toml", &[]);
    if let Some((first, rest)) = text.split_once('\n') {
        let _ = dpo_sam::config::Config::parse(rest, "fuzz.toml", &[first.to_string()]);
    }
});
