//! Random normal weights drawn on the GPU. The CPU loader draws each tensor from a ChaCha
//! stream on the host (`models::seeded_init`), which took 70–100 s per Pythia-2.8B model before
//! the upload; on CUDA, `cuda/init.cu` draws element k of a tensor from the splitmix64 outputs
//! 2k and 2k + 1 of the tensor's key (Box–Muller). Deterministic for a key, independent of the
//! launch shape, and not the same values as the CPU's stream. [`randn_host`] computes the same
//! stream on the host: the kernel's reference in `dpo-sam gpu-check`.

use candle_core::{Device, Result, Shape, Tensor};

/// N(mean, stdev²) f32 values of `shape` from stream `key`, drawn on the device; `None` on the
/// CPU (whose loader keeps its own stream).
pub fn randn_on_device(
    key: u64,
    shape: &Shape,
    mean: f64,
    stdev: f64,
    device: &Device,
) -> Result<Option<Tensor>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => gpu::randn(dev, key, shape, mean, stdev).map(Some),
        _ => {
            let _ = (key, shape, mean, stdev);
            Ok(None)
        }
    }
}

/// splitmix64's output `index` for seed `key`.
fn splitmix64(key: u64, index: u64) -> u64 {
    let mut z = key.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first `n` values of stream `key`, computed on the host as the kernel does (its f32
/// log, sqrt and cos may differ from the device's by an ulp or two).
pub fn randn_host(key: u64, n: usize, mean: f32, stdev: f32) -> Vec<f32> {
    const TWO_M24: f32 = 5.960_464_5e-8;
    (0..n as u64)
        .map(|k| {
            let u1 = ((splitmix64(key, 2 * k) >> 40) + 1) as f32 * TWO_M24;
            let u2 = (splitmix64(key, 2 * k + 1) >> 40) as f32 * TWO_M24;
            mean + stdev * ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos())
        })
        .collect()
}

#[cfg(feature = "cuda")]
mod gpu {
    use crate::kernels::cuda::{self, Arg, INIT};
    use candle_core::{CudaDevice, DType, Result, Shape, Tensor};

    pub fn randn(
        dev: &CudaDevice,
        key: u64,
        shape: &Shape,
        mean: f64,
        stdev: f64,
    ) -> Result<Tensor> {
        let n = shape.elem_count();
        let out = cuda::alloc(dev, DType::F32, n)?;
        if n > 0 {
            let stream = dev.cuda_stream();
            let (p, _p) = cuda::buf(&out, &stream)?;
            let args = [
                Arg::Ptr(p),
                Arg::I64(n as i64),
                Arg::I64(key as i64),
                Arg::F32(mean as f32),
                Arg::F32(stdev as f32),
            ];
            // SAFETY: the buffer holds n floats.
            unsafe { cuda::run(dev, &INIT, "randn_f32", cuda::elementwise_config(n), &args)? };
        }
        Ok(cuda::tensor(out, shape.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host stream is a standard normal: mean, variance and tails of 200k draws.
    #[test]
    fn host_stream_is_standard_normal_and_keyed() {
        let v = randn_host(7, 200_000, 0.0, 1.0);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let beyond2 = v.iter().filter(|x| x.abs() > 2.0).count() as f64 / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        assert!((beyond2 - 0.0455).abs() < 0.003, "P(|z| > 2) = {beyond2}");
        assert!(v.iter().all(|x| x.is_finite()));
        assert_eq!(randn_host(7, 5, 0.0, 1.0), v[..5].to_vec());
        assert_ne!(randn_host(8, 5, 0.0, 1.0), v[..5].to_vec());
        let scaled = randn_host(7, 5, 1.0, 0.02);
        for (s, z) in scaled.iter().zip(&v) {
            assert!((s - (1.0 + 0.02 * z)).abs() < 1e-6);
        }
    }
}
