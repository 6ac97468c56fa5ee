//! The launcher, like torchrun: `train --nproc-per-node N [--nnodes M --node-rank R
//! --master-addr A --master-port P]` re-runs this binary N times with the same arguments (less
//! these flags) and torchrun's variables, then waits. When a worker fails, the others are
//! stopped (SIGTERM, then SIGKILL after a grace period) and the launcher fails naming it.
//!
//! Workers run in their own process group, so that the launcher alone receives a terminal's
//! Ctrl-C and passes each SIGINT/SIGTERM on once (the first stops training after the step with a
//! checkpoint, a second at once, as without the launcher); and they receive SIGTERM if the
//! launcher itself dies.

use super::ENV_VARS;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The launcher's flags (flattened into `train`'s).
#[derive(clap::Args, Debug, Clone)]
pub struct Launch {
    /// Start N worker processes on this node, one per GPU, as one data-parallel run. With
    /// `device = "cpu"`, N CPU workers sharing the cores (a testing mode).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes taking part; each runs this command with its own --node-rank.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index in 0..M; node 0 runs rank 0.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, where rank 0 waits for the others (needed with --nnodes > 1;
    /// default 127.0.0.1).
    #[arg(long, value_name = "ADDR")]
    pub master_addr: Option<String>,
    /// Port rank 0 listens on.
    #[arg(long, value_name = "PORT", default_value_t = 29500)]
    pub master_port: u16,
}

/// The flags of [`Launch`] (each takes a value), removed from the workers' arguments.
const FLAGS: [&str; 5] = [
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
];

/// How long stopped workers get to exit on SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

impl Launch {
    /// Checks the flags; `None` when `--nproc-per-node` is not given (this process trains).
    pub fn validated(&self) -> Result<Option<usize>> {
        let Some(n) = self.nproc_per_node else {
            let other = self.nnodes != 1
                || self.node_rank != 0
                || self.master_addr.is_some()
                || self.master_port != 29500;
            if other {
                bail!("--nnodes, --node-rank, --master-addr and --master-port go with --nproc-per-node (the workers per node)");
            }
            return Ok(None);
        };
        if n == 0 || self.nnodes == 0 {
            bail!("--nproc-per-node and --nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            bail!(
                "--node-rank {} with --nnodes {}: expected 0 <= R < M",
                self.node_rank,
                self.nnodes
            );
        }
        if self.nnodes > 1 && self.master_addr.is_none() {
            bail!("--nnodes {} needs --master-addr: the address of the node started with --node-rank 0, reachable from every node", self.nnodes);
        }
        if std::env::var_os("RANK").is_some() || std::env::var_os("WORLD_SIZE").is_some() {
            bail!("--nproc-per-node, but RANK/WORLD_SIZE are set: this process was started by a launcher already (drop one of the two)");
        }
        Ok(Some(n * self.nnodes))
    }

    /// Ranks in the run: `--nproc-per-node × --nnodes` (1 without the flags).
    pub fn world_size(&self) -> usize {
        self.nproc_per_node.unwrap_or(1) * self.nnodes
    }
}

/// RAYON_NUM_THREADS for `workers` processes sharing this machine's cores: an equal share, at
/// least 1, unless the variable is already set.
fn rayon_threads(workers: usize) -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / workers.max(1)).max(1)
}

