//! Runs that survive: checkpoints every `save_steps`, `train --resume` continuing bit for bit
//! after SIGKILL (at random points, saves included) or SIGINT, a second signal exiting at once,
//! config drift refused, the non-finite guard, and saves that fail on a full or unwritable disk
//! without harming the previous checkpoint.

use dpo_sam::checkpoint;
use dpo_sam::config::Config;
use dpo_sam::train::Trainer;
use rand::Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 12;

/// The short run every test compares against: 12 steps, checkpoints every 3 (two kept),
/// evaluation every 4, so that checkpoints, eval lines and epoch boundaries interleave.
fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--config", "configs/tiny_gpt2.toml", "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for set in [
        format!("training.max_steps={STEPS}"),
        "data.builtin_pairs=64".into(),
        "training.eval_steps=4".into(),
        "training.save_steps=3".into(),
        "training.save_total_limit=2".into(),
    ] {
        v.push("--set".into());
        v.push(set);
    }
    v.push("--output-dir".into());
    v.push(out.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn dpo_sam(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo-sam"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args(args);
    cmd
}

fn run(args: &[String]) -> Output {
    dpo_sam(args).output().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn(args: &[String]) -> Child {
    dpo_sam(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// metrics.jsonl without the wall-clock throughput, the one value that differs between runs.
fn metrics(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_second");
            }
            v.to_string()
        })
        .collect()
}

fn train_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|t| t.matches("\"rewards/accuracies\"").count())
        .unwrap_or(0)
}

/// The uninterrupted run, made once per test binary, and how long it took.
fn reference() -> &'static (PathBuf, Duration) {
    static REF: std::sync::OnceLock<(PathBuf, Duration)> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("reference");
        let started = Instant::now();
        ok(&run(&args(&dir, &[])));
        (dir, started.elapsed())
    })
}

fn same_as_reference(dir: &Path) {
    let r = &reference().0;
    assert_eq!(
        metrics(dir),
        metrics(r),
        "metrics.jsonl differs from the uninterrupted run"
    );
    let (a, b) = (
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(r.join("model.safetensors")).unwrap(),
    );
    assert!(a == b, "final weights differ from the uninterrupted run");
}

fn has_checkpoint(dir: &Path) -> bool {
    dir.is_dir()
        && checkpoint::list(dir)
            .map(|(c, _)| !c.is_empty())
            .unwrap_or(false)
}

#[test]
fn two_runs_are_bit_identical_and_checkpoints_are_complete() {
    let r = &reference().0;
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again");
    ok(&run(&args(&again, &[])));
    same_as_reference(&again);
    let (complete, incomplete) = checkpoint::list(r).unwrap();
    let steps: Vec<usize> = complete.iter().map(|c| c.0).collect();
    assert_eq!(
        steps,
        vec![9, 12],
        "save_total_limit = 2 keeps the newest two"
    );
    assert!(incomplete.is_empty(), "{incomplete:?}");
    for (_, c) in &complete {
        checkpoint::verify(c).unwrap();
    }
    let state = checkpoint::load_state(&r.join("checkpoint-12")).unwrap();
    assert_eq!(state.step, STEPS);
}

#[test]
fn sigkill_at_random_points_then_resume_is_bit_identical() {
    let full = reference().1.as_millis().max(500) as u64;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("killed");
    let mut rng = rand::rng();
    let mut kills = 0;
    loop {
        let resume = if has_checkpoint(&out) {
            vec!["--resume"]
        } else {
            vec![]
        };
        let mut child = spawn(&args(&out, &resume));
        // Anywhere in the run, startup and checkpoint saves included.
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(0..full));
        let mut finished = None;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                finished = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match finished {
            Some(status) => {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(status.success(), "after {kills} kills: {err}");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
        assert!(kills < 50, "the run never finished");
    }
    eprintln!("finished after {kills} SIGKILLs");
    same_as_reference(&out);
}

#[test]
fn interrupted_saves_and_corrupt_checkpoints_are_skipped_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("partial");
    ok(&run(&args(&out, &["--set", "training.save_total_limit=4"])));
    // What a kill during the save of step 12 leaves: the files, no manifest. A leftover .tmp,
    // and a checkpoint-9 whose optimizer state was truncated after the manifest was written.
    std::fs::remove_file(out.join("checkpoint-12/manifest.json")).unwrap();
    std::fs::create_dir(out.join("checkpoint-12.tmp")).unwrap();
    let opt = out.join("checkpoint-9/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(out.join("model.safetensors")).unwrap();

    let res = run(&args(
        &out,
        &["--set", "training.save_total_limit=4", "--resume"],
    ));
    ok(&res);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("ignoring incomplete checkpoint") && err.contains("checkpoint-12"),
        "{err}"
    );
    assert!(
        err.contains("checkpoint-9") && err.contains("bytes, manifest says"),
        "{err}"
    );
    assert!(
        err.contains("resuming from") && err.contains("checkpoint-6 (step 6)"),
        "{err}"
    );
    same_as_reference(&out);
}

