//! Resolving model and dataset names to local files: a local path, or a Hugging Face Hub repo id
//! fetched through `hf-hub` into its usual cache (`HF_HOME`, `HF_HUB_CACHE`), honouring
//! `HF_HUB_OFFLINE=1` (cache only, never the network) and `HF_ENDPOINT`. Downloads show
//! `hf-hub`'s progress bar (bytes, rate, ETA) on stderr when it is a terminal. Also the
//! endpoint, token and name rules that uploads (`upload`) share.

use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::PathBuf;

/// True when `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) is set to a true value.
pub fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
    })
}

/// The Hub's address: `HF_ENDPOINT` (a mirror, or a stand-in server in tests), else
/// `https://huggingface.co`, without a trailing `/`.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

/// The access token: `HF_TOKEN`, else the file `huggingface-cli login` writes
/// (`$HF_HOME/token`).
pub fn token() -> Option<String> {
    std::env::var("HF_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .or_else(|| hf_hub::Cache::from_env().token())
}

/// The Hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        None => hf_hub::Cache::from_env(),
    }
}

/// A client for the Hub at [`endpoint`] with [`token`], downloading into [`cache`].
pub fn api() -> Result<hf_hub::api::sync::Api> {
    hf_hub::api::sync::ApiBuilder::from_cache(cache())
        .with_progress(true)
        .with_endpoint(endpoint())
        .with_token(token())
        .build()
        .context("cannot set up the Hugging Face Hub client")
}

/// A Hub repository, addressed as `org/name` or `org/name@revision`.
pub struct HubRepo {
    repo: Repo,
    id: String,
}

impl HubRepo {
    pub fn model(spec: &str) -> Self {
        Self::new(spec, RepoType::Model)
    }

    pub fn dataset(spec: &str) -> Self {
        Self::new(spec, RepoType::Dataset)
    }

    fn new(spec: &str, kind: RepoType) -> Self {
        let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
        Self {
            repo: Repo::with_revision(id.to_string(), kind, revision.to_string()),
            id: spec.to_string(),
        }
    }

    /// A file of the repository: from the cache, else (when online) downloaded into it.
    pub fn get(&self, filename: &str) -> Result<PathBuf> {
        let cache = cache();
        if let Some(path) = cache.repo(self.repo.clone()).get(filename) {
            return Ok(path);
        }
        if offline() {
            bail!(
                "`{}`: `{filename}` is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; \
                 download it on a connected machine or point the config at a local directory",
                self.id,
                cache.path().display()
            );
        }
        api()?
            .repo(self.repo.clone())
            .get(filename)
            .with_context(|| format!("cannot fetch `{filename}` from the Hub repo `{}`", self.id))
    }

    /// Like [`HubRepo::get`] but `None` when the repository has no such file.
    pub fn get_optional(&self, filename: &str) -> Option<PathBuf> {
        self.get(filename).ok()
    }
}

/// Whether `spec` looks like a Hub repo id (`org/name`, optional `@rev`) rather than a path.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let id = spec.split('@').next().unwrap_or(spec);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
        && !std::path::Path::new(spec).exists()
}

/// A repository name to create: `ORG/NAME`, or (`bare_ok`) `NAME` under the token's user;
/// each part letters, digits, `-`, `_` and `.`, not starting with `-` or `.`, at most 96.
pub fn check_repo_name(id: &str, bare_ok: bool) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['-', '.'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let shape_ok = parts.len() == 2 || (bare_ok && parts.len() == 1);
    if !shape_ok || !parts.iter().all(|p| part_ok(p)) {
        let shape = if bare_ok {
            "`NAME` or `ORG/NAME`"
        } else {
            "`ORG/NAME`"
        };
        bail!("expected {shape} (letters, digits, `-`, `_`, `.`), got `{id}`");
    }
    Ok(())
}

/// A branch name as git accepts it, roughly: no spaces or control characters, no `..`, not
/// starting or ending with `/`.
pub fn check_branch(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.contains("..")
        || name.starts_with('/')
        || name.ends_with('/')
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c));
    if bad {
        bail!("expected a branch name, got `{name}`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("EleutherAI/pythia-70m"));
        assert!(looks_like_repo_id("EleutherAI/pythia-70m@step1000"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path/to/model"));
        assert!(!looks_like_repo_id("src"));
    }

    #[test]
    fn offline_and_uncached_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: env changes in tests are confined to variables only this test reads.
        unsafe {
            std::env::set_var("HF_HUB_OFFLINE", "1");
            std::env::set_var("HF_HOME", dir.path());
            std::env::remove_var("HF_HUB_CACHE");
        }
        let err = HubRepo::model("nobody/nothing")
            .get("config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") && err.contains("nobody/nothing"),
            "{err}"
        );
    }
}
