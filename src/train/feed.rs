//! The training pairs as the loop draws them: from memory in each epoch's permutation, or
//! streamed (`data.streaming`), from a [`DataCursor`] that a checkpoint saves, a micro-batch at a
//! time. A run resumed at a cursor draws exactly the pairs an uninterrupted one would.

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
    seed: u64,
}

enum Source {
    /// Tokenised pairs in memory, epoch by epoch in [`epoch_order`].
    Memory {
        pairs: Arc<Vec<TokenizedPair>>,
        lengths: Vec<usize>,
        window: usize,
        order: Vec<usize>,
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
            seed,
        };
        if replay {
            feed.cursor = DataCursor {
                epoch: saved.epoch,
                ..DataCursor::default()
            };
            while feed.cursor.cursor < saved.cursor {
                feed.next_pair()?;
            }
            feed.cursor = saved;
        }
        Ok(feed)
    }

    /// Where the next pair comes from.
    pub(super) fn cursor(&self) -> &DataCursor {
        &self.cursor
    }

    /// The next micro-batch's pairs and their indices (into the training pairs, or streamed,
    /// their positions in the epoch).
    pub(super) fn next_micro_batch(&mut self) -> Result<(Vec<usize>, Vec<TokenizedPair>)> {
        let (mut idx, mut pairs) = (
            Vec::with_capacity(self.micro),
            Vec::with_capacity(self.micro),
        );
        while idx.len() < self.micro {
            let (i, pair) = self.next_pair()?;
            idx.push(i);
            pairs.push(pair);
        }
        Ok((idx, pairs))
    }

    /// The next pair and its index, moving the cursor on, into the next epoch at the end of one.
    fn next_pair(&mut self) -> Result<(usize, TokenizedPair)> {
        let (micro, seed) = (self.micro, self.seed);
        let pos = &mut self.cursor;
        match &mut self.source {
            Source::Memory {
                pairs,
                lengths,
                window,
                order,
            } => {
                if pos.cursor >= order.len() {
                    pos.epoch += 1;
                    pos.cursor = 0;
                    *order = epoch_order(lengths, micro, *window, seed, pos.epoch);
                }
                let i = order[pos.cursor];
                pos.cursor += 1;
                Ok((i, pairs[i].clone()))
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
                    return Ok((pos.cursor - 1, pair));
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
                    None if pos.cursor == 0 => anyhow::bail!(
                        "no usable training pairs in data.train (skipped: {:?})",
                        pos.skipped
                    ),
                    None => {
                        *batches = None;
                        pos.epoch += 1;
                        pos.cursor = 0;
                    }
                }
            },
        }
    }
}
