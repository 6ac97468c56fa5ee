//! End-to-end tests of `dpo-sam eval`: build judge prompts, send them to a fake judge on
//! 127.0.0.1 (retries, concurrency, resume), and score the replies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::lines;

const N: usize = 12;

fn dpo_sam(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .arg("eval")
        .args(args)
        .current_dir(dir)
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn write_inputs(dir: &Path) {
    let mut policy = String::new();
    let mut sft = String::new();
    for i in 0..N {
        policy += &format!(
            "{}\n",
            json!({"prompt": format!("post {i}"), "completion": format!("policy answer {i}, a little longer")})
        );
        sft += &format!(
            "{}\n",
            json!({"prompt": format!("post {i}"), "completion": format!("sft answer {i}")})
        );
    }
    std::fs::write(dir.join("policy.jsonl"), policy).unwrap();
    std::fs::write(dir.join("sft.jsonl"), sft).unwrap();
}

/// The fake judge's rule for comparison i: no answer line when i % 4 == 3, else the policy wins
/// unless i % 3 == 0.
fn judge_reply(prompt: &str) -> String {
    let summary = |letter: &str| {
        let start = prompt.find(&format!("Summary {letter}:\n")).unwrap() + 11;
        prompt[start..].lines().next().unwrap().to_string()
    };
    let a = summary("A");
    let policy_letter = if a.starts_with("policy") { "A" } else { "B" };
    let other = if policy_letter == "A" { "B" } else { "A" };
    let i: usize = a
        .split(' ')
        .nth(2)
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap();
    if i % 4 == 3 {
        return "Comparison: both are fine.".into();
    }
    let pick = if !i.is_multiple_of(3) {
        policy_letter
    } else {
        other
    };
    format!("Comparison: one is better.\n**Preferred:** {pick}")
}

#[derive(Default)]
struct State {
    seen: HashMap<String, usize>,
    requests: usize,
    active: usize,
    max_active: usize,
    auth: Vec<Option<String>>,
}

/// What the fake judge answers: (status, body) given the state and the judge prompt.
type Behaviour = fn(&mut State, &str) -> (u16, String);

/// A tiny HTTP/1.1 server on 127.0.0.1:0, one thread per connection, stopped on drop.
struct Server {
    url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !sp.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || handle(stream, &st, behaviour));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Server {
            url,
            state,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.take().unwrap().join();
    }
}

