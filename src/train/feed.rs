//! The training pairs as the loop draws them: from memory in each epoch's permutation, or
//! streamed (`data.streaming`), from a [`DataCursor`] that a checkpoint saves, a step at a time.
//! A run resumed at a cursor draws exactly the pairs an uninterrupted one would.
//!
//! Epochs are cut as HF's Trainer cuts them: micro-batches never span two epochs, so an epoch's
//! last micro-batch has the pairs that are left (or is dropped, with
//! `training.dataloader_drop_last`), and its last step has the micro-batches that are left.

use super::Trainer;
use crate::config::DataConfig;
use crate::data::batch::TokenizedPair;
use crate::data::format::Converter;
use crate::data::stream::{epoch_order, pair_len, Batches};
use crate::data::DataCursor;
use crate::tokenizer::Tok;
use anyhow::Result;
use std::sync::Arc;

pub(super) struct Feed {
    source: Source,
    cursor: DataCursor,
    micro: usize,
    drop_last: bool,
    seed: u64,
}

/// One micro-batch: the pairs' indices (into the training pairs, or streamed, their positions
/// in the epoch) and the pairs.
pub(super) type MicroBatch = (Vec<usize>, Vec<TokenizedPair>);

enum Source {
    /// Tokenised pairs in memory, epoch by epoch in [`epoch_order`].
    Memory {
        pairs: Arc<Vec<TokenizedPair>>,
        lengths: Vec<usize>,
        window: usize,
        order: Vec<usize>,
        /// Micro-batches per epoch.
        per_epoch: usize,
    },
    /// The current epoch's micro-batches ([`crate::data::train_batches`], opened on first
    /// use) and what is left of the one being drawn from.
    Stream {
        data: DataConfig,
        converter: Arc<Converter>,
        tok: Arc<Tok>,
        batches: Option<Box<Batches>>,
        ready: std::vec::IntoIter<TokenizedPair>,
    },
}

impl Feed {
    /// The trainer's training data positioned at its state's cursor. A stream cannot seek, so a
    /// resumed one re-reads its epoch up to the cursor; the skips it meets again are already in
    /// the restored cursor's counts.
    pub(super) fn open(tr: &Trainer) -> Result<Feed> {
        let (micro, seed) = (tr.cfg.micro_batch_size(), tr.cfg.seed);
        let saved = tr.state.data.clone();
        let source = match &tr.stream {
            None => {
                let lengths: Vec<usize> = tr.train_pairs.iter().map(pair_len).collect();
                let window = tr.cfg.data.group_by_length;
                let order = epoch_order(&lengths, micro, window, seed, saved.epoch);
                Source::Memory {
                    pairs: tr.train_pairs.clone(),
                    lengths,
                    window,
                    order,
                    per_epoch: tr.cfg.micro_batches_per_epoch(tr.train_pairs.len()),
                }
            }
            Some(converter) => Source::Stream {
                data: tr.cfg.data.clone(),
                converter: converter.clone(),
                tok: Arc::new(tr.tok.clone()),
                batches: None,
                ready: Vec::new().into_iter(),
            },
        };
        let replay = matches!(source, Source::Stream { .. });
        let mut feed = Feed {
            source,
            cursor: saved.clone(),
            micro,
            drop_last: tr.cfg.training.dataloader_drop_last,
            seed,
        };
        if replay {
            feed.cursor = DataCursor {
                epoch: saved.epoch,
                ..DataCursor::default()
            };
            while feed.cursor.cursor < saved.cursor {
                if feed.next_pair()?.is_none() {
                    anyhow::bail!(
                        "data.train: epoch {} of the stream ended after {} pairs, but the checkpoint was saved after {}: the training data changed since",
                        saved.epoch,
                        feed.cursor.cursor,
                        saved.cursor
                    );
                }
            }
            feed.cursor = saved;
        }
        Ok(feed)
    }

    /// Where the next pair comes from.
    pub(super) fn cursor(&self) -> &DataCursor {
        &self.cursor
    }

