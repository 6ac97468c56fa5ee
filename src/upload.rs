//! Uploading a directory to a Hugging Face Hub model repository over the Hub's HTTP API, the
//! calls `huggingface_hub`'s `upload_folder` makes: create the repository (and the branch),
//! ask `preupload` which files are LFS, send those through the LFS batch API (one PUT, or the
//! Hub's multipart transfer for large files, then verify), and make one commit (NDJSON) with
//! the small files inline. `HF_TOKEN` (or `huggingface-cli login`'s token) authenticates;
//! `HF_ENDPOINT` redirects every call (mirrors, and the stand-in server of the tests).
//!
//! Not through `hf-hub`: its 0.4 releases cannot upload, and its 1.0 upload sends large files
//! only through the Xet storage protocol (falling back to inline base64, which the Hub refuses
//! above 10 MB) on top of tokio, reqwest and aws-lc — about 130 more crates, a C build, and a
//! protocol no local stand-in can check. These few calls on the `ureq` client the project
//! already uses are the LFS route every Hub client still supports.

use crate::progress::{self, Unit};
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Preupload and LFS batch requests carry at most this many files (as `huggingface_hub`).
const CHUNK: usize = 256;
/// Bytes of each file the preupload call sees.
const SAMPLE: usize = 512;
const LFS_JSON: &str = "application/vnd.git-lfs+json";

/// One file to commit.
#[derive(Debug, Clone)]
pub struct Upload {
    /// Path in the repository, `/`-separated.
    pub path_in_repo: String,
    pub content: Content,
}

