//! Under the `cuda` feature, compiles each `src/kernels/cuda/*.cu` to PTX in `OUT_DIR`, which
//! `src/kernels/cuda.rs` embeds and loads through candle's custom-module cache. Without the
//! feature it does nothing, so CPU builds need no CUDA toolchain.
//!
//! nvcc comes from `CUDA_HOME`/`CUDA_PATH` or `PATH` (`scripts/cuda-toolchain.sh` installs one);
//! the target is `CUDA_COMPUTE_CAP` (as for candle's own kernels), else the GPU `nvidia-smi`
//! reports, else 80, whose PTX the driver compiles for any newer GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/kernels/cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    let cap = compute_cap();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("src/kernels/cuda")
        .expect("src/kernels/cuda exists")
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo::rerun-if-changed={}", src.display());
        let stem = src.file_stem().expect("a file name").to_string_lossy();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(
            status.success(),
            "{} failed on {} (exit {status})",
            nvcc.display(),
            src.display()
        );
    }
}

fn nvcc() -> PathBuf {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let nvcc = Path::new(&root).join("bin/nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        return cap.trim().replace('.', "");
    }
    let queried = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().replace('.', "")))
        .filter(|c| !c.is_empty());
    queried.unwrap_or_else(|| "80".to_string())
}
