//! Incremental decoding: the per-layer key/value cache, and the positions and attention mask of
//! one decoding step, derived (as `transformers` does) from a 0/1 attention mask over every token
//! so far, so that each row of a left-padded batch decodes exactly as it would alone.

use super::ops::rotary_tables;
use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of every layer for the tokens seen so far, each `[b, kv_heads, past, head_dim]`
/// (before grouped-query heads are repeated, so the cache stays as small as the model allows).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached so far; read it before a step appends to layer 0.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values of `layer` along the time axis and returns the whole
    /// of them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if layer == self.layers.len() {
            self.layers.push((k.clone(), v.clone()));
        } else if let Some((pk, pv)) = self.layers.get_mut(layer) {
            *pk = Tensor::cat(&[&*pk, k], 2)?;
            *pv = Tensor::cat(&[&*pv, v], 2)?;
        } else {
            candle_core::bail!(
                "KV cache: layer {layer} appended before layer {}",
                self.layers.len()
            );
        }
        Ok(self.layers[layer].clone())
    }
}

/// Where the new tokens of one step sit and what they may attend to.
pub struct Step {
    /// Position ids `[b, t]` (u32): how many real tokens precede each one in its row.
    pub positions: Tensor,
    /// The largest entry of `positions`, to size position tables.
    pub max_position: usize,
    /// Additive mask `[b, 1, t, past + t]`: causal, padding and optional sliding window.
    pub mask: Tensor,
}

impl Step {
    /// `attention_mask` is `[b, past + t]` with 1 for real tokens and 0 for (left) padding;
    /// `window` is Mistral's sliding window, counted in cache columns as `transformers` does.
    pub fn new(
        attention_mask: &Tensor,
        t: usize,
        past: usize,
        window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Step> {
        let rows = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let total = past + t;
        if let Some(row) = rows.iter().find(|r| r.len() != total) {
            candle_core::bail!(
                "attention_mask has {} columns but the cache holds {past} tokens and input_ids {t}",
                row.len()
            );
        }
        let b = rows.len();
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = vec![0f32; b * t * total];
        for (r, row) in rows.iter().enumerate() {
            let mut seen = 0u32;
            for (j, &m) in row.iter().enumerate() {
                // Padding gets position 0: it never reaches a real token, so any valid row works.
                let pos = if m != 0 { seen } else { 0 };
                seen += (m != 0) as u32;
                if j >= past {
                    positions.push(pos);
                }
            }
            for i in 0..t {
                let q = past + i;
                for (j, &m) in row.iter().enumerate() {
                    let too_old = window.is_some_and(|w| q >= j + w);
                    // The diagonal always stays open so that a padding query has something to
                    // attend to: a fully masked row would give NaN (in f16) that then leaks
                    // through 0 · NaN into the real rows.
                    let open = j == q || (j < q && m != 0 && !too_old);
                    if !open {
                        mask[(r * t + i) * total + j] = -1e9;
                    }
                }
            }
        }
        let max_position = positions.iter().copied().max().unwrap_or(0) as usize;
        Ok(Step {
            positions: Tensor::from_vec(positions, (b, t), device)?,
            max_position,
            mask: Tensor::from_vec(mask, (b, 1, t, total), device)?.to_dtype(dtype)?,
        })
    }

    /// Rotate-half RoPE tables gathered at this step's positions: `[b, 1, t, rot_dim]` each,
    /// broadcasting over heads in [`super::ops::rotary`].
    pub fn rotary(&self, rot_dim: usize, base: f64, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = self.positions.dims2()?;
        let device = self.positions.device();
        let (cos, sin) = rotary_tables(self.max_position + 1, rot_dim, base, dtype, device)?;
        let flat = self.positions.flatten_all()?;
        let gather = |table: &Tensor| table.index_select(&flat, 0)?.reshape((b, 1, t, rot_dim));
        Ok((gather(&cos)?, gather(&sin)?))
    }
}
