//! Tokenizers: a Hugging Face `tokenizer.json` with its special tokens resolved from
//! `tokenizer_config.json`, `special_tokens_map.json` and `config.json`, or the built-in
//! character tokenizer of the embedded default run.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// A tokenizer with the special-token ids that DPO batches need.
#[derive(Clone)]
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    /// Padding id (EOS when the model has no pad token, as TRL does for Pythia and GPT-2).
    pub pad_id: u32,
    /// `tokenizer_config.json` as found (written back when saving).
    config: serde_json::Value,
}

/// Characters of the built-in tokenizer; id 0 is `<|endoftext|>`.
const BUILTIN_CHARS: &str = "0123456789abcdefghijklmnopqrstuvwxyz +-=:?.,\n";
pub const BUILTIN_EOS: &str = "<|endoftext|>";

impl Tok {
    /// The built-in character-level tokenizer (a BPE with no merges, so `transformers` loads it).
    pub fn builtin() -> Result<Tok> {
        let mut vocab = serde_json::Map::new();
        vocab.insert(BUILTIN_EOS.into(), 0.into());
        for (i, c) in BUILTIN_CHARS.chars().enumerate() {
            vocab.insert(c.to_string(), (i + 1).into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": 0, "content": BUILTIN_EOS, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        let inner: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| anyhow!("building the built-in tokenizer: {e}"))?;
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": BUILTIN_EOS, "bos_token": BUILTIN_EOS, "unk_token": BUILTIN_EOS,
            "model_max_length": 1_000_000,
        });
        Ok(Tok {
            inner,
            eos_id: 0,
            bos_id: Some(0),
            pad_id: 0,
            config,
        })
    }

