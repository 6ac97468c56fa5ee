//! The CUDA kernels' arithmetic, checked without a GPU: `tests/cuda_emulation/harness.cpp`
//! compiles every `src/kernels/cuda/*.cu` for the host against a small stand-in for CUDA
//! (`host.h`: each block's threads as OS threads, barriers, warp shuffles through memory) and
//! compares each kernel, at the launch shapes `src/kernels/cuda.rs` uses, with a double-precision
//! reference — rows longer and shorter than a block, column stripes and rows that do not divide
//! evenly, a parameter spanning two optimiser chunks, the output layer's ragged vocabulary
//! tiles, bf16 storage. It prints the first values of
//! the device random stream, which must be `kernels::init::randn_host`'s. What it cannot check
//! (the Rust launch code, cuBLASLt, real warp scheduling) `tests/cuda_ops.rs` checks on a GPU.
//! `tests/cuda_emulation/attention.cpp` runs the fused attention kernels the same way on cases
//! this test writes, and their forward and every gradient are compared with the CPU twin.
//! Skipped, with the reason printed, where no C++20 compiler is found (`CXX`, else `c++`).

use candle_core::{DType, Device, Tensor, Var};
use dpo_sam::kernels::attention::{self, QkvPacking};
use dpo_sam::models::ops;
use std::path::Path;
use std::process::Command;

/// `source` (in tests/cuda_emulation) compiled into a scratch directory, as the file's stem; None
/// (the reason printed) where no C++20 compiler is found.
fn compile(root: &Path, source: &str) -> Option<tempfile::TempDir> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let scratch = tempfile::tempdir().unwrap();
    let exe = scratch.path().join(source.trim_end_matches(".cpp"));
    let compiled = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-I"])
        .arg(root.join("include"))
        .arg("-o")
        .arg(&exe)
        .arg(root.join(source))
        .output();
    match compiled {
        Err(e) => {
            eprintln!("skipping: no C++ compiler `{cxx}` ({e}); set CXX to a C++20 compiler");
            None
        }
        Ok(out) if !out.status.success() => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // An old compiler without C++20's <barrier> is a missing tool, not a kernel bug.
            if stderr.contains("barrier") && stderr.contains("No such file") {
                eprintln!("skipping: `{cxx}` has no C++20 <barrier>");
                return None;
            }
            panic!("{cxx} failed on the kernels compiled for the host:\n{stderr}");
        }
        Ok(_) => Some(scratch),
    }
}

#[test]
fn cuda_kernels_match_references_on_the_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation");
    let Some(scratch) = compile(&root, "harness.cpp") else {
        return;
    };
    let exe = scratch.path().join("harness");
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

/// One attention case: the kernels of `cuda/attention.cu` run on the host (`attention.cpp`)
/// against the CPU twin, forward and every input's gradient.
#[derive(Clone, Copy)]
struct AttnCase {
    name: &'static str,
    bf16: bool,
    /// None: q, k and v apart (k, v with `hkv` heads); else read out of one projection.
    packing: Option<QkvPacking>,
    b: usize,
    h: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
    rot: usize,
    /// Which keys query `i` of sequence `bi` sees (None: masked), as `[b, 1, t, s]` or, when
    /// `per_batch` is false, one `[t, s]` mask for all.
    sees: fn(usize, usize, usize) -> bool,
    per_batch: bool,
}

/// Deterministic N(0, scale²)-ish values (sums of uniforms), so that the case is the same on
/// every run.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|_| scale * (0..4).map(|_| uniform()).sum::<f32>() * 1.7)
        .collect()
}

fn write_f32(path: &Path, t: &Tensor) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path, like: &Tensor) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let v: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_vec(v, like.shape(), &Device::Cpu).unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    let (diff, norm) = (
        diff.to_scalar::<f32>().unwrap() as f64,
        norm.to_scalar::<f32>().unwrap() as f64,
    );
    (diff / norm.max(1e-30)).sqrt()
}

