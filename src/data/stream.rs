//! The lazy pair stream: files opened one after another, records converted as they are read,
//! an eval split held out by a hash of each record's origin (so it is the same rows whatever
//! the shuffle), a seeded shuffle buffer, tokenisation on background threads in input order,
//! skip counting (or `strict` failure), and batching that groups similar lengths inside a
//! window to cut padding.

use super::batch::{tokenize_pair, TokenizedPair, Truncation};
use super::format::Converter;
use super::source::{self, Origin, RawRecord, RowError};
use super::PreferencePair;
use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};

/// A pair with where it came from, or the row's problem.
pub type Row = std::result::Result<(Origin, PreferencePair), RowError>;

/// One input of a stream.
pub enum Input {
    File(PathBuf),
    /// Pairs already in memory (the built-in task), named for origins.
    Pairs(Arc<str>, Vec<PreferencePair>),
}

/// Which rows of the inputs a stream keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holdout {
    All,
    /// Rows not held out by `eval_fraction`.
    Train(f64),
    /// Rows held out by `eval_fraction`.
    Eval(f64),
}

impl Holdout {
    fn keeps(self, seed: u64, origin: &Origin) -> bool {
        let held = |f: f64| (origin_hash(seed, origin) >> 11) as f64 / (1u64 << 53) as f64 <= f;
        match self {
            Holdout::All => true,
            Holdout::Train(f) => !held(f),
            Holdout::Eval(f) => held(f),
        }
    }
}

/// FNV-1a over the origin, finished with splitmix64: stable across platforms and releases.
fn origin_hash(seed: u64, origin: &Origin) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in origin.file.bytes().chain(origin.line.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Pairs from the inputs, lazily, in shuffle-buffer order. Items are `Err` only for fatal
/// problems (unopenable file, no chat template); bad rows are `Ok(Err(RowError))`.
pub struct PairStream {
    inputs: std::vec::IntoIter<Input>,
    current: Option<Box<dyn Iterator<Item = RawRecord> + Send>>,
    converter: Arc<Converter>,
    holdout: Holdout,
    seed: u64,
    buffer: Vec<(Origin, PreferencePair)>,
    capacity: usize,
    rng: ChaCha8Rng,
    exhausted: bool,
    /// Rows read from the inputs that this stream's split keeps (good and bad).
    pub records: usize,
    /// Bytes of the input files read so far, and their total size (for progress bars).
    bytes_read: Arc<AtomicU64>,
    pub bytes_total: u64,
}

impl PairStream {
    /// `shuffle_buffer` 0 or 1 keeps file order; `epoch` varies the shuffle, not the holdout.
    pub fn new(
        inputs: Vec<Input>,
        converter: Arc<Converter>,
        holdout: Holdout,
        shuffle_buffer: usize,
        seed: u64,
        epoch: usize,
    ) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(
            seed ^ 0x5851_f42d_4c95_7f2d_u64.wrapping_mul(epoch as u64 + 1),
        );
        let bytes_total = inputs
            .iter()
            .filter_map(|i| match i {
                Input::File(p) => std::fs::metadata(p).ok().map(|m| m.len()),
                Input::Pairs(..) => None,
            })
            .sum();
        PairStream {
            bytes_read: Arc::default(),
            bytes_total,
            inputs: inputs.into_iter(),
            current: None,
            converter,
            holdout,
            seed,
            buffer: Vec::new(),
            capacity: shuffle_buffer.max(1),
            rng,
            exhausted: false,
            records: 0,
        }
    }

    /// The count of input bytes read so far, shared (it keeps counting as the stream is read).
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        self.bytes_read.clone()
    }

    /// The next converted row of the inputs in file order.
    fn next_row(&mut self) -> Option<Result<Row>> {
        loop {
            if self.current.is_none() {
                let input = self.inputs.next()?;
                self.current = Some(match input {
                    Input::File(path) => match source::open_counted(&path, self.bytes_read.clone())
                    {
                        Ok(it) => it,
                        Err(e) => return Some(Err(e)),
                    },
                    Input::Pairs(name, pairs) => {
                        Box::new(pairs.into_iter().enumerate().map(move |(i, p)| {
                            Ok((
                                Origin {
                                    file: name.clone(),
                                    line: i + 1,
                                },
                                serde_json::to_value(p).unwrap_or_default(),
                            ))
                        }))
                    }
                });
            }
            let Some(raw) = self.current.as_mut().and_then(Iterator::next) else {
                self.current = None;
                continue;
            };
            let origin = match &raw {
                Ok((o, _)) => o,
                Err(e) => &e.origin,
            };
            if !self.holdout.keeps(self.seed, origin) {
                continue;
            }
            self.records += 1;
            return Some(match raw {
                Err(e) => Ok(Err(e)),
                Ok((origin, value)) => match self.converter.convert(&origin, &value) {
                    Ok(Ok(pair)) => Ok(Ok((origin, pair))),
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(fatal) => Err(fatal),
                },
            });
        }
    }
}

