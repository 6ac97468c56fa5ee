//! The GPU backend (`--features cuda`): NCCL, through cudarc, sums GPU tensors in place of the
//! CPU backend's TCP; the TCP links from the rendezvous stay for small messages (configs,
//! metrics, the NCCL id itself). Rank 0 creates the NCCL unique id and broadcasts it over TCP;
//! every rank then joins the communicator on its device's stream.
//!
//! NCCL has no timeout of its own: after each all-reduce the host waits on an event with the
//! run's timeout, and aborts the communicator (which unblocks the GPU) when it passes.

use super::Collective;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::cell::RefCell;
use std::time::{Duration, Instant};

pub(super) struct Nccl {
    /// The TCP links: rank, world size, and everything that is not a GPU tensor.
    links: Box<dyn Collective>,
    /// Taken (and so aborted) when a collective times out.
    comm: RefCell<Option<Comm>>,
    device: CudaDevice,
    timeout: Duration,
}

impl Nccl {
    /// Joins the NCCL communicator of `links`' ranks on `device`.
    pub(super) fn new(
        links: Box<dyn Collective>,
        device: &Device,
        timeout: Duration,
    ) -> Result<Nccl> {
        let device = device.as_cuda_device()?.clone();
        let id = match links.rank() {
            0 => Id::new().map_err(|e| {
                anyhow!("NCCL: cannot create the unique id: {e:?} (is libnccl.so.2 installed?)")
            })?,
            _ => Id::uninit([0; 128]),
        };
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let bytes = links
            .broadcast(&bytes)
            .context("NCCL: sending the unique id")?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (dst, src) in internal.iter_mut().zip(&bytes) {
            *dst = *src as std::ffi::c_char;
        }
        // Every rank alive and holding the id before the (blocking) NCCL initialisation.
        links.barrier().context("NCCL: before initialising")?;
        let comm = Comm::from_rank(
            device.cuda_stream(),
            links.rank(),
            links.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| {
            anyhow!(
                "NCCL: rank {} could not join the communicator: {e:?}",
                links.rank()
            )
        })?;
        Ok(Nccl {
            links,
            comm: RefCell::new(Some(comm)),
            device,
            timeout,
        })
    }

    /// Waits for the work queued on the device's stream, aborting NCCL after the timeout.
    fn wait(&self, what: &str) -> Result<()> {
        let event = self
            .device
            .cuda_stream()
            .record_event(None)
            .map_err(|e| anyhow!("{what}: {e:?}"))?;
        let start = Instant::now();
        while !event.is_complete() {
            if start.elapsed() > self.timeout {
                // Dropping the communicator aborts it, which ends the pending kernels.
                self.comm.borrow_mut().take();
                bail!(
                    "{what} did not finish within {} s (training.ddp_timeout): another rank is stuck or gone; NCCL aborted",
                    self.timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

/// The sum over ranks of an f32 GPU tensor, as a new tensor.
struct AllReduce<'a>(&'a Comm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("nccl-all-reduce: GPU tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl-all-reduce: the tensor must be contiguous")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = s.device.alloc_zeros::<f32>(end - start)?;
        self.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.links.rank()
    }

    fn world_size(&self) -> usize {
        self.links.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return self.links.all_reduce_sum(t);
        }
        if t.dtype() != DType::F32 {
            bail!("all-reduce: f32 tensors only, got {:?}", t.dtype());
        }
        let sum = {
            let comm = self.comm.borrow();
            let comm = comm
                .as_ref()
                .context("NCCL was aborted after an earlier timeout")?;
            t.contiguous()?.apply_op1_no_bwd(&AllReduce(comm))?
        };
        self.wait("NCCL all-reduce")?;
        Ok(sum)
    }

    fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.links.broadcast(bytes)
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.links.all_gather(bytes)
    }
}
