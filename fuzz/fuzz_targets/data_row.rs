//! A data file of arbitrary bytes read the way training reads it: opened as JSON lines, a JSON
//! array, gzip or parquet (the first byte picks which), every record converted with format
//! detection and tokenised. Bad rows must come back as row errors, never as panics.
#![no_main]

use dpo_sam::config::{DataConfig, DataFormat};
use dpo_sam::data::{batch::Truncation, format, source, stream};
use dpo_sam::tokenizer::Tok;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tok() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| Tok::builtin().expect("the built-in tokenizer loads"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let ext = ["jsonl", "json", "jsonl.gz", "parquet"][kind as usize % 4];
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(format!("rows.{ext}"));
    std::fs::write(&path, bytes).expect("write the input");
    let cfg: DataConfig =
        toml::from_str("train = \"rows\"\nmax_length = 64").expect("valid [data]");
    let trunc = Truncation::from_config(&cfg);
    let conv = format::Converter {
        format: DataFormat::Auto,
        chat: None,
    };
    let Ok(rows) = source::open(&path) else {
        return;
    };
    for (origin, record) in rows.flatten() {
        if let Ok(Ok(pair)) = conv.convert(&origin, &record) {
            let _ = stream::tokenize_row(tok(), &trunc, &origin, &pair);
        }
    }
});
