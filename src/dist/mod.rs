//! Data parallelism's plumbing: the [`Collective`] every rank of a run calls in the same order,
//! where a process sits in the run ([`Env`], torchrun's variables), the rendezvous that connects
//! the ranks, and the launcher (`train --nproc-per-node N`) that starts them.
//!
//! - [`Solo`]: one process, a world of 1; every operation returns its input;
//! - `cpu`: ranks talking over TCP through rank 0 (one machine's worker processes in tests,
//!   CPU training), with deterministic sums;
//! - `nccl` (`--features cuda`): NCCL for GPU tensors, beside the TCP links for small messages;
//! - `rendezvous`: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, the others connect;
//! - `launch`: one worker process per GPU (or per CPU share), torchrun's environment, and the
//!   whole run stopped when one worker fails.
//!
//! This module knows nothing of training: `train` decides what is reduced and when.

mod cpu;
mod launch;
#[cfg(feature = "cuda")]
mod nccl;
mod rendezvous;

pub use launch::{launch, Launch};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::ops::Range;
use std::time::Duration;

/// The operations data parallelism needs. Every rank calls the same operations in the same
/// order; an operation returns once every rank has taken part, or fails (a rank that died, or
/// none heard from within the timeout) with a message naming the rank.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// True only for [`Solo`]: a single process, for which the trainer skips the exchanges.
    fn is_solo(&self) -> bool {
        false
    }
    /// The elementwise sum over ranks of an f32 tensor of the same shape on every rank, on every
    /// rank. The CPU backend adds in rank order (((r0 + r1) + r2) + …), so the result is exactly
    /// that sequential sum, on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank 0's `bytes` on every rank (other ranks' `bytes` are ignored).
    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>>;
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Returns once every rank has reached it.
    fn barrier(&self) -> Result<()> {
        self.all_gather(&[]).map(drop)
    }
}

/// A single process: a world of 1 with nothing to exchange.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn is_solo(&self) -> bool {
        true
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
}

/// Where this process sits in a run, from the variables torchrun (and `--nproc-per-node`) set.
#[derive(Debug, Clone, PartialEq)]
pub struct Env {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// The variables of [`Env`], in the order [`Env::read`] checks them.
pub const ENV_VARS: [&str; 5] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl Env {
    /// This process's place from the environment; `None` when `WORLD_SIZE` and `RANK` are unset
    /// (a plain single-process run).
    pub fn from_process() -> Result<Option<Env>> {
        Env::read(|name| std::env::var(name).ok())
    }

    /// [`Env::from_process`] over any lookup (tests).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Option<Env>> {
        if var("WORLD_SIZE").is_none() && var("RANK").is_none() {
            return Ok(None);
        }
        let number = |name: &str| -> Result<usize> {
            let text = var(name).with_context(|| {
                format!("{name} is not set, but RANK or WORLD_SIZE is: a distributed run needs all of {}", ENV_VARS.join(", "))
            })?;
            text.trim()
                .parse()
                .with_context(|| format!("{name}={text:?}: expected a non-negative integer"))
        };
        let (rank, world_size) = (number("RANK")?, number("WORLD_SIZE")?);
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} with WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE");
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(_) => number("LOCAL_RANK")?,
            None if world_size == 1 => 0,
            None => bail!("LOCAL_RANK is not set (the rank's index on its node; torchrun sets it)"),
        };
        let (master_addr, master_port) = if world_size == 1 {
            (String::new(), 0)
        } else {
            let addr = var("MASTER_ADDR")
                .filter(|a| !a.trim().is_empty())
                .context("MASTER_ADDR is not set (the address of the node running rank 0)")?;
            let port = number("MASTER_PORT")?;
            let port = u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("MASTER_PORT={port}: expected a port in 1..=65535"))?;
            (addr.trim().to_string(), port)
        };
        Ok(Some(Env {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
        }))
    }

    /// The device this rank trains on: each rank takes the GPU of its `LOCAL_RANK`
    /// (`device = "cuda"`); the CPU is shared.
    pub fn device_name(&self, configured: &str) -> Result<String> {
        match crate::device::parse_name(configured)? {
            None => Ok(configured.to_string()),
            Some(0) if configured.trim() == "cuda" => Ok(format!("cuda:{}", self.local_rank)),
            Some(_) if self.world_size == 1 => Ok(configured.to_string()),
            Some(_) => bail!(
                "device = {configured:?} with {} ranks: set device = \"cuda\", and each rank uses the GPU of its LOCAL_RANK (narrow the GPUs with CUDA_VISIBLE_DEVICES)",
                self.world_size
            ),
        }
    }
}

