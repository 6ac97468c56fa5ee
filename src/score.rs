//! `dpo-sam score`: per-pair sequence log-probs, implicit rewards, loss and CHES (the
//! likelihood-displacement score of `data::ches`) of a model (and its reference) on a
//! preference file, without training: to check log-probs against Python, to see how a
//! checkpoint ranks a dataset's pairs, or which pairs an SFT model will find displacement-prone.
//!
//! [`PairArgs`] (model, reference, data, loss) is shared with `dpo-sam sharpness`.

use crate::config::{BuiltinModel, DataConfig, DataFormat, Dtype, LossType};
use crate::data::batch::PreferenceBatch;
use crate::data::ches::batch_ches;
use crate::data::TokenizedData;
use crate::logps::{pair_logps, row_logps_and_hidden};
use crate::losses::{Loss, LossParams, PairLogps};
use crate::models::{Model, ModelSource};
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

/// The model, reference, data and loss that `score` and `sharpness` evaluate.
#[derive(clap::Args, Debug, Clone)]
pub struct PairArgs {
    /// The model: a Hugging Face directory, a Hub repo id, `random:CONFIG` or
    /// `builtin:tiny-gpt2`.
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
    /// Prompts are cut to this many tokens first when a pair is too long
    /// (`data.max_prompt_length`).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// f32, bf16, f16 or f64.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  dpo-sam score --model runs/dpo --ref-model gpt2 --data pairs.jsonl --out scores.jsonl"
)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub input: PairArgs,
    /// Output JSONL: one line per scored pair, in data order.
    #[arg(long)]
    pub out: PathBuf,
}

/// What [`PairArgs::load`] loads.
pub struct Loaded {
    pub policy: Model,
    /// `--ref-model`, when given.
    pub ref_model: Option<Model>,
    pub tok: Tok,
    pub data: TokenizedData,
    pub loss: Loss,
    pub device: Device,
}

impl Loaded {
    /// The reference the loss compares against: `--ref-model`, else the policy itself when the
    /// loss needs one, else none.
    pub fn reference(&self) -> Option<&Model> {
        match &self.ref_model {
            Some(m) => Some(m),
            None if self.loss.needs_reference() => Some(&self.policy),
            None => None,
        }
    }
}

impl PairArgs {
    /// Checks the flags, then loads the models (the policy with trainable weights when
    /// `trainable`), tokenises the data and builds the loss.
    pub fn load(&self, trainable: bool) -> Result<Loaded> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            bail!("--beta: must be > 0, got {}", self.beta);
        }
        if self.max_length < 2 {
            bail!("--max-length: must be >= 2, got {}", self.max_length);
        }
        if let Some(p) = self.max_prompt_length {
            if p == 0 || p >= self.max_length {
                bail!("--max-prompt-length: must be in [1, --max-length), got {p}");
            }
        }
        if self.batch_size == 0 {
            bail!("--batch-size: must be > 0");
        }
        let format: DataFormat = self.format.parse().context("--format")?;
        let terms = self
            .loss_type
            .split(',')
            .map(|n| Ok((LossType::from_name(n.trim()).context("--loss-type")?, 1.0)))
            .collect::<Result<Vec<_>>>()?;
        let loss = Loss {
            terms,
            params: LossParams {
                beta: self.beta,
                ..Default::default()
            },
        };
        let device = crate::device::parse(&self.device)?;
        let dtype = self.dtype.parse::<Dtype>().context("--dtype")?.dtype();

        // Built-in models are initialised from the training configs' default seed.
        let resolve = |spec: &str| ModelSource::resolve(spec, &BuiltinModel::default(), 42);
        let src = resolve(&self.model).context("--model")?;
        let tok = src.tokenizer()?;
        let policy = Model::load(&src, trainable, dtype, &device)?;
        tok.check_fits(policy.net.output_layer().vocab_size()?, &self.model)?;
        let ref_model = match &self.ref_model {
            Some(spec) => Some(Model::load(
                &resolve(spec).context("--ref-model")?,
                false,
                dtype,
                &device,
            )?),
            None => None,
        };
        let data_cfg: DataConfig = serde_json::from_value(json!({
            "train": self.data,
            "format": format,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
        }))
        .context("--data")?;
        let data = crate::data::load_tokenized(&data_cfg, &tok, 42, src.dir())?;
        Ok(Loaded {
            policy,
            ref_model,
            tok,
            data,
            loss,
            device,
        })
    }
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let summary = score(&args)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Scores every pair, writes `args.out`, and returns the summary.
pub fn score(args: &ScoreArgs) -> Result<serde_json::Value> {
    let loaded = args.input.load(false)?;
    let Loaded {
        policy,
        tok,
        data,
        loss,
        device,
        ..
    } = &loaded;
    let reference = loaded.reference();
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
    for chunk in data.train.chunks(args.input.batch_size) {
        bar.inc(chunk.len() as u64);
        let batch = PreferenceBatch::new(chunk, tok.pad_id, device)?;
        let (seq, h) = row_logps_and_hidden(policy, &batch)?;
        let ches = batch_ches(&batch, &h)?;
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
                "ches": ches[i].ches,
                "ln_ches": ches[i].ln_ches,
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
        "loss_type": args.input.loss_type,
        "out": args.out,
    }))
}