#[derive(Debug, Clone)]
pub enum Content {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Content {
    fn size(&self) -> Result<u64> {
        match self {
            Content::File(p) => Ok(std::fs::metadata(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .len()),
            Content::Bytes(b) => Ok(b.len() as u64),
        }
    }

    /// The bytes from `offset`, at most `len` of them.
    fn reader(&self, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        match self {
            Content::File(p) => {
                let mut f = std::fs::File::open(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                f.seek(SeekFrom::Start(offset))?;
                Ok(Box::new(f.take(len)))
            }
            Content::Bytes(b) => {
                let start = (offset as usize).min(b.len());
                let end = (start + len as usize).min(b.len());
                Ok(Box::new(std::io::Cursor::new(b[start..end].to_vec())))
            }
        }
    }

    fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.reader(0, u64::MAX)?.read_to_end(&mut out)?;
        Ok(out)
    }

    fn sha256(&self) -> Result<String> {
        let mut h = Sha256::new();
        std::io::copy(&mut self.reader(0, u64::MAX)?, &mut h)?;
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// Whether a model directory's entry stays local: checkpoints (`checkpoint-*/`), leftovers of
/// interrupted writes (`*.tmp`, `*.old`), the reference log-prob and CHES caches
/// (`ref_logps-*`, `ches-*`: `refcache` checks its names against this) and hidden files —
/// what `Trainer.push_to_hub` leaves out too.
pub fn left_out(name: &str) -> bool {
    name.starts_with('.')
        || ["checkpoint-", "ref_logps-", "ches-"]
            .iter()
            .any(|p| name.starts_with(p))
        || name.ends_with(".tmp")
        || name.ends_with(".old")
}

/// The files of a model directory to push, sorted: all but those [`left_out`].
pub fn folder_files(dir: &Path) -> Result<Vec<Upload>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Upload>) -> Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            if left_out(&name) {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out)?;
            } else if path.is_file() {
                let rel = path.strip_prefix(root).expect("walked from root");
                out.push(Upload {
                    path_in_repo: rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/"),
                    content: Content::File(path.clone()),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path_in_repo.cmp(&b.path_in_repo));
    Ok(out)
}

/// Where a commit landed.
#[derive(Debug, Clone)]
pub struct Commit {
    pub url: String,
    pub oid: String,
}

/// An authenticated client of one Hub endpoint.
pub struct Client {
    endpoint: String,
    token: String,
    agent: ureq::Agent,
}

/// `%`-encodes all but unreserved characters (`quote(s, safe="")`): revisions in URL paths.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    /// A client of `HF_ENDPOINT` with `HF_TOKEN`; a clear error when there is no token.
    pub fn from_env() -> Result<Client> {
        let token = crate::hub::token().ok_or_else(|| {
            anyhow!(
                "no Hugging Face token: set HF_TOKEN to a token with write access \
                 (https://huggingface.co/settings/tokens) or run `huggingface-cli login`"
            )
        })?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .user_agent(concat!("dpo-sam/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            endpoint: crate::hub::endpoint(),
            token,
            agent,
        })
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Sends a request made by `request` (again for each attempt). Connection failures, 429
    /// and 5xx answers are retried twice when `retry`, after about 1 and 2 seconds (jittered) or
    /// the `Retry-After` the Hub asks for, at most a minute; statuses in
    /// `fine` count as success; other answers of 400 and above are errors quoting the Hub's
    /// message.
    fn send(
        &self,
        what: &str,
        retry: bool,
        fine: &[u16],
        request: impl Fn() -> Result<std::result::Result<ureq::Response, ureq::Error>>,
    ) -> Result<ureq::Response> {
        let attempts: u32 = if retry { 3 } else { 1 };
        for attempt in 1..=attempts {
            let (transient, wait) = match request()? {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(code, resp)) if fine.contains(&code) => return Ok(resp),
                Err(ureq::Error::Status(code, resp)) if code == 429 || code >= 500 => {
                    let wait = crate::retry::retry_after(&resp);
                    (format!("HTTP {code}: {}", hub_message(resp)), wait)
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let hint = match code {
                        401 | 403 => " (is HF_TOKEN valid, with write access to this repository?)",
                        _ => "",
                    };
                    bail!(
                        "the Hub refused {what}: HTTP {code}: {}{hint}",
                        hub_message(resp)
                    );
                }
                Err(e) => (format!("{e}"), None),
            };
            if attempt == attempts {
                bail!("{what} failed at {}: {transient}", self.endpoint);
            }
            let base = Duration::from_millis(500);
            std::thread::sleep(crate::retry::backoff(base, attempt, wait));
        }
        unreachable!("the last attempt returns")
    }

    /// POSTs JSON with the token and parses the JSON answer.
    fn post_json(&self, what: &str, url: &str, body: &Value) -> Result<Value> {
        let resp = self.send(what, true, &[], || {
            Ok(self
                .agent
                .post(url)
                .set("Authorization", &self.auth())
                .send_json(body))
        })?;
        resp.into_json()
            .with_context(|| format!("{what}: the Hub's answer is not JSON"))
    }

    /// The token's user name.
    pub fn whoami(&self) -> Result<String> {
        let url = format!("{}/api/whoami-v2", self.endpoint);
        let resp = self.send("the token check (whoami)", true, &[], || {
            Ok(self
                .agent
                .get(&url)
                .set("Authorization", &self.auth())
                .call())
        })?;
        let v: Value = resp.into_json().context("whoami: the answer is not JSON")?;
        v.get("name")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| anyhow!("whoami: the Hub's answer has no user name"))
    }

    /// `NAME` → `<user>/NAME` (the token's user); `ORG/NAME` as given.
    pub fn full_repo_id(&self, id: &str) -> Result<String> {
        match id.contains('/') {
            true => Ok(id.to_string()),
            false => Ok(format!("{}/{id}", self.whoami()?)),
        }
    }

    /// Creates the model repository; one that already exists is fine.
    pub fn create_repo(&self, repo_id: &str, private: bool) -> Result<()> {
        let (org, name) = repo_id.split_once('/').unwrap_or(("", repo_id));
        let mut body = json!({"name": name, "organization": org, "type": "model"});
        if private {
            body["visibility"] = "private".into();
        }
        let url = format!("{}/api/repos/create", self.endpoint);
        let what = format!("creating the repository {repo_id}");
        // 409: it exists.
        self.send(&what, true, &[409], || {
            Ok(self
                .agent
                .post(&url)
                .set("Authorization", &self.auth())
                .send_json(&body))
        })?;
        Ok(())
    }

    /// Creates `branch` from the default branch; one that already exists is fine.
    pub fn create_branch(&self, repo_id: &str, branch: &str) -> Result<()> {
        let url = format!(
            "{}/api/models/{repo_id}/branch/{}",
            self.endpoint,
            encode(branch)
        );
        // 409: it exists.
        self.send(
            &format!("creating the branch {branch}"),
            true,
            &[409],
            || {
                Ok(self
                    .agent
                    .post(&url)
                    .set("Authorization", &self.auth())
                    .send_json(json!({})))
            },
        )?;
        Ok(())
    }

