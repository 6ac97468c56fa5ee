//! `dpo-sam gpu-check` (hidden from `--help`): what a GPU machine without a Rust toolchain can
//! check with the shipped binary, printed as one JSON object. [`ops`] compares each CUDA kernel
//! with its CPU twin (forward and every gradient, f32 and bf16; the fused optimiser, the device
//! gradient norm and the device initialisation); [`models`] compares whole random-weight models
//! and one logits-SAM training step; [`nccl`] runs data parallelism's path in a world of one
//! process; [`attention`] times the fused attention at Pythia-2.8B's and Mistral-7B's shapes.
//! `scripts/gpu-check.sh` runs them all; `tests/cuda_ops.rs` runs the op checks under `cargo
//! test` wherever a GPU is present.

pub mod attention;
pub mod models;
pub mod nccl;
pub mod ops;

use anyhow::Result;
use serde_json::json;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Check {
    /// Each CUDA kernel against its CPU twin.
    Ops,
    /// Whole models and a training step, CUDA against CPU.
    Models,
    /// NCCL initialised, an all-reduce, and data-parallel training steps against plain ones.
    Nccl,
    /// The fused attention's time at Pythia-2.8B's and Mistral-7B's shapes (not a pass/fail
    /// check: `scripts/torch_attention.py` gives PyTorch SDPA's beside it).
    Attention,
}

#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// The device compared against the CPU.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Which checks to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ops,models")]
    pub checks: Vec<Check>,
    /// Preference pairs in the models' batch.
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Tokens per sequence in the models' batch.
    #[arg(long, default_value_t = 48)]
    pub seq_len: usize,
    /// Largest relative error of the model checks that passes (f32 on both sides; reductions run
    /// in another order). The op checks have their own bounds: 1e-5 in f32, 1e-2 in bf16.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
}

pub fn run(args: GpuCheckArgs) -> Result<()> {
    let device = crate::device::parse(&args.device)?;
    let mut report = json!({ "device": args.device });
    let mut pass = true;
    if args.checks.contains(&Check::Ops) {
        let outcomes = ops::check(&device)?;
        pass &= outcomes.iter().all(|o| o.pass);
        report["ops"] = serde_json::to_value(&outcomes)?;
    }
    if args.checks.contains(&Check::Models) {
        let models = models::check(&args)?;
        pass &= models["pass"] == json!(true);
        report["models"] = models;
    }
    if args.checks.contains(&Check::Nccl) {
        let nccl = nccl::check(&args)?;
        pass &= nccl["pass"] == json!(true);
        report["nccl"] = nccl;
    }
    if args.checks.contains(&Check::Attention) {
        report["attention"] = attention::time(&device, 10)?;
    }
    report["pass"] = json!(pass);
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !pass {
        anyhow::bail!("parity check failed (see the JSON above)");
    }
    Ok(())
}