fn handle(stream: TcpStream, state: &Mutex<State>, behaviour: Behaviour) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let (mut length, mut auth) = (0, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if lower.starts_with("authorization:") {
            auth = Some(line["authorization:".len()..].trim().to_string());
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let request: Value = serde_json::from_slice(&body).unwrap();
    let prompt = request["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, reply) = {
        let mut s = state.lock().unwrap();
        s.requests += 1;
        s.active += 1;
        s.max_active = s.max_active.max(s.active);
        s.auth.push(auth);
        behaviour(&mut s, &prompt)
    };
    // Long enough for concurrent requests to overlap.
    std::thread::sleep(Duration::from_millis(40));
    state.lock().unwrap().active -= 1;
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}

fn completion(content: &str) -> String {
    json!({"id": "chatcmpl-1", "model": "fake-judge", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).to_string()
}

/// Fails every prompt's first request with a 500, then answers.
fn flaky(s: &mut State, prompt: &str) -> (u16, String) {
    let seen = s.seen.entry(prompt.to_string()).or_default();
    *seen += 1;
    if *seen == 1 {
        (500, "{\"error\": {\"message\": \"overloaded\"}}".into())
    } else {
        (200, completion(&judge_reply(prompt)))
    }
}

#[test]
fn judge_send_with_retries_resume_and_score() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_inputs(d);
    let judge_args = [
        "--judge",
        "--task",
        "tldr",
        "--policy",
        "policy.jsonl",
        "--baseline",
        "sft.jsonl",
        "--seed",
        "3",
        "--judge-model",
        "fake-judge",
        "--comparisons",
    ];
    let out = dpo_sam(&[&judge_args[..], &["cmp.jsonl"]].concat(), d);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrote 12 comparisons"));
    ok(&dpo_sam(&[&judge_args[..], &["cmp2.jsonl"]].concat(), d));
    let cmp = std::fs::read(d.join("cmp.jsonl")).unwrap();
    assert_eq!(
        cmp,
        std::fs::read(d.join("cmp2.jsonl")).unwrap(),
        "byte-stable for a seed"
    );
    let comparisons = lines(&d.join("cmp.jsonl"));
    assert_eq!(comparisons.len(), N);
    for c in &comparisons {
        assert_eq!(c["request"]["messages"][0]["content"], c["judge_prompt"]);
        assert_eq!(c["request"]["model"], "fake-judge");
        assert!(c["judge_prompt"]
            .as_str()
            .unwrap()
            .ends_with("Preferred: <\"A\" or \"B\">"));
    }

    let server = Server::start(flaky);
    let send = [
        "--judge-url",
        server.url.as_str(),
        "--comparisons",
        "cmp.jsonl",
        "--replies",
        "replies.jsonl",
        "--concurrency",
        "4",
        "--retries",
        "3",
        "--retry-base-ms",
        "5",
        "--timeout",
        "10",
    ];
    ok(&dpo_sam(&send, d));
    {
        let s = server.state.lock().unwrap();
        assert_eq!(s.requests, 2 * N, "one 500 then one 200 per comparison");
        assert!(
            s.max_active > 1 && s.max_active <= 4,
            "max in flight {}",
            s.max_active
        );
        assert!(
            s.auth.iter().all(Option::is_none),
            "no key sent to localhost"
        );
    }
    let replies = lines(&d.join("replies.jsonl"));
    assert_eq!(replies.len(), N);
    assert!(replies
        .iter()
        .all(|r| r["attempts"] == 2 && r["model"] == "fake-judge"));

    // Simulate a crash: keep 5 replies and half of the 6th, then rerun.
    let text = std::fs::read_to_string(d.join("replies.jsonl")).unwrap();
    let kept: Vec<&str> = text.lines().take(6).collect();
    let partial = format!("{}\n{}", kept[..5].join("\n"), &kept[5][..20]);
    std::fs::write(d.join("replies.jsonl"), partial).unwrap();
    let out = dpo_sam(&send, d);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 6 was cut short"), "{stderr}");
    assert!(
        stderr.contains("judged 7 comparisons") && stderr.contains("5 already there"),
        "{stderr}"
    );
    assert_eq!(server.state.lock().unwrap().requests, 2 * N + (N - 5));
    let replies = lines(&d.join("replies.jsonl"));
    let mut ids: Vec<&str> = replies.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N);
    assert_eq!(replies.len(), N);

    // A third run has nothing left to ask.
    ok(&dpo_sam(&send, d));
    assert_eq!(server.state.lock().unwrap().requests, 2 * N + (N - 5));

    let report: Value = serde_json::from_str(&ok(&dpo_sam(
        &[
            "--score",
            "--json",
            "--comparisons",
            "cmp.jsonl",
            "--replies",
            "replies.jsonl",
        ],
        d,
    )))
    .unwrap();
    let invalid = (0..N).filter(|i| i % 4 == 3).count();
    let wins = (0..N).filter(|i| i % 4 != 3 && i % 3 != 0).count();
    assert_eq!(report["invalid"], invalid);
    assert_eq!(report["invalid_by_reason"]["no_answer_line"], invalid);
    assert_eq!(report["wins"], wins);
    assert_eq!(report["losses"], N - invalid - wins);
    let a = report["policy_as_a"]["n"].as_u64().unwrap();
    let b = report["policy_as_b"]["n"].as_u64().unwrap();
    assert_eq!((a + b) as usize, N - invalid);
    // Every policy answer is longer than the SFT one here.
    assert!(report["length"]["mean_diff"].as_f64().unwrap() > 0.0);
    let table = ok(&dpo_sam(
        &[
            "--score",
            "--comparisons",
            "cmp.jsonl",
            "--replies",
            "replies.jsonl",
        ],
        d,
    ));
    assert!(
        table.contains("win rate") && table.contains("no_answer_line 3"),
        "{table}"
    );
}

