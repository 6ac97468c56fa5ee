//! Data pipeline throughput on the real HH files: `cargo bench --bench data` (or, without a
//! release build, `dpo-sam data inspect --data '../shared/data/hh-rlhf/*.jsonl.gz'
//! --tokenizer ../shared/tokenizers/mistral-7b --bench`). Prints records per second for
//! reading + parsing, tokenising and batching. Skips when ../shared is absent.

use clap::Parser;
use dpo_sam::data::inspect::DataArgs;

#[derive(Parser)]
struct Bench {
    #[command(flatten)]
    data: DataArgs,
}

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");
    let tokenizer = format!("{root}/tokenizers/mistral-7b");
    if !std::path::Path::new(&tokenizer).is_dir() {
        eprintln!("skipping: {root} is absent");
        return Ok(());
    }
    let data = format!("{root}/data/hh-rlhf/*.jsonl.gz");
    let args = [
        "bench",
        "inspect",
        "--data",
        &data,
        "--tokenizer",
        &tokenizer,
        "--max-length",
        "512",
        "--examples",
        "0",
        "--bench",
    ];
    let summary = dpo_sam::data::inspect::inspect(&Bench::parse_from(args).data.into_inspect())?;
    let b = &summary["bench"];
    for key in [
        "read_records_per_second",
        "tokenize_pairs_per_second",
        "batch_pairs_per_second",
        "pipeline_records_per_second",
    ] {
        println!("{key}: {:.0}", b[key].as_f64().unwrap_or(0.0));
    }
    Ok(())
}
