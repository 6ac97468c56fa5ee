//! Hub uploads against a stand-in Hub on 127.0.0.1 (no outside network): `dpo-sam push` and
//! `training.push_to_hub` create the repository and branch, let preupload decide which files
//! are LFS, upload those (single PUT and multipart, without the token), verify them, and commit
//! the rest inline; the stand-in checks every request as the Hub would and keeps the files, so
//! the test compares the repository with the directory. A missing token or a refused upload is
//! a clear error and leaves the local directory as it was.

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

mod common;

const TOKEN: &str = "hf_test_token";

/// One HTTP request as the stand-in received it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A branch's files: path → bytes.
type Files = BTreeMap<String, Vec<u8>>;

#[derive(Default)]
struct Hub {
    /// Every request, in order.
    log: Vec<Request>,
    /// Repository → (private, branch → path → bytes).
    repos: BTreeMap<String, (bool, BTreeMap<String, Files>)>,
    /// LFS objects by oid, and multipart parts by (oid, part).
    objects: BTreeMap<String, Vec<u8>>,
    parts: BTreeMap<(String, usize), Vec<u8>>,
    /// Files above this many bytes get multipart upload instructions.
    multipart_above: usize,
    /// Answer the next preupload with a 503 (a transient error the client retries).
    fail_preupload_once: bool,
}

struct StandIn {
    url: String,
    hub: Arc<Mutex<Hub>>,
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl StandIn {
    fn start(multipart_above: usize) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::new(Mutex::new(Hub {
            multipart_above,
            fail_preupload_once: true,
            ..Hub::default()
        }));
        let (h, base) = (hub.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (h, base) = (h.clone(), base.clone());
                std::thread::spawn(move || serve(stream, &h, &base));
            }
        });
        StandIn { url, hub }
    }

    fn files(&self, repo: &str, branch: &str) -> Files {
        self.hub.lock().unwrap().repos[repo].1[branch].clone()
    }
}

