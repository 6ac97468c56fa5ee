//! Data parallelism on the CPU backend: worker processes of this binary on one machine, talking
//! over loopback TCP, started by `train --nproc-per-node N` or, as an external launcher would,
//! with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by the test.
//!
//! Every process runs with RAYON_NUM_THREADS=1: the CPU kernels' per-thread partial sums (bias
//! and norm gradients) depend on the thread count, and bit-identity needs the same in each.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dpo-sam");

/// The tiny GPT-2 on built-in pairs with logits-SAM, an eval every 2 steps, and `training`
/// lines under `[training]` (3 steps unless they set `max_steps`); returns the config's path
/// (in `dir`).
fn config(dir: &Path, training: &str) -> PathBuf {
    let steps = match training.contains("max_steps") {
        true => "",
        false => "max_steps = 3",
    };
    let text = format!(
        r#"output_dir = "{out}"
seed = 7
[model]
name_or_path = "builtin:tiny-gpt2"
[model.builtin]
n_layer = 2
n_head = 4
n_embd = 32
n_positions = 64
[data]
train = "builtin:arith"
eval = "builtin:arith"
builtin_pairs = 96
max_length = 32
[training]
learning_rate = 5e-3
eval_steps = 2
warmup_steps = 1
max_grad_norm = 0.5
{steps}
{training}
[sam]
kind = "logits"
rho = 0.05
"#,
        out = dir.join("out").display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn train_cmd(cfg: &Path, out: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "--quiet", "--config"])
        .arg(cfg)
        .arg("--output-dir")
        .arg(out)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` at most `limit` (killing it after), returning its output.
fn wait(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `train` on `ranks` workers through the launcher (plain `train` for 1), which must succeed.
fn train(cfg: &Path, out: &Path, ranks: usize, args: &[&str]) -> String {
    let mut cmd = train_cmd(cfg, out, args);
    if ranks > 1 {
        cmd.args(["--nproc-per-node", &ranks.to_string()])
            .args(["--master-port", &free_port().to_string()]);
    }
    let output = wait(cmd.spawn().unwrap(), Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{ranks} rank(s) failed:\n{stderr}");
    stderr
}

/// The final model's tensors.
fn weights(out: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v)
        })
        .collect()
}

/// The relative L2 difference over all parameters, ‖a − b‖₂ / ‖a‖₂ (as `gpu-check` measures),
/// and the largest elementwise difference relative to its tensor's largest value.
fn relative_diff(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> (f64, f64) {
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    let (mut diff2, mut norm2, mut worst) = (0f64, 0f64, 0f64);
    for (k, x) in a {
        let scale = x.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
        for (p, q) in x.iter().zip(&b[k]) {
            let d = (p - q).abs() as f64;
            diff2 += d * d;
            norm2 += (*p as f64) * (*p as f64);
            worst = worst.max(d / scale);
        }
    }
    ((diff2 / norm2).sqrt(), worst)
}

fn bit_identical(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, x)| {
            b.get(k)
                .is_some_and(|y| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()))
        })
}

/// metrics.jsonl's lines without the wall-clock throughput.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_second");
            v
        })
        .collect()
}

/// The numbers of two metrics lines agree to `tol` relative to max(|x|, |y|, 1) (0: exactly).
fn assert_lines_close(a: &serde_json::Value, b: &serde_json::Value, tol: f64) {
    let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in a {
        match (x.as_f64(), b[k].as_f64()) {
            (Some(x), Some(y)) => assert!(
                (x - y).abs() <= tol * x.abs().max(y.abs()).max(1.0),
                "{k}: {x} vs {y}"
            ),
            _ => assert_eq!(x, &b[k], "{k}"),
        }
    }
}

#[test]
fn two_and_three_workers_train_the_weights_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    // Six micro-batches of one pair per step: 3 per rank with 2 ranks, 2 with 3. Each rank sums
    // its own micro-batches first, so the order of additions differs from one process's.
    let cfg = config(dir.path(), "batch_size = 6\nmicro_batch_size = 1");
    let one = dir.path().join("one");
    train(&cfg, &one, 1, &[]);
    for ranks in [2, 3] {
        let out = dir.path().join(format!("ranks{ranks}"));
        let stderr = train(&cfg, &out, ranks, &[]);
        assert!(
            stderr.contains(&format!("starting {ranks} workers")),
            "{stderr}"
        );
        let (l2, worst) = relative_diff(&weights(&one), &weights(&out));
        println!("{ranks} ranks, 6 micro-batches per step: relative L2 weight difference {l2:e}, largest elementwise {worst:e}");
        assert!(l2 <= 1e-6, "{ranks} ranks: {l2}");
        for (a, b) in metrics(&one).iter().zip(&metrics(&out)) {
            assert_lines_close(a, b, 1e-5);
        }
        // Rank 0 alone writes: one metrics file, one model, nothing else in the run's folder.
        assert!(out.join("checkpoint-3").is_dir());
    }
    // One micro-batch per rank and step: the sum over ranks in rank order is one process's
    // accumulation order, so weights and metrics are bit for bit the same.
    for (ranks, batch) in [(2, 4), (3, 6)] {
        let sub = dir.path().join(format!("exact{ranks}"));
        std::fs::create_dir_all(&sub).unwrap();
        // With two evaluation samples, which rank 0 alone generates.
        let cfg = config(
            &sub,
            &format!("batch_size = {batch}\nmicro_batch_size = 2\neval_generate = 2"),
        );
        let (one, many) = (sub.join("one"), sub.join("many"));
        train(&cfg, &one, 1, &[]);
        train(&cfg, &many, ranks, &[]);
        assert!(
            bit_identical(&weights(&one), &weights(&many)),
            "{ranks} ranks"
        );
        assert_eq!(
            std::fs::read(one.join("model.safetensors")).unwrap(),
            std::fs::read(many.join("model.safetensors")).unwrap()
        );
        for (a, b) in metrics(&one).iter().zip(&metrics(&many)) {
            assert_lines_close(a, b, 0.0);
        }
        // Rank 0 alone writes the samples (2 prompts at steps 2 and 3) and TensorBoard: as one
        // process does.
        let samples = |d: &Path| std::fs::read_to_string(d.join("samples.jsonl")).unwrap();
        assert_eq!(samples(&many), samples(&one), "{ranks} ranks");
        assert_eq!(samples(&many).lines().count(), 4);
        let scalars = |d: &Path| -> Vec<(i64, String, f32)> {
            let runs: Vec<PathBuf> = std::fs::read_dir(d.join("runs"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(runs.len(), 1, "one TensorBoard run: {runs:?}");
            let files: Vec<PathBuf> = std::fs::read_dir(&runs[0])
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(files.len(), 1, "one events file: {files:?}");
            let mut out = Vec::new();
            for e in dpo_sam::tensorboard::read_events(&files[0]).unwrap() {
                if let Some(dpo_sam::tensorboard::What::Summary(s)) = e.what {
                    for v in s.value {
                        if let Some(dpo_sam::tensorboard::Kind::SimpleValue(x)) = v.kind {
                            if v.tag != "train/tokens_per_second" {
                                out.push((e.step, v.tag, x));
                            }
                        }
                    }
                }
            }
            out
        };
        assert_eq!(scalars(&many), scalars(&one), "{ranks} ranks");
    }
}

/// LoRA under data parallelism: only the adapters' gradients are all-reduced, the reference
/// (the adapters off) needs nothing from the other ranks, and rank 0 writes the PEFT adapter:
/// with one micro-batch per rank and step, the same bits as one process.
#[test]
fn lora_adapters_train_on_two_workers_as_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "batch_size = 4\nmicro_batch_size = 2\n[lora]\nr = 4\ntarget_modules = \"all-linear\"",
    );
    let (one, many) = (dir.path().join("one"), dir.path().join("many"));
    train(&cfg, &one, 1, &[]);
    train(&cfg, &many, 2, &[]);
    let adapter = |out: &Path| std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(adapter(&one) == adapter(&many), "the adapters differ");
    assert!(!many.join("model.safetensors").exists());
    let b = candle_core::safetensors::load(
        many.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let moved = b
        .iter()
        .filter(|(k, _)| k.ends_with("lora_B.weight"))
        .any(|(_, t)| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
    assert!(moved, "B is still zero: nothing trained");
    for (a, b) in metrics(&one).iter().zip(&metrics(&many)) {
        assert_lines_close(a, b, 0.0);
    }
}

#[test]
fn precomputed_reference_log_probs_are_computed_in_shares_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "batch_size = 4\nmicro_batch_size = 2\nprecompute_ref_log_probs = true",
    );
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train(&cfg, &one, 1, &[]);
    train(&cfg, &two, 2, &[]);
    let cache = |out: &Path| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("ref_logps-")
            })
            .collect();
        files.sort();
        files
    };
    let (c1, c2) = (cache(&one), cache(&two));
    assert_eq!(c2.len(), 1, "rank 0 alone writes the cache: {c2:?}");
    assert_eq!(c1[0].file_name(), c2[0].file_name(), "the same fingerprint");
    let values = |path: &Path| {
        candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.to_vec1::<f64>().unwrap()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (v1, v2) = (values(&c1[0]), values(&c2[0]));
    assert_eq!(v1.len(), 4);
    assert_eq!(
        v1, v2,
        "the shares gathered are the one-process values, bit for bit"
    );
    assert!(bit_identical(&weights(&one), &weights(&two)));
    // A second run finds the cache; rank 0 reads it and sends it (the file is not rewritten).
    let written = std::fs::metadata(&c2[0]).unwrap().modified().unwrap();
    std::fs::remove_file(two.join("model.safetensors")).unwrap();
    for entry in std::fs::read_dir(&two).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("checkpoint-")
        {
            std::fs::remove_dir_all(path).unwrap();
        }
    }
    train(&cfg, &two, 2, &[]);
    assert_eq!(
        std::fs::metadata(&c2[0]).unwrap().modified().unwrap(),
        written
    );
    assert!(bit_identical(&weights(&one), &weights(&two)));
}

#[test]
fn the_ches_filter_drops_the_same_pairs_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "batch_size = 4\nmicro_batch_size = 2");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let q = ["--set", "data.filter_ches_quantile=0.25"];
    let dropped = |log: &str| -> Vec<(usize, usize)> {
        log.lines()
            .filter_map(|l| l.split_once("dropped ")?.1.split_once(" training pairs"))
            .map(|(counts, _)| {
                let (d, n) = counts.split_once(" of ").unwrap();
                (d.parse().unwrap(), n.parse().unwrap())
            })
            .collect()
    };
    let solo = dropped(&train(&cfg, &one, 1, &q));
    assert!(
        solo.len() == 1 && solo[0].0 == solo[0].1 / 4 && solo[0].0 > 0,
        "{solo:?}"
    );
    // Each rank scores its share; rank 0 reports and writes the cache; both ranks drop the same pairs,
    // so the weights are those of one process.
    assert_eq!(dropped(&train(&cfg, &two, 2, &q)), solo);
    let caches = std::fs::read_dir(&two)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("ches-")
        })
        .count();
    assert_eq!(caches, 1);
    assert!(bit_identical(&weights(&one), &weights(&two)));
}

#[test]
fn a_run_resumes_on_another_number_of_ranks_with_the_same_data_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "batch_size = 6\nmicro_batch_size = 1\nmax_steps = 4\nsave_steps = 2",
    );
    let one = dir.path().join("one");
    train(&cfg, &one, 1, &[]);
    // Two ranks save checkpoint-2 (and -4, removed: as if stopped after step 2) ...
    let out = dir.path().join("resumed");
    train(&cfg, &out, 2, &[]);
    std::fs::remove_dir_all(out.join("checkpoint-4")).unwrap();
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    // ... and three ranks continue from it.
    let stderr = train(&cfg, &out, 3, &["--resume"]);
    assert!(stderr.contains("resuming from"), "{stderr}");
    let (a, b) = (metrics(&one), metrics(&out));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        // Steps 3 and 4 drew the same pairs: the same losses and rewards.
        assert_lines_close(x, y, 1e-5);
    }
    let (l2, worst) = relative_diff(&weights(&one), &weights(&out));
    println!("1 rank vs 2 ranks then 3 after resuming: relative L2 weight difference {l2:e}, largest elementwise {worst:e}");
    assert!(l2 <= 1e-6, "{l2}");
}

/// Starts `ranks` workers as an external launcher would (the test sets the variables).
fn external(
    cfg: &Path,
    out: &Path,
    ranks: usize,
    extra: &dyn Fn(usize) -> Vec<String>,
) -> Vec<Child> {
    let port = free_port().to_string();
    (0..ranks)
        .map(|rank| {
            let mut cmd = train_cmd(cfg, out, &[]);
            cmd.args(extra(rank))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", ranks.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port);
            cmd.spawn().unwrap()
        })
        .collect()
}

fn metrics_has_a_step(out: &Path) -> bool {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.contains("\"step\""))
        .unwrap_or(false)
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of this test.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn a_dead_or_stuck_worker_ends_the_run_with_an_error_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let long = "batch_size = 6\nmicro_batch_size = 1\nmax_steps = 100000\nddp_timeout = 10";
    let cfg = config(dir.path(), long);

    // Through the launcher: rank 1 killed; the launcher stops the others and names it.
    let out = dir.path().join("launched");
    let mut child = train_cmd(&cfg, &out, &["--nproc-per-node", "3"])
        .args(["--master-port", &free_port().to_string()])
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut pids = HashMap::new();
    while pids.len() < 3 {
        let line = lines.next().expect("the launcher's output").unwrap();
        if let Some(rest) = line.strip_prefix("dpo-sam: rank ") {
            let (rank, pid) = rest.split_once(": pid ").unwrap();
            pids.insert(rank.parse::<usize>().unwrap(), pid.parse::<u32>().unwrap());
        }
    }
    wait_for("a training step", Duration::from_secs(120), || {
        metrics_has_a_step(&out)
    });
    let killed = Instant::now();
    signal(pids[&1], libc::SIGKILL);
    let rest = std::thread::spawn(move || lines.map(Result::unwrap).collect::<Vec<_>>().join("\n"));
    let status = {
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the launcher did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let stderr = rest.join().unwrap();
    println!("launcher stopped {:?} after the kill", killed.elapsed());
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "rank 1 (pid {}) was killed by signal 9 (SIGKILL)",
            pids[&1]
        )),
        "{stderr}"
    );
    for pid in pids.values() {
        // SAFETY: signal 0 only checks that the process exists.
        assert_ne!(
            unsafe { libc::kill(*pid as i32, 0) },
            0,
            "worker {pid} still runs"
        );
    }

    // Started by another launcher: rank 2 killed, ranks 0 and 1 fail on their own, naming it.
    let out = dir.path().join("external");
    let mut workers = external(&cfg, &out, 3, &|_| Vec::new());
    wait_for("a training step", Duration::from_secs(120), || {
        metrics_has_a_step(&out)
    });
    workers[2].kill().unwrap();
    let outputs: Vec<Output> = workers
        .into_iter()
        .map(|w| wait(w, Duration::from_secs(60)))
        .collect();
    let err0 = String::from_utf8_lossy(&outputs[0].stderr);
    let err1 = String::from_utf8_lossy(&outputs[1].stderr);
    assert!(!outputs[0].status.success() && !outputs[1].status.success());
    assert!(
        err0.contains("rank 0 of 3") && err0.contains("rank 2 closed its connection"),
        "{err0}"
    );
    assert!(
        err1.contains("rank 1 of 3") && err1.contains("closed its connection"),
        "{err1}"
    );

    // A stuck rank (stopped, its connections open): the others give up after ddp_timeout.
    let out = dir.path().join("stuck");
    let mut workers = external(&cfg, &out, 2, &|_| Vec::new());
    wait_for("a training step", Duration::from_secs(120), || {
        metrics_has_a_step(&out)
    });
    signal(workers[1].id(), libc::SIGSTOP);
    let stopped = Instant::now();
    let stuck = workers.pop().unwrap();
    let rank0 = wait(workers.pop().unwrap(), Duration::from_secs(60));
    println!(
        "rank 0 gave up {:?} after rank 1 stopped",
        stopped.elapsed()
    );
    let err0 = String::from_utf8_lossy(&rank0.stderr);
    assert!(!rank0.status.success());
    assert!(
        err0.contains("rank 1 did not answer within 10 s (training.ddp_timeout)"),
        "{err0}"
    );
    signal(stuck.id(), libc::SIGKILL);
    wait(stuck, Duration::from_secs(10));
}

#[test]
fn bad_launches_are_refused_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "batch_size = 6\nmicro_batch_size = 1\nddp_timeout = 20",
    );
    let out = dir.path().join("out");
    let fails = |mut cmd: Command| -> String {
        let output = wait(cmd.spawn().unwrap(), Duration::from_secs(120));
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    // A port already taken.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let mut cmd = train_cmd(
        &cfg,
        &out,
        &["--nproc-per-node", "2", "--master-port", &port],
    );
    cmd.env("RAYON_NUM_THREADS", "1");
    let err = fails(cmd);
    assert!(
        err.contains("the port is in use") && err.contains("--master-port"),
        "{err}"
    );
    assert!(
        err.contains("rank 0 (pid"),
        "the launcher names the rank: {err}"
    );

    // A batch that does not split over the ranks.
    let err = fails(train_cmd(&cfg, &out, &["--nproc-per-node", "4"]));
    assert!(
        err.contains("training.batch_size = 6") && err.contains("4 × 1 = 4"),
        "{err}"
    );

    // GPUs this build cannot see.
    let err = fails(train_cmd(
        &cfg,
        &out,
        &["--nproc-per-node", "2", "--device", "cuda"],
    ));
    assert!(err.contains("built without CUDA"), "{err}");

    // Ranks started with different configs: every rank refuses, naming the key.
    let workers = external(&cfg, &out, 2, &|rank| match rank {
        1 => vec!["--set".into(), "training.beta=0.2".into()],
        _ => Vec::new(),
    });
    for (rank, w) in workers.into_iter().enumerate() {
        let output = wait(w, Duration::from_secs(60));
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            err.contains("different configs") && err.contains("rank 1: training.beta: 0.1 -> 0.2"),
            "rank {rank}: {err}"
        );
    }

    // A rank whose rank 0 never comes: the rendezvous times out.
    let mut cmd = train_cmd(&cfg, &out, &["--set", "training.ddp_timeout=2"]);
    cmd.env("RANK", "1")
        .env("LOCAL_RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string());
    let err = fails(cmd);
    assert!(
        err.contains("could not reach rank 0") && err.contains("within 2 s"),
        "{err}"
    );

    // The launcher's flags without it, and RANK with it.
    let err = fails(train_cmd(&cfg, &out, &["--nnodes", "2"]));
    assert!(err.contains("go with --nproc-per-node"), "{err}");
    let mut cmd = train_cmd(&cfg, &out, &["--nproc-per-node", "2"]);
    cmd.env("RANK", "0").env("WORLD_SIZE", "2");
    let err = fails(cmd);
    assert!(err.contains("started by a launcher already"), "{err}");
}

#[test]
fn the_dry_run_plans_the_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "batch_size = 6\nmicro_batch_size = 1");
    let out = dir.path().join("out");
    let output = train_cmd(&cfg, &out, &["--dry-run", "--nproc-per-node", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("3 ranks, each 2 micro-batch(es) of 1 pairs per step"),
        "{stdout}"
    );
    assert!(!out.exists(), "a dry run starts nothing");
}

/// `gpu-check --checks nccl`, the GPU smoke test of `scripts/gpu-check.sh`, on the CPU: a world of one
/// process that still takes every exchange (TCP with no peer) trains the weights a plain process
/// does, bit for bit.
#[test]
fn the_gpu_smoke_test_runs_the_data_parallel_path_on_the_cpu() {
    let output = Command::new(BIN)
        .args(["gpu-check", "--checks", "nccl", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let full: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(full["pass"], true, "{full}");
    let report = &full["nccl"];
    assert_eq!(report["backend"], "tcp", "{report}");
    assert_eq!(report["all_reduce_exact"], true, "{report}");
    assert_eq!(report["weights_bit_identical"], true, "{report}");
    assert_eq!(report["pass"], true, "{report}");
}

/// `data.streaming`: every rank reads the stream and keeps its share of each global batch; one
/// micro-batch per rank and step gives one process's weights bit for bit.
#[test]
fn streamed_data_is_shared_out_like_data_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sums.jsonl");
    let rows: String = (0..60)
        .map(|i| {
            let (a, b) = (i * 7 % 50, i * 13 % 50);
            format!(
                "{{\"prompt\": \"{i}:{a}+{b}=\", \"chosen\": \"{}\", \"rejected\": \"{}\"}}\n",
                a + b,
                a + b + 1
            )
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let cfg = config(
        dir.path(),
        "batch_size = 4\nmicro_batch_size = 2\nmax_steps = 20",
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "train = \"builtin:arith\"\neval = \"builtin:arith\"",
        &format!(
            "train = {:?}\nformat = \"explicit\"\nstreaming = true\nshuffle_buffer = 16",
            data.display().to_string()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    train(&cfg, &one, 1, &[]);
    train(&cfg, &two, 2, &[]);
    assert_eq!(metrics(&two)[0]["data/streaming"], true);
    assert!(bit_identical(&weights(&one), &weights(&two)));
    for (a, b) in metrics(&one).iter().zip(&metrics(&two)) {
        assert_lines_close(a, b, 0.0);
    }
}
