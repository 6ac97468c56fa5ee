//! The rendezvous: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank connects
//! (retrying until rank 0 is up) and introduces itself; once all have, rank 0 answers each, and
//! those connections carry the run's messages from then on. Everything waits at most the
//! timeout, and a rank that introduces itself with another world size, a rank already taken or
//! another dpo-sam version is refused, with the reason sent to it.

use super::Env;
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 16] = b"dpo-sam rdzv v1\n";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Connections to the other ranks: rank 0's to ranks 1.. in rank order, another rank's to rank 0.
pub(super) fn connect(env: &Env, timeout: Duration) -> Result<Vec<TcpStream>> {
    let addr = resolve(&env.master_addr, env.master_port)?;
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        accept_all(env, addr, deadline, timeout)
    } else {
        join(env, addr, deadline, timeout).map(|s| vec![s])
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("MASTER_ADDR={host}: cannot resolve it"))?
        .next()
        .with_context(|| format!("MASTER_ADDR={host}: resolves to no address"))
}

/// Rank 0 listens on loopback when the master address is loopback (a one-node run stays off the
/// network), else on every interface, as torchrun's store does.
fn accept_all(
    env: &Env,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let bind = match addr.ip() {
        ip if ip.is_loopback() => addr,
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port()),
    };
    let listener = TcpListener::bind(bind).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => anyhow::anyhow!(
            "rank 0 cannot listen on {bind} (MASTER_PORT={}): the port is in use, by another run or program; choose another with --master-port (or MASTER_PORT)",
            addr.port()
        ),
        _ => anyhow::anyhow!("rank 0 cannot listen on {bind}: {e}"),
    })?;
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let (mut stream, from) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rendezvous: {} of {} ranks joined {bind} within {} s (training.ddp_timeout); rank(s) {} never came",
                        env.world_size - missing.len(),
                        env.world_size,
                        timeout.as_secs_f64(),
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rendezvous: accept"),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(remaining(deadline)))?;
        let hello = match read_hello(&mut stream) {
            Ok(h) => h,
            // Not one of ours (a port scan, a stale client): ignored.
            Err(e) => {
                eprintln!("warning: rendezvous: ignoring a connection from {from}: {e:#}");
                continue;
            }
        };
        let refusal = if hello.version != VERSION {
            Some(format!(
                "rank {} runs dpo-sam {} but rank 0 runs {VERSION}: every rank needs the same binary",
                hello.rank, hello.version
            ))
        } else if hello.world_size != env.world_size {
            Some(format!(
                "rank {} was started with WORLD_SIZE={} but rank 0 with {}",
                hello.rank, hello.world_size, env.world_size
            ))
        } else if hello.rank == 0 || hello.rank >= env.world_size {
            Some(format!("a second rank 0 (from {from})"))
        } else if peers[hello.rank - 1].is_some() {
            Some(format!(
                "rank {} joined twice (the second from {from})",
                hello.rank
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            let _ = write_reply(&mut stream, &why);
            bail!("rendezvous: {why}");
        }
        peers[hello.rank - 1] = Some(stream);
    }
    let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
    for s in &mut peers {
        write_reply(s, "").context("rendezvous: answering a rank")?;
    }
    Ok(peers)
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A rank other than 0: connects to rank 0, retrying until the deadline, and waits for its answer.
fn join(env: &Env, addr: SocketAddr, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
    let unreachable = |why: String| {
        anyhow::anyhow!(
            "rendezvous: rank {} could not reach rank 0 at {addr} within {} s (training.ddp_timeout): {why}",
            env.rank,
            timeout.as_secs_f64()
        )
    };
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, remaining(deadline).min(Duration::from_secs(5))) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(unreachable(e.to_string())),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_write_timeout(Some(remaining(deadline)))?;
    let mut hello = MAGIC.to_vec();
    for n in [env.rank as u64, env.world_size as u64, VERSION.len() as u64] {
        hello.extend(n.to_le_bytes());
    }
    hello.extend(VERSION.as_bytes());
    stream
        .write_all(&hello)
        .map_err(|e| unreachable(e.to_string()))?;
    // Rank 0 answers once every rank has joined.
    stream.set_read_timeout(Some(remaining(deadline)))?;
    let reply = read_reply(&mut stream).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => unreachable(
            "rank 0 did not answer (not every rank joined, or MASTER_ADDR:MASTER_PORT is another program)".into(),
        ),
        _ => unreachable(format!("rank 0 closed the connection ({e}): it has stopped, see its own output")),
    })?;
    if !reply.is_empty() {
        bail!("rendezvous: rank 0 refused rank {}: {reply}", env.rank);
    }
    Ok(stream)
}

struct Hello {
    rank: usize,
    world_size: usize,
    version: String,
}

fn read_hello(s: &mut TcpStream) -> Result<Hello> {
    let mut magic = [0u8; 16];
    s.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("not a dpo-sam rank");
    }
    let mut n = [0u8; 24];
    s.read_exact(&mut n)?;
    let word = |i: usize| u64::from_le_bytes(n[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    if word(2) > 64 {
        bail!("malformed introduction");
    }
    let mut version = vec![0u8; word(2) as usize];
    s.read_exact(&mut version)?;
    Ok(Hello {
        rank: word(0) as usize,
        world_size: word(1) as usize,
        version: String::from_utf8_lossy(&version).into_owned(),
    })
}

/// Rank 0's answer: empty to accept, else why not.
fn write_reply(s: &mut TcpStream, why: &str) -> std::io::Result<()> {
    s.write_all(&(why.len() as u64).to_le_bytes())?;
    s.write_all(why.as_bytes())
}

fn read_reply(s: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut why = vec![0u8; (u64::from_le_bytes(len) as usize).min(1 << 16)];
    s.read_exact(&mut why)?;
    Ok(String::from_utf8_lossy(&why).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world_size: usize, port: u16) -> Env {
        Env {
            rank,
            local_rank: rank,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_missing_rank_or_rank_0_times_out_naming_it() {
        let port = free_port();
        let t = Instant::now();
        let err = format!(
            "{:#}",
            connect(&env(0, 3, port), Duration::from_millis(500)).unwrap_err()
        );
        assert!(err.contains("1 of 3 ranks joined"), "{err}");
        assert!(err.contains("rank(s) 1, 2 never came"), "{err}");
        let err = format!(
            "{:#}",
            connect(&env(1, 2, port), Duration::from_millis(500)).unwrap_err()
        );
        assert!(err.contains("could not reach rank 0"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_held_port_and_a_mismatched_world_are_refused() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let err = format!(
            "{:#}",
            connect(&env(0, 2, port), Duration::from_secs(1)).unwrap_err()
        );
        assert!(
            err.contains("in use") && err.contains("--master-port"),
            "{err}"
        );

        let port = free_port();
        let root = std::thread::spawn(move || connect(&env(0, 2, port), Duration::from_secs(10)));
        let err = format!(
            "{:#}",
            connect(&env(1, 3, port), Duration::from_secs(10)).unwrap_err()
        );
        assert!(err.contains("WORLD_SIZE=3 but rank 0 with 2"), "{err}");
        let err = format!("{:#}", root.join().unwrap().unwrap_err());
        assert!(err.contains("WORLD_SIZE=3"), "{err}");
    }
}