#[test]
fn sigint_finishes_the_step_saves_and_resumes_identically() {
    reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sigint");
    let child = spawn(&args(&out, &[]));
    while train_lines(&out) < 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, "INT");
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(0), "{err}");
    assert!(
        err.contains("Resume with:") && err.contains("--resume"),
        "{err}"
    );
    let ckpt = checkpoint::latest(&out).unwrap();
    let step = checkpoint::load_state(&ckpt).unwrap().step;
    assert!(
        step < STEPS,
        "the run should have stopped early, stopped at {step}"
    );
    ok(&run(&args(&out, &["--resume"])));
    same_as_reference(&out);
}

#[test]
fn a_second_signal_exits_at_once_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // The second signal must land after the first was handled (identical pending signals
    // merge) and before the step ends; a step is far longer than the pause, but retry anyway.
    for attempt in 0..5 {
        let out = dir.path().join(format!("twice-{attempt}"));
        let child = spawn(&args(&out, &[]));
        while !has_checkpoint(&out) {
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&child, "TERM");
        std::thread::sleep(Duration::from_millis(20));
        signal(&child, "TERM");
        let res = child.wait_with_output().unwrap();
        let ckpt = checkpoint::latest(&out).unwrap();
        checkpoint::verify(&ckpt).unwrap();
        if res.status.code() == Some(130) {
            return;
        }
        assert_eq!(
            res.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    panic!("the second signal never arrived while the first step was still running");
}

fn signal(child: &Child, name: &str) {
    let st = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn config_drift_is_refused_with_the_differences_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("drift");
    ok(&run(&args(&out, &["--set", "training.max_steps=3"])));
    let drifted = [
        "--set",
        "training.max_steps=3",
        "--set",
        "training.beta=0.25",
        "--set",
        "seed=7",
        "--resume",
    ];
    let res = run(&args(&out, &drifted));
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("training.beta: 0.5 -> 0.25") && err.contains("seed: 42 -> 7"),
        "{err}"
    );
    assert!(
        err.contains("--allow-config-drift") && !err.contains("panicked"),
        "{err}"
    );
    // Logging and saving cadence do not change the trajectory.
    let harmless = [
        "--set",
        "training.max_steps=3",
        "--set",
        "training.logging_steps=2",
        "--set",
        "training.save_steps=1",
        "--resume",
    ];
    ok(&run(&args(&out, &harmless)));
    let mut allowed = drifted.to_vec();
    allowed.push("--allow-config-drift");
    let res = run(&args(&out, &allowed));
    ok(&res);
    assert!(String::from_utf8_lossy(&res.stderr).contains("warning: resuming with config changes"));
}

