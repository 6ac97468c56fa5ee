//! Data parallelism in the training loop (the collective itself is [`crate::dist`]). Each rank
//! runs a contiguous share of every global batch's micro-batches ([`crate::dist::shard`]); after
//! them the ranks agree on the step in one small all-gather ([`agree`]: a non-finite loss on any
//! rank, a stop signal on any rank, which parameters have gradients, the metrics' tallies
//! summed), and the accumulated gradients are summed over ranks in buckets ([`all_reduce_grads`]),
//! so every rank clips and applies the same update. At start-up the ranks check that they run
//! the same config and hold the same weights. With one process ([`crate::dist::Solo`]) nothing is
//! exchanged.
//!
//! Each micro-batch's loss is weighted by 1 / (the global step's micro-batch count), so the sum
//! over ranks is the global batch's mean gradient, as one process accumulates it; at an epoch's
//! partial last step a rank may have no micro-batch and contributes zeros.

use super::metrics::Tally;
use crate::config::Config;
use crate::dist::Collective;
use crate::models::Param;
use crate::optim::GradAccumulator;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// A step as every rank sees it after [`agree`].
pub(super) struct Agreed {
    /// The first non-finite loss, in rank order (naming the rank when there are several).
    pub nonfinite: Option<String>,
    /// Some rank was asked (by a signal) to stop after this step.
    pub stop: bool,
    /// The tallies of all ranks, summed in rank order.
    pub tally: Tally,
    /// Parameters that have a gradient on some rank.
    has_grad: Vec<bool>,
}

/// One rank's part of [`Agreed`], as sent. TOML keeps every f64 exactly (NaN included).
#[derive(Serialize, Deserialize)]
struct Report {
    stop: bool,
    nonfinite: Option<String>,
    has_grad: Vec<bool>,
    tally: toml::Value,
}

/// Shares this rank's view of the step with the others.
pub(super) fn agree(
    world: &dyn Collective,
    nonfinite: Option<String>,
    stop: bool,
    tally: Tally,
    acc: &GradAccumulator,
) -> Result<Agreed> {
    let has_grad: Vec<bool> = acc.grads().iter().map(Option::is_some).collect();
    if world.is_solo() {
        return Ok(Agreed {
            nonfinite,
            stop,
            tally,
            has_grad,
        });
    }
    let mine = Report {
        stop,
        nonfinite,
        has_grad,
        tally: toml::Value::try_from(&tally).context("metrics tally")?,
    };
    let mut agreed = Agreed {
        nonfinite: None,
        stop: false,
        tally: Tally::default(),
        has_grad: vec![false; mine.has_grad.len()],
    };
    let mut tallies = Vec::with_capacity(world.world_size());
    for (rank, bytes) in world
        .all_gather(toml::to_string(&mine)?.as_bytes())?
        .iter()
        .enumerate()
    {
        let report: Report = toml::from_str(std::str::from_utf8(bytes)?)
            .with_context(|| format!("rank {rank}'s report of the step"))?;
        if report.has_grad.len() != agreed.has_grad.len() {
            bail!(
                "rank {rank} trains {} parameters, this rank {}: the ranks hold different models",
                report.has_grad.len(),
                agreed.has_grad.len()
            );
        }
        agreed.stop |= report.stop;
        if agreed.nonfinite.is_none() {
            agreed.nonfinite = report.nonfinite.map(|what| format!("rank {rank}: {what}"));
        }
        for (any, has) in agreed.has_grad.iter_mut().zip(report.has_grad) {
            *any |= has;
        }
        tallies.push(report.tally);
    }
    agreed.tally = sum_values(tallies)?
        .try_into()
        .context("summed metrics tally")?;
    Ok(agreed)
}

