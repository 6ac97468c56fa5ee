//! Preference data: records (prompt, chosen, rejected) from the built-in task, local files or
//! Hub datasets ([`source`]), in several record formats ([`format`], [`chat`]), streamed with
//! a shuffle buffer and an eval holdout ([`stream`]), and tokenised into DPO batches
//! ([`batch`]). Bad rows are skipped and counted by reason, or stop the run with `strict`.

pub mod batch;
pub mod builtin;
pub mod chat;
pub mod format;
pub mod inspect;
pub mod source;
pub mod stream;

use crate::config::DataConfig;
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
use batch::{TokenizedPair, Truncation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use stream::{Holdout, Input, PairStream, Skips};

/// One preference pair as text: the prompt and two responses that continue it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// End each response with EOS, as TRL 1.x does for text (non-conversational) records unless
    /// the text already ends with the EOS token; off for chat-template renderings, whose
    /// template closes the turn itself.
    #[serde(default = "append_eos_default")]
    pub append_eos: bool,
}

fn append_eos_default() -> bool {
    true
}

/// Which side of the data: the training pairs or the held-out ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// The training loop's position in the data, as a checkpoint saves it: the epoch, whose
/// permutation is [`stream::epoch_order`] of (seed, epoch), and the next index into it;
/// streamed (`data.streaming`), the pairs drawn so far from the epoch's stream, which a resumed
/// run re-reads and discards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: usize,
    pub cursor: usize,
    /// Streamed training rows skipped, by reason, among the rows read in epoch 0 (later epochs
    /// re-read the same rows). Saved because a resumed run in a later epoch never re-reads
    /// epoch 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped: BTreeMap<String, usize>,
}

/// The record converter for `[data]`: its format, and the chat template from
/// `data.chat_template` or else the model directory's tokenizer_config.json (if it has one).
pub fn converter(
    cfg: &DataConfig,
    tok: &Tok,
    model_dir: Option<&Path>,
) -> Result<Arc<format::Converter>> {
    let template_file = match (&cfg.chat_template, model_dir) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(dir)) => Some(dir.join("tokenizer_config.json")).filter(|p| p.is_file()),
        (None, None) => None,
    };
    let mut chat = match template_file {
        Some(p) => chat::ChatTemplate::load(&p).context("data.chat_template")?,
        None => None,
    };
    if let Some(chat) = &mut chat {
        chat.strip_bos = tok.bos_id.is_some() && tok.encode("")?.first() == tok.bos_id.as_ref();
    }
    Ok(Arc::new(format::Converter {
        format: cfg.format,
        chat,
    }))
}

/// The inputs and holdout of one split: `eval` sources if given, else the `eval_fraction`
/// held out of `train`. The built-in task's eval split is its disjoint held-out set.
pub fn inputs(cfg: &DataConfig, split: Split, seed: u64) -> Result<(Vec<Input>, Holdout)> {
    let builtin = |eval: bool| {
        let (train, held_out) = builtin::arith(seed, cfg.builtin_pairs, cfg.builtin_pairs / 4);
        let (name, pairs) = if eval {
            ("builtin:arith:eval", held_out)
        } else {
            ("builtin:arith", train)
        };
        vec![Input::Pairs(name.into(), pairs)]
    };
    let files = |specs: Vec<&str>, default_split: &str| -> Result<Vec<Input>> {
        Ok(source::expand(&specs, default_split)?
            .into_iter()
            .map(Input::File)
            .collect())
    };
    let fraction = cfg.eval_fraction;
    let train_specs = cfg.train.paths();
    let is_builtin = |specs: &[&str]| specs == ["builtin:arith"];
    Ok(match split {
        Split::Train if is_builtin(&train_specs) => (builtin(false), Holdout::All),
        Split::Train => {
            let holdout = if fraction > 0.0 {
                Holdout::Train(fraction)
            } else {
                Holdout::All
            };
            (
                files(train_specs, &cfg.split).context("data.train")?,
                holdout,
            )
        }
        Split::Eval => match &cfg.eval {
            Some(e) if is_builtin(&e.paths()) => (builtin(true), Holdout::All),
            Some(e) => (
                files(e.paths(), &cfg.eval_split).context("data.eval")?,
                Holdout::All,
            ),
            None if fraction > 0.0 && is_builtin(&train_specs) => (builtin(true), Holdout::All),
            None if fraction > 0.0 => (
                files(train_specs, &cfg.split).context("data.train")?,
                Holdout::Eval(fraction),
            ),
            None => (Vec::new(), Holdout::All),
        },
    })
}

