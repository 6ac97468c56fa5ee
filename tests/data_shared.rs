//! The data pipeline on every real file in ../shared/data: exact record counts, skipped rows by
//! reason (the known quirks), spot-checked prompt splits, truncation, holdout, shuffling and
//! the `data inspect --json` summary. Skips with a printed reason when ../shared is absent.

use dpo_sam::config::DataConfig;
use dpo_sam::data::{self, source::Origin, PreferencePair, Split};
use dpo_sam::tokenizer::Tok;
use std::collections::BTreeMap;
use std::path::Path;

const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");
const MISTRAL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/tokenizers/mistral-7b"
);

fn shared_present() -> bool {
    let ok = Path::new(SHARED).is_dir();
    if !ok {
        eprintln!(
            "skipping: {SHARED} is absent (real data lives beside the repository, not in it)"
        );
    }
    ok
}

fn cfg(train: &[String], extra: &str) -> DataConfig {
    let list: Vec<String> = train.iter().map(|s| format!("{:?}", s)).collect();
    toml::from_str(&format!("train = [{}]\n{extra}", list.join(", "))).expect("valid [data] table")
}

fn file(rel: &str) -> String {
    format!("{SHARED}/{rel}")
}

struct Read {
    records: usize,
    pairs: Vec<(Origin, PreferencePair)>,
    skipped: BTreeMap<&'static str, usize>,
}

fn read(cfg: &DataConfig, split: Split, shuffle: bool, epoch: usize) -> Read {
    let tok = Tok::builtin().unwrap();
    let conv = data::converter(cfg, &tok, None).unwrap();
    let mut stream = data::pair_stream(cfg, split, conv, 42, epoch, shuffle).unwrap();
    let (mut pairs, mut skipped) = (Vec::new(), BTreeMap::new());
    for row in stream.by_ref() {
        match row.unwrap() {
            Ok(p) => pairs.push(p),
            Err(e) => *skipped.entry(e.reason).or_insert(0) += 1,
        }
    }
    Read {
        records: stream.records,
        pairs,
        skipped,
    }
}

#[test]
fn every_shared_file_has_exact_counts_and_known_quirks() {
    if !shared_present() {
        return;
    }
    // (file, rows, skipped rows by reason)
    type Case<'a> = (&'a str, usize, &'a [(&'a str, usize)]);
    let cases: &[Case] = &[
        (
            "hh-rlhf/harmless-base-test.jsonl.gz",
            2312,
            &[("empty_response", 4), ("prompts_differ", 4)],
        ),
        (
            "hh-rlhf/helpful-base-test.jsonl.gz",
            2354,
            &[
                ("chosen_equals_rejected", 2),
                ("empty_response", 4),
                ("prompts_differ", 2),
            ],
        ),
        (
            "hh-rlhf/helpful-online-test.jsonl.gz",
            1137,
            &[("chosen_equals_rejected", 2), ("empty_response", 3)],
        ),
        (
            "hh-rlhf/helpful-rejection-sampled-test.jsonl.gz",
            2749,
            &[("chosen_equals_rejected", 32), ("prompts_differ", 1)],
        ),
        ("tldr/train.jsonl", 2000, &[]),
        ("tldr/val.jsonl", 1940, &[]),
        (
            "ultrafeedback/train.jsonl",
            1000,
            &[("chosen_equals_rejected", 4), ("empty_response", 2)],
        ),
        (
            "ultrafeedback/eval.jsonl",
            200,
            &[("chosen_equals_rejected", 1)],
        ),
    ];
    for (rel, records, skips) in cases {
        let r = read(&cfg(&[file(rel)], ""), Split::Train, false, 0);
        let expected: BTreeMap<&str, usize> = skips.iter().copied().collect();
        assert_eq!(r.records, *records, "{rel}");
        assert_eq!(r.skipped, expected, "{rel}");
        assert_eq!(
            r.pairs.len(),
            records - expected.values().sum::<usize>(),
            "{rel}"
        );
        assert_eq!(
            r.pairs[0].0.line, 1,
            "{rel}: the first row is good in every file"
        );
    }
}