/// Runs `case` through the emulated kernels and the CPU twin; returns (what, relative error).
fn attention_case(exe: &Path, case: &AttnCase) -> Vec<(String, f64)> {
    let AttnCase {
        b,
        h,
        hkv,
        t,
        s,
        d,
        rot,
        ..
    } = *case;
    let dir = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    // Inputs rounded to the storage type, so both sides see the same values.
    let input = |dims: &[usize], seed: u64, scale: f32| {
        let n = dims.iter().product();
        let x = Tensor::from_vec(values(n, seed, scale), dims, &cpu).unwrap();
        if case.bf16 {
            x.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        } else {
            x
        }
    };
    let mb = if case.per_batch { b } else { 1 };
    let mut mask = vec![0f32; mb * t * s];
    for (i, m) in mask.iter_mut().enumerate() {
        let (bi, q, k) = (i / (t * s), (i / s) % t, i % s);
        if !(case.sees)(bi, q, k) {
            *m = -1e9;
        }
    }
    let mask = Tensor::from_vec(mask, (mb, 1, t, s), &cpu).unwrap();
    let mask = if case.bf16 {
        mask.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    } else {
        mask
    };
    let g = input(&[b, h, t, d], 7, 1.0);
    let (cos, sin) = if rot > 0 {
        let (c, s) = ops::rotary_tables(t, rot, 10_000.0, DType::F32, &cpu).unwrap();
        (Some(c), Some(s))
    } else {
        (None, None)
    };
    let layout = match case.packing {
        None => 0,
        Some(QkvPacking::PerHead) => 1,
        Some(QkvPacking::Blocked) => 2,
    };
    std::fs::write(
        dir.path().join("case.txt"),
        format!(
            "{} {layout} {b} {h} {hkv} {t} {s} {d} {rot} {mb} 1",
            case.bf16 as u8
        ),
    )
    .unwrap();
    write_f32(&dir.path().join("mask.bin"), &mask);
    if let (Some(c), Some(s)) = (&cos, &sin) {
        write_f32(&dir.path().join("cos.bin"), c);
        write_f32(&dir.path().join("sin.bin"), s);
    }
    let mut errors = Vec::new();
    match case.packing {
        None => {
            let q = Var::from_tensor(&input(&[b, h, t, d], 1, 1.0)).unwrap();
            let k = Var::from_tensor(&input(&[b, hkv, s, d], 2, 1.0)).unwrap();
            let v = Var::from_tensor(&input(&[b, hkv, s, d], 3, 1.0)).unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                write_f32(&dir.path().join(format!("{name}.bin")), x.as_tensor());
            }
            let rep = h / hkv;
            let kr = ops::repeat_kv(k.as_tensor().clone(), rep).unwrap();
            let vr = ops::repeat_kv(v.as_tensor().clone(), rep).unwrap();
            let y = attention::attention(q.as_tensor(), &kr, &vr, &mask).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            write_f32(&dir.path().join("g.bin"), &g);
            run_attention_harness(exe, dir.path());
            errors.push((
                "y".into(),
                rel_error(&read_f32(&dir.path().join("y.bin"), &y), &y),
            ));
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let want = grads.get(x.as_tensor()).unwrap();
                let got = read_f32(&dir.path().join(format!("d{name}.bin")), want);
                errors.push((format!("d{name}"), rel_error(&got, want)));
            }
        }
        Some(packing) => {
            let qkv = Var::from_tensor(&input(&[b, t, 3 * h * d], 1, 1.0)).unwrap();
            write_f32(&dir.path().join("qkv.bin"), qkv.as_tensor());
            let rope = cos.as_ref().zip(sin.as_ref());
            let y = attention::packed_attention(qkv.as_tensor(), packing, h, rope, &mask).unwrap();
            // g is [b, h, t, d] for the harness' o layout: here the merged [b, t, h·d].
            let g = g.reshape((b, t, h * d)).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            write_f32(&dir.path().join("g.bin"), &g);
            run_attention_harness(exe, dir.path());
            errors.push((
                "y".into(),
                rel_error(&read_f32(&dir.path().join("y.bin"), &y), &y),
            ));
            let want = grads.get(qkv.as_tensor()).unwrap();
            let got = read_f32(&dir.path().join("dqkv.bin"), want);
            errors.push(("dqkv".into(), rel_error(&got, want)));
        }
    }
    errors
}

