//! The crate's modules import one way: main → commands → train → {data, models, losses, sam}
//! → kernels, with `config` and the small utilities below them all. This reads every file under
//! `src/`, collects which top-level module refers to which (`crate::x`, `use crate::{x, y}`),
//! and fails on any reference that runs up the order below, which also rules out cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules from the top down: each may refer only to modules after it.
const ORDER: &[&str] = &[
    "main",
    // Commands.
    "gpucheck",
    "bench",
    "sharpness",
    "score",
    "generate",
    "merge",
    "eval",
    "toy",
    "report",
    "plot",
    "push",
    "trl",
    // The training run and what only it uses.
    "train",
    "plan",
    "refcache",
    "checkpoint",
    "card",
    "decode",
    // What a step is made of.
    "diagnostics",
    "sam",
    "logps",
    "losses",
    "optim",
    "data",
    "models",
    "kernels",
    // Processes working together: the collective, rendezvous and launcher (knows no training).
    "dist",
    // Settings and utilities.
    "config",
    "tokenizer",
    "upload",
    "retry",
    "hub",
    "tensorboard",
    "progress",
    "device",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/train/step.rs` → `train`).
fn unit(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Top-level modules named after `prefix` in `text`: `prefix::x` and `prefix::{x::…, y, …}`.
fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[at + prefix.len()..];
        let Some(list) = rest.strip_prefix('{') else {
            out.insert(ident(rest));
            continue;
        };
        // The names at the top level of the braces.
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in list.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.insert(ident(list[start..].trim_start()));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.insert(ident(list[start..].trim_start()));
                    start = i + 1;
                }
                _ => {}
            }
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

#[test]
fn modules_import_down_the_order_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let rank = |m: &str| ORDER.iter().position(|o| *o == m);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = unit(&src, file);
        if from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let prefix = if from == "main" {
            "dpo_sam::"
        } else {
            "crate::"
        };
        for to in referenced(&text, prefix) {
            if to != from {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let Some(r) = rank(from) else {
            wrong.push(format!("{from}: not in ORDER (add it where it belongs)"));
            continue;
        };
        for to in tos {
            match rank(to) {
                Some(t) if t > r => {}
                Some(_) => wrong.push(format!("{from} → {to} runs up the order")),
                None => wrong.push(format!("{from} → {to}: {to} is not in ORDER")),
            }
        }
    }
    let n: usize = edges.values().map(BTreeSet::len).sum();
    eprintln!("{n} imports between {} modules:", edges.len());
    for (from, tos) in &edges {
        eprintln!(
            "  {from} → {}",
            tos.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The check itself: it sees nested lists and skips `self`.
    let sample = "use crate::{config::{A, B}, data::x, self};\nlet y = crate::models::Model;";
    assert_eq!(
        referenced(sample, "crate::"),
        ["config", "data", "models"].map(String::from).into()
    );
}
