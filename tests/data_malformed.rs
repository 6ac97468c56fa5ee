//! Bad and unusual inputs the tests write themselves: every malformed-row kind skipped and
//! counted by reason (or stopping `strict` runs at file:line), JSON arrays, gzip, parquet,
//! chat-templated conversations, and Hub dataset specs served from an offline cache.

use dpo_sam::config::DataConfig;
use dpo_sam::data::{self, source, PreferencePair, Split};
use dpo_sam::tokenizer::Tok;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

fn cfg(train: &[&Path], extra: &str) -> DataConfig {
    let list: Vec<String> = train
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    toml::from_str(&format!("train = [{}]\n{extra}", list.join(", "))).expect("valid [data] table")
}

fn read(
    cfg: &DataConfig,
) -> anyhow::Result<(usize, Vec<PreferencePair>, BTreeMap<&'static str, usize>)> {
    let tok = Tok::builtin()?;
    let mut stream = data::pair_stream(
        cfg,
        Split::Train,
        data::converter(cfg, &tok, None)?,
        0,
        0,
        false,
    )?;
    let mut skips = data::stream::Skips::new(cfg.strict);
    let mut pairs = Vec::new();
    for row in stream.by_ref() {
        match row? {
            Ok((_, p)) => pairs.push(p),
            Err(e) => skips.record(&e)?,
        }
    }
    Ok((stream.records, pairs, skips.counts))
}

const GOOD: &str = r#"{"prompt": "1+1=", "chosen": "2", "rejected": "3"}"#;