fn run_attention_harness(exe: &Path, dir: &Path) {
    let out = Command::new(exe)
        .arg(dir)
        .output()
        .expect("run the attention harness");
    assert!(
        out.status.success(),
        "attention harness failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fused attention kernels against the CPU twin (`kernels::attention`; grouped-query
/// attention as the twin on repeated k/v heads): causal, left padding with fully masked rows,
/// right padding, a sliding window shorter than t, GQA, head dims 64/80/128, sequence lengths
/// that are not a multiple of the 16-row tile, partial rotary read out of a packed projection,
/// a cached-decoding shape (3 new queries over 23 keys), f32 (≤ 1e-5) and bf16 (≤ 1e-2).
#[test]
fn cuda_attention_matches_cpu_twin_on_the_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation");
    let Some(scratch) = compile(&root, "attention.cpp") else {
        return;
    };
    let exe = scratch.path().join("attention");
    // Each case differs from this one (f32, q/k/v apart, causal) where it says.
    let base = AttnCase {
        name: "causal, d 64",
        bf16: false,
        packing: None,
        b: 2,
        h: 2,
        hkv: 2,
        t: 37,
        s: 37,
        d: 64,
        rot: 0,
        sees: |_, q, k| k <= q,
        per_batch: false,
    };
    let window: fn(usize, usize, usize) -> bool = |_, q, k| k <= q && q < k + 7;
    // Sequence 1 is left-padded by 5: its first 5 query rows see no key at all.
    let left: fn(usize, usize, usize) -> bool = |bi, q, k| k <= q && k >= 5 * bi;
    let cases = [
        base,
        AttnCase {
            name: "causal + left padding, d 64",
            t: 21,
            s: 21,
            sees: left,
            per_batch: true,
            ..base
        },
        AttnCase {
            name: "causal + right padding, d 80",
            t: 21,
            s: 21,
            d: 80,
            sees: |bi, q, k| k <= q && k < 21 - 6 * bi,
            per_batch: true,
            ..base
        },
        AttnCase {
            name: "sliding window 7, GQA 4/2, d 80",
            h: 4,
            d: 80,
            sees: window,
            ..base
        },
        AttnCase {
            name: "cached decoding 3 over 23 keys, GQA 4/1, d 128",
            b: 1,
            h: 4,
            hkv: 1,
            t: 3,
            s: 23,
            d: 128,
            sees: |_, q, k| k <= q + 20,
            ..base
        },
        AttnCase {
            name: "packed per head, rotary 20 of 80",
            packing: Some(QkvPacking::PerHead),
            t: 21,
            s: 21,
            d: 80,
            rot: 20,
            ..base
        },
        AttnCase {
            name: "packed in blocks, d 128",
            packing: Some(QkvPacking::Blocked),
            b: 1,
            t: 19,
            s: 19,
            d: 128,
            ..base
        },
        AttnCase {
            name: "bf16 sliding window 7, GQA 4/2, d 64",
            bf16: true,
            b: 1,
            h: 4,
            sees: window,
            ..base
        },
        AttnCase {
            name: "bf16 packed per head, left padding, rotary 32 of 128",
            bf16: true,
            packing: Some(QkvPacking::PerHead),
            h: 1,
            hkv: 1,
            t: 21,
            s: 21,
            d: 128,
            rot: 32,
            sees: left,
            per_batch: true,
            ..base
        },
    ];
    let mut failed = Vec::new();
    for case in &cases {
        let bound = if case.bf16 { 1e-2 } else { 1e-5 };
        for (what, err) in attention_case(&exe, case) {
            let ok = err <= bound && err.is_finite();
            eprintln!(
                "{:<56} {what:<5} {err:.2e} ≤ {bound:.0e} {}",
                case.name,
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failed.push(format!("{} {what}", case.name));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "attention kernels differ from the CPU twin: {failed:?}"
    );
}