    /// Loads `tokenizer.json` from a model directory and resolves EOS/BOS/PAD. When no file names
    /// an EOS, `<|endoftext|>` is taken if the vocabulary has it; PAD falls back to EOS; BOS stays
    /// `None` unless named (whether `encode` adds one is the tokenizer's own post-processor's call).
    pub fn from_dir(dir: &Path) -> Result<Tok> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let read_json = |name: &str| -> Result<serde_json::Value> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(serde_json::Value::Null);
            }
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))
        };
        let tok_cfg = read_json("tokenizer_config.json")?;
        let special = read_json("special_tokens_map.json")?;
        let model_cfg = read_json("config.json")?;
        let token_id = |key: &str| -> Option<u32> {
            for source in [&tok_cfg, &special] {
                let v = source.get(key);
                // Either a plain string or an AddedToken object with `content`.
                let content = v.and_then(|v| {
                    v.as_str()
                        .or_else(|| v.get("content").and_then(|c| c.as_str()))
                });
                if let Some(id) = content.and_then(|c| inner.token_to_id(c)) {
                    return Some(id);
                }
            }
            // Some configs (Llama 3) list several EOS ids; the first is the one a tokenizer names.
            let id = model_cfg.get(format!("{key}_id"));
            let id = id.and_then(|v| v.as_array().and_then(|a| a.first()).unwrap_or(v).as_u64());
            id.map(|v| v as u32)
        };
        // A bare tokenizer.json of the GPT-2 family (e.g. Pythia's) names no special tokens, but
        // its `<|endoftext|>` is what every config of that family calls EOS.
        let eos_id = token_id("eos_token").or_else(|| inner.token_to_id(BUILTIN_EOS)).ok_or_else(|| {
            anyhow!(
                "{}: no EOS token: none named in tokenizer_config.json, special_tokens_map.json or config.json, and no `{BUILTIN_EOS}` token",
                dir.display()
            )
        })?;
        let bos_id = token_id("bos_token");
        let pad_id = token_id("pad_token").unwrap_or(eos_id);
        Ok(Tok {
            inner,
            eos_id,
            bos_id,
            pad_id,
            config: tok_cfg,
        })
    }

    /// Token ids with the tokenizer's own special-token rule (BOS only where it adds one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow!("cannot write {}: {e}", dir.join("tokenizer.json").display()))?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let mut special = serde_json::Map::new();
        for (key, id) in [
            ("eos_token", Some(self.eos_id)),
            ("bos_token", self.bos_id),
            ("pad_token", Some(self.pad_id)),
        ] {
            if let Some(tok) = name(id) {
                special.insert(key.into(), tok.into());
            }
        }
        let mut config = match &self.config {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        for (k, v) in &special {
            config.entry(k.clone()).or_insert(v.clone());
        }
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        std::fs::write(
            dir.join("special_tokens_map.json"),
            serde_json::to_string_pretty(&special)?,
        )?;
        Ok(())
    }

    /// Checks that every id the tokenizer can produce fits the model's embedding.
    pub fn check_fits(&self, model_vocab: usize, origin: &str) -> Result<()> {
        let needed = self.vocab_size();
        if needed > model_vocab {
            bail!("{origin}: the tokenizer has {needed} tokens but the model's vocab_size is {model_vocab}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_round_trips_and_reloads_from_disk() -> Result<()> {
        let tok = Tok::builtin()?;
        let ids = tok.encode("12+7=19")?;
        assert_eq!(ids.len(), 7);
        assert_eq!(tok.decode(&ids)?, "12+7=19");
        let dir = tempfile::tempdir()?;
        tok.save(dir.path())?;
        let again = Tok::from_dir(dir.path())?;
        assert_eq!(again.encode("abc xyz")?, tok.encode("abc xyz")?);
        assert_eq!(again.eos_id, 0);
        Ok(())
    }

    /// The real tokenizer `name` from ../shared/tokenizers, or `None` (reason printed) if absent.
    fn shared(name: &str) -> Option<Tok> {
        let dir =
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/tokenizers")).join(name);
        if !dir.is_dir() {
            eprintln!("skipping: {} not found", dir.display());
            return None;
        }
        Some(Tok::from_dir(&dir).expect("shared tokenizer loads"))
    }

    #[test]
    fn pythia_bare_tokenizer_json_gets_endoftext_as_eos_and_pad() -> Result<()> {
        let Some(tok) = shared("pythia") else {
            return Ok(());
        };
        let eot = tok
            .inner
            .token_to_id(BUILTIN_EOS)
            .expect("pythia has <|endoftext|>");
        assert_eq!(tok.eos_id, eot);
        // `<|padding|>` exists but nothing names it the pad token, so TRL would pad with EOS.
        assert_eq!(tok.pad_id, tok.eos_id);
        assert_eq!(tok.bos_id, None);
        let ids = tok.encode("Hello world")?;
        assert!(
            !ids.is_empty() && !ids.contains(&eot),
            "no special tokens added: {ids:?}"
        );
        assert_eq!(tok.decode(&ids)?, "Hello world");
        Ok(())
    }

    #[test]
    fn gpt2_bare_tokenizer_json_gets_endoftext_as_eos_and_pad() -> Result<()> {
        let Some(tok) = shared("gpt2") else {
            return Ok(());
        };
        assert_eq!(tok.eos_id, 50256);
        assert_eq!(tok.pad_id, 50256);
        let ids = tok.encode("Hello world")?;
        assert_eq!(ids, [15496, 995]);
        Ok(())
    }

    #[test]
    fn mistral_adds_bos_not_eos_and_pads_with_eos() -> Result<()> {
        let Some(tok) = shared("mistral-7b") else {
            return Ok(());
        };
        assert_eq!(tok.inner.id_to_token(tok.eos_id).as_deref(), Some("</s>"));
        assert_eq!(tok.bos_id, tok.inner.token_to_id("<s>"));
        assert_eq!(
            tok.pad_id, tok.eos_id,
            "pad_token is null in tokenizer_config.json"
        );
        let ids = tok.encode("Hello world")?;
        assert_eq!(ids.first().copied(), tok.bos_id);
        assert_ne!(ids.last().copied(), Some(tok.eos_id));
        Ok(())
    }

    #[test]
    fn eos_id_list_in_config_json_takes_the_first() -> Result<()> {
        let dir = tempfile::tempdir()?;
        Tok::builtin()?
            .inner
            .save(dir.path().join("tokenizer.json"), false)
            .map_err(|e| anyhow!("{e}"))?;
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"eos_token_id": [5, 0], "bos_token_id": 3}"#,
        )?;
        let tok = Tok::from_dir(dir.path())?;
        assert_eq!((tok.eos_id, tok.bos_id, tok.pad_id), (5, Some(3), 5));
        Ok(())
    }
}
