//! Tokenising preference pairs and stacking them into one forward pass, as TRL 1.x's
//! DPOTrainer does: EOS appended to each response of a text record (not to a chat template's
//! rendering, which closes the turn itself, nor to a text that already ends with it); the
//! prompt and the prompt followed by each response tokenised with the tokenizer's own
//! special-token rule; a response's tokens are those after the common prefix of the two token
//! lists. Chosen rows come first, rejected rows after.

use super::PreferencePair;
use crate::config::TruncationMode;
use crate::tokenizer::Tok;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Truncation as in TRL and the original DPO code: when prompt + longest response exceed
/// `max_length`, the prompt is cut to `max_prompt_length` first, then responses are cut.
#[derive(Debug, Clone)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: Option<usize>,
    /// Which end of a long prompt is kept.
    pub mode: TruncationMode,
}

impl Truncation {
    pub fn from_config(d: &crate::config::DataConfig) -> Self {
        Self {
            max_length: d.max_length,
            max_prompt_length: d.max_prompt_length,
            mode: d.truncation_mode,
        }
    }
}

/// One tokenised sequence: `ids[..prompt_len]` is prompt (masked), the rest is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Sequence {
    pub fn response_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub chosen: Sequence,
    pub rejected: Sequence,
}

/// Why a pair was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// The prompt alone leaves no room for a response within `max_length`.
    PromptTooLong,
    /// Chosen and rejected are the same text (the DPO loss carries no signal).
    IdenticalResponses,
    /// A response is empty.
    EmptyResponse,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::PromptTooLong => "prompt_too_long",
            SkipReason::IdenticalResponses => "chosen_equals_rejected",
            SkipReason::EmptyResponse => "empty_response",
        }
    }
}

/// Tokenises one pair, or says why it must be skipped.
pub fn tokenize_pair(
    tok: &Tok,
    pair: &PreferencePair,
    trunc: &Truncation,
) -> Result<Result<TokenizedPair, SkipReason>> {
    if pair.chosen.is_empty() || pair.rejected.is_empty() {
        return Ok(Err(SkipReason::EmptyResponse));
    }
    if pair.chosen == pair.rejected {
        return Ok(Err(SkipReason::IdenticalResponses));
    }
    Ok(truncate(tokenize_full(tok, pair)?, trunc))
}

/// The pair's token sequences before truncation (for length statistics).
pub fn tokenize_full(tok: &Tok, pair: &PreferencePair) -> Result<TokenizedPair> {
    let prompt_ids = tok.encode(&pair.prompt)?;
    let eos_text = tok.inner.id_to_token(tok.eos_id);
    let split = |response: &str| -> Result<Sequence> {
        let mut ids = tok.encode(&format!("{}{}", pair.prompt, response))?;
        let ends_with_eos = eos_text.as_deref().is_some_and(|e| response.ends_with(e));
        if pair.append_eos && !ends_with_eos {
            ids.push(tok.eos_id);
        }
        let prompt_len = prompt_ids
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count();
        Ok(Sequence { ids, prompt_len })
    };
    Ok(TokenizedPair {
        chosen: split(&pair.chosen)?,
        rejected: split(&pair.rejected)?,
    })
}

/// Applies `trunc` to a pair from [`tokenize_full`].
pub fn truncate(pair: TokenizedPair, trunc: &Truncation) -> Result<TokenizedPair, SkipReason> {
    let TokenizedPair {
        mut chosen,
        mut rejected,
    } = pair;
    let longest = chosen.ids.len().max(rejected.ids.len());
    if longest > trunc.max_length {
        if let Some(max_prompt) = trunc.max_prompt_length {
            for seq in [&mut chosen, &mut rejected] {
                cut_prompt(seq, max_prompt, trunc.mode);
            }
        }
        if chosen.prompt_len.max(rejected.prompt_len) >= trunc.max_length {
            return Err(SkipReason::PromptTooLong);
        }
        for seq in [&mut chosen, &mut rejected] {
            seq.ids.truncate(trunc.max_length);
        }
    }
    Ok(TokenizedPair { chosen, rejected })
}

fn cut_prompt(seq: &mut Sequence, max_prompt: usize, mode: TruncationMode) {
    if seq.prompt_len <= max_prompt {
        return;
    }
    let drop = seq.prompt_len - max_prompt;
    let range = if mode == TruncationMode::KeepStart {
        max_prompt..seq.prompt_len
    } else {
        0..drop
    };
    seq.ids.drain(range);
    seq.prompt_len = max_prompt;
}