    /// Creates the repository (and the branch, unless `main`) and commits `files` to it.
    pub fn upload(
        &self,
        repo_id: &str,
        revision: &str,
        private: bool,
        files: &[Upload],
        message: &str,
    ) -> Result<Commit> {
        self.create_repo(repo_id, private)?;
        if revision != "main" {
            self.create_branch(repo_id, revision)?;
        }
        self.commit(repo_id, revision, files, message)
    }

    /// Uploads a model directory ([`folder_files`]) to `repo` (under the token's user when
    /// bare) on `revision`, its `README.md` as `readme(text, repo)` makes it; returns the
    /// commit's URL. Nothing local changes, whatever happens.
    pub fn push_model_dir(
        &self,
        dir: &Path,
        repo: &str,
        private: bool,
        revision: &str,
        message: &str,
        readme: fn(&str, &str) -> String,
    ) -> Result<String> {
        if !dir.join("config.json").is_file() {
            bail!(
                "{}: not a model directory (no config.json); push a run's output_dir or one of its checkpoints",
                dir.display()
            );
        }
        let repo = self.full_repo_id(repo)?;
        let mut files = folder_files(dir)?;
        for f in files.iter_mut().filter(|f| f.path_in_repo == "README.md") {
            let text = String::from_utf8(f.content.read_all()?)
                .with_context(|| format!("{}/README.md: not UTF-8", dir.display()))?;
            f.content = Content::Bytes(readme(&text, &repo).into_bytes());
        }
        let commit = self
            .upload(&repo, revision, private, &files, message)
            .with_context(|| {
                format!(
                    "pushing {} to {repo} failed; nothing local was changed",
                    dir.display()
                )
            })?;
        eprintln!(
            "pushed {} files of {} to {repo} ({revision})",
            files.len(),
            dir.display()
        );
        Ok(match commit.url.is_empty() {
            true => format!("{}/{repo}", self.endpoint),
            false => commit.url,
        })
    }

    /// One commit of `files` on `revision`: LFS files uploaded first, the rest inline.
    pub fn commit(
        &self,
        repo_id: &str,
        revision: &str,
        files: &[Upload],
        message: &str,
    ) -> Result<Commit> {
        let rev = encode(revision);
        let sizes = files
            .iter()
            .map(|f| f.content.size())
            .collect::<Result<Vec<u64>>>()?;
        // Which files go through LFS, and which the repository's .gitignore drops.
        let mut modes: Vec<(bool, bool)> = Vec::with_capacity(files.len());
        for (chunk, chunk_sizes) in files.chunks(CHUNK).zip(sizes.chunks(CHUNK)) {
            let entries = chunk
                .iter()
                .zip(chunk_sizes)
                .map(|(f, size)| {
                    let mut sample = Vec::new();
                    f.content
                        .reader(0, SAMPLE as u64)?
                        .read_to_end(&mut sample)?;
                    Ok(json!({
                        "path": f.path_in_repo,
                        "sample": base64::engine::general_purpose::STANDARD.encode(&sample),
                        "size": size,
                    }))
                })
                .collect::<Result<Vec<Value>>>()?;
            let url = format!("{}/api/models/{repo_id}/preupload/{rev}", self.endpoint);
            let answer = self.post_json("the preupload check", &url, &json!({"files": entries}))?;
            let listed = answer
                .get("files")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("preupload: the Hub's answer lists no files"))?;
            for (f, size) in chunk.iter().zip(chunk_sizes) {
                let info = listed
                    .iter()
                    .find(|i| i.get("path").and_then(Value::as_str) == Some(&f.path_in_repo))
                    .ok_or_else(|| anyhow!("preupload: no answer for {}", f.path_in_repo))?;
                // Empty files cannot be LFS objects.
                let lfs =
                    info.get("uploadMode").and_then(Value::as_str) == Some("lfs") && *size > 0;
                let ignore = info.get("shouldIgnore").and_then(Value::as_bool) == Some(true);
                modes.push((lfs, ignore));
            }
        }
        let lfs: Vec<usize> = (0..files.len())
            .filter(|&i| modes[i].0 && !modes[i].1)
            .collect();
        let mut oids: Vec<Option<String>> = vec![None; files.len()];
        for &i in &lfs {
            oids[i] = Some(files[i].content.sha256()?);
        }
        let total: u64 = lfs.iter().map(|&i| sizes[i]).sum();
        let bar = progress::bar("uploading", total, Unit::Bytes);
        for batch in lfs.chunks(CHUNK) {
            self.lfs_upload(repo_id, revision, files, &sizes, &oids, batch, &bar)?;
        }
        bar.finish_and_clear();

