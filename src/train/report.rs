//! Where a run's records go, through one sink the loop writes to: `metrics.jsonl` (always:
//! resume, `plot` and `report` read it), TensorBoard event files (`training.report_to`), and
//! `samples.jsonl` with the completions generated at each evaluation
//! (`training.eval_generate`). A checkpoint records how far each was written; resuming cuts
//! each back there and appends, so no step is ever logged twice.
//!
//! The run's resolved config is also written to `output_dir/training_config.toml` (what
//! `dpo-sam report` compares runs by).
//!
//! TensorBoard tags are those of `transformers`' `TensorBoardCallback`: `train/<metric>` for
//! training lines, `eval/<metric>` for `eval_<metric>`; the run's config is the text `args`,
//! the model's `config.json` the text `model_config`, and samples the texts `samples/<i>`.

use super::metrics::{DataLine, EvalLine, MetricsFile};
use super::Trainer;
use crate::checkpoint::TrainerState;
use crate::decode::{completion_text, generate_batch};
use crate::tensorboard::{EventWriter, Position};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

const METRICS: &str = "metrics.jsonl";
const SAMPLES: &str = "samples.jsonl";
/// The resolved config of the run (of its latest start, when resumed).
pub const CONFIG: &str = "training_config.toml";

/// One generated completion of an evaluation: a line of `samples.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub step: usize,
    /// Position of the prompt among the eval pairs.
    pub index: usize,
    pub prompt: String,
    pub completion: String,
    pub prompt_tokens: usize,
    /// New tokens, without the EOS that ended them.
    pub completion_tokens: usize,
    /// `eos` or `length`.
    pub finish_reason: &'static str,
}

/// The run's outputs, open for appending.
pub(super) struct RunLog {
    metrics: MetricsFile,
    samples: Option<MetricsFile>,
    events: Option<EventWriter>,
    out_dir: PathBuf,
}

impl RunLog {
    /// Opens the outputs under `output_dir`: fresh ones (metrics.jsonl starting with the data
    /// line, a new TensorBoard run directory), or, resumed, the ones the checkpoint recorded,
    /// cut to what it had seen.
    pub(super) fn open(tr: &Trainer) -> Result<RunLog> {
        let out_dir = tr.cfg.output_dir.clone();
        let state = &tr.state;
        let resumed = state.step > 0;
        // Data parallel: the other ranks count metrics lines (the checkpoint records them) and
        // write nothing.
        if tr.world.rank() != 0 {
            return Ok(RunLog {
                metrics: MetricsFile::discard(match resumed {
                    true => state.metrics_lines,
                    false => 1,
                }),
                samples: None,
                events: None,
                out_dir,
            });
        }
        let config = toml::to_string(&tr.cfg).context("cannot serialise the config")?;
        let config_path = out_dir.join(CONFIG);
        std::fs::write(&config_path, config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let metrics_path = out_dir.join(METRICS);
        let metrics = match resumed {
            true => MetricsFile::open(&metrics_path, Some(state.metrics_lines))?,
            false => {
                let mut file = MetricsFile::open(&metrics_path, None)?;
                file.write(&DataLine {
                    train_pairs: tr.stream.is_none().then_some(tr.train_pairs.len()),
                    eval_pairs: tr.eval_pairs.len(),
                    skipped: &tr.skipped,
                    streaming: tr.stream.is_some().then_some(true),
                })?;
                file
            }
        };
        let samples_path = out_dir.join(SAMPLES);
        let samples = if tr.cfg.training.eval_generate > 0 || samples_path.exists() {
            let keep = resumed.then_some(state.samples_lines);
            Some(MetricsFile::open(&samples_path, keep)?)
        } else {
            None
        };
        let events = match tr.cfg.training.report_to.tensorboard() {
            true => Some(open_events(tr, &out_dir)?),
            false => None,
        };
        Ok(RunLog {
            metrics,
            samples,
            events,
            out_dir,
        })
    }

    /// Appends a line to metrics.jsonl and, when it has a `step`, its numbers as TensorBoard
    /// scalars.
    pub(super) fn write<T: Serialize>(&mut self, line: &T) -> Result<()> {
        self.metrics.write(line)?;
        let Some(events) = &mut self.events else {
            return Ok(());
        };
        let value = serde_json::to_value(line)?;
        let Some(step) = value.get("step").and_then(|s| s.as_i64()) else {
            return Ok(());
        };
        let scalars: Vec<(String, f64)> = value
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| Some((tensorboard_tag(k), v.as_f64()?)))
            .collect();
        events.scalars(step, &scalars)
    }

    /// Appends an evaluation's samples to samples.jsonl and TensorBoard.
    fn samples(&mut self, samples: &[Sample]) -> Result<()> {
        let Some(file) = self.samples.as_mut() else {
            return Ok(());
        };
        for s in samples {
            file.write(s)?;
        }
        if let (Some(events), Some(first)) = (&mut self.events, samples.first()) {
            let texts: Vec<(String, String)> = samples
                .iter()
                .map(|s| {
                    let text = format!(
                        "**prompt** ({} tokens)\n\n{}\n\n**completion** ({} tokens, {})\n\n{}",
                        s.prompt_tokens,
                        code_block(&s.prompt),
                        s.completion_tokens,
                        s.finish_reason,
                        code_block(&s.completion)
                    );
                    (format!("samples/{}", s.index), text)
                })
                .collect();
            events.texts(first.step as i64, &texts)?;
        }
        Ok(())
    }