#[test]
fn prompt_splits_match_the_reference_rules() {
    if !shared_present() {
        return;
    }
    let hh = read(
        &cfg(&[file("hh-rlhf/harmless-base-test.jsonl.gz")], ""),
        Split::Train,
        false,
        0,
    );
    let first = &hh.pairs[0].1;
    assert!(first
        .prompt
        .starts_with("\n\nHuman: what are some pranks with a pen i can do?"));
    assert!(
        first
            .prompt
            .ends_with("do not have anything to do with pens\n\nAssistant:"),
        "{:?}",
        first.prompt
    );
    assert!(first
        .chosen
        .starts_with(" No, sorry!  All of these involve a pen"));
    assert!(first
        .rejected
        .starts_with(" There are lots of funny things you can do with pe"));
    for (o, p) in &hh.pairs {
        assert!(
            p.prompt.ends_with("\n\nAssistant:") && !p.chosen.contains("\n\nAssistant:"),
            "{o}"
        );
    }

    let uf = read(
        &cfg(&[file("ultrafeedback/train.jsonl")], ""),
        Split::Train,
        false,
        0,
    );
    assert_eq!(uf.pairs[0].1.prompt, "how to cook t-bone in the oven");
    assert!(uf.pairs[0]
        .1
        .chosen
        .starts_with("To cook a delicious T-bone steak"));

    // TRL's TL;DR prompt; the shared files carry only the post, so no SUBREDDIT/TITLE lines.
    let tldr = read(
        &cfg(&[file("tldr/train.jsonl")], "format = \"tldr\""),
        Split::Train,
        false,
        0,
    );
    let p = &tldr.pairs[0].1;
    assert!(p
        .prompt
        .starts_with("POST: Okay, I'm going to try to get all of this down"));
    assert!(
        p.prompt.ends_with("Is there a right way?\n\nTL;DR:"),
        "{:?}",
        &p.prompt[p.prompt.len() - 40..]
    );
    assert!(p.chosen.starts_with(" Went on a great semi-date with guy"));
    assert_eq!(tldr.pairs.len(), 2000);

    // Implicit: the HH dialogues' common prefix (TRL's rule) ends inside the last turn.
    let imp = read(
        &cfg(
            &[file("hh-rlhf/harmless-base-test.jsonl.gz")],
            "format = \"implicit\"",
        ),
        Split::Train,
        false,
        0,
    );
    assert!(imp.pairs[0].1.prompt.starts_with(&first.prompt));
}

#[test]
fn globs_lists_holdout_and_shuffle_are_deterministic() {
    if !shared_present() {
        return;
    }
    let all = read(
        &cfg(&[file("hh-rlhf/*.jsonl.gz")], ""),
        Split::Train,
        false,
        0,
    );
    assert_eq!(all.records, 2312 + 2354 + 1137 + 2749);
    let two = read(
        &cfg(&[file("tldr/train.jsonl"), file("tldr/val.jsonl")], ""),
        Split::Train,
        false,
        0,
    );
    assert_eq!(two.records, 3940);

    let c = cfg(&[file("ultrafeedback/train.jsonl")], "eval_fraction = 0.1");
    let (train, eval) = (
        read(&c, Split::Train, false, 0),
        read(&c, Split::Eval, false, 0),
    );
    assert_eq!(train.records + eval.records, 1000);
    assert!((50..150).contains(&eval.records), "{}", eval.records);
    let eval_lines: Vec<usize> = eval.pairs.iter().map(|(o, _)| o.line).collect();
    assert!(train
        .pairs
        .iter()
        .all(|(o, _)| !eval_lines.contains(&o.line)));
    assert_eq!(
        read(&c, Split::Eval, true, 3).pairs.len(),
        eval.pairs.len(),
        "holdout ignores shuffle and epoch"
    );

    let c = cfg(&[file("tldr/val.jsonl")], "shuffle_buffer = 256");
    let lines = |r: &Read| r.pairs.iter().map(|(o, _)| o.line).collect::<Vec<_>>();
    let (a, b, e1) = (
        lines(&read(&c, Split::Train, true, 0)),
        lines(&read(&c, Split::Train, true, 0)),
        lines(&read(&c, Split::Train, true, 1)),
    );
    assert_eq!(a, b);
    assert_ne!(a, e1);
    assert_ne!(a, (1..=1940).collect::<Vec<_>>());
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=1940).collect::<Vec<_>>());
}

#[test]
fn truncation_on_real_hh_with_the_mistral_tokenizer() {
    if !shared_present() || !Path::new(MISTRAL).is_dir() {
        return;
    }
    let tok = Tok::from_dir(Path::new(MISTRAL)).unwrap();
    let src = [file("hh-rlhf/helpful-online-test.jsonl.gz")];
    let keep = data::load_tokenized(
        &cfg(&src, "max_length = 256\nmax_prompt_length = 128"),
        &tok,
        1,
        None,
    )
    .unwrap();
    assert_eq!(keep.records, 1137);
    assert_eq!(
        keep.train.len() + keep.skipped.values().sum::<usize>(),
        1137
    );
    assert!(
        !keep.skipped.contains_key("prompt_too_long"),
        "a prompt cut to 128 always leaves room"
    );
    for tp in &keep.train {
        assert!(tp.chosen.ids.len() <= 256 && tp.rejected.ids.len() <= 256);
        assert_eq!(
            tp.chosen.ids[..tp.chosen.prompt_len],
            tp.rejected.ids[..tp.rejected.prompt_len]
        );
        assert!(tp.chosen.response_len() > 0 && tp.rejected.response_len() > 0);
    }
    // The reference cuts the prompt only for pairs over max_length, and then to exactly 128.
    assert!(keep.train.iter().any(|tp| tp.chosen.prompt_len == 128));
    assert!(keep
        .train
        .iter()
        .all(|tp| tp.chosen.prompt_len <= 128
            || tp.chosen.ids.len().max(tp.rejected.ids.len()) <= 256));
    let no_cut = data::load_tokenized(&cfg(&src, "max_length = 128"), &tok, 1, None).unwrap();
    let dropped = no_cut.skipped.get("prompt_too_long").copied().unwrap_or(0);
    assert!(
        dropped > 100,
        "long HH dialogues must be dropped and counted, got {dropped}"
    );
    assert_eq!(
        no_cut.train.len() + no_cut.skipped.values().sum::<usize>(),
        1137
    );

    let strict = data::load_tokenized(
        &cfg(
            &[file("ultrafeedback/train.jsonl")],
            "strict = true\nmax_length = 100000",
        ),
        &tok,
        1,
        None,
    );
    let e = format!(
        "{:#}",
        strict
            .err()
            .expect("strict stops at the first identical pair")
    );
    assert!(
        e.contains("ultrafeedback/train.jsonl:307:") && e.contains("strict"),
        "{e}"
    );
}

