//! `eval --judge-url`: sends the comparisons' request bodies to an OpenAI-compatible
//! chat-completions endpoint with bounded concurrency and retries, appending one reply line per
//! comparison so an interrupted run resumes where it stopped.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::judge::{id_text, prompt_hash, Comparison};

pub struct ClientOptions {
    pub url: String,
    pub api_key_env: String,
    pub model: Option<String>,
    pub concurrency: usize,
    pub retries: u32,
    pub retry_base: Duration,
    pub timeout: Duration,
}

/// What a `send` run did.
#[derive(Debug)]
pub struct SendSummary {
    pub already_done: usize,
    pub sent: usize,
    /// (comparison id, last error) of requests that ran out of retries or failed for good.
    pub failed: Vec<(String, String)>,
    /// Set when the server refused us outright (bad key or URL), so the rest were not tried.
    pub aborted: Option<String>,
}

/// `https://host/v1` and `https://host/v1/chat/completions` both work, like `base_url` in the
/// OpenAI Python client.
pub fn endpoint(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.ends_with("/chat/completions") {
        url.to_string()
    } else {
        format!("{url}/chat/completions")
    }
}

fn is_local(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// The API key, or None for local servers (vLLM, llama.cpp) started without one.
fn api_key(url: &str, var: &str) -> Result<Option<String>> {
    match std::env::var(var) {
        Ok(key) if !key.is_empty() => Ok(Some(key)),
        _ if is_local(url) => Ok(None),
        _ => bail!(
            "--judge-url {url}: environment variable {var} is not set; export the judge's API \
             key there (or name another variable with --api-key-env)"
        ),
    }
}

/// Ids already answered in `path`. A last line without its newline is the remnant of a crash
/// mid-write: it is cut off so the comparison is asked again.
fn resume(path: &Path, comparisons: &[Comparison]) -> Result<(HashSet<String>, Option<usize>)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((HashSet::new(), None)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut truncated = None;
    if complete < bytes.len() {
        truncated = Some(bytes[..complete].iter().filter(|&&b| b == b'\n').count() + 1);
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(complete as u64))
            .with_context(|| format!("truncating the partial last line of {}", path.display()))?;
    }
    let hashes: HashMap<&str, String> = comparisons
        .iter()
        .map(|c| (c.id.as_str(), prompt_hash(&c.judge_prompt)))
        .collect();
    let mut done = HashSet::new();
    let text = String::from_utf8_lossy(&bytes[..complete]);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let value: Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: not valid JSON; remove the line or pick a fresh --replies file",
                at()
            )
        })?;
        let Some(id) = value
            .get("custom_id")
            .or_else(|| value.get("id"))
            .and_then(id_text)
        else {
            bail!("{}: expected a reply line with an `id`", at());
        };
        let stale = match (hashes.get(id.as_str()), value.get("prompt_hash")) {
            (Some(want), Some(Value::String(got))) => got != want,
            _ => false,
        };
        if stale {
            bail!(
                "{}: the reply for id `{id}` was made for a different judge prompt (the \
                 comparisons file was rebuilt since); use a fresh --replies file",
                at()
            );
        }
        done.insert(id);
    }
    Ok((done, truncated))
}

enum Failure {
    /// Worth another try: 429, 408, 5xx, transport errors, unreadable bodies.
    Retry(String, Option<Duration>),
    /// This request is wrong (400, unexpected body): more tries would not help.
    Fatal(String),
    /// Every request would fail the same way (401, 403, 404).
    Abort(String),
}

fn excerpt(body: &str) -> String {
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        s.push('…');
    }
    s
}

fn post(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &Value) -> Result<Value, Failure> {
    let mut request = agent.post(url);
    if let Some(key) = key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    match request.send_json(body) {
        Ok(response) => {
            let text = response
                .into_string()
                .map_err(|e| Failure::Retry(format!("reading the response: {e}"), None))?;
            serde_json::from_str(&text).map_err(|_| {
                Failure::Retry(format!("response is not JSON: {}", excerpt(&text)), None)
            })
        }
        Err(ureq::Error::Status(code, response)) => {
            let retry_after = crate::retry::retry_after(&response);
            let msg = format!(
                "HTTP {code}: {}",
                excerpt(&response.into_string().unwrap_or_default())
            );
            Err(match code {
                408 | 429 | 500..=599 => Failure::Retry(msg, retry_after),
                401 | 403 | 404 => Failure::Abort(msg),
                _ => Failure::Fatal(msg),
            })
        }
        Err(ureq::Error::Transport(t)) => Err(Failure::Retry(t.to_string(), None)),
    }
}

/// The reply line for a successful response: the answer text (null when the model refused or
/// returned no content), the refusal if any, and the prompt hash that guards against mixing files.
fn reply_line(c: &Comparison, response: &Value, attempts: u32) -> Result<Value, Failure> {
    let message = response.pointer("/choices/0/message").ok_or_else(|| {
        Failure::Fatal(format!(
            "response has no choices[0].message: {}",
            excerpt(&response.to_string())
        ))
    })?;
    let mut line = json!({
        "id": c.id,
        "reply": message.get("content").cloned().unwrap_or(Value::Null),
        "prompt_hash": prompt_hash(&c.judge_prompt),
        "model": response.get("model").cloned().unwrap_or(Value::Null),
        "attempts": attempts,
    });
    if let Some(refusal) = message.get("refusal").filter(|r| r.is_string()) {
        line["refusal"] = refusal.clone();
    }
    Ok(line)
}

