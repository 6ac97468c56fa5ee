//! Device selection: `--device cpu|cuda[:N]`, shared by every subcommand; and the host
//! allocator's settings for CPU training.

use anyhow::{bail, Result};
use candle_core::Device;

/// Checks a device name (`cpu`, `cuda`, `cuda:N`) without opening the device; returns the CUDA
/// ordinal, if any.
pub fn parse_name(name: &str) -> Result<Option<usize>> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(None);
    }
    match name.strip_prefix("cuda") {
        Some("") => Ok(Some(0)),
        Some(rest) => match rest.strip_prefix(':').map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => bail!("device `{name}`: expected `cpu`, `cuda` or `cuda:N`"),
        },
        None => bail!("device `{name}`: expected `cpu`, `cuda` or `cuda:N`"),
    }
}

/// Opens the named device.
pub fn parse(name: &str) -> Result<Device> {
    match parse_name(name)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "device `{name}`: this binary was built without CUDA; rebuild with \
                     `cargo build --release --features cuda` (see scripts/build-cuda.sh)"
                );
            }
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}

/// GPUs visible to this process (`CUDA_VISIBLE_DEVICES` applies); an error in a build without
/// CUDA.
pub fn cuda_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let n = CudaContext::device_count().map_err(|e| {
            anyhow::anyhow!("cannot count the GPUs (is the NVIDIA driver loaded?): {e:?}")
        })?;
        Ok(n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    bail!(
        "a CUDA device: this binary was built without CUDA; rebuild with \
         `cargo build --release --features cuda` (see scripts/build-cuda.sh)"
    )
}

/// Makes glibc's malloc keep freed tensor buffers for reuse. By default it maps every buffer
/// above its mmap threshold (at most 32 MiB) afresh and unmaps it when freed, and trims the heap
/// top, so each training step faulted in and zeroed its logits tiles and embedding gradients
/// again: ~150k page faults per Pythia-160M step, `clear_page` the largest non-matmul cost in a
/// profile. With mmap off and up to 1 GiB of free heap kept, a step takes ~1.5k, and peak
/// memory does not grow (the same sizes recur every step).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Hands the heap's free memory back to the kernel, so that resident memory counts live data
/// only (`bench` measures a step's memory against it; [`keep_freed_memory`] keeps it otherwise).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_junk() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert_eq!(parse_name("cuda:3").unwrap(), Some(3));
        let err = parse("tpu").unwrap_err().to_string();
        assert!(err.contains("expected `cpu`"), "{err}");
        assert!(parse_name("cuda:x").is_err());
        if !candle_core::utils::cuda_is_available() {
            let err = parse("cuda:0").unwrap_err().to_string();
            assert!(err.contains("without CUDA"), "{err}");
        }
    }
}