/// Chosen and rejected sequences stacked into one padded batch (`2b` rows), with the flat
/// positions whose hidden states predict response tokens.
pub struct PreferenceBatch {
    /// `[2b, t]` u32, right-padded.
    pub input_ids: Tensor,
    /// `[n]` u32: row·t + j − 1 for every response token j (the position that predicts it).
    pub positions: Tensor,
    /// `[n]` u32: the response tokens.
    pub targets: Tensor,
    /// `[n]` u32: the row each response token belongs to.
    pub rows: Tensor,
    /// Response tokens per row.
    pub response_lens: Vec<usize>,
    pub num_pairs: usize,
    /// Non-padding tokens in the batch.
    pub num_tokens: usize,
    /// Padding share of `input_ids`.
    pub padding_fraction: f64,
}

impl PreferenceBatch {
    pub fn new(pairs: &[TokenizedPair], pad_id: u32, device: &Device) -> Result<Self> {
        let rows: Vec<&Sequence> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let t = rows.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        let mut ids = vec![pad_id; rows.len() * t];
        let (mut positions, mut targets, mut row_of) = (Vec::new(), Vec::new(), Vec::new());
        let mut response_lens = Vec::with_capacity(rows.len());
        for (r, seq) in rows.iter().enumerate() {
            ids[r * t..r * t + seq.ids.len()].copy_from_slice(&seq.ids);
            // A prompt of zero tokens has no position predicting the first response token.
            let first = seq.prompt_len.max(1);
            for j in first..seq.ids.len() {
                positions.push((r * t + j - 1) as u32);
                targets.push(seq.ids[j]);
                row_of.push(r as u32);
            }
            response_lens.push(seq.ids.len() - first);
        }
        let num_tokens: usize = rows.iter().map(|s| s.ids.len()).sum();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (rows.len(), t), device)?,
            positions: Tensor::new(positions.as_slice(), device)?,
            targets: Tensor::new(targets.as_slice(), device)?,
            rows: Tensor::new(row_of.as_slice(), device)?,
            response_lens,
            num_pairs: pairs.len(),
            num_tokens,
            padding_fraction: 1.0 - num_tokens as f64 / (rows.len() * t) as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &str, c: &str, r: &str) -> PreferencePair {
        PreferencePair {
            prompt: p.into(),
            chosen: c.into(),
            rejected: r.into(),
            append_eos: true,
        }
    }

    #[test]
    fn responses_follow_the_prompt_and_end_with_eos() -> Result<()> {
        let tok = Tok::builtin()?;
        let trunc = Truncation {
            max_length: 64,
            max_prompt_length: None,
            mode: TruncationMode::KeepEnd,
        };
        let tp = tokenize_pair(&tok, &pair("1+2=", "3", "44"), &trunc)?.unwrap();
        assert_eq!(tp.chosen.prompt_len, 4);
        assert_eq!(tp.chosen.ids[4..], [tok.encode("3")?[0], tok.eos_id]);
        assert_eq!(tp.rejected.response_len(), 3);
        let batch = PreferenceBatch::new(&[tp], tok.pad_id, &Device::Cpu)?;
        assert_eq!(batch.input_ids.dims(), &[2, 7]);
        assert_eq!(batch.response_lens, vec![2, 3]);
        // chosen row 0: tokens 4,5 predicted by positions 3,4; rejected row 1 (t = 7): 7+3..7+5
        assert_eq!(batch.positions.to_vec1::<u32>()?, vec![3, 4, 10, 11, 12]);
        assert_eq!(batch.rows.to_vec1::<u32>()?, vec![0, 0, 1, 1, 1]);
        Ok(())
    }

    #[test]
    fn truncation_cuts_prompt_first_then_responses() -> Result<()> {
        let tok = Tok::builtin()?;
        let p = pair("abcdefghij", "klmnop", "qr");
        let keep_end = Truncation {
            max_length: 8,
            max_prompt_length: Some(4),
            mode: TruncationMode::KeepEnd,
        };
        let tp = tokenize_pair(&tok, &p, &keep_end)?.unwrap();
        assert_eq!(tok.decode(&tp.chosen.ids[..4])?, "ghij");
        assert_eq!(tp.chosen.ids.len(), 8);
        assert_eq!(tok.decode(&tp.chosen.ids[4..])?, "klmn");
        assert_eq!(tp.rejected.ids.len(), 7);
        let keep_start = Truncation {
            mode: TruncationMode::KeepStart,
            ..keep_end
        };
        let tp = tokenize_pair(&tok, &p, &keep_start)?.unwrap();
        assert_eq!(tok.decode(&tp.chosen.ids[..4])?, "abcd");
        let no_room = Truncation {
            max_length: 8,
            max_prompt_length: None,
            mode: TruncationMode::KeepEnd,
        };
        assert_eq!(
            tokenize_pair(&tok, &p, &no_room)?,
            Err(SkipReason::PromptTooLong)
        );
        assert_eq!(
            tokenize_pair(&tok, &pair("a", "b", "b"), &no_room)?,
            Err(SkipReason::IdenticalResponses)
        );
        assert_eq!(
            tokenize_pair(&tok, &pair("a", "", "b"), &no_room)?,
            Err(SkipReason::EmptyResponse)
        );
        Ok(())
    }
}
