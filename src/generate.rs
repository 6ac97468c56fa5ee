//! `dpo-sam generate`: continuations of prompts from a preference data file (or `--prompt`),
//! in left-padded batches with a KV cache, greedy or sampled, written as JSONL that `dpo-sam
//! eval` reads (`id`, `prompt`, `completion`, token counts and the settings used).
//!
//! The decoding itself (batches, KV cache, sampling) is [`crate::decode`]'s.

use crate::config::{BuiltinModel, DataFormat, Dtype};
use crate::data::{format, source};
use crate::decode::{completion_text, generate_batch, Completion, Finish, Sampling};
use crate::models::{Model, ModelSource};
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Batches per length-sorted window of prompts.
const SORT_WINDOW_BATCHES: usize = 16;

const GUIDE: &str = "\
Prompts come from --data (any file or Hub dataset `dpo-sam train` reads; each record's prompt is
found as training finds it: the `prompt` field, the dialogue up to the last `\\n\\nAssistant:` for
Anthropic HH, TRL's TL;DR prompt, or a chat-templated conversation) or from --prompt. Records
whose prompt repeats an earlier one are skipped.

Decoding: --temperature 0 is greedy; otherwise logits are divided by the temperature, cut to the
--top-k most likely tokens, then to the smallest set whose probability reaches --top-p, and
sampled. --preset hh / tldr use the DPO paper's settings (temperature 0 for Anthropic HH, 1 for
TL;DR); explicit flags override a preset. Each row stops at the tokenizer's EOS token or after
--max-new-tokens.

Output, one JSON line per prompt: id (the record's `id`, else FILE:LINE), prompt, completion,
prompt_tokens, completion_tokens (EOS not counted), finish_reason (`eos` or `length`) and
settings. Generation speed (new tokens per second) is printed on stderr at the end.

Example:
  dpo-sam generate --model runs/dpo --data ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz \\
      --preset hh --max-new-tokens 256 --limit 500 --out dpo.jsonl";

/// The DPO paper's decoding settings per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Anthropic HH dialogue: greedy (temperature 0).
    Hh,
    /// Reddit TL;DR summarisation: temperature 1.
    Tldr,
}

impl Preset {
    fn name(self) -> &'static str {
        match self {
            Preset::Hh => "hh",
            Preset::Tldr => "tldr",
        }
    }

    fn temperature(self) -> f64 {
        match self {
            Preset::Hh => 0.0,
            Preset::Tldr => 1.0,
        }
    }
}

/// Generate completions for a data file's prompts (or one `--prompt`) and write them as JSONL.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example: dpo-sam generate --model runs/dpo --data test.jsonl --preset hh --out dpo.jsonl   \
                  (--help for details)",
    after_long_help = GUIDE
)]
pub struct GenerateArgs {
    /// Model: a Hugging Face-format directory, a Hub repo id, `builtin:tiny-gpt2` or
    /// `random:CONFIG`.
    #[arg(long, value_name = "PATH")]
    pub model: String,

    /// Preference data whose prompts to continue: a file (.jsonl, .jsonl.gz, .json, .parquet),
    /// a glob, or a Hub dataset (`hub:ORG/NAME[:SPLIT]`).
    #[arg(long, value_name = "PATH", required_unless_present = "prompt")]
    pub data: Option<String>,

    /// A single prompt instead of --data.
    #[arg(long, value_name = "TEXT", conflicts_with = "data")]
    pub prompt: Option<String>,

    /// Output JSONL file (default: stdout).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Record format of --data: auto, hh, explicit, implicit, conversational or tldr.
    #[arg(long, default_value = "auto")]
    pub format: String,

    /// Split read from Hub dataset sources without a `:SPLIT` suffix.
    #[arg(long, default_value = "test")]
    pub split: String,

    /// Chat template for conversational records (default: the model's tokenizer_config.json).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// Use at most this many prompts (after skipping bad and repeated ones).
    #[arg(long)]
    pub limit: Option<usize>,