#[test]
fn every_bad_row_kind_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{GOOD}").unwrap();
    writeln!(f, "{{\"prompt\": \"x\", \"chosen\": ").unwrap(); // line 2: cut short
    f.write_all(b"{\"prompt\": \"\xff\xfe\", \"chosen\": \"a\", \"rejected\": \"b\"}\n")
        .unwrap();
    writeln!(f, r#"{{"prompt": "p", "rejected": "r"}}"#).unwrap();
    writeln!(f, r#"{{"prompt": "p", "chosen": ["a"], "rejected": "r"}}"#).unwrap();
    writeln!(f, r#"{{"prompt": "p", "chosen": 7, "rejected": "r"}}"#).unwrap();
    writeln!(f, r#"{{"prompt": "p", "chosen": "  ", "rejected": "r"}}"#).unwrap();
    writeln!(
        f,
        r#"{{"prompt": "p", "chosen": "same", "rejected": "same"}}"#
    )
    .unwrap();
    writeln!(f, "   ").unwrap(); // blank lines are not rows
    writeln!(f, "[1, 2]").unwrap();
    writeln!(f, "{GOOD}").unwrap();
    drop(f);
    let (records, pairs, skipped) = read(&cfg(&[&path], "")).unwrap();
    assert_eq!((records, pairs.len()), (10, 2));
    let expected: BTreeMap<&str, usize> = [
        ("invalid_json", 1),
        ("invalid_utf8", 1),
        ("missing_field", 1),
        // `["a"]` looks conversational to `auto`, and there is no chat template
        ("no_chat_template", 1),
        ("not_a_string", 1),
        ("empty_response", 1),
        ("chosen_equals_rejected", 1),
        ("not_an_object", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(skipped, expected);
    let (_, _, explicit) = read(&cfg(&[&path], "format = \"explicit\"")).unwrap();
    assert_eq!(explicit.get("not_a_string"), Some(&2));
    assert!(!explicit.contains_key("no_chat_template"));

    let e = read(&cfg(&[&path], "strict = true"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl:2:") && e.contains("invalid JSON") && e.contains("strict"),
        "{e}"
    );
}

#[test]
fn json_arrays_gzip_and_parquet_read_the_same_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [("a", "b", "c"), ("d\n\"e\"", "f]", "g}"), ("h", "i", "j")];
    let jsonl: String = rows
        .iter()
        .map(|(p, c, r)| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": p, "chosen": c, "rejected": r})
            )
        })
        .collect();
    let array = format!("[\n{}]\n", jsonl.trim_end().replace('\n', ",\n"));
    std::fs::write(dir.path().join("x.json"), &array).unwrap();
    std::fs::write(dir.path().join("lines.json"), &jsonl).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(dir.path().join("x.jsonl.gz")).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(jsonl.as_bytes()).unwrap();
    gz.finish().unwrap();
    write_parquet(&dir.path().join("x.parquet"), &rows);
    let expected: Vec<PreferencePair> = rows
        .iter()
        .map(|(p, c, r)| PreferencePair {
            prompt: p.to_string(),
            chosen: c.to_string(),
            rejected: r.to_string(),
            append_eos: true,
        })
        .collect();
    for name in ["x.json", "lines.json", "x.jsonl.gz", "x.parquet"] {
        let (records, pairs, skipped) = read(&cfg(&[&dir.path().join(name)], "")).unwrap();
        assert_eq!(
            (records, &pairs, skipped.len()),
            (3, &expected, 0),
            "{name}"
        );
    }
    let glob = dir.path().join("x.*");
    let (records, _, _) = read(&cfg(&[&glob], "")).unwrap();
    assert_eq!(records, 9, "x.json, x.jsonl.gz and x.parquet");

    std::fs::write(
        dir.path().join("cut.json"),
        "[{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"},\n{\"prompt\": ",
    )
    .unwrap();
    let (_, pairs, skipped) = read(&cfg(&[&dir.path().join("cut.json")], "")).unwrap();
    assert_eq!((pairs.len(), skipped.get("invalid_json")), (1, Some(&1)));
    let missing = format!(
        "{:#}",
        read(&cfg(&[&dir.path().join("none.jsonl")], "")).unwrap_err()
    );
    assert!(missing.contains("none.jsonl"), "{missing}");
}

fn write_parquet(path: &Path, rows: &[(&str, &str, &str)]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message pairs { REQUIRED BYTE_ARRAY prompt (UTF8); REQUIRED BYTE_ARRAY chosen (UTF8); REQUIRED BYTE_ARRAY rejected (UTF8); }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(path).unwrap(),
        schema.into(),
        props.into(),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut column = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let values: Vec<ByteArray> = rows
            .iter()
            .map(|r| [r.0, r.1, r.2][column].into())
            .collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        col.close().unwrap();
        column += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn conversations_render_with_a_chat_template_file() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("chat.jinja");
    std::fs::write(&template, "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].strip() }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}").unwrap();
    let data = dir.path().join("conv.jsonl");
    let turn = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let rec = serde_json::json!({
        "prompt": "ignored: a string prompt beside message lists, as in ultrafeedback_binarized",
        "chosen": [turn("user", "Hi "), turn("assistant", "Hello")],
        "rejected": [turn("user", "Hi "), turn("assistant", "Bye")],
    });
    std::fs::write(&data, format!("{rec}\n")).unwrap();
    let extra = format!("chat_template = {:?}", template.display().to_string());
    let (_, pairs, _) = read(&cfg(&[&data], &extra)).unwrap();
    assert_eq!(
        pairs[0],
        PreferencePair {
            prompt: "<|user|>Hi<|assistant|>".into(),
            chosen: "Hello".into(),
            rejected: "Bye".into(),
            append_eos: false,
        }
    );
    let (_, _, skipped) = read(&cfg(&[&data], "")).unwrap();
    assert_eq!(
        skipped.get("no_chat_template"),
        Some(&1),
        "auto: counted like any bad row"
    );
    let e = read(&cfg(&[&data], "format = \"conversational\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv.jsonl:1") && e.contains("chat_template"),
        "{e}"
    );
}

#[test]
fn hub_datasets_resolve_from_an_offline_cache() {
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: only this test in this binary reads these variables.
    unsafe {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        std::env::set_var("HF_HUB_CACHE", cache.path());
    }
    let e = source::expand(&["hub:nobody/nothing"], "train")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("nobody/nothing") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );

    let repo = cache.path().join("datasets--org--prefs");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    let snap = repo.join("snapshots/abc123/data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(
        snap.join("train_prefs-00000-of-00001.jsonl"),
        format!("{GOOD}\n{GOOD}\n"),
    )
    .unwrap();
    std::fs::write(
        snap.join("test_prefs-00000-of-00001.jsonl"),
        format!("{GOOD}\n"),
    )
    .unwrap();
    let files = source::expand(&["hub:org/prefs:train_prefs"], "train").unwrap();
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("data/train_prefs-00000-of-00001.jsonl"));
    let c: DataConfig = toml::from_str("train = \"org/prefs\"\nsplit = \"train_prefs\"\neval = \"hub:org/prefs\"\neval_split = \"test_prefs\"").unwrap();
    let tok = Tok::builtin().unwrap();
    let loaded = data::load_tokenized(&c, &tok, 0, None).unwrap();
    assert_eq!((loaded.train.len(), loaded.eval.len()), (2, 1));
    let e = source::expand(&["hub:org/prefs:validation"], "train")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("split `validation`") && e.contains("test_prefs, train_prefs"),
        "{e}"
    );
}
