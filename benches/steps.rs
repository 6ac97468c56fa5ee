//! Step time of the built-in tiny GPT-2 for `sam.kind` = none | logits | full, each with the
//! reference log-probs computed on the fly and precomputed (`precompute_ref_log_probs`).
//! Steps of all six variants are interleaved so that machine noise hits them alike; prints
//! medians and ratios to plain DPO with an on-the-fly reference.
//!
//! `cargo bench --profile dev --bench steps` (dependencies are optimised in the dev profile too).

use anyhow::Result;
use dpo_sam::config::Config;
use dpo_sam::data::batch::PreferenceBatch;
use dpo_sam::data::Split;
use dpo_sam::optim::GradAccumulator;
use dpo_sam::train::Trainer;
use std::time::Instant;

const ROUNDS: usize = 15;
const WARMUP: usize = 2;
const PAIRS: usize = 8;

fn config(dir: &std::path::Path, kind: &str, precompute: bool) -> Result<Config> {
    let text = format!(
        r#"
output_dir = {dir:?}
[model]
name_or_path = "builtin:tiny-gpt2"
[data]
train = "builtin:arith"
builtin_pairs = 64
[training]
learning_rate = 1e-4
batch_size = {PAIRS}
precompute_ref_log_probs = {precompute}
[sam]
kind = "{kind}"
rho = 0.05
"#
    );
    Config::parse(&text, "benches/steps.rs", &[])
}

/// One optimiser step on a fixed batch, as the training loop runs it.
fn step(tr: &mut Trainer, batch: &PreferenceBatch, idx: &[usize]) -> Result<f64> {
    let started = Instant::now();
    let reference = tr.reference_for(batch, Some((Split::Train, idx)))?;
    let ms = tr.micro_step_with(batch, reference, Some(1.0))?;
    let mut acc = GradAccumulator::new(tr.policy().params.len());
    acc.add(
        &tr.policy().params,
        ms.grads.as_ref().expect("backward was requested"),
    )?;
    tr.apply_gradients(&acc, 1e-4)?;
    Ok(started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut variants = Vec::new();
    for precompute in [false, true] {
        for kind in ["none", "logits", "full"] {
            let tr = Trainer::new(config(dir.path(), kind, precompute)?)?;
            variants.push((
                format!(
                    "{kind:<6} ref={}",
                    if precompute { "cached" } else { "live  " }
                ),
                tr,
                Vec::new(),
            ));
        }
    }
    let idx: Vec<usize> = (0..PAIRS).collect();
    let pairs = variants[0].1.train_pairs()[..PAIRS].to_vec();
    let batch = PreferenceBatch::new(&pairs, variants[0].1.tok().pad_id, variants[0].1.device())?;
    for round in 0..WARMUP + ROUNDS {
        for (_, tr, times) in variants.iter_mut() {
            let t = step(tr, &batch, &idx)?;
            if round >= WARMUP {
                times.push(t);
            }
        }
    }
    let base = median(variants[0].2.clone());
    println!("tiny GPT-2, {PAIRS} pairs/step, median of {ROUNDS} interleaved steps");
    println!("{:<20} {:>10} {:>8}", "variant", "ms/step", "ratio");
    for (name, _, times) in &variants {
        let m = median(times.clone());
        println!("{name:<20} {:>10.2} {:>8.2}", m * 1e3, m / base);
    }
    Ok(())
}
