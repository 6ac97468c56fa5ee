//! `dpo-sam gpu-check`: CUDA-vs-CPU parity of one random-weight model per architecture (GPT-2,
//! GPT-NeoX, Mistral): logits, per-sequence log-probs, the DPO loss and one logits-SAM training
//! step's gradients, printed as JSON. `scripts/gpu-check.sh` runs it on a rented GPU, where no
//! Rust toolchain exists to run the test suite. With `--nccl`, data parallelism's GPU path in a
//! world of one process instead (see [`nccl_check`]).

use crate::config::Config;
use crate::train::Trainer;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// The device compared against the CPU.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Preference pairs in the batch.
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 48)]
    pub seq_len: usize,
    /// Largest relative error that passes (f32 on both sides; reductions run in another order).
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    /// Check data parallelism's NCCL path in a world of one process instead: initialisation, an
    /// all-reduce, and training steps against plain ones (on `--device cpu`, the TCP path).
    #[arg(long)]
    pub nccl: bool,
}

/// Tiny configs that still exercise each architecture's distinctive parts: tied embeddings
/// (GPT-2), partial rotary with parallel residual (GPT-NeoX), grouped-query attention with a
/// sliding window shorter than the sequence (Mistral).
fn configs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "gpt2",
            json!({"model_type": "gpt2", "vocab_size": 1024, "n_embd": 64, "n_head": 4, "n_layer": 2,
                   "n_positions": 128, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                   "tie_word_embeddings": true}),
        ),
        (
            "gpt_neox",
            json!({"model_type": "gpt_neox", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "intermediate_size": 256, "rotary_pct": 0.25,
                   "rotary_emb_base": 10000, "max_position_embeddings": 128, "layer_norm_eps": 1e-5,
                   "use_parallel_residual": true, "hidden_act": "gelu", "tie_word_embeddings": false}),
        ),
        (
            "mistral",
            json!({"model_type": "mistral", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                   "sliding_window": 16, "hidden_act": "silu", "tie_word_embeddings": false}),
        ),
    ]
}

pub fn run(args: GpuCheckArgs) -> Result<()> {
    let report = match args.nccl {
        true => nccl_check(&args)?,
        false => check(&args)?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report["pass"] != json!(true) {
        anyhow::bail!("check failed (see the JSON above)");
    }
    Ok(())
}

/// Data parallelism's GPU path in a world of one process: NCCL's communicator initialised from
/// a unique id sent over the TCP links, an all-reduce (over one rank, the tensor itself, bit for
/// bit), and `steps` training steps of the GPT-2 of [`configs`] through the data-parallel loop
/// (each step's report exchanged, the gradients summed by NCCL in buckets) against the same
/// steps in a plain process: the same weights.
fn nccl_check(args: &GpuCheckArgs) -> Result<Value> {
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
        let cfg = Config::parse(&toml, "gpu-check --nccl", &[])?;
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

/// One model's outputs on one device, all moved to the CPU.
struct Outputs {
    logits: Tensor,
    logps: Vec<f32>,
    loss: f64,
    grads: Vec<(String, Option<Tensor>)>,
}

fn outputs(config: &Value, device: &str, args: &GpuCheckArgs) -> Result<Outputs> {
    let scratch = tempfile::tempdir().context("cannot create a scratch directory")?;
    let path = scratch.path().join("config.json");
    std::fs::write(&path, config.to_string())?;
    let toml = format!(
        "output_dir = {out:?}\ndevice = {device:?}\n[model]\nname_or_path = {model:?}\n\
         [data]\ntrain = \"builtin:arith\"\nbuiltin_pairs = 8\n[training]\nlearning_rate = 1e-6\nbatch_size = {pairs}\n[sam]\nkind = \"logits\"\nrho = 0.05\n",
        out = scratch.path().display().to_string(),
        model = format!("random:{}", path.display()),
        pairs = args.pairs,
    );
    let trainer = Trainer::new(Config::parse(&toml, "gpu-check", &[])?)?;
    let head = trainer.policy().net.output_layer();
    let batch = crate::bench::random_batch(
        args.pairs,
        args.seq_len,
        head.vocab_size()?,
        trainer.tok().pad_id,
        trainer.device(),
    )?;
    let h = trainer.policy().net.forward_hidden(&batch.input_ids)?;
    let (rows, t, hidden) = h.dims3()?;
    let logits = head
        .logits(&h.reshape((rows * t, hidden))?, None)?
        .to_device(&Device::Cpu)?;
    let ms = trainer.micro_step(&batch, Some(1.0))?;
    let store = ms.grads.as_ref().expect("backward requested");
    let grads = trainer
        .policy()
        .params
        .iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                store
                    .get(p.var.as_tensor())
                    .map(|g| g.to_device(&Device::Cpu))
                    .transpose()?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let logps = ms
        .chosen_logps
        .iter()
        .chain(&ms.rejected_logps)
        .copied()
        .collect();
    Ok(Outputs {
        logits,
        logps,
        loss: ms.loss,
        grads,
    })
}

/// ‖a − b‖ / ‖a‖ (‖a − b‖ when a is zero).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

fn check(args: &GpuCheckArgs) -> Result<Value> {
    crate::device::parse(&args.device)?;
    let mut models = Vec::new();
    let mut all_pass = true;
    for (arch, config) in configs() {
        let cpu = outputs(&config, "cpu", args).with_context(|| format!("{arch} on cpu"))?;
        let dev = outputs(&config, &args.device, args)
            .with_context(|| format!("{arch} on {}", args.device))?;
        let logits = rel_err(&cpu.logits, &dev.logits)?;
        let logps = rel_err(
            &Tensor::new(cpu.logps.as_slice(), &Device::Cpu)?,
            &Tensor::new(dev.logps.as_slice(), &Device::Cpu)?,
        )?;
        let loss = (cpu.loss - dev.loss).abs() / cpu.loss.abs().max(1e-12);
        let mut worst = (String::new(), 0f64);
        let mut missing = Vec::new();
        for ((name, a), (_, b)) in cpu.grads.iter().zip(&dev.grads) {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let e = rel_err(a, b)?;
                    if e > worst.1 || e.is_nan() {
                        worst = (name.clone(), e);
                    }
                }
                (None, None) => {}
                _ => missing.push(name.clone()),
            }
        }
        let pass = [logits, logps, loss, worst.1]
            .iter()
            .all(|e| *e <= args.tolerance)
            && missing.is_empty();
        all_pass &= pass;
        models.push(json!({
            "arch": arch,
            "pass": pass,
            "logits_rel_err": logits,
            "logps_rel_err": logps,
            "loss_cpu": cpu.loss,
            "loss_device": dev.loss,
            "loss_rel_err": loss,
            "grad_worst_rel_err": worst.1,
            "grad_worst_param": worst.0,
            "grads_present_on_one_side_only": missing,
        }));
    }
    Ok(json!({
        "device": args.device,
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "tolerance": args.tolerance,
        "pass": all_pass,
        "models": models,
    }))
}
