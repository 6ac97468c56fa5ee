//! Each CUDA kernel against its CPU twin, wherever a GPU is present: the forward output and
//! every input gradient of each fused op (relative error ≤ 1e-5 in f32, ≤ 1e-2 in bf16 against
//! the twin in f32 on the same bf16-rounded inputs; the fused attention at each mask kind, GQA,
//! head dims 64/80/128, lengths off the tile size and fully masked rows; the tiled output layer
//! with recomputed and kept tiles, and its SAM gradient), a logits-SAM pass of the output layer
//! (what e changes, at most five lm_head GEMMs) and its memory without kept logits, the fused
//! AdamW with the device-side gradient norm against the CPU update, and the device's random
//! initialisation against its host reference. The comparisons are `dpo_sam::gpucheck::ops`,
//! which the shipped binary also runs (`dpo-sam gpu-check --checks ops`, from
//! `scripts/gpu-check.sh`) on GPU machines without a Rust toolchain. Elsewhere this test is
//! skipped with the reason printed: `cargo test --features cuda --test cuda_ops` on a machine
//! with an NVIDIA GPU runs it.

use candle_core::Device;

#[test]
fn cuda_kernels_match_their_cpu_twins() {
    if !candle_core::utils::cuda_is_available() {
        eprintln!("skipping: built without the `cuda` feature (cargo test --features cuda)");
        return;
    }
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping: no usable CUDA device ({e})");
            return;
        }
    };
    let outcomes = dpo_sam::gpucheck::ops::check(&device).expect("the op checks run");
    let mut failed = Vec::new();
    for o in &outcomes {
        let errors: Vec<String> = o.errors.iter().map(|e| format!("{e:.1e}")).collect();
        eprintln!(
            "{:<52} {:<5} launches {:>3}  errors [{}] ≤ {:.0e}{}",
            o.name,
            o.dtype,
            o.launches,
            errors.join(", "),
            o.tolerance,
            o.error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
        if !o.pass {
            failed.push(format!("{} ({})", o.name, o.dtype));
        }
    }
    assert!(
        failed.is_empty(),
        "CUDA kernels differ from their CPU twins: {failed:?}"
    );
}
