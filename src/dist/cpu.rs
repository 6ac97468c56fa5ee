//! The CPU backend: ranks connected to rank 0 over TCP (a star), which every operation goes
//! through. Rank 0 receives the other ranks' contributions in rank order, combines them and sends
//! the result back, so sums are exactly the sequential sums in rank order, the same on every rank.
//! Meant for one machine's worker processes (tests, CPU training) and for the small messages of
//! GPU runs; its traffic grows with the world size at rank 0.
//!
//! Every message carries the operation and its sequence number, so ranks that drift into
//! different code paths fail with a message instead of exchanging garbage. Every wait is bounded
//! by the timeout; a peer that closes its connection (it died) is an error at once.

use super::{rendezvous, Collective, Env};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub(super) struct TcpGroup {
    rank: usize,
    world_size: usize,
    /// Rank 0: the streams of ranks 1.., in rank order. Other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
    /// Operations so far: each message carries its operation's number.
    seq: Cell<u64>,
    timeout: Duration,
}

#[derive(Clone, Copy, PartialEq, Debug)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    Broadcast = 2,
    AllGather = 3,
}

impl Op {
    fn name(byte: u8) -> &'static str {
        match byte {
            1 => "all-reduce",
            2 => "broadcast",
            3 => "all-gather",
            _ => "an unknown operation",
        }
    }
}

impl TcpGroup {
    /// Meets the other ranks at `MASTER_ADDR:MASTER_PORT` (see [`rendezvous`]).
    pub(super) fn join(env: &Env, timeout: Duration) -> Result<TcpGroup> {
        let peers = rendezvous::connect(env, timeout)?;
        Ok(TcpGroup::with_peers(
            env.rank,
            env.world_size,
            peers,
            timeout,
        )?)
    }

    /// A world of one with the exchanges still taken (`gpu-check --checks nccl`).
    pub(super) fn alone(timeout: Duration) -> TcpGroup {
        TcpGroup {
            rank: 0,
            world_size: 1,
            peers: Vec::new(),
            seq: Cell::new(0),
            timeout,
        }
    }

    fn with_peers(
        rank: usize,
        world_size: usize,
        peers: Vec<TcpStream>,
        timeout: Duration,
    ) -> std::io::Result<TcpGroup> {
        for s in &peers {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.set_nodelay(true)?;
        }
        Ok(TcpGroup {
            rank,
            world_size,
            peers,
            seq: Cell::new(0),
            timeout,
        })
    }

    /// The rank at the other end of `peers[i]`.
    fn peer_rank(&self, i: usize) -> usize {
        if self.rank == 0 {
            i + 1
        } else {
            0
        }
    }

    fn next_seq(&self) -> u64 {
        let s = self.seq.get() + 1;
        self.seq.set(s);
        s
    }

    fn send(&self, i: usize, op: Op, seq: u64, payload: &[u8]) -> Result<()> {
        let mut header = [0u8; 17];
        header[0] = op as u8;
        header[1..9].copy_from_slice(&seq.to_le_bytes());
        header[9..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut s = &self.peers[i];
        s.write_all(&header)
            .and_then(|()| s.write_all(payload))
            .map_err(|e| self.io_error(i, e))
    }

    fn recv(&self, i: usize, op: Op, seq: u64) -> Result<Vec<u8>> {
        let mut header = [0u8; 17];
        let mut s = &self.peers[i];
        s.read_exact(&mut header).map_err(|e| self.io_error(i, e))?;
        let their_seq = u64::from_le_bytes(header[1..9].try_into().expect("8 bytes"));
        if header[0] != op as u8 || their_seq != seq {
            bail!(
                "rank {} is at {} #{their_seq} while rank {} is at {} #{seq}: the ranks run different code paths (were they started with the same config and binary?)",
                self.peer_rank(i),
                Op::name(header[0]),
                self.rank,
                Op::name(op as u8)
            );
        }
        let len = u64::from_le_bytes(header[9..].try_into().expect("8 bytes")) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)
            .map_err(|e| self.io_error(i, e))?;
        Ok(payload)
    }

