//! Decoding: continuations of tokenised prompts in one left-padded batch with a KV cache,
//! greedy or sampled, and the text they add. `dpo-sam generate` and the samples a training run
//! writes at each evaluation (`training.eval_generate`) both decode through here.
//!
//! Sampling follows `transformers`' order (temperature, then top-k, then top-p). Each prompt
//! draws from its own ChaCha8 stream (the seed, stream = the prompt's index), so a completion
//! does not depend on the batch size or on which prompts share its batch.

use crate::models::cache::KvCache;
use crate::models::Model;
use crate::tokenizer::Tok;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How new tokens are chosen: the `[generate]` settings of a run, or `dpo-sam generate`'s
/// flags of the same names.
pub type Sampling = crate::config::GenerateConfig;

impl Sampling {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            max_new_tokens,
        }
    }

    /// Rejects settings that cannot decode, naming the `generate` flag.
    pub fn check(&self) -> Result<()> {
        match self.problem() {
            Some((field, what)) => bail!("--{}: {what}", field.replace('_', "-")),
            None => Ok(()),
        }
    }
}

/// The most positions a model's `config.json` allows (`n_positions`, `max_position_embeddings`
/// or `n_ctx`), if it says.
pub fn context_limit(config: &serde_json::Value) -> Option<usize> {
    ["n_positions", "max_position_embeddings", "n_ctx"]
        .iter()
        .find_map(|k| config.get(*k)?.as_u64())
        .map(|n| n as usize)
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
    }
}

/// One prompt's new tokens (without the EOS that ended them) and why it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Decodes continuations of `prompts` (token ids, none empty) as one left-padded batch with a KV
/// cache. Row `i` samples from stream `streams[i]` of `sampling.seed` (its prompt's index, so
/// that batching does not change the draws); `eos` ends a row; `pad` fills the left padding and
/// the steps of rows that have ended. New tokens stop where the batch reaches the model's
/// [`context_limit`] (finish `length`; no tokens where the prompts fill it).
pub fn generate_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    streams: &[u64],
    eos: Option<u32>,
    pad: u32,
    sampling: &Sampling,
    device: &Device,
) -> Result<Vec<Completion>> {
    sampling.check()?;
    if streams.len() != prompts.len() {
        bail!(
            "{} prompts but {} sampling streams",
            prompts.len(),
            streams.len()
        );
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {} has no tokens", streams[i]);
    }
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_new_tokens = match context_limit(&model.config_json) {
        Some(limit) => sampling.max_new_tokens.min(limit.saturating_sub(longest)),
        None => sampling.max_new_tokens,
    };
    let mut ids = Vec::with_capacity(b * longest);
    let mut mask: Vec<Vec<u32>> = Vec::with_capacity(b);
    for p in prompts {
        let padding = longest - p.len();
        ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat_n(0, padding)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    let net = model.net.as_ref();
    let head = net.output_layer();
    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
            rng.set_stream(streams[i]);
            rng
        })
        .collect();
    let mut out: Vec<Option<Completion>> = vec![None; b];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut cache = KvCache::new();
    let mut input = Tensor::from_vec(ids, (b, longest), device)?;
    for step in 0..max_new_tokens {
        let mask_tensor = Tensor::new(mask.clone(), device)?;
        let hidden = net.forward_cached(&input, &mask_tensor, &mut cache)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        let logits = head.logits(&last, None)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (r, row) in logits.iter().enumerate() {
            if out[r].is_some() {
                next.push(pad);
                continue;
            }
            let token = sample(row, sampling, &mut rngs[r])
                .with_context(|| format!("prompt {} at new token {step}", streams[r]))?;
            next.push(token);
            if Some(token) == eos {
                out[r] = Some(Completion {
                    tokens: std::mem::take(&mut tokens[r]),
                    finish: Finish::Eos,
                });
            } else {
                tokens[r].push(token);
            }
        }
        if out.iter().all(Option::is_some) {
            break;
        }
        for m in &mut mask {
            m.push(1);
        }
        input = Tensor::from_vec(next, (b, 1), device)?;
    }
    Ok(out
        .into_iter()
        .zip(tokens)
        .map(|(done, tokens)| {
            done.unwrap_or(Completion {
                tokens,
                finish: Finish::Length,
            })
        })
        .collect())
}

/// The next token from one row of logits: the first maximum when greedy, else a draw after
/// temperature, top-k and top-p.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut ChaCha8Rng) -> Result<u32> {
    if logits.is_empty() {
        bail!("the model returned no logits");
    }
    if logits.iter().any(|l| l.is_nan()) {
        bail!("the model returned NaN logits");
    }
    if sampling.temperature == 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
        return Ok(best as u32);
    }
    // Most likely first, ties by id, so the draw is a function of the logits alone.
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = sampling.top_k.unwrap_or(order.len()).clamp(1, order.len());
    if k < order.len() {
        // Only the k kept need sorting, not the whole vocabulary.
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);
    let t = sampling.temperature;
    let top = logits[order[0]] as f64 / t;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i] as f64 / t - top).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut kept = weights.len();
    if let Some(p) = sampling.top_p {
        let mut cumulative = 0.0;
        for (i, w) in weights.iter().enumerate() {
            cumulative += w / total;
            if cumulative >= p {
                kept = i + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut draw = rng.random::<f64>() * kept_total;
    for (i, w) in weights[..kept].iter().enumerate() {
        draw -= w;
        if draw < 0.0 {
            return Ok(order[i] as u32);
        }
    }
    Ok(order[kept - 1] as u32)
}

/// The text the new tokens add after the prompt: the decoded whole minus the decoded prompt, so
/// that tokenizers that drop a leading space when decoding alone (SentencePiece) keep it.
pub fn completion_text(tok: &Tok, prompt: &[u32], completion: &[u32]) -> Result<String> {
    let decode = |ids: &[u32]| {
        tok.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    };
    let before = decode(prompt)?;
    let whole = decode(&[prompt, completion].concat())?;
    match whole.strip_prefix(&before) {
        Some(rest) => Ok(rest.to_string()),
        None => decode(completion),
    }
}
