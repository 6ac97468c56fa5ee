//! `dpo-sam eval`: pairwise win-rate evaluation with an LLM judge, in the style of the DPO
//! paper. Owns the command-line surface and runs the three stages in order: build judge
//! prompts (`judge`, from `templates`), send them (`client`), score the replies (verdicts from
//! `verdict`, statistics from `stats`).

pub mod client;
pub mod judge;
pub mod stats;
pub mod templates;
pub mod verdict;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use judge::{Baseline, JudgeSettings, MatchBy};
use templates::Template;

const GUIDE: &str = "\
Pairwise win rate of a policy against a baseline, judged by an LLM in the style of the DPO paper
(Rafailov et al. 2023, appendix C.2). Three stages, run in this order by whichever flags you pass:

  --judge        write one JSON line per comparison to --comparisons: the full judge prompt, the
                 A/B order (randomised per line from --seed, recorded as policy_position) and an
                 OpenAI chat-completions request body, ready for any compatible judge.
  --judge-url    send those requests (bounded concurrency, retries with backoff) and append the
                 replies to --replies; a rerun skips the comparisons already answered.
  --score        take the verdict from the LAST reply line that starts with the prompt's answer
                 label (\"Preferred: A\", \"**More helpful:** b.\"; \"tie\"/\"equal\" is a tie);
                 anything else is counted invalid by reason, never guessed. Undo the A/B order and
                 report the win rate (ties count half, invalid replies are left out), a bootstrap
                 95% interval, the win rate by the policy's position and by length difference,
                 and a length-controlled win rate (logistic fit of win on length difference,
                 read off at equal length, after AlpacaEval's LC win rate).

Inputs are JSONL generations with `prompt`, `completion` and optionally `id` (as written by
`dpo-sam generate`). Replies may also come from elsewhere: lines of {\"id\", \"reply\"}, chat
completion objects carrying the comparison's `id`, or OpenAI Batch API output (`custom_id`).

Custom judge prompt (--task FILE): the first line names the label of the answer line the judge
must end with, the rest is the prompt with {prompt}, {response_a} and {response_b}
({{ and }} are literal braces):

  # answer-label: Preferred
  Which response is more factual? ...

Example:
  dpo-sam eval --judge --task tldr --policy dpo.jsonl --baseline sft.jsonl \\
      --comparisons cmp.jsonl
  dpo-sam eval --judge-url https://api.openai.com/v1 --judge-model gpt-4o \\
      --comparisons cmp.jsonl --replies replies.jsonl --score";

/// Pairwise LLM-judge evaluation: build judge prompts, send them, score the win rate.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example: dpo-sam eval --judge --task tldr --policy dpo.jsonl --baseline sft.jsonl \
                  --comparisons cmp.jsonl   (--help for the whole workflow)",
    after_long_help = GUIDE
)]
pub struct EvalArgs {
    /// Build judge prompts from --policy and a baseline into --comparisons.
    #[arg(long)]
    pub judge: bool,

    /// Send --comparisons to this OpenAI-compatible endpoint (`…/v1` or
    /// `…/v1/chat/completions`), appending replies to --replies.
    #[arg(long, value_name = "URL")]
    pub judge_url: Option<String>,

    /// Score --replies against --comparisons and print the report.
    #[arg(long)]
    pub score: bool,

    /// Comparisons JSONL: written by --judge, read by --judge-url and --score.
    #[arg(long, value_name = "FILE")]
    pub comparisons: PathBuf,

    /// Judge replies JSONL: appended to by --judge-url, read by --score.
    #[arg(long, value_name = "FILE")]
    pub replies: Option<PathBuf>,

    /// The policy's generations (JSONL: prompt, completion, optional id).
    #[arg(long, value_name = "FILE", help_heading = "Judge prompts")]
    pub policy: Option<PathBuf>,

    /// The baseline's generations, e.g. the SFT model's (same format as --policy).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "baseline_data",
        help_heading = "Judge prompts"
    )]
    pub baseline: Option<PathBuf>,

    /// Use the dataset's chosen responses as the baseline (JSONL: prompt, chosen), matched to
    /// the policy by prompt text.
    #[arg(long, value_name = "FILE", help_heading = "Judge prompts")]
    pub baseline_data: Option<PathBuf>,

    /// Judge prompt: `hh` (which response is more helpful), `tldr` (which summary is better),
    /// or the path of a template file (see below).
    #[arg(long, value_name = "hh|tldr|FILE", help_heading = "Judge prompts")]
    pub task: Option<String>,

    /// How policy and baseline lines are paired.
    #[arg(long = "match", value_enum, default_value_t = MatchBy::Auto, help_heading = "Judge prompts")]
    pub match_by: MatchBy,

    /// Seed of the A/B order (each line uses its own stream: seed and policy line index) and
    /// of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Judge model named in the request bodies [default with --judge: gpt-4o]; with
    /// --judge-url it overrides the model in --comparisons.
    #[arg(long, value_name = "NAME")]
    pub judge_model: Option<String>,

    /// max_tokens of each judge request.
    #[arg(long, default_value_t = 256, help_heading = "Judge prompts")]
    pub max_tokens: u32,

    /// Environment variable holding the judge's API key (optional for localhost URLs).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "OPENAI_API_KEY",
        help_heading = "Sending"
    )]
    pub api_key_env: String,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 4, help_heading = "Sending")]
    pub concurrency: usize,

    /// Retries per request after 408, 429, 5xx and network errors.
    #[arg(long, default_value_t = 6, help_heading = "Sending")]
    pub retries: u32,

    /// First retry delay in milliseconds; doubles each retry (with jitter, at most 60 s).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 1000,
        help_heading = "Sending"
    )]
    pub retry_base_ms: u64,

    /// Timeout of one request, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 120,
        help_heading = "Sending"
    )]
    pub timeout: u64,

    /// Print the score report as one JSON object instead of a table.
    #[arg(long, help_heading = "Scoring")]
    pub json: bool,

    /// Bootstrap resamples for the 95% interval.
    #[arg(long, default_value_t = 2000, help_heading = "Scoring")]
    pub bootstrap: usize,

    /// Equal-count bins of the length difference (policy − baseline characters).
    #[arg(long, default_value_t = 4, help_heading = "Scoring")]
    pub length_bins: usize,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if !(args.judge || args.score || args.judge_url.is_some()) {
        bail!(
            "nothing to do: pass --judge, --judge-url and/or --score (see `dpo-sam eval --help`)"
        );
    }
    if args.judge {
        let policy = args
            .policy
            .as_deref()
            .context("--judge needs --policy FILE (the policy's generations)")?;
        let baseline = match (&args.baseline, &args.baseline_data) {
            (Some(p), None) => Baseline::Generations(p.clone()),
            (None, Some(p)) => Baseline::Chosen(p.clone()),
            _ => bail!("--judge needs a baseline: --baseline FILE or --baseline-data FILE"),
        };
        let task = args
            .task
            .as_deref()
            .context("--judge needs --task hh|tldr|FILE")?;
        let template = Template::load(task)?;
        let settings = JudgeSettings {
            template: &template,
            seed: args.seed,
            model: args.judge_model.as_deref().unwrap_or("gpt-4o"),
            max_tokens: args.max_tokens,
        };
        let summary = judge::run(
            policy,
            &baseline,
            args.match_by,
            &settings,
            &args.comparisons,
        )?;
        eprintln!("{summary}");
    }
    let replies = || {
        args.replies
            .as_deref()
            .context("--judge-url and --score need --replies FILE")
    };
    if let Some(url) = &args.judge_url {
        let comparisons = judge::read_comparisons(&args.comparisons)?;
        let opts = client::ClientOptions {
            url: url.clone(),
            api_key_env: args.api_key_env.clone(),
            model: args.judge_model.clone().filter(|_| !args.judge),
            concurrency: args.concurrency,
            retries: args.retries,
            retry_base: Duration::from_millis(args.retry_base_ms),
            timeout: Duration::from_secs(args.timeout),
        };
        let replies = replies()?;
        let s = client::send(&comparisons, replies, &opts)?;
        eprintln!(
            "judged {} comparisons into {} ({} already there, {} failed)",
            s.sent,
            replies.display(),
            s.already_done,
            s.failed.len()
        );
        if let Some(msg) = s.aborted {
            bail!(
                "the judge endpoint refused the request ({msg}); check --judge-url and the API key"
            );
        }
        if let Some((id, msg)) = s.failed.first() {
            bail!(
                "{} requests failed (first: id `{id}`: {msg}); rerun the same command to retry \
                 only those",
                s.failed.len()
            );
        }
    }
    if args.score {
        let comparisons = judge::read_comparisons(&args.comparisons)?;
        let replies = verdict::read_replies(replies()?, &comparisons)?;
        let opts = stats::ScoreOptions {
            bootstrap: args.bootstrap,
            seed: args.seed,
            length_bins: args.length_bins,
        };
        let report = stats::score(&comparisons, replies, &opts);
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.table());
        }
    }
    Ok(())
}

/// Non-blank lines of a text file with their 1-based line numbers.
pub(crate) fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect())
}

#[cfg(test)]
pub(crate) fn write_jsonl(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}