    /// Fractional epochs after the pairs drawn so far, as HF's Trainer logs `epoch`: the epoch
    /// plus the share of its micro-batches drawn. `None` when streamed (the length is unknown).
    pub(super) fn epoch_progress(&self) -> Option<f64> {
        let Source::Memory { per_epoch, .. } = self.source else {
            return None;
        };
        let per_epoch = per_epoch.max(1);
        let drawn = self.cursor.cursor.div_ceil(self.micro).min(per_epoch);
        Some(self.cursor.epoch as f64 + drawn as f64 / per_epoch as f64)
    }

    /// The next optimiser step's micro-batches: up to `accumulation` of them from the current
    /// epoch, fewer at its end, the first from the next epoch when this one is used up.
    pub(super) fn next_step(&mut self, accumulation: usize) -> Result<Vec<MicroBatch>> {
        let mut step = Vec::with_capacity(accumulation);
        let mut new_epoch = false;
        while step.len() < accumulation {
            match self.next_micro_batch()? {
                Some(mb) => step.push(mb),
                None if !step.is_empty() => break,
                None if !new_epoch => {
                    self.start_next_epoch();
                    new_epoch = true;
                }
                None => anyhow::bail!(
                    "data.train: an epoch holds no micro-batch of {} pairs{} (skipped: {:?})",
                    self.micro,
                    if self.drop_last {
                        " (training.dataloader_drop_last drops a smaller one)"
                    } else {
                        ""
                    },
                    self.cursor.skipped
                ),
            }
        }
        Ok(step)
    }

    /// The next micro-batch of the current epoch: `micro` pairs, or those left at its end;
    /// `None` when none are left (or, with `drop_last`, fewer than `micro`).
    fn next_micro_batch(&mut self) -> Result<Option<MicroBatch>> {
        let (mut idx, mut pairs) = (
            Vec::with_capacity(self.micro),
            Vec::with_capacity(self.micro),
        );
        while idx.len() < self.micro {
            let Some((i, pair)) = self.next_pair()? else {
                break;
            };
            idx.push(i);
            pairs.push(pair);
        }
        let keep = !idx.is_empty() && (idx.len() == self.micro || !self.drop_last);
        Ok(keep.then_some((idx, pairs)))
    }

    /// Moves the cursor to the start of the next epoch.
    fn start_next_epoch(&mut self) {
        let pos = &mut self.cursor;
        pos.epoch += 1;
        pos.cursor = 0;
        match &mut self.source {
            Source::Memory {
                lengths,
                window,
                order,
                ..
            } => *order = epoch_order(lengths, self.micro, *window, self.seed, pos.epoch),
            Source::Stream { batches, ready, .. } => {
                *batches = None;
                *ready = Vec::new().into_iter();
            }
        }
    }

    /// The next pair of the current epoch and its index, moving the cursor on; `None` at the
    /// epoch's end.
    fn next_pair(&mut self) -> Result<Option<(usize, TokenizedPair)>> {
        let (micro, seed) = (self.micro, self.seed);
        let pos = &mut self.cursor;
        match &mut self.source {
            Source::Memory { pairs, order, .. } => {
                let Some(&i) = order.get(pos.cursor) else {
                    return Ok(None);
                };
                pos.cursor += 1;
                Ok(Some((i, pairs[i].clone())))
            }
            Source::Stream {
                data,
                converter,
                tok,
                batches,
                ready,
            } => loop {
                if let Some(pair) = ready.next() {
                    pos.cursor += 1;
                    return Ok(Some((pos.cursor - 1, pair)));
                }
                let b = match batches {
                    Some(b) => b,
                    None => batches.insert(Box::new(crate::data::train_batches(
                        data,
                        converter.clone(),
                        tok.clone(),
                        seed,
                        pos.epoch,
                        micro,
                    )?)),
                };
                let next = b.next().transpose()?;
                let skips = std::mem::take(&mut b.skips.counts);
                if pos.epoch == 0 {
                    for (reason, count) in skips {
                        *pos.skipped.entry(reason.to_string()).or_default() += count;
                    }
                }
                match next {
                    Some(pairs) => *ready = pairs.into_iter(),
                    None => return Ok(None),
                }
            },
        }
    }
}