        let mut body = Vec::new();
        let header = json!({"key": "header", "value": {"summary": message, "description": ""}});
        body.extend(serde_json::to_vec(&header)?);
        body.push(b'\n');
        for (i, f) in files.iter().enumerate() {
            let line = match (&oids[i], modes[i].1) {
                (_, true) => continue,
                (Some(oid), _) => json!({"key": "lfsFile", "value": {
                    "path": f.path_in_repo, "algo": "sha256", "oid": oid, "size": sizes[i],
                }}),
                (None, _) => json!({"key": "file", "value": {
                    "content": base64::engine::general_purpose::STANDARD.encode(f.content.read_all()?),
                    "path": f.path_in_repo,
                    "encoding": "base64",
                }}),
            };
            body.extend(serde_json::to_vec(&line)?);
            body.push(b'\n');
        }
        let url = format!("{}/api/models/{repo_id}/commit/{rev}", self.endpoint);
        // Not retried: a commit whose answer was lost may have landed.
        let resp = self.send("the commit", false, &[], || {
            Ok(self
                .agent
                .post(&url)
                .set("Authorization", &self.auth())
                .set("Content-Type", "application/x-ndjson")
                .send_bytes(&body))
        })?;
        let v: Value = resp
            .into_json()
            .context("commit: the Hub's answer is not JSON")?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(Commit {
            url: field("commitUrl"),
            oid: field("commitOid"),
        })
    }

