//! Data parallelism's GPU path in a world of one process: NCCL initialised, an all-reduce, and
//! training steps through the data-parallel loop against plain ones (on `--device cpu`, the TCP
//! path; `tests/distributed.rs` runs that under `cargo test`).

use super::models::{configs, rel_err};
use super::GpuCheckArgs;
use crate::config::Config;
use crate::train::Trainer;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

/// Data parallelism's GPU path in a world of one process: NCCL's communicator initialised from
/// a unique id sent over the TCP links, an all-reduce (over one rank, the tensor itself, bit for
/// bit), and `steps` training steps of the GPT-2 of [`configs`] through the data-parallel loop
/// (each step's report exchanged, the gradients summed by NCCL in buckets) against the same
/// steps in a plain process: the same weights.
pub fn check(args: &GpuCheckArgs) -> Result<Value> {
    let device = crate::device::parse(&args.device)?;
    let timeout = std::time::Duration::from_secs(120);
    let world = crate::dist::on_device(crate::dist::world_of_one(timeout), &device, timeout)
        .context("initialising the collective")?;
    let x = Tensor::randn(0f32, 1.0, (4, 1000), &device)?;
    let sum = world.all_reduce_sum(&x)?;
    let all_reduce_exact = sum.dims() == x.dims() && rel_err(&x, &sum)? == 0.0;

    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let path = scratch.path().join("config.json");
    std::fs::write(&path, configs()[0].1.to_string())?;
    let steps = 2;
    let train = |name: &str,
                 world: Option<Box<dyn crate::dist::Collective>>|
     -> Result<Vec<Tensor>> {
        let toml = format!(
            "output_dir = {out:?}\ndevice = {device:?}\n[model]\nname_or_path = {model:?}\n\
             [data]\ntrain = \"builtin:arith\"\nbuiltin_pairs = 16\n[training]\nlearning_rate = 1e-3\n\
             batch_size = {batch}\nmicro_batch_size = {pairs}\nmax_steps = {steps}\nddp_bucket_cap_mb = 1\n\
             [sam]\nkind = \"logits\"\nrho = 0.05\n",
            out = scratch.path().join(name).display().to_string(),
            device = args.device,
            model = format!("random:{}", path.display()),
            batch = 2 * args.pairs,
            pairs = args.pairs,
        );
        let cfg = Config::parse(&toml, "gpu-check --checks nccl", &[])?;
        let mut trainer = match world {
            Some(world) => Trainer::new_in(cfg, world)?,
            None => Trainer::new(cfg)?,
        };
        trainer.train()?;
        trainer
            .policy()
            .params
            .iter()
            .map(|p| Ok(p.var.as_tensor().to_device(&Device::Cpu)?))
            .collect()
    };
    let plain = train("plain", None).context("plain steps")?;
    let parallel = train("parallel", Some(crate::dist::world_of_one(timeout)))
        .context("steps through the data-parallel path")?;
    let (mut worst, mut exact) = (0f64, true);
    for (a, b) in plain.iter().zip(&parallel) {
        worst = worst.max(rel_err(a, b)?);
        exact &= a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?;
    }
    Ok(json!({
        "device": args.device,
        "backend": if device.is_cuda() { "nccl" } else { "tcp" },
        "init": true,
        "all_reduce_exact": all_reduce_exact,
        "steps": steps,
        "weights_worst_rel_err": worst,
        "weights_bit_identical": exact,
        "pass": all_reduce_exact && worst <= 1e-6,
    }))
}
