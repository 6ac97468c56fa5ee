//! What a run reports: the lines of `metrics.jsonl` (TRL's metric names), the summary printed at
//! the end, and the file they go to. Each line is a typed struct; it is written through
//! `serde_json::Value`, whose map orders keys alphabetically, so files stay byte-for-byte what
//! earlier versions wrote.

use super::step::MicroStep;
use crate::data::batch::PreferenceBatch;
use crate::diagnostics::Diagnostics;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One step's (or one evaluation's) micro-batches, summed the way TRL averages them: each
/// micro-batch contributes its own means (over its pairs, or over its tokens for the token
/// metrics), and a line reports the mean over micro-batches. With equal micro-batches that is
/// the mean over pairs; an epoch's smaller last micro-batch weighs as much as the others, as in
/// TRL (its `_metrics` lists, and HF's loss divided by the step's micro-batch count).
/// Every field is a sum: the ranks of a data-parallel run add theirs field by field (see
/// `parallel::sum_tallies`), so a field that is not a sum needs its own reduction there.
#[derive(Default, Serialize, Deserialize)]
pub(super) struct Tally {
    micro_batches: f64,
    pairs: f64,
    /// Σ over micro-batches of the micro-batch loss, and of loss × pairs (HF's eval loss is a
    /// mean over examples).
    loss: f64,
    loss_by_pairs: f64,
    chosen_rewards: f64,
    rejected_rewards: f64,
    accuracies: f64,
    margins: f64,
    chosen_logps: f64,
    rejected_logps: f64,
    nll: Option<f64>,
    loss_pre: f64,
    sam_grad_norm: f64,
    /// Σ(policy − reference) log-probs over pairs; `None` without a reference.
    chosen_delta: Option<f64>,
    rejected_delta: Option<f64>,
    /// Token sums over the micro-batches with diagnostics, for the squeeze metrics.
    diagnostics: Option<Diagnostics>,
    /// Σ over micro-batches with diagnostics of their token means, for TRL's token metrics.
    token_means: Option<TokenMeans>,
    pub(super) tokens: usize,
    padding: f64,
}

/// TRL's token metrics summed over micro-batches, each micro-batch's own token mean.
#[derive(Default, Clone, Copy, Serialize, Deserialize)]
struct TokenMeans {
    micro_batches: f64,
    chosen_logits: f64,
    rejected_logits: f64,
    entropy: f64,
    accuracy: f64,
}

impl Tally {
    pub(super) fn add(&mut self, ms: &MicroStep, batch: &PreferenceBatch) {
        let b = ms.chosen_rewards.len() as f64;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / b.max(1.0);
        let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
        self.micro_batches += 1.0;
        self.pairs += b;
        self.loss += ms.loss;
        self.loss_by_pairs += ms.loss * b;
        self.chosen_rewards += mean(&ms.chosen_rewards);
        self.rejected_rewards += mean(&ms.rejected_rewards);
        let pairs = || ms.chosen_rewards.iter().zip(&ms.rejected_rewards);
        self.accuracies += pairs().filter(|(c, r)| c > r).count() as f64 / b.max(1.0);
        self.margins += pairs().map(|(&c, &r)| (c - r) as f64).sum::<f64>() / b.max(1.0);
        self.chosen_logps += mean(&ms.chosen_logps);
        self.rejected_logps += mean(&ms.rejected_logps);
        if let Some(nll) = ms.nll {
            *self.nll.get_or_insert(0.0) += nll;
        }
        self.loss_pre += ms.loss_pre.unwrap_or(0.0);
        self.sam_grad_norm += ms.sam_grad_norm.unwrap_or(0.0);
        self.tokens += batch.num_tokens;
        self.padding += batch.padding_fraction;
        if let (Some(rc), Some(rr)) = (&ms.ref_chosen_logps, &ms.ref_rejected_logps) {
            *self.chosen_delta.get_or_insert(0.0) += sum(&ms.chosen_logps) - sum(rc);
            *self.rejected_delta.get_or_insert(0.0) += sum(&ms.rejected_logps) - sum(rr);
        }
        if let Some(d) = &ms.diagnostics {
            self.diagnostics.get_or_insert_with(Default::default).add(d);
            let per = |total: f64, n: usize| if n > 0 { total / n as f64 } else { 0.0 };
            let t = self.token_means.get_or_insert_with(Default::default);
            t.micro_batches += 1.0;
            t.chosen_logits += per(d.chosen_mean_logits, d.chosen_tokens);
            t.rejected_logits += per(d.rejected_mean_logits, d.rejected_tokens());
            t.entropy += per(d.entropy, d.tokens);
            t.accuracy += per(d.chosen_top1 as f64, d.chosen_tokens);
        }
    }