/// Connects this process to the others of its run (the rendezvous at `MASTER_ADDR:MASTER_PORT`,
/// within `timeout`, which then bounds every later wait on a peer), or a [`Solo`] world.
pub fn join(env: Option<&Env>, timeout: Duration) -> Result<Box<dyn Collective>> {
    match env {
        Some(env) if env.world_size > 1 => Ok(Box::new(cpu::TcpGroup::join(env, timeout)?)),
        _ => Ok(Box::new(Solo)),
    }
}

/// The collective for tensors on `device`: on a GPU, NCCL (initialised from an id that rank 0
/// sends the others), keeping the TCP links for small messages; otherwise `world` itself.
/// `timeout` bounds each wait for the GPUs, as it bounds each wait on a peer.
pub fn on_device(
    world: Box<dyn Collective>,
    device: &Device,
    timeout: Duration,
) -> Result<Box<dyn Collective>> {
    if world.is_solo() || !device.is_cuda() {
        return Ok(world);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(Box::new(nccl::Nccl::new(world, device, timeout)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = timeout;
        bail!("a CUDA device in a build without CUDA")
    }
}

/// A world of one process that still takes every exchange (over TCP with no peer; on a GPU,
/// [`on_device`] adds NCCL): what `gpu-check --checks nccl` compares with a plain single process.
pub fn world_of_one(timeout: Duration) -> Box<dyn Collective> {
    Box::new(cpu::TcpGroup::alone(timeout))
}

/// The part of `0..n` that `rank` of `world` takes: contiguous, in rank order, sizes differing by
/// at most one (the first `n % world` ranks take one more). Contiguous parts keep a rank's share
/// of a global batch in the order one process would have drawn it.
pub fn shard(n: usize, rank: usize, world: usize) -> Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn shards_are_contiguous_disjoint_and_cover() {
        for n in 0..20 {
            for world in 1..6 {
                let parts: Vec<Range<usize>> = (0..world).map(|r| shard(n, r, world)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[world - 1].end, n);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() <= w[1].len() + 1);
                }
            }
        }
        assert_eq!(shard(6, 1, 3), 2..4);
    }

    fn env_of(pairs: &[(&str, &str)]) -> Result<Option<Env>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::read(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables_and_names_what_is_wrong() {
        assert_eq!(env_of(&[]).unwrap(), None);
        let full = [
            ("RANK", "2"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let env = env_of(&full).unwrap().unwrap();
        assert_eq!((env.rank, env.local_rank, env.world_size), (2, 0, 4));
        assert_eq!(env.device_name("cuda").unwrap(), "cuda:0");
        assert_eq!(env.device_name("cpu").unwrap(), "cpu");
        let err = env.device_name("cuda:1").unwrap_err().to_string();
        assert!(err.contains("LOCAL_RANK"), "{err}");
        for (drop, expect) in [
            ("MASTER_ADDR", "MASTER_ADDR is not set"),
            ("LOCAL_RANK", "LOCAL_RANK is not set"),
            ("WORLD_SIZE", "WORLD_SIZE is not set"),
        ] {
            let partial: Vec<_> = full.iter().copied().filter(|(k, _)| *k != drop).collect();
            let err = format!("{:#}", env_of(&partial).unwrap_err());
            assert!(err.contains(expect), "{err}");
        }
        let err = format!(
            "{:#}",
            env_of(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err()
        );
        assert!(err.contains("0 <= RANK < WORLD_SIZE"), "{err}");
        let bad_port: Vec<_> = full
            .iter()
            .map(|&(k, v)| (k, if k == "MASTER_PORT" { "70000" } else { v }))
            .collect();
        let err = format!("{:#}", env_of(&bad_port).unwrap_err());
        assert!(err.contains("MASTER_PORT=70000"), "{err}");
        // A world of 1 needs no rendezvous.
        let one = env_of(&[("RANK", "0"), ("WORLD_SIZE", "1")])
            .unwrap()
            .unwrap();
        assert_eq!(one.world_size, 1);
    }
}
