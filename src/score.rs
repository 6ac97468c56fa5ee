//! `dpo-sam score`: per-pair sequence log-probs, implicit rewards and loss of a model (and its
//! reference) on a preference file, without training: to check log-probs against Python, or to
//! see how a checkpoint ranks a dataset's pairs.

use crate::config::{BuiltinModel, DataConfig, DataFormat, Dtype, LossType};
use crate::data::batch::PreferenceBatch;
use crate::logps::{pair_logps, row_logps};
use crate::losses::{Loss, LossParams, PairLogps};
use crate::models::{Model, ModelSource};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  dpo-sam score --model runs/dpo --ref-model gpt2 --data pairs.jsonl --out scores.jsonl"
)]
pub struct ScoreArgs {
    /// The model: a Hugging Face directory, a Hub repo id, or `builtin:tiny-gpt2`.
    #[arg(long)]
    pub model: String,
    /// Reference model; without it, the model itself when the loss needs a reference (TRL's
    /// default), so rewards are 0.
    #[arg(long)]
    pub ref_model: Option<String>,
    /// Preference data: a file, glob or Hub dataset, as `data.train` in configs.
    #[arg(long)]
    pub data: String,
    /// Record format, as `data.format`: auto, hh, explicit, implicit, conversational, tldr.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Loss, or a comma-separated list summed with weight 1 (names as `training.loss_type`);
    /// other loss hyper-parameters take their config defaults.
    #[arg(long, default_value = "sigmoid")]
    pub loss_type: String,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Maximum tokens of prompt + response (`data.max_length`).
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// f32, bf16, f16 or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output JSONL: one line per scored pair, in data order.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let summary = score(&args)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Scores every pair, writes `args.out`, and returns the summary.
pub fn score(args: &ScoreArgs) -> Result<serde_json::Value> {
    if !(args.beta > 0.0 && args.beta.is_finite()) {
        bail!("--beta: must be > 0, got {}", args.beta);
    }
    if args.max_length < 2 {
        bail!("--max-length: must be >= 2, got {}", args.max_length);
    }
    if args.batch_size == 0 {
        bail!("--batch-size: must be > 0");
    }
    let format: DataFormat = args.format.parse().context("--format")?;
    let terms = args
        .loss_type
        .split(',')
        .map(|n| Ok((LossType::from_name(n.trim()).context("--loss-type")?, 1.0)))
        .collect::<Result<Vec<_>>>()?;
    let loss = Loss {
        terms,
        params: LossParams {
            beta: args.beta,
            ..Default::default()
        },
    };
    let device = crate::device::parse(&args.device)?;
    let dtype = args.dtype.parse::<Dtype>().context("--dtype")?.dtype();

    // Built-in models are initialised from the training configs' default seed.
    let resolve = |spec: &str| ModelSource::resolve(spec, &BuiltinModel::default(), 42);
    let src = resolve(&args.model).context("--model")?;
    let tok = src.tokenizer()?;
    let policy = Model::load(&src, false, dtype, &device)?;
    tok.check_fits(policy.net.output_layer().vocab_size()?, &args.model)?;
    let ref_model = match &args.ref_model {
        Some(spec) => Some(Model::load(
            &resolve(spec).context("--ref-model")?,
            false,
            dtype,
            &device,
        )?),
        None => None,
    };
    let reference = match &ref_model {
        Some(m) => Some(m),
        None if loss.needs_reference() => Some(&policy),
        None => None,
    };

    let data_cfg: DataConfig = serde_json::from_value(
        json!({"train": args.data, "format": format, "max_length": args.max_length}),
    )
    .context("--data")?;
    let data = crate::data::load_tokenized(&data_cfg, &tok, 42, src.dir())?;
    let skipped: usize = data.skipped.values().sum();

    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out)
            .with_context(|| format!("cannot write {}", args.out.display()))?,
    );
    let (mut n, mut loss_sum, mut correct, mut margin_sum) = (0usize, 0f64, 0usize, 0f64);
    let bar = crate::progress::bar(
        "scoring",
        data.train.len() as u64,
        crate::progress::Unit::Items("pairs"),
    );
    for chunk in data.train.chunks(args.batch_size) {
        bar.inc(chunk.len() as u64);
        let batch = PreferenceBatch::new(chunk, tok.pad_id, &device)?;
        let seq = row_logps(&policy, &batch)?;
        let ref_logps = reference.map(|m| pair_logps(m, &batch)).transpose()?;
        let lp = PairLogps::from_rows(&seq, ref_logps.as_ref(), &batch.response_lens)?;
        let o = loss.compute(&lp)?;
        let col =
            |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
        let opt_col = |t: &Option<Tensor>| t.as_ref().map(col).transpose();
        let (chosen, rejected) = (col(&lp.chosen)?, col(&lp.rejected)?);
        let (ref_chosen, ref_rejected) = (opt_col(&lp.ref_chosen)?, opt_col(&lp.ref_rejected)?);
        let (rc, rr, losses) = (
            col(&o.chosen_rewards)?,
            col(&o.rejected_rewards)?,
            col(&o.losses)?,
        );
        let b = batch.num_pairs;
        for i in 0..b {
            let line = json!({
                "pair": n,
                "chosen_logps": chosen[i],
                "rejected_logps": rejected[i],
                "ref_chosen_logps": ref_chosen.as_ref().map(|v| v[i]),
                "ref_rejected_logps": ref_rejected.as_ref().map(|v| v[i]),
                "chosen_tokens": batch.response_lens[i],
                "rejected_tokens": batch.response_lens[b + i],
                "reward_chosen": rc[i],
                "reward_rejected": rr[i],
                "loss": losses[i],
            });
            writeln!(out, "{line}")
                .with_context(|| format!("cannot write {}", args.out.display()))?;
            n += 1;
            loss_sum += losses[i];
            correct += usize::from(rc[i] > rr[i]);
            margin_sum += rc[i] - rr[i];
        }
    }
    bar.finish_and_clear();
    out.flush()
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let mean = |x: f64| {
        if n == 0 {
            serde_json::Value::Null
        } else {
            json!(x / n as f64)
        }
    };
    Ok(json!({
        "pairs_scored": n,
        "pairs_skipped": skipped,
        "skipped": data.skipped,
        "mean_loss": mean(loss_sum),
        "reward_accuracy": mean(correct as f64),
        "mean_margin": mean(margin_sum),
        "loss_type": args.loss_type,
        "out": args.out,
    }))
}