/// Runs this node's workers of `launch` (validated) and waits for them: `device` is the
/// configured device (`cuda` needs as many visible GPUs as workers). Fails when a worker does,
/// after stopping the others.
pub fn launch(launch: &Launch, device: &str) -> Result<()> {
    let Some(world) = launch.validated()? else {
        bail!("no --nproc-per-node: nothing to launch");
    };
    let n = world / launch.nnodes;
    if crate::device::parse_name(device)?.is_some() {
        check_gpus(n, crate::device::cuda_count()?)?;
    }
    let exe =
        std::env::current_exe().context("cannot find this program's path to start workers")?;
    let args = worker_args(std::env::args_os().skip(1).collect());
    let first = launch.node_rank * n;
    let addr = launch
        .master_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1".into());
    let threads = rayon_threads(n);
    eprintln!(
        "dpo-sam: starting {n} workers (ranks {first}..{} of {world}), rendezvous at {addr}:{}, RAYON_NUM_THREADS={threads}",
        first + n - 1,
        launch.master_port
    );
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let mut workers: Vec<(usize, Child)> = Vec::with_capacity(n);
    for local in 0..n {
        let rank = first + local;
        let values = [
            rank.to_string(),
            local.to_string(),
            world.to_string(),
            addr.clone(),
            launch.master_port.to_string(),
        ];
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .envs(ENV_VARS.iter().zip(&values))
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", launch.node_rank.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string());
        own_group_and_parent_death_signal(&mut cmd);
        match cmd.spawn() {
            Ok(child) => {
                eprintln!("dpo-sam: rank {rank}: pid {}", child.id());
                workers.push((rank, child));
            }
            Err(e) => {
                stop(&mut workers);
                bail!("cannot start the worker for rank {rank}: {e}");
            }
        }
    }
    let mut signals = signals;
    loop {
        for sig in signals.pending() {
            for (_, child) in &workers {
                signal(child, sig);
            }
        }
        // Every worker found failed in this pass (the first to die and those it took down).
        let mut failed = Vec::new();
        let mut running = 0;
        for (rank, child) in &mut workers {
            match child.try_wait()? {
                None => running += 1,
                Some(status) if !status.success() => failed.push(format!(
                    "rank {rank} (pid {}) {}",
                    child.id(),
                    describe(status)
                )),
                Some(_) => {}
            }
        }
        if !failed.is_empty() {
            let failed = failed.join("; ");
            if running > 0 {
                eprintln!("dpo-sam: {failed}; stopping the other {running} worker(s)");
            }
            stop(&mut workers);
            bail!("{failed}; the workers' output above says why");
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => "a signal",
    }
}

/// Refuses more workers than visible GPUs.
fn check_gpus(workers: usize, visible: usize) -> Result<()> {
    if workers > visible {
        let mask = std::env::var("CUDA_VISIBLE_DEVICES")
            .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
            .unwrap_or_default();
        bail!("--nproc-per-node {workers}, but {visible} GPU(s) are visible{mask}: one worker per GPU");
    }
    Ok(())
}

/// `args` without the launcher's flags and their values (`--flag V` or `--flag=V`).
fn worker_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        if FLAGS.contains(&text.as_ref()) {
            it.next();
        } else if !FLAGS.iter().any(|f| text.starts_with(&format!("{f}="))) {
            out.push(arg);
        }
    }
    out
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid; it has not been reaped while `child` is unwaited.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// SIGTERM to every worker still running, SIGKILL to those left after [`GRACE`]; reaps them all.
fn stop(workers: &mut [(usize, Child)]) {
    for (_, child) in workers.iter_mut() {
        if let Ok(None) = child.try_wait() {
            signal(child, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + GRACE;
    for (_, child) in workers.iter_mut() {
        while let Ok(None) = child.try_wait() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn own_group_and_parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        launch: Launch,
        #[arg(long)]
        config: String,
    }

    #[test]
    fn workers_get_the_arguments_without_the_launcher_flags() {
        let args: Vec<OsString> = [
            "train",
            "--nproc-per-node",
            "3",
            "--config",
            "c.toml",
            "--master-port=1234",
            "--nnodes",
            "2",
            "--node-rank=1",
            "--master-addr",
            "10.1.2.3",
            "--set",
            "training.beta=0.2",
        ]
        .map(OsString::from)
        .to_vec();
        let cli = Cli::try_parse_from(
            std::iter::once(OsString::from("x")).chain(
                args[1..]
                    .iter()
                    .filter(|a| *a != "--set" && *a != "training.beta=0.2")
                    .cloned(),
            ),
        )
        .unwrap();
        assert_eq!(cli.launch.world_size(), 6);
        assert_eq!(cli.config, "c.toml");
        let kept = worker_args(args);
        assert_eq!(
            kept,
            ["train", "--config", "c.toml", "--set", "training.beta=0.2"]
                .map(OsString::from)
                .to_vec()
        );
        // Every flag of `Launch` is stripped.
        for flag in FLAGS {
            let Err(e) = Cli::try_parse_from(["x", "--config", "c", flag]) else {
                panic!("{flag} is not a launcher flag");
            };
            assert!(e.to_string().contains("value is required"), "{flag}: {e}");
        }
    }

    #[test]
    fn bad_launcher_flags_are_refused() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(["x", "--config", "c"].iter().chain(args)).unwrap();
            cli.launch.validated().map_err(|e| e.to_string())
        };
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["--nproc-per-node", "2"]).unwrap(), Some(2));
        assert!(parse(&["--nnodes", "2"])
            .unwrap_err()
            .contains("go with --nproc-per-node"));
        assert!(parse(&["--nproc-per-node", "2", "--nnodes", "2"])
            .unwrap_err()
            .contains("needs --master-addr"));
        assert!(parse(&[
            "--nproc-per-node",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "2",
            "--master-addr",
            "a"
        ])
        .unwrap_err()
        .contains("expected 0 <= R < M"));
        assert!(parse(&["--nproc-per-node", "0"])
            .unwrap_err()
            .contains("at least 1"));
        let err = check_gpus(8, 2).unwrap_err().to_string();
        assert!(
            err.contains("--nproc-per-node 8, but 2 GPU(s) are visible"),
            "{err}"
        );
        check_gpus(2, 2).unwrap();
    }
}
