//! `dpo-sam data inspect`: what a data configuration yields before any training — records
//! read, pairs kept, skipped rows by reason, token-length percentiles, the padding of micro-
//! batches with and without length grouping, examples showing exactly which tokens are masked
//! prompt and which are scored, (with `--model`) the distribution of the pairs' CHES scores
//! under that model and the most displacement-prone pairs, and (with `--bench`) the throughput
//! of each data stage.

use super::batch::{self, PreferenceBatch, TokenizedPair, Truncation};
use super::ches::{ches_scores, Ches};
use super::stream::{self, Skips};
use super::Split;
use crate::config::{Config, DataConfig};
use crate::models::{Model, ModelSource};
use crate::tokenizer::Tok;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

const FORMATS_HELP: &str = "\
Sources (data.train, data.eval, --data): local .jsonl, .jsonl.gz, .json (array or lines) and
.parquet files, globs (\"data/*.jsonl.gz\"), or Hub datasets hub:ORG/NAME[@REV][:SPLIT]
(plain ORG/NAME too when no such path exists); the split defaults to data.split / data.eval_split.
Hub files go through the Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache only.

Formats (data.format, --format; auto detects per record):
  hh              chosen/rejected full dialogues; prompt = up to the last \"\\n\\nAssistant:\"
  explicit        prompt, chosen, rejected strings
  implicit        chosen, rejected strings; prompt = their longest common prefix (TRL)
  conversational  lists of {role, content} messages rendered with the chat template
  tldr            subreddit/title/post (or info.*) -> \"SUBREDDIT: r/… TITLE: … POST: … TL;DR:\"

Examples:
  dpo-sam data inspect --config configs/hh.toml
  dpo-sam data inspect --data '../shared/data/hh-rlhf/*.jsonl.gz' --tokenizer models/pythia --json
  dpo-sam data inspect --data train.parquet --tokenizer tok/ --bench
  dpo-sam data inspect --config configs/hh.toml --model sft/ --top 10   # CHES scores";

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Summarise a dataset: records, skipped rows by reason, token lengths, padding, examples.
    #[command(after_help = FORMATS_HELP)]
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Take `[data]`, the seed and the tokenizer from this run configuration.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set data.max_length=1024` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub overrides: Vec<String>,
    /// Data sources instead of the config's `data.train` (repeatable).
    #[arg(long, required_unless_present = "config")]
    pub data: Vec<String>,
    /// Tokenizer: a model directory or a tokenizer.json beside its tokenizer_config.json
    /// (default: `--model`'s, else the config's model).
    #[arg(long, required_unless_present_any = ["config", "model"])]
    pub tokenizer: Option<PathBuf>,
    /// Score every kept pair's CHES and length-normalised CHES (Razin et al. 2024) under this
    /// model — the SFT model about to be trained — and summarise them: a Hugging Face
    /// directory, a Hub repo id, `random:CONFIG` or `builtin:tiny-gpt2`.
    #[arg(long)]
    pub model: Option<String>,
    /// With `--model`: how many of the highest-scoring pairs to list.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// With `--model`: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Record format (auto, hh, explicit, implicit, conversational, tldr).
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// keep_end or keep_start.
    #[arg(long)]
    pub truncation_mode: Option<String>,
    /// Chat template file (Jinja or tokenizer_config.json) for conversational records.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Stop at the first bad row.
    #[arg(long)]
    pub strict: bool,
    /// Inspect the eval split instead of the training split.
    #[arg(long)]
    pub eval: bool,
    /// Pairs per micro-batch for the padding estimate (default: the config's micro-batch, or 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Length-grouping window in pairs for the grouped padding estimate (default:
    /// data.group_by_length, or 64 micro-batches when that is off).
    #[arg(long)]
    pub group_by_length: Option<usize>,
    /// Rendered examples to show.
    #[arg(long, default_value_t = 2)]
    pub examples: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Time each stage (read+parse, tokenize, batch) and print records per second.
    #[arg(long)]
    pub bench: bool,
}

impl DataArgs {
    /// The `inspect` arguments (its only subcommand).
    pub fn into_inspect(self) -> InspectArgs {
        let DataCommand::Inspect(args) = self.command;
        args
    }
}

pub fn run(args: DataArgs) -> Result<()> {
    let args = args.into_inspect();
    let summary = inspect(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", render(&summary));
    }
    Ok(())
}

/// What `data inspect` reads with: the `[data]` section, seed, micro-batch size, tokenizer,
/// model directory, and the model that `--model` names (resolved, not yet loaded).
struct Setup {
    data: DataConfig,
    seed: u64,
    micro: usize,
    tok: Tok,
    dir: Option<PathBuf>,
    scorer: Option<ModelSource>,
}

fn setup(args: &InspectArgs) -> Result<Setup> {
    let (mut data, seed, micro, model) = match &args.config {
        Some(path) => {
            let cfg = Config::load(path, &args.overrides)?;
            let micro = cfg.micro_batch_size();
            (
                cfg.data,
                cfg.seed,
                micro,
                Some((cfg.model.name_or_path, cfg.model.builtin)),
            )
        }
        None => {
            let table: toml::Table = [("train".to_string(), toml::Value::from(args.data.clone()))]
                .into_iter()
                .collect();
            (
                table
                    .try_into::<DataConfig>()
                    .map_err(|e| anyhow!("--data: {e}"))?,
                42,
                8,
                None,
            )
        }
    };
    if !args.data.is_empty() {
        data.train = crate::config::Sources::Many(args.data.clone());
    }
    if let Some(f) = &args.format {
        data.format = f.parse().context("--format")?;
    }
    if let Some(m) = args.max_length {
        data.max_length = m;
    }
    if args.max_prompt_length.is_some() {
        data.max_prompt_length = args.max_prompt_length;
    }
    if let Some(t) = &args.truncation_mode {
        data.truncation_mode = t.parse().context("--truncation-mode")?;
    }
    if args.chat_template.is_some() {
        data.chat_template = args.chat_template.clone();
    }
    data.strict |= args.strict;
    let builtin = model.as_ref().map(|m| m.1.clone()).unwrap_or_default();
    let scorer = args
        .model
        .as_deref()
        .map(|spec| ModelSource::resolve(spec, &builtin, seed).context("--model"))
        .transpose()?;
    // The tokenizer: --tokenizer, else --model's, else the config's model's.
    let (tok, dir) = match (&args.tokenizer, &scorer, model) {
        (Some(p), _, _) => {
            let dir = if p.is_file() {
                p.parent().map(PathBuf::from).unwrap_or_default()
            } else {
                p.clone()
            };
            (
                Tok::from_dir(&dir).with_context(|| format!("--tokenizer {}", p.display()))?,
                Some(dir),
            )
        }
        (None, Some(source), _) => (source.tokenizer()?, source.dir().map(PathBuf::from)),
        (None, None, Some((name, builtin))) => {
            let source = ModelSource::resolve(&name, &builtin, seed)?;
            (source.tokenizer()?, source.dir().map(PathBuf::from))
        }
        (None, None, None) => bail!("--tokenizer is required without --config or --model"),
    };
    Ok(Setup {
        data,
        seed,
        micro: args.batch_size.unwrap_or(micro).max(1),
        tok,
        dir,
        scorer,
    })
}

/// Lengths of one kept pair, before and after truncation.
struct Lengths {
    prompt: usize,
    chosen: usize,
    rejected: usize,
}

/// Builds the summary (the `--json` object).
pub fn inspect(args: &InspectArgs) -> Result<Value> {
    let Setup {
        data,
        seed,
        micro,
        tok,
        dir,
        scorer,
    } = setup(args)?;
    let split = if args.eval { Split::Eval } else { Split::Train };
    let trunc = Truncation::from_config(&data);
    let conv = super::converter(&data, &tok, dir.as_deref())?;
    let started = Instant::now();
    let mut stream = super::pair_stream(&data, split, conv.clone(), seed, 0, false)?;
    let mut skips = Skips::new(data.strict);
    let (mut raw, mut kept_lens, mut examples) = (Vec::new(), Vec::new(), Vec::new());
    let mut truncated = 0usize;
    let (mut kept_pairs, mut origins) = (Vec::new(), Vec::new());
    let bar = crate::progress::bar("reading", stream.bytes_total, crate::progress::Unit::Bytes);
    let read = stream.bytes_read();
    for (n, row) in stream.by_ref().enumerate() {
        if n % 256 == 0 {
            bar.set_position(read.load(std::sync::atomic::Ordering::Relaxed));
        }
        let (origin, pair) = match row? {
            Ok(p) => p,
            Err(e) => {
                skips.record(&e)?;
                continue;
            }
        };
        let full = batch::tokenize_full(&tok, &pair)?;
        let lens = |p: &TokenizedPair| Lengths {
            prompt: p.chosen.prompt_len,
            chosen: p.chosen.response_len(),
            rejected: p.rejected.response_len(),
        };
        raw.push(lens(&full));
        let before = stream::pair_len(&full);
        match batch::truncate(full, &trunc) {
            Err(reason) => {
                let e = super::source::RowError {
                    origin,
                    reason: reason.name(),
                    detail: "skipped: prompt too long".into(),
                };
                skips.record(&e)?;
            }
            Ok(tp) => {
                truncated += usize::from(stream::pair_len(&tp) < before);
                kept_lens.push((tp.chosen.ids.len(), tp.rejected.ids.len()));
                if examples.len() < args.examples {
                    examples.push(example(&tok, &origin.to_string(), &tp)?);
                }
                if args.bench || scorer.is_some() {
                    kept_pairs.push(tp);
                    origins.push(origin.to_string());
                }
            }
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let records = stream.records;
    let window = match args.group_by_length.unwrap_or(data.group_by_length) {
        w if w > micro => w,
        _ => 64 * micro,
    };
    let pair_lens: Vec<usize> = kept_lens.iter().map(|&(c, r)| c.max(r)).collect();
    let padding = |w: usize| {
        padding_fraction(
            &kept_lens,
            &stream::epoch_order(&pair_lens, micro, w, seed, 0),
            micro,
        )
    };
    let pct = |f: fn(&Lengths) -> usize| percentiles(raw.iter().map(f).collect());
    let mut summary = json!({
        "split": if args.eval { "eval" } else { "train" },
        "records": records,
        "kept": kept_lens.len(),
        "skipped": skips.counts,
        "skipped_total": skips.total(),
        "truncated": truncated,
        "max_length": data.max_length,
        "lengths": {"prompt": pct(|l| l.prompt), "chosen": pct(|l| l.chosen), "rejected": pct(|l| l.rejected)},
        "micro_batch_size": micro,
        "padding_fraction": padding(data.group_by_length),
        "padding_fraction_grouped": padding(window),
        "group_by_length_window": window,
        "seconds": seconds,
        "records_per_second": records as f64 / seconds.max(1e-9),
        "examples": examples,
    });
    if let Some(source) = &scorer {
        summary["ches"] = ches_summary(args, source, &tok, micro, &kept_pairs, &origins)?;
    }
    if args.bench {
        summary["bench"] = bench(
            &data, split, conv, &tok, &trunc, seed, micro, window, kept_pairs,
        )?;
    }
    Ok(summary)
}

/// CHES and length-normalised CHES of every kept pair under `--model`: their distributions,
/// and the `--top` pairs by length-normalised CHES (what `data.filter_ches_quantile` drops
/// first).
fn ches_summary(
    args: &InspectArgs,
    source: &ModelSource,
    tok: &Tok,
    micro: usize,
    pairs: &[TokenizedPair],
    origins: &[String],
) -> Result<Value> {
    let device = crate::device::parse(&args.device).context("--device")?;
    let model = Model::load(source, false, candle_core::DType::F32, &device)?;
    let name = args.model.as_deref().unwrap_or_default();
    tok.check_fits(model.net.output_layer().vocab_size()?, name)?;
    let scores: Vec<Ches> = ches_scores(&model, pairs, micro, tok.pad_id, &device)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].ln_ches.total_cmp(&scores[a].ln_ches));
    let clip = |ids: &[u32], from_end: bool| -> Result<String> {
        let text = tok.decode(ids)?;
        let chars: Vec<char> = text.chars().collect();
        Ok(match chars.len() {
            n if n <= 80 => text,
            n if from_end => format!("…{}", chars[n - 80..].iter().collect::<String>()),
            _ => format!("{}…", chars[..80].iter().collect::<String>()),
        })
    };
    let top = order
        .iter()
        .take(args.top)
        .map(|&i| {
            let p = &pairs[i];
            Ok(json!({
                "origin": origins[i],
                "ches": scores[i].ches,
                "ln_ches": scores[i].ln_ches,
                "prompt": clip(&p.chosen.ids[..p.chosen.prompt_len], true)?,
                "chosen": clip(&p.chosen.ids[p.chosen.prompt_len..], false)?,
                "rejected": clip(&p.rejected.ids[p.rejected.prompt_len..], false)?,
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "model": name,
        "pairs": scores.len(),
        "ches": float_percentiles(scores.iter().map(|c| c.ches).collect()),
        "ln_ches": float_percentiles(scores.iter().map(|c| c.ln_ches).collect()),
        "top": top,
    }))
}

/// Nearest-rank percentiles of real numbers (NaN sorts last).
fn float_percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    summary(&v, &[10, 25, 50, 75, 90], mean)
}

/// min, the nearest-rank percentiles `ps` and max of `sorted`, and `mean`; `{}` when empty.
fn summary<T: Copy + serde::Serialize>(sorted: &[T], ps: &[usize], mean: f64) -> Value {
    let n = sorted.len();
    if n == 0 {
        return json!({});
    }
    let mut out = serde_json::Map::new();
    out.insert("min".into(), json!(sorted[0]));
    for p in ps {
        let rank = (*p as f64 / 100.0 * n as f64).ceil() as usize;
        out.insert(format!("p{p}"), json!(sorted[rank.clamp(1, n) - 1]));
    }
    out.insert("max".into(), json!(sorted[n - 1]));
    out.insert("mean".into(), json!(mean));
    Value::Object(out)
}

/// Times each stage separately over the same split.
#[allow(clippy::too_many_arguments)]
fn bench(
    data: &DataConfig,
    split: Split,
    conv: std::sync::Arc<super::format::Converter>,
    tok: &Tok,
    trunc: &Truncation,
    seed: u64,
    micro: usize,
    window: usize,
    pairs: Vec<TokenizedPair>,
) -> Result<Value> {
    let t = Instant::now();
    let mut stream = super::pair_stream(data, split, conv.clone(), seed, 0, true)?;
    let mut good = Vec::new();
    for row in stream.by_ref() {
        if let Ok((_, p)) = row? {
            good.push(p);
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    let records = stream.records;
    let t = Instant::now();
    let mut tokenized = 0usize;
    for p in &good {
        tokenized += usize::from(batch::tokenize_pair(tok, p, trunc)?.is_ok());
    }
    let tok_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let lens: Vec<usize> = pairs.iter().map(stream::pair_len).collect();
    let order = stream::epoch_order(&lens, micro, window, seed, 0);
    let mut batches = 0usize;
    for chunk in order.chunks(micro) {
        let b: Vec<TokenizedPair> = chunk.iter().map(|&i| pairs[i].clone()).collect();
        PreferenceBatch::new(&b, tok.pad_id, &candle_core::Device::Cpu)?;
        batches += 1;
    }
    let batch_s = t.elapsed().as_secs_f64();
    let rate = |n: usize, s: f64| n as f64 / s.max(1e-9);
    Ok(json!({
        "read_records_per_second": rate(records, read_s),
        "tokenize_pairs_per_second": rate(good.len(), tok_s),
        "tokenized_pairs": tokenized,
        "batch_pairs_per_second": rate(pairs.len(), batch_s),
        "batches": batches,
        "pipeline_records_per_second": rate(records, read_s + tok_s + batch_s),
    }))
}

/// Mean padding share over micro-batches taken in `order` (what train.rs logs).
fn padding_fraction(lens: &[(usize, usize)], order: &[usize], micro: usize) -> f64 {
    let fractions: Vec<f64> = order
        .chunks(micro)
        .map(|c| {
            let t = c
                .iter()
                .map(|&i| lens[i].0.max(lens[i].1))
                .max()
                .unwrap_or(0);
            let tokens: usize = c.iter().map(|&i| lens[i].0 + lens[i].1).sum();
            if t == 0 {
                0.0
            } else {
                1.0 - tokens as f64 / (2 * c.len() * t) as f64
            }
        })
        .collect();
    fractions.iter().sum::<f64>() / fractions.len().max(1) as f64
}

/// Nearest-rank percentiles.
fn percentiles(mut v: Vec<usize>) -> Value {
    v.sort_unstable();
    let mean = v.iter().sum::<usize>() as f64 / v.len() as f64;
    summary(&v, &[50, 90, 95, 99], mean)
}

/// One pair as tokens: the masked prompt, and each scored token of both responses.
fn example(tok: &Tok, origin: &str, tp: &TokenizedPair) -> Result<Value> {
    // Vocabulary pieces (`▁the`, `Ġthe`), not decoded text: they show token boundaries exactly.
    let pieces = |ids: &[u32]| -> Result<Vec<String>> {
        ids.iter()
            .map(|&i| {
                tok.inner
                    .id_to_token(i)
                    .map_or_else(|| tok.decode(&[i]), Ok)
            })
            .collect()
    };
    Ok(json!({
        "origin": origin,
        "prompt": tok.decode(&tp.chosen.ids[..tp.chosen.prompt_len])?,
        "prompt_tokens": tp.chosen.prompt_len,
        "chosen": pieces(&tp.chosen.ids[tp.chosen.prompt_len..])?,
        "rejected": pieces(&tp.rejected.ids[tp.rejected.prompt_len..])?,
    }))
}

/// The human-readable summary.
fn render(s: &Value) -> String {
    let mut out = format!(
        "{} split: {} records, {} kept, {} skipped, {} truncated to max_length {}\n",
        s["split"].as_str().unwrap_or(""),
        s["records"],
        s["kept"],
        s["skipped_total"],
        s["truncated"],
        s["max_length"]
    );
    if let Some(map) = s["skipped"].as_object().filter(|m| !m.is_empty()) {
        out += "skipped by reason:\n";
        for (k, v) in map {
            out += &format!("  {k:<24} {v}\n");
        }
    }
    out += "token lengths (before truncation)   min    p50    p90    p95    p99    max\n";
    for part in ["prompt", "chosen", "rejected"] {
        let l = &s["lengths"][part];
        out += &format!("  {part:<33}");
        for k in ["min", "p50", "p90", "p95", "p99", "max"] {
            out += &format!("{:>7}", l[k].as_u64().map_or("-".into(), |v| v.to_string()));
        }
        out += "\n";
    }
    out += &format!(
        "padding fraction (micro-batch {}): {:.3} as configured, {:.3} grouped by length (window {})\n",
        s["micro_batch_size"],
        s["padding_fraction"].as_f64().unwrap_or(0.0),
        s["padding_fraction_grouped"].as_f64().unwrap_or(0.0),
        s["group_by_length_window"]
    );
    out += &format!(
        "read + tokenized {:.0} records/s\n",
        s["records_per_second"].as_f64().unwrap_or(0.0)
    );
    if let Some(c) = s["ches"].as_object() {
        out += &format!(
            "CHES under {} ({} pairs; higher = more likely to push the chosen response down)\n",
            c["model"].as_str().unwrap_or(""),
            c["pairs"]
        );
        out += "                             min        p10        p25        p50        p75        p90        max\n";
        for (key, label) in [("ches", "CHES"), ("ln_ches", "length-normalised CHES")] {
            out += &format!("  {label:<22}");
            for k in ["min", "p10", "p25", "p50", "p75", "p90", "max"] {
                out += &format!(" {:>10.4}", c[key][k].as_f64().unwrap_or(f64::NAN));
            }
            out += "\n";
        }
        for (i, t) in c["top"].as_array().into_iter().flatten().enumerate() {
            out += &format!(
                "  #{} {}: length-normalised CHES {:.4}, CHES {:.4}\n    prompt   {:?}\n    chosen   {:?}\n    rejected {:?}\n",
                i + 1,
                t["origin"].as_str().unwrap_or(""),
                t["ln_ches"].as_f64().unwrap_or(f64::NAN),
                t["ches"].as_f64().unwrap_or(f64::NAN),
                t["prompt"].as_str().unwrap_or(""),
                t["chosen"].as_str().unwrap_or(""),
                t["rejected"].as_str().unwrap_or(""),
            );
        }
    }
    if let Some(b) = s["bench"].as_object() {
        out += "bench (records or pairs per second):\n";
        for (k, v) in b {
            out += &format!("  {k:<32} {:.0}\n", v.as_f64().unwrap_or(0.0));
        }
    }
    for (i, ex) in s["examples"].as_array().into_iter().flatten().enumerate() {
        out += &format!(
            "\n── example {} ({})\n",
            i + 1,
            ex["origin"].as_str().unwrap_or("")
        );
        out += &format!(
            "prompt (masked, {} tokens):\n{}\n",
            ex["prompt_tokens"],
            ex["prompt"].as_str().unwrap_or("")
        );
        for side in ["chosen", "rejected"] {
            let pieces: Vec<String> = ex[side]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{:?}", p.as_str().unwrap_or("")))
                .collect();
            out += &format!(
                "{side} (scored, {} tokens): {}\n",
                pieces.len(),
                pieces.join(" ")
            );
        }
    }
    out
}