#[test]
fn exhausted_retries_and_refusals_fail_clearly_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_inputs(d);
    ok(&dpo_sam(
        &[
            "--judge",
            "--task",
            "tldr",
            "--policy",
            "policy.jsonl",
            "--baseline",
            "sft.jsonl",
            "--comparisons",
            "cmp.jsonl",
        ],
        d,
    ));
    let down = Server::start(|_, _| (503, "busy".into()));
    let args = |url: &str| {
        [
            "--judge-url",
            url,
            "--comparisons",
            "cmp.jsonl",
            "--replies",
            "r.jsonl",
            "--retries",
            "1",
            "--retry-base-ms",
            "1",
            "--concurrency",
            "3",
        ]
        .map(String::from)
    };
    let a = args(&down.url);
    let err = failed(&dpo_sam(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    assert!(
        err.contains("12 requests failed")
            && err.contains("HTTP 503: busy")
            && err.contains("rerun"),
        "{err}"
    );
    assert_eq!(down.state.lock().unwrap().requests, 2 * N);
    assert_eq!(std::fs::read_to_string(d.join("r.jsonl")).unwrap(), "");

    let forbidden = Server::start(|_, _| (401, "{\"error\": \"bad key\"}".into()));
    let a = args(&forbidden.url);
    let err = failed(&dpo_sam(
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    assert!(err.contains("HTTP 401") && err.contains("API key"), "{err}");
    assert!(
        forbidden.state.lock().unwrap().requests <= 3,
        "stops after the first refusals"
    );

    let up = Server::start(|_, p| (200, completion(&judge_reply(p))));
    let a = args(&up.url);
    let mut with_key: Vec<&str> = a.iter().map(String::as_str).collect();
    with_key.extend(["--api-key-env", "DPO_SAM_TEST_KEY"]);
    let out = Command::new(env!("CARGO_BIN_EXE_dpo-sam"))
        .arg("eval")
        .args(&with_key)
        .current_dir(d)
        .env("DPO_SAM_TEST_KEY", "sk-test")
        .output()
        .unwrap();
    ok(&out);
    let s = up.state.lock().unwrap();
    assert_eq!(s.requests, N);
    assert!(s
        .auth
        .iter()
        .all(|a| a.as_deref() == Some("Bearer sk-test")));
}

#[test]
fn usage_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_inputs(d);
    let err = failed(&dpo_sam(&["--comparisons", "c.jsonl"], d));
    assert!(err.contains("nothing to do"), "{err}");
    let err = failed(&dpo_sam(
        &["--judge", "--task", "hh", "--comparisons", "c.jsonl"],
        d,
    ));
    assert!(err.contains("--policy"), "{err}");
    let err = failed(&dpo_sam(
        &[
            "--judge",
            "--task",
            "hh",
            "--policy",
            "policy.jsonl",
            "--comparisons",
            "c.jsonl",
        ],
        d,
    ));
    assert!(err.contains("--baseline"), "{err}");
    std::fs::write(
        d.join("t.txt"),
        "# answer-label: Better\n{prompt} {response_a} {reponse_b}\n",
    )
    .unwrap();
    let err = failed(&dpo_sam(
        &[
            "--judge",
            "--task",
            "t.txt",
            "--policy",
            "policy.jsonl",
            "--baseline",
            "sft.jsonl",
            "--comparisons",
            "c.jsonl",
        ],
        d,
    ));
    assert!(
        err.contains("t.txt") && err.contains("{reponse_b}"),
        "{err}"
    );

    std::fs::write(d.join("data.jsonl"), "{\"prompt\": \"post 1\", \"chosen\": \"human 1\"}\n{\"prompt\": \"post 2\", \"chosen\": \"human 2\"}\n").unwrap();
    let out = dpo_sam(
        &[
            "--judge",
            "--task",
            "hh",
            "--policy",
            "policy.jsonl",
            "--baseline-data",
            "data.jsonl",
            "--comparisons",
            "c.jsonl",
        ],
        d,
    );
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wrote 2 comparisons")
            && stderr.contains("10 policy records have no baseline"),
        "{stderr}"
    );
    assert!(
        stderr.contains("policy.jsonl line 1: \"post 0\""),
        "{stderr}"
    );

    let err = failed(&dpo_sam(
        &[
            "--judge-url",
            "https://judge.example.com/v1",
            "--api-key-env",
            "DPO_SAM_TEST_UNSET",
            "--comparisons",
            "c.jsonl",
            "--replies",
            "r.jsonl",
        ],
        d,
    ));
    assert!(err.contains("DPO_SAM_TEST_UNSET is not set"), "{err}");
    std::fs::write(d.join("bad.jsonl"), "{\"id\": \"x\"}\n").unwrap();
    let err = failed(&dpo_sam(
        &[
            "--score",
            "--comparisons",
            "bad.jsonl",
            "--replies",
            "r.jsonl",
        ],
        d,
    ));
    assert!(
        err.contains("bad.jsonl line 1: expected a comparison"),
        "{err}"
    );
}