    /// The paper's decoding settings: `hh` (temperature 0) or `tldr` (temperature 1).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,

    /// Sampling temperature; 0 is greedy [default: the preset's, else 0].
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Nucleus sampling: only among the most likely tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f64>,

    /// Seed of the sampling streams (one per prompt).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,

    /// Keep only the last N prompt tokens of longer prompts.
    #[arg(long, value_name = "N")]
    pub max_prompt_length: Option<usize>,

    /// Prompts decoded together (left-padded).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,

    /// cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// A prompt to continue and the id its completion is written under.
pub struct PromptRecord {
    pub id: String,
    pub text: String,
}

/// Prompts of a data source, read as training reads it, with skipped rows counted by reason.
pub fn read_prompts(
    spec: &str,
    format: DataFormat,
    split: &str,
    chat_template: Option<&Path>,
    tok: &Tok,
    model_dir: Option<&Path>,
    limit: Option<usize>,
) -> Result<(Vec<PromptRecord>, BTreeMap<&'static str, usize>)> {
    let files = source::expand(&[spec], split).context("--data")?;
    let cfg: crate::config::DataConfig = serde_json::from_value(json!({
        "train": spec, "format": format, "chat_template": chat_template,
    }))
    .context("--data")?;
    let converter = crate::data::converter(&cfg, tok, model_dir).context("--format")?;
    let mut prompts = Vec::new();
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut seen_prompts = HashSet::new();
    let mut seen_ids = HashSet::new();
    for file in files {
        for raw in source::open(&file)? {
            if limit.is_some_and(|n| prompts.len() >= n) {
                return Ok((prompts, skipped));
            }
            let (origin, record) = match raw {
                Ok(r) => r,
                Err(e) => {
                    *skipped.entry(e.reason).or_default() += 1;
                    continue;
                }
            };
            let text = match converter.convert(&origin, &record)? {
                Ok(pair) => pair.prompt,
                Err(e) => {
                    // A prompt needs no responses: prompt-only files, or pairs that training
                    // rejects (identical or empty responses), still give their prompt.
                    let format = match converter.format {
                        DataFormat::Auto => format::detect(&record),
                        f => f,
                    };
                    match record.get("prompt") {
                        Some(Value::String(p)) if format == DataFormat::Explicit => p.clone(),
                        _ => {
                            *skipped.entry(e.reason).or_default() += 1;
                            continue;
                        }
                    }
                }
            };
            if !seen_prompts.insert(text.clone()) {
                *skipped.entry("repeated_prompt").or_default() += 1;
                continue;
            }
            let file_name = Path::new(&*origin.file)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            let fallback = format!(
                "{}:{}",
                file_name.as_deref().unwrap_or(&origin.file),
                origin.line
            );
            let id = match record.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => fallback.clone(),
            };
            // `eval` refuses repeated ids, so a repeat falls back to the record's place.
            let id = if seen_ids.insert(id.clone()) {
                id
            } else {
                fallback
            };
            seen_ids.insert(id.clone());
            prompts.push(PromptRecord { id, text });
        }
    }
    Ok((prompts, skipped))
}

