//! `dpo-sam push`: uploads a saved model directory (a run's `output_dir` or one checkpoint) to
//! a Hub model repository, creating it (and the branch) if needed; what
//! `training.push_to_hub` does at the end of a run. The card's loading snippet is pointed at
//! the repository in the uploaded copy; nothing local is changed.

use crate::upload::Client;
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Needs HF_TOKEN (or `huggingface-cli login`); HF_ENDPOINT points at another Hub.\n\
                  Checkpoints (checkpoint-*/), the reference log-probs cache and *.tmp leftovers \
                  stay local.\n\nExample:\n  dpo-sam push runs/hh --repo my-org/pythia-hh-dpo-sam --private"
)]
pub struct PushArgs {
    /// The model directory: config.json and weights (a run's output_dir, or a checkpoint).
    pub dir: PathBuf,
    /// The Hub repository: `ORG/NAME`, or `NAME` under the token's user.
    #[arg(long)]
    pub repo: String,
    /// Create the repository as private (an existing one keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// Branch to commit to, created from `main` if missing.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Commit message.
    #[arg(long, default_value = "Upload model trained with dpo-sam")]
    pub message: String,
}

pub fn run(args: PushArgs) -> Result<()> {
    crate::hub::check_repo_name(&args.repo, true).context("--repo")?;
    crate::hub::check_branch(&args.revision).context("--revision")?;
    let client = Client::from_env()?;
    let url = client.push_model_dir(
        &args.dir,
        &args.repo,
        args.private,
        &args.revision,
        &args.message,
        crate::card::with_repo_id,
    )?;
    println!("{url}");
    Ok(())
}