impl Iterator for PairStream {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Result<Row>> {
        // Classic shuffle buffer: fill, then each arrival swaps out a random resident.
        while !self.exhausted {
            match self.next_row() {
                None => self.exhausted = true,
                Some(Ok(Ok(item))) => {
                    if self.buffer.len() < self.capacity {
                        self.buffer.push(item);
                        continue;
                    }
                    let i = self.rng.random_range(0..self.buffer.len());
                    return Some(Ok(Ok(std::mem::replace(&mut self.buffer[i], item))));
                }
                // Errors pass straight through so `strict` stops at the first one in file order.
                Some(other) => return Some(other),
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.buffer.len());
        Some(Ok(Ok(self.buffer.swap_remove(i))))
    }
}

/// Skipped rows by reason; with `strict`, the first one is an error naming file and line.
#[derive(Debug, Default, Clone)]
pub struct Skips {
    pub strict: bool,
    pub counts: BTreeMap<&'static str, usize>,
}

impl Skips {
    pub fn new(strict: bool) -> Self {
        Skips {
            strict,
            counts: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, e: &RowError) -> Result<()> {
        if self.strict {
            bail!("{e}; data.strict = true stops at the first bad row");
        }
        *self.counts.entry(e.reason).or_insert(0) += 1;
        Ok(())
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// A tokenised row's pair, or `None` with its skip recorded; fatal errors pass through.
    pub fn keep(&mut self, row: Result<TokRow>) -> Result<Option<TokenizedPair>> {
        match row? {
            Ok(tp) => Ok(Some(tp)),
            Err(e) => self.record(&e).map(|()| None),
        }
    }
}

/// A tokenised row: its pair, or why the row is skipped (a bad record or a truncation skip).
pub type TokRow = std::result::Result<TokenizedPair, RowError>;

/// Tokenises `rows` in order. With `threads` > 1 the rows are read (and converted) on one
/// background thread and tokenised on `threads` more, so reading, tokenising and training
/// overlap; see [`par_map`] for the order and memory guarantees.
pub fn tokenize_rows(
    rows: impl Iterator<Item = Result<Row>> + Send + 'static,
    tok: Arc<Tok>,
    trunc: Truncation,
    threads: usize,
) -> Box<dyn Iterator<Item = Result<TokRow>> + Send> {
    // Each worker tokenises with its own copy, so that workers share no tokenizer state (the
    // BPE cache, which a clone starts afresh).
    let make = move || {
        let (tok, trunc) = (Tok::clone(&tok), trunc.clone());
        move |row: Result<Row>| -> Result<TokRow> {
            match row? {
                Err(e) => Ok(Err(e)),
                Ok((origin, pair)) => tokenize_row(&tok, &trunc, &origin, &pair),
            }
        }
    };
    if threads <= 1 {
        return Box::new(rows.map(make()));
    }
    par_map(rows, make, threads)
}

/// Items per job of [`par_map`]: large enough to amortise the channels, small enough that the
/// first micro-batch is not kept waiting.
const CHUNK: usize = 32;

/// A map over `items` on `threads` worker threads, each with its own function from `make`;
/// results in input order (so identical to a serial map whatever the scheduling). `items` is
/// drawn on its own thread in chunks; at most `2 * threads + 2` chunks are read ahead of the
/// consumer, which bounds memory. Dropping the iterator stops the threads (after the chunk
/// each is on).
pub fn par_map<T: Send + 'static, U: Send + 'static, F: FnMut(T) -> U>(
    items: impl Iterator<Item = T> + Send + 'static,
    make: impl Fn() -> F + Send + Sync + 'static,
    threads: usize,
) -> Box<dyn Iterator<Item = U> + Send> {
    type Job<T, U> = (Vec<T>, mpsc::SyncSender<Vec<U>>);
    let make = Arc::new(make);
    let (job_tx, job_rx) = mpsc::sync_channel::<Job<T, U>>(threads);
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..threads {
        let (job_rx, make) = (job_rx.clone(), make.clone());
        std::thread::spawn(move || {
            let mut f = make();
            loop {
                let job = job_rx
                    .lock()
                    .map_err(drop)
                    .and_then(|rx| rx.recv().map_err(drop));
                let Ok((chunk, done)) = job else { break };
                // A dropped consumer is not an error: the results are simply not wanted.
                let _ = done.send(chunk.into_iter().map(&mut f).collect());
            }
        });
    }
    // Each chunk's result slot is queued in input order before the chunk goes to the workers.
    let (order_tx, order_rx) = mpsc::sync_channel::<mpsc::Receiver<Vec<U>>>(2 * threads);
    std::thread::spawn(move || {
        let mut items = items;
        loop {
            let chunk: Vec<T> = items.by_ref().take(CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            let (done_tx, done_rx) = mpsc::sync_channel(1);
            if order_tx.send(done_rx).is_err() || job_tx.send((chunk, done_tx)).is_err() {
                break;
            }
        }
    });
    Box::new(
        order_rx
            .into_iter()
            .flat_map(|done| done.recv().expect("a data worker thread panicked")),
    )
}

/// Tokenising threads for [`tokenize_rows`]: every core, since the read-ahead is bounded and
/// idle workers cost nothing once it is full.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Tokenises a streamed pair; truncation skips become row errors with the pair's origin.
pub fn tokenize_row(
    tok: &Tok,
    trunc: &Truncation,
    origin: &Origin,
    pair: &PreferencePair,
) -> Result<std::result::Result<TokenizedPair, RowError>> {
    Ok(tokenize_pair(tok, pair, trunc)?.map_err(|reason| RowError {
        origin: origin.clone(),
        reason: reason.name(),
        detail: format!("skipped: {}", reason.name().replace('_', " ")),
    }))
}

/// The padded length a pair contributes to a batch.
pub fn pair_len(p: &TokenizedPair) -> usize {
    p.chosen.ids.len().max(p.rejected.ids.len())
}

/// Cuts one window of items into micro-batches of similar length, in a seeded random order:
/// sorted longest first (stable, so deterministic), chunked, the chunks shuffled.
pub fn group_window<T>(
    mut window: Vec<T>,
    len: impl Fn(&T) -> usize,
    micro: usize,
    rng: &mut impl Rng,
) -> Vec<Vec<T>> {
    window.sort_by_key(|t| std::cmp::Reverse(len(t)));
    let mut batches = chunked(window, micro);
    batches.shuffle(rng);
    batches
}

/// `items` cut into runs of `size` (the last may be shorter).
fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::with_capacity(items.len().div_ceil(size.max(1)));
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(size.max(1)).collect());
    }
    out
}

/// A seeded permutation of `lengths.len()` in-memory pairs for one epoch. With a `window`
/// larger than `micro`, each window of the permutation is regrouped by [`group_window`], so
/// consecutive runs of `micro` indices have similar lengths; otherwise it is a plain shuffle.
pub fn epoch_order(
    lengths: &[usize],
    micro: usize,
    window: usize,
    seed: u64,
    epoch: usize,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(epoch as u64 + 1)),
    );
    order.shuffle(&mut rng);
    if window <= micro {
        return order;
    }
    let mut grouped = Vec::with_capacity(order.len());
    for chunk in order.chunks(window) {
        grouped.extend(
            group_window(chunk.to_vec(), |&i| lengths[i], micro, &mut rng)
                .into_iter()
                .flatten(),
        );
    }
    grouped
}