fn read_request(stream: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    stream.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        stream.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if let Some(n) = headers.get("content-length") {
        body.resize(n.parse().ok()?, 0);
        stream.read_exact(&mut body).ok()?;
    } else if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        loop {
            let mut size = String::new();
            stream.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            stream.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn serve(stream: TcpStream, hub: &Mutex<Hub>, base: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let Some(req) = read_request(&mut reader) else {
        return;
    };
    let (status, extra, body) = {
        let mut hub = hub.lock().unwrap();
        hub.log.push(req.clone());
        route(&mut hub, &req, base)
    };
    let mut stream = stream;
    let text = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{text}",
        text.len()
    );
}

/// The Hub's answer to one request: (status, extra header lines, JSON body).
fn route(hub: &mut Hub, req: &Request, base: &str) -> (u16, String, Value) {
    let err = |code: u16, msg: &str| (code, String::new(), json!({ "error": msg }));
    let authed =
        req.headers.get("authorization").map(String::as_str) == Some(&format!("Bearer {TOKEN}"));
    let path = req.path.as_str();
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    // Presigned storage URLs: the token must never be sent there.
    if let Some(rest) = path.strip_prefix("/storage/") {
        if req.headers.contains_key("authorization") {
            return err(400, "the token leaked to the storage URL");
        }
        if req.method == "PUT" && !req.headers.contains_key("content-length") {
            return err(411, "storage needs Content-Length");
        }
        let parts: Vec<&str> = rest.split('/').collect();
        return match (req.method.as_str(), parts.as_slice()) {
            ("PUT", [oid]) => {
                if hex(&req.body) != *oid {
                    return err(400, "bytes do not match the oid");
                }
                hub.objects.insert(oid.to_string(), req.body.clone());
                (200, String::new(), json!({}))
            }
            ("PUT", [oid, n]) => {
                let etag = format!("\"etag-{n}-{}\"", req.body.len());
                hub.parts
                    .insert((oid.to_string(), n.parse().unwrap()), req.body.clone());
                (200, format!("ETag: {etag}\r\n"), json!({}))
            }
            ("POST", [oid, "complete"]) => {
                let mut all = Vec::new();
                for (i, p) in body["parts"].as_array().unwrap().iter().enumerate() {
                    let n = p["partNumber"].as_u64().unwrap() as usize;
                    let part = &hub.parts[&(oid.to_string(), n)];
                    let etag = format!("\"etag-{n}-{}\"", part.len());
                    if n != i + 1 || p["etag"] != etag.as_str() {
                        return err(400, "bad part list");
                    }
                    all.extend_from_slice(part);
                }
                if hex(&all) != *oid {
                    return err(400, "assembled bytes do not match the oid");
                }
                hub.objects.insert(oid.to_string(), all);
                (200, String::new(), json!({}))
            }
            _ => err(404, "no such storage call"),
        };
    }
    if !authed {
        return err(401, "Invalid credentials in Authorization header");
    }
    if path == "/api/whoami-v2" {
        return (200, String::new(), json!({"name": "tester"}));
    }
    if path == "/api/repos/create" && req.method == "POST" {
        let id = format!(
            "{}/{}",
            body["organization"].as_str().unwrap(),
            body["name"].as_str().unwrap()
        );
        if body["type"] != "model" {
            return err(400, "type");
        }
        if hub.repos.contains_key(&id) {
            return err(409, "You already created this model repo");
        }
        if body["name"] == "refused" {
            return err(
                403,
                "You don't have the rights to create a model under this namespace",
            );
        }
        let private = body["visibility"] == "private";
        let branches = BTreeMap::from([("main".to_string(), BTreeMap::new())]);
        hub.repos.insert(id.clone(), (private, branches));
        return (200, String::new(), json!({"url": format!("{base}/{id}")}));
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.split('/').collect();
        let [org, name, op, rev] = parts.as_slice() else {
            return err(404, "no such call");
        };
        let repo = format!("{org}/{name}");
        let rev = rev.replace("%2F", "/");
        let Some((_, branches)) = hub.repos.get_mut(&repo) else {
            return err(404, "Repository not found");
        };
        return match *op {
            "branch" => {
                if branches.contains_key(&rev) {
                    return err(409, "branch exists");
                }
                let main = branches["main"].clone();
                branches.insert(rev, main);
                (200, String::new(), json!({}))
            }
            "preupload" => {
                if std::mem::take(&mut hub.fail_preupload_once) {
                    return err(503, "try again");
                }
                let files: Vec<Value> = body["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        let path = f["path"].as_str().unwrap();
                        let sample = base64::engine::general_purpose::STANDARD
                            .decode(f["sample"].as_str().unwrap())
                            .unwrap();
                        assert!(sample.len() <= 512);
                        let lfs = path.ends_with(".safetensors") || f["size"].as_u64().unwrap() > 10_000;
                        json!({"path": path, "uploadMode": if lfs {"lfs"} else {"regular"}, "shouldIgnore": false})
                    })
                    .collect();
                (200, String::new(), json!({ "files": files }))
            }
            "commit" => {
                if req.headers.get("content-type").map(String::as_str)
                    != Some("application/x-ndjson")
                {
                    return err(400, "expected NDJSON");
                }
                let Some(files) = branches.get_mut(&rev) else {
                    return err(404, "no such branch");
                };
                let text = String::from_utf8(req.body.clone()).unwrap();
                let mut lines = text
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap());
                let header = lines.next().unwrap();
                assert_eq!(header["key"], "header");
                for op in lines {
                    let v = &op["value"];
                    let path = v["path"].as_str().unwrap().to_string();
                    let bytes = match op["key"].as_str().unwrap() {
                        "file" => base64::engine::general_purpose::STANDARD
                            .decode(v["content"].as_str().unwrap())
                            .unwrap(),
                        "lfsFile" => match hub.objects.get(v["oid"].as_str().unwrap()) {
                            Some(b) if b.len() as u64 == v["size"].as_u64().unwrap() => b.clone(),
                            _ => return err(422, "LFS object missing"),
                        },
                        other => panic!("unexpected operation {other}"),
                    };
                    files.insert(path, bytes);
                }
                (
                    200,
                    String::new(),
                    json!({"commitUrl": format!("{base}/{repo}/commit/abc123"), "commitOid": "abc123"}),
                )
            }
            _ => err(404, "no such call"),
        };
    }
    if let Some(repo) = path.strip_suffix(".git/info/lfs/objects/batch") {
        let repo = repo.trim_start_matches('/');
        if req.headers.get("accept").map(String::as_str) != Some("application/vnd.git-lfs+json") {
            return err(400, "LFS needs its media type");
        }
        assert_eq!(body["operation"], "upload");
        assert_eq!(body["hash_algo"], "sha256");
        let objects: Vec<Value> = body["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap();
                let size = o["size"].as_u64().unwrap() as usize;
                if hub.objects.contains_key(oid) {
                    return json!({"oid": oid, "size": size});
                }
                let verify = json!({"href": format!("{base}/{repo}.git/info/lfs/objects/verify")});
                let upload = if size > hub.multipart_above {
                    let chunk = hub.multipart_above;
                    let mut header = serde_json::Map::new();
                    header.insert("chunk_size".into(), chunk.to_string().into());
                    for n in 1..=size.div_ceil(chunk) {
                        header.insert(
                            format!("{n:05}"),
                            format!("{base}/storage/{oid}/{n}").into(),
                        );
                    }
                    json!({"href": format!("{base}/storage/{oid}/complete"), "header": header})
                } else {
                    json!({"href": format!("{base}/storage/{oid}")})
                };
                json!({"oid": oid, "size": size, "actions": {"upload": upload, "verify": verify}})
            })
            .collect();
        return (
            200,
            String::new(),
            json!({"transfer": "basic", "objects": objects}),
        );
    }
    if path.ends_with(".git/info/lfs/objects/verify") {
        let oid = body["oid"].as_str().unwrap();
        return match hub.objects.get(oid) {
            Some(b) if b.len() as u64 == body["size"].as_u64().unwrap() => {
                (200, String::new(), json!({}))
            }
            _ => err(404, "object not found"),
        };
    }
    err(404, "no such call")
}