/// A lazy stream of one split's pairs; `shuffle` uses `data.shuffle_buffer`, else file order.
pub fn pair_stream(
    cfg: &DataConfig,
    split: Split,
    converter: Arc<format::Converter>,
    seed: u64,
    epoch: usize,
    shuffle: bool,
) -> Result<PairStream> {
    let (inputs, holdout) = inputs(cfg, split, seed)?;
    let buffer = if shuffle { cfg.shuffle_buffer } else { 0 };
    Ok(PairStream::new(
        inputs, converter, holdout, buffer, seed, epoch,
    ))
}

/// Tokenised pairs of both splits, with every skipped row counted by reason.
#[derive(Default)]
pub struct TokenizedData {
    pub train: Vec<TokenizedPair>,
    pub eval: Vec<TokenizedPair>,
    /// Rows read (train + eval), good and bad.
    pub records: usize,
    pub skipped: BTreeMap<&'static str, usize>,
}

/// Reads and tokenises both splits in file order (the trainer shuffles per epoch). Bad rows
/// are counted, or with `data.strict` the first is an error naming its file and line.
pub fn load_tokenized(
    cfg: &DataConfig,
    tok: &Tok,
    seed: u64,
    model_dir: Option<&Path>,
) -> Result<TokenizedData> {
    load_splits(cfg, tok, seed, model_dir, &[Split::Train, Split::Eval])
}

/// [`load_tokenized`] for some splits only (the others stay empty): with `data.streaming` the
/// trainer keeps only the eval split in memory. Tokenised on [`stream::threads`] threads, in
/// file order.
pub fn load_splits(
    cfg: &DataConfig,
    tok: &Tok,
    seed: u64,
    model_dir: Option<&Path>,
    splits: &[Split],
) -> Result<TokenizedData> {
    let conv = converter(cfg, tok, model_dir)?;
    let (tok, trunc) = (Arc::new(tok.clone()), Truncation::from_config(cfg));
    let mut skips = Skips::new(cfg.strict);
    let mut data = TokenizedData::default();
    for &split in splits {
        let stream = pair_stream(cfg, split, conv.clone(), seed, 0, false)?;
        let rows = stream::tokenize_rows(stream, tok.clone(), trunc.clone(), stream::threads());
        let out = match split {
            Split::Train => &mut data.train,
            Split::Eval => &mut data.eval,
        };
        for row in rows {
            out.extend(skips.keep(row)?);
            data.records += 1;
        }
    }
    data.skipped = skips.counts;
    Ok(data)
}

/// One epoch of the training split as micro-batches, streamed (`data.streaming`): the inputs
/// re-read lazily with the shuffle buffer seeded by (seed, epoch), tokenised ahead on
/// background threads, grouped by length within `data.group_by_length` windows. Memory is
/// bounded by the shuffle buffer, the window and the tokenisers' read-ahead.
pub fn train_batches(
    cfg: &DataConfig,
    converter: Arc<format::Converter>,
    tok: Arc<Tok>,
    seed: u64,
    epoch: usize,
    micro: usize,
) -> Result<stream::Batches> {
    let stream = pair_stream(cfg, Split::Train, converter, seed, epoch, true)?;
    let trunc = Truncation::from_config(cfg);
    let rows = stream::tokenize_rows(stream, tok, trunc, stream::threads());
    let window_seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1));
    Ok(stream::Batches::new(
        rows,
        micro,
        cfg.group_by_length,
        Skips::new(cfg.strict),
        window_seed,
    ))
}