/// Streams micro-batches of tokenised pairs: windows of `window` pairs (at least `micro`)
/// regrouped by length, counting every skipped row in `skips`.
pub struct Batches {
    rows: Box<dyn Iterator<Item = Result<TokRow>> + Send>,
    pub micro: usize,
    pub window: usize,
    pub skips: Skips,
    /// Rows drawn so far (good and bad), as [`PairStream::records`].
    pub records: usize,
    rng: ChaCha8Rng,
    ready: std::vec::IntoIter<Vec<TokenizedPair>>,
}

impl Batches {
    /// `rows` as [`tokenize_rows`] yields them.
    pub fn new(
        rows: Box<dyn Iterator<Item = Result<TokRow>> + Send>,
        micro: usize,
        window: usize,
        skips: Skips,
        seed: u64,
    ) -> Self {
        Batches {
            rows,
            micro,
            window,
            skips,
            records: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            ready: Vec::new().into_iter(),
        }
    }

    fn fill(&mut self) -> Result<()> {
        let mut window = Vec::new();
        while window.len() < self.window.max(self.micro) {
            let Some(row) = self.rows.next() else { break };
            if let Some(tp) = self.skips.keep(row)? {
                window.push(tp);
            }
            self.records += 1;
        }
        self.ready = if self.window > self.micro {
            group_window(window, pair_len, self.micro, &mut self.rng)
        } else {
            chunked(window, self.micro)
        }
        .into_iter();
        Ok(())
    }
}

