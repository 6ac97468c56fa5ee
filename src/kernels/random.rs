//! Counter-based random numbers for LoRA dropout masks and stochastic rounding: each value is a
//! pure function of a stream key and its index (SplitMix64's n-th output), so a stream restarts
//! anywhere — in a resumed run, or in a checkpointed block recomputed by the backward — and
//! splits over threads without changing. Keys come from [`key`] over (seed, step, tensor, …).
//!
//! On the CPU every value is computed here; on other devices [`uniform`] seeds the device's own
//! generator with the key, which is as reproducible there but gives other numbers.

use super::cpu::par_blocks;
use candle_core::{DType, Device, Result, Shape, Tensor};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function: a bijective mix of 64 bits.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of one stream, from the values that identify it.
pub fn key(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(GOLDEN, |k, &p| mix(k ^ mix(p.wrapping_add(GOLDEN))))
}

/// 64 random bits: value `index` of stream `key`.
#[inline(always)]
pub fn bits(key: u64, index: u64) -> u64 {
    mix(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)))
}

/// A uniform value in [0, 1) with 24 random bits.
#[inline(always)]
pub fn unit(key: u64, index: u64) -> f32 {
    (bits(key, index) >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// f32 values uniform in [0, 1) of stream `key`, element i being [`unit`]`(key, i)` on the CPU.
pub fn uniform(shape: &Shape, key: u64, device: &Device) -> Result<Tensor> {
    if !device.is_cpu() {
        device.set_seed(key)?;
        return Tensor::rand(0f32, 1f32, shape, device);
    }
    let mut v = vec![0f32; shape.elem_count()];
    par_blocks(&mut v, 1, 8, |first, block| {
        for (i, x) in block.iter_mut().enumerate() {
            *x = unit(key, (first + i) as u64);
        }
    });
    Tensor::from_vec(v, shape, device)
}

/// An inverted-dropout mask in `dtype`: 0 with probability `p`, else 1 / (1 − p), as
/// `torch.nn.Dropout` scales the kept values.
pub fn dropout_mask(
    shape: &Shape,
    p: f64,
    key: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keep = uniform(shape, key, device)?.ge(p)?;
    keep.to_dtype(dtype)?.affine(1.0 / (1.0 - p), 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_uniform_and_distinct() -> Result<()> {
        let shape = Shape::from(100_000);
        let a = uniform(&shape, key(&[1, 2]), &Device::Cpu)?.to_vec1::<f32>()?;
        let b = uniform(&shape, key(&[1, 2]), &Device::Cpu)?.to_vec1::<f32>()?;
        let c = uniform(&shape, key(&[1, 3]), &Device::Cpu)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        // The mean of 1e5 uniforms has standard deviation 0.0009.
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        // Any index restarts the stream: value i does not depend on the values before it.
        assert_eq!(a[77_777], unit(key(&[1, 2]), 77_777));
        Ok(())
    }

    #[test]
    fn dropout_mask_keeps_one_minus_p_scaled_up() -> Result<()> {
        let m = dropout_mask(&Shape::from(50_000), 0.25, 7, DType::F32, &Device::Cpu)?
            .to_vec1::<f32>()?;
        assert!(m.iter().all(|&x| x == 0.0 || (x - 4.0 / 3.0).abs() < 1e-6));
        let kept = m.iter().filter(|&&x| x > 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        Ok(())
    }
}
