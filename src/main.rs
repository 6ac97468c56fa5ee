//! `dpo-sam` command line: each subcommand lives in the library module of the same name.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dpo-sam",
    version,
    about = "Preference optimisation (DPO, SLiC-HF, CPO, …) with logits-SAM, on candle",
    long_about = "Preference optimisation (DPO, SLiC-HF, CPO, …) with logits-SAM, on candle.\n\n\
        Start with `dpo-sam train --config configs/tiny_gpt2.toml`: a tiny GPT-2 trained on a \
        built-in preference task, offline, in about a minute on a laptop CPU."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time plain, logits-SAM and full-SAM training steps side by side.
    Bench(dpo_sam::bench::BenchArgs),
    /// Train a policy with DPO (or another preference loss), optionally with logits-SAM.
    Train(dpo_sam::train::TrainArgs),
    /// Per-pair log-probs, rewards and loss of a model (and reference) on a preference file, as
    /// JSONL, with a summary (mean loss, reward accuracy, mean margin).
    Score(dpo_sam::score::ScoreArgs),
    /// Pairwise LLM-judge win rate against a baseline: build judge prompts, send them, score.
    Eval(dpo_sam::eval::EvalArgs),
    /// Simulate the paper's §3.2 toy (fixed-feature softmax regression): the squeezing effect of
    /// a negative learning rate under GD, SAM ρ > 0 and SAM ρ < 0, to CSV and PNG charts.
    Toy(dpo_sam::toy::ToyArgs),
    /// Chart metrics.jsonl files of one or more runs: one PNG per metric, one line per run.
    Plot(dpo_sam::plot::PlotArgs),
    /// Look at preference data before training: `data inspect` counts records and skipped rows
    /// by reason, token-length percentiles, padding, and shows which tokens are scored.
    Data(dpo_sam::data::inspect::DataArgs),
    /// Configs: `config from-trl` converts a TRL / alignment-handbook recipe into a dpo-sam
    /// TOML, listing every field it cannot carry over.
    Config(dpo_sam::trl::ConfigArgs),
    /// Generate completions for a data file's prompts as JSONL for `eval` (batched, KV cache,
    /// greedy or sampled; `--preset hh|tldr` for the paper's settings).
    Generate(dpo_sam::generate::GenerateArgs),
    /// CUDA-vs-CPU parity of each CUDA kernel with its CPU twin, and of logits, log-probs and
    /// one step's gradients on tiny GPT-2, GPT-NeoX and Mistral models, as JSON (docs/gpu.md).
    #[command(name = "gpu-check", hide = true)]
    GpuCheck(dpo_sam::gpucheck::GpuCheckArgs),
}

fn main() {
    dpo_sam::device::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => dpo_sam::bench::run(args),
        Command::Train(args) => dpo_sam::train::run(args),
        Command::Score(args) => dpo_sam::score::run(args),
        Command::Eval(args) => dpo_sam::eval::run(args),
        Command::Toy(args) => dpo_sam::toy::run(args),
        Command::Plot(args) => dpo_sam::plot::run(args),
        Command::Data(args) => dpo_sam::data::inspect::run(args),
        Command::Generate(args) => dpo_sam::generate::run(args),
        Command::Config(args) => dpo_sam::trl::run(args),
        Command::GpuCheck(args) => dpo_sam::gpucheck::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