#[test]
fn nonfinite_loss_stops_naming_step_and_batch_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nan");
    // A huge learning rate sends the weights to ±inf after the first updates.
    let blowup = [
        "--set",
        "training.learning_rate=1e30",
        "--set",
        "training.save_steps=1",
    ];
    let res = run(&args(&out, &blowup));
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("non-finite") && err.contains("at step ") && err.contains("micro-batch"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let bad_step: usize = err
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ckpt = checkpoint::latest(&out).unwrap();
    assert_eq!(
        checkpoint::load_state(&ckpt).unwrap().step,
        bad_step - 1,
        "the last good step's checkpoint is the newest"
    );

    let skip = dir.path().join("skip");
    let mut with_skip = blowup.to_vec();
    with_skip.extend(["--set", "training.skip_nonfinite=true"]);
    ok(&run(&args(&skip, &with_skip)));
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(skip.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .rfind(|l| l.contains("nonfinite_skipped"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        last["nonfinite_skipped"].as_u64(),
        Some((STEPS - bad_step + 1) as u64),
        "{last}"
    );
}

fn trainer(out: &Path) -> Trainer {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/tiny_gpt2.toml"
    ))
    .unwrap();
    let ov: Vec<String> = vec![
        format!("output_dir={:?}", out.display().to_string()),
        "data.builtin_pairs=64".into(),
        "training.max_steps=3".into(),
        "training.eval_steps=0".into(),
    ];
    Trainer::new(Config::parse(&text, "tiny_gpt2.toml", &ov).unwrap()).unwrap()
}

#[test]
fn an_unwritable_output_dir_fails_the_save_clearly_and_the_previous_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let mut tr = trainer(&good);
    tr.train().unwrap();
    // Root ignores permission bits, so the unwritable place is a path under a regular file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let err = format!("{:#}", tr.save_checkpoint(&file.join("sub")).unwrap_err());
    assert!(
        err.contains("saving checkpoint at step 3") && err.contains("cannot create"),
        "{err}"
    );
    let ckpt = checkpoint::latest(&good).unwrap();
    let mut fresh = trainer(&good);
    fresh.restore(&ckpt).unwrap();
    assert_eq!(fresh.step(), 3);
    let (a, b) = (tr.policy().named_tensors(), fresh.policy().named_tensors());
    for (name, t) in &a {
        let diff = (t - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name} differs after restore");
    }
}