/// Prompt token ids: the tokenizer's own encoding (BOS where it adds one), cut from the left to
/// `max_len`; an empty prompt starts from BOS (else EOS), as unconditional generation does.
fn prompt_ids(tok: &Tok, text: &str, max_len: Option<usize>) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text)?;
    if ids.is_empty() {
        ids.push(tok.bos_id.unwrap_or(tok.eos_id));
    }
    if let Some(n) = max_len {
        let cut = ids.len().saturating_sub(n.max(1));
        ids.drain(..cut);
    }
    Ok(ids)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: args
            .temperature
            .or(args.preset.map(Preset::temperature))
            .unwrap_or(0.0),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
    };
    sampling.check()?;
    if args.batch_size == 0 {
        bail!("--batch-size: must be at least 1");
    }
    if args.max_prompt_length == Some(0) {
        bail!("--max-prompt-length: must be at least 1");
    }
    let device = crate::device::parse(&args.device)?;
    let dtype = args.dtype.parse::<Dtype>().context("--dtype")?.dtype();
    let format: DataFormat = args.format.parse().context("--format")?;
    let source = ModelSource::resolve(&args.model, &BuiltinModel::default(), 0)?;
    let tok = source.tokenizer()?;
    let model = Model::load(&source, false, dtype, &device)?;
    tok.check_fits(model.net.output_layer().vocab_size()?, &args.model)?;

    let (prompts, skipped) = match (&args.data, &args.prompt) {
        (_, Some(text)) => (
            vec![PromptRecord {
                id: "0".into(),
                text: text.clone(),
            }],
            BTreeMap::new(),
        ),
        (Some(spec), None) => read_prompts(
            spec,
            format,
            &args.split,
            args.chat_template.as_deref(),
            &tok,
            source.dir(),
            args.limit,
        )?,
        (None, None) => bail!("give --data or --prompt"),
    };
    if !skipped.is_empty() {
        let list: Vec<String> = skipped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        eprintln!("skipped records: {}", list.join(", "));
    }
    if prompts.is_empty() {
        bail!(
            "{}: no prompts to continue",
            args.data.as_deref().unwrap_or("--prompt")
        );
    }

    let settings = json!({
        "model": args.model,
        "preset": args.preset.map(Preset::name),
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "max_new_tokens": sampling.max_new_tokens,
        "max_prompt_length": args.max_prompt_length,
        "eos_token_id": tok.eos_id,
        "dtype": args.dtype,
    });
    let mut sink: Box<dyn Write> = match &args.out {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Box::new(std::io::BufWriter::new(file))
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let out_name = args
        .out
        .as_ref()
        .map_or("stdout".to_string(), |p| p.display().to_string());

    let started = Instant::now();
    let (mut new_tokens, mut prompt_tokens, mut done) = (0usize, 0usize, 0usize);
    let bar = crate::progress::bar(
        "generating",
        prompts.len() as u64,
        crate::progress::Unit::Items("prompts"),
    );
    // Prompts of similar length share a batch (less padding to attend over), within windows
    // that are written in input order as each finishes.
    for window in prompts.chunks(args.batch_size * SORT_WINDOW_BATCHES) {
        let ids = window
            .iter()
            .map(|p| prompt_ids(&tok, &p.text, args.max_prompt_length))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..window.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut completions: Vec<Option<Completion>> = vec![None; window.len()];
        for batch in order.chunks(args.batch_size) {
            let rows: Vec<Vec<u32>> = batch.iter().map(|&i| ids[i].clone()).collect();
            let streams: Vec<u64> = batch.iter().map(|&i| (done + i) as u64).collect();
            let out = generate_batch(
                &model,
                &rows,
                &streams,
                Some(tok.eos_id),
                tok.pad_id,
                &sampling,
                &device,
            )
            .with_context(|| format!("generating for prompts {streams:?}"))?;
            for (&i, c) in batch.iter().zip(out) {
                completions[i] = Some(c);
            }
            bar.inc(batch.len() as u64);
        }
        for ((p, ids), c) in window
            .iter()
            .zip(&ids)
            .zip(completions.into_iter().flatten())
        {
            prompt_tokens += ids.len();
            new_tokens += c.tokens.len() + (c.finish == Finish::Eos) as usize;
            let line = json!({
                "id": p.id,
                "prompt": p.text,
                "completion": completion_text(&tok, ids, &c.tokens)?,
                "prompt_tokens": ids.len(),
                "completion_tokens": c.tokens.len(),
                "finish_reason": c.finish.name(),
                "settings": settings,
            });
            writeln!(sink, "{line}").with_context(|| format!("cannot write {out_name}"))?;
        }
        sink.flush()
            .with_context(|| format!("cannot write {out_name}"))?;
        done += window.len();
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "generated {new_tokens} tokens for {} prompts ({prompt_tokens} prompt tokens) in {secs:.2} s: {:.1} tokens/s",
        prompts.len(),
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
