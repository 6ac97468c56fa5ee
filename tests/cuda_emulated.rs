//! The CUDA kernels' arithmetic, checked without a GPU: `tests/cuda_emulation/harness.cpp`
//! compiles every `src/kernels/cuda/*.cu` for the host against a small stand-in for CUDA
//! (`host.h`: each block's threads as OS threads, barriers, warp shuffles through memory) and
//! compares each kernel, at the launch shapes `src/kernels/cuda.rs` uses, with a double-precision
//! reference — rows longer and shorter than a block, column stripes and rows that do not divide
//! evenly, a parameter spanning two optimiser chunks, bf16 storage. It prints the first values of
//! the device random stream, which must be `kernels::init::randn_host`'s. What it cannot check
//! (the Rust launch code, cuBLASLt, real warp scheduling) `tests/cuda_ops.rs` checks on a GPU.
//! Skipped, with the reason printed, where no C++20 compiler is found (`CXX`, else `c++`).

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_match_references_on_the_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let scratch = tempfile::tempdir().unwrap();
    let exe = scratch.path().join("harness");
    let compiled = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-I"])
        .arg(root.join("include"))
        .arg("-o")
        .arg(&exe)
        .arg(root.join("harness.cpp"))
        .output();
    match compiled {
        Err(e) => {
            eprintln!("skipping: no C++ compiler `{cxx}` ({e}); set CXX to a C++20 compiler");
            return;
        }
        Ok(out) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // An old compiler without C++20's <barrier> is a missing tool, not a kernel bug.
            if stderr.contains("barrier") && stderr.contains("No such file") {
                eprintln!("skipping: `{cxx}` has no C++20 <barrier>");
                return;
            }
            panic!("{cxx} failed on the kernels compiled for the host:\n{stderr}");
        }
        Ok(_) => {}
    }
    let out = Command::new(&exe).output().expect("run the harness");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "kernels differ from their references (FAIL lines above)"
    );
    let init: Vec<f32> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("init "))
        .expect("an init line")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let host = dpo_sam::kernels::init::randn_host(99, init.len(), 0.5, 0.02);
    for (k, (a, b)) in init.iter().zip(&host).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "value {k}: kernel {a}, host {b}"
        );
    }
}