    /// Records in `state` how far each output is written (the TensorBoard file synced first),
    /// for the checkpoint about to be saved.
    pub(super) fn record(&mut self, state: &mut TrainerState) -> Result<()> {
        state.metrics_lines = self.metrics.lines();
        state.samples_lines = self.samples.as_ref().map_or(0, MetricsFile::lines);
        state.tensorboard = match &mut self.events {
            Some(events) => Some(Position {
                bytes: events.sync()?,
                file: events
                    .path()
                    .strip_prefix(&self.out_dir)
                    .unwrap_or(events.path())
                    .to_path_buf(),
            }),
            None => None,
        };
        Ok(())
    }
}

/// `transformers`' `rewrite_logs`: `eval_x` → `eval/x`, anything else → `train/x`.
fn tensorboard_tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

/// Text shown verbatim by TensorBoard's markdown: an indented code block.
fn code_block(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The events file to append to: on resume, the one the checkpoint recorded, cut to its
/// recorded length (a new file beside it if that one is gone or short: it then lacks steps but
/// repeats none); otherwise a new run directory `runs/<date>_<host>` whose first events are
/// the config and the model's config.json.
fn open_events(tr: &Trainer, out_dir: &Path) -> Result<EventWriter> {
    if let (true, Some(pos)) = (tr.state.step > 0, &tr.state.tensorboard) {
        let path = out_dir.join(&pos.file);
        match EventWriter::resume(&path, pos.bytes) {
            Ok(w) => return Ok(w),
            Err(e) => {
                eprintln!("warning: TensorBoard: {e:#}; continuing in a new events file");
                if let Some(dir) = path.parent() {
                    return EventWriter::create(dir);
                }
            }
        }
    }
    let runs = out_dir.join("runs");
    let name = crate::tensorboard::run_name();
    let mut dir = runs.join(&name);
    // Two runs started in the same second on one host get distinct directories.
    for n in 1.. {
        if !dir.exists() {
            break;
        }
        dir = runs.join(format!("{name}_{n}"));
    }
    let mut w = EventWriter::create(&dir)?;
    let config = toml::to_string(&tr.cfg).context("cannot serialise the config")?;
    let model_config = serde_json::to_string_pretty(&tr.policy.config_json)?;
    w.texts(
        tr.state.step as i64,
        &[
            ("args".into(), code_block(&config)),
            ("model_config".into(), code_block(&model_config)),
        ],
    )?;
    Ok(w)
}

impl Trainer {
    /// Evaluates, logs the `eval_` line, and with `training.eval_generate` generates and logs
    /// the samples.
    pub(super) fn log_evaluation(&self, log: &mut RunLog, step: usize) -> Result<EvalLine> {
        let line = EvalLine {
            metrics: self.evaluate()?,
            num_tokens: self.state.num_tokens,
            step,
        };
        log.write(&line)?;
        // Generation is not collective: rank 0 alone samples (and writes).
        if self.cfg.training.eval_generate > 0 && self.world.rank() == 0 {
            // Samples are for watching the run: a model that cannot be sampled from (NaN
            // logits after skipped non-finite steps) gets a warning, not a stopped run.
            match self.eval_samples(step) {
                Ok(samples) => log.samples(&samples)?,
                Err(e) => eprintln!("warning: no evaluation samples at step {step}: {e:#}"),
            }
        }
        Ok(line)
    }

    /// Completions of the policy for the first `training.eval_generate` eval prompts (as
    /// tokenised for training, so truncated alike), decoded with the `[generate]` settings in
    /// micro-batches; each prompt samples from its own stream, so the batching changes nothing.
    pub fn eval_samples(&self, step: usize) -> Result<Vec<Sample>> {
        let n = self.cfg.training.eval_generate.min(self.eval_pairs.len());
        let prompts: Vec<Vec<u32>> = self.eval_pairs[..n]
            .iter()
            .map(|p| match p.chosen.prompt_len {
                // Unconditional, as `generate` starts an empty prompt.
                0 => vec![self.tok.bos_id.unwrap_or(self.tok.eos_id)],
                len => p.chosen.ids[..len].to_vec(),
            })
            .collect();
        let micro = self.cfg.micro_batch_size();
        let mut out = Vec::with_capacity(n);
        for (c, chunk) in prompts.chunks(micro).enumerate() {
            let first = c * micro;
            let streams: Vec<u64> = (first..first + chunk.len()).map(|i| i as u64).collect();
            let completions = generate_batch(
                &self.policy,
                chunk,
                &streams,
                Some(self.tok.eos_id),
                self.tok.pad_id,
                &self.cfg.generate,
                &self.device,
            )
            .with_context(|| format!("generating eval samples at step {step}"))?;
            for (i, (prompt, done)) in chunk.iter().zip(completions).enumerate() {
                out.push(Sample {
                    step,
                    index: first + i,
                    prompt: self
                        .tok
                        .inner
                        .decode(prompt, true)
                        .map_err(|e| anyhow::anyhow!("decoding eval prompt {}: {e}", first + i))?,
                    completion: completion_text(&self.tok, prompt, &done.tokens)?,
                    prompt_tokens: prompt.len(),
                    completion_tokens: done.tokens.len(),
                    finish_reason: done.finish.name(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_transformers_rewrite_logs() {
        assert_eq!(tensorboard_tag("loss"), "train/loss");
        assert_eq!(tensorboard_tag("rewards/margins"), "train/rewards/margins");
        assert_eq!(
            tensorboard_tag("eval_rewards/accuracies"),
            "eval/rewards/accuracies"
        );
        assert_eq!(tensorboard_tag("epoch"), "train/epoch");
    }
}
