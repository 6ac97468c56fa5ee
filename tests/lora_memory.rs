//! The LoRA reference with the adapters off loads no second copy of the weights: the plan
//! (`--dry-run`) says so, and so does the peak resident memory of real runs, measured per child
//! with `wait4`. A test binary of its own, because a child's peak counts its parent's resident
//! memory at the fork: beside the other tests' models it would hide a copy.

use std::process::Command;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

/// Peak resident memory (VmHWM) of a `dpo-sam` run, in bytes: the child's own from `wait4`.
// The child is reaped by `wait4`, which std's `wait` cannot replace: it returns no rusage.
#[allow(clippy::zombie_processes)]
fn peak_rss(args: &[String]) -> u64 {
    let child = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: plain syscall on our own child, with pointers to live locals.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{args:?} failed"
    );
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn the_adapters_off_reference_loads_no_second_copy_of_the_weights() {
    // A random GPT-2 of 25M parameters (100 MB in f32): a copy of it stands out of the noise.
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type":"gpt2","vocab_size":96,"n_positions":64,"n_embd":1024,"n_layer":2,"n_head":8}"#,
    )
    .unwrap();
    let model = format!("model.name_or_path=\"random:{}\"", config.display());
    let run_with = |name: &str, extra: &[&str]| -> (u64, serde_json::Value) {
        let mut args: Vec<String> = ["train", "--config", "configs/tiny_gpt2.toml", "--quiet"]
            .map(String::from)
            .to_vec();
        for set in [
            &model,
            "training.max_steps=1",
            "data.builtin_pairs=16",
            "training.batch_size=2",
            "training.micro_batch_size=1",
            "data.max_length=16",
            "training.eval_steps=0",
            "lora.r=2",
            "sam.kind=\"none\"",
        ]
        .iter()
        .chain(extra)
        {
            args.extend(["--set".into(), set.to_string()]);
        }
        args.extend([
            "--output-dir".into(),
            tmp.path().join(name).display().to_string(),
        ]);
        let mut dry = args.clone();
        dry.push("--dry-run".into());
        let plan = ok(&run(&dry));
        let reference_gib: f64 = plan
            .split("reference ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        (peak_rss(&args), serde_json::json!(reference_gib))
    };
    let bytes = 25.4e6 * 4.0;
    let (none, plan_none) = run_with("none", &["training.loss_type=\"sft\""]);
    let (off, plan_off) = run_with("off", &[]);
    let (copy, plan_copy) = run_with(
        "copy",
        &[&model.replace("model.name_or_path", "model.ref_name_or_path")],
    );
    eprintln!("peak RSS: no reference {none}, adapters off {off}, a loaded reference {copy}; plan reference GiB {plan_none} {plan_off} {plan_copy}");
    // The plan says so, and so does the measured peak: the adapters-off reference costs less
    // than a quarter of the weights' size over no reference at all, a loaded one about a copy.
    assert_eq!(
        (plan_none.as_f64(), plan_off.as_f64()),
        (Some(0.0), Some(0.0))
    );
    assert!(
        (plan_copy.as_f64().unwrap() - bytes / (1u64 << 30) as f64).abs() < 0.01,
        "{plan_copy}"
    );
    assert!(
        (off as f64) < none as f64 + 0.25 * bytes,
        "adapters off: {off} vs {none}"
    );
    assert!(
        (copy as f64) > off as f64 + 0.75 * bytes,
        "a second copy: {copy} vs {off}"
    );
}