impl Iterator for Batches {
    type Item = Result<Vec<TokenizedPair>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(b) = self.ready.next() {
            return Some(Ok(b));
        }
        if let Err(e) = self.fill() {
            return Some(Err(e));
        }
        self.ready.next().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_keeps_every_index_once_and_is_seeded() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 50).collect();
        let a = epoch_order(&lengths, 4, 32, 1, 0);
        assert_eq!(a, epoch_order(&lengths, 4, 32, 1, 0));
        assert_ne!(a, epoch_order(&lengths, 4, 32, 1, 1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
        // padding of a batch = its spread of lengths; grouping shrinks the total
        let spread = |order: &[usize]| -> usize {
            order
                .chunks(4)
                .map(|c| {
                    c.iter().map(|&i| lengths[i]).max().unwrap() * c.len()
                        - c.iter().map(|&i| lengths[i]).sum::<usize>()
                })
                .sum()
        };
        assert!(
            spread(&a) * 3 < spread(&epoch_order(&lengths, 4, 0, 1, 0)),
            "{} vs plain",
            spread(&a)
        );
    }

    #[test]
    fn holdout_splits_rows_disjointly_by_fraction() {
        let origins: Vec<Origin> = (1..=2000)
            .map(|line| Origin {
                file: "f".into(),
                line,
            })
            .collect();
        let eval = origins
            .iter()
            .filter(|o| Holdout::Eval(0.1).keeps(3, o))
            .count();
        let train = origins
            .iter()
            .filter(|o| Holdout::Train(0.1).keeps(3, o))
            .count();
        assert_eq!(eval + train, 2000);
        assert!((150..250).contains(&eval), "{eval}");
    }
}