    /// Means over the micro-batches, with the SAM metrics when `sam`. The loss is the mean of
    /// the micro-batch losses (HF's training loss), or with `by_pairs` the mean over pairs (HF's
    /// `eval_loss`).
    pub(super) fn metrics(&self, sam: bool, by_pairs: bool) -> PairMetrics {
        let m = self.micro_batches.max(1.0);
        let loss = match by_pairs {
            true => self.loss_by_pairs / self.pairs.max(1.0),
            false => self.loss / m,
        };
        let p = self.pairs.max(1.0);
        let token_means = self.token_means.map(|t| {
            let n = t.micro_batches.max(1.0);
            TokenMetrics {
                logits_chosen: t.chosen_logits / n,
                logits_rejected: t.rejected_logits / n,
                entropy: t.entropy / n,
                mean_token_accuracy: t.accuracy / n,
            }
        });
        PairMetrics {
            loss,
            rewards_chosen: self.chosen_rewards / m,
            rewards_rejected: self.rejected_rewards / m,
            rewards_accuracies: self.accuracies / m,
            rewards_margins: self.margins / m,
            logps_chosen: self.chosen_logps / m,
            logps_rejected: self.rejected_logps / m,
            nll_loss: self.nll.map(|n| n / m),
            padding_fraction: self.padding / m,
            tokens: token_means,
            sam: sam.then(|| SamMetrics {
                loss_pre: self.loss_pre / m,
                loss_post: self.loss / m,
                grad_norm: self.sam_grad_norm / m,
            }),
            squeeze: SqueezeMetrics {
                chosen_logps_delta: self.chosen_delta.map(|c| c / p),
                rejected_logps_delta: self.rejected_delta.map(|r| r / p),
                top_nontarget_prob: self
                    .diagnostics
                    .map(|s| s.top_nontarget_prob / s.chosen_tokens.max(1) as f64),
                hessian_trace: self
                    .diagnostics
                    .map(|s| s.hessian_trace / s.tokens.max(1) as f64),
            },
        }
    }
}

/// Means over the micro-batches of a step or of the eval set, under TRL's names.
#[derive(Debug, Clone, Serialize)]
pub struct PairMetrics {
    pub loss: f64,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    /// The chosen responses' NLL (`training.nll_reduction`), when a loss term has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll_loss: Option<f64>,
    pub padding_fraction: f64,
    /// TRL's token metrics, on logging steps and in evaluations.
    #[serde(flatten)]
    pub tokens: Option<TokenMetrics>,
    /// With SAM on (training steps only).
    #[serde(flatten)]
    pub sam: Option<SamMetrics>,
    #[serde(flatten)]
    pub squeeze: SqueezeMetrics,
}

/// TRL 1.x's metrics of the output distribution over response tokens (see `diagnostics`).
#[derive(Debug, Clone, Serialize)]
pub struct TokenMetrics {
    /// Mean over chosen-response tokens of the mean logit over the vocabulary.
    #[serde(rename = "logits/chosen")]
    pub logits_chosen: f64,
    #[serde(rename = "logits/rejected")]
    pub logits_rejected: f64,
    /// Mean next-token entropy over all response tokens (nats).
    pub entropy: f64,
    /// Share of chosen-response tokens whose target is the most likely token.
    pub mean_token_accuracy: f64,
}

/// `sam/*`: the loss at W and at the perturbed point, and ‖g‖ of the perturbed weights.
#[derive(Debug, Clone, Serialize)]
pub struct SamMetrics {
    #[serde(rename = "sam/loss_pre")]
    pub loss_pre: f64,
    #[serde(rename = "sam/loss_post")]
    pub loss_post: f64,
    #[serde(rename = "sam/grad_norm")]
    pub grad_norm: f64,
}

/// `squeeze/*` (README "Metrics"): how far chosen and rejected log-probs moved from the
/// reference (with a reference), y*'s probability along chosen responses and tr(H_z) (on
/// logging steps).
#[derive(Debug, Clone, Serialize)]
pub struct SqueezeMetrics {
    #[serde(
        rename = "squeeze/chosen_logps_delta",
        skip_serializing_if = "Option::is_none"
    )]
    pub chosen_logps_delta: Option<f64>,
    #[serde(
        rename = "squeeze/rejected_logps_delta",
        skip_serializing_if = "Option::is_none"
    )]
    pub rejected_logps_delta: Option<f64>,
    #[serde(
        rename = "squeeze/top_nontarget_prob",
        skip_serializing_if = "Option::is_none"
    )]
    pub top_nontarget_prob: Option<f64>,
    #[serde(
        rename = "squeeze/hessian_trace",
        skip_serializing_if = "Option::is_none"
    )]
    pub hessian_trace: Option<f64>,
}

/// One optimiser step's line.
#[derive(Debug, Clone, Serialize)]
pub struct TrainLine {
    #[serde(flatten)]
    pub metrics: PairMetrics,
    /// Before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    /// Training tokens seen so far, cumulative (TRL's `num_tokens`).
    pub num_tokens: usize,
    pub step: usize,
    /// Fractional epochs; streamed, the epoch being read (a stream's length is unknown).
    pub epoch: f64,
    /// With `training.skip_nonfinite`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonfinite_skipped: Option<usize>,
}

/// An evaluation's line: [`PairMetrics`] and the training tokens seen so far with TRL's
/// `eval_` prefix, and the step.
#[derive(Debug, Clone)]
pub struct EvalLine {
    pub metrics: PairMetrics,
    pub num_tokens: usize,
    pub step: usize,
}