/// Sends every comparison not yet answered in `replies`, appending replies as they arrive.
pub fn send(
    comparisons: &[Comparison],
    replies: &Path,
    opts: &ClientOptions,
) -> Result<SendSummary> {
    let url = endpoint(&opts.url);
    let key = api_key(&url, &opts.api_key_env)?;
    let (done, truncated) = resume(replies, comparisons)?;
    if let Some(line) = truncated {
        eprintln!(
            "{} line {line} was cut short by an interrupted run; asking again",
            replies.display()
        );
    }
    let pending: Vec<&Comparison> = comparisons
        .iter()
        .filter(|c| !done.contains(&c.id))
        .collect();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(replies)
        .with_context(|| format!("opening {} for appending", replies.display()))?;
    let writer: Mutex<File> = Mutex::new(file);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(opts.timeout.min(Duration::from_secs(30)))
        .timeout(opts.timeout)
        .build();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let aborted = Mutex::new(None);
    let progress = indicatif::ProgressBar::new(pending.len() as u64);
    let worker = || -> Result<()> {
        while !stop.load(Ordering::Relaxed) {
            let Some(c) = pending.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let mut body = serde_json::to_value(&c.request)?;
            if let Some(model) = &opts.model {
                body["model"] = json!(model);
            }
            let mut attempt = 0;
            let result = loop {
                let outcome = post(&agent, &url, key.as_deref(), &body)
                    .and_then(|response| reply_line(c, &response, attempt + 1));
                match outcome {
                    Err(Failure::Retry(_, after)) if attempt < opts.retries => {
                        std::thread::sleep(crate::retry::backoff(opts.retry_base, attempt, after));
                        attempt += 1;
                    }
                    other => break other,
                }
            };
            match result {
                Ok(line) => {
                    let mut text = line.to_string();
                    text.push('\n');
                    let mut f = writer.lock().unwrap_or_else(|e| e.into_inner());
                    f.write_all(text.as_bytes())
                        .and_then(|()| f.flush())
                        .with_context(|| format!("appending to {}", replies.display()))?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(Failure::Retry(msg, _) | Failure::Fatal(msg)) => {
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((c.id.clone(), msg));
                }
                Err(Failure::Abort(msg)) => {
                    stop.store(true, Ordering::Relaxed);
                    *aborted.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
                }
            }
            progress.inc(1);
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..opts.concurrency.max(1))
            .map(|_| scope.spawn(worker))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| bail!("a judge worker panicked"))
        })
    })?;
    progress.finish_and_clear();
    Ok(SendSummary {
        already_done: comparisons.len() - pending.len(),
        sent: sent.into_inner(),
        failed: failed.into_inner().unwrap_or_else(|e| e.into_inner()),
        aborted: aborted.into_inner().unwrap_or_else(|e| e.into_inner()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::judge::{fixtures::comparison, Position};

    #[test]
    fn endpoint_and_locality() {
        assert_eq!(
            endpoint("https://api.openai.com/v1"),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            endpoint("http://h:8000/v1/chat/completions/"),
            "http://h:8000/v1/chat/completions"
        );
        for local in [
            "http://localhost:8000/v1",
            "http://127.0.0.1:1",
            "http://[::1]:80/v1",
            "localhost",
        ] {
            assert!(is_local(local), "{local}");
        }
        for remote in [
            "https://api.openai.com/v1",
            "http://10.0.0.1/v1",
            "http://localhost.evil.com/",
        ] {
            assert!(!is_local(remote), "{remote}");
        }
        let err = api_key("https://api.example.com/v1", "DPO_SAM_TEST_SURELY_UNSET")
            .unwrap_err()
            .to_string();
        assert!(err.contains("DPO_SAM_TEST_SURELY_UNSET"), "{err}");
        assert_eq!(
            api_key("http://127.0.0.1:9/v1", "DPO_SAM_TEST_SURELY_UNSET").unwrap(),
            None
        );
    }

    #[test]
    fn resume_skips_answered_ids_and_cuts_a_partial_line() {
        let comps: Vec<Comparison> = ["a", "b", "c"]
            .iter()
            .map(|id| comparison(id, Position::A, "a", "b"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let good = format!(
            "{{\"id\":\"a\",\"reply\":\"x\",\"prompt_hash\":\"{}\"}}\n",
            prompt_hash("judge a")
        );
        std::fs::write(&path, format!("{good}{{\"id\":\"b\",\"rep")).unwrap();
        let (done, cut) = resume(&path, &comps).unwrap();
        assert_eq!(done, HashSet::from(["a".to_string()]));
        assert_eq!(cut, Some(2));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);

        std::fs::write(&path, format!("{good}garbage\n")).unwrap();
        let err = format!("{:#}", resume(&path, &comps).unwrap_err());
        assert!(err.contains("r.jsonl line 2: not valid JSON"), "{err}");

        std::fs::write(
            &path,
            "{\"id\":\"a\",\"reply\":\"x\",\"prompt_hash\":\"00\"}\n",
        )
        .unwrap();
        let err = format!("{:#}", resume(&path, &comps).unwrap_err());
        assert!(err.contains("different judge prompt"), "{err}");

        let (done, cut) = resume(&dir.path().join("absent.jsonl"), &comps).unwrap();
        assert!(done.is_empty() && cut.is_none());
    }
}