/// An evaluation's per-batch tallies from every rank, summed in batch order (the ranks hold
/// contiguous shares), so that the sum is one process's, bit for bit.
pub(super) fn sum_tallies(world: &dyn Collective, tallies: Vec<Tally>) -> Result<Tally> {
    #[derive(Serialize, Deserialize)]
    struct Share {
        tallies: Vec<toml::Value>,
    }
    let mine = Share {
        tallies: tallies
            .iter()
            .map(toml::Value::try_from)
            .collect::<Result<_, _>>()
            .context("metrics tally")?,
    };
    let shares = match world.is_solo() {
        true => vec![mine],
        false => world
            .all_gather(toml::to_string(&mine)?.as_bytes())?
            .iter()
            .enumerate()
            .map(|(rank, b)| {
                toml::from_str::<Share>(std::str::from_utf8(b)?)
                    .with_context(|| format!("rank {rank}'s evaluation tallies"))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let all: Vec<toml::Value> = shares.into_iter().flat_map(|s| s.tallies).collect();
    match all.is_empty() {
        true => Ok(Tally::default()),
        false => Ok(sum_values(all)?.try_into()?),
    }
}

/// Field-by-field sums of tallies as TOML values: numbers add (in the order given), tables
/// merge key by key (a key only some have is taken as it is: a `None` on the others).
fn sum_values(values: Vec<toml::Value>) -> Result<toml::Value> {
    fn add(a: toml::Value, b: toml::Value) -> Result<toml::Value> {
        use toml::Value::{Float, Integer, Table};
        Ok(match (a, b) {
            (Float(x), Float(y)) => Float(x + y),
            (Integer(x), Integer(y)) => Integer(x + y),
            (Table(mut x), Table(y)) => {
                for (k, v) in y {
                    let sum = match x.remove(&k) {
                        Some(old) => add(old, v)?,
                        None => v,
                    };
                    x.insert(k, sum);
                }
                Table(x)
            }
            (a, b) => bail!("metrics tally: cannot add {a} and {b}"),
        })
    }
    let mut it = values.into_iter();
    let first = it.next().context("no tallies")?;
    it.try_fold(first, add)
}

/// Sums the accumulated gradients over ranks in place, in buckets of about `bucket_mib` MiB:
/// one all-reduce per bucket of gradients laid end to end, after the step's last backward (not
/// overlapped with it). A parameter with a gradient on some ranks only is summed with zeros
/// from the others; one with none anywhere keeps none, as in one process.
pub(super) fn all_reduce_grads(
    world: &dyn Collective,
    acc: &mut GradAccumulator,
    agreed: &Agreed,
    params: &[Param],
    bucket_mib: usize,
) -> Result<()> {
    if world.is_solo() {
        return Ok(());
    }
    let grads = acc.grads_mut();
    let (mut bucket, mut bytes) = (Vec::new(), 0);
    for (i, p) in params.iter().enumerate() {
        if !agreed.has_grad[i] {
            continue;
        }
        let g = match &grads[i] {
            Some(g) => g,
            None => grads[i].insert(p.var.as_tensor().zeros_like()?.to_dtype(DType::F32)?),
        };
        bytes += 4 * g.elem_count();
        bucket.push(i);
        if bytes >= bucket_mib << 20 {
            reduce_bucket(world, grads, &bucket)?;
            bucket.clear();
            bytes = 0;
        }
    }
    reduce_bucket(world, grads, &bucket)
}

fn reduce_bucket(
    world: &dyn Collective,
    grads: &mut [Option<Tensor>],
    bucket: &[usize],
) -> Result<()> {
    if bucket.is_empty() {
        return Ok(());
    }
    let taken: Vec<Tensor> = bucket
        .iter()
        .map(|&i| grads[i].take().expect("a gradient in the bucket"))
        .collect();
    let flat = taken
        .iter()
        .map(|g| g.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sum = world
        .all_reduce_sum(&Tensor::cat(&flat, 0)?)
        .context("summing the gradients over ranks")?;
    let mut offset = 0;
    for (&i, g) in bucket.iter().zip(taken) {
        let n = g.elem_count();
        grads[i] = Some(sum.narrow(0, offset, n)?.reshape(g.shape())?);
        offset += n;
    }
    Ok(())
}

/// Refuses ranks started with different configs, naming every key that differs from rank 0's
/// on every rank (rank 0 sends its resolved config; each rank compares).
pub(super) fn check_same_config(world: &dyn Collective, cfg: &Config) -> Result<()> {
    if world.is_solo() {
        return Ok(());
    }
    let text = world.broadcast(toml::to_string(cfg)?.as_bytes())?;
    let root = Config::parse(std::str::from_utf8(&text)?, "rank 0's config", &[])?;
    let lines: Vec<String> = root.differences(cfg)?.into_iter().map(|(_, l)| l).collect();
    let mut report = String::new();
    for (rank, diff) in world
        .all_gather(lines.join("\n").as_bytes())?
        .iter()
        .enumerate()
    {
        for line in String::from_utf8_lossy(diff).lines() {
            report.push_str(&format!("\n  rank {rank}: {line}"));
        }
    }
    if !report.is_empty() {
        bail!(
            "the ranks were started with different configs (rank 0's value -> the rank's):{report}\n\
             every rank must run the same config file and --set overrides"
        );
    }
    Ok(())
}

/// Refuses ranks whose weights differ (say, different model files on different nodes): every
/// parameter's sum of squares against rank 0's, to a relative 1e-4 (summation order aside, the
/// same weights give the same sums).
pub(super) fn check_same_weights(world: &dyn Collective, params: &[Param]) -> Result<()> {
    if world.is_solo() {
        return Ok(());
    }
    let sums = params
        .iter()
        .map(|p| {
            let w = p.master.as_ref().unwrap_or(&p.var).as_tensor();
            Ok(w.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64)
        })
        .collect::<Result<Vec<f64>>>()?;
    let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
    let all = world.all_gather(&bytes)?;
    let root: Vec<f64> = all[0]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    for (rank, theirs) in all.iter().enumerate().skip(1) {
        for ((p, &a), c) in params.iter().zip(&root).zip(theirs.chunks_exact(8)) {
            let b = f64::from_le_bytes(c.try_into().expect("8 bytes"));
            if (a - b).abs() > 1e-4 * a.abs().max(b.abs()) || a.is_nan() != b.is_nan() {
                bail!(
                    "rank {rank}'s weights differ from rank 0's (parameter {}: Σw² {b} vs {a}): every rank must load the same model files",
                    p.name
                );
            }
        }
    }
    Ok(())
}

/// Runs `f` on rank 0 alone and gives every rank its result, or its error.
pub(super) fn from_rank_0(
    world: &dyn Collective,
    f: impl FnOnce() -> Result<String>,
) -> Result<String> {
    if world.is_solo() {
        return f();
    }
    let mine = match world.rank() {
        0 => match f() {
            Ok(v) => format!("ok:{v}"),
            Err(e) => format!("error:{e:#}"),
        },
        _ => String::new(),
    };
    let got = String::from_utf8(world.broadcast(mine.as_bytes())?)?;
    match got.split_once(':') {
        Some(("ok", v)) => Ok(v.to_string()),
        Some(("error", e)) if world.rank() == 0 => bail!("{e}"),
        Some(("error", e)) => bail!("rank 0: {e}"),
        _ => bail!("rank 0 sent {got:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_sum_exactly_in_order_through_toml() {
        let values = [
            0.1,
            0.2,
            1e-300,
            5e-324,
            1.0000000000000002,
            -0.0,
            1e300,
            3.3,
        ];
        let reports: Vec<toml::Value> = values
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let mut t = toml::Table::new();
                t.insert("x".into(), toml::Value::Float(x));
                t.insert("n".into(), toml::Value::Integer(i as i64));
                if i == 2 {
                    let mut sub = toml::Table::new();
                    sub.insert("y".into(), toml::Value::Float(f64::NAN));
                    t.insert("squeeze".into(), toml::Value::Table(sub));
                }
                // Through the text a rank sends.
                toml::from_str(&toml::to_string(&t).unwrap()).unwrap()
            })
            .collect();
        let sum = sum_values(reports).unwrap();
        let sequential = values.iter().skip(1).fold(values[0], |a, b| a + b);
        assert_eq!(sum["x"].as_float().unwrap().to_bits(), sequential.to_bits());
        assert_eq!(sum["n"].as_integer(), Some(28));
        assert!(sum["squeeze"]["y"].as_float().unwrap().is_nan());
    }
}