fn dpo_sam(args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo-sam"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        // No token file from a real login, no real Hub.
        .env("HF_HOME", home.path())
        .env_remove("HF_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in unset {
        cmd.env_remove(k);
    }
    cmd.output().unwrap()
}

/// Every file under `dir` with its SHA-256.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, hex(&std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// A 6-step run with a checkpoint at 3 and its TensorBoard logs.
fn trained() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("tiny-dpo");
        let res = common::train_tiny(&dir, &["training.max_steps=6", "training.save_steps=3"]);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        dir
    })
}

#[test]
fn push_uploads_the_model_directory_with_lfs_single_and_multipart() {
    let dir = trained();
    let before = snapshot(dir);
    // model.safetensors (~250 kB) goes multipart in 100 kB parts; config.json inline.
    let hub = StandIn::start(100_000);
    let out = dir.display().to_string();
    let res = dpo_sam(
        &[
            "push",
            &out,
            "--repo",
            "tiny-dpo",
            "--private",
            "--revision",
            "exp/1",
        ],
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", TOKEN)],
        &[],
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&res.stdout).trim(),
        format!("{}/tester/tiny-dpo/commit/abc123", hub.url)
    );
    assert_eq!(snapshot(dir), before, "nothing local changes");

    // The repository: private, on the new branch, and the directory minus checkpoints.
    assert!(
        hub.hub.lock().unwrap().repos["tester/tiny-dpo"].0,
        "created private"
    );
    let files = hub.files("tester/tiny-dpo", "exp/1");
    assert!(hub.files("tester/tiny-dpo", "main").is_empty());
    let want: Vec<&String> = before
        .keys()
        .filter(|k| !k.starts_with("checkpoint-"))
        .collect();
    assert_eq!(files.keys().collect::<Vec<_>>(), want);
    for (path, bytes) in &files {
        if path != "README.md" {
            assert_eq!(hex(bytes), before[path], "{path}");
        }
    }
    assert!(files
        .keys()
        .any(|k| k.starts_with("runs/") && k.contains("events.out.tfevents")));
    // The uploaded card loads from the repository; the local one still names the directory.
    let card = String::from_utf8(files["README.md"].clone()).unwrap();
    assert!(card.contains("model_id = \"tester/tiny-dpo\""), "{card}");
    let local = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(local.contains(&format!("model_id = \"{}\"", dir.display())));

    // How it got there.
    let log = hub.hub.lock().unwrap().log.clone();
    let calls: Vec<String> = log
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let has = |prefix: &str| calls.iter().filter(|c| c.starts_with(prefix)).count();
    assert_eq!(has("GET /api/whoami-v2"), 1, "{calls:#?}");
    assert_eq!(has("POST /api/repos/create"), 1);
    assert_eq!(has("POST /api/models/tester/tiny-dpo/branch/exp%2F1"), 1);
    assert_eq!(
        has("POST /api/models/tester/tiny-dpo/preupload/exp%2F1"),
        2,
        "the 503 retried"
    );
    assert_eq!(has("POST /tester/tiny-dpo.git/info/lfs/objects/batch"), 1);
    assert!(
        has("PUT /storage/") >= 3,
        "model.safetensors in parts: {calls:#?}"
    );
    assert_eq!(has("POST /api/models/tester/tiny-dpo/commit/exp%2F1"), 1);
    let size = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(
        size > 200_000,
        "the multipart case needs a larger file: {size}"
    );

    // Pushing again: the repository exists (409 is fine), the LFS object is already there.
    let res = dpo_sam(
        &["push", &out, "--repo", "tester/tiny-dpo"],
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", TOKEN)],
        &[],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(hub.files("tester/tiny-dpo", "main").len(), want.len());
}