/// A tmpfs too small for a second checkpoint (skipped where mounting is not permitted).
#[test]
fn a_full_disk_fails_the_save_clearly_and_the_previous_checkpoint_loads() {
    struct Mount(PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2000k", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status();
    if !mounted.map(|s| s.success()).unwrap_or(false) {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    }
    let _guard = Mount(mnt.clone());
    let out = mnt.join("run");
    let res = run(&args(&out, &["--set", "training.save_total_limit=4"]));
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("saving checkpoint at step 6") && err.contains("No space left on device"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let ckpt = checkpoint::latest(&out).unwrap();
    assert!(ckpt.ends_with("checkpoint-3"), "{}", ckpt.display());
    assert!(
        !out.join("checkpoint-6.tmp").exists(),
        "the failed save's partial files are removed"
    );
    let mut fresh = trainer(&out);
    fresh.restore(&ckpt).unwrap();
    assert_eq!(fresh.step(), 3);
}

#[test]
fn bf16_sharded_saves_keep_resume_exact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16");
    let save = [
        "--set",
        "training.save_dtype=bf16",
        "--set",
        "training.max_shard_size=10KB",
    ];
    ok(&run(&args(&out, &save)));
    // How weights are saved does not change the run.
    assert_eq!(metrics(&out), metrics(&reference().0));
    let ckpt = out.join("checkpoint-9");
    let shards = dpo_sam::models::weight_files(&ckpt).unwrap();
    assert!(shards.len() > 1, "expected shards, got {shards:?}");
    assert!(ckpt.join("exact_weights.safetensors").is_file());
    let final_weights = |d: &Path| -> Vec<Vec<u8>> {
        dpo_sam::models::weight_files(d)
            .unwrap()
            .iter()
            .map(|f| std::fs::read(f).unwrap())
            .collect()
    };
    let first = final_weights(&out);
    // Continue from checkpoint-9: the rounded shards alone would not resume exactly.
    std::fs::remove_dir_all(out.join("checkpoint-12")).unwrap();
    let mut resume = save.to_vec();
    resume.push("--resume");
    ok(&run(&args(&out, &resume)));
    assert_eq!(metrics(&out), metrics(&reference().0));
    assert!(final_weights(&out) == first, "final bf16 weights differ");
}

/// HF's epochs: 20 pairs in micro-batches of 6 make 6, 6, 6 and 2, two accumulated per step,
/// so each epoch is a full step and a step of the last two micro-batches (one of them short);
/// with `dataloader_drop_last` the short one is dropped. No step borrows pairs from the next
/// epoch: after each epoch `num_tokens` has grown by exactly the epoch's pairs' tokens, the
/// `epoch` metric is HF's, and resuming inside the second epoch is bit-identical.
#[test]
fn epochs_end_with_a_partial_step_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    // tiny_gpt2.toml sets max_steps; without it num_train_epochs decides the run's length.
    let cfg_text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny_gpt2.toml"),
    )
    .unwrap()
    .replace("max_steps = 150\n", "");
    let cfg_path = tmp.path().join("epochs.toml");
    std::fs::write(&cfg_path, cfg_text).unwrap();
    let run_args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "train".to_string(),
            "--config".into(),
            cfg_path.display().to_string(),
            "--quiet".into(),
        ];
        for set in [
            "data.builtin_pairs=20",
            "training.batch_size=12",
            "training.micro_batch_size=6",
            "training.num_train_epochs=2",
            "training.eval_steps=0",
            "training.save_steps=1",
        ]
        .iter()
        .chain(extra)
        {
            v.push("--set".into());
            v.push(set.to_string());
        }
        v.push("--output-dir".into());
        v.push(out.display().to_string());
        v
    };
    let full = tmp.path().join("full");
    ok(&run(&run_args(&full, &[])));
    let cfg = Config::load(&cfg_path, &["data.builtin_pairs=20".into()]).unwrap();
    let trainer = Trainer::new(cfg).unwrap();
    let pairs = trainer.train_pairs();
    assert_eq!(pairs.len(), 20);
    let epoch_tokens: usize = pairs
        .iter()
        .map(|p| p.chosen.ids.len() + p.rejected.ids.len())
        .sum();
    let lines: Vec<serde_json::Value> = metrics(&full)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l.get("epoch").is_some())
        .collect();
    let column =
        |key: &str| -> Vec<f64> { lines.iter().map(|l| l[key].as_f64().unwrap()).collect() };
    // Two steps per epoch (HF: ⌈4 micro-batches / 2⌉), HF's epoch = micro-batches drawn / 4.
    assert_eq!(column("epoch"), vec![0.5, 1.0, 1.5, 2.0]);
    let tokens = column("num_tokens");
    assert_eq!(
        tokens[1] as usize, epoch_tokens,
        "epoch 1 drew every pair once"
    );
    assert_eq!(tokens[3] as usize, 2 * epoch_tokens, "and so did epoch 2");

    // Resumed from step 3 (inside epoch 2, before its partial step): bit for bit.
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&full.join("checkpoint-3"), &resumed.join("checkpoint-3"));
    std::fs::copy(full.join("metrics.jsonl"), resumed.join("metrics.jsonl")).unwrap();
    let mut resume_args = run_args(&resumed, &[]);
    resume_args.push("--resume".into());
    ok(&run(&resume_args));
    assert_eq!(metrics(&resumed), metrics(&full));
    assert!(
        std::fs::read(resumed.join("model.safetensors")).unwrap()
            == std::fs::read(full.join("model.safetensors")).unwrap()
    );

    // dataloader_drop_last: 3 full micro-batches per epoch, so 2 steps, the second of one.
    let dropped = tmp.path().join("drop_last");
    ok(&run(&run_args(
        &dropped,
        &["training.dataloader_drop_last=true"],
    )));
    let text = std::fs::read_to_string(dropped.join("metrics.jsonl")).unwrap();
    let epochs: Vec<f64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l.get("epoch").and_then(|e| e.as_f64()))
        .collect();
    let third = 1.0 / 3.0;
    assert_eq!(epochs.len(), 4);
    for (got, want) in epochs
        .iter()
        .zip([2.0 * third, 1.0, 1.0 + 2.0 * third, 2.0])
    {
        assert!((got - want).abs() < 1e-12, "{epochs:?}");
    }
}