    /// Uploads the LFS files `batch` (indices into `files`) that the Hub does not have yet.
    #[allow(clippy::too_many_arguments)]
    fn lfs_upload(
        &self,
        repo_id: &str,
        revision: &str,
        files: &[Upload],
        sizes: &[u64],
        oids: &[Option<String>],
        batch: &[usize],
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let objects: Vec<Value> = batch
            .iter()
            .map(|&i| json!({"oid": oids[i], "size": sizes[i]}))
            .collect();
        let url = format!("{}/{repo_id}.git/info/lfs/objects/batch", self.endpoint);
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": objects,
            "hash_algo": "sha256",
            "ref": {"name": revision},
        });
        let resp = self.send("the LFS batch request", true, &[], || {
            Ok(self
                .agent
                .post(&url)
                .set("Authorization", &self.auth())
                .set("Accept", LFS_JSON)
                .set("Content-Type", LFS_JSON)
                .send_string(&body.to_string()))
        })?;
        let answer: Value = resp
            .into_json()
            .context("LFS batch: the answer is not JSON")?;
        let listed = answer
            .get("objects")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("LFS batch: the Hub's answer lists no objects"))?;
        for &i in batch {
            let oid = oids[i].as_deref().expect("LFS files have an oid");
            let path = &files[i].path_in_repo;
            let object = listed
                .iter()
                .find(|o| o.get("oid").and_then(Value::as_str) == Some(oid))
                .ok_or_else(|| anyhow!("LFS batch: no answer for {path}"))?;
            if let Some(err) = object.get("error") {
                bail!("the Hub refused the LFS upload of {path}: {err}");
            }
            // No actions: the Hub already has these bytes.
            let Some(actions) = object.get("actions") else {
                bar.inc(sizes[i]);
                continue;
            };
            let upload = actions
                .get("upload")
                .ok_or_else(|| anyhow!("LFS batch: no upload action for {path}"))?;
            let href = upload
                .get("href")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("LFS batch: no upload URL for {path}"))?;
            let header = upload.get("header").and_then(Value::as_object);
            let chunk_size = header
                .and_then(|h| h.get("chunk_size"))
                .map(|c| {
                    c.as_str()
                        .and_then(|s| s.parse::<u64>().ok())
                        .or(c.as_u64())
                        .filter(|&n| n > 0)
                        .ok_or_else(|| anyhow!("LFS batch: bad chunk_size {c} for {path}"))
                })
                .transpose()?;
            let content = &files[i].content;
            match (chunk_size, header) {
                (Some(chunk), Some(header)) => {
                    self.multipart(path, content, sizes[i], oid, href, header, chunk, bar)?
                }
                _ => {
                    let what = format!("the upload of {path}");
                    self.send(&what, true, &[], || {
                        let mut req = self
                            .agent
                            .put(href)
                            .set("Content-Length", &sizes[i].to_string());
                        for (k, v) in header.into_iter().flatten() {
                            req = req.set(k, v.as_str().unwrap_or_default());
                        }
                        Ok(req.send(bar.wrap_read(content.reader(0, sizes[i])?)))
                    })?;
                }
            }
            if let Some(verify) = actions.get("verify").and_then(|v| v.get("href")) {
                let href = verify
                    .as_str()
                    .ok_or_else(|| anyhow!("LFS batch: bad verify URL for {path}"))?;
                self.post_json(
                    &format!("the verification of {path}"),
                    href,
                    &json!({"oid": oid, "size": sizes[i]}),
                )?;
            }
        }
        Ok(())
    }

    /// The Hub's multipart transfer: each part PUT to its own URL (`header["00001"]`, …), then
    /// the parts' ETags POSTed to `href`.
    #[allow(clippy::too_many_arguments)]
    fn multipart(
        &self,
        path: &str,
        content: &Content,
        size: u64,
        oid: &str,
        href: &str,
        header: &serde_json::Map<String, Value>,
        chunk: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let mut parts: Vec<(u64, &str)> = header
            .iter()
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?)))
            .collect();
        parts.sort();
        if parts.len() as u64 != size.div_ceil(chunk) {
            bail!(
                "LFS multipart: {} part URLs for {path} ({size} bytes in parts of {chunk})",
                parts.len()
            );
        }
        let mut etags = Vec::with_capacity(parts.len());
        for (n, (number, url)) in parts.iter().enumerate() {
            let offset = n as u64 * chunk;
            let len = chunk.min(size - offset);
            let what = format!("part {number} of {path}");
            let resp = self.send(&what, true, &[], || {
                Ok(self
                    .agent
                    .put(url)
                    .set("Content-Length", &len.to_string())
                    .send(bar.wrap_read(content.reader(offset, len)?)))
            })?;
            let etag = resp
                .header("ETag")
                .filter(|e| !e.is_empty())
                .ok_or_else(|| anyhow!("{what}: the storage returned no ETag"))?;
            etags.push(json!({"partNumber": number, "etag": etag}));
        }
        let body = json!({"oid": oid, "parts": etags});
        self.send(
            &format!("completing the upload of {path}"),
            true,
            &[],
            || {
                Ok(self
                    .agent
                    .post(href)
                    .set("Accept", LFS_JSON)
                    .set("Content-Type", LFS_JSON)
                    .send_string(&body.to_string()))
            },
        )?;
        Ok(())
    }
}

/// The Hub's reason for an error: `X-Error-Message`, else the JSON `error`, else the body.
fn hub_message(resp: ureq::Response) -> String {
    if let Some(m) = resp.header("X-Error-Message") {
        return m.to_string();
    }
    let text = resp.into_string().unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v.get("error").is_some() => match &v["error"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        },
        _ => text.chars().take(500).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_encoded_whole() {
        assert_eq!(encode("main"), "main");
        assert_eq!(encode("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode("a b"), "a%20b");
    }

    #[test]
    fn folder_files_leave_out_checkpoints_caches_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "config.json",
            "README.md",
            "runs/Dec01_host/events.out.tfevents.1.host.2.0",
            "checkpoint-3/model.safetensors",
            "ref_logps-abc.safetensors",
            "ches-abc.safetensors",
            "model.safetensors.tmp",
            ".hidden",
        ] {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), f).unwrap();
        }
        let names: Vec<String> = folder_files(d)
            .unwrap()
            .into_iter()
            .map(|u| u.path_in_repo)
            .collect();
        assert_eq!(
            names,
            [
                "README.md",
                "config.json",
                "runs/Dec01_host/events.out.tfevents.1.host.2.0"
            ]
        );
    }
}