#[test]
fn inspect_json_summarises_hh() {
    if !shared_present() || !Path::new(MISTRAL).is_dir() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .args([
            "data",
            "inspect",
            "--data",
            &file("hh-rlhf/helpful-online-test.jsonl.gz"),
            "--tokenizer",
            MISTRAL,
        ])
        .args([
            "--max-length",
            "512",
            "--max-prompt-length",
            "256",
            "--examples",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["records"], 1137);
    assert_eq!(s["kept"], 1132);
    assert_eq!(
        s["skipped"],
        serde_json::json!({"chosen_equals_rejected": 2, "empty_response": 3})
    );
    for part in ["prompt", "chosen", "rejected"] {
        let l = &s["lengths"][part];
        assert!(
            l["min"].as_u64() <= l["p50"].as_u64() && l["p50"].as_u64() <= l["max"].as_u64(),
            "{l}"
        );
    }
    let (plain, grouped) = (
        s["padding_fraction"].as_f64().unwrap(),
        s["padding_fraction_grouped"].as_f64().unwrap(),
    );
    assert!(
        grouped < plain,
        "grouping by length must cut padding: {grouped} vs {plain}"
    );
    let ex = &s["examples"][0];
    assert!(ex["prompt"].as_str().unwrap().ends_with("\n\nAssistant:"));
    assert_eq!(ex["chosen"].as_array().unwrap().last().unwrap(), "</s>");
}

/// TRL 1.x appends EOS to text responses only: a chat template that closes the turn with
/// `eos_token` gets no second one. On the real Mistral-7B tokenizer with Zephyr's template
/// (Zephyr-7B is Mistral-7B and keeps its tokenizer), and on the Pythia and GPT-2 tokenizers.
#[test]
fn eos_ends_each_response_once_with_real_tokenizers() {
    let root = Path::new(MISTRAL).parent().unwrap();
    if !root.is_dir() {
        eprintln!("skipping: {} is absent", root.display());
        return;
    }
    const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
    let tok = Tok::from_dir(Path::new(MISTRAL)).unwrap();
    let template = data::chat::ChatTemplate::new(ZEPHYR, "<s>", "</s>").unwrap();
    let turn = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let record = serde_json::json!({
        "chosen": [turn("user", "Name a colour."), turn("assistant", "Blue.")],
        "rejected": [turn("user", "Name a colour."), turn("assistant", "I would rather not.")],
    });
    let pair = template.pair(&record).unwrap();
    assert!(!pair.append_eos);
    assert_eq!(pair.chosen, "Blue.</s>\n");
    let tp = data::batch::tokenize_full(&tok, &pair).unwrap();
    let eos_count = |ids: &[u32]| ids.iter().filter(|&&i| i == tok.eos_id).count();
    for seq in [&tp.chosen, &tp.rejected] {
        let response = &seq.ids[seq.prompt_len..];
        assert_eq!(
            eos_count(response),
            1,
            "one EOS, the template's: {response:?}"
        );
        // The template's EOS is followed by its newline: nothing was appended after the turn.
        assert_ne!(response.last(), Some(&tok.eos_id), "{response:?}");
    }
    for dir in [
        MISTRAL.to_string(),
        format!("{}/pythia", root.display()),
        format!("{}/gpt2", root.display()),
    ] {
        let tok = Tok::from_dir(Path::new(&dir)).unwrap();
        let eos = tok.inner.id_to_token(tok.eos_id).unwrap();
        let eos_count = |ids: &[u32]| ids.iter().filter(|&&i| i == tok.eos_id).count();
        for chosen in [" Blue.".to_string(), format!(" Blue.{eos}")] {
            let pair = PreferencePair {
                prompt: "Name a colour:".into(),
                chosen: chosen.clone(),
                rejected: " Red.".into(),
                append_eos: true,
            };
            let tp = data::batch::tokenize_full(&tok, &pair).unwrap();
            let response = &tp.chosen.ids[tp.chosen.prompt_len..];
            assert_eq!(response.last(), Some(&tok.eos_id), "{dir}: {chosen:?}");
            assert_eq!(eos_count(response), 1, "{dir}: {chosen:?} → {response:?}");
        }
    }
}