    fn io_error(&self, i: usize, e: std::io::Error) -> anyhow::Error {
        let peer = self.peer_rank(i);
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
                "rank {peer} did not answer within {} s (training.ddp_timeout): it is stuck or unreachable",
                self.timeout.as_secs_f64()
            ),
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => anyhow!(
                "rank {peer} closed its connection: it has stopped (its own output says why)"
            ),
            _ => anyhow!("talking to rank {peer}: {e}"),
        }
    }

    /// Rank 0: every rank's payload in rank order (rank 0's first). Others: sends theirs.
    fn gather_at_root(&self, op: Op, seq: u64, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.rank != 0 {
            self.send(0, op, seq, mine)?;
            return Ok(Vec::new());
        }
        let mut all = vec![mine.to_vec()];
        for i in 0..self.peers.len() {
            all.push(self.recv(i, op, seq)?);
        }
        Ok(all)
    }

    /// Rank 0 sends `payload` to every rank; the others receive it.
    fn scatter_from_root(&self, op: Op, seq: u64, payload: &[u8]) -> Result<Vec<u8>> {
        if self.rank != 0 {
            return self.recv(0, op, seq);
        }
        for i in 0..self.peers.len() {
            self.send(i, op, seq, payload)?;
        }
        Ok(payload.to_vec())
    }

    fn all_reduce_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        let seq = self.next_seq();
        let parts = self.gather_at_root(Op::AllReduce, seq, &f32_bytes(mine))?;
        let total = if self.rank == 0 {
            let mut total = mine.to_vec();
            for (r, part) in parts.iter().enumerate().skip(1) {
                if part.len() != 4 * total.len() {
                    bail!(
                        "all-reduce: rank {r} sent {} values, rank 0 has {}: the ranks hold different models",
                        part.len() / 4,
                        total.len()
                    );
                }
                for (t, b) in total.iter_mut().zip(part.chunks_exact(4)) {
                    *t += f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
            f32_bytes(&total)
        } else {
            Vec::new()
        };
        let total = self.scatter_from_root(Op::AllReduce, seq, &total)?;
        Ok(total
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `parts` as one message: a count, then each part's length and bytes.
fn frame(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = (parts.len() as u64).to_le_bytes().to_vec();
    for p in parts {
        out.extend((p.len() as u64).to_le_bytes());
        out.extend(p);
    }
    out
}

fn unframe(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut take = |n: usize| -> Result<&[u8]> {
        if bytes.len() < n {
            bail!("all-gather: truncated message");
        }
        let (head, rest) = bytes.split_at(n);
        bytes = rest;
        Ok(head)
    };
    let count = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
    (0..count)
        .map(|_| {
            let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
            Ok(take(len)?.to_vec())
        })
        .collect()
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() != DType::F32 {
            bail!("all-reduce: f32 tensors only, got {:?}", t.dtype());
        }
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let sum = self.all_reduce_f32(&values).context("all-reduce")?;
        Ok(Tensor::from_vec(sum, t.shape(), t.device())?)
    }

    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let seq = self.next_seq();
        self.scatter_from_root(Op::Broadcast, seq, bytes)
            .context("broadcast")
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let seq = self.next_seq();
        let parts = self
            .gather_at_root(Op::AllGather, seq, bytes)
            .context("all-gather")?;
        let framed = self
            .scatter_from_root(Op::AllGather, seq, &frame(&parts))
            .context("all-gather")?;
        unframe(&framed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    /// `n` ranks on loopback threads, each running `f` on its group.
    fn world<T: Send + 'static>(
        n: usize,
        timeout: Duration,
        f: impl Fn(TcpGroup) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let env = Env {
                        rank,
                        local_rank: rank,
                        world_size: n,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    f(TcpGroup::join(&env, timeout).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn sums_in_rank_order_and_gathers_broadcasts_and_waits() {
        // Values whose sum depends on the order of additions in f32.
        let contribution = |rank: usize| -> Vec<f32> {
            let offset = [0.0, 1e7, -1e7][rank];
            (0..1000)
                .map(|i| ((i * 7919 + rank * 104_729) % 1000) as f32 * 1e-3 + offset)
                .collect()
        };
        let results = world(3, Duration::from_secs(20), move |g| {
            let t = Tensor::from_vec(contribution(g.rank()), (10, 100), &candle_core::Device::Cpu)
                .unwrap();
            let sum = g.all_reduce_sum(&t).unwrap();
            assert_eq!(sum.dims(), &[10, 100]);
            let b = g
                .broadcast(format!("from {}", g.rank()).as_bytes())
                .unwrap();
            let all = g.all_gather(&[g.rank() as u8; 3]).unwrap();
            g.barrier().unwrap();
            (sum.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b, all)
        });
        let mut sequential = contribution(0);
        for r in 1..3 {
            for (s, v) in sequential.iter_mut().zip(contribution(r)) {
                *s += v;
            }
        }
        for (sum, b, all) in results {
            assert_eq!(sum, sequential, "bit-identical to ((r0 + r1) + r2)");
            assert_eq!(b, b"from 0");
            assert_eq!(all, vec![vec![0u8; 3], vec![1; 3], vec![2; 3]]);
        }
    }

    #[test]
    fn a_rank_that_leaves_or_hangs_is_an_error_naming_it() {
        let started = Instant::now();
        let results = world(3, Duration::from_secs(2), |g| {
            match g.rank() {
                // Leaves without taking part: its connection closes.
                2 => None,
                // Joins the gather, then hangs past the timeout.
                1 => {
                    g.all_gather(b"x").err();
                    std::thread::sleep(Duration::from_secs(4));
                    None
                }
                _ => {
                    let first = format!("{:#}", g.all_gather(b"x").unwrap_err());
                    Some(first)
                }
            }
        });
        let err = results[0].clone().unwrap();
        assert!(err.contains("rank 2 closed its connection"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let results = world(2, Duration::from_secs(1), |g| match g.rank() {
            1 => {
                std::thread::sleep(Duration::from_secs(3));
                None
            }
            _ => Some(format!("{:#}", g.barrier().unwrap_err())),
        });
        let err = results[0].clone().unwrap();
        assert!(err.contains("rank 1 did not answer within 1 s"), "{err}");
    }

    #[test]
    fn ranks_on_different_paths_are_told_so() {
        let results = world(2, Duration::from_secs(5), |g| match g.rank() {
            0 => {
                let sent = g.broadcast(b"x").map(drop).map_err(|e| format!("{e:#}"));
                // Open until rank 1 has read the broadcast.
                std::thread::sleep(Duration::from_millis(500));
                sent
            }
            _ => g.all_gather(b"y").map(drop).map_err(|e| format!("{e:#}")),
        });
        // Rank 1 sends its gather contribution; rank 0, broadcasting, sends first and then
        // rank 1 reads a broadcast where it expected the gather's result.
        let err = results[1].clone().unwrap_err();
        assert!(err.contains("different code paths"), "{err}");
    }
}
