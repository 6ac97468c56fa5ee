//! Data pipeline throughput on the real HH files: `cargo bench --bench data`. Prints records
//! per second for reading + converting, for tokenising (one thread, then on every core, as
//! training and `load_tokenized` do; best of three each) and for the whole streamed pipeline (read, tokenise,
//! group into micro-batches, as `data.streaming` feeds training), all in one run. Skips when
//! ../shared is absent. `dpo-sam data inspect --bench` times the stages of any other data.

use dpo_sam::config::DataConfig;
use dpo_sam::data::{self, batch::Truncation, stream, Split};
use dpo_sam::tokenizer::Tok;
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");
    let tok_dir = std::path::Path::new(root).join("tokenizers/mistral-7b");
    if !tok_dir.is_dir() {
        println!("skipping: {root} is absent");
        return Ok(());
    }
    let files = format!("{root}/data/hh-rlhf/*.jsonl.gz");
    let cfg: DataConfig = toml::from_str(&format!(
        "train = {files:?}\nmax_length = 512\nshuffle_buffer = 1000\ngroup_by_length = 64"
    ))?;
    let tok = Tok::from_dir(&tok_dir)?;
    let conv = data::converter(&cfg, &tok, None)?;
    let rate = |n: usize, t: Instant| n as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let rows: Vec<_> = data::pair_stream(&cfg, Split::Train, conv.clone(), 0, 0, false)?.collect();
    let read = rate(rows.len(), t);
    let rows: Vec<stream::Row> = rows.into_iter().collect::<anyhow::Result<_>>()?;

    let (tok, trunc) = (Arc::new(tok), Truncation::from_config(&cfg));
    let tokenize = |threads: usize| -> anyhow::Result<f64> {
        let t = Instant::now();
        let it = rows.clone().into_iter().map(Ok);
        let n = stream::tokenize_rows(it, tok.clone(), trunc.clone(), threads)
            .collect::<anyhow::Result<Vec<_>>>()?
            .len();
        Ok(rate(n, t))
    };
    // Alternated and the best of three kept, so that other load on the machine skews the
    // ratio less.
    let threads = stream::threads();
    let (mut serial, mut parallel) = (0f64, 0f64);
    for _ in 0..3 {
        serial = serial.max(tokenize(1)?);
        parallel = parallel.max(tokenize(threads)?);
    }

    let t = Instant::now();
    let mut batches = data::train_batches(&cfg, conv, tok.clone(), 0, 0, 8)?;
    let pairs: usize = batches
        .by_ref()
        .map(|b| b.map(|b| b.len()))
        .sum::<anyhow::Result<_>>()?;
    let pipeline = rate(batches.records, t);

    println!("HH records: {} ({pairs} pairs kept)", rows.len());
    println!("read + convert:            {read:>8.0} records/s");
    println!("tokenise, 1 thread:        {serial:>8.0} records/s");
    println!(
        "tokenise, {threads} threads:       {parallel:>8.0} records/s ({:.2}x)",
        parallel / serial
    );
    println!(
        "streamed pipeline, {threads} threads: {pipeline:>8.0} records/s (read, tokenise, batch)"
    );
    Ok(())
}
