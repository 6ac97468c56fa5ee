//! Resolving model and dataset names to local files: a local path, or a Hugging Face Hub repo id
//! fetched through `hf-hub` into its usual cache (`HF_HOME`, `HF_HUB_CACHE`), honouring
//! `HF_HUB_OFFLINE=1` (cache only, never the network).

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

/// The Hub cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(PathBuf::from(dir)),
        None => hf_hub::Cache::from_env(),
    }
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
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(true);
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        let api = builder
            .build()
            .context("cannot set up the Hugging Face Hub client")?;
        api.repo(self.repo.clone())
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
