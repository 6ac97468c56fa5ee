//! Progress bars of the work outside training (`generate`, `score` here; the reference
//! precompute, `data inspect` and uploads use the same `progress::bar`): on a terminal
//! (a pseudo-terminal from util-linux's `script`) a bar with its count, rate and ETA; with
//! stderr in a pipe, not a byte of it.

use std::path::Path;
use std::process::Command;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/score/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `dpo-sam generate` over 12 prompts, one per batch, and `dpo-sam score` over the score
/// fixture's pairs, one per batch, writing into `dir`.
fn commands(dir: &Path) -> Vec<Vec<String>> {
    let prompts = dir.join("prompts.jsonl");
    let text: String = (0..12)
        .map(|i| format!("{}\n", serde_json::json!({ "prompt": format!("{i}+{i}=") })))
        .collect();
    std::fs::write(&prompts, text).unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        s(&[
            "generate",
            "--model",
            "builtin:tiny-gpt2",
            "--data",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "3",
            "--batch-size",
            "1",
            "--out",
            dir.join("gen.jsonl").to_str().unwrap(),
        ]),
        s(&[
            "score",
            "--model",
            &fixture("policy"),
            "--ref-model",
            &fixture("ref"),
            "--data",
            &fixture("data.jsonl"),
            "--format",
            "explicit",
            "--max-length",
            "64",
            "--batch-size",
            "1",
            "--out",
            dir.join("scores.jsonl").to_str().unwrap(),
        ]),
    ]
}

/// Single-quoted for `sh -c`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn bars_show_rate_and_eta_on_a_terminal_and_nothing_in_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_dpo-sam");
    for (args, unit) in commands(dir.path()).iter().zip(["prompts", "pairs"]) {
        // In a pipe: the command's usual summary, no bar.
        let out = Command::new(exe).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("ETA") && !stderr.contains('\r') && !stderr.contains('\x1b'),
            "{args:?} drew a bar into a pipe: {stderr:?}"
        );

        if Command::new("script").arg("--version").output().is_err() {
            eprintln!("skipping the terminal half: no `script` (util-linux) to make a pty");
            continue;
        }
        // On a terminal: `script` runs the command on a pty and copies what it drew.
        let line: Vec<String> = std::iter::once(exe.to_string())
            .chain(args.iter().cloned())
            .map(|a| quote(&a))
            .collect();
        let out = Command::new("script")
            .args(["-q", "-e", "-c", &line.join(" "), "/dev/null"])
            .env("TERM", "xterm")
            .env("COLUMNS", "160")
            .output()
            .unwrap();
        let drawn = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?} on a pty: {drawn}");
        let bar = drawn
            .split(['\r', '\n'])
            .find(|l| l.contains(" ETA "))
            .unwrap_or_else(|| panic!("{args:?}: no bar on the terminal: {drawn:?}"));
        assert!(
            bar.contains(&format!(" {unit} ")) && bar.contains("/s") && bar.contains('['),
            "{args:?}: {bar:?}"
        );
    }
}