impl Serialize for EvalLine {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let metrics = serde_json::to_value(&self.metrics).map_err(S::Error::custom)?;
        let mut map = s.serialize_map(None)?;
        for (key, value) in metrics.as_object().into_iter().flatten() {
            map.serialize_entry(&format!("eval_{key}"), value)?;
        }
        map.serialize_entry("eval_num_tokens", &self.num_tokens)?;
        map.serialize_entry("step", &self.step)?;
        map.end()
    }
}

/// The first line: what data the run has (no `step`: a record of the data, not a point on the
/// charts).
#[derive(Debug, Serialize)]
pub struct DataLine<'a> {
    /// `None` when streamed: its length is unknown.
    #[serde(rename = "data/train_pairs")]
    pub train_pairs: Option<usize>,
    #[serde(rename = "data/eval_pairs")]
    pub eval_pairs: usize,
    /// Skipped rows by reason (streamed: the eval split's only, so far).
    #[serde(rename = "data/skipped")]
    pub skipped: &'a BTreeMap<&'static str, usize>,
    #[serde(rename = "data/streaming", skip_serializing_if = "Option::is_none")]
    pub streaming: Option<bool>,
}

/// The last line of a streamed run: the training rows' skips, known only once read.
#[derive(Debug, Serialize)]
pub struct StreamedDataLine<'a> {
    #[serde(rename = "data/skipped")]
    pub skipped: &'a BTreeMap<String, usize>,
    #[serde(rename = "data/epoch")]
    pub epoch: usize,
}

/// What `train` returns and prints at the end.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Summary {
    Finished {
        /// The last logged step's line (`{}` when no step ran, e.g. resumed at the end).
        #[serde(serialize_with = "empty_if_none")]
        train: Option<TrainLine>,
        skipped: BTreeMap<String, usize>,
        output_dir: PathBuf,
        #[serde(skip_serializing_if = "Option::is_none")]
        nonfinite_skipped: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        eval: Option<Box<EvalLine>>,
    },
    /// Stopped by a signal after a step, with a checkpoint.
    Interrupted {
        #[serde(serialize_with = "empty_if_none")]
        train: Option<TrainLine>,
        interrupted_at_step: usize,
        checkpoint: PathBuf,
    },
}

impl Summary {
    /// The line of the last logged training step, if any step ran.
    pub fn train(&self) -> Option<&TrainLine> {
        match self {
            Summary::Finished { train, .. } | Summary::Interrupted { train, .. } => train.as_ref(),
        }
    }

    /// The final evaluation, when the run finished with eval pairs.
    pub fn eval(&self) -> Option<&PairMetrics> {
        match self {
            Summary::Finished { eval, .. } => eval.as_ref().map(|e| &e.metrics),
            Summary::Interrupted { .. } => None,
        }
    }
}

fn empty_if_none<S: Serializer>(
    line: &Option<TrainLine>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match line {
        Some(line) => line.serialize(s),
        None => s.collect_map(std::iter::empty::<((), ())>()),
    }
}

/// Writes a value as JSON with its keys in alphabetical order (`serde_json::Value`'s order).
pub fn to_sorted_json<T: Serialize>(value: &T, pretty: bool) -> Result<String> {
    let value = serde_json::to_value(value)?;
    Ok(match pretty {
        true => serde_json::to_string_pretty(&value)?,
        false => value.to_string(),
    })
}

/// `metrics.jsonl`, counting its lines: a checkpoint records the count, and resuming cuts the
/// file there, so that there is one line per step.
pub(super) struct MetricsFile {
    /// `None` on the ranks of a data-parallel run other than 0, which count lines only.
    file: Option<std::fs::File>,
    lines: usize,
}

impl MetricsFile {
    /// A fresh file (`lines == None`), or the existing one cut to its first `lines` lines.
    pub(super) fn open(path: &Path, lines: Option<usize>) -> Result<MetricsFile> {
        let cannot = || format!("cannot write {}", path.display());
        let Some(lines) = lines else {
            let file = std::fs::File::create(path).with_context(cannot)?;
            return Ok(MetricsFile {
                file: Some(file),
                lines: 0,
            });
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let kept: Vec<&str> = text.lines().take(lines).collect();
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(
            &tmp,
            kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .with_context(cannot)?;
        std::fs::rename(&tmp, path).with_context(cannot)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(cannot)?;
        Ok(MetricsFile {
            file: Some(file),
            lines: kept.len(),
        })
    }

    /// Lines counted, none written (ranks other than 0, starting after `lines` lines).
    pub(super) fn discard(lines: usize) -> MetricsFile {
        MetricsFile { file: None, lines }
    }

    pub(super) fn write<T: Serialize>(&mut self, line: &T) -> Result<()> {
        if let Some(file) = &mut self.file {
            writeln!(file, "{}", to_sorted_json(line, false)?)
                .context("cannot write metrics.jsonl")?;
        }
        self.lines += 1;
        Ok(())
    }

    pub(super) fn lines(&self) -> usize {
        self.lines
    }
}