#[test]
fn a_missing_token_or_a_refused_upload_is_a_clear_error_and_changes_nothing() {
    let dir = trained();
    let before = snapshot(dir);
    let hub = StandIn::start(1 << 30);
    let out = dir.display().to_string();
    let res = dpo_sam(
        &["push", &out, "--repo", "me/x"],
        &[("HF_ENDPOINT", &hub.url)],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no Hugging Face token") && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(
        hub.hub.lock().unwrap().log.is_empty(),
        "nothing is sent without a token"
    );

    let res = dpo_sam(
        &["push", &out, "--repo", "me/x"],
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", "hf_wrong")],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nothing local was changed")
            && err.contains("the Hub refused creating the repository me/x: HTTP 401")
            && err.contains("Invalid credentials"),
        "{err}"
    );
    assert!(hub.hub.lock().unwrap().repos.is_empty());

    let res = dpo_sam(
        &["push", "tests/fixtures", "--repo", "me/x"],
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", TOKEN)],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("not a model directory (no config.json)"),
        "{err}"
    );
    let res = dpo_sam(&["push", &out, "--repo", "a/b/c"], &[], &[]);
    assert!(String::from_utf8_lossy(&res.stderr).contains("--repo: expected `NAME` or `ORG/NAME`"));
    assert_eq!(snapshot(dir), before, "nothing local changes");
}

#[test]
fn push_to_hub_checks_the_token_first_and_uploads_at_the_end_of_training() {
    let hub = StandIn::start(1 << 30);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pushed-run");
    let out_s = out.display().to_string();
    let args = [
        "train",
        "--config",
        "configs/tiny_gpt2.toml",
        "--quiet",
        "--output-dir",
        &out_s,
        "--set",
        "data.builtin_pairs=64",
        "--set",
        "training.max_steps=2",
        "--set",
        "training.push_to_hub=true",
        "--set",
        "training.hub_revision=\"v1\"",
    ];
    // Without a token nothing starts.
    let res = dpo_sam(&args, &[("HF_ENDPOINT", &hub.url)], &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("training.push_to_hub") && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(!out.exists(), "no training before the token check");

    let res = dpo_sam(
        &args,
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", TOKEN)],
        &[],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // hub_model_id defaults to output_dir's name under the token's user.
    let files = hub.files("tester/pushed-run", "v1");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "metrics.jsonl",
    ] {
        assert!(files.contains_key(f), "{f} not pushed: {:?}", files.keys());
    }
    assert!(!files.keys().any(|k| k.starts_with("checkpoint-")));
    let card = String::from_utf8(files["README.md"].clone()).unwrap();
    assert!(card.contains("model_id = \"tester/pushed-run\""), "{card}");
    assert!(card.contains("model_name: \"pushed-run\""), "{card}");
    // The saved card names the repository too (the config was resolved before training).
    let local = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert_eq!(local, card);

    // A token the Hub rejects: refused before training.
    let other = tmp.path().join("other");
    let mut bad = args.to_vec();
    let other_s = other.display().to_string();
    bad[5] = &other_s;
    let res = dpo_sam(
        &bad,
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", "hf_wrong")],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("whoami") && err.contains("HTTP 401"), "{err}");
    assert!(!other.exists());

    // An upload refused after training: the model is saved, and the error says how to retry.
    bad.extend(["--set", "training.hub_model_id=\"refused\""]);
    let res = dpo_sam(&bad, &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", TOKEN)], &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("training finished and the model is saved in")
            && err.contains(&format!(
                "dpo-sam push {other_s} --repo tester/refused --revision v1"
            ))
            && err.contains("HTTP 403"),
        "{err}"
    );
    assert!(other.join("model.safetensors").is_file());
}
