//! From a model's final hidden states to the log-probs that preference losses compare: one per
//! response token, summed per sequence. The trainer, the reference cache and `score` all go
//! through here, so the three agree on which tokens are scored.

use crate::data::batch::PreferenceBatch;
use crate::models::Model;
use anyhow::Result;
use candle_core::Tensor;

/// Per-row sequence log-probs `[2b]` (chosen rows first) from per-token log-probs `[n]`: the
/// sum over each row's response tokens (prompt and padding excluded).
pub fn sequence_logps(
    batch: &PreferenceBatch,
    token_logps: &Tensor,
) -> candle_core::Result<Tensor> {
    let rows = 2 * batch.num_pairs;
    Tensor::zeros(rows, token_logps.dtype(), token_logps.device())?.index_add(
        &batch.rows,
        token_logps,
        0,
    )
}

/// Sequence log-probs `[2b]` of a batch's rows under `model`, without a graph.
pub fn row_logps(model: &Model, batch: &PreferenceBatch) -> Result<Tensor> {
    Ok(row_logps_and_hidden(model, batch)?.0)
}

/// [`row_logps`] and the response hidden states `[n, d]` they came from (for CHES).
pub fn row_logps_and_hidden(model: &Model, batch: &PreferenceBatch) -> Result<(Tensor, Tensor)> {
    let h = batch
        .response_hidden(model.net.forward_hidden(&batch.input_ids)?)?
        .detach();
    let token_logps = model
        .net
        .output_layer()
        .token_logps(&h, &batch.targets, None)?
        .detach();
    Ok((sequence_logps(batch, &token_logps)?, h))
}

/// Sequence log-probs (chosen, rejected) `[b]` of one batch under `model`, without a graph.
pub fn pair_logps(model: &Model, batch: &PreferenceBatch) -> Result<(Tensor, Tensor)> {
    let seq = row_logps(model, batch)?;
    let b = batch.num_pairs;
    Ok((seq.narrow(0, 0, b)?, seq.narrow(0, b, b)?))
}
